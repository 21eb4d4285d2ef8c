"""
sample_stream.py — the samplers every stage shares, written as plain functions.

    sample_bidirectional   N-step Euler PF-ODE with CFG on whole clips        (stage 0 base; bidirectional ODE pairs)
    sample_ar              N-step Euler PF-ODE with CFG, block by block,      (stage 1 AR teacher)
                           through the KV cache, with the t = 0 refresh
    sample_stream          few-step streaming inference of a distilled model:  (stages 2 and 3; the CLI)
                           predict x0, re-noise to the next step, t = 0 refresh
    cfg_velocity           v = v_uncond + w (v_cond - v_uncond), one batched forward

The time convention is model.py's: t = 1000 is noise, t = 0 is data; the model predicts v = eps - x0.
The ODE grids are the model's own (`timestep_grid(n, model.cfg.shift)`, then a final step to t = 0), so a
48-step sampler walks 1000 -> 995.8 -> ... -> 96.2 -> 0 at shift 5.

Command: imported by the stage scripts; no CLI yet.
"""
import os

import torch

import toy_data
from model import KVCache, add_noise, euler_step, timestep_grid, warped_steps, x0_from_v


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
def sample_bidirectional(model, noise, ctx, ctx_null=None, num_steps=48, guidance=1.0, return_trajectory=False):
    """Euler PF-ODE on whole clips, every frame at the same t (path 1).
    noise: (B, F, C, H, W) at t = 1000; ctx / ctx_null: (B, L, text_dim).
    Returns x0 (B, F, C, H, W), and with return_trajectory the states at every grid point, (num_steps+1, B, F, C, H, W)."""
    grid = ode_grid(model, num_steps)
    x, traj = noise, [noise]
    for t, t_next in zip(grid[:-1], grid[1:]):
        v = cfg_velocity(model, x, torch.full(x.shape[:2], t, device=x.device), ctx, ctx_null, guidance)
        x = euler_step(x, v, t, t_next)  # x_t' = x_t - (s - s') v
        traj.append(x)
    return (x, torch.stack(traj)) if return_trajectory else x


@torch.no_grad()
def sample_ar(model, noise, ctx, ctx_null=None, num_steps=48, guidance=1.0, frames_per_block=1,
              return_trajectory=False):
    """The AR teacher's sampler (Causal Forcing stage 1): for each block, an N-step Euler PF-ODE with CFG whose
    queries attend to the cached clean past (path 3); then the finished block is run once more at t = 0 to
    overwrite its cache slot with clean K/V. Frame i depends only on the noise of frames <= i's block.
    Returns x0 (B, F, C, H, W) [and the trajectory (num_steps+1, B, F, C, H, W), all blocks on the same grid]."""
    B, nF = noise.shape[:2]
    if nF % frames_per_block:
        raise ValueError(f"{nF} frames are not a whole number of {frames_per_block}-frame blocks")
    grid = ode_grid(model, num_steps)
    use_cfg = ctx_null is not None and guidance != 1.0
    cache = KVCache(max_frames=nF)
    ctx_all = torch.cat([ctx, ctx_null]) if use_cfg else ctx  # one tensor, so its cross-attn K/V are cached once
    blocks, trajs = [], []
    for start in range(0, nF, frames_per_block):
        x = noise[:, start:start + frames_per_block]
        traj = [x]
        for t, t_next in zip(grid[:-1], grid[1:]):
            tt = torch.full(x.shape[:2], t, device=x.device)
            if use_cfg:
                v_cond, v_uncond = model(torch.cat([x, x]), torch.cat([tt, tt]), ctx_all, cache=cache,
                                         start_frame=start).chunk(2)
                v = v_uncond + guidance * (v_cond - v_uncond)
            else:
                v = model(x, tt, ctx_all, cache=cache, start_frame=start)
            x = euler_step(x, v, t, t_next)
            traj.append(x)
        # the t = 0 refresh: the block's clean K/V replace its noisy ones for every later block
        x_ref = torch.cat([x, x]) if use_cfg else x
        model(x_ref, torch.zeros(x_ref.shape[:2], device=x.device), ctx_all, cache=cache, start_frame=start)
        blocks.append(x)
        trajs.append(torch.stack(traj))
    x0 = torch.cat(blocks, dim=1)
    return (x0, torch.cat(trajs, dim=2)) if return_trajectory else x0


@torch.no_grad()
def sample_stream(model, noise, ctx, steps, frames_per_block=1, first_block_steps=None, generator=None,
                  cache=None, start_frame=0):
    """Few-step inference of a distilled causal model (Self Forcing Alg. 2; Causal Forcing inference).
    For each block: start from its noise; for each t in `steps` (a warped list such as [1000, 937.5, 833.3, 625])
    predict x0_hat = x_t - s v, and unless it is the last step re-noise it with *fresh* noise to the next t;
    the last x0_hat is the block. Then run the block once more at t = 0 so its clean K/V overwrite its cache
    slot. No CFG: guidance is distilled into the model. Block 0 may use its own list (`first_block_steps`: the
    1/2-step Causal Forcing++ models use the 4-step list for the first frame).
    noise: (B, F, C, H, W); returns x0 (B, F, C, H, W). Pass a `cache` (and `start_frame`) to continue a stream."""
    B, nF = noise.shape[:2]
    if nF % frames_per_block:
        raise ValueError(f"{nF} frames are not a whole number of {frames_per_block}-frame blocks")
    cache = cache if cache is not None else KVCache(max_frames=start_frame + nF)
    out = []
    for i, s in enumerate(range(0, nF, frames_per_block)):
        ts = first_block_steps if (i == 0 and start_frame == 0 and first_block_steps) else steps
        x = noise[:, s:s + frames_per_block]
        for j, t in enumerate(ts):
            tt = torch.full(x.shape[:2], float(t), device=x.device)
            x0_hat = x0_from_v(x, model(x, tt, ctx, cache=cache, start_frame=start_frame + s), t)
            if j + 1 < len(ts):  # re-noise with fresh noise to the next step
                eps = torch.randn(x.shape, generator=generator).to(x.device)
                x = add_noise(x0_hat, eps, ts[j + 1])
        model(x0_hat, torch.zeros(x.shape[:2], device=x.device), ctx, cache=cache, start_frame=start_frame + s)
        out.append(x0_hat)
    return torch.cat(out, dim=1)


def toy_few_step_samples(model, n, steps, frames_per_block=1, seed=1234, first_block_4step=False):
    """n toy clips from fixed noise (same seed -> same noise for every model), prompts cycling through all 9,
    with the few-step sampler on the model's warped step list. Returns (clips on CPU, prompts)."""
    dev = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    prompts = [toy_data.PROMPTS[i % len(toy_data.PROMPTS)] for i in range(n)]
    noise = torch.randn(n, toy_data.FRAMES, 3, toy_data.SIZE, toy_data.SIZE, generator=g).to(dev)
    ctx = toy_data.TextEncoder()(prompts).to(dev)
    first = warped_steps(4, model.cfg.shift) if first_block_4step else None
    clips = sample_stream(model, noise, ctx, warped_steps(steps, model.cfg.shift), frames_per_block, first, generator=g)
    return clips.cpu(), prompts


def toy_few_step_report(model, name, n, frames_per_block, out_dir):
    """Every stage-2/3 student's closing report: 1-, 2- and 4-step samples from fixed noise, one evaluator line
    each, and a GIF of the 4-step clips in out_dir/samples/. Returns {steps: metrics}."""
    metrics = {}
    for n_steps in (1, 2, 4):
        clips, prompts = toy_few_step_samples(model, n, n_steps, frames_per_block)
        metrics[n_steps] = toy_data.evaluate(clips, prompts)
        print(f"{name} {n_steps}-step | {toy_data.metric_line(metrics[n_steps])}")
    gif = os.path.join(out_dir, "samples", f"{name}_4step.gif")
    os.makedirs(os.path.dirname(gif), exist_ok=True)
    toy_data.save_video(gif, clips[:18], ncols=9)
    print(f"{name}: 4-step samples -> {gif}")
    return metrics
