"""Each stage script starts from the weights the SPEC names, and an interrupted-and-resumed run of it equals an
uninterrupted one in everything it saves: model, EMA, critic, both optimizers, step, history and RNG state.
Tiny toy models (the smoke tests' presets); each stage's closing evaluation is stubbed out, since neither fact
depends on it."""
import os
import shutil

import pytest
import torch

import ar_teacher
import causal_cd
import dmd
import model as M
import ode_init
import toy_data
import wan_scale
from test_ar_teacher import tiny_run

TINY = M.ModelConfig(**{**M.PRESETS["toy"].__dict__, "dim": 32, "ffn_dim": 64, "num_heads": 2, "num_layers": 2})
FAKE_METRICS = dict(blur=0.5, second_moment=0.5, prompt_acc=0.5, motion=1.0, motion_gap=0.4, physics=0.3, fd=9.0)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """A tiny base and AR teacher, trained once for the module; tests copy them into their own folder."""
    root = tmp_path_factory.mktemp("teachers")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(M.PRESETS, "toy", TINY)
        ar_teacher.train(tiny_run(root, phase="base"))
        ar_teacher.train(tiny_run(root, phase="ar"))
    return root


@pytest.fixture
def run_dir(teachers, tmp_path, monkeypatch):
    for name in ("base.pt", "ar_teacher.pt"):
        shutil.copy(teachers / name, tmp_path / name)
    monkeypatch.setitem(M.PRESETS, "toy", TINY)
    # the closing evaluations (sampling + the evaluator) take most of a tiny run's time and no part in these facts
    monkeypatch.setattr(causal_cd, "toy_few_step_report", lambda *a, **k: {})
    monkeypatch.setattr(ode_init, "toy_few_step_report", lambda *a, **k: {})
    monkeypatch.setattr(dmd, "toy_few_step_samples",
                        lambda model, n, *a, **k: (torch.zeros(n, toy_data.FRAMES, 3, 16, 16), toy_data.PROMPTS[:1] * n,
                                                    None))
    monkeypatch.setattr(toy_data, "evaluate", lambda clips, prompts, reference=None, actions=None: dict(FAKE_METRICS))
    return tmp_path


def first_call(monkeypatch, module, name, record):
    """Wrap module.name so that its first call records record(*args) (before any update), then runs as usual."""
    real, seen = getattr(module, name), []

    def wrapper(*a, **k):
        if not seen:
            seen.append(record(*a, **k))
        return real(*a, **k)
    monkeypatch.setattr(module, name, wrapper)
    return seen


def state(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def assert_same_state(a, b, what):
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.equal(a[k].float(), b[k].float()), f"{what}: {k}"


def differs(a, b):
    return any(not torch.equal(a[k], b[k]) for k in a)


# --- initialisation --------------------------------------------------------------------------------------------

def test_ar_teacher_starts_from_the_bases_ema_weights(run_dir, monkeypatch):
    """Stage 1's model and its EMA, at the first step, are the base checkpoint's EMA weights (not its raw ones)."""
    base = M.load_checkpoint(str(run_dir / "base.pt"))
    assert differs(base["ema"], base["model"])  # so the test can tell the two apart
    seen_model = first_call(monkeypatch, ar_teacher, "flow_matching_loss", lambda model, *a, **k: state(model))
    seen_ema = first_call(monkeypatch, ar_teacher, "ema_update", lambda ema, model, decay: state(ema))
    ar_teacher.train(tiny_run(run_dir, phase="ar", ar_steps=1))
    assert_same_state(seen_model[0], base["ema"], "AR model at step 0")
    assert_same_state(seen_ema[0], base["ema"], "AR EMA at step 0")


@pytest.mark.parametrize("phase, kw, path_keys, weighted", [
    ("base", {}, set(), False),  # stage 0: bidirectional, plain flow matching
    ("ar", {}, {"clean", "frames_per_block"}, True),  # stage 1: teacher forcing, the official bell weight
    ("ar", dict(ar_weighting="uniform"), {"clean", "frames_per_block"}, False),
    ("ar", dict(diffusion_forcing=True), {"frames_per_block"}, True),  # the ablation: no clean context
])
def test_stage_0_1_loss_inputs(run_dir, monkeypatch, phase, kw, path_keys, weighted):
    """train() feeds flow_matching_loss the attention path and weighting of its phase: teacher forcing gets the
    batch's own ground truth as clean context, diffusion forcing none, the base neither."""
    seen = first_call(monkeypatch, ar_teacher, "flow_matching_loss",
                      lambda model, x0, ctx, t, eps, shift, w, **path: (x0.clone(), w, path))
    ar_teacher.train(tiny_run(run_dir, phase=phase, base_steps=1, ar_steps=1, **kw))
    x0, w, path = seen[0]
    assert set(path) == path_keys and w is weighted
    if "clean" in path:
        assert torch.equal(path["clean"], x0) and path["frames_per_block"] == 1


def test_causal_cd_student_ema_and_teacher_start_from_the_ar_teacher(run_dir, monkeypatch):
    ar = M.load_checkpoint(str(run_dir / "ar_teacher.pt"))
    assert differs(ar["ema"], ar["model"])
    seen = first_call(monkeypatch, causal_cd, "cd_loss",
                      lambda student, ema, teacher, *a, **k: (state(student), state(ema), state(teacher)))
    causal_cd.train(causal_cd.Config(steps=1, batch_size=2, warmup=1, out_dir=str(run_dir)))
    for name, got in zip(("student", "EMA", "teacher"), seen[0]):
        assert_same_state(got, ar["ema"], f"CD {name} at step 0")


def test_dmd_critic_starts_from_the_base_and_generator_from_its_init(run_dir, monkeypatch):
    base = M.load_checkpoint(str(run_dir / "base.pt"))
    ar = M.load_checkpoint(str(run_dir / "ar_teacher.pt"))
    seen_scores = first_call(monkeypatch, dmd, "dmd_loss",
                             lambda x, real, critic, *a, **k: (state(real), state(critic)))
    seen_gen = first_call(monkeypatch, dmd, "rollout", lambda generator, *a, **k: state(generator))
    dmd.train(dmd.Config(init="ar_teacher", num_steps=2, gen_updates=1, critic_ratio=1, batch_size=2,
                         out_dir=str(run_dir)))
    real, critic = seen_scores[0]
    assert_same_state(real, base["ema"], "DMD real score")
    assert_same_state(critic, base["ema"], "DMD critic at update 0")
    assert_same_state(seen_gen[0], ar["ema"], "DMD generator at update 0")


# --- exact resume ------------------------------------------------------------------------------------------------

def dies_at(monkeypatch, module, name, n):
    """module.name raises KeyboardInterrupt (a simulated kill) on its n-th call."""
    real, calls = getattr(module, name), [0]

    def wrapper(*a, **k):
        calls[0] += 1
        if calls[0] == n:
            raise KeyboardInterrupt("simulated kill -9")
        return real(*a, **k)
    monkeypatch.setattr(module, name, wrapper)
    return real


def assert_same(a, b, path="checkpoint"):
    """Recursive exact equality of saved objects: tensors bit for bit, dicts, lists, numbers."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{path}: keys {set(a) ^ set(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def interrupted_then_resumed(monkeypatch, train, cfg, path, module, loss_name, die_at, keys):
    """Run cfg straight through; then again from scratch, killed inside the loss of call `die_at` (after a
    checkpoint), then resumed. The killed rerun must leave the finished checkpoint untouched (its own went to
    X.partial.pt); the two final checkpoints must agree on `keys`, and the partial file is gone at the end."""
    train(cfg)
    straight = M.load_checkpoint(path)
    finished_bytes = open(path, "rb").read()
    real = dies_at(monkeypatch, module, loss_name, die_at)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    assert open(path, "rb").read() == finished_bytes, "a killed rerun replaced the finished checkpoint"
    killed_at = M.load_checkpoint(M.partial_path(path))
    monkeypatch.setattr(module, loss_name, real)
    train(type(cfg)(**{**cfg.__dict__, "resume": True}))
    resumed = M.load_checkpoint(path)
    assert not os.path.exists(M.partial_path(path))
    for k in keys:
        assert_same(straight[k], resumed[k], k)
    return killed_at, resumed


def test_ar_teacher_resume_restores_everything(run_dir, monkeypatch):
    cfg = tiny_run(run_dir, phase="ar", ar_steps=4, ckpt_every=2)
    killed, _ = interrupted_then_resumed(
        monkeypatch, ar_teacher.train, cfg, str(run_dir / "ar_teacher.pt"), ar_teacher, "flow_matching_loss", 3,
        ["model", "ema", "optimizer", "step", "history", "data_gen", "noise_gen"])
    assert killed["step"] == 2


def test_ode_init_ar_resume_restores_everything(run_dir, monkeypatch):
    cfg = ode_init.Config(teacher="ar", num_pairs=8, steps=4, batch_size=4, warmup=1, ckpt_every=2, unseen_pairs=2,
                          out_dir=str(run_dir))
    killed, _ = interrupted_then_resumed(
        monkeypatch, ode_init.train, cfg, ode_init.student_path(cfg), ode_init, "ode_regression_loss", 3,
        ["model", "ema", "optimizer", "step", "history", "gen"])
    assert killed["step"] == 2


def test_causal_cd_resume_restores_everything(run_dir, monkeypatch):
    cfg = causal_cd.Config(steps=4, batch_size=2, warmup=3, ckpt_every=2, out_dir=str(run_dir))
    killed, _ = interrupted_then_resumed(
        monkeypatch, causal_cd.train, cfg, causal_cd.checkpoint_path(cfg), causal_cd, "cd_loss", 3,
        ["model", "ema", "optimizer", "step", "history", "data_gen"])
    assert killed["step"] == 2


@pytest.mark.parametrize("stage", ["causal_cd", "causal_ode"])
def test_a_finished_stage2_run_continued_to_more_steps_equals_one_longer_run(run_dir, stage):
    # how docs/RESULTS.md measures stage-2 length: a finished N-step run, rerun with --resume --steps 2N, must
    # be the 2N-step run (both keep a constant lr after warmup; all their randomness is in the saved generator)
    if stage == "causal_cd":
        train, gen_key = causal_cd.train, "data_gen"
        make = lambda steps, **kw: causal_cd.Config(steps=steps, batch_size=2, warmup=1, ckpt_every=100,
                                                    out_dir=str(run_dir), **kw)
        path = causal_cd.checkpoint_path(make(2))
    else:
        train, gen_key = ode_init.train, "gen"
        make = lambda steps, **kw: ode_init.Config(teacher="ar", num_pairs=8, steps=steps, batch_size=4, warmup=1,
                                                   ckpt_every=100, unseen_pairs=2, out_dir=str(run_dir), **kw)
        path = ode_init.student_path(make(2))
    train(make(4))
    straight = M.load_checkpoint(path)
    train(make(2))
    assert M.load_checkpoint(path)["step"] == 2
    with pytest.raises(M.ConfigError, match=r"was trained with other settings \(saved, now\): \{'lr': "):
        train(make(4, resume=True, lr=0.5))  # what the run computes may not change on --resume (its length may)
    train(make(4, resume=True))
    continued = M.load_checkpoint(path)
    for k in ("model", "ema", "optimizer", "step", "history", gen_key):
        assert_same(straight[k], continued[k], k)


@pytest.mark.parametrize("stage", ["causal_cd", "causal_ode"])
def test_a_resume_that_only_evaluates_keeps_the_trainings_minutes(run_dir, stage):
    # docs/RESULTS.md re-measures finished students with --resume at the same --steps: that evaluates only, and the
    # wall time the checkpoint reports must stay the training's; a resume that trains reports its own run's time
    if stage == "causal_cd":
        make = lambda steps, **kw: causal_cd.Config(steps=steps, batch_size=2, warmup=1, ckpt_every=100,
                                                    eval_clips=9, out_dir=str(run_dir), **kw)
        train, path = causal_cd.train, causal_cd.checkpoint_path(make(2))
    else:
        make = lambda steps, **kw: ode_init.Config(teacher="ar", num_pairs=8, steps=steps, batch_size=4, warmup=1,
                                                   ckpt_every=100, unseen_pairs=0, eval_clips=9,
                                                   out_dir=str(run_dir), **kw)
        train, path = ode_init.train, ode_init.student_path(make(2))
    train(make(2))
    finished = {**M.load_checkpoint(path), "minutes": 123.0, "metrics": {"marker": 1}}  # markers no run writes
    M.save_checkpoint(path, **finished)
    train(make(2, resume=True))
    evaluated = M.load_checkpoint(path)
    assert evaluated["minutes"] == 123.0 and evaluated["step"] == 2 and "marker" not in evaluated["metrics"]
    # killed in its closing evaluation, a run resumes from its last partial checkpoint, which records no minutes
    M.save_checkpoint(M.partial_path(path), **{k: v for k, v in finished.items() if k not in ("minutes", "metrics")})
    train(make(2, resume=True))
    assert 0 < M.load_checkpoint(path)["minutes"] < 5  # this run's own time
    train(make(3, resume=True))
    assert 0 < M.load_checkpoint(path)["minutes"] < 5  # trained one more step: this run's own time


def test_dmd_resume_restores_everything(run_dir, monkeypatch):
    # 4 generator updates, 2 critic updates each, checkpoint every 2: killed in the critic update of iteration 5
    # (after the generator update of iteration 4, itself after the iteration-4 checkpoint). The EMA starts at
    # update 1, so by the checkpoint it is no longer a copy of the generator and must be restored itself.
    cfg = dmd.Config(init="ar_teacher", num_steps=2, gen_updates=4, critic_ratio=2, batch_size=2, ema_start=1,
                     ema_decay=0.5, ckpt_every=2, eval_every=100, out_dir=str(run_dir))
    killed, resumed = interrupted_then_resumed(
        monkeypatch, dmd.train, cfg, dmd.checkpoint_path(cfg), dmd, "critic_loss", 6,
        ["model", "ema", "ema_started", "critic", "optimizer", "optimizer_critic", "rng", "iteration", "log"])
    assert killed["iteration"] == 4 and resumed["iteration"] == 8 and resumed["ema_started"]
    assert differs(resumed["ema"], resumed["model"])  # the EMA is its own state, not a copy of the generator


# --- bad input: one line, before any work -----------------------------------------------------------------------

def test_resume_with_nothing_to_resume_stops_and_says_so(tmp_path):
    with pytest.raises(M.ConfigError, match="nothing to resume.*drop --resume"):
        ar_teacher.train(tiny_run(tmp_path, phase="base", resume=True))
    for run, cfg in ((ar_teacher.train, tiny_run(tmp_path, phase="ar", resume=True)),  # before the base is read
                     (causal_cd.train, causal_cd.Config(resume=True, out_dir=str(tmp_path))),  # (a broken check
                     (ode_init.train, ode_init.Config(resume=True, out_dir=str(tmp_path))),  # fails fast here:
                     (dmd.train, dmd.Config(resume=True, out_dir=str(tmp_path)))):  # no teacher, base or init)
        with pytest.raises(M.ConfigError, match="nothing to resume"):
            run(cfg)


def test_a_shipped_teacher_cannot_be_resumed_and_the_error_says_why(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    shutil.copy(os.path.join(root, ar_teacher.SHIPPED_DIR, "base.pt"), tmp_path / "base.pt")
    with pytest.raises(M.ConfigError, match="EMA weights only.*--eval-only"):
        ar_teacher.train(tiny_run(tmp_path, phase="base", resume=True))


@pytest.mark.parametrize("spec", ["3", "2,2", "", "two"])
def test_table_steps_must_be_distinct_step_counts_and_say_so_before_any_work(tmp_path, monkeypatch, spec):
    monkeypatch.setattr(dmd, "ensure_stage2", lambda *a: pytest.fail("the table started work before validating"))
    with pytest.raises(M.ConfigError, match="--table-steps must list step counts out of 1, 2, 4"):
        dmd.table(dmd.Config(table=True, table_steps=spec, out_dir=str(tmp_path)))
    assert os.listdir(tmp_path) == []  # nothing trained, nothing written


@pytest.mark.parametrize("spec", ["", "causal_cd,causal_cd", "causal_cd,wan"])
def test_table_inits_must_be_distinct_known_inits_and_say_so_before_any_work(tmp_path, monkeypatch, spec):
    monkeypatch.setattr(dmd, "ensure_stage2", lambda *a: pytest.fail("the table started work before validating"))
    with pytest.raises(M.ConfigError, match="--table-inits must list distinct inits out of bidirectional_ode,"):
        dmd.table(dmd.Config(table=True, table_inits=spec, out_dir=str(tmp_path)))
    assert os.listdir(tmp_path) == []


def test_a_partial_table_makes_only_its_own_missing_stage2_students(tmp_path, monkeypatch):
    made = []
    monkeypatch.setattr(dmd.causal_cd, "train", lambda c: made.append("causal_cd"))
    monkeypatch.setattr(dmd.ode_init, "train", lambda c: made.append(dmd.ode_init.stage_name(c.teacher)))
    dmd.ensure_stage2(dmd.Config(out_dir=str(tmp_path)), ["ar_teacher", "causal_ode"])
    assert made == ["causal_ode"]  # the AR-teacher row needs no student; the other two are not in this table
    dmd.ensure_stage2(dmd.Config(out_dir=str(tmp_path)))
    assert made == ["causal_ode", "causal_cd", "causal_ode", "bidirectional_ode"]  # the whole table: all three


def test_cli_bad_input_is_one_line_and_exit_2_not_a_traceback():
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "dmd.py", "--init", "nope"], cwd=root, capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == "error: --init must be one of bidirectional_ode, ar_teacher, causal_ode, causal_cd " \
                               "(got 'nope')"


@pytest.mark.parametrize("stage, argv, message", [
    (causal_cd, ["--ckpt-every", "0"], "--ckpt-every must be at least 1 (got 0)"),  # was a ZeroDivisionError
    (ar_teacher, ["--batch-size", "0"], "--batch-size must be at least 1 (got 0)"),  # was a "finished" empty run
    (causal_cd, ["--steps", "-1"], "--steps must be at least 1 (got -1)"),
    (ode_init, ["--ema-decay", "2"], "--ema-decay must be between 0 and 1 (got 2.0)"),
    (dmd, ["--lr-critic", "0"], "--lr-critic must be positive (got 0.0)"),
    (dmd, ["--max-t", "1001"], "--max-t must be between 0 and 1000 (got 1001.0)"),
    (causal_cd, ["--device", "nope"], "--device 'nope' is not a compute device: use auto, cpu, cuda, cuda:N or mps"),
    (ode_init, ["--frames-per-block", "4"], "--frames-per-block 4 must divide the 6 frames of a toy clip"),
    (causal_cd, ["--device", "meta"], "--device 'meta' is not a compute device: use auto, cpu, cuda, cuda:N or mps"),
    (ode_init, ["--param-dtype", "float16"], "--param-dtype must be one of ['bfloat16', 'float32'] (got 'float16')"),
    (ar_teacher, ["--dry-run", "--optimizer", "sgd"], "--optimizer must be 'adamw' or 'lean' (got 'sgd')"),
    (causal_cd, ["--out-dir", os.path.abspath(__file__)], f"--out-dir {os.path.abspath(__file__)} is a file; give the "
                                                          f"folder checkpoints go to"),
    (ar_teacher, ["--model", "nope"], "--model 'nope' is not a preset: use one of wan2.1-1.3b, wan2.1-14b, toy, wan-tiny"),
    (dmd, ["--seed", str(10 ** 20)], f"--seed must be between 0 and 2^32 - 1 (got {10 ** 20})"),  # was an overflow
    (dmd, ["--lr", "abc"], "argument --lr: invalid float value: 'abc' (--help lists every flag)"),  # not the usage block
])
def test_a_bad_flag_value_is_one_line_and_exit_2_while_the_flags_are_read(stage, argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        M.parse_config(stage.Config, argv)
    assert stop.value.code == 2 and capsys.readouterr().err == f"error: {message}\n"


def test_flags_that_contradict_each_other_are_refused_before_any_work(tmp_path):
    for run, stage, argv, message in [
        (ar_teacher.evaluate_only, ar_teacher, ["--phase", "nope", "--eval-only"], "--phase must be 'base' or 'ar'"),
        (ar_teacher.train, ar_teacher, ["--dry-run", "--phase", "ar", "--shift", "5"], "--shift sets the base's"),
        (ode_init.train, ode_init, ["--dry-run", "--teacher", "ar", "--noisy-prefix"], "--noisy-prefix is an "
                                                                                       "ablation of the bidirectional"),
        (dmd.train, dmd, ["--dry-run", "--real-score", "exact"], "CFG would push past it: add --real-guidance 1"),
        (dmd.train, dmd, ["--dry-run", "--init", "nope"], "--init must be one of"),  # the dry run checks them too
        (dmd.table, dmd, ["--table", "--init", "causal_ode", "--table-steps", "3"],  # a broken check: the next one fires
         "--init / --num-steps pick one DMD run"),
        (ar_teacher.train, ar_teacher, ["--dry-run", "--phase", "base", "--diffusion-forcing"], "an ablation of the AR"),
        (ar_teacher.train, ar_teacher, ["--dry-run", "--phase", "ar", "--plain-base", "x.pt"], "it needs --phase base"),
        (ar_teacher.evaluate_only, ar_teacher, ["--eval-only", "--ship"], "--eval-only trains nothing: drop one"),
        (dmd.train, dmd, ["--dry-run", "--table-steps", "2"], "--table-steps shape the toy Table 2: add --table"),
    ]:  # --dry-run: a check that broke would print a plan and fail here, not start a training run
        with pytest.raises(M.ConfigError, match=message):
            run(M.parse_config(stage.Config, argv + ["--out-dir", str(tmp_path)]))
    assert os.listdir(tmp_path) == []


def test_a_gpu_this_machine_lacks_is_refused_before_any_work(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as stop:
        M.parse_config(dmd.Config, ["--device", "cuda"])
    assert stop.value.code == 2
    assert capsys.readouterr().err == "error: --device cuda: this PyTorch sees no CUDA device here; use --device cpu (or auto)\n"
    assert M.pick_device("auto").type in ("cpu", "mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(M.ConfigError, match=r"--device cuda:3: this machine has 1 CUDA device\(s\), numbered from 0"):
        M.pick_device("cuda:3")


def test_every_stages_defaults_are_in_range_and_every_checked_option_exists():
    import dataclasses
    for stage in (ar_teacher, ode_init, causal_cd, dmd):
        for argv in ([], ["--actions"]):
            assert M.parse_config(stage.Config, argv) == stage.Config(actions=bool(argv))
    fields = {f.name for stage in (ar_teacher, ode_init, causal_cd, dmd) for f in dataclasses.fields(stage.Config)}
    assert {name for names, _, _ in wan_scale.OPTION_RANGES for name in names} <= fields  # a misspelt name checks nothing


def test_every_flag_of_every_stage_has_a_help_text():
    import dataclasses
    for stage in (ar_teacher, ode_init, causal_cd, dmd):
        helps = M.field_help(stage.Config)
        assert [f.name for f in dataclasses.fields(stage.Config) if not helps.get(f.name, "").strip()] == [], stage


def test_help_shows_each_flag_with_its_dataclass_comment_and_default(capsys):
    with pytest.raises(SystemExit):
        M.parse_config(ar_teacher.Config, ["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "--base-steps BASE_STEPS optimizer steps of --phase base (with --actions: world_steps) (default: 7000)" in text
    assert "--eval-clips EVAL_CLIPS clips of the final evaluation (8 per prompt). More clips on a finished run: " \
           "--eval-only --eval-clips 288" in text  # with the comment line that continues it
