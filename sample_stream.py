"""
sample_stream.py — the samplers every stage shares, and the real-time streaming CLI.

    sample_bidirectional   N-step Euler PF-ODE with CFG on whole clips        (stage 0 base; bidirectional ODE pairs)
    sample_ar              N-step Euler PF-ODE with CFG, block by block,      (stage 1 AR teacher)
                           through the KV cache, with the t = 0 refresh
    sample_stream          few-step streaming inference of a distilled model:  (stages 2 and 3; the CLI; and the
                           predict x0, re-noise to the next step, t = 0 refresh  DMD rollout with an exit step)
    sample_recompute       the same without a KV cache: every block re-encodes its whole prefix (the baseline)
    cfg_velocity           v = v_uncond + w (v_cond - v_uncond), one batched forward
    Stream                 a live session: one block at a time, prompt switches, I2V, a rolling cache

The time convention is model.py's: t = 1000 is noise, t = 0 is data; the model predicts v = eps - x0.
The ODE grids are the model's own (`timestep_grid(n, model.cfg.shift)`, then a final step to t = 0), so a
48-step sampler walks 1000 -> 995.8 -> ... -> 96.2 -> 0 at shift 5.

Commands (toy checkpoints; --speed also times the stream: first-frame latency, per-frame latency and frames/s,
with and without the KV cache):
    python sample_stream.py --prompt "red circle"                                  # 48 frames, rolling cache
    python sample_stream.py --frames 96 --switch 32:"green square" --switch 64:"blue triangle"
    python sample_stream.py --interactive                     # type a new prompt while frames keep coming
    python sample_stream.py --first-frame out/toy_first_frame.png                   # I2V (frame-wise models)
    python sample_stream.py --bench                           # the speed table and the long-stream drift check
    python sample_stream.py --switch-bench --steps 2          # prompt switches with and without --recache
World model (a checkpoint of the stages run with --actions, checkpoints/world/): every frame needs an action,
    python sample_stream.py --ckpt checkpoints/world/dmd_causal_cd_2step.pt --interactive   # steer with the keys
    python sample_stream.py --ckpt checkpoints/world/dmd_causal_cd_2step.pt --frames 12 \
        --actions down-right,down-right,down-right,up-right,up-right,up-right,stay,stay,up-left,up-left,up-left,up-left
"""
import os
import re
import sys
import time

import torch
from tqdm import tqdm

import toy_data
from model import (ConfigError, KVCache, OneLineParser, add_noise, check_num_steps, check_preset, euler_step,
                   load_checkpoint, model_from_checkpoint, pick_device, run_main, timestep_grid, warped_steps, x0_from_v)


def ode_grid(model, num_steps):
    """The num_steps-point shifted grid of the model's schedule plus the endpoint t = 0: num_steps Euler steps."""
    return timestep_grid(num_steps, model.cfg.shift).tolist() + [0.0]


def cfg_velocity(model, x, t, ctx, ctx_null, guidance, **kw):
    """Classifier-free guidance in one forward of batch 2B: [cond | uncond]. With guidance == 1 or no null
    context, just the conditional velocity. kw passes the attention path (clean=..., cache=...) through;
    a KV cache used with CFG must therefore hold 2B rows (cond rows first)."""
    if ctx_null is None or guidance == 1.0:
        return model(x, t, ctx, **kw)
    two = lambda a: torch.cat([a, a]) if torch.is_tensor(a) else a
    kw2 = {k: two(v) for k, v in kw.items()}
    v_cond, v_uncond = model(two(x), two(t), torch.cat([ctx, ctx_null]), **kw2).chunk(2)
    return v_uncond + guidance * (v_cond - v_uncond)


@torch.no_grad()
def sample_bidirectional(model, noise, ctx, ctx_null=None, num_steps=48, guidance=1.0, return_trajectory=False,
                         actions=None):
    """Euler PF-ODE on whole clips, every frame at the same t (path 1).
    noise: (B, F, C, H, W) at t = 1000; ctx / ctx_null: (B, L, text_dim); actions: a world model's (B, F) long
    (both CFG branches keep them: guidance is on the text only).
    Returns x0 (B, F, C, H, W), and with return_trajectory the states at every grid point, (num_steps+1, B, F, C, H, W)."""
    grid = ode_grid(model, num_steps)
    x, traj = noise, [noise]
    for t, t_next in zip(grid[:-1], grid[1:]):
        v = cfg_velocity(model, x, torch.full(x.shape[:2], t, device=x.device), ctx, ctx_null, guidance,
                         actions=actions)
        x = euler_step(x, v, t, t_next)  # x_t' = x_t - (s - s') v
        traj.append(x)
    return (x, torch.stack(traj)) if return_trajectory else x


@torch.no_grad()
def sample_ar(model, noise, ctx, ctx_null=None, num_steps=48, guidance=1.0, frames_per_block=1,
              return_trajectory=False, prefix=None, actions=None):
    """The AR teacher's sampler (Causal Forcing stage 1): for each block, an N-step Euler PF-ODE with CFG whose
    queries attend to the cached clean past (path 3); then the finished block is run once more at t = 0 to
    overwrite its cache slot with clean K/V. Frame i depends only on the noise of frames <= i's block.
    prefix: optional clean frames (B, P, C, H, W), P a whole number of blocks, written to the cache first (the
    same t = 0 write as a refresh), so the noise continues a given clip from frame P: video extension, and
    teacher forcing's own test (ar_teacher.next_frame_report).
    actions: a world model's (B, P + F) long, the prefix's frames first; block i reads only its own.
    Returns the new frames x0 (B, F, C, H, W) [and the trajectory (num_steps+1, B, F, C, H, W), all blocks on the
    same grid]."""
    B, nF = noise.shape[:2]
    n_prefix = 0 if prefix is None else prefix.shape[1]
    if nF % frames_per_block or n_prefix % frames_per_block:
        raise ConfigError(f"{nF} frames (+ a prefix of {n_prefix}) are not a whole number of {frames_per_block}-frame "
                         f"blocks")
    grid = ode_grid(model, num_steps)
    use_cfg = ctx_null is not None and guidance != 1.0
    cache = KVCache(max_frames=n_prefix + nF)
    ctx_all = torch.cat([ctx, ctx_null]) if use_cfg else ctx  # one tensor, so its cross-attn K/V are cached once
    two = (lambda a: torch.cat([a, a])) if use_cfg else (lambda a: a)  # [cond | uncond] rows

    def acts(start):  # the actions of the block at `start`, for both CFG branches (None: not a world model)
        return None if actions is None else two(actions[:, start:start + frames_per_block])

    def refresh(x, start):  # clean K/V of a finished (or given) block into its cache slot
        x_ref = two(x)
        model(x_ref, torch.zeros(x_ref.shape[:2], device=x.device), ctx_all, cache=cache, start_frame=start,
              actions=acts(start))

    for start in range(0, n_prefix, frames_per_block):
        refresh(prefix[:, start:start + frames_per_block], start)
    blocks, trajs = [], []
    for start in range(n_prefix, n_prefix + nF, frames_per_block):
        x = noise[:, start - n_prefix:start - n_prefix + frames_per_block]
        traj = [x]
        for t, t_next in zip(grid[:-1], grid[1:]):
            tt = torch.full(x.shape[:2], t, device=x.device)
            v = model(two(x), two(tt), ctx_all, cache=cache, start_frame=start, actions=acts(start))
            if use_cfg:
                v_cond, v_uncond = v.chunk(2)
                v = v_uncond + guidance * (v_cond - v_uncond)
            x = euler_step(x, v, t, t_next)
            traj.append(x)
        refresh(x, start)  # the t = 0 refresh: the block's clean K/V replace its noisy ones for every later block
        blocks.append(x)
        trajs.append(torch.stack(traj))
    x0 = torch.cat(blocks, dim=1)
    return (x0, torch.cat(trajs, dim=2)) if return_trajectory else x0


def sample_stream(model, noise, ctx, steps, frames_per_block=1, first_block_steps=None, generator=None,
                  cache=None, start_frame=0, exit_step=None, exit_step_first=None, actions=None, part=None):
    """Few-step inference of a distilled causal model (Self Forcing Alg. 2; Causal Forcing inference), and the
    generator rollout of DMD training (Self Forcing Alg. 1): one function, so training sees exactly what
    inference does.

    For each block: start from its noise; for each t in `steps` (a warped list such as [1000, 937.5, 833.3, 625])
    predict x0_hat = x_t - s v, and unless it is the last step re-noise it with *fresh* noise to the next t;
    the last x0_hat is the block. Then run the block once more at t = 0 so its clean K/V overwrite its cache
    slot. No CFG: guidance is distilled into the model. Block 0 may use its own list (`first_block_steps`: the
    1/2-step Causal Forcing++ models use the 4-step list for the first frame).

    Training (dmd.py) passes `exit_step` (and `exit_step_first` for block 0's list): every block stops at that
    step index and its x0_hat there is the block's output. Steps before the exit and the t = 0 refresh always
    run without gradient; the exit step runs with whatever grad mode the caller set, so under
    torch.enable_grad() gradient reaches the weights only through the exit steps and never crosses blocks
    (the cache holds detached K/V). exit_step=None means the last step: plain inference.
    noise: (B, F, C, H, W); returns x0 (B, F, C, H, W). Pass a `cache` (and `start_frame`) to continue a stream.
    actions: a world model's (B, F) long, one per frame of `noise`: each block is generated, and refreshed, under
    its own actions, as a player's key presses arrive block by block. part: under torchrun, this process's rows of
    DMD's global batch (wan_scale.Part): the re-noising draws the global batch's noise and keeps its rows."""
    B, nF = noise.shape[:2]
    if nF % frames_per_block:
        raise ConfigError(f"{nF} frames are not a whole number of {frames_per_block}-frame blocks")
    grad = torch.is_grad_enabled()
    cache = cache if cache is not None else KVCache(max_frames=start_frame + nF)
    out = []
    for i, s in enumerate(range(0, nF, frames_per_block)):
        first = i == 0 and start_frame == 0 and bool(first_block_steps)
        ts = first_block_steps if first else steps
        stop = exit_step_first if first else exit_step
        stop = len(ts) - 1 if stop is None else stop
        x = noise[:, s:s + frames_per_block]
        a = None if actions is None else actions[:, s:s + frames_per_block]
        for j, t in enumerate(ts[:stop + 1]):
            tt = torch.full(x.shape[:2], float(t), device=x.device)
            with torch.set_grad_enabled(grad and j == stop):  # only the exit step may carry gradient
                x0_hat = x0_from_v(x, model(x, tt, ctx, cache=cache, start_frame=start_frame + s, actions=a), t)
            if j < stop:  # re-noise with fresh noise to the next step
                eps = (part.randn if part else torch.randn)(x.shape, generator=generator).to(x.device)
                x = add_noise(x0_hat, eps, ts[j + 1])
        with torch.no_grad():  # the t = 0 refresh: clean K/V for every later block, no gradient across blocks
            model(x0_hat.detach(), torch.zeros(x.shape[:2], device=x.device), ctx, cache=cache,
                  start_frame=start_frame + s, actions=a)
        out.append(x0_hat)
    return torch.cat(out, dim=1)


@torch.no_grad()
def sample_recompute(model, noise, ctx, steps, frames_per_block=1, first_block_steps=None, generator=None,
                     actions=None):
    """The no-cache baseline: the same few-step sampler, but every forward re-encodes the whole clean prefix
    together with the current block (block-causal mask, prefix at t = 0) instead of reading cached K/V. It
    computes exactly what sample_stream computes (the cache holds those very prefix K/V), at a cost per block
    that grows with the prefix: the KV cache's speed-up is the ratio of the two."""
    B, nF = noise.shape[:2]
    if nF % frames_per_block:
        raise ConfigError(f"{nF} frames are not a whole number of {frames_per_block}-frame blocks")
    out = []
    for i, s in enumerate(range(0, nF, frames_per_block)):
        ts = first_block_steps if (i == 0 and first_block_steps) else steps
        x = noise[:, s:s + frames_per_block]
        past = torch.cat(out, dim=1) if out else noise[:, :0]
        for j, t in enumerate(ts):
            tt = torch.cat([torch.zeros(B, s), torch.full((B, frames_per_block), float(t))], 1).to(x.device)
            a = None if actions is None else actions[:, :s + frames_per_block]
            v = model(torch.cat([past, x], dim=1), tt, ctx, frames_per_block=frames_per_block, actions=a)[:, s:]
            x0_hat = x0_from_v(x, v, t)
            if j + 1 < len(ts):
                eps = torch.randn(x.shape, generator=generator).to(x.device)
                x = add_noise(x0_hat, eps, ts[j + 1])
        out.append(x0_hat)
    return torch.cat(out, dim=1)


@torch.no_grad()
def toy_few_step_samples(model, n, steps, frames_per_block=1, seed=1234, first_block_4step=False):
    """n toy clips from fixed noise (same seed -> same noise for every model), prompts cycling through all 9,
    with the few-step sampler on the model's warped step list; a world model follows the scripted random actions
    of toy_data.eval_actions. Returns (clips on CPU, prompts, actions or None)."""
    dev = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    prompts = [toy_data.PROMPTS[i % len(toy_data.PROMPTS)] for i in range(n)]
    noise = torch.randn(n, toy_data.FRAMES, 3, toy_data.SIZE, toy_data.SIZE, generator=g).to(dev)
    ctx = toy_data.TextEncoder()(prompts).to(dev)
    first = warped_steps(4, model.cfg.shift) if first_block_4step else None
    actions = toy_data.eval_actions(n) if model.cfg.num_actions else None
    clips = sample_stream(model, noise, ctx, warped_steps(steps, model.cfg.shift), frames_per_block, first, generator=g,
                          actions=None if actions is None else actions.to(dev))
    return clips.cpu(), prompts, actions


@torch.no_grad()
def toy_exposure_report(model, clips, prompts, steps, frames_per_block=1, n=72, seed=4321):
    """Exposure bias of a few-step causal model on the toy, as three numbers: the fraction of coordinates off by
    >= 0.5 px (a) when the model continues the *real* past of n clips (the real frames written block by block into
    the cache at t = 0, then one block of the few-step sampler: what teacher forcing trained), and (b) on its own
    `clips` (frame i vs the continuation of its own frames i-2, i-1), and the gap (b) - (a). DMD's self rollout
    trains on the model's own past, so it should shrink (b) and the gap. (b) is also given where the shape keeps its
    size over the three frames (own_off_rigid; own_rigid: how often it does): a resized shape moves its measured
    position by half the change, and on the toy that, not the motion, is most of (b). Also the mean foreground
    area per frame (px), where DMD's CFG push shows up as shapes that grow."""
    dev = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    text = toy_data.TextEncoder()

    def continue_clip(prefix, noise, block_prompts):
        stream = Stream(model, steps, frames_per_block, max_frames=prefix.shape[1] + noise.shape[1], generator=g)
        stream.set_prompt(text(block_prompts).to(dev))
        for s in range(0, prefix.shape[1], frames_per_block):  # block by block, as the refresh writes them
            stream.write_frames(prefix[:, s:s + frames_per_block].to(dev))
        return sample_stream(model, noise.to(dev), stream.ctx, steps, frames_per_block, generator=g,
                             cache=stream.cache, start_frame=stream.frame).cpu()

    real_past = toy_data.next_block_report(continue_clip, n, frames_per_block, seed=seed)
    own = toy_data.own_step_report(clips, prompts)
    return dict(next_off=real_past["off"], own_off=own["off"], gap=own["off"] - real_past["off"],
                own_rigid=own["rigid"], own_off_rigid=own["off_rigid"],
                area=[round(a, 1) for a in toy_data.area_per_frame(clips).tolist()])


def exposure_line(r):
    return (f"next frame off >= 0.5 px: real past {r['next_off']:.1%}, own past {r['own_off']:.1%} "
            f"(gap {r['gap']:+.1%}; {r['own_off_rigid']:.1%} where the shape keeps its size, "
            f"{r['own_rigid']:.0%} of checks) | area/frame {r['area']}")


def toy_few_step_report(model, name, n, frames_per_block, out_dir, write_gif=True):
    """Every stage-2/3 student's closing report: 1-, 2- and 4-step samples from fixed noise, one evaluator line
    each, and a GIF of the 4-step clips in out_dir/samples/. Returns {steps: metrics}."""
    metrics = {}
    for n_steps in (1, 2, 4):
        clips, prompts, actions = toy_few_step_samples(model, n, n_steps, frames_per_block)
        metrics[n_steps] = toy_data.evaluate(clips, prompts, actions=actions)  # world model: + action accuracy
        print(f"{name} {n_steps}-step | {toy_data.metric_line(metrics[n_steps])}")
    if write_gif:  # (under torchrun, process 0 only)
        gif = os.path.join(out_dir, "samples", f"{name}_4step.gif")
        os.makedirs(os.path.dirname(gif), exist_ok=True)
        toy_data.save_video(gif, clips[:18], ncols=9, labels=prompts[:18], title=f"{name}, 4-step")
        print(f"{name}: 4-step samples -> {gif}")
    return metrics


# -----------------------------------------------------------------------------------------------------------
# Streaming: a live session, block by block


class Stream:
    """One generation stream of batch B, advanced one block at a time, as a real-time app would drive it.

    The KV cache is either full (window=None: one slot per frame up to max_frames) or rolling (the `sink`
    first frames plus the `window` most recent ones, Self Forcing / StreamingLLM style), which lets a stream
    run far beyond the training length in constant memory. RoPE positions stay absolute; attention only ever
    sees relative offsets, which stay within the training range for window frames (not for sinks: see
    the drift measurement in docs/RESULTS.md). `set_prompt` switches the cross-attention context for later blocks; the
    cached past keeps the K/V it was written with, unless `recache=True` (LongLive's KV re-cache): then every
    block the cache still holds is run again at t = 0 under the new prompt, oldest first, each seeing only the
    held frames before it, and its K/V overwritten. `write_frames` puts given clean frames (I2V's first frame)
    into the cache at t = 0, the same write as the refresh after a generated block. A world model takes the
    actions of each block as it is asked for it (`next_block(actions=...)`): the keys pressed so far steer it.
    fast="graph" / "compile" / "static" runs every forward through wan_scale.FastStep (static shapes, CUDA-graph
    replay or torch.compile at Wan scale): the same frames, a few times faster where launches dominate."""

    frame_hw = (toy_data.SIZE, toy_data.SIZE)  # the toy's frame size

    def __init__(self, model, steps, frames_per_block=1, first_block_steps=None, window=None, sink=0,
                 max_frames=None, generator=None, fast=None):
        self.model, self.steps, self.fpb, self.first = model, steps, frames_per_block, first_block_steps
        self.cache = KVCache(window=window, sink=sink) if window else KVCache(max_frames=max_frames)
        self.forward = model  # every forward of the stream goes through this: the model, or its fast path
        if fast:
            from wan_scale import FastStep
            self.forward = FastStep(model, self.cache, fast)
        self.generator = generator
        self.frame = 0  # absolute index of the next frame
        self.ctx = None
        self.held = {}  # first frame of each block the cache holds -> its clean frames, actions (for the re-cache)
        self.recache_calls = 0  # forwards the re-caches ran (a test counts them)

    def restart(self):
        """Start a new stream at frame 0 in the same cache buffers (the prompt is kept): every slot reads as
        unwritten, so nothing of the old stream is seen; a fast path's captured graphs stay valid."""
        self.cache.slot_frame.fill_(-1)
        self.frame, self.held = 0, {}

    @torch.no_grad()
    def set_prompt(self, ctx, recache=False):
        self.ctx = ctx
        if recache:  # LongLive: the held past, re-encoded under the new prompt, oldest block first
            for start, (frames, actions) in sorted(self.held.items()):
                self.forward(frames, torch.zeros(frames.shape[:2], device=frames.device), ctx, cache=self.cache,
                             start_frame=start, actions=actions)
                self.recache_calls += 1

    def _hold(self, start, frames, actions):
        """Keep the clean frames of the blocks the cache still holds (a rolling cache forgets the oldest)."""
        self.held[start] = frames, actions
        kept = set(self.cache.visible_frames())
        self.held = {f: x for f, x in self.held.items() if f in kept}

    @torch.no_grad()
    def write_frames(self, frames, actions=None):
        """Clean frames (B, n, C, H, W) [with a world model's actions (B, n)] -> cache at t = 0; they become the
        stream's next n frames."""
        t0 = torch.zeros(frames.shape[:2], device=frames.device)
        self.forward(frames, t0, self.ctx, cache=self.cache, start_frame=self.frame, actions=actions)
        self._hold(self.frame, frames, actions)
        self.frame += frames.shape[1]
        return frames

    @torch.no_grad()
    def next_block(self, batch=1, actions=None):
        """Generate the next block (B, frames_per_block, C, H, W) from fresh noise [under a world model's actions
        (B, frames_per_block) long]."""
        p = next(self.model.parameters())
        c, (h, w) = self.model.cfg.in_dim, self.frame_hw
        noise = torch.randn(batch, self.fpb, c, h, w, generator=self.generator).to(p.device)
        out = sample_stream(self.forward, noise, self.ctx, self.steps, self.fpb, self.first, self.generator,
                            cache=self.cache, start_frame=self.frame, actions=actions)
        self._hold(self.frame, out, actions)
        self.frame += self.fpb
        return out


@torch.no_grad()
def switch_report(model, steps, frames_per_block=1, first_block_steps=None, window=None, sink=0, recache=False,
                  before=6, after=12, seed=0):
    """Prompt switches measured over all 72 ordered pairs of different prompts, one stream each (batch 72):
    `before` frames under prompt A, then prompt B (with or without the re-cache) for `after` frames. Returns the
    prompt accuracy, physics and fd of the 6 frames after the switch (scored against B), the physics of the 6
    frames around it (3 before, 3 after), the mean number of frames after the switch until a frame shows B's
    colour and shape (`after` if none does), and with `recache` the re-cache's latency at batch 1."""
    pairs = [(a, b) for a in toy_data.PROMPTS for b in toy_data.PROMPTS if a != b]
    text, dev = toy_data.TextEncoder(), next(model.parameters()).device
    ctx_a, ctx_b = text([a for a, _ in pairs]).to(dev), text([b for _, b in pairs]).to(dev)
    stream = Stream(model, steps, frames_per_block, first_block_steps, window, sink, max_frames=before + after,
                    generator=torch.Generator().manual_seed(seed))
    stream.set_prompt(ctx_a)
    blocks = [stream.next_block(len(pairs)) for _ in range(before // frames_per_block)]
    stream.set_prompt(ctx_b, recache=recache)
    blocks += [stream.next_block(len(pairs)) for _ in range(after // frames_per_block)]
    clip, b_prompts = torch.cat(blocks, 1).cpu(), [b for _, b in pairs]
    m = toy_data.evaluate(clip[:, before:before + toy_data.FRAMES], b_prompts)
    hit = toy_data.frames_matching(clip[:, before:], b_prompts)  # (72, after)
    first = torch.where(hit.any(1), hit.float().argmax(1), torch.tensor(after)).float()
    around = toy_data.evaluate(clip[:, before - 3:before + 3], b_prompts)["physics"]
    out = dict(prompt_acc=m["prompt_acc"], physics=m["physics"], fd=m["fd"], physics_around=around,
               frames_to_new_prompt=first.mean().item())
    if recache:  # its latency, as one stream at batch 1 would feel it
        one = Stream(model, steps, frames_per_block, first_block_steps, window, sink, max_frames=before + after)
        one.set_prompt(ctx_a[:1])
        for _ in range(before // frames_per_block):
            one.next_block()
        _sync(dev)
        t0 = time.perf_counter()
        one.set_prompt(ctx_b[:1], recache=True)
        _sync(dev)
        out["recache_s"] = time.perf_counter() - t0
    return out


def _sync(device):
    """Wait for this thread's stream only: a decoder working on its own stream beside the stream is not waited for."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def timed_stream(model, frames, steps, frames_per_block=1, first_block_steps=None, window=None, sink=0,
                 ctx=None, seed=0, frame_hw=None, fast=None, warmup=False, on_block=None):
    """Run a batch-1 stream of `frames` frames block by block; return (clip, seconds per block). warmup: run the
    whole stream once first, untimed, in the same buffers (every cache length is a new attention shape; a fast
    path captures its graphs then). on_block(block): called with each new block inside its timing (a decoder)."""
    dev = next(model.parameters()).device
    ctx = ctx if ctx is not None else toy_data.TextEncoder()([toy_data.PROMPTS[0]]).to(dev)
    stream = Stream(model, steps, frames_per_block, first_block_steps, window, sink, max_frames=frames,
                    generator=torch.Generator().manual_seed(seed), fast=fast)
    if frame_hw is not None:
        stream.frame_hw = frame_hw
    stream.set_prompt(ctx)
    acts = still_actions(model, frames_per_block, dev)
    if warmup:
        for _ in range(frames // frames_per_block):
            stream.next_block(actions=acts)
        stream.restart()
        stream.generator.manual_seed(seed)
    out, times = [], []  # a world model is timed under "stay" (speed ignores values)
    for _ in range(frames // frames_per_block):
        _sync(dev)
        t0 = time.perf_counter()
        out.append(stream.next_block(actions=acts))
        if on_block is not None:
            on_block(out[-1])
        _sync(dev)
        times.append(time.perf_counter() - t0)
    return torch.cat(out, 1), times


def still_actions(model, n, device):
    """(1, n) of the action "stay" for a world model, None for any other."""
    stay = toy_data.ACTIONS.index("stay")
    return torch.full((1, n), stay, dtype=torch.long, device=device) if model.cfg.num_actions else None


def stream_speed(model, num_steps, frames_per_block=1, frames=toy_data.FRAMES, first_block_4step=False,
                 window=None, sink=0, recompute=True, repeats=3, fast=None):
    """Batch-1 streaming speed, after a warm-up run: first-frame latency (time to the first block), per-frame
    latency (the later blocks' time per frame), frames/s over the whole stream; and the same stream recomputed
    without a cache, whose frames/s gives the KV cache's speed-up. Best of `repeats` runs (least disturbed).
    fast: time the stream through FastStep instead (Stream's fast=)."""
    steps = warped_steps(num_steps, model.cfg.shift)
    first = warped_steps(4, model.cfg.shift) if first_block_4step else None
    dev = next(model.parameters()).device
    ctx = toy_data.TextEncoder()([toy_data.PROMPTS[0]]).to(dev)
    timed_stream(model, 2 * frames_per_block, steps, frames_per_block, first, window, sink, ctx, fast=fast)  # warm-up
    runs = [timed_stream(model, frames, steps, frames_per_block, first, window, sink, ctx, fast=fast)[1]
            for _ in range(repeats)]
    times = min(runs, key=sum)
    later = times[1:] or times
    res = dict(frames=frames, first_frame_s=min(r[0] for r in runs), per_frame_s=sum(later) / (len(later) * frames_per_block),
               fps=frames / sum(times))
    if recompute:
        noise = torch.randn(1, frames, model.cfg.in_dim, *Stream.frame_hw).to(dev)
        best = float("inf")
        for _ in range(repeats if frames <= 32 else 1):
            _sync(dev)
            t0 = time.perf_counter()
            sample_recompute(model, noise, ctx, steps, frames_per_block, first, actions=still_actions(model, frames, dev))
            _sync(dev)
            best = min(best, time.perf_counter() - t0)
        res.update(fps_recompute=frames / best, cache_speedup=res["fps"] / (frames / best))
    return res


# -----------------------------------------------------------------------------------------------------------
# The CLI


DISTILLED = ("causal_cd", "causal_ode", "bidirectional_ode", "dmd")  # checkpoints the few-step sampler can run


def remake_command(path):
    """The command that makes the distilled checkpoint `path`, read from the stages' file names (dmd_INIT_Nstep,
    causal_cd, causal_ode, bidirectional_ode; _fpbK, _seedS, _exact, _noisy_prefix; checkpoints/world/ for the world
    model) as each stage's make_command writes it (a test checks they agree); None for another name."""
    name, folder = os.path.basename(path).removesuffix(".pt"), os.path.normpath(os.path.dirname(path) or ".")
    world = os.path.basename(folder) == "world"
    fpb, seed = re.search(r"_fpb(\d+)", name), re.search(r"_seed(\d+)", name)
    fpb = f" --frames-per-block {fpb[1]}" if fpb else ""
    place = (" --actions" if world else "") + (
        "" if folder == os.path.normpath(os.path.join("checkpoints", "world" if world else "")) else f" --out-dir {folder}")
    dmd = re.match(r"dmd_(\w+?)_(\d+)step", name)
    if dmd:
        return f"python dmd.py --init {dmd[1]} --num-steps {dmd[2]}" + fpb + (f" --seed {seed[1]}" if seed else "") + place
    if name.startswith(("causal_ode", "bidirectional_ode")):
        return (f"python ode_init.py --teacher {'ar' if name.startswith('causal') else 'bidirectional'}" + fpb
                + (" --noisy-prefix" if "_noisy_prefix" in name else "")
                + (" --exact-teacher --guidance 1" if "_exact" in name else "") + place)
    return "python causal_cd.py --toy" + fpb + place if name.startswith("causal_cd") else None


def load_streamable(path, world_ok=True):
    """A distilled causal model from any stage-2/3 checkpoint; anything else is refused before any work."""
    ckpt = load_checkpoint(path, make_cmd=remake_command(path) or "python causal_cd.py --toy (it writes "
                                                                   "checkpoints/causal_cd.pt, a distilled model)")
    stage = ckpt.get("stage")
    if stage not in DISTILLED:
        hint = {"base": "it is the bidirectional base (stage 0), which cannot stream",
                "ar_teacher": "it is a multi-step AR teacher (stage 1): distil it first (python causal_cd.py --toy)"}
        raise ConfigError(f"{path} is a '{stage}' checkpoint; the streaming sampler needs a distilled few-step "
                         f"model ({', '.join(DISTILLED)}): {hint.get(stage, 'unknown stage')}")
    if ckpt["model_config"].get("num_actions") and not world_ok:
        raise ConfigError(f"{path} is a world model; --bench and --switch-bench measure the plain toy's models. Time a "
                          f"world model with a scripted stream: --actions SCRIPT --speed")
    model = model_from_checkpoint(ckpt, key="ema" if "ema" in ckpt else "model").eval()
    model.requires_grad_(False)
    return model, ckpt


def parse_switch(spec, n_frames, fpb):
    """'FRAME:PROMPT' -> (frame, prompt), checked against the stream's length, blocks and vocabulary."""
    frame, sep, prompt = spec.partition(":")
    if not sep or not frame.strip().isdigit():
        raise ConfigError(f"--switch {spec!r}: expected FRAME:PROMPT, e.g. --switch 32:'green square'")
    frame = int(frame)
    if not 0 < frame < n_frames:
        raise ConfigError(f"--switch {spec!r}: frame {frame} is outside the stream (1..{n_frames - 1})")
    if frame % fpb:
        raise ConfigError(f"--switch {spec!r}: frame {frame} is not at a block boundary ({fpb} frames per block)")
    check_prompt(prompt.strip(), f"--switch {spec!r}")
    return frame, prompt.strip()


def check_prompt(prompt, flag):
    try:
        toy_data.parse_prompt(prompt)
    except ValueError as err:  # toy_data's message lists the valid prompts
        raise ConfigError(f"{flag}: {err}") from None


def read_first_frame(path):
    """An RGB image file -> (1, 1, 3, H, W) in [-1, 1], the toy's frame size checked."""
    import imageio.v2 as imageio
    import numpy as np
    if not os.path.exists(path):
        raise FileNotFoundError(f"--first-frame {path}: no such file (python toy_data.py writes an example, "
                                f"out/toy_first_frame.png)")
    try:
        img = np.asarray(imageio.imread(path))
    except (ValueError, OSError) as err:  # not an image imageio can read (a folder, a text file, ...)
        raise ConfigError(f"--first-frame {path} is not an image ({err}); give a {Stream.frame_hw[1]}x"
                          f"{Stream.frame_hw[0]} RGB PNG") from None
    channels = 1 if img.ndim == 2 else img.shape[2]
    if channels not in (3, 4):
        raise ConfigError(f"--first-frame {path}: the image has {channels} channel{'s' * (channels > 1)} "
                          f"({'grayscale' if channels in (1, 2) else 'unknown'}), but the model makes RGB frames; "
                          f"save it as RGB")
    if img.shape[:2] != Stream.frame_hw:
        raise ConfigError(f"--first-frame {path}: the image is {img.shape[1]}x{img.shape[0]} pixels, but the model "
                          f"makes {Stream.frame_hw[1]}x{Stream.frame_hw[0]} frames; resize it to that size")
    x = torch.from_numpy(img[..., :3].astype("float32")) / 127.5 - 1
    return x.permute(2, 0, 1)[None, None]


def default_window(frames_per_block):
    """The toy's rolling window: every attention offset stays inside the 6-frame training clip (docs/RESULTS.md: drift)."""
    return toy_data.FRAMES - 1 if frames_per_block == 1 else 2 * frames_per_block


def build_parser():
    import argparse
    p = OneLineParser(description="Real-time streaming generation with a distilled causal model.",
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ckpt", default="checkpoints/causal_cd.pt", help="a causal_cd / causal_ode / "
                   "bidirectional_ode / dmd checkpoint")
    p.add_argument("--prompt", default="red circle", help=f"one of {toy_data.PROMPTS}")
    p.add_argument("--steps", type=int, default=0, help="1, 2 or 4 denoising steps per block; 0 = the "
                   "checkpoint's own (DMD) or 4")
    p.add_argument("--seed", type=int, default=0, help="the stream's noise: the same seed gives the same frames")
    p.add_argument("--frames", type=int, default=None, help="frames to generate, any length with a rolling cache "
                   "(default: 48; with --actions alone, the script's length; with --interactive, until 'quit' or "
                   "Ctrl-C)%(default).0s")  # (an empty %(default): argparse then adds no "(default: None)")
    p.add_argument("--window", type=int, default=None, help="rolling cache: recent frames kept, the current block "
                   "included (0 = full cache; default: 5 frame-wise, 2 blocks chunk-wise, within the 6-frame training span)")
    p.add_argument("--sink", type=int, default=0, help="rolling cache: first frames kept forever")
    p.add_argument("--switch", action="append", default=[], metavar="FRAME:PROMPT",
                   help="switch the prompt at FRAME (repeatable)")
    p.add_argument("--interactive", action="store_true", help="read new prompts from stdin while streaming; a world "
                   "model is steered by single key presses instead (arrows or WASD, space = stay, 1-9 = prompt, q = quit)")
    p.add_argument("--actions", default="", help="a world model's recorded action script, one action per frame: a "
                   f"comma-separated string or a file of them ({', '.join(toy_data.ACTIONS)}, or their indices)")
    p.add_argument("--recache", action="store_true", help="at a prompt switch, re-encode the cached past under the "
                   "new prompt (LongLive's KV re-cache) instead of keeping its K/V")
    p.add_argument("--fps", type=float, default=8.0, help="--interactive: playback rate the stream is paced to")
    p.add_argument("--first-frame", default=None, help="I2V: an image written into the cache as frame 0")
    p.add_argument("--out", default="outputs/stream.gif", help=".gif or .mp4 (needs imageio-ffmpeg)")
    p.add_argument("--speed", action="store_true", help="after the stream, time it with and without the KV cache "
                   "(first-frame latency, per-frame latency, frames/s); Ctrl-C skips it")
    p.add_argument("--switch-bench", action="store_true", help="measure prompt switches with and without --recache "
                   "(72 prompt pairs, 3 seeds)")
    p.add_argument("--bench", action="store_true", help="print the speed table and the long-stream drift check "
                   "(with --model: the Wan-scale speed benchmark, random weights)")
    w = p.add_argument_group("Wan scale")
    w.add_argument("--model", default="", help="--bench: a Wan preset (wan2.1-1.3b) to benchmark with random weights")
    w.add_argument("--latent-frames", type=int, default=21, help="--bench --model: latent frames (21 = 81 video frames)")
    w.add_argument("--latent-hw", default="60x104", help="latent height x width (480x832 video -> 60x104)")
    w.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak, for the utilisation "
                   "column (H100 / H200 SXM: 989)")
    w.add_argument("--text", default="", help="Wan-shaped checkpoints: a safetensors file holding the prompt's umT5 "
                   "features `text` (L, 4096), e.g. a latent-folder clip; without it --prompt is encoded with umT5")
    w.add_argument("--vae", default="", help="the Wan2.1-Diffusers download (folder or hub name) whose VAE decodes "
                   "the latents and whose umT5 encodes --prompt; --bench: 'random' times the VAE with random weights")
    w.add_argument("--memory-cap-gib", type=float, default=24.0, help="GPU memory the Wan stream may use (0 = all): a "
                   "bigger card behaves like the 24 GB one this project targets")
    w.add_argument("--cuda-graph", action="store_true", help="the fast path: every forward captured once as a CUDA "
                   "graph and replayed (static shapes, wan_scale.FastStep); the same frames as the eager default")
    w.add_argument("--compile", action="store_true", help="the fast path through torch.compile(mode='reduce-overhead') "
                   "instead (compiles for minutes; also runs on a CPU)")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    return p


def fast_mode(args):
    """--cuda-graph / --compile -> the Stream's fast path (None: the eager default)."""
    if args.cuda_graph and args.compile:
        raise ConfigError("--cuda-graph and --compile are two fast paths: pick one")
    if args.cuda_graph and not (torch.cuda.is_available() and pick_device(args.device).type == "cuda"):
        raise ConfigError("--cuda-graph needs a CUDA GPU (--device cuda); on a CPU run eagerly, or try --compile")
    return "graph" if args.cuda_graph else "compile" if args.compile else None


# Steering a world model from the keyboard. The actions are the four diagonals and "stay"; a key sets one axis
# and keeps the other: "up" turns an up-left or down-left move into up-left, "right" any move into its right-hand
# version, space stops; the next arrow starts moving again. The last action holds until the next key.
KEYS = {"w": "up", "s": "down", "a": "left", "d": "right", "\x1b[A": "up", "\x1b[B": "down", "\x1b[D": "left",
        "\x1b[C": "right", " ": "stay"}


def steer(action, key):
    """The action after `key` (a KEYS value) from the current action name: see the comment above."""
    if key == "stay":
        return "stay"
    v, h = ("down", "right") if action == "stay" else action.split("-")  # from rest: down-right unless the key says
    v, h = (key, h) if key in ("up", "down") else (v, key)
    return f"{v}-{h}"


def key_presses():
    """A daemon thread putting (time, key) for every key pressed (no Enter: the terminal in cbreak mode) into a
    queue, arrow keys as "up"/"down"/"left"/"right" via KEYS. Returns (queue, restore): call restore() to give the
    terminal back its settings. From a pipe the same keys are read as bytes; its end is not a key (the stream goes
    on to --frames)."""
    import queue
    import threading
    q, fd, old = queue.Queue(), sys.stdin.fileno(), None
    if sys.stdin.isatty():
        import termios
        import tty
        old = termios.tcgetattr(fd)
        tty.setcbreak(fd)

    def read():
        while True:
            ch = os.read(fd, 1).decode(errors="ignore")
            if not ch:
                return
            if ch == "\x1b":  # an arrow key arrives as ESC [ A..D
                ch += os.read(fd, 2).decode(errors="ignore")
            q.put((time.perf_counter(), KEYS.get(ch.lower(), ch)))
    threading.Thread(target=read, daemon=True).start()

    def restore():
        if old is not None:
            import termios
            termios.tcsetattr(fd, termios.TCSADRAIN, old)
    return q, restore


def read_action_script(spec):
    """--actions: a string or a file of comma- or line-separated actions -> (number of actions,) long, checked."""
    try:
        text = open(spec).read().replace("\n", ",") if os.path.isfile(spec) else spec
        actions = ",".join(a for a in text.split(",") if a.strip())
        return toy_data.parse_actions(actions, len(actions.split(",")))
    except UnicodeDecodeError:
        raise ConfigError(f"--actions {spec} is not a text file of actions") from None
    except ValueError as err:
        looks_like_a_file = "," not in spec and ("/" in spec or "." in spec) and not os.path.isfile(spec)
        raise ConfigError(f"--actions: {err}" + (f" (and no file {spec} exists)" if looks_like_a_file else "")) from None


def stdin_prompts():
    """A daemon thread that puts each line typed on stdin into a queue (None at end of input)."""
    import queue
    import threading
    q = queue.Queue()

    def read():
        for line in sys.stdin:
            q.put(line.strip())
        q.put(None)
    threading.Thread(target=read, daemon=True).start()
    return q


def check_flags(parser, args):
    """The flags' own errors, before any checkpoint is read (those that need the checkpoint come in main)."""
    fast_mode(args)  # both fast paths at once: refused before any work
    pick_device(args.device)  # a device this machine lacks
    if args.bench or args.switch_bench:  # fixed settings: a stream's own flags would go unused without a word
        stray = [name for name in ("prompt", "switch", "actions", "first_frame", "frames", "out", "interactive", "speed")
                 if getattr(args, name) != parser.get_default(name)]
        if stray:
            raise ConfigError(f"{', '.join('--' + n.replace('_', '-') for n in stray)}: --bench / --switch-bench "
                              f"measure fixed settings and do not use them")
    if args.window is not None and args.window < 0:
        raise ConfigError(f"--window {args.window}: the recent frames a rolling cache keeps, at least 1 (0: the full cache)")
    if args.sink < 0:
        raise ConfigError(f"--sink {args.sink}: the first frames a rolling cache keeps forever, 0 or more")
    if args.fps <= 0:
        raise ConfigError(f"--fps {args.fps:g}: the playback rate must be positive")
    if not 0 <= args.seed < 2 ** 32:
        raise ConfigError(f"--seed must be between 0 and 2^32 - 1 (got {args.seed})")
    if args.model:
        check_preset(args.model)
        if not args.bench or args.model == "toy":
            raise ConfigError(f"--model {args.model}: --model is the Wan preset of the Wan-scale bench (--bench --model "
                              f"wan2.1-1.3b); a toy checkpoint is benchmarked with --bench --ckpt")
    if args.steps:  # 0: the checkpoint's own
        check_num_steps(args.steps, "--steps")
    out_dir = os.path.dirname(args.out) or "."
    if os.path.isdir(args.out) or (os.path.exists(out_dir) and not os.path.isdir(out_dir)):
        raise ConfigError(f"--out {args.out}: " + ("a folder" if os.path.isdir(args.out) else f"{out_dir} is a file")
                          + "; give a .gif or .mp4 file name")


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    check_flags(parser, args)
    if args.bench and args.model:  # the Wan-scale speed benchmark (random weights): wan_scale.py
        import wan_scale
        return wan_scale.bench_wan(args)
    if args.bench:
        return bench(args)
    if args.switch_bench:
        return switch_bench(args)
    # every check before any work
    model, ckpt = load_streamable(args.ckpt)
    device = pick_device(args.device)
    model = model.to(device)
    if model.cfg.in_dim == 3 and (args.text or args.vae):
        raise ConfigError(f"--text / --vae are for Wan-shaped checkpoints; {args.ckpt} is a toy model (its prompt: "
                          f"--prompt)")
    if model.cfg.in_dim != 3:  # a Wan-shaped checkpoint: latents, umT5 features, the Wan VAE (wan_scale.py)
        if args.actions:
            raise ConfigError(f"--actions: {args.ckpt} is a Wan-shaped model; the world with actions is the toy's")
        import wan_scale
        return wan_scale.main_wan(args, model, ckpt, device)
    fpb = ckpt["config"].get("frames_per_block", 1)
    n_steps = args.steps or ckpt["config"].get("num_steps", 4)
    if args.window is None:
        args.window = default_window(fpb)
    if args.interactive and not args.window:
        raise ConfigError("--interactive streams without end: it needs a rolling cache (--window >= 1)")
    if args.interactive and args.frames is None and model.cfg.num_actions and not sys.stdin.isatty():
        raise ConfigError("--interactive steers a world model from the keyboard; from a pipe or file, whose end does "
                          "not stop it, give the stream a length (--frames N), or use --actions")  # typed prompts end
    script = read_action_script(args.actions) if args.actions and model.cfg.num_actions else None  # all of it
    if script is not None and len(script) < fpb:
        raise ConfigError(f"--actions: the script has {len(script)} actions, fewer than one {fpb}-frame block")
    if args.frames is None:  # a recorded action script, given alone, sets the stream's length (whole blocks)
        args.frames = 10 ** 9 if args.interactive else (len(script) - len(script) % fpb if script is not None else 48)
    if script is not None and len(script) > args.frames:
        print(f"--actions: the script has {len(script)} actions; the stream is {args.frames} frames (--frames, whole "
              f"{fpb}-frame blocks): the first {args.frames} are used")
    n_frames = args.frames
    if args.frames < 1:
        raise ConfigError(f"--frames {args.frames}: generate at least one frame")
    if args.frames % fpb:
        raise ConfigError(f"--frames {args.frames} is not a whole number of {fpb}-frame blocks (this checkpoint is "
                         f"{'frame' if fpb == 1 else 'chunk'}-wise)")
    if args.window and args.window % fpb:
        raise ConfigError(f"--window {args.window} is not a whole number of {fpb}-frame blocks")
    text = toy_data.TextEncoder()
    check_prompt(args.prompt, "--prompt")  # a prompt the toy cannot represent fails here, listing the valid ones
    switches = dict(parse_switch(s, args.frames, fpb) for s in args.switch)
    first_image = None
    if args.first_frame:
        if fpb != 1:
            raise ConfigError("--first-frame (I2V) needs a frame-wise checkpoint (frames_per_block 1)")
        first_image = read_first_frame(args.first_frame).to(device)
    if os.path.splitext(args.out)[1] not in (".gif", ".mp4"):
        raise ConfigError(f"--out {args.out}: write a .gif or an .mp4")
    world = bool(model.cfg.num_actions)
    if args.actions and not world:
        raise ConfigError(f"--actions: {args.ckpt} is not a world model (no action conditioning); train one with "
                          f"--actions (README, the world model)")
    if world and args.actions and args.interactive:
        raise ConfigError("--actions (a recorded script) and --interactive (the keyboard) both steer: pick one")
    if world and not (args.actions or args.interactive):
        raise ConfigError(f"{args.ckpt} is a world model: give it actions, --actions 'down-right,down-right,...' "
                          f"(one per frame, or a file), or steer it from the keyboard with --interactive")
    if script is not None:
        if len(script) < args.frames:
            raise ConfigError(f"--actions: the action script has {len(script)} actions, fewer than the {args.frames} "
                              f"frames to generate")
        script = script[:args.frames].to(device)

    steps = warped_steps(n_steps, model.cfg.shift)
    first = warped_steps(4, model.cfg.shift) if (fpb == 1 and n_steps < 4 and first_image is None) else None
    stream = Stream(model, steps, fpb, first, window=args.window or None, sink=args.sink,
                    max_frames=None if args.window else args.frames,
                    generator=torch.Generator().manual_seed(args.seed), fast=fast_mode(args))
    prompt = args.prompt
    stream.set_prompt(text([prompt]).to(device))
    queue = stdin_prompts() if args.interactive and not world else None
    keys, restore = key_presses() if args.interactive and world else (None, lambda: None)
    action, pressed, latencies = "stay", None, []  # the held action; when its key came; key-to-frame times
    if args.interactive and world:
        print(f"streaming at {args.fps:g} fps; steer with the arrow keys or WASD (space: stay), 1-9 switch the "
              f"prompt ({', '.join(f'{i + 1} {p}' for i, p in enumerate(toy_data.PROMPTS))}), q or Ctrl-C quits")
    elif args.interactive:
        print(f"streaming at {args.fps:g} fps; type a prompt ({', '.join(toy_data.PROMPTS)}) "
              f"and Enter to switch, 'quit' to stop")
    print(f"{args.ckpt}: {ckpt['stage']}, {'frame' if fpb == 1 else 'chunk'}-wise, {n_steps}-step"
          + (" (block 0: 4-step)" if first else "") + f", prompt {prompt!r}")
    frames, captions, t_start = [], [], time.perf_counter()  # captions: each frame's line in the GIF
    mode = f"{n_steps}-step"  # (the stage is in the CLI's output; a 128-px frame holds a short line)
    if first_image is not None:
        frames.append(stream.write_frames(first_image, actions=None if not world else script[None, :1] if script
                                          is not None else still_actions(model, 1, device)))
        captions.append("frame 0\nthe given image")
    try:
        while stream.frame < n_frames:
            if stream.frame in switches:
                prompt = switches[stream.frame]
                stream.set_prompt(text([prompt]).to(device), recache=args.recache)
                print(f"frame {stream.frame}: prompt -> {prompt!r}")
            while queue is not None and not queue.empty():  # interactive: new prompts typed so far
                line = queue.get()
                if line is None or line == "quit":
                    n_frames = stream.frame  # stop here
                    break
                try:
                    text([line])
                except ValueError as err:
                    print(f"\n  {err}")
                    continue
                prompt = line
                stream.set_prompt(text([prompt]).to(device), recache=args.recache)
                print(f"\nframe {stream.frame}: prompt -> {prompt!r}")
            while keys is not None and not keys.empty():  # interactive world model: the keys pressed so far
                when, key = keys.get()
                if key == "q":
                    n_frames = stream.frame
                    break
                if key in "123456789" and len(key) == 1:
                    prompt = toy_data.PROMPTS[int(key) - 1]
                    stream.set_prompt(text([prompt]).to(device), recache=args.recache)
                elif key in ("up", "down", "left", "right", "stay"):
                    action, pressed = steer(action, key), when
            if stream.frame >= n_frames:
                break
            acts = None
            if world:  # this block's actions: the script's, or the held key's
                acts = script[None, stream.frame:stream.frame + fpb] if script is not None else \
                    torch.full((1, fpb), toy_data.ACTIONS.index(action), dtype=torch.long, device=device)
            frames.append(stream.next_block(actions=acts))
            if pressed is not None:  # the first frame made under the newest key: its key-to-frame latency
                latencies.append(time.perf_counter() - pressed)
                pressed = None
            first_new = stream.frame - frames[-1].shape[1]
            captions += [f"frame {i}, {mode}\n{prompt}" + (f", {toy_data.ACTIONS[acts[0, i - first_new]]}" if world else "")
                         for i in range(first_new, stream.frame)]
            if args.interactive:  # pace to the playback rate, as a viewer would watch it
                print(f"\rframe {stream.frame} ({prompt}{', ' + action if world else ''})   ", end="", flush=True)
                time.sleep(max(0.0, stream.frame / args.fps - (time.perf_counter() - t_start)))
    except KeyboardInterrupt:  # Ctrl-C ends the stream; what was generated is still written
        print()
    finally:
        restore()  # the terminal's own settings back, whatever happened
    if args.interactive:
        print()
    if latencies:
        print(f"key-to-frame latency over {len(latencies)} key presses: mean {1000 * sum(latencies) / len(latencies):.0f} "
              f"ms, max {1000 * max(latencies):.0f} ms (a key waits for the next block's turn at {args.fps:g} fps, "
              f"then that block is generated under it)")
    if not frames:
        print("stopped before the first frame: nothing written")
        return None
    clip = torch.cat(frames, 1).cpu()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    toy_data.save_video(args.out, clip, fps=8, title=captions)
    print(f"wrote {args.out} ({clip.shape[1]} frames)")
    if args.speed and not args.interactive and first_image is None:
        try:
            s = stream_speed(model, n_steps, fpb, frames=args.frames, first_block_4step=first is not None,
                             window=args.window or None, sink=args.sink, repeats=1)
        except KeyboardInterrupt:
            print("speed check interrupted (the stream is written)")
            return clip
        print(f"speed (batch 1, {device.type}): first-frame latency {1000 * s['first_frame_s']:.1f} ms, per-frame "
              f"{1000 * s['per_frame_s']:.2f} ms, {s['fps']:.0f} frames/s with the KV cache; "
              f"{s['fps_recompute']:.0f} frames/s recomputing the prefix: {s['cache_speedup']:.1f}x")
    return clip


def switch_bench(args, seeds=(0, 1, 2)):
    """--switch-bench: switch_report with and without the KV re-cache, mean +- sd over 3 seeds (streams, noise)."""
    import statistics
    model, ckpt = load_streamable(args.ckpt, world_ok=False)
    model = model.to(pick_device(args.device))
    fpb = ckpt["config"].get("frames_per_block", 1)
    n_steps = args.steps or ckpt["config"].get("num_steps", 4)
    steps = warped_steps(n_steps, model.cfg.shift)
    first = warped_steps(4, model.cfg.shift) if (fpb == 1 and n_steps < 4) else None
    window = default_window(fpb) if args.window is None else (args.window or None)
    print(f"prompt switches, {args.ckpt} {n_steps}-step, window {window}, sink {args.sink}: the 72 ordered pairs of "
          f"different prompts, 6 frames under A then 12 under B, scored on the 6 frames after the switch; "
          f"mean +- sd over seeds {list(seeds)}")
    keys = ("prompt_acc", "frames_to_new_prompt", "physics", "physics_around", "fd")
    for recache in (False, True):
        runs = [switch_report(model, steps, fpb, first, window, args.sink, recache, seed=s) for s in tqdm(seeds, leave=False)]
        cell = lambda k: f"{statistics.mean(r[k] for r in runs):.3f} +- {statistics.stdev(r[k] for r in runs):.3f}"
        print(f"{'KV re-cache' if recache else 'keep the cached K/V':20s} | " + ", ".join(f"{k} {cell(k)}" for k in keys)
              + (f", re-cache latency at batch 1 {cell('recache_s')} s" if recache else ""))


@torch.no_grad()
def bench(args, n_clips=36, long=96):
    """The speed table (issue: faster than real time, cache vs recompute at 8/32/128 frames, first-frame
    latency of frame-wise 2-step vs chunk-wise 4-step) and the long-stream drift check (n_clips x long frames)."""
    device = pick_device(args.device)
    model, ckpt = load_streamable(args.ckpt, world_ok=False)
    model = model.to(device)
    print(f"speed, batch 1, {device.type}, {torch.get_num_threads()} threads, {args.ckpt}; speed depends only on "
          f"the architecture (chunk-wise rows reuse the same weights with 3-frame blocks)")
    print(f"{'mode':34s}{'frames':>7s}{'first frame':>13s}{'per frame':>11s}{'frames/s':>10s}"
          f"{'recompute':>11s}{'speed-up':>10s}")
    rows = [("frame-wise 1-step (block 0 4-step)", 1, 1, True), ("frame-wise 2-step (block 0 4-step)", 2, 1, True),
            ("frame-wise 4-step", 4, 1, False), ("chunk-wise 4-step", 4, 3, False)]
    for name, n, fpb, first4 in rows:
        for frames in ((8, 32, 128) if (n, fpb) == (1, 1) else (24,)):
            window = default_window(fpb) if args.window is None else (args.window or None)
            s = stream_speed(model, n, fpb, frames=frames, first_block_4step=first4, window=window, sink=args.sink)
            print(f"{name:34s}{frames:7d}{1000 * s['first_frame_s']:11.1f}ms{1000 * s['per_frame_s']:9.2f}ms"
                  f"{s['fps']:10.0f}{s['fps_recompute']:11.0f}{s['cache_speedup']:9.1f}x")
    if fast_mode(args):  # the fast path beside eager (--compile on a CPU: inductor's fused kernels, no graphs)
        window = default_window(1) if args.window is None else (args.window or None)
        print(f"\nthe fast path '{fast_mode(args)}' beside eager: frame-wise 2-step (block 0 4-step), 48 frames, "
              f"window {window}, best of 3 after a warm-up (the first compiled stream compiles, untimed)")
        for path in (None, fast_mode(args)):
            timed_stream(model, 48, warped_steps(2, model.cfg.shift), 1, warped_steps(4, model.cfg.shift), window,
                         args.sink, fast=path)  # every key count once (compiles)
            s = stream_speed(model, 2, 1, frames=48, first_block_4step=True, window=window, sink=args.sink,
                             recompute=False, fast=path)
            eager_fps = s["fps"] if path is None else eager_fps
            print(f"{path or 'eager':8s} first frame {1000 * s['first_frame_s']:.1f} ms, {1000 * s['per_frame_s']:.2f} "
                  f"ms/frame, {s['fps']:.0f} frames/s" + (f" ({s['fps'] / eager_fps:.2f}x eager)" if path else ""))
    # drift: metrics of the first and the last 6 frames of long streams, per cache setting
    prompts = [toy_data.PROMPTS[i % len(toy_data.PROMPTS)] for i in range(n_clips)]
    ctx = toy_data.TextEncoder()(prompts).to(device)
    fpb = ckpt["config"].get("frames_per_block", 1)
    n_steps = args.steps or ckpt["config"].get("num_steps", 4)
    steps = warped_steps(n_steps, model.cfg.shift)
    print(f"\nlong streams: {n_clips} clips x {long} frames, {n_steps}-step; metrics of frames 0-5 vs the last 6")
    w = default_window(fpb)  # whole blocks: frame-wise 5, 5 + a sink of 1, and 2; chunk-wise 6 and 6 + 3 (a
    # shorter chunk-wise window, 3, would hold no past at all: each block would see only itself)
    for window, sink in ((None, 0), (w, 0), (w, fpb)) + (((2, 0),) if fpb == 1 else ()):
        stream = Stream(model, steps, fpb, None, window, sink, max_frames=long,
                        generator=torch.Generator().manual_seed(0))
        stream.set_prompt(ctx)
        clip = torch.cat([stream.next_block(n_clips) for _ in range(long // fpb)], 1).cpu()
        name = "full cache" if window is None else f"window {window}, sink {sink}"
        for part, sl in (("first", slice(0, toy_data.FRAMES)), ("last", slice(long - toy_data.FRAMES, long))):
            m = toy_data.evaluate(clip[:, sl], prompts)
            print(f"{name:20s} {part:5s} | {toy_data.metric_line(m)}")


if __name__ == "__main__":
    run_main(main)
