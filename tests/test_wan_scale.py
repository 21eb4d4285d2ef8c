"""Wan scale on a CPU, without weights: the memory planner against measured peaks, the lean optimizer, and every
stage script run for a few steps on a synthetic latent folder with a tiny Wan-shaped model."""
import copy
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import model as M


class LiveBytes(TorchDispatchMode):
    """The CPU analogue of torch.cuda.max_memory_allocated: every op's new output storage is counted until the
    storage is freed (a weakref finalizer), and the peak of the running total is kept. Allocator slack is not
    counted, as the planner does not count it either."""

    def __init__(self):
        super().__init__()
        self.live, self.current, self.peak = {}, 0, 0

    def _free(self, key):
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key = (storage.data_ptr(), id(storage))
                if storage.data_ptr() and key not in self.live:
                    self.live[key] = storage.nbytes()
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._free, key)
        return out


# Wan-shaped (Wan's in/out/text widths, 512 text tokens), big enough that activations dominate: 4 layers of
# width 256 over clips of 4 latent frames of 32 x 32 (1024 tokens, 2048 under teacher forcing).
CFG = M.ModelConfig(dim=256, ffn_dim=1024, num_heads=4, num_layers=4)
BATCH, FRAMES, H, W = 1, 4, 32, 32


def ar_steps(cfg, x0, ctx, grad_checkpointing, g):
    """Stage 1 as ar_teacher.py runs it: student + EMA copy, AdamW, teacher-forcing flow matching. Two steps, so
    the second runs with the optimizer states allocated."""
    model = M.DiT(cfg)
    model.gradient_checkpointing = grad_checkpointing
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for _ in range(2):
        eps = torch.randn(x0.shape, generator=g)
        t = torch.full(x0.shape[:2], 500.0)
        loss = (model(M.add_noise(x0, eps, t), t, ctx, clean=x0, frames_per_block=1) - (eps - x0)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        M.ema_update(ema, model, 0.99)


def dmd_steps(cfg, x0, ctx, grad_checkpointing, g):
    """Stage 3's shape: generator (+ EMA) and critic trainable, a frozen real score; a no-grad KV-cache rollout,
    then a bidirectional step of each trainable model."""
    gen = M.DiT(cfg)
    ema, real, critic = (copy.deepcopy(gen) for _ in range(3))
    ema.requires_grad_(False), real.requires_grad_(False)
    for m in (gen, critic):
        m.gradient_checkpointing = grad_checkpointing
    opt_g, opt_c = torch.optim.AdamW(gen.parameters(), lr=1e-4), torch.optim.AdamW(critic.parameters(), lr=1e-4)
    B, nF = x0.shape[:2]
    for _ in range(2):
        with torch.no_grad():
            cache = M.KVCache(max_frames=nF)
            x = torch.randn(x0.shape, generator=g)
            for f in range(nF):
                gen(x[:, f:f + 1], torch.zeros(B, 1), ctx, cache=cache, start_frame=f)
        t = torch.full((B, nF), 500.0)
        for model, opt in ((critic, opt_c), (gen, opt_g)):
            loss = (model(M.add_noise(x, x0, t), t, ctx) - (x0 - x)).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        del cache


@pytest.mark.parametrize("stage", ["ar", "dmd"])
@pytest.mark.parametrize("grad_checkpointing", [False, True])
def test_planner_within_25_percent_of_measured_cpu_peak(stage, grad_checkpointing):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(BATCH, FRAMES, CFG.in_dim, H, W, generator=g)
    ctx = torch.randn(BATCH, CFG.text_len, CFG.text_dim, generator=g)
    with LiveBytes() as meter:
        (ar_steps if stage == "ar" else dmd_steps)(CFG, x0, ctx, grad_checkpointing, g)
    plan = M.plan_memory(stage, CFG, BATCH, FRAMES, H, W, grad_checkpointing=grad_checkpointing)
    ratio = plan["total"] / meter.peak
    assert 0.75 <= ratio <= 1.25, (f"plan {plan['total'] / 2 ** 20:.0f} MiB vs measured {meter.peak / 2 ** 20:.0f} MiB "
                                   f"({ {k: round(v / 2 ** 20) for k, v in plan.items()} })")
    assert meter.current < meter.peak / 4  # the meter sees frees: after the steps little is left alive


def test_live_bytes_meter_counts_allocations_and_frees():
    with LiveBytes() as meter:
        a = torch.zeros(1000, 250)  # 1 MB
        b = a * 2
        del a
        c = b.view(-1)  # a view allocates nothing
        del b, c
    assert meter.peak == 2_000_000 and meter.current == 0
