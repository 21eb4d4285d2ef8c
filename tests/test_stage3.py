"""Stage 3 (dmd.py) and the streaming sampler / CLI (sample_stream.py): the DMD rollout is the inference sampler,
gradient only through exit steps, the DMD gradient's exact form, cache equivalences (rolling window >= length,
no-cache recompute), prompt switching, I2V, smoke runs and clear errors."""
import io
import os

import imageio.v2 as imageio
import numpy as np
import pytest
import torch

import causal_cd
import dmd
import model as M
import sample_stream as S
import toy_data
from test_model import random_model

STEPS4 = [1000.0, 937.5, 833.3, 625.0]


def noise_ctx(seed=0, B=2, F=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, F, 3, 16, 16, generator=g), torch.randn(B, 2, 32, generator=g)


# --- the rollout ------------------------------------------------------------------------------------------------

def test_dmd_rollout_is_the_inference_sampler():
    m = random_model()
    noise, ctx = noise_ctx()
    steps = [1000.0, 833.3]
    # dmd.rollout draws its exit steps from the generator, then runs sample_stream with them
    g = torch.Generator().manual_seed(5)
    e, e_first = int(torch.randint(0, 2, (1,), generator=g)), int(torch.randint(0, 4, (1,), generator=g))
    expected = S.sample_stream(m, noise, ctx, steps, 1, STEPS4, generator=g, exit_step=e, exit_step_first=e_first)
    with torch.enable_grad():
        got = dmd.rollout(m, noise, ctx, steps, STEPS4, 1, torch.Generator().manual_seed(5))
    assert torch.equal(got.detach(), expected.detach())
    # with the exit at the last step the rollout (grad on) is exactly inference (grad off, no exit given)
    with torch.enable_grad():
        train_like = S.sample_stream(m, noise, ctx, steps, 1, STEPS4, torch.Generator().manual_seed(1),
                                     exit_step=1, exit_step_first=3)
    with torch.no_grad():
        infer = S.sample_stream(m, noise, ctx, steps, 1, STEPS4, torch.Generator().manual_seed(1))
    assert train_like.requires_grad and not infer.requires_grad
    assert torch.equal(train_like.detach(), infer)


def test_gradient_flows_only_through_exit_steps():
    m = random_model()
    noise, ctx = noise_ctx(1)
    noise.requires_grad_(True)
    grad_forwards = []
    m.register_forward_hook(lambda mod, inp, out: grad_forwards.append(torch.is_grad_enabled()))
    cache = M.KVCache(max_frames=6)
    with torch.enable_grad():
        x = S.sample_stream(m, noise, ctx, STEPS4, 1, cache=cache, exit_step=0,
                            generator=torch.Generator().manual_seed(0))
        x[:, 3].sum().backward()
    # 6 blocks x (exit step 0 with grad + refresh without): one grad forward per block
    assert grad_forwards == [True, False] * 6
    # block 3's output depends on its own noise only through the graph: earlier blocks reach it through the
    # cache, which holds constants, so their noise gets exactly zero gradient
    assert noise.grad[:, 3].abs().sum() > 0
    assert torch.equal(noise.grad[:, :3], torch.zeros_like(noise.grad[:, :3]))
    assert not cache.k.requires_grad and cache.k.grad_fn is None
    assert m.head.head.weight.grad.abs().sum() > 0
    # exit at step 2: the exit step's input came from no-grad steps, so the noise gets no gradient at all
    noise.grad = None
    m.zero_grad(set_to_none=True)
    with torch.enable_grad():
        x = S.sample_stream(m, noise, ctx, STEPS4, 1, exit_step=2, generator=torch.Generator().manual_seed(0))
        x.sum().backward()
    assert noise.grad is None and m.head.head.weight.grad.abs().sum() > 0


# --- the losses ---------------------------------------------------------------------------------------------------

def test_dmd_gradient_is_normalised_score_difference():
    real, critic = random_model(seed=0), random_model(seed=1)
    x0, ctx = noise_ctx(2)
    null = torch.zeros_like(ctx)
    x = x0.clone().requires_grad_(True)
    t = torch.tensor([300.0, 700.0])
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    loss, g_abs = dmd.dmd_loss(x, real, critic, ctx, null, 4.0, t, eps)
    loss.backward()
    with torch.no_grad():  # the same gradient by hand: g = (x0_fake - x0_real) / mean|x - x0_real|, / numel
        x_t = M.add_noise(x0, eps, t)
        fake = M.x0_from_v(x_t, critic(x_t, t, ctx), t)
        v_c, v_u = real(x_t, t, ctx), real(x_t, t, null)
        real_x0 = M.x0_from_v(x_t, v_u + 4.0 * (v_c - v_u), t)
        g = (fake - real_x0) / (x0 - real_x0).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    assert torch.allclose(x.grad, g / x.numel(), rtol=1e-4, atol=1e-9)
    assert abs(g_abs - g.abs().mean().item()) < 1e-5
    # a critic equal to the real score (and no CFG) gives no gradient at all
    x.grad = None
    loss, g_abs = dmd.dmd_loss(x, real, real, ctx, null, 1.0, t, eps)
    loss.backward()
    assert g_abs == 0 and torch.equal(x.grad, torch.zeros_like(x))


def test_dmd_timesteps_are_shifted_and_clamped():
    t = dmd.sample_dmd_t(20000, shift=5.0, min_t=20, max_t=980, gen=torch.Generator().manual_seed(0))
    assert t.min() == 20 and t.max() == 980
    assert 0.75 < (t > 500).float().mean() < 0.9  # shift 5 pushes 5/6 of the mass above t = 500


# --- caches and streaming ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("fpb", [1, 3])
def test_no_cache_recompute_equals_the_cached_stream(fpb):
    m = random_model()
    noise, ctx = noise_ctx(3)
    first = STEPS4 if fpb == 1 else None
    a = S.sample_stream(m, noise, ctx, [1000.0, 833.3], fpb, first, torch.Generator().manual_seed(0))
    b = S.sample_recompute(m, noise, ctx, [1000.0, 833.3], fpb, first, torch.Generator().manual_seed(0))
    assert (a - b).abs().max() < 1e-4


def test_rolling_cache_with_window_at_least_the_length_equals_full_cache():
    m = random_model()
    _, ctx = noise_ctx(4, B=1)
    runs = {}
    for name, window, sink in (("full", None, 0), ("w6", 6, 0), ("w5s1", 5, 1), ("w2", 2, 0)):
        st = S.Stream(m, [1000.0, 833.3], 1, STEPS4, window=window, sink=sink, max_frames=6,
                      generator=torch.Generator().manual_seed(0))
        st.set_prompt(ctx)
        runs[name] = torch.cat([st.next_block() for _ in range(6)], 1)
    assert (runs["full"] - runs["w6"]).abs().max() < 1e-5
    assert (runs["full"] - runs["w5s1"]).abs().max() < 1e-5  # sink 1 + window 5 still holds all 6 frames
    # a window of 2 holds the current frame and the one before: frames 0-1 never lost anything, later ones did
    assert torch.equal(runs["full"][:, :2], runs["w2"][:, :2])
    assert (runs["full"][:, 2:] - runs["w2"][:, 2:]).flatten(2).abs().amax(-1).min() > 1e-4
    # a rolling stream runs far past any full cache's capacity
    st = S.Stream(m, [1000.0], 1, None, window=3, sink=1, generator=torch.Generator().manual_seed(0))
    st.set_prompt(ctx)
    long = torch.cat([st.next_block() for _ in range(40)], 1)
    assert long.shape[1] == 40 and torch.isfinite(long).all() and st.cache.visible_frames() == [0, 37, 38, 39]


@pytest.fixture
def streamable(tmp_path):
    """A random toy model saved as a distilled (causal CD) checkpoint, frame-wise, and a chunk-wise one."""
    m = random_model()
    paths = {}
    for fpb in (1, 3):
        paths[fpb] = str(tmp_path / f"student_fpb{fpb}.pt")
        M.save_checkpoint(paths[fpb], stage="causal_cd", model_config=m.cfg.__dict__,
                          config={"frames_per_block": fpb}, model=m.state_dict(), ema=m.state_dict())
    return paths, tmp_path


def cli(path, tmp_path, *extra):
    return S.main(["--ckpt", path, "--frames", "6", "--out", str(tmp_path / "s.gif"), *extra])


def test_prompt_switch_changes_only_later_frames(streamable):
    paths, tmp = streamable
    plain = cli(paths[1], tmp, "--steps", "2")
    switched = cli(paths[1], tmp, "--steps", "2", "--switch", "3:green square")
    assert torch.equal(plain[:, :3], switched[:, :3])
    assert (plain[:, 3:] - switched[:, 3:]).flatten(2).abs().amax(-1).min() > 1e-3  # every later frame changed
    assert os.path.exists(tmp / "s.gif") and imageio.mimread(tmp / "s.gif").__len__() == 6
    recached = cli(paths[1], tmp, "--steps", "2", "--switch", "3:green square", "--recache")  # the CLI's --recache
    assert torch.equal(recached[:, :3], plain[:, :3]) and (recached[:, 3:] - switched[:, 3:]).abs().max() > 1e-3


def test_first_frame_i2v_is_written_into_the_cache(streamable):
    paths, tmp = streamable
    clip = toy_data.sample_clips(1, seed=0)[0][0, 0]  # (3, 16, 16) in [-1, 1]
    img = ((clip.permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy()
    imageio.imwrite(tmp / "f.png", img)
    out = cli(paths[1], tmp, "--first-frame", str(tmp / "f.png"))
    t2v = cli(paths[1], tmp)
    assert torch.allclose(out[0, 0], clip, atol=1e-6)  # frame 0 is the image
    assert (out[:, 1:] - t2v[:, 1:]).abs().max() > 1e-3  # and the rest is conditioned on it


def test_cli_bad_input_fails_before_any_work(streamable, tmp_path):
    paths, tmp = streamable
    with pytest.raises(M.ConfigError, match="--prompt: the toy cannot represent prompt 'purple circle'"):
        cli(paths[1], tmp, "--prompt", "purple circle")
    with pytest.raises(ValueError, match="--frames 7 is not a whole number of 3-frame blocks"):
        S.main(["--ckpt", paths[3], "--frames", "7"])
    with pytest.raises(ValueError, match="frame 9 is outside the stream"):
        cli(paths[1], tmp, "--switch", "9:red square")
    with pytest.raises(ValueError, match="expected FRAME:PROMPT"):
        cli(paths[1], tmp, "--switch", "red square")
    imageio.imwrite(tmp / "big.png", np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(M.ConfigError, match=r"image is 32x32 pixels.*makes 16x16 frames; resize"):
        cli(paths[1], tmp, "--first-frame", str(tmp / "big.png"))
    imageio.imwrite(tmp / "gray.png", np.zeros((16, 16), np.uint8))
    with pytest.raises(M.ConfigError, match=r"1 channel \(grayscale\).*RGB frames; save it as RGB"):
        cli(paths[1], tmp, "--first-frame", str(tmp / "gray.png"))
    with pytest.raises(M.ConfigError, match=r"--frames 0: generate at least one frame"):
        cli(paths[1], tmp, "--frames", "0")
    for flag, value, message in (("--window", "-2", "at least 1 \\(0: the full cache\\)"), ("--sink", "-1", "0 or more"),
                                 ("--fps", "0", "must be positive")):
        with pytest.raises(M.ConfigError, match=rf"{flag} {value}: .*{message}"):
            cli(paths[1], tmp, flag, value)
    with pytest.raises(M.ConfigError, match=r"--out .*: a folder; give a .gif or .mp4 file name"):
        S.main(["--ckpt", paths[1], "--out", str(tmp)])
    with pytest.raises(M.ConfigError, match=r"--first-frame .* is not an image"):
        cli(paths[1], tmp, "--first-frame", str(tmp))
    with pytest.raises(M.ConfigError, match=r"--text / --vae are for Wan-shaped checkpoints; .* is a toy model"):
        cli(paths[1], tmp, "--vae", "random")
    with pytest.raises(M.ConfigError, match=r"--steps must be 1, 2 or 4 \(got 3\)"):
        S.main(["--bench", "--steps", "3"])  # before any timing
    with pytest.raises(M.ConfigError, match=r"--model wan2.1-1.3b: --model is the Wan preset of the Wan-scale bench"):
        cli(paths[1], tmp, "--model", "wan2.1-1.3b")  # without --bench it would go unused
    with pytest.raises(M.ConfigError, match=r"--seed must be between 0 and 2\^32 - 1 \(got -1\)"):
        cli(paths[1], tmp, "--seed", "-1")
    with pytest.raises(M.ConfigError, match=r"--prompt, --frames: --bench / --switch-bench measure fixed settings"):
        S.main(["--switch-bench", "--prompt", "blue circle", "--frames", "7"])
    with pytest.raises(ValueError, match="needs a frame-wise checkpoint"):
        S.main(["--ckpt", paths[3], "--frames", "6", "--first-frame", str(tmp / "big.png")])
    base = str(tmp / "base.pt")
    m = random_model()
    M.save_checkpoint(base, stage="base", model_config=m.cfg.__dict__, config={}, model=m.state_dict())
    with pytest.raises(ValueError, match="'base' checkpoint.*bidirectional base"):
        cli(base, tmp)
    with pytest.raises(FileNotFoundError, match="python causal_cd.py --toy"):
        cli(str(tmp / "missing.pt"), tmp)
    import ode_init
    for fpb in (1, 3):  # a missing checkpoint's command, read from its name, is the one its stage would print
        for out in ({"out_dir": str(tmp)}, {}, {"actions": True}):  # (the world model in its default folder)
            cfgs = [causal_cd.Config(frames_per_block=fpb, **out)]
            cfgs += [ode_init.Config(teacher=t, frames_per_block=fpb, noisy_prefix=noisy, exact_teacher=exact,
                                     guidance=1.0 if exact else 6.0, **out)
                     for t in ("ar", "bidirectional") for noisy in (False, True) for exact in (False, True)
                     if not (noisy and t == "ar")]
            cfgs += [dmd.Config(init=i, num_steps=n, frames_per_block=fpb, seed=seed, **out)
                     for i in dmd.INITS for n in (1, 2, 4) for seed in (0, 2)]
            for c in cfgs:
                stage = {causal_cd.Config: causal_cd, ode_init.Config: ode_init, dmd.Config: dmd}[type(c)]
                path = ode_init.student_path(c) if stage is ode_init else stage.checkpoint_path(c)
                assert S.remake_command(path) == stage.make_command(c), path
    assert not os.path.exists(tmp / "s.gif")  # nothing was generated by any of these


def test_stream_speed_reports_latency_and_cache_speedup():
    s = S.stream_speed(random_model(), 2, 1, frames=4, first_block_4step=True, repeats=1)
    assert set(s) >= {"first_frame_s", "per_frame_s", "fps", "fps_recompute", "cache_speedup"}
    assert s["fps"] > 0 and s["first_frame_s"] > 0


# --- dmd.py end to end ------------------------------------------------------------------------------------------

def dmd_run(tmp_path, **kw):
    return dmd.Config(**{**dict(gen_updates=2, critic_ratio=2, batch_size=2, eval_every=1, eval_clips=9,
                                ema_start=1, ckpt_every=1, out_dir=str(tmp_path)), **kw})


def test_smoke_dmd_resume_and_errors(tiny_teachers):
    causal_cd.train(causal_cd.Config(steps=1, batch_size=2, warmup=1, eval_clips=9, out_dir=str(tiny_teachers)))
    metrics, _ = dmd.train(dmd_run(tiny_teachers, num_steps=2))
    assert 0 <= metrics["prompt_acc"] <= 1
    path = dmd.checkpoint_path(dmd_run(tiny_teachers, num_steps=2))
    ckpt = M.load_checkpoint(path, stage="dmd")
    assert ckpt["iteration"] == 4 and ckpt["ema_started"]
    assert [r["update"] for r in ckpt["log"]] == [0, 1, 2] and "g" in ckpt["log"][1] and "loss_critic" in ckpt["log"][2]
    # resume: a longer run continues from iteration 4 instead of starting over
    dmd.train(dmd_run(tiny_teachers, num_steps=2, gen_updates=3, resume=True))
    ckpt = M.load_checkpoint(path, stage="dmd")
    assert ckpt["iteration"] == 6 and [r["update"] for r in ckpt["log"]] == [0, 1, 2, 3]
    assert {"area", "next_off", "own_off", "gap", "own_off_rigid", "own_rigid"} <= set(ckpt["log"][0])
    assert len(ckpt["log"][0]["area"]) == 6
    with pytest.raises(ValueError, match=r"other settings.*'lr': \(2e-06, 0.001\)"):
        dmd.train(dmd_run(tiny_teachers, num_steps=2, gen_updates=4, resume=True, lr=1e-3))
    # the DMD generator streams through the CLI with its own step count
    clip = S.main(["--ckpt", path, "--frames", "4", "--out", str(tiny_teachers / "d.gif")])
    assert clip.shape == (1, 4, 3, 16, 16)
    with pytest.raises(FileNotFoundError, match="python ode_init.py --teacher bidirectional"):
        dmd.train(dmd_run(tiny_teachers, init="bidirectional_ode"))
    with pytest.raises(ValueError, match="--init must be one of"):
        dmd.train(dmd_run(tiny_teachers, init="self_forcing"))
    with pytest.raises(ValueError, match="--real-score must be 'base' or, on the plain toy only"):
        dmd.train(dmd_run(tiny_teachers, real_score="oracle"))
    # DMD against the toy's exact data score runs the same loop (the critic still starts from the base)
    metrics, _ = dmd.train(dmd_run(tiny_teachers, num_steps=1, gen_updates=1, real_score="exact", real_guidance=1.0))
    assert 0 <= metrics["prompt_acc"] <= 1


def test_interactive_mode_switches_on_typed_prompts_and_stops_on_quit(streamable, monkeypatch, capsys):
    """stdin is replaced by a queue whose lines 'arrive' while blocks are generated: a prompt at the 3rd
    check, a bad one at the 4th, 'quit' at the 6th. The queue is drained before every block, so the checks fall
    on frames 0, 1, 2 (x3: two lines, then empty) and 3, where 'quit' stops the stream."""
    paths, tmp = streamable

    class TypedLines:
        def __init__(self, script):
            self.script, self.checks, self.ready = script, 0, []

        def empty(self):
            self.checks += 1
            self.ready += self.script.pop(self.checks, [])
            return not self.ready

        def get(self):
            return self.ready.pop(0)

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(S.sys, "stdin", Terminal())
    monkeypatch.setattr(S, "stdin_prompts", lambda: TypedLines({3: ["green square"], 4: ["purple cat"], 6: ["quit"]}))
    clip = S.main(["--ckpt", paths[1], "--interactive", "--fps", "1000", "--out", str(tmp / "i.gif")])
    out = capsys.readouterr().out
    assert "frame 2: prompt -> 'green square'" in out and "cannot represent prompt 'purple cat'" in out
    assert clip.shape[1] == 3 and len(imageio.mimread(tmp / "i.gif")) == 3  # stopped at the block boundary
    ref = cli(paths[1], tmp, "--switch", "2:green square")  # the same switch, scripted
    assert torch.equal(clip, ref[:, :3])
    with pytest.raises(ValueError, match="needs a rolling cache"):
        S.main(["--ckpt", paths[1], "--interactive", "--window", "0"])


def test_smoke_dmd_chunkwise(tmp_path, monkeypatch):
    """Chunk-wise (3-frame blocks) end to end: AR teacher -> causal CD -> DMD, then the CLI streams it."""
    from test_ar_teacher import shrink_toy_preset, tiny_run
    import ar_teacher
    shrink_toy_preset(monkeypatch)
    ar_teacher.train(tiny_run(tmp_path, phase="base"))
    ar_teacher.train(tiny_run(tmp_path, phase="ar", frames_per_block=3))
    causal_cd.train(causal_cd.Config(steps=1, batch_size=2, warmup=1, eval_clips=9, frames_per_block=3,
                                     out_dir=str(tmp_path)))
    run = dmd_run(tmp_path, num_steps=4, frames_per_block=3, gen_updates=1, critic_warmup=2)
    dmd.train(run)
    path = dmd.checkpoint_path(run)
    assert path.endswith("dmd_causal_cd_4step_fpb3.pt")
    clip = S.main(["--ckpt", path, "--frames", "9", "--out", str(tmp_path / "c.gif")])
    assert clip.shape == (1, 9, 3, 16, 16)
    with pytest.raises(FileNotFoundError, match="python causal_cd.py --toy"):  # no frame-wise student here
        dmd.train(dmd_run(tmp_path, num_steps=4))


# --- KV re-cache at a prompt switch (LongLive) ----------------------------------------------------------------

def switched_stream(model, recache, window=None, same=False, n=8, at=4):
    text = toy_data.TextEncoder()
    a, b = text(["red circle"]), text(["red circle" if same else "blue triangle"])
    s = S.Stream(model, [1000.0, 500.0], 1, None, window=window, max_frames=None if window else n,
                 generator=torch.Generator().manual_seed(0))
    s.set_prompt(a)
    frames = [s.next_block() for _ in range(at)]
    s.set_prompt(b if not same else b.clone(), recache=recache)
    return torch.cat(frames + [s.next_block() for _ in range(n - at)], 1), s


def test_recache_keeps_earlier_frames_and_changes_later_ones():
    m = random_model()
    keep, _ = switched_stream(m, recache=False)
    re, _ = switched_stream(m, recache=True)
    assert torch.equal(keep[:, :4], re[:, :4])  # frames before the switch: bit-identical
    assert (keep[:, 4:] - re[:, 4:]).abs().max() > 1e-3  # after it the past is re-encoded under the new prompt


def test_recache_under_the_same_prompt_is_a_no_op():
    m = random_model()
    keep, _ = switched_stream(m, recache=False, same=True)
    re, s = switched_stream(m, recache=True, same=True)
    assert s.recache_calls == 4 and (keep - re).abs().max() < 1e-5


def test_recache_of_a_rolling_window_reencodes_only_what_it_holds():
    m = random_model()
    _, s = switched_stream(m, recache=True, window=3, n=9, at=6)
    assert s.recache_calls == 3  # at the switch the ring holds frames 3, 4, 5 of the 6 generated
    assert sorted(s.held) == s.cache.visible_frames() == [6, 7, 8]  # the frames kept are exactly the cache's


def test_table_markdown_gives_mean_and_sd_over_seeds_and_a_dash_for_a_number_a_run_did_not_record():
    keys = dmd.TABLE_KEYS
    before = {k: 0.5 for k in keys}
    runs = [dict(before=before, after={**before, "fd": 10.0, "own_off": 0.1, "own_off_rigid": 0.02}, minutes=2.0),
            dict(before=before, after={**{k: 0.5 for k in keys if k != "own_off_rigid"}, "fd": 14.0, "own_off": 0.3},
                 minutes=4.0)]  # a run recorded before own_off_rigid existed
    text = dmd.table_markdown([dict(init="causal_cd", steps=2, runs=runs, fps=100.0, first_frame_s=0.01)],
                              {"fd": 0.4, "own_off": 0.0, "own_off_rigid": 0.0})
    head, _, before_line, after_line, real_line = text.split("\n")
    assert "next frame off (own past) | own past, shape keeps its size | frames/s" in head
    cells = [c.strip() for c in after_line.split("|")]
    assert cells[keys.index("fd") + 5] == "12.0 +- 2.8" and cells[keys.index("own_off") + 5] == "20.0% +- 14.1%"
    assert cells[keys.index("own_off_rigid") + 5] == "-" and cells[-2] == "3.0 min" and cells[4] == "2"
    assert [c.strip() for c in before_line.split("|")][keys.index("own_off_rigid") + 5] == "50.0%"
    assert [c.strip() for c in real_line.split("|")][keys.index("fd") + 5] == "0.4"


def test_checkpoints_made_on_the_way_keep_the_callers_block_size_and_device(tmp_path, monkeypatch):
    """dmd.py --table makes missing stage-2 students, causal_cd.py --toy missing teachers: with the caller's
    --frames-per-block (else a chunk-wise table trains frame-wise students it then cannot find) and --device."""
    import ar_teacher
    import ode_init
    made = []
    monkeypatch.setattr(causal_cd, "train", lambda c: made.append(("cd", c.frames_per_block, c.device)))
    monkeypatch.setattr(ode_init, "train", lambda c: made.append((c.teacher, c.frames_per_block, c.device)))
    dmd.ensure_stage2(dmd.Config(table=True, frames_per_block=3, device="cpu", out_dir=str(tmp_path)))
    assert sorted(made) == [("ar", 3, "cpu"), ("bidirectional", 3, "cpu"), ("cd", 3, "cpu")]
    made.clear()
    monkeypatch.setattr(ar_teacher, "find_teacher", lambda c: None)
    monkeypatch.setattr(ar_teacher, "train", lambda c: made.append((c.phase, c.frames_per_block, c.device)))
    causal_cd.ensure_teachers(causal_cd.Config(toy=True, frames_per_block=3, device="cpu", out_dir=str(tmp_path)))
    assert made == [("base", 1, "cpu"), ("ar", 3, "cpu")]


def test_bench_drift_check_runs_a_chunkwise_checkpoint(streamable, monkeypatch, capsys):
    """--bench's long-stream part uses rolling windows of whole blocks (it ended in a traceback for chunk-wise)."""
    paths, _ = streamable
    monkeypatch.setattr(S, "stream_speed", lambda *a, **k: dict.fromkeys(
        ("first_frame_s", "per_frame_s", "fps", "fps_recompute", "cache_speedup"), 1.0))  # the timings: not tested here
    S.bench(S.build_parser().parse_args(["--ckpt", paths[3], "--bench"]), n_clips=2, long=12)
    out = capsys.readouterr().out
    rows = [line.split("|")[0].split() for line in out.splitlines() if " | blur" in line]
    assert [" ".join(r) for r in rows[::2]] == ["full cache first", "window 6, sink 0 first", "window 6, sink 3 first"]
