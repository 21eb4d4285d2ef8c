"""
causal_cd.py — stage 2b: causal consistency distillation (Causal Forcing++), and the project's front door.

Causal ODE distillation (ode_init.py) needs the AR teacher's whole 48-step trajectory for every training clip,
stored up front. Causal CD learns the same AR-conditional flow map with no stored trajectories: each step
takes one adjacent pair of the 48-grid and asks the student to give the same x0 prediction on both ends of one
teacher ODE step (a consistency model, Song et al. 2023, with the AR teacher providing the step):

    n ~ U{0..46};  t = t_n > t' = t_{n+1}            (48-grid, one t for all frames)       CF++ Alg. 1
    x_t  = (1 - s) x0 + s eps                        (ground truth noised to t)
    x_t' = x_t - (s - s') v_teacher(x_t, t)          (one Euler step, CFG w = 3, clean context = ground truth)
    f_theta  = x0_hat(student,     x_t,  t)          (teacher-forcing path, same clean context)
    f_target = x0_hat(EMA student, x_t', t')         (no grad; EMA decay 0.99, updated every step)
    loss = MSE(f_theta, f_target)

Student, EMA and teacher all start from the AR teacher. Because every frame's context is the ground-truth past
(teacher forcing), the map learned is the AR teacher's conditional flow map, which is frame-level injective,
just as in causal ODE distillation. Official cost on Wan2.1 (CF++ paper): 2,900 vs 11,600 A800 GPU-hours and
0 vs 1,900 GiB of stored trajectories; this script prints the toy's analogue (0 bytes) to
compare with ode_init.py's "MiB stored" line.

Differences from the official code (thu-ml/Causal-Forcing trainer/naive_cd.py): float32 timesteps (the official
casts t to bf16), a toy learning rate, batch and length (300 steps; the official README advises >= 3K, and the
toy's CD needs ~1,200 to match causal ODE at 2 steps), and the whole toy clip in one teacher-forcing forward.

Commands:
    python causal_cd.py --toy        # from a clean checkout: trains missing teachers, then CD, then samples
                                     # 1/2/4-step clips, prints their metrics, writes a GIF
    python causal_cd.py              # CD only (the AR teacher must exist)
    python causal_cd.py --actions    # the world model's CD (its teachers in checkpoints/world/)
    python causal_cd.py --data LATENT_DIR --batch-size 1 ...   # Wan scale (README): after ar_teacher.py there
"""
import copy
import os
import time
from dataclasses import dataclass, asdict

import torch
from tqdm import tqdm

import ar_teacher
import toy_data
from model import (ModelConfig, add_noise, autocast, ema_update, euler_step, load_checkpoint, model_from_checkpoint,
                   parse_config, pick_device, run_main, run_minutes, save_run, start_run, timestep_grid, x0_from_v)
from wan_scale import (RUN_PLACE, ScaleOptions, check_actions, dry_run, limit_memory, load_whole, load_whole_optimizer,
                       make_optimizer, mean_over_processes, on_main, open_data, prepare, report_memory, run_flags,
                       shard, start_distributed, whole)
from sample_stream import cfg_velocity, toy_few_step_report


@dataclass
class Config(ScaleOptions):  # ScaleOptions (wan_scale.py): --data and the memory options for Wan scale
    toy: bool = False  # the front door: first train whichever toy teacher is missing (none in the default --out-dir,
    # where pretrained/ serves)
    frames_per_block: int = 1  # 1 = frame-wise, 3 = chunk-wise (the AR teacher must match)
    steps: int = 300  # student optimizer steps: 300 keeps the front door at 3 min; the official README advises
    # >= 3K (causal ODE: >= 1K), and at 1,200 the toy's CD matches causal ODE at 2 steps (docs/RESULTS.md, Stage 2)
    batch_size: int = 16  # clips per optimizer step
    lr: float = 1e-4  # AdamW learning rate, after a linear warm-up
    warmup: int = 20  # warm-up steps (0: none)
    guidance: float = 3.0  # CFG weight w of the teacher's Euler step (official CD: 3)
    ema_decay: float = 0.99  # the target network: EMA of the student, updated every step from step 0
    eval_clips: int = 72  # clips of the closing evaluation (8 per prompt)
    ckpt_every: int = 100  # atomic checkpoint every this many steps
    out_dir: str = "checkpoints"  # where checkpoints and sample GIFs go (later stages read theirs here)
    seed: int = 0  # seeds data and noise (the weights start from the teacher): the same seed on a CPU, the same run
    device: str = "auto"  # auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps
    resume: bool = False  # continue this run from its last checkpoint (X.partial.pt, else X.pt), exactly


def checkpoint_path(cfg):
    suffix = "" if cfg.frames_per_block == 1 else f"_fpb{cfg.frames_per_block}"
    return os.path.join(cfg.out_dir, f"causal_cd{suffix}.pt")


def make_command(cfg):
    """The command that (re)makes this run's checkpoint, for error messages."""
    return "python causal_cd.py --toy" + (f" --frames-per-block {cfg.frames_per_block}" if cfg.frames_per_block != 1
                                          else "") + run_flags(cfg)


def cd_loss(student, ema, teacher, x0, ctx, ctx_null, grid, guidance, frames_per_block, generator, actions=None,
            part=None):
    """One causal consistency-distillation loss on a batch of ground-truth clips x0 (B, F, C, H, W) [and a world
    model's actions (B, F): every network hears frame i's action with frame i]. part: under torchrun, this
    process's rows of the global batch (wan_scale.Part), so the noise is the global batch's."""
    B, nF = x0.shape[:2]
    n = int(torch.randint(0, len(grid) - 1, (1,), generator=generator))  # U{0..46}: adjacent pair (n, n+1)
    t, t_next = float(grid[n]), float(grid[n + 1])
    tt, tt_next = torch.full((B, nF), t, device=x0.device), torch.full((B, nF), t_next, device=x0.device)
    eps = (part.randn if part else torch.randn)(x0.shape, generator=generator).to(x0.device)
    x_t = add_noise(x0, eps, t)  # x_t = (1 - s) x0 + s eps
    tf = dict(clean=x0, frames_per_block=frames_per_block, actions=actions)  # every network: the ground-truth past
    with torch.no_grad():
        v = cfg_velocity(teacher, x_t, tt, ctx, ctx_null, guidance, **tf)  # v_u + w (v_c - v_u)
        x_next = euler_step(x_t, v, t, t_next)  # x_t' = x_t - (s - s') v
        f_target = x0_from_v(x_next, ema(x_next, tt_next, ctx, **tf), t_next)  # EMA student at t'
    f_theta = x0_from_v(x_t, student(x_t, tt, ctx, **tf), t)  # student at t
    return (f_theta - f_target).pow(2).mean()


def ensure_teachers(cfg):
    """--toy: build the checkpoints this stage needs, in order, if they are missing (saying so)."""
    same = dict(out_dir=cfg.out_dir, actions=cfg.actions, device=cfg.device)  # teachers keep their own seed (0)
    base = ar_teacher.Config(phase="base", **same)
    ar = ar_teacher.Config(phase="ar", frames_per_block=cfg.frames_per_block, **same)
    for tcfg in (base, ar):
        if ar_teacher.find_teacher(tcfg) is None:  # neither trained here nor shipped in pretrained/
            print(f"{ar_teacher.checkpoint_path(tcfg)} is missing: training it now; to make it yourself: "
                  f"{ar_teacher.remake_hint(tcfg)}")
            ar_teacher.train(tcfg)


def train(cfg):
    if cfg.dry_run:  # the plan of one training step, before anything is loaded
        return dry_run("cd", cfg, cfg.batch_size, cfg.frames_per_block)
    t_start = time.time()
    part, device = start_distributed(pick_device(cfg.device))  # torchrun: this process's share (wan_scale.Part)
    limit_memory(device, cfg.memory_cap_gib)
    torch.manual_seed(cfg.seed)
    part.check(cfg)
    path = checkpoint_path(cfg)
    src, ckpt = start_run(path, cfg, "causal_cd", make_command(cfg),
                          free=(*RUN_PLACE, "steps", "toy", "eval_clips", "ckpt_every"))  # more --steps: a longer run
    if cfg.toy:
        ensure_teachers(cfg)
    teacher, teacher_ckpt = ar_teacher.load_teacher(cfg.out_dir, "ar", cfg.frames_per_block, device=device,
                                                    actions=cfg.actions)
    data = open_data(cfg.data, teacher.cfg, cfg.clip_frames, cfg.actions)
    teacher = prepare(teacher, cfg.param_dtype).requires_grad_(False)
    student = prepare(copy.deepcopy(teacher), cfg.param_dtype, cfg.grad_checkpointing).train().requires_grad_(True)
    ema = copy.deepcopy(teacher)  # the target network
    teacher, student, ema = shard(teacher, part), shard(student, part), shard(ema, part)  # torchrun
    opt = make_optimizer(student.parameters(), cfg.optimizer, cfg.lr, (0.0, 0.999), 0.0)
    data_gen = torch.Generator().manual_seed(cfg.seed)
    step, history = 0, []
    if ckpt is not None:
        load_whole(student, ckpt["model"]), load_whole(ema, ckpt["ema"])  # any N resumes any N's run
        load_whole_optimizer(opt, ckpt["optimizer"])
        data_gen.set_state(ckpt["data_gen"])
        step, history = ckpt["step"], ckpt["history"]
        print(f"resumed {src} at step {step}")
    print(cfg)
    grid = timestep_grid(48, teacher.cfg.shift)

    def save(finished=False, **extra):  # unfinished: X.partial.pt (model.save_run)
        states = whole(dict(model=student.state_dict(), ema=ema.state_dict(), optimizer=opt.state_dict()), part)
        on_main(part, lambda: save_run(path, finished, stage="causal_cd", model_config=teacher_ckpt["model_config"],
                                       config=asdict(cfg), **states, data_gen=data_gen.get_state(), step=step,
                                       history=history, **extra))

    t_cd, step_at_start = time.time(), step
    pbar = tqdm(total=cfg.steps, initial=step, desc="causal CD", dynamic_ncols=True, disable=part.rank > 0)
    while step < cfg.steps:
        for group in opt.param_groups:
            group["lr"] = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup))  # --warmup 0: none
        x0, ctx, null, _, actions = map(part, data.batch(cfg.batch_size, generator=data_gen))  # torchrun: own rows
        ctx, null = ctx.to(device), null.to(device)
        with autocast(device, student):
            loss = cd_loss(student, ema, teacher, x0.to(device), ctx, null, grid, cfg.guidance,
                           cfg.frames_per_block, data_gen, None if actions is None else actions.to(device), part)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        ema_update(ema, student, cfg.ema_decay)  # the target network: decay 0.99 from step 0 (official)
        step += 1
        history.append(mean_over_processes(loss.item(), part))  # the global batch's loss
        pbar.update(1)
        pbar.set_postfix(loss=f"{sum(history[-20:]) / len(history[-20:]):.5f}")
        if step % cfg.ckpt_every == 0:
            save()
    pbar.close()
    report_memory(device, "cd", cfg, cfg.batch_size, cfg.frames_per_block)
    cd_minutes = run_minutes(t_cd, ckpt, step > step_at_start)  # a re-evaluation keeps the training's
    if not data.is_toy:  # Wan scale: no toy evaluator; sample the student with sample_stream.py
        print(f"causal_cd: {step} steps, loss {sum(history[-20:]) / max(1, len(history[-20:])):.5f}, {cd_minutes:.1f} min, "
              f"0 bytes of trajectories stored -> {path}")
        save(finished=True, minutes=cd_minutes)
        return {}

    metrics = toy_few_step_report(ema, "causal_cd", cfg.eval_clips, cfg.frames_per_block, cfg.out_dir,
                                  write_gif=part.rank == 0)
    real = toy_data.real_metrics(cfg.eval_clips, seed=0, actions=cfg.actions)
    print(f"real clips        | {toy_data.metric_line(real)}")
    print(f"causal_cd: CD {cd_minutes:.1f} min, 0 bytes of trajectories stored; total {(time.time() - t_start) / 60:.1f} "
          f"min -> {path}")
    save(finished=True, metrics=metrics, minutes=cd_minutes)
    return metrics


def load_student(out_dir="checkpoints", frames_per_block=1, device="cpu", actions=False):
    cfg = Config(frames_per_block=frames_per_block, out_dir=out_dir, actions=actions)
    ckpt = load_checkpoint(checkpoint_path(cfg), stage="causal_cd", make_cmd=make_command(cfg))
    check_actions(actions, ModelConfig(**ckpt["model_config"]))
    return model_from_checkpoint(ckpt, key="ema", device=device).eval(), ckpt


if __name__ == "__main__":
    run_main(train, parse_config(Config, description=__doc__.split("\n\n")[0]))
