"""
ode_init.py — stage 2a: ODE distillation into a few-step causal student, from either teacher, and the
frame-level injectivity demonstration (`injectivity.png`).

Two teachers, one recipe (store the teacher's PF-ODE trajectory, regress the student's x0 prediction at a few
points of it onto its endpoint):

  --teacher ar              Causal Forcing (§3.2, "causal ODE distillation"). The AR teacher's 48-step Euler
                            PF-ODE with CFG runs with the *ground-truth* clip as clean context (model.py path 2,
                            all frames in parallel), so frame i's trajectory depends only on frame i's noise and
                            the true frames < i. The student (init: the AR teacher) sees the same clean context.
                            -> checkpoints/causal_ode.pt
  --teacher bidirectional   CausVid / Self Forcing ODE init. The bidirectional base's PF-ODE on whole clips; the
                            causal student (init: the base, as those methods start from Wan) sees the same
                            trajectory under a block-causal mask, each block at its own stored point drawn
                            over the 4-step list *and the clean endpoint*, so past blocks are clean part of
                            the time as the KV cache is at inference; the loss skips blocks at t = 0 (Self
                            Forcing model/ode_regression.py; CausVid ode_regression.py).
                            -> checkpoints/bidirectional_ode.pt
  --teacher bidirectional --noisy-prefix   the same without the clean endpoint among the draws: the student never
                            sees a clean past in training but always does at inference (the mismatch of
                            Prop. 3.4 stacked on the injectivity failure; an ablation, not an official
                            recipe; this repository's default before it was checked against the official code).
                            -> checkpoints/bidirectional_ode_noisy_prefix.pt

Why the second one fails (Causal Forcing Lemma 3.2 / Prop. 3.3): the bidirectional endpoint of frame i depends on
the noise of *future* frames, which the causal student cannot see. The best it can do under an MSE loss is the
conditional expectation E[x0^i | x_t^{<=i}]: an average over futures, i.e. a blurred frame whose second moment
is strictly below the data's. The AR teacher's ODE is frame-level injective (one noisy frame, given the clean
past, maps to one clean frame), so its pairs are learnable exactly. `python ode_init.py --plot` measures all of
this on the toy and draws it, next to the exact two-scalar miniature of SPEC §5.

Differences from the official code: pairs are generated on the fly into one small file instead of an LMDB, the
toy uses its own learning rate and an EMA of the student for sampling, and the bidirectional student starts
from the toy base rather than from Wan2.1. The toy makes 384 pairs; the official release regresses 6K pairs for
>= 1K steps of 64 (>= 10 passes; the toy's 600 steps of 16 are 25). Stored pairs can be memorised: every toy run
ends by printing the regression loss on its own pairs beside the loss on unseen ones (--unseen-pairs), and
docs/RESULTS.md (Stage 2) measures what more pairs change.

Commands (toy, CPU; times in the README):
    python ode_init.py --teacher ar               # pairs + causal-ODE student
    python ode_init.py --teacher bidirectional    # pairs + bidirectional-ODE student
    python ode_init.py --teacher bidirectional --noisy-prefix   # the ablation, on the same pairs
    python ode_init.py --teacher bidirectional --exact-teacher --guidance 1   # pairs from the toy's data law itself
    python ode_init.py --plot                     # injectivity.png (--train-missing: train a missing student)
    python ode_init.py --actions --plot           # the world teachers' future-resampling variance (assets/)
    python ode_init.py --teacher ar --data LATENT_DIR --num-pairs 8 ...   # Wan scale (README)
"""
import copy
import os
import time
from dataclasses import dataclass, asdict

import torch
from tqdm import tqdm

import toy_data
from ar_teacher import load_base, load_teacher
from model import (ConfigError, ModelConfig, autocast, ema_update, load_checkpoint, model_from_checkpoint,
                   parse_config, pick_device, run_main, run_minutes, save_checkpoint, save_run, start_run, warped_steps,
                   x0_from_v)
from wan_scale import (RUN_PLACE, Part, ScaleOptions, check_actions, dry_run, gather_rows, limit_memory, load_whole,
                       load_whole_optimizer, make_optimizer, mean_over_processes, on_main, open_data, prepare,
                       report_memory, run_flags, shard, start_distributed, sum_over_processes, whole)
from sample_stream import (cfg_velocity, ode_grid, sample_ar, sample_bidirectional, sample_stream,
                           toy_few_step_report, toy_few_step_samples)

STORED = [0, 12, 24, 36, 48]  # trajectory points kept: the 4-step list's t (48-grid indices 0/12/24/36) + endpoint
FIGURE_STEPS = 48  # Euler steps of the teachers' PF-ODEs in the injectivity figure (the ODE pairs' grid)


@dataclass
class Config(ScaleOptions):  # ScaleOptions (wan_scale.py): --data / --model / --init-weights and the memory options
    teacher: str = "ar"  # "ar" (causal ODE, Causal Forcing) or "bidirectional" (CausVid / Self Forcing init)
    frames_per_block: int = 1  # 1 = frame-wise, 3 = chunk-wise (the AR teacher must match)
    num_pairs: int = 384  # ODE trajectories to generate (one per ground-truth clip)
    guidance: float = 6.0  # CFG weight of the teacher's PF-ODE (official ODE-data default: 6)
    steps: int = 600  # student optimizer steps
    batch_size: int = 16  # pairs per optimizer step
    lr: float = 3e-4  # AdamW learning rate, after a linear warm-up
    warmup: int = 50  # warm-up steps (0: none)
    ema_decay: float = 0.99  # EMA of the student's weights: the weights that are sampled and saved for stage 3
    eval_clips: int = 72  # clips of the closing evaluation (8 per prompt)
    ckpt_every: int = 200  # atomic checkpoint every this many steps
    out_dir: str = "checkpoints"  # where checkpoints and sample GIFs go (later stages read theirs here)
    seed: int = 0  # seeds pairs and training (the weights start from the teacher): the same seed on a CPU, the same run
    device: str = "auto"  # auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps
    resume: bool = False  # continue this run from its last checkpoint (X.partial.pt, else X.pt), exactly
    plot: bool = False  # make injectivity.png from both ODE students (about 3 min on a 2-core CPU)
    train_missing: bool = False  # --plot: train a missing ODE student first (3-7 min each) instead of stopping
    per_frame: bool = False  # print second moment and blur per frame index of the students and their targets
    noisy_prefix: bool = False  # bidirectional: the ablation whose past blocks are never clean in training (k in
    # 0..3 per block) -> bidirectional_ode_noisy_prefix.pt; default: the official recipe, clean past included
    exact_teacher: bool = False  # toy only: the pairs come from the toy's exact data law (toy_data.ExactScore, the
    # teacher's question answered perfectly; with --guidance 1) instead of the trained teacher, which the student
    # still starts from -> *_exact.pt: the injectivity failure with no teacher error (docs/RESULTS.md)
    unseen_pairs: int = 32  # toy: after training, the regression loss on this many new pairs (clips not among its
    # pairs', new noise) beside the loss on as many of its training pairs: far lower on its own = memorised pairs;
    # under 1 min; 0: skip


def stage_name(teacher):
    return {"ar": "causal_ode", "bidirectional": "bidirectional_ode"}[teacher]


def student_path(cfg):
    suffix = "" if cfg.frames_per_block == 1 else f"_fpb{cfg.frames_per_block}"
    if cfg.teacher == "bidirectional" and cfg.noisy_prefix:
        suffix = "_noisy_prefix" + suffix
    return os.path.join(cfg.out_dir, stage_name(cfg.teacher) + ("_exact" if cfg.exact_teacher else "") + suffix + ".pt")


def pairs_path(cfg):
    suffix = ("_exact" if cfg.exact_teacher else "") + ("" if cfg.frames_per_block == 1 else f"_fpb{cfg.frames_per_block}")
    return os.path.join(cfg.out_dir, f"ode_pairs_{cfg.teacher}{suffix}.pt")


def make_command(cfg):
    return f"python ode_init.py --teacher {cfg.teacher}" + (
        f" --frames-per-block {cfg.frames_per_block}" if cfg.frames_per_block != 1 else "") + (
        " --noisy-prefix" if cfg.teacher == "bidirectional" and cfg.noisy_prefix else "") + (
        " --exact-teacher --guidance 1" if cfg.exact_teacher else "") + run_flags(cfg)


# -----------------------------------------------------------------------------------------------------------
# ODE pairs


@torch.no_grad()
def causal_ode_trajectory(teacher, x0_gt, eps, ctx, ctx_null, guidance, frames_per_block, actions=None):
    """The AR teacher's 48-step Euler PF-ODE with CFG and the ground-truth clip as clean context, all frames in
    parallel through the teacher-forcing path (equal to running block by block with the true blocks written to
    the KV cache at t = 0), under the clip's actions for a world model. Returns the states at the 48-grid points
    in STORED: (B, 5, F, C, H, W)."""
    grid = ode_grid(teacher, 48)
    x, states = eps, [eps]
    for t, t_next in zip(grid[:-1], grid[1:]):
        tt = torch.full(x.shape[:2], t, device=x.device)
        v = cfg_velocity(teacher, x, tt, ctx, ctx_null, guidance, clean=x0_gt, frames_per_block=frames_per_block,
                         actions=actions)
        x = x - (t - t_next) / 1000 * v  # Euler: x_t' = x_t - (s - s') v
        states.append(x)
    return torch.stack([states[i] for i in STORED], dim=1)


@torch.no_grad()
def bidirectional_ode_trajectory(teacher, eps, ctx, ctx_null, guidance, actions=None):
    """The bidirectional teacher's 48-step Euler PF-ODE with CFG on whole clips: (B, 5, F, C, H, W)."""
    _, traj = sample_bidirectional(teacher, eps, ctx, ctx_null, 48, guidance, return_trajectory=True, actions=actions)
    return traj[STORED].transpose(0, 1)


def pair_metadata(cfg, teacher_ckpt):
    """What a pair file must agree on with the run that reads it."""
    return dict(teacher=cfg.teacher, frames_per_block=cfg.frames_per_block, guidance=cfg.guidance,
                teacher_step=teacher_ckpt["step"], teacher_stage=teacher_ckpt["stage"], exact=cfg.exact_teacher,
                model_config=teacher_ckpt["model_config"], stored=STORED, num_pairs=cfg.num_pairs)


def trajectories(cfg, teacher, n, g, device, part=Part(), what="ODE pairs", exclude=None):
    """n clips (and their prompts) drawn with generator g, and the teacher's PF-ODE trajectory from fresh noise for
    each: dict(x0, states (n, 5, F, C, H, W) at the STORED points, text, null, prompts, actions). exclude: clips
    (x0, (m, F, C, H, W)) to leave out, e.g. the training pairs' (the toy world has finitely many clips, so fresh
    draws repeat some): then n distinct clips not among them are kept from 8n draws."""
    data = open_data(cfg.data, teacher.cfg, cfg.clip_frames, cfg.actions)
    x0_all, text_all, null_all, prompts, actions_all = data.batch(n if exclude is None else 8 * n, generator=g)
    if exclude is not None:
        seen, keep = {x.numpy().tobytes() for x in exclude}, []
        for i, x in enumerate(x0_all):
            if len(keep) < n and x.numpy().tobytes() not in seen:
                seen.add(x.numpy().tobytes())
                keep.append(i)
        if len(keep) < n:
            raise ConfigError(f"only {len(keep)} of {8 * n} drawn clips are new: ask for fewer {what}")
        pick = lambda v: None if v is None else v[keep]
        x0_all, text_all, null_all, actions_all = map(pick, (x0_all, text_all, null_all, actions_all))
        prompts = [prompts[i] for i in keep]
    eps_all = torch.randn(x0_all.shape, generator=g)
    states, bs = [], (64 if data.is_toy else 1) * part.world
    rows = lambda x: None if x is None else part(x[i:i + bs]).to(device)  # this process's rows of the chunk
    for i in tqdm(range(0, n, bs), desc=f"{what} ({cfg.teacher} teacher)", disable=part.rank > 0):
        ctx, null, eps, x0, a = (rows(v) for v in (text_all, null_all, eps_all, x0_all, actions_all))
        with autocast(device, teacher):
            if cfg.teacher == "ar":
                s = causal_ode_trajectory(teacher, x0, eps, ctx, null, cfg.guidance, cfg.frames_per_block, a)
            else:
                s = bidirectional_ode_trajectory(teacher, eps, ctx, null, cfg.guidance, a)
        states.append(gather_rows(s.float().cpu(), part))
    return dict(x0=x0_all, states=torch.cat(states), text=text_all, null=null_all, prompts=prompts,
                actions=actions_all)


def make_pairs(cfg, teacher, teacher_ckpt, device, part=Part()):
    """Generate (or load) cfg.num_pairs ODE trajectories. Returns dict(x0, states, text, null, prompts, meta, bytes,
    seconds). They are held in memory and in one file: fine for the toy (tens of MiB); at Wan scale one pair is
    ~50 MB in float32, so keep --num-pairs small there (the official data for Wan2.1 is 1,900 GiB in an LMDB).
    Under torchrun each process computes its rows of every chunk and the chunk is gathered: the same pairs."""
    path = pairs_path(cfg)
    meta = pair_metadata(cfg, teacher_ckpt)
    if os.path.exists(path):
        pairs = torch.load(path, map_location="cpu", weights_only=False)
        saved = {**pairs["meta"], "num_pairs": len(pairs["x0"])}  # --num-pairs: another set, not a slice of this
        differ = {k: (saved.get(k), v) for k, v in meta.items() if saved.get(k) != v}
        if differ:
            raise ConfigError(f"{path} was made for another setup (saved, now): {differ}; "
                             f"delete it to regenerate, or use another --out-dir")
        if pairs.get("seed", cfg.seed) != cfg.seed:  # allowed: several training seeds on one pair set
            print(f"note: {path} was made with --seed {pairs['seed']}; --seed {cfg.seed} seeds the training only")
        print(f"loaded {len(pairs['x0'])} ODE pairs from {path}")
        pairs["loaded"] = True  # made by an earlier run: this run's time does not include them
        if "text" not in pairs:  # a toy pair file written before pairs stored their text features
            pairs["text"], pairs["null"] = toy_data.TextEncoder()(pairs["prompts"]), None
        pairs.setdefault("actions", None)  # written before the world model
        return pairs
    t0 = time.time()
    pairs = trajectories(cfg, teacher, cfg.num_pairs, torch.Generator().manual_seed(cfg.seed + 100), device, part)
    pairs.update(meta=meta, seed=cfg.seed, seconds=time.time() - t0)
    pairs["bytes"] = pairs["states"].numel() * 4 + (pairs["x0"].numel() * 4 if cfg.teacher == "ar" else 0)
    on_main(part, lambda: save_checkpoint(path, **pairs))
    print(f"{cfg.num_pairs} ODE pairs: {pairs['bytes'] / 2 ** 20:.1f} MiB stored, {pairs['seconds']:.0f} s -> {path}")
    return pairs


# -----------------------------------------------------------------------------------------------------------
# The student


def ode_regression_loss(student, batch, ctx, teacher_kind, frames_per_block, shift, generator, noisy_prefix=False,
                        actions=None, part=Part(), point=None):
    """MSE between the student's x0 prediction at a stored trajectory point and the ODE endpoint.
    ar:            one k ~ U{0..3} for all frames; input states[k] at t_k with the ground-truth clean context
                   (Causal Forcing trainer/ode.py, uniform_timestep).
    bidirectional: one k ~ U{0..4} per block over the stored points *including the clean endpoint* (k = 4, t = 0),
                   one forward under the block-causal mask, the loss masked to blocks with t != 0 (Self Forcing
                   model/ode_regression.py: indices [0, 12, 24, 36, -1]; CausVid: [1000, 757, 522, 0]). Past blocks
                   are then clean a fifth of the time each, as the KV cache is at inference.
                   noisy_prefix=True: k ~ U{0..3}, the past is never clean in training (the mismatch of Prop. 3.4
                   stacked on the injectivity failure; an ablation, not an official recipe).
    point: every frame at this stored point instead of a draw (pair_loss's fixed evaluation)."""
    states, x0_gt = batch  # (B, 5, F, C, H, W), (B, F, C, H, W)
    B, _, nF = states.shape[:3]
    t_list = torch.tensor(warped_steps(4, shift) + [0.0])  # = 48-grid points 0/12/24/36, then the endpoint t = 0
    n_blocks = nF // frames_per_block
    n_points = 4 if teacher_kind == "ar" or noisy_prefix else 5
    if point is None:
        k = part(torch.randint(0, n_points, (B * part.world, 1 if teacher_kind == "ar" else n_blocks),
                               generator=generator))
    else:
        k = torch.full((B, 1), point)
    k = k.expand(B, n_blocks).repeat_interleave(frames_per_block, dim=1)  # (B, F)
    x_in = states[torch.arange(B)[:, None], k, torch.arange(nF)[None]]  # (B, F, C, H, W)
    t = t_list[k].to(x_in.device)  # (B, F)
    path = dict(clean=x0_gt, frames_per_block=frames_per_block) if teacher_kind == "ar" else \
        dict(frames_per_block=frames_per_block)
    if actions is not None:  # the world model: every frame under its pair's action
        path["actions"] = actions
    x0_hat = x0_from_v(x_in, student(x_in, t, ctx, **path), t)
    mask = t != 0  # (B, F): a clean block is context, not a target (its x0_hat is its input)
    if part.world > 1:  # the mean over the global batch's noisy frames: this process's sum / (their count / N)
        count = sum_over_processes(mask.sum().item(), part) / part.world
        return (x0_hat[mask] - states[:, -1][mask]).pow(2).sum() / max(count * x0_hat[0, 0].numel(), 1)
    if not mask.any():  # every block of the batch drawn clean: nothing to regress (the official code gives NaN)
        return 0.0 * x0_hat.sum()
    return (x0_hat[mask] - states[:, -1][mask]).pow(2).mean()  # mean over the noisy frames only


@torch.no_grad()
def pair_loss(student, pairs, teacher_kind, frames_per_block, n=None, batch=64):
    """ode_regression_loss with every frame at each noisy stored point in turn (k = 0..3, t = 1000 ... t_3) instead of
    a random k: its mean over k and over the first n pairs, a number with no draw in it. On the student's own
    training pairs and on pairs it never saw, it tells fitting the teacher's flow map from memorising the pairs."""
    n = min(n or len(pairs["x0"]), len(pairs["x0"]))
    device = next(student.parameters()).device
    total = 0.0
    for k in range(4):  # the 4 noisy points; the 5th is the endpoint itself
        for i in range(0, n, batch):
            rows = slice(i, min(i + batch, n))
            on = lambda v: None if v is None else v[rows].to(device)
            with autocast(device, student):
                loss = ode_regression_loss(student, (on(pairs["states"]), on(pairs["x0"])), on(pairs["text"]),
                                           teacher_kind, frames_per_block, student.cfg.shift, None,
                                           actions=on(pairs.get("actions")), point=k)
            total += float(loss) * (rows.stop - rows.start)
    return total / (n * 4)


def train(cfg):
    if cfg.teacher not in ("ar", "bidirectional"):
        raise ConfigError(f"--teacher must be 'ar' or 'bidirectional' (got {cfg.teacher!r})")
    if cfg.noisy_prefix and cfg.teacher != "bidirectional":
        raise ConfigError("--noisy-prefix is an ablation of the bidirectional-ODE student: add --teacher bidirectional")
    if cfg.exact_teacher and (cfg.data != "toy" or cfg.actions):
        raise ConfigError("--exact-teacher needs the plain toy, whose data law is known (drop --data / --actions)")
    if cfg.exact_teacher and cfg.guidance != 1:
        raise ConfigError(f"--exact-teacher samples the data law itself; CFG would push past it: add --guidance 1 "
                          f"(got --guidance {cfg.guidance:g})")
    if cfg.dry_run:  # the plan of one student step (pair generation needs less: no grads), nothing loaded
        return dry_run("ode", cfg, cfg.batch_size, cfg.frames_per_block, momentum=True)
    part, device = start_distributed(pick_device(cfg.device))  # torchrun: this process's share (wan_scale.Part)
    limit_memory(device, cfg.memory_cap_gib)
    torch.manual_seed(cfg.seed)
    part.check(cfg, ("--num-pairs", cfg.num_pairs))
    path = student_path(cfg)
    src, ckpt = start_run(path, cfg, stage_name(cfg.teacher), make_command(cfg),  # more --steps: a longer run
                          free=(*RUN_PLACE, "steps", "eval_clips", "ckpt_every", "plot", "train_missing", "per_frame",
                                "unseen_pairs"))
    if cfg.teacher == "ar":
        teacher, teacher_ckpt = load_teacher(cfg.out_dir, "ar", cfg.frames_per_block, device=device,
                                             actions=cfg.actions)
    else:  # the bidirectional base: the toy's, or Wan2.1 with --init-weights
        teacher, teacher_ckpt = load_base(cfg, device=device)
    teacher = prepare(teacher, cfg.param_dtype).requires_grad_(False)
    student = prepare(copy.deepcopy(teacher), cfg.param_dtype, cfg.grad_checkpointing)  # init: the teacher itself
    student.train().requires_grad_(True)
    ema = copy.deepcopy(student).eval().requires_grad_(False)
    teacher, student, ema = shard(teacher, part), shard(student, part), shard(ema, part)  # torchrun
    t_start = time.time()
    if cfg.exact_teacher:  # the pairs' teacher is the data law itself; the student still starts from the model
        teacher = toy_data.ExactScore(teacher.cfg)
    pairs = make_pairs(cfg, teacher, teacher_ckpt, device, part)
    if cfg.data != "toy" or not cfg.unseen_pairs:
        teacher = None  # its memory goes to the student's optimizer; the toy keeps it for the unseen pairs
    opt = make_optimizer(student.parameters(), cfg.optimizer, cfg.lr, (0.9, 0.99), 0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    step, history = 0, []
    name = os.path.basename(path)[:-3]  # causal_ode, bidirectional_ode, bidirectional_ode_noisy_prefix, ...
    if ckpt is not None:
        load_whole(student, ckpt["model"]), load_whole(ema, ckpt["ema"])  # any N resumes any N's run
        load_whole_optimizer(opt, ckpt["optimizer"])
        gen.set_state(ckpt["gen"])
        step, history = ckpt["step"], ckpt["history"]
        print(f"resumed {src} at step {step}")
    print(cfg)
    ctx_all, step_at_start = pairs["text"], step

    def save(finished=False, **extra):  # unfinished: X.partial.pt (model.save_run)
        states = whole(dict(model=student.state_dict(), ema=ema.state_dict(), optimizer=opt.state_dict()), part)
        on_main(part, lambda: save_run(path, finished, stage=stage_name(cfg.teacher),
                                       model_config=teacher_ckpt["model_config"], config=asdict(cfg), **states,
                                       gen=gen.get_state(), step=step, history=history, pair_bytes=pairs["bytes"],
                                       pair_seconds=pairs["seconds"], **extra))

    pbar = tqdm(total=cfg.steps, initial=step, desc=name, dynamic_ncols=True, disable=part.rank > 0)
    while step < cfg.steps:
        frac = min(1.0, (step + 1) / max(1, cfg.warmup))  # --warmup 0: none
        for group in opt.param_groups:
            group["lr"] = cfg.lr * frac
        idx = part(torch.randint(0, len(pairs["x0"]), (cfg.batch_size,), generator=gen))  # torchrun: own rows
        batch = (pairs["states"][idx].to(device), pairs["x0"][idx].to(device))
        with autocast(device, student):
            loss = ode_regression_loss(student, batch, ctx_all[idx].to(device), cfg.teacher, cfg.frames_per_block,
                                       student.cfg.shift, gen, noisy_prefix=cfg.noisy_prefix,
                                       actions=None if pairs["actions"] is None else pairs["actions"][idx].to(device),
                                       part=part)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        ema_update(ema, student, min(cfg.ema_decay, (1 + step) / (10 + step)))
        step += 1
        history.append(mean_over_processes(loss.item(), part))  # the global batch's loss
        pbar.update(1)
        pbar.set_postfix(loss=f"{sum(history[-50:]) / len(history[-50:]):.4f}")
        if step % cfg.ckpt_every == 0:
            save()
    pbar.close()
    report_memory(device, "ode", cfg, cfg.batch_size, cfg.frames_per_block, momentum=True)
    minutes = run_minutes(t_start, ckpt, step > step_at_start)  # a re-evaluation keeps the training's
    if cfg.data != "toy":  # Wan scale: no toy evaluator; sample the student with sample_stream.py
        print(f"{name}: {step} steps, {minutes:.1f} min including pairs "
              f"({pairs['bytes'] / 2 ** 20:.1f} MiB stored) -> {path}")
        save(finished=True, minutes=minutes)
        return {}
    metrics = toy_few_step_report(ema, name, cfg.eval_clips, cfg.frames_per_block, cfg.out_dir,
                                  write_gif=part.rank == 0)
    fit = {}
    if cfg.unseen_pairs:  # the same teacher, CFG and step lists, on clips and noise no training step drew
        unseen = trajectories(cfg, teacher, cfg.unseen_pairs, torch.Generator().manual_seed(cfg.seed + 200), device,
                              part, what="unseen pairs", exclude=pairs["x0"])
        fit = dict(train=pair_loss(ema, pairs, cfg.teacher, cfg.frames_per_block, cfg.unseen_pairs),
                   unseen=pair_loss(ema, unseen, cfg.teacher, cfg.frames_per_block))
        if not cfg.exact_teacher:  # the student's starting point, the teacher's weights under the student's path
            fit["start"] = pair_loss(teacher, unseen, cfg.teacher, cfg.frames_per_block)
        print(f"{name}: regression loss over the 4 noisy stored points, {cfg.unseen_pairs} pairs: {fit['train']:.5f} "
              f"on its training pairs, {fit['unseen']:.5f} on unseen ones" +
              (f" (at step 0, the teacher's weights: {fit['start']:.5f})" if "start" in fit else ""))
    minutes = run_minutes(t_start, ckpt, step > step_at_start)  # a re-evaluation keeps the training's
    made = "read from an earlier run, which made them in" if pairs.get("loaded") else "made in"
    print(f"{name}: {minutes:.1f} min, ODE pairs {made} {pairs['seconds'] / 60:.1f} min, "
          f"{pairs['bytes'] / 2 ** 20:.1f} MiB stored")
    save(finished=True, metrics=metrics, minutes=minutes, pair_fit=fit)
    return metrics


def load_student(out_dir, teacher, frames_per_block=1, device="cpu", noisy_prefix=False, actions=False,
                 exact_teacher=False):
    cfg = Config(teacher=teacher, frames_per_block=frames_per_block, out_dir=out_dir, noisy_prefix=noisy_prefix,
                 actions=actions, exact_teacher=exact_teacher)
    ckpt = load_checkpoint(student_path(cfg), stage=stage_name(teacher), make_cmd=make_command(cfg))
    check_actions(actions, ModelConfig(**ckpt["model_config"]))
    return model_from_checkpoint(ckpt, key="ema", device=device).eval(), ckpt


# -----------------------------------------------------------------------------------------------------------
# The exact miniature (SPEC §5): two scalar frames, x^1 in {-1, +1}, x^2 = x^1. No training involved.


def gmm_velocity(x, s, means, var):
    """Exact rectified-flow velocity E[eps - x0 | x_s = x] for data = equal mixture of N(mean_k, var I).
    x: (N, D), means: (K, D). Given component k, x_s ~ N((1 - s) mean_k, ((1 - s)^2 var + s^2) I)."""
    tot = (1 - s) ** 2 * var + s ** 2
    r = x[:, None] - (1 - s) * means[None]  # (N, K, D)
    logp = -(r ** 2).sum(-1) / (2 * tot)  # (N, K)
    w = torch.softmax(logp, dim=1)[..., None]  # posterior over components
    e_x0 = means[None] + (1 - s) * var / tot * r  # E[x0 | x_s, k]
    e_eps = s / tot * r  # E[eps | x_s, k]
    return (w * (e_eps - e_x0)).sum(1)  # (N, D)


def gmm_ode(eps, means, var, n_steps=400):
    """Euler PF-ODE from s = 1 (x = eps) to s = 0 with the exact velocity: the teacher's deterministic map.
    400 steps are within 0.004 of 2000 at every point (and 5x faster)."""
    x = eps.double()
    s_grid = torch.linspace(1, 0, n_steps + 1, dtype=torch.float64)
    for s, s_next in zip(s_grid[:-1], s_grid[1:]):
        x = x - (s - s_next) * gmm_velocity(x, s, means.double(), var)
    return x


def two_frame_miniature(eps1, n_future=512, var=1e-3, seed=0):
    """For frame-1 noises eps1 (N,): the AR teacher's frame-1 endpoint (ODE of the 1-D law of x^1), samples of
    the bidirectional teacher's frame-1 endpoint (2-D ODE, random eps2), and the best causal student fitted to
    those bidirectional pairs, E[ODE_bi(eps1, eps2)^1 | eps1] (Monte Carlo over eps2)."""
    g = torch.Generator().manual_seed(seed)
    ar = gmm_ode(eps1[:, None], torch.tensor([[-1.0], [1.0]]), var)[:, 0]  # (N,)
    eps2 = torch.randn(len(eps1), n_future, generator=g, dtype=torch.float64)
    both = torch.stack([eps1[:, None].double().expand_as(eps2), eps2], -1).reshape(-1, 2)
    bi = gmm_ode(both, torch.tensor([[-1.0, -1.0], [1.0, 1.0]]), var)[:, 0].reshape(len(eps1), n_future)
    return ar, bi, bi.mean(1)


# -----------------------------------------------------------------------------------------------------------
# The injectivity figure


@torch.no_grad()
def future_resampled_endpoints(sampler, noise, frame, K, generator):
    """Run `sampler` on K copies of `noise` (P, F, ...) whose frames > `frame` are redrawn: (K, P, C, H, W) frame
    `frame` of each endpoint."""
    P, nF = noise.shape[:2]
    batch = noise.repeat(K, 1, 1, 1, 1)  # (K*P, F, C, H, W)
    if frame + 1 < nF:
        batch[:, frame + 1:] = torch.randn(batch[:, frame + 1:].shape, generator=generator).to(noise.device)
    return sampler(batch)[:, frame].reshape(K, P, *noise.shape[2:])


@torch.no_grad()
def second_moment_per_frame(x):
    """E[x^2] per frame index of clips (B, F, C, H, W): (F,). Data: exactly 1; a blurred average: below 1."""
    return x.float().pow(2).mean((0, 2, 3, 4))


@torch.no_grad()
def students_on_training_inputs(student, teacher_kind, pairs, n):
    """A 1-step student's x0 prediction on its own training inputs at the first stored point (every frame at
    t = 1000): the causal-ODE student with the ground-truth clean context (teacher forcing), the bidirectional-ODE
    student block-causal over the noisy frames. For the latter this is E[x0^i | noise of frames <= i], which Prop. 3.3
    says is squashed, most at frame 0 (the least conditioning). Returns (x0_hat, targets), both (n, F, C, H, W)."""
    dev = next(student.parameters()).device
    x_in, target, gt = pairs["states"][:n, 0].to(dev), pairs["states"][:n, -1], pairs["x0"][:n].to(dev)
    t = torch.full(x_in.shape[:2], 1000.0, device=dev)
    path = dict(clean=gt, frames_per_block=1) if teacher_kind == "ar" else dict(frames_per_block=1)
    return x0_from_v(x_in, student(x_in, t, pairs["text"][:n].to(dev), **path), t).cpu(), target


def plot_injectivity(cfg, path="injectivity.png", K=16):
    """The figure: (a) who decides frame i from the future; (b) the conditional expectation, as pictures; (c, d)
    second moment per frame of each student against its own ODE targets, on its training inputs and at streaming
    inference; (e) the exact two-scalar miniature. With --train-missing it first trains a missing student; without,
    a missing student stops it with the command that makes it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    device = pick_device(cfg.device)
    missing = [Config(**{**asdict(cfg), "teacher": t, "plot": False, "noisy_prefix": False}) for t in ("ar", "bidirectional")]
    missing = [c for c in missing if not os.path.exists(student_path(c))]
    if missing and not cfg.train_missing:
        raise ConfigError(f"--plot needs {' and '.join(student_path(c) for c in missing)}: make "
                          f"{'them' if len(missing) > 1 else 'it'} with {'; '.join(make_command(c) for c in missing)} "
                          f"(3-7 min each on a 2-core CPU), or add --train-missing to do it here")
    for c in missing:
        print(f"{student_path(c)} missing: training it first (--train-missing)")
        train(c)
    base, _ = load_teacher(cfg.out_dir, "base", device=device)
    ar, _ = load_teacher(cfg.out_dir, "ar", device=device)
    students = {"bidirectional": load_student(cfg.out_dir, "bidirectional", device=device)[0],
                "ar": load_student(cfg.out_dir, "ar", device=device)[0]}
    text = toy_data.TextEncoder()
    prompts = ["red circle", "green square", "blue triangle"]
    P, nF = len(prompts), toy_data.FRAMES
    ctx, null = text(prompts).to(device), text([""] * P).to(device)
    g = torch.Generator().manual_seed(cfg.seed + 7)
    noise = torch.randn(P, nF, 3, toy_data.SIZE, toy_data.SIZE, generator=g).to(device)
    teachers = {  # each teacher's 48-step CFG PF-ODE from noise, the AR one generating its own past
        "bidirectional teacher": lambda x, c, u: sample_bidirectional(base, x, c, u, FIGURE_STEPS, cfg.guidance),
        "AR teacher": lambda x, c, u: sample_ar(ar, x, c, u, FIGURE_STEPS, cfg.guidance, 1),
    }
    # (a) variance of frame i's endpoint over K resampled futures; frame 0's endpoints are kept for (b)
    var, frame0 = {k: [] for k in teachers}, {}
    for i in tqdm(range(nF), desc="injectivity: resampling futures"):
        for name, sampler in teachers.items():
            run = lambda x: sampler(x, ctx.repeat(K, 1, 1), null.repeat(K, 1, 1))
            ends = future_resampled_endpoints(run, noise, i, K, g)  # (K, P, C, H, W)
            var[name].append(ends.var(0).mean().item())
            if i == 0:
                frame0[name] = ends.cpu()
    # (b) frame 0 of each prompt: the 1-step students from the same frame-0 noise (x0_hat at t = 1000)
    one = {k: sample_stream(m, noise, ctx, [1000.0])[:, 0].cpu() for k, m in students.items()}  # (P, C, H, W)
    # (c) second moment per frame on the training inputs, against each student's own ODE targets
    n_eval = 72
    train_in, targets = {}, {}
    for kind in ("bidirectional", "ar"):
        pairs = torch.load(pairs_path(Config(teacher=kind, out_dir=cfg.out_dir)), map_location="cpu",
                           weights_only=False)
        x0_hat, target = students_on_training_inputs(students[kind], kind, pairs, min(n_eval, len(pairs["x0"])))
        train_in[kind], targets[kind] = second_moment_per_frame(x0_hat), second_moment_per_frame(target)
    # (d) ... and at streaming inference: 1-step, each frame on the student's own cached past
    stream = {k: second_moment_per_frame(toy_few_step_samples(m, n_eval, 1, 1)[0]) for k, m in students.items()}

    # (e) the exact miniature
    eps1 = torch.linspace(-3, 3, 121, dtype=torch.float64)
    mini_ar, mini_bi, mini_student = two_frame_miniature(eps1)
    e_mc = torch.randn(4000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    _, _, student_mc = two_frame_miniature(e_mc[:400], n_future=256)
    m2_student = student_mc.pow(2).mean().item()

    colour = {"bidirectional teacher": "C0", "AR teacher": "C1", "bidirectional": "C3", "ar": "C2"}
    label = {"bidirectional": "bidirectional-ODE student", "ar": "causal-ODE student"}
    fig = plt.figure(figsize=(16, 9.5))
    gs = fig.add_gridspec(2, 3, height_ratios=[1, 1])
    ax = fig.add_subplot(gs[0, 0])
    for name, v in var.items():
        lab = name + (" (exactly 0, drawn at 1e-16)" if max(v) == 0 else "")
        ax.semilogy(range(nF), [max(x, 1e-16) for x in v], "o-", color=colour[name], label=lab)
    ax.set_xlabel("frame index i")
    ax.set_ylabel(f"variance of frame i over {K} resampled\nnoises of frames > i (frames <= i fixed)")
    ax.set_title("(a) does the future's noise change frame i?\nbidirectional teacher: yes; AR teacher: never")
    ax.annotate("last frame:\nno future", (nF - 1, 1e-16), xytext=(nF - 2.3, 1e-11), fontsize=8,
                arrowprops=dict(arrowstyle="->", lw=0.8))
    ax.legend(fontsize=8, loc="center left")
    # (b) a picture grid: rows = prompts; columns = three futures, their mean, the bidir-ODE student | AR, causal
    ax = fig.add_subplot(gs[0, 1:])
    bi = frame0["bidirectional teacher"]  # (K, P, C, H, W)
    cols = [bi[0], bi[1], bi[2], bi.mean(0), one["bidirectional"], frame0["AR teacher"][0], one["ar"]]
    titles = ["bidir. teacher,\nfuture noise #1", "future #2", "future #3", f"mean over\n{K} futures",
              "bidir.-ODE student\n(1 step)", "AR teacher\n(any future)", "causal-ODE student\n(1 step)"]
    grid = torch.stack(cols, 1)  # (P, 7, C, H, W): each clip of this grid is one prompt's row
    img = toy_data.to_uint8_grid(grid.reshape(P * len(cols), 1, *grid.shape[2:]), ncols=len(cols), scale=8)[0]
    ax.imshow(img)
    w, h = img.shape[1] / len(cols), img.shape[0] / P
    ax.set_xticks([w * (j + 0.5) for j in range(len(cols))], titles, fontsize=8)
    ax.set_yticks([h * (r + 0.5) for r in range(P)], prompts, fontsize=8)
    ax.axvline(5 * w - 1, color="w", lw=3)
    ax.set_title("(b) frame 0 from one fixed frame-0 noise per row. Left: the bidirectional teacher's frame 0 changes with "
                 "the future's noise,\nso a causal student can at best learn the mean. Right: the AR teacher has one "
                 "answer per noise, which the causal-ODE student is fitted to", fontsize=10)
    for j, (title, series) in enumerate((("(c) on its training inputs (every frame at t = 1000)", train_in),
                                         ("(d) at streaming inference (1 step, own cached past)", stream))):
        ax = fig.add_subplot(gs[1, j])
        for kind in ("bidirectional", "ar"):
            ax.plot(range(nF), series[kind], "o-", color=colour[kind], lw=2, label=label[kind])
            ax.plot(range(nF), targets[kind], "s--", color=colour[kind], lw=1, alpha=0.7,
                    label=f"its ODE targets ({'bidirectional' if kind == 'bidirectional' else 'AR'} teacher)")
        ax.axhline(1.0, color="k", ls=":", lw=1, label="data (exactly 1)")
        lo = min(min(v.min().item() for v in series.values()), 0.95)
        ax.set_ylim(lo - 0.01, 1.0 + 2.2 * (1.0 - lo + 0.01))  # room for the legend above the curves
        ax.set_xlabel("frame index i")
        ax.set_ylabel("second moment E[x^2] of frame i")
        ax.set_title(title + "\nbelow its own targets = squashed towards an average (Prop. 3.3)", fontsize=10)
        ax.legend(fontsize=7, loc="upper center", ncol=2)
    ax = fig.add_subplot(gs[1, 2])
    ax.scatter(eps1.repeat_interleave(8), mini_bi[:, :8].flatten(), s=3, alpha=0.3, color="C0",
               label="bidirectional teacher, random eps2")
    ax.plot(eps1, mini_ar, color="C1", lw=2, label="AR teacher (causal ODE target): sign(eps1)")
    ax.plot(eps1, mini_student, color="C3", lw=2, label=f"student fitted to bidir. pairs, E[x^2] = {m2_student:.2f}")
    ax.set_xlabel("frame-1 noise eps1")
    ax.set_ylabel("frame-1 output")
    ax.set_title("(e) exact miniature, no training: x1 = x2 in {-1, +1}.\nA causal student of bidirectional "
                 "pairs learns E[x1 | eps1]", fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    fig.suptitle("Frame-level injectivity: an AR teacher maps each noisy frame (given the clean past) to one clean "
                 "frame;\na bidirectional teacher does not, so a causal student fitted to its ODE pairs learns an "
                 "average", fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    summary = {"variance": var, "train_inputs": {k: v.tolist() for k, v in train_in.items()},
               "stream": {k: v.tolist() for k, v in stream.items()},
               "targets": {k: v.tolist() for k, v in targets.items()}, "miniature_student_second_moment": m2_student}
    fmt = lambda v: "[" + ", ".join(f"{float(a):.3f}" for a in v) + "]"
    print(f"wrote {path}")
    for n, v in var.items():
        print(f"  {n:>26}: future-resampling variance per frame {['%.1e' % x for x in v]}")
    for kind in ("bidirectional", "ar"):
        print(f"  {label[kind]:>26}: 2nd moment per frame, training inputs {fmt(train_in[kind])}, streaming "
              f"{fmt(stream[kind])}, its targets {fmt(targets[kind])}")
    print(f"  miniature: student second moment {m2_student:.3f} (data: 1)")
    return summary


@torch.no_grad()
def world_injectivity(cfg, path="assets/injectivity_world.png", K=16):
    """The injectivity argument for the world model (`--actions --plot`): the variance of each world teacher's frame
    i over K futures whose noise *and actions* (frames > i) are redrawn, the past's noise and actions fixed. A
    bidirectional action-conditioned teacher's frame i hears where the player will steer next; an AR one cannot.
    Needs only the two world teachers. Prints the variances and writes a one-panel figure."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    device = pick_device(cfg.device)
    base, _ = load_teacher(cfg.out_dir, "base", device=device, actions=True)
    ar, _ = load_teacher(cfg.out_dir, "ar", device=device, actions=True)
    text, prompts = toy_data.TextEncoder(), ["red circle", "green square", "blue triangle"]
    P, nF = len(prompts), toy_data.FRAMES
    ctx, null = text(prompts * K).to(device), text([""] * P * K).to(device)
    g = torch.Generator().manual_seed(cfg.seed + 7)
    noise = torch.randn(P, nF, 3, toy_data.SIZE, toy_data.SIZE, generator=g)
    actions = toy_data.eval_actions(P, nF)
    teachers = {"bidirectional world teacher": lambda x, a: sample_bidirectional(base, x, ctx, null, FIGURE_STEPS,
                                                                                 cfg.guidance, actions=a),
                "AR world teacher": lambda x, a: sample_ar(ar, x, ctx, null, FIGURE_STEPS, cfg.guidance, 1, actions=a)}
    var = {k: [] for k in teachers}
    for i in tqdm(range(nF), desc="world injectivity: resampling futures"):
        x, a = noise.repeat(K, 1, 1, 1, 1), actions.repeat(K, 1)  # (K*P, ...): copy k of prompt p is row k*P + p
        x[:, i + 1:] = torch.randn(x[:, i + 1:].shape, generator=g)
        a[:, i + 1:] = toy_data.sample_actions(K * P, nF, g)[:, i + 1:]
        for name, sampler in teachers.items():
            ends = sampler(x.to(device), a.to(device))[:, i].reshape(K, P, -1)
            var[name].append(ends.var(0).mean().item())
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (name, v), c in zip(var.items(), ("C0", "C1")):
        ax.semilogy(range(nF), [max(x, 1e-16) for x in v], "o-", color=c,
                    label=name + (" (exactly 0, drawn at 1e-16)" if max(v) == 0 else ""))
    ax.set_xlabel("frame index i")
    ax.set_ylabel(f"variance of frame i over {K} futures\n(noise and actions of frames > i redrawn)")
    ax.set_title("World model: do the future's actions and noise change frame i?\nbidirectional teacher: yes; "
                 "AR teacher: never", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}")
    for n, v in var.items():
        print(f"  {n:>27}: future-resampling variance per frame {['%.1e' % x for x in v]}")
    return var


@torch.no_grad()
def per_frame_report(cfg, n=72):
    """Prop. 3.3 frame by frame: the second moment and blur of each student's samples per frame index (1 and
    4 steps, the same 72 noises), beside those of its ODE targets (the stored endpoints). Students or pair files
    missing from cfg.out_dir are skipped."""
    if cfg.actions:
        raise ConfigError("--per-frame compares the plain toy's ODE students; the world model has --plot (its injectivity)")
    fmt = lambda v: "[" + ", ".join(f"{float(a):.3f}" for a in v) + "]"
    runs = [Config(teacher=teacher, frames_per_block=cfg.frames_per_block, out_dir=cfg.out_dir, noisy_prefix=noisy)
            for teacher, noisy in (("ar", False), ("bidirectional", False), ("bidirectional", True))]
    if not any(os.path.exists(student_path(c)) for c in runs):
        raise ConfigError(f"--per-frame: no ODE student in {cfg.out_dir}/; make them with "
                          f"{'; '.join(make_command(c) for c in runs)}")
    exact = [Config(teacher=t, frames_per_block=cfg.frames_per_block, out_dir=cfg.out_dir, exact_teacher=True)
             for t in ("ar", "bidirectional")]
    runs += [c for c in exact if os.path.exists(student_path(c))]  # the exact-teacher ablation, where made
    for c in runs:
        teacher, noisy = c.teacher, c.noisy_prefix
        name = os.path.basename(student_path(c))[:-3]
        if os.path.exists(pairs_path(c)) and not noisy:
            end = torch.load(pairs_path(c), map_location="cpu", weights_only=False)["states"][:, -1].float()
            print(f"{name + ' targets':32s} | 2nd moment {fmt(end.pow(2).mean((0, 2, 3, 4)))} "
                  f"blur {fmt(toy_data.blur_per_frame(end).mean(0))}")
        if not os.path.exists(student_path(c)):
            print(f"{name:32s} | missing: {make_command(c)}")
            continue
        student, _ = load_student(cfg.out_dir, teacher, cfg.frames_per_block, noisy_prefix=noisy,
                                  exact_teacher=c.exact_teacher)
        for n_steps in (1, 4):
            clips = toy_few_step_samples(student, n, n_steps, cfg.frames_per_block)[0]
            print(f"{name + f' {n_steps}-step':32s} | 2nd moment {fmt(clips.pow(2).mean((0, 2, 3, 4)))} "
                  f"blur {fmt(toy_data.blur_per_frame(clips).mean(0))}")


if __name__ == "__main__":
    cfg = parse_config(Config, description=__doc__.split("\n\n")[0])
    run_main(per_frame_report if cfg.per_frame else (world_injectivity if cfg.actions else plot_injectivity)
             if cfg.plot else train, cfg)
