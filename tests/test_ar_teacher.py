"""Stage 0/1 (ar_teacher.py) and the multi-step samplers: causality of the AR sampler, its agreement with the
bidirectional sampler on one block, a few-step smoke run of both phases, exact resume, and clear errors."""
import dataclasses
import os

import pytest
import torch

import ar_teacher
import model as M
import toy_data
from sample_stream import sample_ar, sample_bidirectional
from test_model import random_model


def tiny_run(tmp_path, **kw):
    """A few-step configuration of ar_teacher.py: same code, tiny budgets."""
    base = dict(base_steps=3, ar_steps=3, batch_size=4, warmup=1, eval_every=1000, ckpt_every=1000, eval_clips=9, eval_steps=2,
                out_dir=str(tmp_path))
    return ar_teacher.Config(**{**base, **kw})


def shrink_toy_preset(monkeypatch):
    monkeypatch.setitem(M.PRESETS, "toy", M.ModelConfig(**{**M.PRESETS["toy"].__dict__, "dim": 32, "ffn_dim": 64,
                                                            "num_heads": 2, "num_layers": 2}))


# --- samplers -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fpb", [1, 3])
def test_ar_sampler_earlier_frames_ignore_future_noise(fpb):
    m = random_model()
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(2, 6, 3, 16, 16, generator=g)
    ctx, null = torch.randn(2, 2, 32, generator=g), torch.zeros(2, 2, 32)
    noise_b = noise.clone()
    noise_b[:, fpb:] = torch.randn(2, 6 - fpb, 3, 16, 16, generator=g)
    a = sample_ar(m, noise, ctx, null, num_steps=4, guidance=3.0, frames_per_block=fpb)
    b = sample_ar(m, noise_b, ctx, null, num_steps=4, guidance=3.0, frames_per_block=fpb)
    assert torch.equal(a[:, :fpb], b[:, :fpb])  # the first block's ODE never saw the later noise
    assert (a[:, fpb:] - b[:, fpb:]).abs().max() > 1e-3
    # the bidirectional sampler is not causal: frame 0 changes with the future noise
    a = sample_bidirectional(m, noise, ctx, null, num_steps=4, guidance=3.0)
    b = sample_bidirectional(m, noise_b, ctx, null, num_steps=4, guidance=3.0)
    assert (a[:, :fpb] - b[:, :fpb]).abs().max() > 1e-3


@pytest.mark.parametrize("fpb", [1, 3])
def test_bidirectional_sampler_on_one_block_equals_ar_sampler(fpb):
    m = random_model()
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(2, fpb, 3, 16, 16, generator=g)
    ctx, null = torch.randn(2, 2, 32, generator=g), torch.zeros(2, 2, 32)
    a, traj_a = sample_bidirectional(m, noise, ctx, null, 5, 2.0, return_trajectory=True)
    b, traj_b = sample_ar(m, noise, ctx, null, 5, 2.0, frames_per_block=fpb, return_trajectory=True)
    assert traj_a.shape == traj_b.shape == (6, 2, fpb, 3, 16, 16)
    assert (a - b).abs().max() < 1e-4 and (traj_a - traj_b).abs().max() < 1e-4


@pytest.mark.parametrize("fpb", [1, 3])
def test_ar_sampler_continues_a_prefix_exactly_as_it_would_its_own_frames(fpb):
    # given its own first block as a clean prefix, the sampler makes the same later frames from the same noise:
    # the prefix write is the refresh it does after every block
    m = random_model()
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(2, 6, 3, 16, 16, generator=g)
    ctx, null = torch.randn(2, 2, 32, generator=g), torch.zeros(2, 2, 32)
    whole = sample_ar(m, noise, ctx, null, num_steps=3, guidance=2.0, frames_per_block=fpb)
    rest = sample_ar(m, noise[:, fpb:], ctx, null, num_steps=3, guidance=2.0, frames_per_block=fpb,
                     prefix=whole[:, :fpb])
    assert rest.shape == whole[:, fpb:].shape and (rest - whole[:, fpb:]).abs().max() < 1e-4
    with pytest.raises(ValueError, match="whole number of 3-frame blocks"):
        sample_ar(m, noise[:, :3], ctx, null, num_steps=2, frames_per_block=3, prefix=whole[:, :2])


def test_stage1_timesteps_are_per_block_on_the_training_grid():
    grid = M.timestep_grid(1000, 5.0)
    t = ar_teacher.sample_t(grid, 64, 2, 3, torch.Generator().manual_seed(0), "cpu")
    assert t.shape == (64, 6)
    assert torch.equal(t[:, :3], t[:, :1].expand(64, 3)) and torch.equal(t[:, 3:], t[:, 3:4].expand(64, 3))
    assert torch.isin(t, grid).all() and (t[:, 0] != t[:, 3]).any()


# --- the training script ------------------------------------------------------------------------------------

def test_smoke_base_then_ar_then_diffusion_forcing(tmp_path, monkeypatch):
    shrink_toy_preset(monkeypatch)
    ar_teacher.train(tiny_run(tmp_path, phase="base"))
    ckpt = M.load_checkpoint(str(tmp_path / "base.pt"), stage="base")
    assert ckpt["step"] == 3 and set(ckpt["metrics"]) >= {"blur", "prompt_acc", "motion", "physics", "fd"}
    assert ckpt["config"]["phase"] == "base" and ckpt["model_config"]["dim"] == 32
    for kw, name in [(dict(), "ar_teacher.pt"), (dict(frames_per_block=3), "ar_teacher_chunkwise.pt"),
                     (dict(diffusion_forcing=True), "ar_diffusion_forcing.pt")]:
        ar_teacher.train(tiny_run(tmp_path, phase="ar", **kw))
        teacher, ck = ar_teacher.load_teacher(str(tmp_path), phase="ar", **kw)
        assert os.path.basename(ar_teacher.checkpoint_path(tiny_run(tmp_path, phase="ar", **kw))) == name
        assert ck["stage"] == "ar_teacher" and teacher.cfg.dim == 32


def test_next_frame_report_scores_the_given_real_past(tmp_path, monkeypatch):
    shrink_toy_preset(monkeypatch)
    text = toy_data.TextEncoder()
    m = ar_teacher.DiT(M.PRESETS["toy"]).eval()
    for fpb, frames in [(1, (2, 5)), (3, (3, 5))]:  # first block with >= 2 real frames before it
        r = ar_teacher.next_frame_report(m, tiny_run(tmp_path, phase="ar", frames_per_block=fpb), 9, text)
        assert r["frames"] == frames and 0 <= r["off"] <= 1 and r["real_rms"] < 0.13
    # stand-in samplers: one that returns the true next frame scores 0 off; one that repeats the last real frame
    # (a stall) is off on every coordinate, since the toy moves 1 px per frame on both axes
    traj = toy_data.sample_trajectories(9, seed=4321, prompts=ar_teacher.eval_prompts(9))
    real = toy_data.render(traj["shape"], traj["colour"], traj["pos"])
    for lag, off in [(0, 0.0), (1, 1.0)]:
        monkeypatch.setattr(ar_teacher, "sample_ar", lambda model, noise, *a, prefix, **k:
                            real[:, prefix.shape[1] - lag:][:, :noise.shape[1]])
        r = ar_teacher.next_frame_report(m, tiny_run(tmp_path, phase="ar"), 9, text)
        assert r["off"] == off and abs(r["rms"] - lag) < 0.13
    with pytest.raises(ValueError, match="no block of a 6-frame clip has 2 real frames before it"):
        ar_teacher.next_frame_report(m, tiny_run(tmp_path, phase="ar", frames_per_block=6), 9, text)


def test_reevaluating_a_finished_run_with_more_clips_leaves_its_record(tmp_path, monkeypatch, capsys):
    shrink_toy_preset(monkeypatch)
    cfg = tiny_run(tmp_path, phase="base")
    ar_teacher.train(cfg)
    before = M.load_checkpoint(str(tmp_path / "base.pt"))
    capsys.readouterr()
    metrics = ar_teacher.train(dataclasses.replace(cfg, resume=True, eval_clips=18))
    out = capsys.readouterr().out
    acc = metrics["prompt_acc"]
    lo, hi = toy_data.accuracy_interval(acc, 18)
    assert f"prompt accuracy {acc:.3f} over 18 clips, 95% interval {lo:.3f}-{hi:.3f}" in out
    after = M.load_checkpoint(str(tmp_path / "base.pt"))
    assert after["step"] == before["step"] == 3 and after["metrics"] == before["metrics"]
    assert after["config"]["eval_clips"] == 9 and after["minutes"] == before["minutes"]


def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    shrink_toy_preset(monkeypatch)
    cfg = tiny_run(tmp_path / "a", phase="base", base_steps=4, ckpt_every=2)
    ar_teacher.train(cfg)
    straight = M.load_checkpoint(str(tmp_path / "a" / "base.pt"))

    # the same run, killed during step 3 (after the step-2 checkpoint), then resumed
    real_sample = toy_data.sample_clips
    calls = {"n": 0}

    def dying_sample(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated kill -9")
        return real_sample(*a, **k)

    cfg_b = dataclasses.replace(cfg, out_dir=str(tmp_path / "b"))
    monkeypatch.setattr(toy_data, "sample_clips", dying_sample)
    with pytest.raises(KeyboardInterrupt):
        ar_teacher.train(cfg_b)
    assert M.load_checkpoint(str(tmp_path / "b" / "base.partial.pt"))["step"] == 2  # unfinished: X.partial.pt
    monkeypatch.setattr(toy_data, "sample_clips", real_sample)
    ar_teacher.train(dataclasses.replace(cfg_b, resume=True))
    resumed = M.load_checkpoint(str(tmp_path / "b" / "base.pt"))
    assert resumed["step"] == 4
    for k in straight["model"]:
        assert torch.equal(straight["model"][k], resumed["model"][k]), k
    assert straight["history"] == resumed["history"]


def test_resume_accepts_a_checkpoint_older_than_a_new_setting_or_moved(tmp_path, monkeypatch):
    # a checkpoint written before a setting existed resumes as if it had that setting's default; a run folder
    # moved elsewhere resumes from there (the folder is where a run lives, not how it trains)
    shrink_toy_preset(monkeypatch)
    cfg = tiny_run(tmp_path, phase="base")
    ar_teacher.train(cfg)
    path = str(tmp_path / "base.pt")
    old = M.load_checkpoint(path)
    del old["config"]["clip_frames"]
    M.save_checkpoint(path, **old)
    assert ar_teacher.train(dataclasses.replace(cfg, resume=True))["prompt_acc"] >= 0  # raised before the fix
    os.rename(tmp_path / "base.pt", tmp_path / "moved.pt")
    os.makedirs(tmp_path / "moved")
    os.rename(tmp_path / "moved.pt", tmp_path / "moved" / "base.pt")
    assert ar_teacher.train(dataclasses.replace(cfg, resume=True, out_dir=str(tmp_path / "moved")))["prompt_acc"] >= 0


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "x.pt")
    M.save_checkpoint(path, stage="base", model_config={}, model={"w": torch.ones(2)})

    def crash(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"half a checkpo")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        M.save_checkpoint(path, stage="base", model_config={}, model={"w": torch.zeros(2)})
    monkeypatch.undo()
    assert torch.equal(M.load_checkpoint(path)["model"]["w"], torch.ones(2))


def test_bad_inputs_give_clear_errors(tmp_path, monkeypatch):
    shrink_toy_preset(monkeypatch)
    with pytest.raises(FileNotFoundError, match="python ar_teacher.py --phase base"):
        ar_teacher.train(tiny_run(tmp_path, phase="ar"))  # no base yet
    with pytest.raises(FileNotFoundError, match="python ar_teacher.py --phase ar --frames-per-block 3"):
        ar_teacher.load_teacher(str(tmp_path), phase="ar", frames_per_block=3)
    ar_teacher.train(tiny_run(tmp_path, phase="base"))
    with pytest.raises(ValueError, match="must divide"):
        ar_teacher.train(tiny_run(tmp_path, phase="ar", frames_per_block=4))
    with pytest.raises(ValueError, match="other settings.*'lr'"):
        ar_teacher.train(tiny_run(tmp_path, phase="base", lr=0.5, resume=True))
    # a checkpoint of the wrong stage where the base should be
    ar_teacher.train(tiny_run(tmp_path, phase="ar"))
    os.replace(tmp_path / "ar_teacher.pt", tmp_path / "base.pt")
    with pytest.raises(ValueError, match="'ar_teacher' checkpoint, but a 'base' checkpoint was expected"):
        ar_teacher.train(tiny_run(tmp_path, phase="ar"))
    with pytest.raises(SystemExit):
        M.parse_config(ar_teacher.Config, ["--phase", "ar", "--learning-rate", "1"])
    with pytest.raises(ValueError, match="--phase must be"):
        ar_teacher.train(tiny_run(tmp_path, phase="teacher"))
    with pytest.raises(ValueError, match="--base-weighting must be 'uniform' or 'bell' \\(got 'nope'\\)"):
        ar_teacher.train(tiny_run(tmp_path, phase="base", base_weighting="nope"))  # once trained as "uniform"


def test_ship_writes_small_strict_loadable_teacher_and_later_stages_fall_back_to_it(tmp_path, monkeypatch):
    shrink_toy_preset(monkeypatch)
    monkeypatch.chdir(tmp_path)  # the default out_dir "checkpoints" and the shipped dir, inside tmp_path
    ar_teacher.train(tiny_run("checkpoints", phase="base", ship=True))
    full = M.load_checkpoint("checkpoints/base.pt")
    shipped = M.load_checkpoint("pretrained/base.pt", stage="base")
    assert set(shipped) >= {"stage", "model_config", "config", "ema", "metrics"} and "optimizer" not in shipped
    assert all(v.dtype == torch.float16 for v in shipped["ema"].values())
    os.remove("checkpoints/base.pt")
    teacher, ckpt = ar_teacher.load_teacher(phase="base")  # falls back to pretrained/
    for k, v in full["ema"].items():
        assert torch.allclose(teacher.state_dict()[k], v, atol=1e-3, rtol=1e-3), k
    # a non-default out_dir never falls back: it must hold its own teacher
    with pytest.raises(FileNotFoundError, match=r"python ar_teacher.py --phase base --out-dir elsewhere\n.*or start from "
                                                r"the shipped one .*: cp pretrained/base.pt elsewhere/"):
        ar_teacher.load_teacher("elsewhere", phase="base")


def test_eval_only_reports_a_finished_teacher_and_names_the_command_when_missing(tiny_teachers, tmp_path_factory,
                                                                                  capsys):
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(FileNotFoundError, match="python ar_teacher.py --phase base --out-dir"):
        ar_teacher.evaluate_only(tiny_run(empty, phase="base"))
    capsys.readouterr()
    metrics = ar_teacher.evaluate_only(tiny_run(tiny_teachers, phase="ar"))
    out = capsys.readouterr().out
    assert 0 <= metrics["prompt_acc"] <= 1
    for line in ("model/exact denoiser: s 0.95:", "next block given the real past", "on its own rollouts"):
        assert line in out
