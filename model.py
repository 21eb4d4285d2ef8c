"""
model.py — one Wan2.1-shaped diffusion transformer (DiT) for every stage, its KV cache, and the flow-matching
schedule helpers the stage scripts share.

Read this file first. The stage scripts (`ar_teacher.py`, `ode_init.py`, `causal_cd.py`, `dmd.py`) and the
streaming sampler (`sample_stream.py`) call `DiT.forward` in one of its three attention paths (plus one variant:
block-causal attention over noisy frames, for the diffusion-forcing ablation and the bidirectional-ODE student):

    path 1  bidirectional      every token sees every token                 (base model, teacher, DMD scores)
    path 2  teacher forcing    input [clean | noisy]; noisy block i sees    (training the AR model: stage 1, 2a, 2b)
                               clean blocks < i and itself
    path 3  KV cache           one block's queries see the cached past      (streaming inference, DMD self-rollout)
                               blocks + the block itself

The architecture is Wan2.1's (arXiv 2503.20314), parameter for parameter: `DiT(PRESETS["wan2.1-1.3b"])` has
exactly 1,418,996,800 parameters with Wan2.1's original state-dict names, so `wan_scale.load_wan_weights`
reads the official `diffusion_pytorch_model.safetensors` with strict key and shape checks. The toy preset is
the same code with small numbers. What differs from the official Wan / Self-Forcing / Causal-Forcing code:
  * timesteps are per frame everywhere (t has shape (B, F)); the bidirectional model is the same code with all
    frames at one t, so one class serves teacher, student, critic;
  * all attention goes through `torch.nn.functional.scaled_dot_product_attention` (no flash-attn / flex
    dependency). The block masks are described as lists of (query block, key ranges); short sequences run
    one masked SDPA call, long ones (Wan scale) loop over query blocks with unmasked calls, so no
    (2N x 2N) boolean mask is materialised there (it alone would take 4.3 GB);
  * RoPE angles are computed from absolute frame positions on the fly (float64), so there is no 1024-frame
    table to overflow when streaming long videos;
  * the KV cache stores detached K/V: when a forward needs gradients (the exit step of DMD's self-rollout), the
    block's own K/V stay in the graph and the cached past does not, which *is* Self Forcing's "no gradient
    across blocks", written as data flow rather than as a side effect of checkpointing.

Conventions used in every file of this project
-----------------------------------------------
Time: rectified flow, x_t = (1 - s) x0 + s eps with s = t / 1000 and t in [0, 1000]; t = 1000 is pure noise,
t = 0 is clean data. The network predicts the velocity v = eps - x0, so x0_hat = x_t - s v.
Shape legend: B batch, F frames, C channels, H, W pixels (or latent pixels), N tokens, D model dim,
h heads, d head dim, L text tokens. Videos are (B, F, C, H, W).

Everything that exists only for Wan scale (latent folders, the umT5 / VAE wrappers, the memory planner, the
lean optimizer) lives in `wan_scale.py`; the toy never needs it. `python -m pytest -q` tests this file (README).
"""
import math
import os
import time
import argparse
import contextlib
import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint

# -----------------------------------------------------------------------------------------------------------
# Flow-matching schedule (SPEC §1). Shared by every stage; names follow the papers.


def shift_sigma(s, shift):
    """Timestep shift s' = shift * s / (1 + (shift - 1) s): spends more of a grid at high noise."""
    return shift * s / (1 + (shift - 1) * s)


def timestep_grid(n, shift):
    """The descending n-point grid of the official FlowMatchScheduler: s_raw = linspace(1, 0, n+1)[:-1],
    shifted, times 1000. t = 0 is not on it. n=1000 is the training grid; n=48 is the ODE / CD grid
    (shift 5: 1000, 995.8, ..., 178.6, 96.2)."""
    s_raw = torch.linspace(1, 0, n + 1, dtype=torch.float64)[:-1]
    return (1000 * shift_sigma(s_raw, shift)).float()  # (n,)


NOMINAL_STEPS = {4: [1000, 750, 500, 250], 2: [1000, 500], 1: [1000]}  # the few-step lists, before the shift


def check_num_steps(num_steps, flag="num_steps"):
    if num_steps not in NOMINAL_STEPS:
        raise ConfigError(f"{flag} must be 1, 2 or 4 (got {num_steps})")


def warped_steps(num_steps, shift):
    """Few-step inference lists. Nominal steps {1000, 750, 500, 250} are read as s_raw = k/1000 and shifted
    (Self Forcing's warp_denoising_step). With shift 5: 4 -> [1000, 937.5, 833.3, 625], 2 -> [1000, 833.3],
    1 -> [1000]; these are exactly indices 0/12/24/36 of the 48-grid, which is why ODE pairs store them."""
    check_num_steps(num_steps)
    s_raw = torch.tensor(NOMINAL_STEPS[num_steps], dtype=torch.float64) / 1000
    return (1000 * shift_sigma(s_raw, shift)).float().tolist()


def _sigma(t, x):
    """s = t / 1000 broadcast to x: t is a float, (B,) or (B, F); x is (B, F, C, H, W)."""
    s = torch.as_tensor(t, dtype=torch.float32, device=x.device) / 1000
    while s.dim() < x.dim():
        s = s.unsqueeze(-1)
    return s


def add_noise(x0, eps, t):
    """Forward process: x_t = (1 - s) x0 + s eps."""
    s = _sigma(t, x0)
    return (1 - s) * x0 + s * eps


def x0_from_v(x_t, v, t):
    """x0_hat = x_t - s v (the velocity points from data to noise)."""
    return x_t - _sigma(t, x_t) * v


def v_from_x0(x_t, x0_hat, t):
    """v = (x_t - x0_hat) / s; undefined at t = 0."""
    return (x_t - x0_hat) / _sigma(t, x_t)


def euler_step(x_t, v, t, t_next):
    """One PF-ODE Euler step from t to t_next < t: x_t' = x_t - (s - s') v."""
    return x_t - (_sigma(t, x_t) - _sigma(t_next, x_t)) * v


def loss_weight(t, shift):
    """Stage-1 weight w(t) ∝ exp(-2 ((t - 500)/1000)^2) - min, normalised to mean 1 over the 1000-grid
    (official FlowMatchScheduler training weights). w(1000) = 0, peak at t = 500."""
    grid = timestep_grid(1000, shift).double()
    bell = lambda u: torch.exp(-2 * ((u - 500) / 1000) ** 2)
    y_min, y = bell(grid).min(), bell(grid) - bell(grid).min()
    return ((bell(torch.as_tensor(t, dtype=torch.float64)) - y_min) / y.mean()).float()


# -----------------------------------------------------------------------------------------------------------
# Configs. Names and numbers of the Wan presets are Wan2.1's (wan/configs/wan_t2v_1_3B.py, wan_t2v_14B.py).


@dataclass
class ModelConfig:
    dim: int = 1536  # D, model width
    ffn_dim: int = 8960  # hidden width of the feed-forward
    num_heads: int = 12  # h; head dim d = dim / num_heads (128 for Wan)
    num_layers: int = 30
    in_dim: int = 16  # C of the input video (Wan VAE latents: 16; toy RGB: 3)
    out_dim: int = 16
    text_dim: int = 4096  # width of the text encoder's tokens (umT5-XXL: 4096)
    text_len: int = 512  # L, text tokens per prompt (umT5 padded to 512)
    freq_dim: int = 256  # sinusoidal timestep embedding width
    patch: tuple = (1, 2, 2)  # (pt, ph, pw); pt must be 1 so every frame keeps its own timestep
    eps: float = 1e-6
    shift: float = 5.0  # timestep shift of this model's schedule (not architecture; saved so later stages agree)
    num_actions: int = 0  # > 0: a world model, conditioned per frame on one of this many actions (the toy's 5)


PRESETS = {
    # Wan2.1-T2V-1.3B: 1,418,996,800 parameters; 480x832 video -> 60x104 latents -> 1560 tokens per frame.
    "wan2.1-1.3b": ModelConfig(),
    # Wan2.1-T2V-14B: 14,288,491,584 parameters.
    "wan2.1-14b": ModelConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    # The toy world: 16x16 RGB frames, patch 4 -> 16 tokens per frame, 2 text tokens of width 32.
    # Head dim 32 -> RoPE splits it 12/10/10 (frame/height/width), as Wan splits 128 into 44/42/42.
    "toy": ModelConfig(dim=128, ffn_dim=512, num_heads=4, num_layers=6, in_dim=3, out_dim=3,
                       text_dim=32, text_len=2, patch=(1, 4, 4), shift=2.0),
    # Wan-shaped but tiny (Wan's in/out/text widths, few small layers): exercises the Wan code paths on a CPU.
    "wan-tiny": ModelConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2),
}


def check_preset(name):
    """--model: the name of a preset, or a one-line error listing them."""
    if name not in PRESETS:
        raise ConfigError(f"--model {name!r} is not a preset: use one of {', '.join(PRESETS)}")


# -----------------------------------------------------------------------------------------------------------
# Building blocks


def sinusoidal_embedding(t, freq_dim):
    """Wan's timestep embedding of the raw t in [0, 1000]: [cos(t f_k), sin(t f_k)], f_k = 10000^(-k / (freq_dim/2)).
    Computed in float64 as in Wan (t may be fractional, e.g. 937.5)."""
    half = freq_dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    args = t.double().unsqueeze(-1) * freqs  # (..., freq_dim/2)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1).float()  # (..., freq_dim)  cos first


class RMSNorm(nn.Module):
    """Wan's RMSNorm for q/k, over the full dim before the head split, computed in float32."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x_f = x.float()
        return (x_f * torch.rsqrt(x_f.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_cos_sin(head_dim, frame_pos, grid_hw, device):
    """3D RoPE angles for tokens laid out frame-major, then row, then column.
    head_dim d is split into frame / height / width parts of d - 4(d//6), 2(d//6), 2(d//6) real dims
    (Wan: 128 -> 44/42/42), each part with its own frequencies 10000^(-2j / part_dim).
    frame_pos: (F,) absolute frame indices (offset by where a block starts in the stream).
    Returns cos, sin of shape (F*Hp*Wp, d/2), one angle per adjacent channel pair."""
    Hp, Wp = grid_hw
    d_h = 2 * (head_dim // 6)
    d_f = head_dim - 2 * d_h

    def angles(pos, part_dim):  # (P,) -> (P, part_dim/2)
        inv_freq = 1.0 / 10000 ** (torch.arange(0, part_dim, 2, dtype=torch.float64, device=device) / part_dim)
        return pos.double().unsqueeze(-1) * inv_freq

    a_f = angles(frame_pos.to(device), d_f)  # (F, d_f/2)
    a_h = angles(torch.arange(Hp, device=device), d_h)  # (Hp, d_h/2)
    a_w = angles(torch.arange(Wp, device=device), d_h)  # (Wp, d_h/2)
    nF = a_f.shape[0]
    ang = torch.cat([
        a_f[:, None, None, :].expand(nF, Hp, Wp, -1),
        a_h[None, :, None, :].expand(nF, Hp, Wp, -1),
        a_w[None, None, :, :].expand(nF, Hp, Wp, -1),
    ], dim=-1).reshape(nF * Hp * Wp, head_dim // 2)  # (N, d/2)
    return torch.cos(ang).float(), torch.sin(ang).float()


def rope_apply(x, cos, sin):
    """Rotate adjacent channel pairs (x[2j], x[2j+1]) as complex numbers by the angle of their position,
    like Wan's view_as_complex on reshape(..., -1, 2). x: (B, h, N, d)."""
    x_f = x.float().unflatten(-1, (-1, 2))  # (B, h, N, d/2, 2)
    re, im = x_f[..., 0], x_f[..., 1]
    out = torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1)  # (B, h, N, d/2, 2)
    return out.flatten(-2).type_as(x)  # (B, h, N, d)


def blocks_to_mask(blocks, n_q, n_k, device):
    """The boolean mask (True = may attend) that a block list describes."""
    mask = torch.zeros(n_q, n_k, dtype=torch.bool, device=device)
    for q0, q1, k_ranges in blocks:
        for k0, k1 in k_ranges:
            mask[q0:q1, k0:k1] = True
    return mask


def attention(q, k, v, blocks=None, dense_limit=2 ** 26):
    """SDPA over (B, h, N, d). blocks=None: full attention (path 1, and path 3 where the cache already holds
    exactly the visible keys). Otherwise blocks is a list of (q_start, q_end, [(k_start, k_end), ...]) covering
    the queries in order: each query block attends to the union of its key ranges (paths 2 and block-causal).
    Short sequences (the toy) run one SDPA call with the equivalent boolean mask; long ones (Wan scale, where the
    (2N x 2N) mask would take GBs) loop over query blocks, each an unmasked SDPA call on its key ranges.
    blocks may also be a boolean key mask (1, 1, 1, Nk) already (the static streaming step, wan_scale.FastStep)."""
    if blocks is None or isinstance(blocks, torch.Tensor):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=blocks)
    if q.shape[2] * k.shape[2] <= dense_limit:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=blocks_to_mask(blocks, q.shape[2], k.shape[2], q.device))
    outs = []
    for q0, q1, k_ranges in blocks:
        if len(k_ranges) == 1:
            (k0, k1), = k_ranges
            k_i, v_i = k[:, :, k0:k1], v[:, :, k0:k1]
        else:
            k_i = torch.cat([k[:, :, a:b] for a, b in k_ranges], dim=2)
            v_i = torch.cat([v[:, :, a:b] for a, b in k_ranges], dim=2)
        outs.append(F.scaled_dot_product_attention(q[:, :, q0:q1], k_i, v_i))
    return torch.cat(outs, dim=2)  # (B, h, Nq, d)


def block_causal_blocks(num_frames, tokens_per_frame, frames_per_block):
    """Block-causal attention over one sequence (diffusion forcing; the CausVid / Self Forcing ODE student):
    block i sees blocks 0..i, bidirectionally inside itself."""
    Lb = frames_per_block * tokens_per_frame
    n_blocks = num_frames // frames_per_block
    return [(i * Lb, (i + 1) * Lb, [(0, (i + 1) * Lb)]) for i in range(n_blocks)]


def teacher_forcing_blocks(num_frames, tokens_per_frame, frames_per_block):
    """The teacher-forcing mask over [clean | noisy] (Causal Forcing §3 / official _prepare_teacher_forcing_mask):
      clean block i sees clean blocks 0..i;
      noisy block i sees clean blocks 0..i-1 and its own noisy block i, nothing else.
    Clean tokens never see noisy ones, so the clean half's per-layer K/V of block j are exactly what the KV cache
    holds at inference after block j is written at t = 0: training matches inference."""
    Lb = frames_per_block * tokens_per_frame
    N = num_frames * tokens_per_frame  # the clean/noisy boundary
    n_blocks = num_frames // frames_per_block
    clean = [(i * Lb, (i + 1) * Lb, [(0, (i + 1) * Lb)]) for i in range(n_blocks)]
    noisy = [(N + i * Lb, N + (i + 1) * Lb, [(0, i * Lb), (N + i * Lb, N + (i + 1) * Lb)]) for i in range(n_blocks)]
    return clean + noisy


class SelfAttention(nn.Module):
    def __init__(self, dim, num_heads, eps):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim, eps), RMSNorm(dim, eps)

    def forward(self, x, cos, sin, blocks=None, cache=None, layer=0):
        split = lambda t: rearrange(t, "b n (h d) -> b h n d", h=self.num_heads)
        q = rope_apply(split(self.norm_q(self.q(x))), cos, sin)  # (B, h, N, d)
        k = rope_apply(split(self.norm_k(self.k(x))), cos, sin)  # keys are cached after RoPE (absolute positions)
        v = split(self.v(x))
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, h, N_visible, d): cached past + this block
        out = attention(q, k, v, blocks)
        return self.o(rearrange(out, "b h n d -> b n (h d)"))


class CrossAttention(nn.Module):
    """Text cross-attention (Wan's WanT2VCrossAttention): queries from video tokens, keys/values from text."""

    def __init__(self, dim, num_heads, eps):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim, eps), RMSNorm(dim, eps)

    def text_kv(self, context):
        split = lambda t: rearrange(t, "b l (h d) -> b h l d", h=self.num_heads)
        return split(self.norm_k(self.k(context))), split(self.v(context))  # (B, h, L, d) each

    def forward(self, x, context=None, kv=None):
        q = rearrange(self.norm_q(self.q(x)), "b n (h d) -> b h n d", h=self.num_heads)
        k, v = kv if kv is not None else self.text_kv(context)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.o(rearrange(out, "b h n d -> b n (h d)"))


def modulate(x, shift, scale, n_frames):
    """adaLN per frame: x (B, F*Np, D) with shift/scale (B, F, 1, D) -> x * (1 + scale) + shift."""
    x = x.unflatten(1, (n_frames, -1))  # (B, F, Np, D)
    return (x * (1 + scale) + shift).flatten(1, 2)  # (B, F*Np, D)


def gate(x, g, n_frames):
    return (x.unflatten(1, (n_frames, -1)) * g).flatten(1, 2)


class Block(nn.Module):
    """Wan2.1's WanAttentionBlock. With (m0..m5) = modulation + e0 (per frame):
        x += self_attn(norm1(x) (1 + m1) + m0) m2
        x += cross_attn(norm3(x), text)                      (no modulation, no gate)
        x += ffn(norm2(x) (1 + m4) + m3) m5"""

    def __init__(self, cfg):
        super().__init__()
        D = cfg.dim
        self.modulation = nn.Parameter(torch.randn(1, 6, D) / D ** 0.5)
        self.norm1 = nn.LayerNorm(D, eps=cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(D, cfg.num_heads, cfg.eps)
        self.norm3 = nn.LayerNorm(D, eps=cfg.eps, elementwise_affine=True)
        self.cross_attn = CrossAttention(D, cfg.num_heads, cfg.eps)
        self.norm2 = nn.LayerNorm(D, eps=cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(D, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, D))

    def forward(self, x, e0, cos, sin, context, blocks=None, cache=None, layer=0):
        # x: (B, N, D) float32 residual stream; e0: (B, F, 6, D) float32 per-frame modulation
        nF = e0.shape[1]
        m0, m1, m2, m3, m4, m5 = (self.modulation.unsqueeze(0) + e0).chunk(6, dim=2)  # each (B, F, 1, D)
        y = self.self_attn(modulate(self.norm1(x), m0, m1, nF), cos, sin, blocks, cache, layer)
        x = x + gate(y.float(), m2, nF)
        cross_kv = None
        if context is None:  # cached text K/V: computed here, on this block's first call under a prompt (under FSDP
            if cache.cross_kv[layer] is None:  # a block's weights are whole only inside its own forward)
                with torch.no_grad():
                    cache.cross_kv[layer] = self.cross_attn.text_kv(cache.text)
            cross_kv = cache.cross_kv[layer]
        x = x + self.cross_attn(self.norm3(x), context, cross_kv).float()
        y = self.ffn(modulate(self.norm2(x), m3, m4, nF))
        return x + gate(y.float(), m5, nF)


class Head(nn.Module):
    """Output head: (h0, h1) = modulation + e (the time embedding, not e0); out = head(norm(x) (1 + h1) + h0)."""

    def __init__(self, cfg):
        super().__init__()
        D = cfg.dim
        self.norm = nn.LayerNorm(D, eps=cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(D, math.prod(cfg.patch) * cfg.out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, D) / D ** 0.5)

    def forward(self, x, e):
        # x: (B, N, D); e: (B, F, D)
        h0, h1 = (self.modulation.unsqueeze(0) + e.unsqueeze(2)).chunk(2, dim=2)  # (B, F, 1, D) each
        return self.head(modulate(self.norm(x), h0, h1, e.shape[1]))  # (B, N, pt*ph*pw*C)


# -----------------------------------------------------------------------------------------------------------
# The KV cache (path 3)


class KVCache:
    """Static per-layer K/V for streaming generation, one slot per frame (gpt-fast style layout).

    k, v: (layers, B, h, slots * tokens_per_frame, d), allocated in full on the first write.
    Full mode (window=None): slot = absolute frame index; capacity `max_frames`.
    Rolling mode: `sink` frames kept forever (slots 0..sink-1) plus a ring of `window` slots for the most
    recent frames, the current block included (Self Forcing's local_attn_size + sink_size). Frame f >= sink
    lives in slot sink + (f - sink) % window, so the visible slots are always a prefix of the buffer and the
    frames evicted on overflow are always the oldest non-sink ones.
    Denoising a block again, or the t = 0 refresh after it, writes the same slots: the refresh *overwrites*
    the noisy K/V with clean ones. The cache stores detached tensors: gradients never flow into the past.
    Cross-attention K/V of the prompt are computed once per context tensor and reused until it changes."""

    def __init__(self, max_frames=None, window=None, sink=0):
        if (max_frames is None) == (window is None):
            raise ValueError("KVCache needs exactly one of max_frames (full cache) or window (rolling cache)")
        if window is not None and window < 1:
            raise ValueError(f"rolling window must be >= 1 frame (got {window})")
        self.window, self.sink = window, sink
        self.num_slots = max_frames if window is None else sink + window
        self.k = self.v = None
        self.slot_frame = torch.full((self.num_slots,), -1, dtype=torch.long)  # absolute frame held by each slot
        self.cross_kv, self.context, self.text = None, None, None  # the prompt, its embedding, per-layer K/V

    def slot_of(self, frame):
        if self.window is None or frame < self.sink:
            return frame
        return self.sink + (frame - self.sink) % self.window

    def begin(self, start_frame, n_frames, tokens_per_frame):
        """Called once per forward, before the layers: which slots this block writes, which ones it sees."""
        end = start_frame + n_frames
        if self.window is None and end > self.num_slots:
            raise ValueError(f"KV cache holds {self.num_slots} frames but frame {end - 1} was requested; "
                             f"allocate KVCache(max_frames={end}) or use a rolling cache (window=..., sink=...)")
        if self.window is not None and n_frames > self.window:
            raise ValueError(f"a block of {n_frames} frames does not fit a rolling window of {self.window}")
        slots = torch.tensor([self.slot_of(f) for f in range(start_frame, end)])
        self.slot_frame[slots] = torch.arange(start_frame, end)
        visible = (self.slot_frame >= 0) & (self.slot_frame < end)  # written, and not from the future
        if self.window is not None:  # sinks + the `window` most recent frames (this block included)
            visible &= (self.slot_frame < self.sink) | (self.slot_frame >= end - self.window)
        per_token = lambda s: (s[:, None] * tokens_per_frame + torch.arange(tokens_per_frame)).flatten()
        self.tpf = tokens_per_frame
        self.write_tokens = per_token(slots)
        past = torch.nonzero(visible & ~torch.isin(torch.arange(self.num_slots), slots))[:, 0]
        # the past as a slice of the buffer (a view, no copy) when it is a prefix, as in a full cache from frame 0
        self.past_tokens = slice(0, len(past) * tokens_per_frame) if torch.equal(past, torch.arange(len(past))) \
            else per_token(past)
        n = int(visible.sum())
        # Streams that start at frame 0 always see a prefix of the buffer: slice it (no copy)
        self.visible_tokens = slice(0, n * tokens_per_frame) if bool(visible[:n].all()) else \
            per_token(torch.nonzero(visible)[:, 0])

    def update(self, layer, k, v):
        """Write this block's (post-RoPE) K/V into its slots; return the K/V it may attend to."""
        if self.k is None:
            B, h, _, d = k.shape
            shape = (self.num_layers, B, h, self.num_slots * self.tpf, d)
            self.k = torch.zeros(shape, dtype=k.dtype, device=k.device)
            self.v = torch.zeros(shape, dtype=v.dtype, device=v.device)
        idx = self.write_tokens.to(k.device)
        self.k[layer][:, :, idx] = k.detach().to(self.k.dtype)
        self.v[layer][:, :, idx] = v.detach().to(self.v.dtype)
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            # Keep the block's own K/V in the autograd graph; the cached past enters as constants.
            past_k, past_v = self.past(layer)
            return torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        vis = self.visible_tokens
        vis = vis if isinstance(vis, slice) else vis.to(k.device)
        return self.k[layer][:, :, vis], self.v[layer][:, :, vis]

    def past(self, layer):
        """The K/V of the frames this block sees, itself excluded, in `layer`: (B, h, N_past, d) each."""
        idx = self.past_tokens if isinstance(self.past_tokens, slice) else self.past_tokens.to(self.k.device)
        return self.k[layer][:, :, idx], self.v[layer][:, :, idx]

    def visible_frames(self):
        """Absolute indices of the frames currently held (for tests and for reading)."""
        return sorted(f for f in self.slot_frame.tolist() if f >= 0)


class FrozenCacheLayer:
    """A KVCache seen by one layer of one gradient-checkpointed forward (DMD's exit step with
    --grad-checkpointing). Backward recomputes the layer after the stream has moved on: the cache's write position
    is then another block's, and this block's slots hold its clean t = 0 K/V. So the first call (the forward)
    writes and keeps what it attended to; the recompute attends to exactly that and writes nothing. The past is
    kept as a view of the buffer for a full cache (nothing copied: a later block never rewrites an earlier block's
    slots) and as a copy for a rolling cache (whose ring reuses slots)."""

    def __init__(self, cache):
        self.cache, self.kept = cache, None

    def update(self, layer, k, v):
        if self.kept is None:  # the forward
            out = self.cache.update(layer, k, v)
            past_k, past_v = self.cache.past(layer)
            full = self.cache.window is None  # a rolling cache reuses slots: keep a copy of what was seen
            self.kept = (past_k, past_v) if full else (past_k.clone(), past_v.clone())
            return out
        past_k, past_v = self.kept  # the recompute in backward
        return torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)


# -----------------------------------------------------------------------------------------------------------
# The model


class DiT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        assert cfg.patch[0] == 1, "temporal patch must be 1: each frame carries its own timestep"
        assert cfg.dim % cfg.num_heads == 0
        self.cfg = cfg
        D = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, D, kernel_size=cfg.patch, stride=cfg.patch)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, D), nn.GELU(approximate="tanh"), nn.Linear(D, D))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, D), nn.SiLU(), nn.Linear(D, D))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))
        # World model: a per-frame action embedding added to the frame's time embedding, so it reaches every
        # block's adaLN modulation and the head (zero-initialised: until trained, the model ignores actions)
        self.action_embedding = nn.Embedding(cfg.num_actions, D) if cfg.num_actions else None
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.num_layers)])
        self.head = Head(cfg)
        self.gradient_checkpointing = False  # recompute each block in backward (Wan scale)
        self.init_weights()

    def init_weights(self):
        """Wan's init: xavier-uniform Linear weights with zero biases, normal(0.02) text/time embeddings,
        zero output head (so a fresh model predicts v = 0)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        for m in list(self.text_embedding) + list(self.time_embedding):
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.head.head.weight)
        if self.action_embedding is not None:
            nn.init.zeros_(self.action_embedding.weight)

    def tokens_per_frame(self, H, W):
        return (H // self.cfg.patch[1]) * (W // self.cfg.patch[2])

    def time_conditioning(self, t, actions=None):
        """t: (B, F) [and actions (B, F) long] -> e (B, F, D) for the head and e0 (B, F, 6, D) for the blocks,
        in float32."""
        with torch.autocast(t.device.type, enabled=False):
            emb = sinusoidal_embedding(t, self.cfg.freq_dim).to(self.time_embedding[0].weight.dtype)
            e = self.time_embedding(emb)  # (B, F, D)
            if actions is not None:
                e = e + self.action_embedding(actions).to(e.dtype)
            e0 = self.time_projection(e).unflatten(-1, (6, self.cfg.dim))  # (B, F, 6, D)
        return e.float(), e0.float()

    def embed_text(self, context):
        return self.text_embedding(context)  # (B, L, text_dim) -> (B, L, D)

    def patchify(self, x):
        x = self.patch_embedding(rearrange(x, "b f c h w -> b c f h w"))  # (B, D, F, Hp, Wp)
        return rearrange(x, "b d f h w -> b (f h w) d").float()  # (B, F*Hp*Wp, D)

    def unpatchify(self, out, n_frames, H, W):
        pt, ph, pw = self.cfg.patch
        return rearrange(out, "b (f h w) (pt ph pw c) -> b (f pt) c (h ph) (w pw)",
                         f=n_frames, h=H // ph, w=W // pw, pt=pt, ph=ph, pw=pw)  # (B, F, C, H, W)

    def forward(self, x, t, context, *, clean=None, frames_per_block=None, cache=None, start_frame=0, actions=None):
        """Predict the velocity v for noisy frames x.

        x: (B, F, C, H, W) noisy frames at per-frame times t: (B, F) (a float or (B,) is broadcast);
        context: (B, L, text_dim) text tokens; actions: (B, F) long, a world model's action of each frame of x
        (and of `clean`'s, the same frames). Returns v: (B, F, C, H, W), float32.
        The attention path follows from the arguments:
          cache=KVCache           path 3: x is one block starting at absolute frame `start_frame`;
                                  its K/V are written to the cache and it attends to the cached past + itself
          clean=(B, F, C, H, W)   path 2: teacher forcing; `clean` is the ground-truth context, run at t = 0
          frames_per_block only   block-causal over the noisy frames (diffusion forcing / bidirectional-ODE student)
          none of these           path 1: bidirectional
        """
        B, nF, C, H, W = x.shape
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
        if t.dim() == 1:  # one t per sample
            t = t[:, None]
        t = t.expand(B, nF)  # (B, F)
        tpf = self.tokens_per_frame(H, W)
        grid = (H // self.cfg.patch[1], W // self.cfg.patch[2])
        pos = torch.arange(start_frame, start_frame + nF)  # absolute frame positions for RoPE
        cos, sin = rope_cos_sin(self.cfg.dim // self.cfg.num_heads, pos, grid, x.device)  # (N, d/2)
        if (actions is None) != (self.action_embedding is None):
            raise ValueError("this model is a world model: pass actions=(B, F) long" if actions is None else
                             "actions given to a model without action conditioning (ModelConfig.num_actions = 0)")
        if actions is not None and tuple(actions.shape) != (B, nF):
            raise ValueError(f"actions must be (B, F) = {(B, nF)}, got {tuple(actions.shape)}")
        e, e0 = self.time_conditioning(t, actions)
        tokens = self.patchify(x)  # (B, N, D)
        blocks = None

        if clean is not None:  # path 2: [clean | noisy], same RoPE positions, clean half at t = 0
            if frames_per_block is None or nF % frames_per_block:
                raise ValueError(f"teacher forcing needs frames_per_block dividing F={nF} (got {frames_per_block})")
            _, e0_clean = self.time_conditioning(torch.zeros_like(t), actions)  # frame i's clean copy: same a_i
            tokens = torch.cat([self.patchify(clean), tokens], dim=1)  # (B, 2N, D)
            e0 = torch.cat([e0_clean, e0], dim=1)  # (B, 2F, 6, D)
            cos, sin = cos.repeat(2, 1), sin.repeat(2, 1)  # (2N, d/2)
            blocks = teacher_forcing_blocks(nF, tpf, frames_per_block)
        elif cache is not None:  # path 3
            cache.num_layers = self.cfg.num_layers
            cache.begin(start_frame, nF, tpf)
            if cache.context is not context:  # a new prompt: its cross-attention K/V, once (each block fills its own)
                with torch.no_grad():
                    cache.text = self.embed_text(context)
                cache.cross_kv = [None] * self.cfg.num_layers
                cache.context = context
        elif frames_per_block is not None:
            if nF % frames_per_block:
                raise ValueError(f"frames_per_block={frames_per_block} must divide F={nF}")
            blocks = block_causal_blocks(nF, tpf, frames_per_block)

        # Cached cross-attention K/V are constants; a forward that needs gradients (DMD's exit step) recomputes
        # them so the text layers are trained too.
        use_cached_text = cache is not None and not torch.is_grad_enabled()
        ctx = None if use_cached_text else self.embed_text(context)
        for layer, block in enumerate(self.blocks):
            if self.gradient_checkpointing and torch.is_grad_enabled():  # keep only each block's input
                frozen = FrozenCacheLayer(cache) if cache is not None else None  # (a cached exit step: see there)
                tokens = checkpoint(block, tokens, e0, cos, sin, ctx, blocks, frozen, layer, use_reentrant=False)
            else:
                tokens = block(tokens, e0, cos, sin, ctx, blocks, cache, layer)

        if clean is not None:
            tokens = tokens[:, nF * tpf:]  # only the noisy half goes through the head
        out = self.head(tokens, e)  # (B, N, pt*ph*pw*C)
        return self.unpatchify(out.float(), nF, H, W)


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


# -----------------------------------------------------------------------------------------------------------
# Errors a user can fix, and weights that do not fit (wan_scale.load_wan_weights reads Wan2.1's files)


class ConfigError(ValueError):
    """Bad input (a flag, a file, a missing checkpoint): `run_main` prints the message alone and exits 2."""


class WeightsMismatchError(ConfigError):
    pass


def describe_mismatch(expected, found, what="checkpoint"):
    """expected/found: {name: shape}. Returns a readable report (first few of each kind, with counts) or ''."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    misshaped = [f"{k}: model {tuple(expected[k])} vs {what} {tuple(found[k])}"
                 for k in expected if k in found and tuple(expected[k]) != tuple(found[k])]
    lines = []
    for name, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if items:
            shown = "\n    ".join(items[:5]) + ("\n    ..." if len(items) > 5 else "")
            lines.append(f"  {len(items)} {name} key(s):\n    {shown}")
    return "\n".join(lines)


# -----------------------------------------------------------------------------------------------------------
# What every script shares: device, autocast, config-from-CLI, self-describing atomic checkpoints


def pick_device(name="auto"):
    """--device: "auto" picks cuda, then mps, then cpu; a named device must exist on this machine."""
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"--device {name!r} is not a compute device: use auto, cpu, cuda, cuda:N or mps")
    if (device.type == "cuda" and not torch.cuda.is_available()) or (device.type == "mps" and not mps):
        raise ConfigError(f"--device {name}: this PyTorch sees no {device.type.upper()} device here; use --device cpu "
                          f"(or auto)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), numbered from 0")
    return device


def autocast(device, model=None):
    """bf16 autocast on GPU (Wan scale), plain float32 elsewhere (the toy on CPU is deterministic); on CPU also
    bf16 autocast when the model's weights are bf16 (--param-dtype bfloat16), so their matmuls run at all."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    weight = None if model is None else next(model.parameters(), None)  # None: a module without weights
    if weight is not None and weight.dtype == torch.bfloat16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def run_main(fn, *args):
    """Run a script's entry point; bad input ends in one line naming the problem and the fix (exit 2), while a
    real bug keeps its traceback. FileNotFoundError is bad input too: a missing checkpoint names its command."""
    import sys
    try:
        return fn(*args)
    except (ConfigError, FileNotFoundError) as err:
        print(f"error: {err.args[0] if isinstance(err, ConfigError) else err}", file=sys.stderr)
        sys.exit(2)


def field_help(cls):
    """{field: its `# comment`} read from the dataclass source (and its bases'): the comment after a field's
    default, with the comment lines that continue it, is the field's --help text."""
    import inspect
    helps = {}
    for klass in reversed(cls.__mro__[:-1]):
        if not dataclasses.is_dataclass(klass):
            continue
        name = None  # the field whose comment a comment-only line continues
        for line in inspect.getsource(klass).splitlines():
            code, _, comment = (part.strip() for part in line.partition("#"))
            if code and ":" in code and not code.startswith(("class ", '"""', "def ")):  # a field
                name = code.split(":")[0].strip()
                if comment:
                    helps[name] = comment
            elif not code and comment and name in helps:
                helps[name] += " " + comment
            elif code:
                name = None
    return helps


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors (an unknown flag, a value of the wrong type) are one line, not the usage block first."""

    def error(self, message):
        self.exit(2, f"error: {message} (--help lists every flag)\n")


def parse_config(cls, argv=None, description=None):
    """Build a dataclass config from the command line: one --flag per field (underscores -> dashes), defaults
    from the dataclass, booleans as --flag / --no-flag, each flag's help its comment in the dataclass.
    Unknown flags are an error (argparse exits); so is a value the dataclass refuses (its __post_init__ raises a
    ConfigError: one line, exit 2)."""
    parser = OneLineParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    helps = field_help(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = helps.get(f.name, " ").replace("%", "%%")  # " ": argparse shows defaults only beside a help
        if isinstance(default, bool):
            parser.add_argument(flag, default=default, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            parser.add_argument(flag, default=default, type=type(default) if default is not None else str,
                                help=help_text)
    try:
        cfg = cls(**vars(parser.parse_args(argv)))
        if hasattr(cfg, "device"):
            pick_device(cfg.device)  # a device this machine lacks is refused here, before any work
    except ConfigError as err:  # raised by the dataclass's own checks (its __post_init__) or by pick_device
        parser.exit(2, f"error: {err}\n")
    return cfg


@torch.no_grad()
def ema_update(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter."""
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.lerp_(p, 1 - decay)


def save_checkpoint(path, **payload):
    """Atomic write: a crash mid-save leaves the previous checkpoint intact (tmp file + os.replace)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)


def partial_path(path):
    """Where a run keeps its checkpoints until it finishes (X.pt -> X.partial.pt). The finished X.pt is written
    once, at the end, so rerunning a stage never replaces a finished result with a partial one."""
    return path[:-3] + ".partial.pt" if path.endswith(".pt") else path + ".partial"


def save_run(path, finished, **payload):
    """A training run's checkpoint. Until the run finishes it goes to X.partial.pt, so rerunning a stage never
    replaces a finished X.pt with a partial one; the finished run writes X.pt and removes X.partial.pt."""
    save_checkpoint(path if finished else partial_path(path), **payload)
    if finished and os.path.exists(partial_path(path)):
        os.remove(partial_path(path))


def start_run(path, cfg, stage, make_cmd, free=()):
    """Where a training run starts. With cfg.resume: (the file it continues, its checkpoint), the partial one before
    the finished one; nothing to resume, a shipped file without optimizer state, or a run trained with settings
    other than cfg's (apart from the names in `free`: where it runs, its length, its logging) is an error that says
    what to do instead. Without: (None, None), and a finished X.pt already there stays until the new run finishes."""
    if not cfg.resume:
        if os.path.exists(path):
            print(f"note: {path} is kept until this run finishes (its checkpoints go to {partial_path(path)})")
        return None, None
    src = next((p for p in (partial_path(path), path) if os.path.exists(p)), None)
    if src is None:
        raise ConfigError(f"--resume: nothing to resume ({path} and {partial_path(path)} do not exist); "
                          f"drop --resume to start a fresh run: {make_cmd}")
    ckpt = load_checkpoint(src, stage=stage, make_cmd=make_cmd)
    if "optimizer" not in ckpt:
        raise ConfigError(f"--resume: {src} holds EMA weights only (a shipped file): it cannot be trained further; "
                          f"evaluate it with --eval-only, or train afresh without --resume")
    saved = {**dataclasses.asdict(type(cfg)()), **ckpt["config"]}  # a setting newer than the checkpoint: its default
    differ = {k: (saved[k], v) for k, v in dataclasses.asdict(cfg).items()
              if k not in free and saved[k] != v}
    if differ:
        raise ConfigError(f"--resume: {src} was trained with other settings (saved, now): {differ}; pass the saved "
                          f"values, or drop --resume to start afresh")
    return src, ckpt


def run_minutes(t0, ckpt, trained):
    """A stage's wall time in minutes since t0. A --resume that trained nothing (a finished run, re-evaluated) keeps
    the minutes its checkpoint recorded; a partial checkpoint records none, so then this run's time counts."""
    if not trained and ckpt is not None and "minutes" in ckpt:
        return ckpt["minutes"]
    return (time.time() - t0) / 60


def load_checkpoint(path, stage=None, make_cmd=None):
    """Load a checkpoint written by save_checkpoint, checking it is the stage the caller expects.
    A missing file names the command that makes it."""
    if not os.path.exists(path):
        hint = f"; make it with:\n    {make_cmd}" if make_cmd else ""
        raise FileNotFoundError(f"checkpoint {path} not found{hint}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # truncated / not a torch file
        fix = (f"delete it and re-run{(': ' + make_cmd) if make_cmd else ''}" if path.endswith(".pt") else
               "give a .pt checkpoint of this project")  # never advise deleting a file that is no checkpoint
        raise ConfigError(f"could not read checkpoint {path} ({type(err).__name__}: {err}); {fix}") from err
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise ConfigError(f"{path} is not a checkpoint of this project (no 'model' / 'model_config' entries)")
    if stage is not None and ckpt.get("stage") not in ((stage,) if isinstance(stage, str) else tuple(stage)):
        raise ConfigError(f"{path} is a '{ckpt.get('stage')}' checkpoint, but a '{stage}' checkpoint was expected")
    return ckpt


def model_from_checkpoint(ckpt, key="model", device="cpu"):
    """Rebuild the DiT from the config saved beside its weights and load them strictly (nanoGPT's model_args).
    key='ema' picks the EMA weights where a stage saved them."""
    cfg = ModelConfig(**{**ckpt["model_config"], "patch": tuple(ckpt["model_config"]["patch"])})
    model = DiT(cfg)
    state = ckpt[key]
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    report = describe_mismatch(expected, {k: tuple(v.shape) for k, v in state.items()})
    if report:
        raise WeightsMismatchError(f"checkpoint weights do not match its saved config:\n{report}")
    model.load_state_dict(state, strict=True)
    return model.to(device)
