"""
sample_stream.py — the samplers every stage shares, written as plain functions.

    sample_bidirectional   N-step Euler PF-ODE with CFG on whole clips        (stage 0 base; bidirectional ODE pairs)
    sample_ar              N-step Euler PF-ODE with CFG, block by block,      (stage 1 AR teacher)
                           through the KV cache, with the t = 0 refresh
    cfg_velocity           v = v_uncond + w (v_cond - v_uncond), one batched forward

The time convention is model.py's: t = 1000 is noise, t = 0 is data; the model predicts v = eps - x0.
The ODE grids are the model's own (`timestep_grid(n, model.cfg.shift)`, then a final step to t = 0), so a
48-step sampler walks 1000 -> 995.8 -> ... -> 96.2 -> 0 at shift 5.

Command: imported by the stage scripts; no CLI yet.
"""
import torch

from model import KVCache, euler_step, timestep_grid


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
