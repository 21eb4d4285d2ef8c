"""
ar_teacher.py — stage 0 (the bidirectional base) and stage 1 (the AR teacher, trained with teacher forcing).

Stage 0, `--phase base`: ordinary flow matching on whole clips, every frame at one t, the prompt dropped 10% of
the time so classifier-free guidance works. On the toy this model stands in for pretrained Wan2.1: it is the
"bidirectional teacher" of the injectivity experiment, DMD's real score and the initialisation of its critic.

Stage 1, `--phase ar` (Causal Forcing §3, "autoregressive diffusion with teacher forcing"): the same network,
initialised from the base, learns to denoise block i given the *ground-truth* clean blocks < i. One forward
holds [clean | noisy] (model.py path 2); each block gets its own t from the shifted 1000-grid; the loss is the
bell-weighted velocity MSE of the official code. This is the teacher whose PF-ODE is *frame-level injective*:
frame i's ODE starts from frame i's noise and sees only clean frames < i, so one noise maps to one frame.
Its closing evaluation also asks teacher forcing's own question: given a real clip's past, where does the next
block put the shape (`next_frame_report`; the toy's motion is determined after two frames)?
`--diffusion-forcing` trains the ablation instead: one noisy sequence, block-causal mask, independent t per block
and no clean context, so training sees noisy prefixes while inference feeds clean ones (Causal Forcing
Prop. 3.4: a strictly positive train/test mismatch; expected to sample worse).

Differences from the official code (thu-ml/Causal-Forcing): the toy trains from scratch for the base (the
official stage 1 starts from Wan2.1); the toy's recipe (lr 1e-3 with warmup and cosine decay, EMA weights for
sampling, batch 8, timestep shift 2, plain flow matching for the base) is tuned for a 2-core CPU, where the
official one is AdamW lr 2e-6, betas (0, 0.999) at batch 64 on GPUs; the AR teacher is sampled with 48-step Euler + CFG instead of 50-step UniPC.

Commands (toy, CPU; the README lists measured times):
    python ar_teacher.py --phase base                  # -> checkpoints/base.pt
    python ar_teacher.py --phase ar                    # -> checkpoints/ar_teacher.pt            (frame-wise)
    python ar_teacher.py --phase ar --frames-per-block 3   # -> checkpoints/ar_teacher_chunkwise.pt
    python ar_teacher.py --phase ar --diffusion-forcing    # -> checkpoints/ar_diffusion_forcing.pt (ablation;
                                                       # docs/RESULTS.md compares them at --ar-steps 1000)
    python ar_teacher.py --phase base --actions        # the world model's base -> checkpoints/world/base.pt (every
                                                       # stage takes --actions: toy_data's world with actions)
    python ar_teacher.py --phase ar --model wan2.1-1.3b --init-weights WAN_DIR --data LATENT_DIR --batch-size 1 \
        --param-dtype bfloat16 --optimizer lean --grad-checkpointing [--dry-run]   # Wan scale (README)
Add --resume to continue an interrupted run from its last checkpoint; --resume --ship on a finished run writes
the fp16 EMA weights that this repository ships in pretrained/ (later stages fall back to them). --eval-only prints
the closing evaluation of a finished teacher, the shipped one included, without training:
    python ar_teacher.py --phase base --eval-only [--eval-clips 288]
"""
import copy
import math
import os
import time
from dataclasses import dataclass, asdict

import torch
from tqdm import tqdm

import toy_data
from toy_data import metric_line
from model import (ConfigError, DiT, ModelConfig, PRESETS, add_noise, autocast, count_parameters, describe_mismatch,
                   ema_update, load_checkpoint, loss_weight, model_from_checkpoint, parse_config, pick_device,
                   run_main, run_minutes, save_checkpoint, save_run, start_run, timestep_grid, x0_from_v)
from wan_scale import (RUN_PLACE, ScaleOptions, WORLD_DIR, check_actions, dry_run, limit_memory, load_whole,
                       load_whole_optimizer, make_optimizer, mean_over_processes, on_main, open_data, prepare,
                       report_memory, run_flags, shard, start_distributed, wan_base, whole)
from sample_stream import sample_ar, sample_bidirectional


@dataclass
class Config(ScaleOptions):  # ScaleOptions (wan_scale.py): --data / --model / --init-weights and the memory options
    phase: str = "base"  # "base" (stage 0, bidirectional) or "ar" (stage 1, teacher forcing from the base)
    frames_per_block: int = 1  # ar: 1 = frame-wise, 3 = chunk-wise
    diffusion_forcing: bool = False  # ar: train the diffusion-forcing ablation instead of teacher forcing
    shift: float = 2.0  # base: timestep shift every later stage inherits. Wan uses 5 for 1560-token latent
    # frames; a 16x16 toy frame is destroyed at lower noise, so 5 would spend most steps on pure-noise inputs
    base_steps: int = 7000  # optimizer steps of --phase base (with --actions: world_steps)
    world_steps: int = 600  # --phase base --actions: steps fine-tuning the plain base into the world model's base
    world_ar_steps: int = 3000  # --phase ar --actions: the world AR teacher's steps (docs/RESULTS.md: 0.51 action
    # accuracy at 1,000, 0.88 at 3,000)
    plain_base: str = ""  # --phase base --actions: the plain base to fine-tune ("": checkpoints/base.pt, else the
    # shipped pretrained/base.pt). Causal Forcing++ likewise fine-tunes its T2V base into the world model's
    ar_steps: int = 17000  # optimizer steps of --phase ar (docs/RESULTS.md, Teachers: 1,000 leave the next frame
    # given the real past 30.9% off, 10,000 solve it; 17,000 is the most a 60-min teacher budget allows on 2 cores)
    batch_size: int = 8  # the toy's choice for a 2-core CPU (officially 64, on GPUs)
    lr: float = 1e-3  # peak learning rate (warmup, then cosine decay to lr/10)
    warmup: int = 100  # linear warm-up steps (0: none)
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # the gradient's global norm is clipped to this
    ema_decay: float = 0.995  # EMA of the weights, used for every sample and for the next stage
    prompt_dropout: float = 0.1  # fraction of prompts replaced by "" (the unconditional branch for CFG)
    ar_weighting: str = "bell"  # ar: per-t loss weight, "bell" (official stage 1, ~0 at both ends) or "uniform"
    base_weighting: str = "uniform"  # base: per-t loss weight, "uniform" (plain flow matching) or "bell"
    eval_every: int = 2000  # a progress GIF (+ rough metrics of its 18 clips) every this many steps
    ckpt_every: int = 250  # atomic checkpoint every this many steps (X.partial.pt until the run ends, then X.pt)
    eval_clips: int = 72  # clips of the final evaluation (8 per prompt). More clips on a finished run:
    # --eval-only --eval-clips 288 prints that evaluation without touching the checkpoint
    eval_steps: int = 48  # Euler steps of the evaluation sampler
    guidance: float = 3.0  # CFG weight w of the evaluation sampler (v = v_u + w (v_c - v_u))
    out_dir: str = "checkpoints"  # where checkpoints and sample GIFs go (later stages read theirs here)
    seed: int = 0  # seeds data, noise and weights: the same seed on a CPU gives the same run
    device: str = "auto"  # auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps
    resume: bool = False  # continue this run from its last checkpoint (X.partial.pt, else X.pt), exactly
    ship: bool = False  # also write the fp16 EMA weights to pretrained/ (the files this repository ships)
    eval_only: bool = False  # print the closing evaluation of the finished teacher (this run's, or the shipped one)


SHIPPED_DIR = "pretrained"  # toy teachers shipped with the repository, so stage 2 can start in seconds


def checkpoint_path(cfg):
    """Later stages find the teachers by these names."""
    if cfg.phase == "base":
        return os.path.join(cfg.out_dir, "base.pt")
    if cfg.diffusion_forcing:
        name = "ar_diffusion_forcing" + ("" if cfg.frames_per_block == 1 else f"_fpb{cfg.frames_per_block}")
    else:
        name = {1: "ar_teacher", 3: "ar_teacher_chunkwise"}.get(cfg.frames_per_block,
                                                                f"ar_teacher_fpb{cfg.frames_per_block}")
    return os.path.join(cfg.out_dir, name + ".pt")


def make_command(cfg):
    """The command that (re)makes a checkpoint, for error messages."""
    cmd = f"python ar_teacher.py --phase {cfg.phase}"
    if cfg.phase == "ar" and cfg.frames_per_block != 1:
        cmd += f" --frames-per-block {cfg.frames_per_block}"
    if cfg.phase == "ar" and cfg.diffusion_forcing:
        cmd += " --diffusion-forcing"
    return cmd + run_flags(cfg)


def find_teacher(cfg):
    """The teacher checkpoint a later stage should read: the run's own, else (for the default out_dir) the one
    shipped in pretrained/ (pretrained/world/ for the world model), else None."""
    path, shipped = checkpoint_path(cfg), shipped_path(cfg)
    if os.path.exists(path):
        return path
    if cfg.out_dir == (WORLD_DIR if cfg.actions else Config.out_dir) and os.path.exists(shipped):
        return shipped
    return None


def shipped_path(cfg):
    """Where pretrained/ keeps this teacher (it may not ship one)."""
    return os.path.join(SHIPPED_DIR, "world" if cfg.actions else "", os.path.basename(checkpoint_path(cfg)))


def remake_hint(cfg):
    """The command that makes a missing teacher, and, for another --out-dir than the default, the shipped copy."""
    shipped = shipped_path(cfg)
    return make_command(cfg) + (f"\n    or start from the shipped one (pretrained/ serves only the default --out-dir): "
                                f"cp {shipped} {cfg.out_dir}/" if os.path.exists(shipped) else "")


def load_teacher(out_dir="checkpoints", phase="ar", frames_per_block=1, diffusion_forcing=False, device="cpu",
                 actions=False):
    """Load a finished teacher (its EMA weights) for a later stage; a missing one names the command that makes it,
    a world model without `actions` (or the reverse) says so."""
    cfg = Config(phase=phase, frames_per_block=frames_per_block, diffusion_forcing=diffusion_forcing, out_dir=out_dir,
                 actions=actions)
    path = find_teacher(cfg) or checkpoint_path(cfg)
    if path.startswith(SHIPPED_DIR):
        print(f"using the shipped teacher {path} (regenerate it with: {make_command(cfg)} --ship)")
    ckpt = load_checkpoint(path, stage="base" if phase == "base" else "ar_teacher", make_cmd=remake_hint(cfg))
    check_actions(actions, ModelConfig(**ckpt["model_config"]))
    return model_from_checkpoint(ckpt, key="ema", device=device).eval(), ckpt



def load_base(cfg, device="cpu"):
    """The bidirectional base a stage builds on: Wan2.1 itself with --init-weights (Wan scale, no stage 0), else
    the toy base that --phase base trains (or the shipped one)."""
    if cfg.init_weights:
        return wan_base(cfg.model, cfg.init_weights, device)
    if cfg.data != "toy":
        raise ConfigError(f"--data {cfg.data}: at Wan scale the base is Wan2.1; pass --model wan2.1-1.3b --init-weights "
                         f"<folder with diffusion_pytorch_model.safetensors>")
    return load_teacher(cfg.out_dir, phase="base", device=device, actions=cfg.actions)

def world_from_plain_base(model, cfg):
    """The world model's base initialised from the plain base's EMA weights (every weight but the action embedding,
    which stays zero: until it trains, the world model samples exactly as the plain base does)."""
    if cfg.plain_base:
        ckpt = load_checkpoint(cfg.plain_base, stage="base", make_cmd="python ar_teacher.py --phase base")
    else:
        plain = Config(phase="base")
        path = find_teacher(plain)
        if path is None:
            raise FileNotFoundError(f"--phase base --actions fine-tunes the plain base, and there is none: make it "
                                    f"with {make_command(plain)}, or name one with --plain-base")
        ckpt = load_checkpoint(path, stage="base", make_cmd=make_command(plain))
    if ckpt["model_config"].get("num_actions"):
        raise ConfigError("--plain-base: that checkpoint is already a world model; name the plain base")
    want = {k: v.shape for k, v in model.state_dict().items() if k != "action_embedding.weight"}
    problem = describe_mismatch(want, {k: v.shape for k, v in ckpt["ema"].items()}, "plain base")
    if problem:
        raise ConfigError(f"--plain-base: its weights do not fit this world model: {problem}")
    model.load_state_dict({k: v.float() for k, v in ckpt["ema"].items()}, strict=False)
    print(f"world base: starting from the plain base ({cfg.plain_base or path}, step {ckpt['step']}), action "
          f"embedding zero")
    return model


def ship(path):
    """Write the fp16 EMA weights of a finished checkpoint, with its configs and metrics, to pretrained/."""
    ckpt = load_checkpoint(path)
    ema = {k: v.half() for k, v in ckpt["ema"].items()}
    keep = {k: ckpt[k] for k in ("stage", "model_config", "config", "step", "metrics", "minutes") if k in ckpt}
    dest = os.path.join(SHIPPED_DIR, "world" if ckpt["model_config"].get("num_actions") else "", os.path.basename(path))
    save_checkpoint(dest, **keep, ema=ema, model=ema)  # one copy on disk: torch.save stores shared tensors once
    print(f"shipped {dest} ({os.path.getsize(dest) / 2 ** 20:.1f} MiB)")


# -----------------------------------------------------------------------------------------------------------
# The losses


def sample_t(grid, batch, n_blocks, frames_per_block, generator, device):
    """One timestep index per block, uniform on the 1000-grid (so t is skewed to high noise by the shift),
    copied to every frame of the block: (B, F)."""
    idx = torch.randint(0, len(grid), (batch, n_blocks), generator=generator)
    return grid[idx].repeat_interleave(frames_per_block, dim=1).to(device)


def flow_matching_loss(model, x0, ctx, t, eps, shift, weighted, **path):
    """Velocity MSE: mean_{b,f} w(t_bf) mean_{c,h,w} (v_theta - (eps - x0))^2, with the official stage-1 bell
    weight w(t) when `weighted`, else w = 1 (plain flow matching, stage 0). The bell is ~0 at both ends of the
    grid; the toy base needs its low-noise end to draw crisp edges, the AR teacher inherits them from the base.
    `path` picks the attention: {} bidirectional, clean=x0 teacher forcing, or frames_per_block only
    (diffusion forcing)."""
    x_t = add_noise(x0, eps, t)  # x_t = (1 - s) x0 + s eps, per frame
    v = model(x_t, t, ctx, **path)
    per_frame = (v - (eps - x0)).pow(2).mean(dim=(2, 3, 4))  # (B, F)
    if weighted:
        per_frame = loss_weight(t.cpu(), shift).to(v.device) * per_frame
    return per_frame.mean()


# -----------------------------------------------------------------------------------------------------------
# Evaluation


def eval_prompts(n):
    return [toy_data.PROMPTS[i % len(toy_data.PROMPTS)] for i in range(n)]


@torch.no_grad()
def generate(model, cfg, n, seed, text):
    """n clips from fixed noise (same seed -> same clips), sampled the way the stage's model is meant to be; a world
    model under the scripted random actions of toy_data.eval_actions. Returns (clips, prompts, actions or None)."""
    g = torch.Generator().manual_seed(seed)
    dev = next(model.parameters()).device
    prompts = eval_prompts(n)
    noise = torch.randn(n, toy_data.FRAMES, 3, toy_data.SIZE, toy_data.SIZE, generator=g).to(dev)
    ctx, ctx_null = text(prompts).to(dev), text([""] * n).to(dev)
    actions = toy_data.eval_actions(n) if cfg.actions else None
    a = None if actions is None else actions.to(dev)
    if cfg.phase == "base":
        clips = sample_bidirectional(model, noise, ctx, ctx_null, cfg.eval_steps, cfg.guidance, actions=a)
    else:
        clips = sample_ar(model, noise, ctx, ctx_null, cfg.eval_steps, cfg.guidance, cfg.frames_per_block, actions=a)
    return clips.cpu(), prompts, actions


@torch.no_grad()
def next_frame_report(model, cfg, n, text, seed=4321):
    """Teacher forcing's own test: give the AR teacher the *real* past of a clip and ask for the next block.

    From two real frames on, the toy's motion is determined (constant velocity, bounces), so a perfect teacher puts
    the shape exactly where the clip has it; the error measures how well teacher forcing learned its one-step
    task, free of the drift of the teacher's own rollouts (the evaluator's `physics` mixes both). Same sampler as
    `generate` (N-step Euler, CFG); the measurement is toy_data.next_block_report (keys off, rms, real_rms, frames)."""
    return toy_data.next_block_report(continuation(model, cfg, text), n, cfg.frames_per_block, seed=seed)


def continuation(model, cfg, text):
    """continue_clip(prefix, noise, prompts) for the toy's reports: the new frames after the clean frames `prefix`,
    sampled as `generate` does (N-step Euler with CFG, block by block through the KV cache)."""
    dev = next(model.parameters()).device

    @torch.no_grad()
    def continue_clip(prefix, noise, prompts):
        ctx, ctx_null = text(prompts).to(dev), text([""] * len(prompts)).to(dev)
        return sample_ar(model, noise.to(dev), ctx, ctx_null, cfg.eval_steps, cfg.guidance, cfg.frames_per_block,
                         prefix=prefix.to(dev)).cpu()

    return continue_clip


@torch.no_grad()
def denoiser_gap(model, cfg, text, n, seed=99, sigmas=(0.95, 0.9, 0.85, 0.8, 0.7, 0.5, 0.3)):
    """Where in noise level the teacher falls short of the best possible denoiser. The toy's data law is finite, so
    E[x0 | x_t] is computed exactly (toy_data.exact_x0); on n real clips noised to each s, this returns
    {s: (the model's x0 MSE, the exact denoiser's x0 MSE[, the exact frame-alone denoiser's])} against the clean
    clips. The exact MSE is the floor: large at s near 1 (the clip is not decided yet), 0 below s of about 0.7 (it
    is). The base is asked the bidirectional question (every frame at s), the AR teacher the teacher-forcing one
    (clean past, block at s). For the base a third number: the exact denoiser of each frame from its own noise
    alone, which pools nothing across frames; a base that matches it has not learned to use the other frames."""
    dev = next(model.parameters()).device
    prompts = eval_prompts(n)
    x0, _ = toy_data.sample_clips(n, seed=seed, prompts=prompts)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    ctx = text(prompts).to(dev)
    out = {}
    for s in sigmas:
        t = torch.full(x0.shape[:2], 1000 * s)
        x_t = add_noise(x0, eps, t)
        path = {} if cfg.phase == "base" else dict(clean=x0.to(dev), frames_per_block=cfg.frames_per_block)
        x0_model = x0_from_v(x_t.to(dev), model(x_t.to(dev), t.to(dev), ctx, **path), t.to(dev)).cpu()
        past = None if cfg.phase == "base" else x0
        floors = [toy_data.exact_x0(x_t, t[:, 0], prompts, past=past, frames_per_block=cfg.frames_per_block)]
        if cfg.phase == "base":  # and the exact denoiser that sees each frame alone
            floors.append(toy_data.exact_x0(x_t, t[:, 0], prompts, frames_alone=True))
        out[s] = tuple((x - x0).pow(2).mean().item() for x in [x0_model] + floors)
    return out


def gap_line(gap):
    return "  ".join(f"s {s}: " + "/".join(f"{e:.3f}" for e in errors) for s, errors in gap.items())


# -----------------------------------------------------------------------------------------------------------
# Training


def check_flags(cfg):
    """The flags' own errors, before any work (a training run or --eval-only)."""
    if cfg.phase not in ("base", "ar"):
        raise ConfigError(f"--phase must be 'base' or 'ar' (got {cfg.phase!r})")
    for flag, weighting in (("--base-weighting", cfg.base_weighting), ("--ar-weighting", cfg.ar_weighting)):
        if weighting not in ("uniform", "bell"):
            raise ConfigError(f"{flag} must be 'uniform' or 'bell' (got {weighting!r})")
    if cfg.phase == "base" and cfg.diffusion_forcing:
        raise ConfigError("--diffusion-forcing is an ablation of the AR teacher: add --phase ar")
    if cfg.plain_base and not (cfg.phase == "base" and cfg.actions):
        raise ConfigError("--plain-base is the plain base a world base starts from: it needs --phase base --actions")
    if cfg.ship and cfg.eval_only:
        raise ConfigError("--ship writes a run's weights as it finishes; --eval-only trains nothing: drop one (a "
                          "finished run ships with --resume --ship)")
    if cfg.phase == "ar" and cfg.shift != Config.shift:  # the AR teacher reads its schedule from its base
        raise ConfigError(f"--shift sets the base's schedule (--phase base --shift {cfg.shift:g}); the AR teacher "
                          f"inherits its base's: drop --shift")


def train(cfg):
    check_flags(cfg)
    if cfg.dry_run:  # the plan of one training step, before anything is loaded
        return dry_run("ar" if cfg.phase == "ar" else "base", cfg, cfg.batch_size, cfg.frames_per_block, momentum=True)
    part, device = start_distributed(pick_device(cfg.device))  # torchrun: this process's share (wan_scale.Part)
    limit_memory(device, cfg.memory_cap_gib)
    torch.manual_seed(cfg.seed)
    path = checkpoint_path(cfg)
    part.check(cfg)
    other_phase = ("ar_steps", "world_ar_steps", "ar_weighting") if cfg.phase == "base" else (
        "base_steps", "world_steps", "base_weighting", "plain_base")  # settings this phase does not read
    src, ckpt = start_run(path, cfg, "base" if cfg.phase == "base" else "ar_teacher", make_command(cfg),
                          free=(*RUN_PLACE, *other_phase, "ship", "eval_only", "eval_every", "ckpt_every",
                                "eval_clips"))

    # the model: a fresh toy DiT for the base; the base's EMA weights (or Wan2.1's) for the AR teacher
    if cfg.phase == "base":
        if cfg.data != "toy" or cfg.init_weights:
            raise ConfigError("stage 0 is skipped at Wan scale: the base is Wan2.1 itself. Train the AR teacher from it:"
                             "\n    python ar_teacher.py --phase ar --model wan2.1-1.3b --init-weights <Wan2.1 folder> "
                             "--data <latent folder>")
        mcfg = ModelConfig(**{**asdict(PRESETS[cfg.model]), "shift": cfg.shift,
                              "num_actions": len(toy_data.ACTIONS) if cfg.actions else 0})
        model = DiT(mcfg)
        if cfg.actions:  # the world's base starts as the plain base: its zero-initialised action embedding is new
            model = world_from_plain_base(model, cfg)
    else:
        model, _ = load_base(cfg)
        mcfg = model.cfg
    data = open_data(cfg.data, mcfg, cfg.clip_frames, cfg.actions)
    n_frames = data.shape[0]
    if n_frames % cfg.frames_per_block:
        raise ConfigError(f"--frames-per-block {cfg.frames_per_block} must divide the {n_frames} frames of a clip")
    model = prepare(model, cfg.param_dtype, cfg.grad_checkpointing).to(device).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    model, ema = shard(model, part), shard(ema, part)  # FSDP2 under torchrun; else unchanged
    opt = make_optimizer(model.parameters(), cfg.optimizer, cfg.lr, (0.9, 0.99), cfg.weight_decay)
    data_gen = torch.Generator().manual_seed(cfg.seed)  # clips, prompt dropout, timesteps
    noise_gen = torch.Generator().manual_seed(cfg.seed + 1)
    step, history = 0, []
    if ckpt is not None:
        load_whole(model, ckpt["model"])  # = model.load_state_dict for one process; any N can resume any N's run
        load_whole(ema, ckpt["ema"])
        load_whole_optimizer(opt, ckpt["optimizer"])
        data_gen.set_state(ckpt["data_gen"])
        noise_gen.set_state(ckpt["noise_gen"])
        step, history = ckpt["step"], ckpt["history"]
        print(f"resumed {src} at step {step}")

    print(f"{cfg.phase}: {count_parameters(model):,} parameters, {model.tokens_per_frame(*data.shape[1:])} "
          f"tokens/frame, {n_frames} frames, shift {mcfg.shift}, device {device}")
    print(cfg)
    grid = timestep_grid(1000, mcfg.shift)
    fpb = cfg.frames_per_block if cfg.phase == "ar" else n_frames  # base: one block = the whole clip
    n_blocks = n_frames // fpb

    def save():  # until step == steps to X.partial.pt (model.save_run): a finished X.pt is never overwritten mid-run
        states = whole(dict(model=model.state_dict(), ema=ema.state_dict(), optimizer=opt.state_dict()), part)  # all ranks
        on_main(part, lambda: save_run(
            path, step == steps, stage="base" if cfg.phase == "base" else "ar_teacher", model_config=asdict(mcfg),
            config=asdict(cfg), **states, step=step, history=history, data_gen=data_gen.get_state(),
            noise_gen=noise_gen.get_state()))

    def write_gif(clips):  # the first 18 clips (2 per prompt) of the EMA model at this step
        gif = os.path.join(cfg.out_dir, "samples", f"{os.path.basename(path)[:-3]}_step{step}.gif")
        os.makedirs(os.path.dirname(gif), exist_ok=True)
        toy_data.save_video(gif, clips[:18], ncols=9, labels=eval_prompts(18),
                            title=f"{os.path.basename(path)[:-3]}, step {step}: {cfg.eval_steps}-step Euler, "
                                  f"CFG {cfg.guidance:g}, EMA weights")
        return gif

    steps = {("base", False): cfg.base_steps, ("base", True): cfg.world_steps, ("ar", False): cfg.ar_steps,
             ("ar", True): cfg.world_ar_steps}[cfg.phase, cfg.actions]
    t_start, step_at_start = time.time(), step
    pbar = tqdm(total=steps, initial=step, desc=cfg.phase, dynamic_ncols=True, disable=part.rank > 0)
    while step < steps:
        # learning rate: linear warmup, then cosine to lr/10
        frac = min(1.0, (step + 1) / cfg.warmup) if step < cfg.warmup else \
            0.55 + 0.45 * math.cos(math.pi * (step - cfg.warmup) / max(1, steps - cfg.warmup))
        for group in opt.param_groups:
            group["lr"] = cfg.lr * frac

        # the global batch's draws, in one order; under torchrun each process keeps its rows (part)
        x0, ctx, null, _, actions = map(part, data.batch(cfg.batch_size, generator=data_gen))
        drop = part.rand(len(x0), generator=data_gen) < cfg.prompt_dropout
        ctx = torch.where(drop[:, None, None], null, ctx).to(device)  # dropped prompts -> the unconditional text
        t = part(sample_t(grid, cfg.batch_size, n_blocks, fpb, data_gen, device))  # (B, F)
        eps = part.randn(x0.shape, generator=noise_gen).to(device)
        x0 = x0.to(device)
        if cfg.phase == "base":
            path_kw = {}
        elif cfg.diffusion_forcing:
            path_kw = dict(frames_per_block=fpb)  # noisy prefix, block-causal: what the model sees is not what it gets
        else:
            path_kw = dict(clean=x0, frames_per_block=fpb)  # ground-truth clean context at t = 0
        if actions is not None:  # the world model: frame i (and its clean copy) hears its action a_i
            path_kw["actions"] = actions.to(device)
        with autocast(device, model):
            loss = flow_matching_loss(model, x0, ctx, t, eps, mcfg.shift, (cfg.ar_weighting if cfg.phase == "ar" else cfg.base_weighting) == "bell",
                                      **path_kw)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        ema_update(ema, model, min(cfg.ema_decay, (1 + step) / (10 + step)))  # warmup: short runs forget the init
        step += 1
        history.append(mean_over_processes(loss.item(), part))  # the global batch's loss
        pbar.update(1)
        pbar.set_postfix(loss=f"{sum(history[-50:]) / len(history[-50:]):.4f}")

        if data.is_toy and step % cfg.eval_every == 0 and step < steps:  # progress: a GIF of the EMA model
            clips, eval_p, acts = generate(ema, cfg, 18, seed=1234, text=data.text)  # 18 clips: rough metrics, cheap
            if part.rank == 0:
                tqdm.write(f"step {step} (18 clips): {metric_line(toy_data.evaluate(clips, eval_p, actions=acts))}  "
                           f"-> {write_gif(clips)}")
        if step % cfg.ckpt_every == 0 or step == steps:
            save()
    pbar.close()
    report_memory(device, "ar" if cfg.phase == "ar" else "base", cfg, cfg.batch_size, cfg.frames_per_block, momentum=True)
    name = os.path.basename(path)
    if not data.is_toy:  # Wan scale: no toy evaluator; sample the teacher with sample_stream.py
        minutes = (time.time() - t_start) / 60
        print(f"{name} | {step} steps, loss {sum(history[-50:]) / max(1, len(history[-50:])):.4f} | {minutes:.1f} min")
        on_main(part, lambda: save_checkpoint(path, **{**load_checkpoint(path), "minutes": minutes}))
        return {}

    # the closing evaluation: the EMA model's samples beside real clips of the same count
    trained = step_at_start < steps
    ckpt = load_checkpoint(path)
    minutes = run_minutes(t_start, ckpt, trained)  # a re-evaluation keeps the training's
    metrics, clips = report(ema, cfg, name, data.text, minutes)  # every process samples (FSDP), process 0 writes
    if trained:
        on_main(part, lambda: write_gif(clips))
    if cfg.eval_clips != ckpt["config"]["eval_clips"]:  # a re-evaluation with another clip count: keep the record
        return metrics
    on_main(part, lambda: save_checkpoint(path, **{**ckpt, "metrics": metrics, "minutes": minutes}))
    if cfg.ship:
        on_main(part, lambda: ship(path))
    return metrics


def report(ema, cfg, name, text, minutes):
    """A teacher's closing evaluation, printed: the evaluator on cfg.eval_clips samples beside real clips; prompt
    accuracy with its 95% interval (about +-0.07 at 72 clips and 0.9, +-0.035 at 288); the x0 error per noise level
    beside the exact denoiser's; for an AR teacher the next block given the real past and on its own past.
    Returns (metrics, clips)."""
    clips, eval_p, actions = generate(ema, cfg, cfg.eval_clips, seed=1234, text=text)
    metrics = toy_data.evaluate(clips, eval_p, actions=actions)
    real = toy_data.real_metrics(cfg.eval_clips, seed=0, actions=cfg.actions)
    acc, n, pad = metrics["prompt_acc"], cfg.eval_clips, " " * len(name)
    print(f"{name} | {cfg.eval_steps}-step CFG {cfg.guidance} | {metric_line(metrics)} | {minutes:.1f} min")
    print(f"{'real clips':>{len(name)}} | {metric_line(real)}")
    lo, hi = toy_data.accuracy_interval(acc, n)
    print(f"{pad} | prompt accuracy {acc:.3f} over {n} clips, 95% interval {lo:.3f}-{hi:.3f} (Wilson)")
    if cfg.actions:  # the exact denoiser and the next-frame test know the plain toy's law only
        return metrics, clips
    print(f"{pad} | x0 MSE per noise level s, model/exact denoiser{'/exact, each frame alone' * (cfg.phase == 'base')}: "
          f"{gap_line(denoiser_gap(ema, cfg, text, 2 * n))}")
    steps = toy_data.step_report(clips, eval_p)
    per_pair = " / ".join(f"{x:.1%}" for x in steps["per_pair"])
    true_box = toy_data.true_box_per_frame(clips, eval_p)  # (F,)
    print(f"{pad} | steps of {toy_data.SPEED:g} px per axis off by >= 0.5 px, per frame pair: {per_pair} (all "
          f"{steps['off']:.1%}; real clips: 0); shape resized between frames in {steps['resized']:.1%} of pairs "
          f"(real clips: 0); the shape's true size in " + " / ".join(f"{x:.0%}" for x in true_box)
          + f" of frames 0-{len(true_box) - 1} (real clips: 100%)")
    if cfg.phase == "ar":
        nf = next_frame_report(ema, cfg, n, text)
        print(f"{pad} | next block given the real past (frames {nf['frames'][0]}-{nf['frames'][1]}): "
              f"{nf['off']:.1%} of coordinates off by >= 0.5 px, RMS error {nf['rms']:.2f} px "
              f"(real frames: {nf['real_rms']:.2f} px)")
        own = toy_data.own_step_report(clips, eval_p)
        print(f"{pad} | the same on its own rollouts (frame i vs its own frames i-2, i-1): "
              f"{own['off']:.1%} off by >= 0.5 px; exposure-bias gap {own['off'] - nf['off']:+.1%}; "
              f"{own['off_rigid']:.1%} off where the shape keeps its size ({own['rigid']:.0%} of checks)")
        if cfg.frames_per_block == 1:  # where the physics residual comes from: the free first step or later
            pr = toy_data.prefix_report(continuation(ema, cfg, text), n)
            print(f"{pad} | rollouts continuing 0 / 1 / 2 real frames: physics "
                  + " / ".join(f"{r['physics']:.3f}" for r in pr.values()) + "; the first generated step off "
                  + " / ".join(f"{r['step']:.1%}" for r in pr.values())
                  + " (with 0 or 1 real frames its direction is a free choice of 4; 2 real frames determine it)")
    return metrics, clips


def evaluate_only(cfg):
    """--eval-only: the closing report of a finished toy teacher (this run's checkpoint, else the shipped one)."""
    check_flags(cfg)
    teacher = find_teacher(cfg)
    if teacher is None:
        raise FileNotFoundError(f"{checkpoint_path(cfg)} not found (nor a shipped one); make it with: "
                                f"{make_command(cfg)}")
    ckpt = load_checkpoint(teacher, stage="base" if cfg.phase == "base" else "ar_teacher", make_cmd=make_command(cfg))
    check_actions(cfg.actions, ModelConfig(**ckpt["model_config"]))
    model = model_from_checkpoint(ckpt, key="ema", device=pick_device(cfg.device)).eval().float()
    print(f"evaluating {teacher} (step {ckpt['step']})")
    return report(model, cfg, os.path.basename(teacher), toy_data.TextEncoder(), ckpt.get("minutes", 0.0))[0]


if __name__ == "__main__":
    config = parse_config(Config, description=__doc__.split("\n\n")[0])
    run_main(evaluate_only if config.eval_only else train, config)
