"""tests/mutants.py — does the test suite catch real bugs? A curated list of one-line mutants (the bug classes an
audit planted, and more), each applied alone to a temporary copy of the repository, with the tests run there.

A mutant is *killed* when the tests fail with it and *survives* when they pass; a survivor is a bug the suite
cannot see. A mutant whose original text is no longer found exactly once is an *error*: the list must be updated
with the code, so it cannot rot silently. Not collected by pytest (no test_ prefix); importing it does nothing.

    python tests/mutants.py --list                         # the mutants, one a line
    python tests/mutants.py --fast --only cd_no_euler,dmd_critic_target_sign   # chosen ones, on their test files
    python tests/mutants.py --fast                         # every mutant on its own test files (minutes)
    python tests/mutants.py                                # every mutant on the whole suite (long: tens of minutes)

The copy leaves out .git, runs/, checkpoints/ and caches; children run with OMP_NUM_THREADS=1 and without
bytecode caches (a mutated file can have the original's size and mtime second). A timeout counts as killed and
is shown as such. --baseline first checks that the unmutated copy passes (otherwise every mutant is "killed").
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import namedtuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
Mutant = namedtuple("Mutant", "name file original replacement tests")

L, R, E, W = "tests/test_losses.py", "tests/test_resume.py", "tests/test_equivalences.py", "tests/test_world.py"
D, FS = "tests/test_distributed.py", "tests/test_fast_stream.py"

MUTANTS = [
    # --- the losses -------------------------------------------------------------------------------------------
    Mutant("fm_target_sign", "ar_teacher.py", "per_frame = (v - (eps - x0)).pow(2)",
           "per_frame = (v - (x0 - eps)).pow(2)", [L]),
    Mutant("fm_weight_ignored", "ar_teacher.py", "per_frame = loss_weight(t.cpu(), shift).to(v.device) * per_frame",
           "per_frame = per_frame", [L]),
    Mutant("bell_weight_wrong", "model.py", "bell = lambda u: torch.exp(-2 * ((u - 500) / 1000) ** 2)",
           "bell = lambda u: torch.exp(-1 * ((u - 500) / 1000) ** 2)", [L, "tests/test_model.py"]),
    Mutant("cd_no_euler", "causal_cd.py", "x_next = euler_step(x_t, v, t, t_next)", "x_next = x_t", [L]),
    Mutant("cd_no_cfg", "causal_cd.py", "v = cfg_velocity(teacher, x_t, tt, ctx, ctx_null, guidance, **tf)",
           "v = teacher(x_t, tt, ctx, **tf)", [L]),
    Mutant("cd_target_at_t", "causal_cd.py", "ema(x_next, tt_next, ctx, **tf)", "ema(x_next, tt, ctx, **tf)", [L]),
    Mutant("cd_target_from_student", "causal_cd.py", "ema(x_next, tt_next, ctx, **tf)",
           "student(x_next, tt_next, ctx, **tf)", [L]),
    Mutant("ode_ar_no_clean_context", "ode_init.py",
           "path = dict(clean=x0_gt, frames_per_block=frames_per_block) if teacher_kind == \"ar\" else",
           "path = dict(frames_per_block=frames_per_block) if teacher_kind == \"ar\" else", [L]),
    Mutant("pair_loss_skips_pure_noise", "ode_init.py", "for k in range(4):  # the 4 noisy points",
           "for k in range(1, 4):  # the 4 noisy points", [L]),
    Mutant("unseen_pairs_are_the_training_pairs", "ode_init.py",
           "unseen=pair_loss(ema, unseen, cfg.teacher, cfg.frames_per_block))",
           "unseen=pair_loss(ema, pairs, cfg.teacher, cfg.frames_per_block, cfg.unseen_pairs))",
           ["tests/test_stage2.py"]),
    Mutant("unseen_clips_not_excluded", "ode_init.py", "if len(keep) < n and x.numpy().tobytes() not in seen:",
           "if len(keep) < n:", ["tests/test_stage2.py"]),
    Mutant("dmd_g_sign", "dmd.py", "g = torch.nan_to_num((x0_fake - x0_real) / norm)",
           "g = torch.nan_to_num((x0_real - x0_fake) / norm)", [L]),
    Mutant("dmd_real_score_no_cfg", "dmd.py", "cfg_velocity(real, x_t, t, ctx, ctx_null, guidance, actions=actions)",
           "real(x_t, t, ctx, actions=actions)", [L]),
    Mutant("dmd_critic_target_sign", "dmd.py", "return (critic(x_t, t, ctx, actions=actions) - (eps - x)).pow(2)",
           "return (critic(x_t, t, ctx, actions=actions) - (x - eps)).pow(2)", [L]),
    Mutant("dmd_critic_fit_inverted", "dmd.py", "ratios.append((loss[0] / loss[1]).item() - 1)",
           "ratios.append((loss[1] / loss[0]).item() - 1)", [L]),
    Mutant("dmd_critic_fit_one_noise", "dmd.py", "eps = torch.randn(x.shape, generator=g).to(x.device)\n        tt",
           "eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(x.device)\n        tt", [L]),
    # --- the updates ------------------------------------------------------------------------------------------
    Mutant("ema_decay_inverted", "model.py", "p_ema.lerp_(p, 1 - decay)", "p_ema.lerp_(p, decay)", [L]),
    Mutant("lean_no_momentum_bias_correction", "wan_scale.py", "g = m / (1 - b1 ** n)", "g = m", [L]),
    Mutant("lean_no_second_moment_bias_correction", "wan_scale.py", "update = g / ((v / (1 - b2 ** n)).sqrt() + eps)",
           "update = g / (v.sqrt() + eps)", [L]),
    Mutant("lean_no_weight_decay", "wan_scale.py", "w.mul_(1 - lr * wd).add_(update, alpha=-lr)",
           "w.add_(update, alpha=-lr)", [L]),
    # --- the schedule -----------------------------------------------------------------------------------------
    Mutant("add_noise_swapped", "model.py", "return (1 - s) * x0 + s * eps", "return s * x0 + (1 - s) * eps",
           [L, "tests/test_model.py"]),
    Mutant("x0_from_v_sign", "model.py", "return x_t - _sigma(t, x_t) * v", "return x_t + _sigma(t, x_t) * v",
           [L, "tests/test_model.py"]),
    Mutant("euler_step_sign", "model.py", "return x_t - (_sigma(t, x_t) - _sigma(t_next, x_t)) * v",
           "return x_t + (_sigma(t, x_t) - _sigma(t_next, x_t)) * v", [L, "tests/test_model.py"]),
    Mutant("time_embedding_sin_first", "model.py",
           "return torch.cat([torch.cos(args), torch.sin(args)], dim=-1).float()",
           "return torch.cat([torch.sin(args), torch.cos(args)], dim=-1).float()", ["tests/test_model.py"]),
    # --- the DiT block and head -------------------------------------------------------------------------------
    Mutant("adaln_attn_shift_scale_swapped", "model.py", "modulate(self.norm1(x), m0, m1, nF)",
           "modulate(self.norm1(x), m1, m0, nF)", [E]),
    Mutant("adaln_ffn_shift_scale_swapped", "model.py", "modulate(self.norm2(x), m3, m4, nF)",
           "modulate(self.norm2(x), m4, m3, nF)", [E]),
    Mutant("attn_gate_is_ffn_gate", "model.py", "x = x + gate(y.float(), m2, nF)", "x = x + gate(y.float(), m5, nF)",
           [E]),
    Mutant("cross_attn_norm_without_affine", "model.py", "self.cross_attn(self.norm3(x), context, cross_kv)",
           "self.cross_attn(self.norm2(x), context, cross_kv)", [E]),
    Mutant("head_shift_scale_swapped", "model.py", "modulate(self.norm(x), h0, h1, e.shape[1])",
           "modulate(self.norm(x), h1, h0, e.shape[1])", [E]),
    # --- initialisation and stage-1 inputs --------------------------------------------------------------------
    Mutant("stages_load_raw_weights_not_ema", "ar_teacher.py",
           "return model_from_checkpoint(ckpt, key=\"ema\", device=device).eval(), ckpt",
           "return model_from_checkpoint(ckpt, key=\"model\", device=device).eval(), ckpt", [R]),
    Mutant("ar_weighting_swapped", "ar_teacher.py", "== \"bell\"", "!= \"bell\"", [R]),
    Mutant("teacher_forcing_without_clean_context", "ar_teacher.py", "path_kw = dict(clean=x0, frames_per_block=fpb)",
           "path_kw = dict(frames_per_block=fpb)", [R]),
    Mutant("cd_target_network_from_base", "causal_cd.py", "ema = copy.deepcopy(teacher)",
           "ema = ar_teacher.load_teacher(cfg.out_dir, \"base\", device=device)[0]", [R]),
    Mutant("dmd_critic_from_generator", "dmd.py", "critic = prepare(copy.deepcopy(real),",
           "critic = prepare(copy.deepcopy(generator),", [R]),
    # --- resume -----------------------------------------------------------------------------------------------
    Mutant("ar_resume_no_ema", "ar_teacher.py", "load_whole(ema, ckpt[\"ema\"])", "None", [R]),
    Mutant("ar_resume_no_noise_rng", "ar_teacher.py", "noise_gen.set_state(ckpt[\"noise_gen\"])", "None", [R]),
    Mutant("ode_resume_no_rng", "ode_init.py", "gen.set_state(ckpt[\"gen\"])", "None", [R]),
    Mutant("cd_resume_no_rng", "causal_cd.py", "data_gen.set_state(ckpt[\"data_gen\"])", "None", [R]),
    Mutant("cd_resume_no_ema", "causal_cd.py",
           "load_whole(student, ckpt[\"model\"]), load_whole(ema, ckpt[\"ema\"])",
           "load_whole(student, ckpt[\"model\"])", [R]),
    Mutant("dmd_resume_no_critic_optimizer", "dmd.py", ", load_whole_optimizer(opt_c, ckpt[\"optimizer_critic\"])", "",
           [R]),
    Mutant("dmd_resume_no_ema", "dmd.py", "load_whole(ema, ckpt[\"ema\"])", "None", [R]),
    Mutant("dmd_resume_no_rng", "dmd.py", "gen.set_state(ckpt[\"rng\"])", "None", [R]),
    Mutant("eval_only_resume_takes_the_eval_time", "model.py",
           "if not trained and ckpt is not None and \"minutes\" in ckpt:", "if False:", [R]),
    Mutant("partial_resume_takes_no_time", "model.py",
           "if not trained and ckpt is not None and \"minutes\" in ckpt:", "if not trained and ckpt is not None:", [R]),
    # --- sampling, I2V, evaluator, speed ----------------------------------------------------------------------
    Mutant("stream_no_refresh", "sample_stream.py", "model(x0_hat.detach(), torch.zeros(",
           "(lambda *a, **k: None)(x0_hat.detach(), torch.zeros(", ["tests/test_stage3.py"]),
    Mutant("i2v_image_not_written", "sample_stream.py",
           "self.forward(frames, t0, self.ctx, cache=self.cache, start_frame=self.frame, actions=actions)", "None", [E]),
    Mutant("evaluator_ignores_reference", "toy_data.py",
           "ref = default_reference(clips.shape[1], actions is not None) if reference is None else reference",
           "ref = default_reference(clips.shape[1], actions is not None)", [E]),
    Mutant("recache_is_a_no_op", "sample_stream.py", "        if recache:  # LongLive",
           "        if False:  # LongLive", ["tests/test_stage3.py"]),
    Mutant("recache_keeps_evicted_frames", "sample_stream.py",
           "self.held = {f: x for f, x in self.held.items() if f in kept}", "self.held = dict(self.held)",
           ["tests/test_stage3.py"]),
    Mutant("action_report_ignores_walls", "toy_data.py",
           "want = torch.clamp(pos[:, :-1] + ACTION_STEPS[actions[:, 1:]], lo, hi) - pos[:, :-1]",
           "want = ACTION_STEPS[actions[:, 1:]]", ["tests/test_toy_data.py"]),
    Mutant("action_embedding_not_zero_init", "model.py", "            nn.init.zeros_(self.action_embedding.weight)",
           "            pass", ["tests/test_model.py"]),
    Mutant("cache_speedup_inverted", "sample_stream.py", "cache_speedup=res[\"fps\"] / (frames / best)",
           "cache_speedup=(frames / best) / res[\"fps\"]", [E]),
    Mutant("cache_speedup_printed_inverted", "sample_stream.py", "{s['cache_speedup']:.1f}x",
           "{1 / s['cache_speedup']:.1f}x", [E]),
    Mutant("per_frame_latency_ignores_block_size", "sample_stream.py",
           "per_frame_s=sum(later) / (len(later) * frames_per_block)", "per_frame_s=sum(later) / len(later)", [E]),
    # --- the world model: each frame's action, wherever a model is called ----------------------------------------
    Mutant("stream_every_block_gets_the_first_actions", "sample_stream.py",
           "a = None if actions is None else actions[:, s:s + frames_per_block]",
           "a = None if actions is None else actions[:, :frames_per_block]", [W]),
    Mutant("ar_sampler_block_actions_shifted", "sample_stream.py",
           "return None if actions is None else two(actions[:, start:start + frames_per_block])",
           "return None if actions is None else two(actions[:, max(0, start - 1):max(0, start - 1) + frames_per_block])",
           [W]),
    Mutant("recompute_actions_of_the_wrong_frames", "sample_stream.py",
           "a = None if actions is None else actions[:, :s + frames_per_block]",
           "a = None if actions is None else actions[:, -(s + frames_per_block):]", [W]),
    Mutant("recache_drops_held_actions", "sample_stream.py", "start_frame=start, actions=actions)\n",
           "start_frame=start, actions=torch.zeros_like(actions))\n", [W]),
    Mutant("cd_loss_ignores_actions", "causal_cd.py",
           "tf = dict(clean=x0, frames_per_block=frames_per_block, actions=actions)",
           "tf = dict(clean=x0, frames_per_block=frames_per_block, actions=torch.zeros_like(actions))", [W]),
    Mutant("ode_loss_ignores_actions", "ode_init.py", "        path[\"actions\"] = actions",
           "        path[\"actions\"] = torch.zeros_like(actions)", [W]),
    Mutant("dmd_fake_score_ignores_actions", "dmd.py", "x0_fake = x0_from_v(x_t, critic(x_t, t, ctx, actions=actions), t)",
           "x0_fake = x0_from_v(x_t, critic(x_t, t, ctx, actions=torch.zeros_like(actions)), t)", [W]),
    Mutant("keys_steer_swaps_axes", "sample_stream.py",
           "v, h = (key, h) if key in (\"up\", \"down\") else (v, key)",
           "v, h = (v, key) if key in (\"up\", \"down\") else (key, h)", [W]),
    # --- torchrun + FSDP2: N processes compute what one does ------------------------------------------------------
    Mutant("fsdp_noise_drawn_per_process", "wan_scale.py",
           "return self(torch.randn((shape[0] * self.world, *shape[1:]), generator=generator))",
           "return torch.randn(shape, generator=generator)", [D]),
    Mutant("fsdp_every_process_takes_the_first_rows", "wan_scale.py",
           "return x[self.rank * n:(self.rank + 1) * n]", "return x[:n]", [D]),
    Mutant("fsdp_loss_logged_for_process_0_only", "ar_teacher.py",
           "history.append(mean_over_processes(loss.item(), part))", "history.append(loss.item())", [D]),
    # --- the bidirectional-ODE recipe and the exposure-bias / exact-denoiser measurements ------------------------
    Mutant("ode_bidir_loss_not_masked", "ode_init.py", "return (x0_hat[mask] - states[:, -1][mask]).pow(2).mean()",
           "return (x0_hat - states[:, -1]).pow(2).mean()", ["tests/test_stage2.py"]),
    Mutant("ode_bidir_never_clean", "ode_init.py", "n_points = 4 if teacher_kind == \"ar\" or noisy_prefix else 5",
           "n_points = 4", ["tests/test_stage2.py"]),
    Mutant("own_step_no_bounce", "toy_data.py",
           "pred = torch.where(pred > hi, 2 * hi - pred, torch.where(pred < lo, 2 * lo - pred, pred))", "pred = pred",
           ["tests/test_toy_data.py"]),
    Mutant("exact_x0_ignores_the_past", "toy_data.py",
           "ok = match[:, i - 1] == i if i > 0 else torch.ones(len(X), dtype=torch.bool)",
           "ok = torch.ones(len(X), dtype=torch.bool)", ["tests/test_toy_data.py"]),
    Mutant("exact_x0_wrong_noise_scale", "toy_data.py", "w = torch.softmax(-d2.sum(1) / (2 * s[b] ** 2), 0)",
           "w = torch.softmax(-d2.sum(1) / (2 * s[b]), 0)", ["tests/test_toy_data.py"]),
    Mutant("exact_x0_frames_alone_pools_frames", "toy_data.py",
           "w = torch.softmax(-d2 / (2 * s[b] ** 2), 0)  # (K, F)",
           "w = torch.softmax(-d2.sum(1, keepdim=True) / (2 * s[b] ** 2), 0).expand_as(d2)  # (K, F)",
           ["tests/test_toy_data.py"]),
    Mutant("option_ranges_not_checked", "wan_scale.py", "if hasattr(self, name) and not allowed(getattr(self, name)):",
           "if False:", ["tests/test_resume.py"]),
    Mutant("stream_negative_sink_accepted", "sample_stream.py", "    if args.sink < 0:", "    if False:",
           ["tests/test_stage3.py"]),
    Mutant("stream_out_folder_accepted", "sample_stream.py",
           "if os.path.isdir(args.out) or (os.path.exists(out_dir) and not os.path.isdir(out_dir)):", "if False:",
           ["tests/test_stage3.py"]),
    Mutant("dmd_dry_run_skips_the_init_check", "dmd.py", "    if cfg.init not in INITS:", "    if False:",
           ["tests/test_resume.py"]),
    Mutant("exact_score_ignores_the_clean_past", "toy_data.py",
           "past = None if clean is None else clean.float().cpu()", "past = None", ["tests/test_stage2.py"]),
    Mutant("dmd_table_steps_ignored", "dmd.py",
           'if not set(parts) <= {"1", "2", "4"} or len(set(parts)) != len(parts):', "if False:",
           ["tests/test_resume.py"]),
    Mutant("step_report_width_only", "toy_data.py", "resized = (size[:, 1:] != size[:, :-1]).any(-1)",
           "resized = size[:, 1:, 1] != size[:, :-1, 1]", ["tests/test_toy_data.py"]),
    Mutant("true_box_one_axis", "toy_data.py", "return (box_size(clips) == want).all(-1).float().mean(0)",
           "return (box_size(clips) == want).any(-1).float().mean(0)", ["tests/test_toy_data.py"]),
    Mutant("own_step_rigid_one_axis", "toy_data.py",
           "rigid = ((size[:, 2:] == size[:, 1:-1]) & (size[:, 1:-1] == size[:, :-2])).all(-1)",
           "rigid = ((size[:, 2:] == size[:, 1:-1]) & (size[:, 1:-1] == size[:, :-2])).any(-1)",
           ["tests/test_toy_data.py"]),
    Mutant("own_step_rigid_two_frames", "toy_data.py",
           "rigid = ((size[:, 2:] == size[:, 1:-1]) & (size[:, 1:-1] == size[:, :-2])).all(-1)",
           "rigid = (size[:, 2:] == size[:, 1:-1]).all(-1)", ["tests/test_toy_data.py"]),
    Mutant("resume_ignores_changed_settings", "model.py", "    if differ:\n        raise ConfigError(f\"--resume: {src} was",
           "    if False:\n        raise ConfigError(f\"--resume: {src} was", [R]),
    Mutant("pairs_of_another_count_reused", "ode_init.py", "stored=STORED, num_pairs=cfg.num_pairs)",
           "stored=STORED)", ["tests/test_stage2.py"]),
    Mutant("table_makes_frame_wise_students", "dmd.py",
           "same = dict(out_dir=cfg.out_dir, frames_per_block=cfg.frames_per_block, device=cfg.device)",
           "same = dict(out_dir=cfg.out_dir)", ["tests/test_stage3.py"]),
    Mutant("missing_dmd_checkpoint_names_causal_cd", "sample_stream.py", "    if dmd:\n        return f\"python dmd.py",
           "    if False:\n        return f\"python dmd.py", ["tests/test_stage3.py"]),
    Mutant("drift_windows_not_whole_blocks", "sample_stream.py",
           "for window, sink in ((None, 0), (w, 0), (w, fpb)) + (((2, 0),) if fpb == 1 else ()):",
           "for window, sink in ((None, 0), (5, 0), (5, 1), (2, 0)):", ["tests/test_stage3.py"]),
    Mutant("action_script_sets_no_length", "sample_stream.py",
           "(len(script) - len(script) % fpb if script is not None else 48)", "48", [W]),
    # --- the static streaming step (wan_scale.FastStep) ------------------------------------------------------------
    Mutant("fast_rope_position_off", "wan_scale.py", "frame_pos.copy_(torch.arange(start_frame, start_frame + nF))",
           "frame_pos.copy_(torch.arange(start_frame, start_frame + nF) + 1)", [FS]),
    Mutant("fast_writes_stale_slots", "wan_scale.py", "        write.copy_(c.write_tokens)\n", "", [FS]),
    Mutant("fast_sees_the_whole_buffer", "wan_scale.py", "            n_keys = c.visible_tokens.stop",
           "            n_keys = c.num_slots * tpf", [FS]),
    Mutant("fast_mask_not_cleared", "wan_scale.py", "            self.mask.zero_()\n", "", [FS]),
    Mutant("fast_prompt_switch_ignored", "wan_scale.py", "        if context is not self.context:",
           "        if self.context is None:", [FS]),
]


def copy_repo(dest):
    shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(".git", "runs", "checkpoints", "__pycache__",
                                                              ".pytest_cache", "outputs", "*.tmp"))


def run_tests(repo, files, timeout):
    """(outcome, seconds): 'passed' / 'failed' / 'timeout' of pytest -x in `repo` on `files` (all when empty)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *files]
    t0 = time.time()
    try:
        rc = subprocess.run(cmd, cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        return "timeout", time.time() - t0
    return ("passed" if rc == 0 else "failed"), time.time() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fast", action="store_true", help="run each mutant only on its own test files")
    p.add_argument("--only", default="", help="comma-separated mutant names")
    p.add_argument("--timeout", type=float, default=None, help="seconds per mutant (default 120 fast, 900 full)")
    p.add_argument("--baseline", action="store_true", help="first check that the unmutated copy passes")
    p.add_argument("--list", action="store_true", help="print the mutants and exit")
    args = p.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    unknown = set(names) - {m.name for m in MUTANTS}
    if unknown:
        p.error(f"unknown mutants {sorted(unknown)}; see --list")
    chosen = [m for m in MUTANTS if not names or m.name in names]
    if args.list:
        for m in chosen:
            print(f"{m.name:40s} {m.file:18s} {' '.join(m.tests)}")
        return 0
    timeout = args.timeout or (120 if args.fast else 900)

    with tempfile.TemporaryDirectory(prefix="mutants_") as tmp:
        repo = os.path.join(tmp, "repo")
        copy_repo(repo)
        if args.baseline:
            files = sorted({f for m in chosen for f in m.tests}) if args.fast else []
            outcome, secs = run_tests(repo, files, timeout)
            print(f"baseline (no mutant): {outcome} in {secs:.0f} s")
            if outcome != "passed":
                return 2
        print(f"{'mutant':40s} {'result':10s} {'seconds':>8s}")
        killed, rows = 0, []
        for m in chosen:
            path = os.path.join(repo, m.file)
            with open(path) as f:
                source = f.read()
            n = source.count(m.original)
            if n != 1:
                rows.append((m.name, "error", 0.0))
                print(f"{m.name:40s} {'ERROR':10s} {0:8.1f}  original text found {n} times in {m.file}")
                continue
            with open(path, "w") as f:
                f.write(source.replace(m.original, m.replacement))
            try:
                outcome, secs = run_tests(repo, m.tests if args.fast else [], timeout)
            finally:
                with open(path, "w") as f:
                    f.write(source)
            result = {"failed": "killed", "timeout": "killed (timeout)", "passed": "SURVIVED"}[outcome]
            killed += outcome != "passed"
            rows.append((m.name, result, secs))
            print(f"{m.name:40s} {result:10s} {secs:8.1f}", flush=True)
        errors = sum(r[1] == "error" for r in rows)
        print(f"score: {killed}/{len(chosen)} killed" + (f" ({errors} errors: original text not found)" if errors else ""))
    return 0 if killed == len(chosen) else 1


if __name__ == "__main__":
    sys.exit(main())
