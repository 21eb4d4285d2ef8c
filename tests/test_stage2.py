"""Stage 2 (ode_init.py, causal_cd.py): the exact two-frame miniature, causality of the ODE pairs, the CD step,
smoke runs of both scripts, and clear errors for mismatched pairs and checkpoints."""
import os

import pytest
import torch

import causal_cd
import model as M
import ode_init
from sample_stream import cfg_velocity
from test_model import random_model


# --- the exact miniature (SPEC §5) ---------------------------------------------------------------------------

def test_two_frame_miniature_ar_is_a_step_bidirectional_student_is_blurred():
    eps1 = torch.tensor([-2.0, -1.0, -0.5, 0.5, 1.0, 2.0], dtype=torch.float64)
    ar, bi, student = ode_init.two_frame_miniature(eps1, n_future=256)
    # AR teacher: frame 1 decided by eps1 alone, a sharp step onto the data points
    assert torch.allclose(ar, torch.sign(eps1), atol=0.1)  # +- a few std of the tiny within-mode spread (0.03)
    # bidirectional teacher: the same eps1 lands on both data points depending on eps2
    assert ((bi > 0.9).any(1) & (bi < -0.9).any(1))[2:4].all()
    assert (bi.abs() > 0.9).float().mean() > 0.95  # each teacher output is still a data point
    # the student fitted to those pairs is their average: squashed towards 0, most of all near eps1 = 0
    assert (student[1:5].abs() < 0.8).all() and (student[2:4].abs() < 0.6).all()
    assert (student.diff() > 0).all()  # a smooth increasing curve instead of the step sign(eps1)
    g = torch.Generator().manual_seed(0)
    _, _, s_mc = ode_init.two_frame_miniature(torch.randn(200, generator=g, dtype=torch.float64), n_future=128)
    assert s_mc.pow(2).mean() < 0.8  # Prop. 3.3: second moment strictly below the data's (1)


def test_gmm_velocity_is_exact_at_the_ends():
    means = torch.tensor([[-1.0], [1.0]], dtype=torch.float64)
    x = torch.tensor([[0.3]], dtype=torch.float64)
    # at s = 1, x_s = eps exactly, so E[eps - x0 | x] = x - E[x0] = x (the data mean is 0)
    assert torch.allclose(ode_init.gmm_velocity(x, torch.tensor(1.0, dtype=torch.float64), means, 1e-3), x)


# --- ODE pairs ------------------------------------------------------------------------------------------------

def test_causal_ode_pairs_ignore_future_noise_bidirectional_ones_do_not():
    m = random_model()
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 3, 16, 16, generator=g), torch.randn(2, 4, 3, 16, 16, generator=g)
    ctx, null = torch.randn(2, 2, 32, generator=g), torch.zeros(2, 2, 32)
    eps_b = eps.clone()
    eps_b[:, 2:] = torch.randn(2, 2, 3, 16, 16, generator=g)
    a = ode_init.causal_ode_trajectory(m, x0, eps, ctx, null, 6.0, 1)
    b = ode_init.causal_ode_trajectory(m, x0, eps_b, ctx, null, 6.0, 1)
    assert a.shape == (2, 5, 4, 3, 16, 16)
    assert (a[:, :, :2] - b[:, :, :2]).abs().max() < 1e-5  # frames 0, 1: every stored state identical
    assert (a[:, -1, 2:] - b[:, -1, 2:]).abs().max() > 1e-3
    a = ode_init.bidirectional_ode_trajectory(m, eps, ctx, null, 6.0)
    b = ode_init.bidirectional_ode_trajectory(m, eps_b, ctx, null, 6.0)
    assert (a[:, -1, :2] - b[:, -1, :2]).abs().max() > 1e-3  # frame 0's endpoint moved with the future noise
    assert torch.equal(a[:, 0], eps)  # the first stored state is the noise at t = 1000


def test_exact_teachers_pairs_are_the_data_law_bidirectional_endpoints_real_clips_ar_frames_given_the_past():
    """--exact-teacher: the same trajectory code with toy_data.ExactScore as the teacher. The bidirectional PF-ODE
    of the exact law ends on real clips of the prompt; the AR one, teacher-forced on the true past, ends each frame
    on a frame that continues that past (one of the clips agreeing with frames < i)."""
    import toy_data
    clips, prompts = toy_data.sample_clips(3, seed=5, prompts=["red circle", "green square", "blue triangle"])
    ctx = toy_data.TextEncoder()(prompts)
    eps = torch.randn(clips.shape, generator=torch.Generator().manual_seed(1))
    exact = toy_data.ExactScore(M.PRESETS["toy"])
    end = ode_init.bidirectional_ode_trajectory(exact, eps, ctx, None, 1.0)[:, -1]
    for b, p in enumerate(prompts):
        assert (toy_data.all_clips(p) == end[b]).flatten(1).all(1).any()  # exactly one of the prompt's clips
    end = ode_init.causal_ode_trajectory(exact, clips, eps, ctx, None, 1.0, 1)[:, -1]
    for b, p in enumerate(prompts):
        X = toy_data.all_clips(p)
        for i in range(1, 6):
            same_past = (X[:, :i] == clips[b, :i]).flatten(1).all(1)
            assert (X[same_past, i] == end[b, i]).flatten(1).all(1).any()  # a frame that continues the true past


def test_exact_teacher_needs_the_plain_toy_and_no_cfg(tmp_path):
    with pytest.raises(M.ConfigError, match="add --guidance 1"):
        ode_init.train(ode_init.Config(exact_teacher=True, out_dir=str(tmp_path)))
    with pytest.raises(M.ConfigError, match="needs the plain toy"):
        ode_init.train(ode_init.Config(exact_teacher=True, guidance=1.0, actions=True, out_dir=str(tmp_path)))
    assert os.listdir(tmp_path) == []
    cfg = ode_init.Config(teacher="bidirectional", exact_teacher=True, guidance=1.0)
    assert ode_init.student_path(cfg).endswith("bidirectional_ode_exact.pt")
    assert ode_init.pairs_path(cfg).endswith("ode_pairs_bidirectional_exact.pt")
    assert ode_init.make_command(cfg) == "python ode_init.py --teacher bidirectional --exact-teacher --guidance 1"


# --- causal CD ------------------------------------------------------------------------------------------------

def test_teacher_euler_step_with_cfg_matches_hand_computation():
    m = random_model()
    g = torch.Generator().manual_seed(1)
    x0, x_t = torch.randn(2, 2, 3, 16, 16, generator=g), torch.randn(2, 2, 3, 16, 16, generator=g)
    ctx, null = torch.randn(2, 2, 32, generator=g), torch.zeros(2, 2, 32)
    t, t_next = 937.5, 930.9
    tt = torch.full((2, 2), t)
    with torch.no_grad():
        v_c = m(x_t, tt, ctx, clean=x0, frames_per_block=1)
        v_u = m(x_t, tt, null, clean=x0, frames_per_block=1)
        by_hand = x_t - (t - t_next) / 1000 * (v_u + 3.0 * (v_c - v_u))
        v = cfg_velocity(m, x_t, tt, ctx, null, 3.0, clean=x0, frames_per_block=1)
    assert (M.euler_step(x_t, v, t, t_next) - by_hand).abs().max() < 1e-5


def test_one_cd_step_decreases_the_loss_on_a_fixed_batch():
    teacher = random_model(seed=0)
    student = random_model(seed=0)
    ema = random_model(seed=0)
    with torch.no_grad():  # a student that differs from its target, so there is something to learn
        for p in student.parameters():
            p.add_(0.02 * torch.randn_like(p))
    g = torch.Generator().manual_seed(2)
    x0, ctx = torch.randn(4, 2, 3, 16, 16, generator=g), torch.randn(4, 2, 32, generator=g)
    grid = M.timestep_grid(48, 5.0)
    loss_at = lambda: causal_cd.cd_loss(student, ema, teacher, x0, ctx, torch.zeros_like(ctx), grid, 3.0, 1,
                                        torch.Generator().manual_seed(5))
    opt = torch.optim.SGD(student.parameters(), lr=0.05)
    before = loss_at()
    before.backward()
    opt.step()
    with torch.no_grad():
        after = loss_at()
    assert after < before * 0.999


# --- ODE regression: the official bidirectional recipe (clean past, masked loss) ---------------------------------

class RecordingZeroVelocity(torch.nn.Module):
    """A stand-in student with v = 0, so x0_hat is its input; it records the per-frame t and the attention path."""

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(()))
        self.calls = []

    def forward(self, x, t, ctx, **path):
        self.calls.append((t.clone(), path))
        return self.p * x  # zero velocity, but the loss still has a graph


def ode_batch(B=16, F=6, seed=0):
    """Stored points j = 0..3 filled with the constant j + 1, the endpoint (j = 4) with -1; the gt clip with 7."""
    states = torch.arange(1.0, 6.0).view(1, 5, 1, 1, 1, 1).expand(B, 5, F, 3, 4, 4).clone()
    states[:, 4] = -1.0
    return states, torch.full((B, F, 3, 4, 4), 7.0)


def test_bidirectional_ode_loss_is_masked_to_noisy_blocks_and_sees_a_clean_past():
    """Official recipe (Self Forcing ode_regression): one point per block over the 4 noisy states and the clean
    endpoint (t = 0), block-causal path, MSE averaged over the frames with t != 0 only."""
    student, shift = RecordingZeroVelocity(), 2.0
    t_list = M.warped_steps(4, shift) + [0.0]
    states, gt = ode_batch()
    loss = ode_init.ode_regression_loss(student, (states, gt), None, "bidirectional", 1, shift,
                                        torch.Generator().manual_seed(1))
    t, path = student.calls[-1]
    assert path == dict(frames_per_block=1)  # no ground-truth context: the noisy prefix of the same trajectory
    k = torch.tensor([[t_list.index(v) for v in row] for row in t.tolist()])  # (B, F) stored point per frame
    noisy = k < 4
    assert 0 < noisy.float().mean() < 1  # both kinds occur in this batch
    # v = 0: x0_hat = the input state (value k + 1), target -1, so each noisy frame's error is (k + 2)^2
    expected = ((k[noisy] + 2.0) ** 2).mean()
    assert torch.allclose(loss, expected.float())
    # the clean frames carry no loss: changing their (equal) input and target leaves the loss unchanged
    states2 = states.clone()
    states2[:, 4] = -1.0
    states2[:, 4][~noisy] = 123.0
    student2 = RecordingZeroVelocity()
    loss2 = ode_init.ode_regression_loss(student2, (states2, gt), None, "bidirectional", 1, shift,
                                         torch.Generator().manual_seed(1))
    assert torch.equal(student2.calls[-1][0], t)
    # only the endpoint of the clean frames changed; the noisy frames' targets did not
    assert torch.allclose(loss2, expected.float())


def test_ode_points_per_block_clean_at_one_in_five_never_for_the_noisy_prefix_ablation_or_the_ar_teacher():
    shift, B, F = 2.0, 64, 6
    states, gt = ode_batch(B, F)
    rates = {}
    for kind, noisy_prefix in (("bidirectional", False), ("bidirectional", True), ("ar", False)):
        student, g = RecordingZeroVelocity(), torch.Generator().manual_seed(0)
        for _ in range(40):
            ode_init.ode_regression_loss(student, (states, gt), None, kind, 3 if kind == "ar" else 1, shift, g,
                                         noisy_prefix=noisy_prefix)
        t = torch.stack([c[0] for c in student.calls])  # (40, B, F)
        rates[kind, noisy_prefix] = (t == 0).float().mean().item()
        if kind == "ar":  # one point for all frames, with the ground truth as clean context
            assert (t == t[..., :1]).all() and "clean" in student.calls[-1][1]
        else:  # one point per block: frames of a clip differ
            assert (t != t[..., :1]).any()
    # 40 x 64 x 6 = 15,360 draws at p = 0.2: s.e. 0.003
    assert abs(rates["bidirectional", False] - 0.2) < 0.015
    assert rates["bidirectional", True] == 0 and rates["ar", False] == 0


def test_ode_loss_with_every_block_clean_is_zero_not_nan():
    student = RecordingZeroVelocity()
    states, gt = ode_batch(B=1, F=1)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):  # a 1-frame clip is clean with p = 0.2 per draw
        loss = ode_init.ode_regression_loss(student, (states, gt), None, "bidirectional", 1, 2.0, g)
        if student.calls[-1][0].item() == 0:
            assert loss.item() == 0.0
            loss.backward()  # still a graph
            return
    pytest.fail("no clean draw in 20 tries")


# --- scripts ---------------------------------------------------------------------------------------------------

def stage2_run(tmp_path, **kw):
    return ode_init.Config(**{**dict(num_pairs=8, steps=2, batch_size=4, warmup=0, eval_clips=9, ckpt_every=1,
                                     unseen_pairs=4, out_dir=str(tmp_path)), **kw})


def test_smoke_ode_init_both_teachers_and_pair_mismatch(tiny_teachers):
    for teacher in ("ar", "bidirectional"):
        metrics = ode_init.train(stage2_run(tiny_teachers, teacher=teacher))
        assert set(metrics) == {1, 2, 4}
        student, ckpt = ode_init.load_student(str(tiny_teachers), teacher)
        assert ckpt["stage"] == ode_init.stage_name(teacher) and ckpt["pair_bytes"] > 0
        fit = ckpt["pair_fit"]  # the memorisation check: its own pairs vs unseen ones vs the starting weights
        assert set(fit) == {"train", "unseen", "start"} and all(0 < v < float("inf") for v in fit.values())
        assert fit["unseen"] != fit["train"] and fit["start"] != fit["unseen"]  # other pairs; EMA vs start weights
        # the unseen pairs' clips: distinct, and none of them a training pair's clip (the toy world is finite)
        pairs = torch.load(ode_init.pairs_path(stage2_run(tiny_teachers, teacher=teacher)), weights_only=False)
        teacher_model = student if teacher == "ar" else ode_init.load_base(stage2_run(tiny_teachers))[0]
        draw = lambda exclude: ode_init.trajectories(stage2_run(tiny_teachers, teacher=teacher), teacher_model, 6,
                                                     torch.Generator().manual_seed(200), torch.device("cpu"),
                                                     exclude=exclude)["x0"]
        rows = lambda x0: {x.numpy().tobytes() for x in x0}
        first = draw(pairs["x0"])
        again = draw(torch.cat([pairs["x0"], first]))  # the same draws, with the first six excluded too
        assert len(rows(first)) == len(rows(again)) == 6
        assert not rows(first) & rows(pairs["x0"]) and not rows(again) & (rows(pairs["x0"]) | rows(first))
    # the noisy-prefix ablation reads the same pairs and writes its own student
    ode_init.train(stage2_run(tiny_teachers, teacher="bidirectional", noisy_prefix=True))
    assert os.path.exists(tiny_teachers / "bidirectional_ode_noisy_prefix.pt")
    pairs = torch.load(ode_init.pairs_path(stage2_run(tiny_teachers)), weights_only=False)
    assert pairs["states"].shape == (8, 5, 6, 3, 16, 16)
    # the same pair file read by a run with another CFG weight: refused, naming what differs
    with pytest.raises(ValueError, match="another setup.*guidance"):
        ode_init.train(stage2_run(tiny_teachers, guidance=2.0))
    with pytest.raises(ValueError, match="another setup.*'num_pairs': \\(8, 4\\)"):  # another set, not a slice
        ode_init.train(stage2_run(tiny_teachers, num_pairs=4))


def test_smoke_causal_cd_and_wrong_stage(tiny_teachers):
    metrics = causal_cd.train(causal_cd.Config(steps=2, batch_size=4, warmup=0, eval_clips=9, ckpt_every=1,
                                               out_dir=str(tiny_teachers)))  # --warmup 0: no warm-up
    assert set(metrics) == {1, 2, 4} and 0 <= metrics[4]["prompt_acc"] <= 1
    student, ckpt = causal_cd.load_student(str(tiny_teachers))
    assert ckpt["stage"] == "causal_cd" and ckpt["step"] == 2
    # a checkpoint of the wrong stage where the CD student should be
    os.replace(tiny_teachers / "base.pt", tiny_teachers / "causal_cd.pt")
    with pytest.raises(ValueError, match="'base' checkpoint, but a 'causal_cd' checkpoint was expected"):
        causal_cd.load_student(str(tiny_teachers))


def test_cd_without_teacher_names_the_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="python ar_teacher.py --phase ar"):
        causal_cd.train(causal_cd.Config(steps=1, out_dir=str(tmp_path)))


def test_few_step_stream_one_step_is_the_x0_prediction_and_first_block_list_is_used():
    m = random_model()
    g = torch.Generator().manual_seed(3)
    noise, ctx = torch.randn(2, 3, 3, 16, 16, generator=g), torch.randn(2, 2, 32, generator=g)
    from sample_stream import sample_stream
    out = sample_stream(m, noise, ctx, [1000.0], frames_per_block=3)
    with torch.no_grad():  # one block, one step: x0_hat = x_1000 - 1 * v, from the bidirectional path
        ref = M.x0_from_v(noise, m(noise, 1000.0, ctx), 1000.0)
    assert (out - ref).abs().max() < 1e-4
    # block 0 on the 4-step list, later blocks on 1 step: block 0 differs from an all-1-step stream, later
    # blocks see a different cached frame 0 and so differ too; with fixed generators the run is reproducible
    a = sample_stream(m, noise, ctx, [1000.0], 1, [1000.0, 937.5, 833.3, 625.0], torch.Generator().manual_seed(0))
    b = sample_stream(m, noise, ctx, [1000.0], 1, [1000.0, 937.5, 833.3, 625.0], torch.Generator().manual_seed(0))
    c = sample_stream(m, noise, ctx, [1000.0], 1)
    assert torch.equal(a, b) and (a[:, 0] - c[:, 0]).abs().max() > 1e-3


def test_per_frame_report_prints_students_and_targets(tiny_teachers, capsys):
    ode_init.train(stage2_run(tiny_teachers, teacher="bidirectional"))
    capsys.readouterr()  # drop the training run's own report
    ode_init.per_frame_report(ode_init.Config(out_dir=str(tiny_teachers)), n=9)
    out = capsys.readouterr().out.splitlines()
    lines = [l for l in out if l.startswith("bidirectional_ode ")]
    assert [l.split("|")[0].split()[1] for l in lines] == ["targets", "1-step", "4-step"]
    assert all(l.count(",") == 2 * 5 for l in lines)  # 6 values (5 commas) in each of the two lists


def test_injectivity_figure_is_drawn_with_every_panel_measured(tiny_teachers, monkeypatch):
    monkeypatch.chdir(tiny_teachers)
    coarse = ode_init.gmm_ode  # the miniature's ODE is tested on its own above; 20 steps keep this test fast
    monkeypatch.setattr(ode_init, "gmm_ode", lambda eps, means, var: coarse(eps, means, var, n_steps=20))
    monkeypatch.setattr(ode_init, "FIGURE_STEPS", 4)  # the teachers' samplers: same code, fewer steps
    for teacher in ("ar", "bidirectional"):
        ode_init.train(stage2_run(tiny_teachers, teacher=teacher))
    summary = ode_init.plot_injectivity(stage2_run(tiny_teachers, plot=True), path="fig.png", K=3)
    assert (tiny_teachers / "fig.png").stat().st_size > 10_000
    assert summary["variance"]["AR teacher"] == [0.0] * 6  # frame-level injectivity, exactly
    assert min(summary["variance"]["bidirectional teacher"][:5]) > 0  # the last frame has no future
    for key in ("train_inputs", "stream", "targets"):
        assert {len(v) for v in summary[key].values()} == {6}


def test_per_frame_and_plot_without_students_stop_and_name_the_commands(tmp_path, monkeypatch):
    monkeypatch.setattr(ode_init, "train", lambda cfg: pytest.fail("--plot started training without being asked"))
    with pytest.raises(M.ConfigError, match=r"no ODE student.*python ode_init.py --teacher ar --out-dir"):
        ode_init.per_frame_report(ode_init.Config(out_dir=str(tmp_path)))
    with pytest.raises(M.ConfigError, match=r"--plot needs .*causal_ode.pt and .*bidirectional_ode.pt.*--train-missing"):
        ode_init.plot_injectivity(ode_init.Config(out_dir=str(tmp_path), plot=True))
