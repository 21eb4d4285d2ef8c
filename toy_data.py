"""
The toy world: procedural clips of one moving shape, a fixed toy text encoder, and an exact evaluator.

Every clip is 6 frames of 16x16 RGB showing one saturated shape (circle, square or triangle; red, green or
blue) on a black background, moving in a straight line at constant velocity and bouncing off the walls. The
prompt ("red circle") names the colour and the shape; the start position and the velocity are random.

Why this toy shows the paper's point: the randomness of a clip (where the shape starts, where it goes) is
drawn once and shared by all its frames. Frame i alone does not say where the shape is heading, so a
*bidirectional* teacher, which denoises all frames jointly, decides frame i partly from the noise of frames
> i; a causal student that sees only frames <= i cannot know that noise and, fitted to the bidirectional ODE
pairs, learns the average over the futures: a blurred shape (Causal Forcing Lemma 3.2 / Prop. 3.3). An AR
teacher decides frame i from frames <= i only, so its pairs are learnable exactly.

Pixels are rendered hard (a pixel is the shape colour iff its centre lies inside the shape, no anti-aliasing),
so every real pixel value is exactly +-1 and the data's second moment E[x^2] is exactly 1. A blurred student
has E[x^2] < 1 (Prop. 3.3), which `evaluate` reports directly.

Geometry (pixel units): x = column, y = row, (0, 0) is the top-left corner of the frame, pixel (row i, col j)
has its centre at (j + 0.5, i + 0.5). A shape's *position* is the centre of its bounding box; its walls are
[h, SIZE - h] per axis, h = HALF_EXTENT[shape], so the shape never leaves the frame. Circle: radius 4, drawn
as the regular octagon around that circle (8 px across, ~53 px; a true disc this small grows one-pixel nubs at
sub-pixel positions). Square: side 6 (36 px). Triangle: apex up, base 8, height 7 (~28 px). Positions sit on
the integer lattice between the walls and the velocity is +-1 px/frame per axis (random signs): every clip
moves diagonally and each shape always has the same raster mask. Continuous positions make a zoo of sub-pixel
rasterisations that a CPU-sized model spends its budget on without teaching anything about causality.

The exact evaluator, `evaluate(clips, prompts)`. Each key, then [what real clips score]:
  blur           mean Euclidean RGB distance from each pixel to the nearest palette colour   [0 exactly]
  second_moment  mean of x^2 over all pixel values; < 1 is a washed-out, averaged video      [1 exactly]
  prompt_acc     fraction of clips whose colour and shape, each a majority vote over frames,
                 match the prompt. Colour: most frequent non-background nearest palette
                 colour. Shape: best IoU of the foreground mask against the renderer's own
                 masks on a 1/4 px grid of positions. An empty frame votes "none" (wrong)    [1 exactly]
  motion         mean displacement (px/frame) of the foreground centroid between
                 consecutive frames: the Dynamic-Degree analogue                       [sqrt(2) = 1.414]
  motion_gap     |motion - motion of the reference set|                               [0.000]
  physics        RMS residual (px) of the measured positions from the best straight-line-
                 with-bounce path, fitted per clip and axis by grid search            [0.02: fit grid]
  fd             Frechet distance between Gaussian fits of 13 per-clip features (mean
                 position, mean |step| per axis, colour fractions, shape IoUs, area, blur,
                 physics residual; z-scored by the reference) and those of 512 real clips [0.37 at n=64: noise]
Real clips' fd is sampling noise (0.37 for the 64 clips of `python toy_data.py`; it shrinks as n grows), so
compare a model's fd against `real_metrics(n)` at the same n. Prompts are used only by prompt_acc.

The world with actions (for the action-conditioned world model, Causal Forcing++ §3.3): `sample_action_clips`
moves the shape each frame by a per-frame action (four diagonals or stay, walls clamp), held for a few frames and
then changed; `action_report` measures whether generated clips follow their actions (accuracy, response delay).

Run `python toy_data.py` to print the metrics of real clips beside corrupted ones (blurred, static, shuffled,
wrong prompt, lumpy edges), time the sampler and the evaluator, and write out/toy_real.gif and
out/toy_first_frame.png (an I2V input for sample_stream.py).
"""
import math
import time
from pathlib import Path

import numpy as np
import torch

SIZE = 16  # frames are 16x16 RGB
FRAMES = 6  # frames per training clip (divisible by 1, 2 and 3: frame-wise and chunk-wise blocks)
COLOURS = {"red": (1.0, -1.0, -1.0), "green": (-1.0, 1.0, -1.0), "blue": (-1.0, -1.0, 1.0)}  # saturated, on black
BACKGROUND = (-1.0, -1.0, -1.0)
SHAPES = ("circle", "square", "triangle")
PROMPTS = [f"{c} {s}" for c in COLOURS for s in SHAPES]  # 9 prompts; "" is the unconditional prompt
TEXT_DIM = 32  # width of the toy text encoder's token embeddings (model's text_dim)
TEXT_LEN = 2  # tokens per prompt: colour token, shape token
TEXT_SEED = 0  # the toy text encoder's embeddings are drawn once from this seed

CIRCLE_RADIUS = 4.0  # sizes chosen so the three masks differ a lot at 16x16 (circle 8 across, square 6, triangle 8x7)
SQUARE_SIDE = 6.0
TRIANGLE_BASE, TRIANGLE_HEIGHT = 8.0, 7.0
HALF_EXTENT = torch.tensor([[4.0, 4.0], [3.0, 3.0], [4.0, 3.5]])  # (shape, xy): half the bounding box
SPEED = 1.0  # px/frame per axis, random sign
PALETTE = torch.tensor([BACKGROUND, *COLOURS.values()])  # (4, 3); index 0 is the background

FIT_VMAX = 2.0  # the physics fit searches velocities in [-2, 2] px/frame per axis (data: |v| = 1)
REF_N, REF_SEED = 512, 1234  # the default reference set of real clips
FD_FLOOR = 0.1  # features constant on real clips (blur = 0) are z-scored with this scale instead of std 0


# -----------------------------------------------------------------------------
# prompts and the toy text encoder

def parse_prompt(prompt):
    """'red circle' -> (colour index, shape index); anything else is an error that lists the valid prompts."""
    if prompt not in PROMPTS:
        raise ValueError(f"the toy cannot represent prompt {prompt!r}; valid prompts: {PROMPTS} "
                         f"(the text encoder also takes '' for the unconditional branch)")
    i = PROMPTS.index(prompt)
    return i // len(SHAPES), i % len(SHAPES)


def prompt_indices(prompts):
    """Prompts -> (B, 2) long: each one's (colour, shape) indices."""
    return torch.tensor([parse_prompt(p) for p in prompts], dtype=torch.long).reshape(len(prompts), 2)


class TextEncoder:
    """The toy's stand-in for umT5: a fixed lookup of one embedding per word, never trained.

    A prompt becomes TEXT_LEN = 2 tokens (colour, shape), each a unit-variance Gaussian vector drawn once from a
    fixed seed, independent of the global RNG, so every script and checkpoint sees the same "text features".
    The empty prompt maps to all zeros, the unconditional branch (like Wan's zero-padded T5 rows).
    Output is on CPU; callers move it to their device.
    """

    vocab = (*COLOURS, *SHAPES)

    def __init__(self):
        g = torch.Generator().manual_seed(TEXT_SEED)  # own generator: the global RNG neither changes nor matters
        self.embedding = torch.randn(len(self.vocab), TEXT_DIM, generator=g)  # (6, TEXT_DIM)

    def __call__(self, prompts):
        if isinstance(prompts, str):
            raise TypeError(f"TextEncoder takes a list of prompts, got the string {prompts!r}")
        ctx = torch.zeros(len(prompts), TEXT_LEN, TEXT_DIM)  # (B, TEXT_LEN, TEXT_DIM)
        for b, prompt in enumerate(prompts):
            if prompt == "":
                continue  # unconditional: zeros
            colour, shape = parse_prompt(prompt)
            ctx[b, 0] = self.embedding[colour]
            ctx[b, 1] = self.embedding[len(COLOURS) + shape]
        return ctx


# -----------------------------------------------------------------------------
# the generator: trajectories, then hard rendering

def bounce(u, lo, hi):
    """Fold an unbounded straight-line coordinate u into [lo, hi] by mirror reflection (a triangle wave).

    This is the closed form of "move at constant velocity, reflect off the walls": the unfolded path p0 + v*t
    mirrored at every wall crossing.
    """
    L = hi - lo
    return lo + L - ((u - lo) % (2 * L) - L).abs()


def sample_trajectories(n, seed=None, generator=None, frames=FRAMES, prompts=None):
    """Draw n clips' latent variables: prompt, start position p0, velocity v, and the positions per frame.

    Returns a dict: shape (n,) long, colour (n,) long, p0 (n, 2), v (n, 2), pos (n, F, 2) in px (x, y),
    prompts list[str]. Deterministic given seed (or a torch.Generator); global RNG otherwise.
    """
    if seed is not None:
        if generator is not None:
            raise ValueError("pass seed or generator, not both")
        generator = torch.Generator().manual_seed(seed)
    if prompts is None:
        idx = torch.randint(len(PROMPTS), (n,), generator=generator)
        prompts = [PROMPTS[i] for i in idx.tolist()]
    elif len(prompts) != n:
        raise ValueError(f"got {len(prompts)} prompts for n={n} clips")
    colour, shape = prompt_indices(prompts).unbind(1)
    lo = HALF_EXTENT[shape]  # (n, 2): the walls keep the whole bounding box inside the frame
    hi = SIZE - lo
    steps = torch.floor(hi - lo + 1e-6) + 1  # (n, 2) lattice positions between the walls
    p0 = lo + torch.floor(torch.rand(n, 2, generator=generator) * steps)  # (n, 2), on the integer lattice
    sign = torch.randint(0, 2, (n, 2), generator=generator) * 2 - 1
    v = sign * SPEED  # (n, 2), drawn once per clip: the randomness every frame shares
    t = torch.arange(frames, dtype=torch.float32)
    pos = bounce(p0[:, None] + v[:, None] * t[None, :, None], lo[:, None], hi[:, None])  # (n, F, 2)
    return dict(shape=shape, colour=colour, p0=p0, v=v, pos=pos, prompts=prompts)


def shape_mask(shape, pos):
    """Boolean masks (..., SIZE, SIZE) of shapes (...) long at positions (..., 2): pixel centre inside the shape."""
    c = torch.arange(SIZE, dtype=torch.float32) + 0.5  # pixel centres
    dx = c - pos[..., 0, None, None]  # (..., 1, W)
    dy = c[:, None] - pos[..., 1, None, None]  # (..., H, 1)
    # the "circle" is the regular octagon around it (all 8 edges at distance CIRCLE_RADIUS from the centre):
    # a true disc this small, hard-rendered at sub-pixel positions, grows one-pixel nubs at its extremes
    circle = torch.maximum(torch.maximum(dx.abs(), dy.abs()), (dx.abs() + dy.abs()) / math.sqrt(2)) <= CIRCLE_RADIUS
    square = (dx.abs() <= SQUARE_SIDE / 2) & (dy.abs() <= SQUARE_SIDE / 2)
    # apex up (small y is the top row): the half-width grows linearly from 0 at the apex to base/2 at the base
    h = TRIANGLE_HEIGHT
    triangle = (dy.abs() <= h / 2) & (dx.abs() <= (TRIANGLE_BASE / 2) * (dy + h / 2) / h)
    s = shape[..., None, None]
    return torch.where(s == 0, circle, torch.where(s == 1, square, triangle))  # (..., H, W)


def render(shape, colour, pos):
    """Clips (n, F, 3, SIZE, SIZE) in {-1, +1} from shape (n,), colour (n,) indices and positions (n, F, 2)."""
    n, F = pos.shape[:2]
    mask = shape_mask(shape[:, None].expand(n, F), pos)  # (n, F, H, W)
    fg = PALETTE[1 + colour].view(n, 1, 3, 1, 1)
    bg = PALETTE[0].view(1, 1, 3, 1, 1)
    return torch.where(mask[:, :, None], fg, bg)  # (n, F, 3, H, W), exactly +-1


def sample_clips(n, seed=None, generator=None, frames=FRAMES, prompts=None):
    """n real clips (n, F, 3, SIZE, SIZE) float32 in [-1, 1] and their prompts. Prompts are uniform over
    PROMPTS unless given (one per clip). Deterministic given seed or generator."""
    traj = sample_trajectories(n, seed=seed, generator=generator, frames=frames, prompts=prompts)
    return render(traj["shape"], traj["colour"], traj["pos"]), traj["prompts"]


# -----------------------------------------------------------------------------
# the exact denoiser: the toy's data law is finite, so E[x0 | x_t] is a softmax over every clip it can make

_ALL_CLIPS = {}  # prompt -> every clip of that prompt (K, F, 3, SIZE, SIZE)


def all_clips(prompt, frames=FRAMES):
    """Every clip the toy can make for a prompt, each equally likely: every lattice start x 4 diagonal directions
    (324 circles, 484 squares, 360 triangles per colour). (K, F, 3, SIZE, SIZE)."""
    if (prompt, frames) not in _ALL_CLIPS:
        colour, shape = parse_prompt(prompt)
        lo, hi = HALF_EXTENT[shape], SIZE - HALF_EXTENT[shape]
        axes = [torch.arange(float(lo[a]), float(hi[a]) + 1e-6) for a in range(2)]
        p0 = torch.cartesian_prod(*axes).repeat_interleave(4, 0)  # (K, 2)
        v = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]]).repeat(len(p0) // 4, 1) * SPEED
        t = torch.arange(frames, dtype=torch.float32)
        pos = bounce(p0[:, None] + v[:, None] * t[None, :, None], lo, hi)  # (K, F, 2)
        K = len(p0)
        _ALL_CLIPS[prompt, frames] = render(torch.full((K,), shape), torch.full((K,), colour), pos)
    return _ALL_CLIPS[prompt, frames]


@torch.no_grad()
def exact_x0(x_t, t, prompts, past=None, frames_per_block=1, frames_alone=False):
    """The optimal denoiser of the toy, E[x0 | x_t, prompt], computed exactly: the data law is uniform over
    all_clips(prompt), so x_t = (1 - s) x0 + s eps gives each candidate clip k the posterior weight
    softmax_k(-|x_t - (1 - s) x0_k|^2 / (2 s^2)). A trained model's x0 prediction can be no better than this.
    x_t (B, F, 3, H, W) with one t per clip (B,) in (0, 1000]: the bidirectional base's question. The prompt ""
    asks the unconditional question (the clip of any prompt).
    past=clean (B, F, 3, H, W): the AR teacher's question instead: block i given its x_t and the clean blocks < i,
    i.e. candidates must match the clean past exactly and only block i's noise counts.
    frames_alone: each frame f denoised from its own x_t^f only, E[x0^f | x_t^f, prompt]: a denoiser that pools no
    evidence across frames (the yardstick for how much a model uses the other frames)."""
    if frames_alone and past is not None:
        raise ValueError("exact_x0: frames_alone asks about each noisy frame by itself; it takes no clean past")
    s = torch.as_tensor(t, dtype=torch.float32).reshape(-1) / 1000
    out = torch.empty_like(x_t)
    for b, prompt in enumerate(prompts):
        # the empty prompt (the unconditional branch) is the whole toy: every prompt's clips, equally likely
        X = torch.cat([all_clips(p, x_t.shape[1]) for p in (PROMPTS if prompt == "" else [prompt])])
        d2 = (x_t[b, None] - (1 - s[b]) * X).pow(2).flatten(2).sum(-1)  # (K, F) per-frame squared distances
        if frames_alone:
            w = torch.softmax(-d2 / (2 * s[b] ** 2), 0)  # (K, F): frame f's posterior from frame f's noise alone
            out[b] = torch.einsum("kf,kfchw->fchw", w, X)
        elif past is None:
            w = torch.softmax(-d2.sum(1) / (2 * s[b] ** 2), 0)  # (K,)
            out[b] = torch.einsum("k,kfchw->fchw", w, X)
        else:
            match = (X == past[b, None]).flatten(2).all(-1).long().cumsum(1)  # (K, F): frames 0..i all match
            for i in range(0, x_t.shape[1], frames_per_block):
                ok = match[:, i - 1] == i if i > 0 else torch.ones(len(X), dtype=torch.bool)
                logp = torch.where(ok, -d2[:, i:i + frames_per_block].sum(1) / (2 * s[b] ** 2), -torch.inf)
                w = torch.softmax(logp, 0)
                out[b, i:i + frames_per_block] = torch.einsum("k,kfchw->fchw", w, X[:, i:i + frames_per_block])
    return out


class ExactScore(torch.nn.Module):
    """The toy's exact score as a drop-in for a DiT: forward(x_t, t, ctx) returns the velocity
    v = (x_t - E[x0 | x_t, prompt]) / s of the data law itself (exact_x0), with the prompt read back from the toy
    text encoder's features (zeros: the unconditional branch). One t per clip (all frames equal). Given
    clean=x0 (the teacher-forcing path), the AR teacher's question instead: each block given the clean blocks
    before it. A perfect real score for DMD (dmd.py --real-score exact) and a perfect teacher for ODE pairs
    (ode_init.py --exact-teacher): whatever the student then does is the method's own doing, not a teacher's error.
    cfg: the config of the model it stands in for (samplers read its schedule's shift)."""

    def __init__(self, cfg=None):
        super().__init__()
        self.text, self.cfg = TextEncoder(), cfg

    def prompts(self, ctx):
        words = self.text.embedding.to(ctx.device)  # (6, TEXT_DIM)
        out = []
        for row in ctx:
            if not row.abs().any():
                out.append("")
                continue
            colour, shape = (torch.cdist(row, words).argmin(1)).tolist()  # nearest word per token
            out.append(f"{self.text.vocab[colour]} {self.text.vocab[shape]}")
        return out

    def forward(self, x_t, t, ctx, clean=None, frames_per_block=1, **_):
        t = torch.as_tensor(t, dtype=torch.float32, device=x_t.device)
        t = t.reshape(-1, 1).expand(x_t.shape[:2]) if t.ndim <= 1 else t  # (B, F)
        past = None if clean is None else clean.float().cpu()
        x0 = exact_x0(x_t.float().cpu(), t[:, 0].cpu(), self.prompts(ctx), past, frames_per_block).to(x_t.device)
        return (x_t - x0) / (t[..., None, None, None] / 1000)


class ToyData:
    """The toy world behind the interface every stage script trains on; wan_scale.LatentFolder is the Wan-scale one.
        batch(n, generator) -> x0 (n, F, C, H, W), text (n, L, text_dim), null text, prompts, actions
        texts(n, generator) -> text, null text, prompts, actions   (DMD: conditions only, clips come from rollouts)
        shape = (F, H, W), channels = C
    actions: None, or with ToyData(actions=True) the world with actions (sample_action_clips): (n, F) long, the
    action of every frame. Without actions both draw from `generator` in the same order as the toy-only code did."""

    is_toy = True
    shape, channels = (FRAMES, SIZE, SIZE), 3

    def __init__(self, actions=False):
        self.text, self.actions = TextEncoder(), actions

    def batch(self, n, generator=None):
        if self.actions:
            x0, prompts, actions = sample_action_clips(n, generator=generator)
            return x0, self.text(prompts), self.text([""] * n), prompts, actions
        x0, prompts = sample_clips(n, generator=generator)
        return x0, self.text(prompts), self.text([""] * n), prompts, None

    def texts(self, n, generator=None):
        prompts = [PROMPTS[i] for i in torch.randint(0, len(PROMPTS), (n,), generator=generator)]
        actions = sample_actions(n, FRAMES, generator) if self.actions else None
        return self.text(prompts), self.text([""] * n), prompts, actions


# -----------------------------------------------------------------------------
# the exact evaluator

_TEMPLATES = {}  # built once: the renderer's own masks on a quarter-pixel grid of positions
_REFERENCE = {}  # (frames, actions) -> reference statistics of REF_N real clips


def _templates():
    """Every shape rendered at positions 0.25 px apart across its walls: (K, H*W) masks, their shape ids,
    and each shape's centroid offset from its position (the triangle's centroid sits ~1.2 px below its bbox
    centre). Matching against the renderer itself is what makes real clips classify 100% correctly."""
    if not _TEMPLATES:
        masks, owner, offset = [], [], []
        for s in range(len(SHAPES)):
            lo, hi = HALF_EXTENT[s], SIZE - HALF_EXTENT[s]
            # offset by 1/8 px: a position exactly on a pixel-centre tie (e.g. a 7-px-wide square) never occurs
            # in sampled clips, so no template should have it
            xs = torch.arange(lo[0] + 0.125, hi[0], 0.25)
            ys = torch.arange(lo[1] + 0.125, hi[1], 0.25)
            pos = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).reshape(-1, 2)  # (K_s, 2)
            m = shape_mask(torch.full((len(pos),), s), pos).float()  # (K_s, H, W)
            masks.append(m.flatten(1))
            owner.append(torch.full((len(pos),), s))
            offset.append((_centroid(m) - pos).mean(0))
        _TEMPLATES.update(masks=torch.cat(masks), owner=torch.cat(owner), offset=torch.stack(offset))
    return _TEMPLATES


def _centroid(mask):
    """Centroid (..., 2) in px (x, y) of float masks (..., H, W); (0, 0) for an empty mask."""
    c = torch.arange(SIZE, dtype=torch.float32) + 0.5
    area = mask.sum((-1, -2)).clamp(min=1)
    return torch.stack([(mask * c).sum((-1, -2)) / area, (mask * c[:, None]).sum((-1, -2)) / area], -1)


def _vote(labels, k):
    """Majority label per clip of per-frame labels (B, F) in 0..k-1; ties go to the smaller label."""
    return torch.nn.functional.one_hot(labels, k).sum(1).argmax(-1)


def _fit_bounce(y, w, lo, hi):
    """Best straight-line-with-bounce trajectory per series by coarse-to-fine grid search.

    y, w: (M, F) measured positions and 0/1 weights (frames without a shape are ignored); lo, hi: (M,) walls.
    Returns the weighted sum of squared residuals (M,). The search is over p0 in [lo, hi] and v in
    [-FIT_VMAX, FIT_VMAX]; a brute-force grid avoids the local minima the reflections create.
    """
    t = torch.arange(y.shape[1], dtype=torch.float32)
    p0_c, v_c = (lo + hi) / 2, torch.zeros_like(lo)  # (M,) centres of the search window
    p0_r, v_r = (hi - lo) / 2, torch.full_like(lo, FIT_VMAX)  # (M,) half-widths
    grid = [(33, 41), (11, 11), (11, 11), (11, 11)]  # coarse (~0.3 px, 0.1 px/frame), then zoom in 3 times
    for n_p, n_v in grid:
        p0 = p0_c[:, None] + p0_r[:, None] * torch.linspace(-1, 1, n_p)  # (M, n_p)
        v = v_c[:, None] + v_r[:, None] * torch.linspace(-1, 1, n_v)  # (M, n_v)
        p0, v = p0[:, :, None].expand(-1, n_p, n_v).flatten(1), v[:, None, :].expand(-1, n_p, n_v).flatten(1)
        p0 = torch.minimum(torch.maximum(p0, lo[:, None]), hi[:, None])  # (M, G), stay inside the walls
        path = bounce(p0[..., None] + v[..., None] * t, lo[:, None, None], hi[:, None, None])  # (M, G, F)
        sse = ((path - y[:, None]) ** 2 * w[:, None]).sum(-1)  # (M, G)
        best = sse.argmin(1)
        p0_c, v_c = p0.gather(1, best[:, None])[:, 0], v.gather(1, best[:, None])[:, 0]
        p0_r, v_r = 2 * p0_r / (n_p - 1), 2 * v_r / (n_v - 1)  # next window: +-2 grid steps of this one
    return sse.gather(1, best[:, None])[:, 0]


def _analyse(clips):
    """Per-clip measurements of clips (B, F, 3, SIZE, SIZE); everything evaluate and the fd features need."""
    x = torch.as_tensor(clips).detach().float().cpu()
    if x.ndim != 5 or x.shape[2:] != (3, SIZE, SIZE):
        raise ValueError(f"expected clips (B, F, 3, {SIZE}, {SIZE}), got {tuple(x.shape)}")
    B, F = x.shape[:2]
    tpl = _templates()
    # nearest palette colour per pixel
    d2 = (x[:, :, None] - PALETTE[:, :, None, None]).pow(2).sum(3)  # (B, F, 4, H, W) squared RGB distances
    d2, near = d2.min(2)  # (B, F, H, W)
    dist = d2.sqrt()
    fg = (near > 0).float()  # foreground: nearest colour is not the background
    area = fg.sum((-1, -2))  # (B, F)
    valid = area > 0
    counts = torch.nn.functional.one_hot(near, 4)[..., 1:].sum((2, 3)).float()  # (B, F, 3) pixels per colour
    none = len(COLOURS)  # label of an empty frame: always a wrong vote
    frame_colour = torch.where(valid, counts.argmax(-1), none)
    # shape: best IoU against each shape's templates; a few stray pixels only shrink the IoU a little
    m = fg.reshape(B * F, SIZE * SIZE)
    inter = m @ tpl["masks"].T  # (B*F, K)
    iou = inter / (m.sum(1, keepdim=True) + tpl["masks"].sum(1) - inter).clamp(min=1)
    iou = torch.stack([iou[:, tpl["owner"] == s].max(1).values for s in range(len(SHAPES))], -1)  # (B*F, 3)
    iou = iou.view(B, F, len(SHAPES))
    frame_shape = torch.where(valid, iou.argmax(-1), len(SHAPES))
    colour, shape = _vote(frame_colour, none + 1), _vote(frame_shape, len(SHAPES) + 1)  # (B,)
    # position = centroid minus the detected shape's centroid offset, so it lives between that shape's walls
    centroid = _centroid(fg)  # (B, F, 2)
    s = torch.where(shape == len(SHAPES), 1, shape)  # no shape found: use the square's walls
    pos = centroid - tpl["offset"][s][:, None]  # (B, F, 2)
    lo = HALF_EXTENT[s]  # (B, 2)
    w = valid.float()[:, None].expand(B, 2, F).reshape(2 * B, F)
    sse = _fit_bounce(pos.transpose(1, 2).reshape(2 * B, F), w, lo.reshape(-1), (SIZE - lo).reshape(-1))
    n_pos = 2 * valid.sum(1)  # (B,) measured coordinates per clip
    pair = valid[:, 1:] & valid[:, :-1]  # (B, F-1) displacements between two frames that both show a shape
    step = (centroid[:, 1:] - centroid[:, :-1]) * pair[..., None]  # (B, F-1, 2)
    return dict(x=x, dist=dist, valid=valid, area=area, counts=counts, iou=iou, colour=colour, shape=shape,
                frame_colour=frame_colour, frame_shape=frame_shape,
                centroid=centroid, pos=pos, sse=sse.view(B, 2).sum(1), n_pos=n_pos, step=step, pair=pair)


def frames_matching(clips, prompts):
    """(B, F) bool: each frame, read on its own, shows the prompt's colour and shape."""
    a = _analyse(clips)
    target = prompt_indices(prompts)
    return (a["frame_colour"] == target[:, :1]) & (a["frame_shape"] == target[:, 1:])


def measure_positions(clips, shapes=None):
    """The evaluator's position of the shape in every frame: (B, F, 2) px (x, y) and (B, F) bool "shows a shape".
    It is the foreground centroid minus the shape's centroid offset, the shape being the one the evaluator
    detects in the clip or, given `shapes` (B,) long, the true one (so a wrong shape vote does not move it).
    On real clips it is the renderer's position to within 0.13 px (the triangle's raster centroid moves a little
    with the position; the offset is its average)."""
    a = _analyse(clips)
    if shapes is None:
        return a["pos"], a["valid"]
    return a["centroid"] - _templates()["offset"][torch.as_tensor(shapes)][:, None], a["valid"]


def _features(a):
    """13 analytic features per clip (B, 13) numpy: mean centroid x, y; mean |step| x, y; colour fractions
    (3); mean template IoU per shape (3); mean area; blur; physics residual. Averages skip empty frames."""
    vf = a["valid"].float()[..., None]  # (B, F, 1)

    def over_frames(q):  # (B, F, k) -> (B, k): mean over the frames that show a shape
        return (q * vf).sum(1) / vf.sum(1).clamp(min=1)

    centre = torch.where(a["valid"].any(1)[:, None], over_frames(a["centroid"]), SIZE / 2)  # (B, 2)
    speed = a["step"].abs().sum(1) / a["pair"].sum(1).clamp(min=1)[:, None]  # (B, 2)
    frac = over_frames(a["counts"] / a["area"].clamp(min=1)[..., None])  # (B, 3)
    phys = (a["sse"] / a["n_pos"].clamp(min=1)).sqrt()  # (B,)
    f = torch.cat([centre, speed, frac, over_frames(a["iou"]), a["area"].mean(1, keepdim=True),
                   a["dist"].mean((1, 2, 3))[:, None], phys[:, None]], 1)  # (B, 13)
    return f.double().numpy()


def _motion(a):
    pair = a["pair"]
    return (a["step"].norm(dim=-1).sum() / pair.sum()).item() if pair.any() else 0.0


def make_reference(clips):
    """Reference statistics (feature mean/scale/covariance, motion) of a set of real clips (B, F, 3, H, W)."""
    a = _analyse(clips)
    f = _features(a)
    loc, scale = f.mean(0), np.maximum(f.std(0), FD_FLOOR)  # z-score so px, fractions and areas weigh alike
    z = (f - loc) / scale
    return dict(frames=clips.shape[1], n=len(clips), loc=loc, scale=scale, mu=z.mean(0),
                sigma=np.cov(z, rowvar=False), motion=_motion(a))


def default_reference(frames=FRAMES, actions=False):
    """Statistics of REF_N real clips at REF_SEED (of the world with actions if `actions`), once per clip length."""
    if (frames, actions) not in _REFERENCE:
        sample = sample_action_clips if actions else sample_clips
        _REFERENCE[frames, actions] = make_reference(sample(REF_N, seed=REF_SEED, frames=frames)[0])
    return _REFERENCE[frames, actions]


def frechet_distance(mu1, sigma1, mu2, sigma2, ridge=1e-6):
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2): the FID formula on toy features.
    (S1 S2)^1/2 has the trace of the symmetric S1^1/2 S2 S1^1/2, so eigh suffices (no scipy sqrtm)."""
    eye = ridge * np.eye(len(mu1))
    s1, s2 = sigma1 + eye, sigma2 + eye
    e, V = np.linalg.eigh(s1)
    r1 = (V * np.sqrt(np.clip(e, 0, None))) @ V.T  # S1^1/2
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


def evaluate(clips, prompts, reference=None, actions=None):
    """Exact metrics of generated clips (B, F, 3, SIZE, SIZE) in [-1, 1] for their prompts (list of B).
    reference: make_reference(real clips); default: REF_N real clips of the same length. See the module
    docstring for the meaning and ideal value of each key.
    actions: a world model's clips and the actions (B, F) they were made under: the default reference is then the
    action world's, and action_acc / response (action_report) join the keys. Physics still fits straight lines,
    so turns raise it: compare it with real action clips' (real_metrics(n, actions=True)), not with 0."""
    if len(prompts) != len(clips):
        raise ValueError(f"got {len(prompts)} prompts for {len(clips)} clips")
    ref = default_reference(clips.shape[1], actions is not None) if reference is None else reference
    a = _analyse(clips)
    target = prompt_indices(prompts)
    correct = (a["colour"] == target[:, 0]) & (a["shape"] == target[:, 1])
    z = (_features(a) - ref["loc"]) / ref["scale"]  # (B, 13)
    motion = _motion(a)
    n_pos = a["n_pos"].sum()
    fd = frechet_distance(z.mean(0), np.cov(z, rowvar=False), ref["mu"], ref["sigma"]) if len(z) > 1 else math.nan
    return dict(
        blur=a["dist"].mean().item(),
        second_moment=a["x"].pow(2).mean().item(),
        prompt_acc=correct.float().mean().item(),
        motion=motion,
        motion_gap=abs(motion - ref["motion"]),
        physics=(a["sse"].sum() / n_pos).sqrt().item() if n_pos > 0 else math.nan,  # nan: no shape anywhere
        fd=fd,
        **({} if actions is None else dict(zip(("action_acc", "response"),
                                               list(action_report(clips, prompts, actions).values())[:2]))),
    )


def own_step_report(clips, prompts, tol=0.5):
    """Exposure bias, seen on a model's own clips: does frame i continue the model's *own* frames i-2, i-1?

    From two frames on, the toy's motion is determined: frame i's position is frame i-1's plus the last step,
    reflected at a wall. This measures each generated frame i >= 2 against that continuation of the clip's own
    previous two measured positions (the true shape's walls), so it asks what teacher forcing trained the model
    to do, but on the model's own past. Beside the same question asked with the *real* past
    (`next_block_report`), the gap between the two is the exposure bias that DMD's self rollout targets.
    A shape that changes size moves its measured position by half the change (step_report), so the checks are
    also split by whether the three frames' foreground boxes are equal: `off_rigid` is the fraction off among
    those rigid triples (the motion itself wrong), `rigid` the fraction of triples that are rigid.
    Returns dict(off: fraction of coordinates off by >= tol px, a frame of the three without a shape counting as
    off; per_frame: that fraction for frames 2..F-1; rigid; off_rigid). Real clips score 0 / 1 / 0 (a test)."""
    shapes = prompt_indices(prompts)[:, 1]
    pos, valid = measure_positions(clips, shapes)  # (B, F, 2), (B, F)
    lo = HALF_EXTENT[shapes][:, None]  # (B, 1, 2)
    hi = SIZE - lo
    pred = 2 * pos[:, 1:-1] - pos[:, :-2]  # (B, F-2, 2): p_{i-1} + (p_{i-1} - p_{i-2})
    pred = torch.where(pred > hi, 2 * hi - pred, torch.where(pred < lo, 2 * lo - pred, pred))  # reflect at a wall
    ok = valid[:, 2:] & valid[:, 1:-1] & valid[:, :-2]  # (B, F-2)
    off = ((pos[:, 2:] - pred).abs() >= tol) | ~ok[..., None]  # (B, F-2, 2)
    size = box_size(clips)
    rigid = ((size[:, 2:] == size[:, 1:-1]) & (size[:, 1:-1] == size[:, :-2])).all(-1)  # (B, F-2)
    return dict(off=off.float().mean().item(), per_frame=off.float().mean((0, 2)).tolist(),
                rigid=rigid.float().mean().item(),
                off_rigid=off[rigid].float().mean().item() if rigid.any() else float("nan"))


def box_size(clips):
    """(B, F, 2) width - 1 and height - 1 of each frame's foreground bounding box (pixels with any channel > 0;
    -1 - SIZE for an empty frame). A rigid shape keeps it from frame to frame."""
    fg = torch.as_tensor(clips).float().cpu().max(dim=2).values > 0  # (B, F, H, W) foreground
    idx = torch.arange(SIZE, dtype=torch.float32)
    return torch.stack([torch.where(m, idx, -1.0).amax(-1) - torch.where(m, idx, float(SIZE)).amin(-1)
                        for m in (fg.any(2), fg.any(3))], -1)


def true_box_per_frame(clips, prompts):
    """(F,) fraction of clips whose frame f has the foreground box of the prompt's shape as the renderer draws it
    (the same at every lattice position, so it is read off each shape drawn against its walls; 1 on real clips, a
    test). A model can move a shape rigidly at the wrong size; this asks whether it draws the right one."""
    shapes = torch.arange(len(SHAPES))
    true = box_size(render(shapes, torch.zeros_like(shapes), HALF_EXTENT[:, None]))  # (3, 1, 2)
    want = true[prompt_indices(prompts)[:, 1]]  # (B, 1, 2)
    return (box_size(clips) == want).all(-1).float().mean(0)


def step_report(clips, prompts, tol=0.5):
    """Which frame pairs break the motion law? In a real clip every step is exactly SPEED px per axis (bounces
    included), so this measures, for each consecutive pair (0-1, 1-2, ...), the fraction of coordinates whose step
    is off by >= tol px (a frame without a shape counting as off). Unlike own_step_report it needs no history, so
    it also reads a bidirectional model's clips. A shape that changes size between frames moves its measured
    position by half the change, so `resized` counts the pairs whose foreground bounding box (pixels with any
    channel > 0) changes width or height: a rigid shape never does. Returns dict(off, per_pair, resized); real
    clips score 0 on all three (a test)."""
    pos, valid = measure_positions(clips, prompt_indices(prompts)[:, 1])  # (B, F, 2), (B, F)
    step = (pos[:, 1:] - pos[:, :-1]).abs()  # (B, F-1, 2)
    off = ((step - SPEED).abs() >= tol) | ~(valid[:, 1:] & valid[:, :-1])[..., None]
    size = box_size(clips)  # (B, F, 2)
    resized = (size[:, 1:] != size[:, :-1]).any(-1)  # (B, F-1)
    return dict(off=off.float().mean().item(), per_pair=off.float().mean((0, 2)).tolist(),
                resized=resized.float().mean().item())


def next_block_report(continue_clip, n, frames_per_block, seed=4321, tol=0.5):
    """Teacher forcing's own question for any causal model: given the *real* past of a clip, where does the next
    block put the shape? `continue_clip(prefix, noise, prompts)` returns the next block (n, fpb, 3, H, W) after the
    clean frames prefix (n, P, 3, H, W) from the block's noise (n, fpb, 3, H, W). Blocks that start before frame 2
    are skipped (the direction is still a coin flip there). Returns dict(off: fraction of coordinates off by >= tol
    px, an empty frame counting as off; rms over frames that show a shape; real_rms: the same measurement on the
    real frames, its floor; frames: first and last frame scored)."""
    fpb = frames_per_block
    first = fpb * math.ceil(2 / fpb)  # the first block with >= 2 real frames before it
    if first >= FRAMES:
        raise ValueError(f"--frames-per-block {fpb}: no block of a {FRAMES}-frame clip has 2 real frames before it")
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    traj = sample_trajectories(n, seed=seed, prompts=prompts)
    real = render(traj["shape"], traj["colour"], traj["pos"])  # (n, F, 3, H, W)
    g = torch.Generator().manual_seed(seed)
    err, valid = [], []
    for start in range(first, FRAMES, fpb):
        noise = torch.randn(n, fpb, 3, SIZE, SIZE, generator=g)
        block = continue_clip(real[:, :start], noise, prompts)
        pos, ok = measure_positions(torch.as_tensor(block).cpu(), traj["shape"])  # (n, fpb, 2), (n, fpb)
        err.append((pos - traj["pos"][:, start:start + fpb]).abs())
        valid.append(ok[..., None].expand_as(pos))
    err, valid = torch.cat(err, 1), torch.cat(valid, 1)
    real_pos, _ = measure_positions(real[:, first:], traj["shape"])
    return dict(off=((err >= tol) | ~valid).float().mean().item(),
                rms=err[valid].pow(2).mean().sqrt().item() if valid.any() else float("nan"),
                real_rms=(real_pos - traj["pos"][:, first:]).pow(2).mean().sqrt().item(),
                frames=(first, FRAMES - 1))


def prefix_report(continue_clip, n, prefixes=(0, 1, 2), seed=4321):
    """Where a causal model's physics residual comes from: its rollouts continued from P = 0, 1, 2 *real* frames.
    From frame 0 alone the first step's direction is a free choice of 4; from two real frames the motion is
    determined. `continue_clip(prefix, noise, prompts)` returns the new frames (n, F - P, 3, H, W) after the clean
    frames prefix (n, P, 3, H, W) (P = 0: an empty prefix) from their noise. Returns {P: dict(physics of the whole
    clip, real frames included; step: the fraction of coordinates of the first generated step off by >= 0.5 px,
    as step_report: frame P-1 to P, for P = 0 frame 0 to 1)}. Real continuations score the real clips' physics and step 0 (a test)."""
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    traj = sample_trajectories(n, seed=seed, prompts=prompts)
    real = render(traj["shape"], traj["colour"], traj["pos"])  # (n, F, 3, H, W)
    noise = torch.randn(real.shape, generator=torch.Generator().manual_seed(seed))
    out = {}
    for P in prefixes:
        clip = torch.cat([real[:, :P], torch.as_tensor(continue_clip(real[:, :P], noise[:, P:], prompts)).cpu()], 1)
        out[P] = dict(physics=evaluate(clip, prompts)["physics"],
                      step=step_report(clip, prompts)["per_pair"][max(P - 1, 0)])
    return out


def area_per_frame(clips):
    """Mean foreground area (px) per frame index (F,): how big the shapes are drawn. Real: circle 52, square 36,
    triangle 28 px (38.7 over the 9 prompts). DMD's CFG push can grow the shapes frame by frame; this shows it."""
    return _analyse(clips)["area"].mean(0)


def blur_per_frame(clips):
    """The blur metric per clip and frame (B, F): mean RGB distance of each pixel to the nearest palette colour."""
    x = torch.as_tensor(clips).detach().float().cpu()
    d2 = (x[:, :, None] - PALETTE[:, :, None, None]).pow(2).sum(3).min(2).values  # (B, F, H, W)
    return d2.sqrt().mean((-1, -2))


def metric_line(metrics):
    """One printable line of evaluate()'s dict."""
    return " ".join(f"{k} {v:.3f}" for k, v in metrics.items())


def accuracy_interval(acc, n, z=1.96):
    """95% Wilson score interval (lo, hi) of an accuracy measured on n clips. The binomial s.e. sqrt(p(1-p)/n) is
    0 at p = 1 and says nothing there; Wilson's stays honest: 72 clips all right -> (0.949, 1.0)."""
    centre = (acc + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(acc * (1 - acc) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def real_metrics(n=64, seed=0, frames=FRAMES, actions=False):
    """evaluate() of n fresh real clips: the numbers to print beside a model's (same n, same frames); with
    `actions`, of clips of the action world under the evaluation's scripted actions."""
    if actions:
        clips, prompts, acts = sample_action_clips(n, seed=seed, frames=frames, actions=eval_actions(n, frames))
        return evaluate(clips, prompts, actions=acts)
    clips, prompts = sample_clips(n, seed=seed, frames=frames)
    return evaluate(clips, prompts)


# -----------------------------------------------------------------------------
# the world with actions (Causal Forcing++ §3.3's action-conditioned world model, on the toy)
#
# Per frame an action a_i from ACTIONS moves the shape from frame i-1 to frame i by ACTION_STEPS[a_i] (frame 0's
# action is ignored: frame 0 is where the shape starts). Walls *clamp*: a move into a wall stops at it, and the
# next action is obeyed as given. (With bounce, a frame's step would depend on every earlier wall hit, so "did the
# shape follow the key?" would have no per-frame answer; with clamp it is the action's step, cut at the wall.)
# Training clips hold an action for a few frames and then change it with probability P_CHANGE per frame, so
# both holding and turning are seen.

ACTIONS = ("up-left", "up-right", "down-left", "down-right", "stay")
ACTION_STEPS = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [-1.0, 1.0], [1.0, 1.0], [0.0, 0.0]])  # (x, y) px per frame
P_CHANGE = 0.3  # probability per frame that a training clip's action changes (to a uniformly drawn other one)


def parse_actions(spec, frames):
    """Actions as indices (frames,) long from names or indices ("up-left,stay,..." or a list); errors name the set
    and say when the script is shorter than the stream."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = []
    for a in items:
        a = a.strip() if isinstance(a, str) else a
        if isinstance(a, str) and a.isdigit():
            a = int(a)
        if a in ACTIONS:
            a = ACTIONS.index(a)
        if not isinstance(a, int) or not 0 <= a < len(ACTIONS):
            raise ValueError(f"unknown action {a!r}; the actions are {', '.join(ACTIONS)} "
                             f"(or their indices 0-{len(ACTIONS) - 1})")
        out.append(a)
    if len(out) < frames:
        raise ValueError(f"the action script has {len(out)} actions, fewer than the {frames} frames to generate")
    return torch.tensor(out[:frames], dtype=torch.long)


def sample_actions(n, frames=FRAMES, generator=None, p_change=P_CHANGE):
    """(n, frames) long: a random first action, then each frame keeps the previous one or, with probability
    p_change, switches to one of the others."""
    a = torch.empty(n, frames, dtype=torch.long)
    a[:, 0] = torch.randint(len(ACTIONS), (n,), generator=generator)
    for i in range(1, frames):
        change = torch.rand(n, generator=generator) < p_change
        other = (a[:, i - 1] + torch.randint(1, len(ACTIONS), (n,), generator=generator)) % len(ACTIONS)
        a[:, i] = torch.where(change, other, a[:, i - 1])
    return a


def action_positions(p0, actions, shape):
    """Positions (n, F, 2) from starts p0 (n, 2) and actions (n, F): each frame's step clamped at the walls."""
    lo = HALF_EXTENT[shape]
    hi = SIZE - lo
    pos = [p0]
    for i in range(1, actions.shape[1]):
        pos.append(torch.clamp(pos[-1] + ACTION_STEPS[actions[:, i]], lo, hi))
    return torch.stack(pos, 1)


def sample_action_clips(n, seed=None, generator=None, frames=FRAMES, prompts=None, actions=None):
    """n clips of the action world (n, F, 3, SIZE, SIZE), their prompts and actions (n, F) long (drawn as
    sample_actions does unless given). Starts on the lattice, as in sample_clips. Deterministic given seed."""
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)
    traj = sample_trajectories(n, generator=generator, frames=1, prompts=prompts)  # prompt and start only
    if actions is None:
        actions = sample_actions(n, frames, generator)
    pos = action_positions(traj["p0"], actions, traj["shape"])
    return render(traj["shape"], traj["colour"], pos), traj["prompts"], actions


def action_report(clips, prompts, actions, tol=0.5):
    """Does the shape follow the actions? From the evaluator's measured positions (with the prompt's shape):
    accuracy = fraction of steps (frame i-1 -> i, i >= 1, both frames showing a shape) whose measured step is
    within `tol` px per axis of the action's step clamped at the walls from the measured frame i-1;
    response = mean frames after an action change until the first step that follows the new action
    (0 = at once; a change never followed counts the frames left). Real clips: accuracy 1, response 0."""
    shapes = prompt_indices(prompts)[:, 1]
    pos, valid = measure_positions(clips, shapes)  # (B, F, 2), (B, F)
    lo, hi = HALF_EXTENT[shapes][:, None], SIZE - HALF_EXTENT[shapes][:, None]
    want = torch.clamp(pos[:, :-1] + ACTION_STEPS[actions[:, 1:]], lo, hi) - pos[:, :-1]
    ok = ((pos[:, 1:] - pos[:, :-1] - want).abs() <= tol).all(-1)  # (B, F-1): step i-1 -> i follows a_i
    both = valid[:, 1:] & valid[:, :-1]
    delays = []
    for b, i in (actions[:, 2:] != actions[:, 1:-1]).nonzero().tolist():  # a change at frame i + 2
        follow = ok[b, i + 1:].nonzero()
        delays.append(follow[0, 0].item() if len(follow) else ok.shape[1] - i - 1)
    return dict(accuracy=(ok & both).sum().item() / max(1, both.sum().item()),
                response=sum(delays) / len(delays) if delays else float("nan"), changes=len(delays))


def eval_actions(n, frames=FRAMES, seed=4321):
    """The scripted random actions every world-model evaluation uses (fixed by seed, like its noise)."""
    return sample_actions(n, frames, torch.Generator().manual_seed(seed))


# -----------------------------------------------------------------------------
# videos

def grid_columns(B, ncols=None):
    """Columns of a grid of B clips: ncols, or about a square, never more than B."""
    return min(ncols or math.ceil(math.sqrt(B)), B)


def to_uint8_grid(clips, ncols=None, scale=8):
    """Clips (B, F, 3, H, W) in [-1, 1] -> frames (F, H', W', 3) uint8 of a grid of clips, each upscaled
    by nearest neighbour, with 2 px grey lines between them."""
    x = torch.as_tensor(clips).detach().float().cpu()
    if x.ndim != 5 or x.shape[2] != 3:
        raise ValueError(f"expected clips (B, F, 3, H, W), got {tuple(x.shape)}")
    B, F, _, H, W = x.shape
    ncols = grid_columns(B, ncols)
    nrows = math.ceil(B / ncols)
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    x = x.repeat_interleave(scale, -2).repeat_interleave(scale, -1).permute(0, 1, 3, 4, 2)  # (B, F, sH, sW, 3)
    h, w, sep = H * scale, W * scale, 2
    grid = torch.full((F, nrows * (h + sep) - sep, ncols * (w + sep) - sep, 3), 128, dtype=torch.uint8)
    for b in range(B):
        r, c = divmod(b, ncols)
        grid[:, r * (h + sep):r * (h + sep) + h, c * (w + sep):c * (w + sep) + w] = x[b]
    return grid.numpy()


def text_strip(items, width, lines=1):
    """A white strip of uint8 RGB, `width` px wide and 12 px per line of text (+ 4) high, with each
    (x_center_px, text) of `items` drawn in black by matplotlib (Agg, off-screen): the labels of a GIF."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    height = 12 * lines + 4
    fig = Figure(figsize=(width / 100, height / 100), dpi=100, facecolor="white")
    canvas = FigureCanvasAgg(fig)
    for x, text in items:
        fig.text(x / width, 0.5, text, ha="center", va="center", fontsize=7, linespacing=1.1)
    canvas.draw()
    img = np.asarray(canvas.buffer_rgba())[..., :3]
    out = np.full((height, width, 3), 255, np.uint8)
    out[:min(height, img.shape[0]), :min(width, img.shape[1])] = img[:height, :width]
    return out


def label_grid(frames, B, ncols, tile_hw, labels=None, title=None):
    """Frames (F, H', W', 3) of a to_uint8_grid of B clips -> the same with a strip above each row of the grid
    naming each clip (labels: one string per clip) and a title strip on top (one string, or one per frame)."""
    F, _, W_all, _ = frames.shape
    (h, w), sep = tile_hw, 2
    nrows = math.ceil(B / ncols)
    rows = []
    for r in range(nrows):
        if labels is not None:
            items = [((c * (w + sep)) + w / 2, labels[r * ncols + c]) for c in range(ncols) if r * ncols + c < B]
            strip = text_strip(items, W_all, lines=max(str(t).count("\n") + 1 for _, t in items))
            rows.append(np.broadcast_to(strip, (F, *strip.shape)))
        rows.append(frames[:, r * (h + sep):r * (h + sep) + h + (sep if r < nrows - 1 else 0)])
    out = np.concatenate(rows, 1)
    if title is not None:
        titles = [title] * F if isinstance(title, str) else list(title)
        lines = max(t.count("\n") + 1 for t in titles)
        cache = {t: text_strip([(W_all / 2, t)], W_all, lines) for t in set(titles)}
        out = np.concatenate([np.stack([cache[t] for t in titles]), out], 1)
    return np.ascontiguousarray(out)


def save_video(path, clips, ncols=None, fps=8, scale=8, labels=None, title=None):
    """Write a looping GIF (or an MP4, if imageio-ffmpeg is installed) of a grid of clips (B, F, 3, H, W),
    with each clip's label (e.g. its prompt) above it and a title line on top (a string or one per frame)."""
    import imageio.v2 as imageio
    path = Path(path)
    frames = to_uint8_grid(clips, ncols, scale)  # (F, H', W', 3)
    if labels is not None or title is not None:
        B, _, _, H, W = clips.shape
        frames = label_grid(frames, B, grid_columns(B, ncols), (H * scale, W * scale), labels, title)
    if path.suffix == ".gif":
        imageio.mimsave(path, list(frames), duration=1000 / fps, loop=0)  # pillow: duration in ms per frame
    elif path.suffix == ".mp4":
        try:
            import imageio_ffmpeg  # noqa: F401
        except ImportError:
            raise RuntimeError(f"writing {path} needs the ffmpeg plugin: pip install imageio-ffmpeg "
                               f"(or save a .gif)") from None
        # H.264 in yuv420p needs even sizes: pad with the separator grey rather than let imageio rescale
        ph, pw = frames.shape[1] % 2, frames.shape[2] % 2
        frames = np.pad(frames, ((0, 0), (0, ph), (0, pw), (0, 0)), constant_values=128)
        imageio.mimsave(path, list(frames), fps=fps, macro_block_size=1)
    else:
        raise ValueError(f"save_video writes .gif or .mp4, got {path}")


def roughen(clips, k, seed=0):
    """Real clips with k pixels flipped per frame on the shape's 1-px boundary ring (inside edge or outside
    edge): the shape is lumpy, but its colour and its motion are exact. `python toy_data.py` scores it, which
    says how much of a model's physics residual and fd lumpy edges alone explain."""
    x = torch.as_tensor(clips).detach().float().clone()
    B, F, C, H, W = x.shape
    fg = (x.max(2).values > 0).float().view(B * F, 1, H, W)  # the shape's pixels (every colour has a +1 channel)
    dilated = torch.nn.functional.max_pool2d(fg, 3, 1, 1)
    eroded = -torch.nn.functional.max_pool2d(-fg, 3, 1, 1)
    ring = (dilated - eroded).view(B * F, H * W)  # 1 on both sides of the edge
    g = torch.Generator().manual_seed(seed)
    pick = (torch.rand(B * F, H * W, generator=g) * ring).topk(k, dim=1).indices  # k random ring pixels per frame
    colour = (x.view(B * F, C, H * W) * fg.view(B * F, 1, H * W)).sum(-1) / fg.view(B * F, -1).sum(-1, keepdim=True)
    rows = torch.arange(B * F)[:, None]
    inside = fg.view(B * F, H * W)[rows, pick] > 0  # (B*F, k)
    new = torch.where(inside[..., None], torch.tensor(BACKGROUND), colour[:, None])  # flip: shape <-> background
    x.view(B * F, C, H * W).transpose(1, 2)[rows, pick] = new  # (B*F, H*W, C) view: writes go into x
    return x


# -----------------------------------------------------------------------------

if __name__ == "__main__":
    import argparse  # no options; --help describes the run, anything else is refused
    argparse.ArgumentParser(description="The toy world's evaluator on real and corrupted clips (a metrics table), "
                                        "and sample GIFs of the world in out/").parse_args()
    clips, prompts = sample_clips(64, seed=0)
    t0 = time.perf_counter()
    for _ in range(100):
        sample_clips(64)
    t_sample = (time.perf_counter() - t0) / 100
    default_reference()  # build the cached reference outside the timing
    t0 = time.perf_counter()
    real = evaluate(clips, prompts)
    t_eval = time.perf_counter() - t0
    # corrupted versions of the same clips, each breaking one thing the evaluator measures
    same = sample_clips(4 * 64, seed=1, prompts=[p for p in prompts for _ in range(4)])[0]
    cases = {
        "real": (clips, prompts),
        "blurred (mean of 4 same-prompt clips)": (same.view(64, 4, *clips.shape[1:]).mean(1), prompts),
        "static (frame 0 repeated)": (clips[:, :1].expand_as(clips), prompts),
        "shuffled frames": (clips[:, torch.randperm(FRAMES, generator=torch.Generator().manual_seed(0))], prompts),
        "wrong prompt": (clips, [PROMPTS[(PROMPTS.index(p) + 4) % len(PROMPTS)] for p in prompts]),
        "lumpy (2 edge pixels flipped/frame)": (roughen(clips, 2), prompts),
        "lumpy (4 edge pixels flipped/frame)": (roughen(clips, 4), prompts),
    }
    keys = list(real)
    print(f"{'64 clips':40s}" + "".join(f"{k:>14s}" for k in keys))
    for name, (c, p) in cases.items():
        m = real if name == "real" else evaluate(c, p)
        print(f"{name:40s}" + "".join(f"{m[k]:14.3f}" for k in keys))
    print(f"sample_clips(64): {1000 * t_sample:.2f} ms, evaluate(64 clips): {1000 * t_eval:.0f} ms")
    Path("out").mkdir(exist_ok=True)
    save_video("out/toy_real.gif", clips[:16], ncols=8, labels=prompts[:16], title="real clips of the toy world")
    import imageio.v2 as imageio  # frame 0 of a real clip, full size: an I2V input for sample_stream.py
    imageio.imwrite("out/toy_first_frame.png", ((clips[0, 0].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy())
    print(f"wrote out/toy_real.gif and out/toy_first_frame.png ({prompts[0]})")
