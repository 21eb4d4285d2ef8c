"""Wan scale on a CPU, without weights: the memory planner against measured peaks, the lean optimizer, and every
stage script run for a few steps on a synthetic latent folder with a tiny Wan-shaped model."""
import copy
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import model as M
import wan_scale as WS


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


# Wan-shaped (Wan's in/out/text widths, 512 text tokens), big enough that activations matter: 4 layers of
# width 256 over clips of 2 latent frames of 32 x 32 (512 tokens, 1024 under teacher forcing).
CFG = M.ModelConfig(dim=256, ffn_dim=1024, num_heads=4, num_layers=4)
BATCH, FRAMES, H, W = 1, 2, 32, 32


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
    """Stage 3 as dmd.py runs it (its rollout, DMD loss and critic loss): generator (+ EMA) and critic trainable, a
    frozen real score; the generator's 2-step KV-cache rollout carries gradient through every block's exit step."""
    import dmd
    gen = M.DiT(cfg)
    ema, real, critic = (copy.deepcopy(gen) for _ in range(3))
    ema.requires_grad_(False), real.requires_grad_(False)
    for m in (gen, critic):
        m.gradient_checkpointing = grad_checkpointing
    opt_g, opt_c = torch.optim.AdamW(gen.parameters(), lr=1e-4), torch.optim.AdamW(critic.parameters(), lr=1e-4)
    steps, first = dmd.step_lists(2, 1, cfg.shift)
    B = x0.shape[0]
    null = torch.zeros_like(ctx)
    for _ in range(2):
        x = dmd.rollout(gen, torch.randn(x0.shape, generator=g), ctx, steps, first, 1, g)  # grad at exit steps
        t = torch.full((B,), 500.0)
        loss_g, _ = dmd.dmd_loss(x, real, critic, ctx, null, 4.0, t, torch.randn(x0.shape, generator=g))
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        M.ema_update(ema, gen, 0.99)
        del x, loss_g
        with torch.no_grad():
            x = dmd.rollout(gen, torch.randn(x0.shape, generator=g), ctx, steps, first, 1, g)
        loss_c = dmd.critic_loss(critic, x, ctx, t, torch.randn(x0.shape, generator=g))
        opt_c.zero_grad(set_to_none=True)
        loss_c.backward()
        opt_c.step()


@pytest.mark.parametrize("stage", ["ar", "dmd"])
@pytest.mark.parametrize("grad_checkpointing", [False, True])
def test_planner_within_25_percent_of_measured_cpu_peak(stage, grad_checkpointing):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(BATCH, FRAMES, CFG.in_dim, H, W, generator=g)
    ctx = torch.randn(BATCH, CFG.text_len, CFG.text_dim, generator=g)
    with LiveBytes() as meter:
        (ar_steps if stage == "ar" else dmd_steps)(CFG, x0, ctx, grad_checkpointing, g)
    plan = WS.plan_memory(stage, CFG, BATCH, FRAMES, H, W, grad_checkpointing=grad_checkpointing)
    ratio = plan["total"] / meter.peak
    print(f"{stage}, checkpointing {grad_checkpointing}: plan {plan['total'] / 2 ** 20:.0f} MiB, measured "
          f"{meter.peak / 2 ** 20:.0f} MiB, ratio {ratio:.2f}")  # pytest -s shows it
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


# -----------------------------------------------------------------------------------------------------------
# The lean optimizer


def test_stochastic_rounding_is_unbiased_where_round_to_nearest_loses_the_update():
    x = torch.full((200_000,), 1.0 + 1e-3)  # between the bf16 neighbours 1.0 and 1.0078125
    assert x.to(torch.bfloat16).float().unique().tolist() == [1.0]  # round-to-nearest: the 1e-3 is gone
    r = WS.stochastic_round_bf16(x).float()
    assert set(r.unique().tolist()) == {1.0, 1.0078125}
    assert abs(r.mean().item() - (1.0 + 1e-3)) < 1e-4  # on average it lands


def test_lean_adamw_factored_moment_is_exact_for_rank_one_squares_and_updates_bf16_weights():
    # with g^2 = a_i b_j (rank one), the factored second moment equals the full one, so one LeanAdamW step equals
    # one AdamW step with beta1 = 0 (sign-like: -lr * g / |g|)
    a, b = torch.rand(6) + 0.5, torch.rand(5) + 0.5
    g = (a[:, None] * b[None]).sqrt() * torch.where(torch.rand(6, 5) > 0.5, 1.0, -1.0)
    p1, p2 = torch.nn.Parameter(torch.zeros(6, 5)), torch.nn.Parameter(torch.zeros(6, 5))
    p1.grad, p2.grad = g.clone(), g.clone()
    WS.LeanAdamW([p1], lr=0.1, betas=(0.0, 0.999)).step()
    torch.optim.AdamW([p2], lr=0.1, betas=(0.0, 0.999), weight_decay=0.0).step()
    assert torch.allclose(p1, p2, atol=1e-5)
    # bf16 weights: 2000 steps of lr 1e-4 on weights of 1.0 move them by ~0.2 (each step alone is far below the
    # bf16 spacing of 0.0078); torch AdamW's round-to-nearest leaves them at exactly 1.0
    w_lean = torch.nn.Parameter(torch.ones(64, 64, dtype=torch.bfloat16))
    w_adam = torch.nn.Parameter(torch.ones(64, 64, dtype=torch.bfloat16))
    opt_lean = WS.LeanAdamW([w_lean], lr=1e-4, betas=(0.0, 0.999))
    opt_adam = torch.optim.AdamW([w_adam], lr=1e-4, betas=(0.0, 0.999), weight_decay=0.0)
    for _ in range(2000):
        w_lean.grad = torch.ones_like(w_lean)
        w_adam.grad = torch.ones_like(w_adam)
        opt_lean.step(), opt_adam.step()
    assert torch.equal(w_adam, torch.ones_like(w_adam))
    assert abs(w_lean.float().mean().item() - 0.8) < 0.01
    # the state is O(rows + columns), no first moment at beta1 = 0
    st = opt_lean.state[w_lean]
    assert st["row"].numel() + st["col"].numel() == 128 and "m" not in st


# -----------------------------------------------------------------------------------------------------------
# Every stage on a latent folder, with a tiny Wan-shaped model


@pytest.fixture(scope="module")
def wan_tiny(tmp_path_factory):
    from safetensors.torch import save_file
    root = tmp_path_factory.mktemp("wan")
    torch.manual_seed(0)
    base = M.DiT(M.PRESETS["wan-tiny"])
    torch.nn.init.normal_(base.head.head.weight, std=0.02)  # a "pretrained" base: not the zero-init head
    (root / "wan").mkdir()
    save_file({k: v.contiguous() for k, v in base.state_dict().items()},
              str(root / "wan" / "diffusion_pytorch_model.safetensors"))
    g = torch.Generator().manual_seed(0)
    for i in range(4):  # 3 latent frames of 4 x 8 latents, prompts of 7..10 umT5 tokens
        WS.write_latent_clip(str(root / "latents" / f"clip_{i}.safetensors"), torch.randn(3, 16, 4, 8, generator=g),
                            torch.randn(7 + i, 4096, generator=g), prompt=f"clip {i}")
    return root


def wan_args(root, *extra):
    return ["--data", str(root / "latents"), "--model", "wan-tiny", "--init-weights", str(root / "wan"),
            "--out-dir", str(root / "ckpt"), "--device", "cpu", *extra]


def test_every_stage_runs_on_a_latent_folder(wan_tiny, capsys):
    import ar_teacher
    import causal_cd
    import dmd
    import ode_init
    import sample_stream
    root = wan_tiny
    parse = M.parse_config
    ar_teacher.train(parse(ar_teacher.Config, ["--phase", "ar", "--ar-steps", "2", "--batch-size", "2",
                                               *wan_args(root)]))
    teacher = torch.load(root / "ckpt" / "ar_teacher.pt", weights_only=False)
    assert teacher["step"] == 2 and teacher["model_config"]["in_dim"] == 16 and teacher["model_config"]["shift"] == 5.0
    # stage 2b with the memory options: bf16 weights, the lean optimizer, gradient checkpointing
    causal_cd.train(parse(causal_cd.Config, ["--steps", "2", "--batch-size", "2", "--param-dtype", "bfloat16",
                                             "--optimizer", "lean", "--grad-checkpointing", *wan_args(root)]))
    cd = torch.load(root / "ckpt" / "causal_cd.pt", weights_only=False)
    assert cd["step"] == 2 and next(iter(cd["model"].values())).dtype == torch.bfloat16
    ode_init.train(parse(ode_init.Config, ["--teacher", "ar", "--num-pairs", "2", "--steps", "2", "--batch-size", "2",
                                           *wan_args(root)]))
    ode_init.train(parse(ode_init.Config, ["--teacher", "bidirectional", "--num-pairs", "2", "--steps", "2",
                                           "--batch-size", "2", *wan_args(root)]))
    pairs = torch.load(root / "ckpt" / "ode_pairs_bidirectional.pt", weights_only=False)
    assert pairs["states"].shape == (2, 5, 3, 16, 4, 8) and pairs["text"].shape == (2, 512, 4096)
    # stage 3: the real score and the critic are the Wan weights; bf16 + lean + checkpointing again
    _, minutes = dmd.train(parse(dmd.Config, ["--init", "causal_cd", "--num-steps", "2", "--gen-updates", "2",
                                              "--critic-ratio", "2", "--batch-size", "1", "--ema-start", "1",
                                              "--param-dtype", "bfloat16", "--optimizer", "lean",
                                              "--grad-checkpointing", *wan_args(root)]))
    ck = torch.load(root / "ckpt" / "dmd_causal_cd_2step.pt", weights_only=False)
    assert ck["iteration"] == 4 and [e["update"] for e in ck["log"]] == [0, 1, 2] and minutes > 0
    # streaming the result: latents written; decoding needs the optional extra (or says what to install)
    out = root / "stream.mp4"
    latents = sample_stream.main(["--ckpt", str(root / "ckpt" / "dmd_causal_cd_2step.pt"), "--text",
                                  str(root / "latents" / "clip_0.safetensors"), "--frames", "3", "--latent-hw", "4x8",
                                  "--out", str(out), "--device", "cpu"])
    assert latents.shape == (3, 16, 4, 8) and (root / "stream.safetensors").exists()
    printed = capsys.readouterr().out
    # decoded, or (no diffusers, or no VAE weights reachable, as on a machine without the hub) says what to do
    assert out.exists() or "pip install -r requirements-wan.txt" in printed or "pass its folder with --vae" in printed
    # the speed benchmark's code path (its numbers only mean something on a GPU)
    rows = sample_stream.main(["--bench", "--model", "wan-tiny", "--latent-frames", "3", "--latent-hw", "4x8",
                               "--device", "cpu"])
    assert [r["mode"] for r in rows][-1] == "chunk-wise 4-step" and all(r["latent_fps"] > 0 for r in rows)
    # each row eager and through the static fast path (a CUDA graph on a GPU): on a CPU the very same frames
    assert [r["path"] for r in rows] == ["eager", "static"] * 4 and all(r["max_abs_diff"] == 0 for r in rows[1::2])


def test_wan_scale_errors_say_what_to_do(wan_tiny, capsys):
    import ar_teacher
    import dmd
    root = wan_tiny
    with pytest.raises(ValueError, match="stage 0 is skipped at Wan scale"):
        ar_teacher.train(M.parse_config(ar_teacher.Config, ["--phase", "base", *wan_args(root)]))
    with pytest.raises(ValueError, match="at Wan scale the base is Wan2.1; pass --model wan2.1-1.3b --init-weights"):
        ar_teacher.train(M.parse_config(ar_teacher.Config, ["--phase", "ar", "--data", str(root / "latents")]))
    with pytest.raises(ValueError, match="needs a Wan-shaped model, but the checkpoint this stage starts from .* is the "
                                         "toy's; train the earlier stages at Wan scale .* python ar_teacher.py --phase ar"):
        WS.open_data(str(root / "latents"), M.PRESETS["toy"])
    with pytest.raises(SystemExit):  # a typo in --data: refused while the flags are read, before any weights load
        M.parse_config(dmd.Config, ["--data", str(root / "nope")])
    assert "no such latent folder" in capsys.readouterr().err
    with pytest.raises(ValueError, match="needs the toy model"):
        WS.open_data("toy", M.PRESETS["wan-tiny"])
    with pytest.raises(ValueError, match="pass --model wan2.1-1.3b --init-weights"):
        ar_teacher.load_base(ar_teacher.Config(data=str(root / "latents")))
    capsys.readouterr()
    with pytest.raises(SystemExit):  # refused while the flags are read, in one line
        M.parse_config(dmd.Config, ["--dry-run", "--model", "wan3"])
    assert capsys.readouterr().err == "error: --model 'wan3' is not a preset: use one of wan2.1-1.3b, wan2.1-14b, " \
                                      "toy, wan-tiny\n"
    with pytest.raises(ValueError, match="--model 'wan3' is not a preset"):
        WS.wan_base("wan3", "random")


def test_dry_run_prints_the_plan_without_loading_anything(wan_tiny, capsys):
    import dmd
    parts = dmd.train(M.parse_config(dmd.Config, ["--dry-run", "--model", "wan2.1-1.3b", "--param-dtype", "bfloat16",
                                                  "--optimizer", "lean", "--grad-checkpointing", "--data",
                                                  str(wan_tiny / "latents")]))
    out = capsys.readouterr().out
    assert "dmd: estimated peak" in out and "clips of 3 x 4 x 8" in out
    assert parts["weights"] == 4 * 1_418_996_800 * 2  # generator, its EMA, critic, real score in bf16
    assert parts["optimizer"] < 0.01 * parts["weights"]  # factored second moments only
    import ar_teacher  # every stage's dry run has a plan, the toy's stage 0 included
    for phase in ("base", "ar"):
        parts = ar_teacher.train(M.parse_config(ar_teacher.Config, ["--phase", phase, "--dry-run"]))
        assert parts["total"] > parts["weights"] > 0
    assert "base: estimated peak" in capsys.readouterr().out


def test_random_weights_and_synthetic_latents_run_a_stage_without_any_files(tmp_path, capsys):
    # the GPU memory measurement's path: --init-weights random --data FxHxW, nothing downloaded or encoded
    data = WS.open_data("3x4x8", M.PRESETS["wan-tiny"])
    x0, txt, null, prompts, actions = data.batch(2, generator=torch.Generator().manual_seed(0))
    assert x0.shape == (2, 3, 16, 4, 8) and txt.shape == (2, 512, 4096) and null.abs().sum() == 0 and prompts is None
    assert txt[:, :64].abs().sum() > 0 and txt[:, 64:].abs().sum() == 0  # 64 prompt tokens, zero padding
    with pytest.raises(ValueError, match="needs the toy model"):
        WS.open_data("toy", M.PRESETS["wan-tiny"])
    base, record = WS.wan_base("wan-tiny", "random")
    assert base.head.head.weight.abs().sum() > 0 and record["init_weights"] == "random"
    WS.limit_memory(torch.device("cpu"), 24.0)  # a no-op without a GPU
    assert WS.report_memory(torch.device("cpu"), "ar", WS.ScaleOptions(), 1) is None
    import ar_teacher
    ar_teacher.train(M.parse_config(ar_teacher.Config, [
        "--phase", "ar", "--ar-steps", "1", "--batch-size", "1", "--model", "wan-tiny", "--init-weights", "random",
        "--data", "3x4x8", "--out-dir", str(tmp_path), "--device", "cpu"]))
    out = capsys.readouterr().out
    assert "RANDOM weights" in out and "SYNTHETIC random latents" in out
    assert torch.load(tmp_path / "ar_teacher.pt", weights_only=False)["step"] == 1


def test_clip_frames_crops_a_latent_folder_for_training_and_planning(wan_tiny, capsys):
    data = WS.open_data(str(wan_tiny / "latents"), M.PRESETS["wan-tiny"], clip_frames=2)
    assert data.shape == (2, 4, 8) and data.batch(1)[0].shape == (1, 2, 16, 4, 8)
    with pytest.raises(ValueError, match="fewer than the 5 a clip needs"):
        WS.open_data(str(wan_tiny / "latents"), M.PRESETS["wan-tiny"], clip_frames=5)
    assert WS.open_data("3x4x8", M.PRESETS["wan-tiny"], clip_frames=2).shape == (2, 4, 8)  # synthetic: cropped too
    with pytest.raises(ValueError, match="--clip-frames 4: a 3x4x8 clip has only 3 latent frames"):
        WS.open_data("3x4x8", M.PRESETS["wan-tiny"], clip_frames=4)
    with pytest.raises(ValueError, match="--clip-frames crops the clips of a latent folder"):
        WS.ScaleOptions(clip_frames=2)  # on the toy: refused when the flags are read, before any checkpoint loads
    import causal_cd
    causal_cd.train(M.parse_config(causal_cd.Config, ["--dry-run", "--model", "wan2.1-1.3b", "--batch-size", "1",
                                                      "--data", str(wan_tiny / "latents"), "--clip-frames", "2"]))
    assert "clips of 2 x 4 x 8" in capsys.readouterr().out
    causal_cd.train(M.parse_config(causal_cd.Config, ["--dry-run", "--model", "wan2.1-1.3b", "--batch-size", "1",
                                                      "--data", "21x60x104", "--clip-frames", "9"]))  # a planned size
    assert "clips of 9 x 60 x 104" in capsys.readouterr().out
