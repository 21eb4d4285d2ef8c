"""
dmd.py — stage 3: asymmetric distribution matching distillation with self rollout (Self Forcing), the last stage
of CausVid, Self Forcing, Causal Forcing and Causal Forcing++; and the toy version of Causal Forcing++ Table 2.

Stage 2 gives a few-step causal generator that was trained on ground-truth context (teacher forcing): at
inference it conditions on its *own* past, a train/test gap (exposure bias). Stage 3 closes it: the generator
rolls out whole clips through the KV cache exactly as at inference, and a distribution-level loss pulls the
distribution of those clips towards the data's, as judged by two bidirectional scores:

    rollout (sample_stream, exit step)   x = G(noise)                    one random exit step index, shared by
                                                                         all blocks; steps before it and the
                                                                         t = 0 cache writes run without grad
    t = shift(U[0, 1000)) clamped to [20, 980]; x_t = (1 - s) x + s eps   (one t per clip, all frames)
    x0_real = real score (frozen bidirectional base) with CFG            "where the data distribution points"
    x0_fake = fake score (trainable bidirectional critic, no CFG)        "where the generator's distribution points"
    g = (x0_fake - x0_real) / mean|x - x0_real|                          DMD gradient, normalised per clip
    loss_G = 0.5 * MSE(x, stopgrad(x - g))                               so that dloss/dx = g / numel
    loss_critic = flow matching on a fresh no-grad rollout               the critic tracks the generator
    5 critic updates per generator update; EMA of the generator for sampling.

"Asymmetric": the generator is causal, both scores are bidirectional (they see whole clips, which is what
judging a video needs). The generator can start from any stage-2 checkpoint, `--init`:
    causal_cd          Causal Forcing++ (python causal_cd.py --toy)
    causal_ode         Causal Forcing   (python ode_init.py --teacher ar)
    bidirectional_ode  CausVid / Self Forcing init (python ode_init.py --teacher bidirectional)
    ar_teacher         the AR diffusion teacher itself (python ar_teacher.py --phase ar)
Frame-wise 1- and 2-step generators denoise block 0 with the 4-step list (Causal Forcing++: the first frame has
no past to lean on), later blocks with the short list; each list has its own random exit step.

What to watch in the log: loss_g (0.5 mean g^2, so it tracks |g|), the critic's flow-matching loss, |g| (the
mean magnitude of the normalised DMD gradient) and, every 10 updates, the evaluator's metrics of EMA samples with
a second line: how often the next frame misses the motion given the real past and given the model's own past
(their gap is exposure bias, what self rollout should shrink), the mean foreground area per frame (a CFG push
grows the shapes) and `critic_fit`, how much better the critic fits the generator's clips than the base it started
from (0 at the start, negative once it has learned the generator). At the official step sizes on causal CD 2-step
(`--seed 0/1/2`; each checkpoint's `log`), |g| stays within 0.80-0.92 and the critic loss within 0.07-0.31
(single batches, noisy) over 100 updates, with no trend (a critic loss that climbs steadily, or |g| that
grows, would suggest the critic has lost track of the generator), and critic_fit ends at -1.7 +- 0.1%: the fake
score has barely left the base, so g stays close to the real score's CFG push. docs/RESULTS.md, Stage 3, says what
DMD does on the toy, measured, and what the critic does ("Does the critic learn the generator?").

Differences from the official code (thu-ml/Causal-Forcing, guandeh17/Self-Forcing): the real score is the
toy's bidirectional base (officially Wan2.1-14B), or with --real-score exact the toy's exact data score; the critic
starts from the base (officially 1.3B); the official step sizes (G 2e-6, critic 4e-7) but toy batch and length;
one Python process, no FSDP. The CFG weight is written in the
`uncond + w (cond - uncond)` convention used everywhere in this repository: w = 4 here equals the official
`cond + 3 (cond - uncond)`.

Commands:
    python dmd.py --init causal_cd --num-steps 2      # one DMD run (stage-2 checkpoint must exist)
    python dmd.py --init causal_cd --num-steps 2 --actions   # the world model's: rollouts under random actions
    python dmd.py --init causal_cd --num-steps 2 --real-score exact --real-guidance 1   # against the exact score
    python dmd.py --init causal_cd --num-steps 2 --model wan2.1-1.3b --init-weights WAN_DIR --data LATENT_DIR ...
                                                      # Wan scale: Wan2.1 is the real score (README)
    python dmd.py --table                             # the toy Table 2: 4 inits x {1, 2, 4} steps, before and
                                                      # after DMD, with frames/s and first-frame latency;
                                                      # --table --resume reuses the runs already finished
"""
import copy
import json
import os
import time
from dataclasses import dataclass, asdict

import torch
from tqdm import tqdm

import ar_teacher
import causal_cd
import ode_init
import toy_data
from model import (ConfigError, add_noise, autocast, check_num_steps, ema_update, load_checkpoint,
                   model_from_checkpoint, parse_config, pick_device, run_main, save_run, shift_sigma, start_run,
                   warped_steps, x0_from_v)
from wan_scale import (RUN_PLACE, ScaleOptions, dry_run, limit_memory, load_whole, load_whole_optimizer,
                       make_optimizer, mean_over_processes, on_main, open_data, prepare, report_memory, run_flags,
                       shard, start_distributed, whole)
from sample_stream import (cfg_velocity, exposure_line, sample_stream, stream_speed, toy_exposure_report,
                           toy_few_step_samples)

INITS = ("bidirectional_ode", "ar_teacher", "causal_ode", "causal_cd")  # the table's row order (CF++ Table 2)
METRICS = ("blur", "second_moment", "prompt_acc", "motion", "motion_gap", "physics", "fd")  # toy_data.evaluate


@dataclass
class Config(ScaleOptions):  # ScaleOptions (wan_scale.py): --data / --model / --init-weights (the real score at Wan
    # scale) and the memory options
    init: str = "causal_cd"  # causal_cd | causal_ode | bidirectional_ode | ar_teacher
    num_steps: int = 4  # denoising steps per block: 1, 2 or 4
    frames_per_block: int = 1  # 1 = frame-wise, 3 = chunk-wise (the init checkpoint must match)
    gen_updates: int = 100  # generator updates; the critic gets critic_ratio times as many (docs/RESULTS.md: the sweep)
    critic_ratio: int = 5  # critic updates per generator update (official dfake_gen_update_ratio)
    critic_warmup: int = 0  # critic-only updates before the first generator update (not in the official code)
    batch_size: int = 16  # self-rollout clips per generator / critic update
    lr: float = 2e-6  # generator (official 2e-6)
    lr_critic: float = 4e-7  # official 4e-7: the critic moves 5x slower per update than the generator
    real_guidance: float = 4.0  # CFG of the real score, uncond + w (cond - uncond) (= official cond + 3 (c - u))
    real_score: str = "base"  # toy: "base" (the trained bidirectional base, as officially Wan) or "exact" (the toy's
    # exact data score, toy_data.ExactScore: DMD against a perfect teacher; use it with --real-guidance 1)
    min_t: float = 20.0  # DMD timesteps are clamped to [min_t, max_t] (official 20 / 980)
    max_t: float = 980.0  # see --min-t
    ema_decay: float = 0.95  # official 0.99 over ~200 updates; a 100-update toy run needs a shorter memory
    ema_start: int = 10  # generator updates before the EMA starts (official: 200 iterations = 40 of ~200)
    eval_every: int = 10  # generator updates between evaluator lines
    eval_clips: int = 72  # clips of each evaluation (8 per prompt)
    ckpt_every: int = 10  # atomic checkpoint every this many generator updates
    out_dir: str = "checkpoints"  # where checkpoints and sample GIFs go (later stages read theirs here)
    seed: int = 0  # seeds prompts, noise, exit steps and t (the weights start from --init): same seed, same run
    device: str = "auto"  # auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps
    resume: bool = False  # continue this run from its last checkpoint (X.partial.pt, else X.pt), exactly
    table: bool = False  # run the whole toy table instead of one run
    table_seeds: int = 3  # --table: DMD seeds of each 2-step row (mean +- sd); the other rows run one seed
    table_steps: str = "1,2,4"  # --table: the step counts of its rows (e.g. "2": the headline row alone)
    table_inits: str = ",".join(INITS)  # --table: its rows' inits (a subset runs alone, e.g. two at a time in
    # separate --out-dir folders; their dmd_table_runs.json records merge, and --table --resume prints them all)


TABLE_FLAGS = ("table_seeds", "table_steps", "table_inits")  # settings of --table alone


def checkpoint_path(cfg):
    suffix = ("" if cfg.frames_per_block == 1 else f"_fpb{cfg.frames_per_block}") + (
        f"_seed{cfg.seed}" if cfg.seed else "")
    return os.path.join(cfg.out_dir, f"dmd_{cfg.init}_{cfg.num_steps}step{suffix}.pt")


def make_command(cfg):
    cmd = f"python dmd.py --init {cfg.init} --num-steps {cfg.num_steps}"
    return cmd + (f" --frames-per-block {cfg.frames_per_block}" if cfg.frames_per_block != 1 else "") + (
        f" --seed {cfg.seed}" if cfg.seed else "") + run_flags(cfg)


def load_init(init, out_dir, frames_per_block, device, actions=False):
    """The generator's starting point: a stage-2 student (its EMA weights) or the AR teacher."""
    if init == "causal_cd":
        return causal_cd.load_student(out_dir, frames_per_block, device, actions=actions)
    if init == "causal_ode":
        return ode_init.load_student(out_dir, "ar", frames_per_block, device, actions=actions)
    if init == "bidirectional_ode":
        return ode_init.load_student(out_dir, "bidirectional", frames_per_block, device, actions=actions)
    if init == "ar_teacher":
        return ar_teacher.load_teacher(out_dir, "ar", frames_per_block, device=device, actions=actions)
    raise ValueError(f"unknown init {init!r}")  # train() names the flag's choices before any work


def step_lists(num_steps, frames_per_block, shift):
    """(steps, first_block_steps): the warped list, and the 4-step list for block 0 of frame-wise 1/2-step models."""
    first = warped_steps(4, shift) if (frames_per_block == 1 and num_steps < 4) else None
    return warped_steps(num_steps, shift), first


# -----------------------------------------------------------------------------------------------------------
# The three pieces: rollout, DMD loss, critic loss


def rollout(generator, noise, ctx, steps, first_steps, frames_per_block, gen, actions=None, part=None):
    """Self-rollout with one random exit step index shared by all blocks (and one for block 0's own list).
    Gradient flows only through the exit steps (sample_stream runs everything else without grad). A world model
    takes each block's actions as it generates it."""
    exit_step = int(torch.randint(0, len(steps), (1,), generator=gen))
    exit_first = int(torch.randint(0, len(first_steps), (1,), generator=gen)) if first_steps else None
    return sample_stream(generator, noise, ctx, steps, frames_per_block, first_steps, generator=gen,
                         exit_step=exit_step, exit_step_first=exit_first, actions=actions, part=part)


def sample_dmd_t(batch, shift, min_t, max_t, gen):
    """t = 1000 * shift(u), u ~ U[0, 1), clamped to [min_t, max_t]: one t per clip (official DMD timesteps)."""
    u = torch.randint(0, 1000, (batch,), generator=gen).double() / 1000
    return (1000 * shift_sigma(u, shift)).clamp(min_t, max_t).float()


def dmd_loss(x, real, critic, ctx, ctx_null, guidance, t, eps, actions=None):
    """Generator loss of DMD on a rollout x (B, F, C, H, W) that carries gradient. Returns (loss, mean |g|).
    A world model's rollout is scored under its actions by both scores (CFG is on the text only)."""
    with torch.no_grad():
        x_t = add_noise(x.detach(), eps, t)
        x0_fake = x0_from_v(x_t, critic(x_t, t, ctx, actions=actions), t)  # fake score, conditional only
        x0_real = x0_from_v(x_t, cfg_velocity(real, x_t, t, ctx, ctx_null, guidance, actions=actions), t)  # real, CFG
        norm = (x.detach() - x0_real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)  # per-clip (DMD eq. 8)
        g = torch.nan_to_num((x0_fake - x0_real) / norm)
    loss = 0.5 * (x.double() - (x.detach() - g).double()).pow(2).mean()  # d loss / dx = g / numel
    return loss, g.abs().mean().item()


def critic_loss(critic, x, ctx, t, eps, actions=None):
    """Flow matching of the critic on generator samples x (no grad): it learns the generator's score."""
    x_t = add_noise(x, eps, t)
    return (critic(x_t, t, ctx, actions=actions) - (eps - x)).pow(2).mean()


@torch.no_grad()
def critic_fit(critic, base, x, ctx, actions=None, ts=(50, 200, 400, 600, 800, 950), seed=0):
    """How far the critic has learned the generator's distribution beyond the base it started from: the critic's
    flow-matching loss on the generator's clips x, noised at each t of `ts` with fixed noise, over the base's
    loss on the same inputs, minus 1, averaged over ts. 0 when the critic still equals the base (as at update 0);
    negative when it fits the generator's clips better. A mean near 0 can hide a gain at one t and a loss at
    another; near 0 at every t, the fake score is, as far as the generator's clips can tell, still the base's
    conditional score, and g is close to the real score's CFG push."""
    g = torch.Generator().manual_seed(seed)
    ratios = []
    for t in ts:
        eps = torch.randn(x.shape, generator=g).to(x.device)
        tt = torch.full(x.shape[:2], float(t), device=x.device)
        x_t = add_noise(x, eps, tt)  # critic_loss's formula written out: the resume tests count critic_loss calls
        loss = [(m(x_t, tt, ctx, actions=actions) - (eps - x)).pow(2).mean() for m in (critic, base)]
        ratios.append((loss[0] / loss[1]).item() - 1)
    return sum(ratios) / len(ratios)


# -----------------------------------------------------------------------------------------------------------
# Training


def train(cfg):
    if cfg.init not in INITS:
        raise ConfigError(f"--init must be one of {', '.join(INITS)} (got {cfg.init!r})")
    check_num_steps(cfg.num_steps, "--num-steps")
    if cfg.real_score not in ("base", "exact") or (cfg.real_score == "exact" and (cfg.data != "toy" or cfg.actions)):
        raise ConfigError(f"--real-score must be 'base' or, on the plain toy only (its data law is known), 'exact' "
                         f"(got {cfg.real_score!r} with --data {cfg.data}{' --actions' if cfg.actions else ''})")
    given = [k for k in TABLE_FLAGS if getattr(cfg, k) != getattr(Config, k)]
    if given:
        raise ConfigError(f"{', '.join('--' + k.replace('_', '-') for k in given)} shape the toy Table 2: add --table")
    if cfg.min_t >= cfg.max_t:
        raise ConfigError(f"--min-t {cfg.min_t:g} must be below --max-t {cfg.max_t:g} (DMD's t is clamped to [min_t, max_t])")
    if cfg.real_score == "exact" and cfg.real_guidance != 1:
        raise ConfigError(f"--real-score exact is the data law itself; CFG would push past it: add --real-guidance 1 "
                          f"(got --real-guidance {cfg.real_guidance:g})")
    if cfg.dry_run:  # the plan of one generator + critic update, before anything is loaded
        return dry_run("dmd", cfg, cfg.batch_size, cfg.frames_per_block, ema=cfg.ema_start > 0)
    t_start = time.time()
    part, device = start_distributed(pick_device(cfg.device))  # torchrun: this process's share (wan_scale.Part)
    limit_memory(device, cfg.memory_cap_gib)
    torch.manual_seed(cfg.seed)
    part.check(cfg)
    path = checkpoint_path(cfg)
    src, ckpt = start_run(path, cfg, "dmd", make_command(cfg),  # before loading
                          free=(*RUN_PLACE, "gen_updates", "eval_every", "eval_clips", "ckpt_every"))
    generator, init_ckpt = load_init(cfg.init, cfg.out_dir, cfg.frames_per_block, device, cfg.actions)
    data = open_data(cfg.data, generator.cfg, cfg.clip_frames, cfg.actions)
    n_frames, H, W = data.shape
    if n_frames % cfg.frames_per_block:
        raise ConfigError(f"--frames-per-block {cfg.frames_per_block} must divide the {n_frames} frames of a clip")
    real, _ = ar_teacher.load_base(cfg, device=device)  # the toy base, or Wan2.1 with --init-weights
    real = prepare(real, cfg.param_dtype).requires_grad_(False)
    critic = prepare(copy.deepcopy(real), cfg.param_dtype, cfg.grad_checkpointing)  # fake score: starts as the base
    base = real  # (kept for the critic-fit health number when the real score is the exact one)
    if cfg.real_score == "exact":  # the toy's data law itself as the real score; the critic still starts from the base
        real = toy_data.ExactScore()
    critic.train().requires_grad_(True)
    generator = prepare(generator, cfg.param_dtype, cfg.grad_checkpointing).train().requires_grad_(True)
    ema_model = copy.deepcopy(generator).eval().requires_grad_(False) if cfg.ema_start > 0 else None  # set at ema_start
    generator, critic = shard(generator, part), shard(critic, part)
    ema_model = shard(ema_model, part) if ema_model is not None else None
    if not isinstance(real, toy_data.ExactScore):
        real = shard(real, part)  # FSDP2 under torchrun (the frozen real score too); else all unchanged
    ema = None  # becomes ema_model at ema_start (official: EMA from step 200)
    opt_g = make_optimizer(generator.parameters(), cfg.optimizer, cfg.lr, (0.0, 0.999), 0.01)
    opt_c = make_optimizer(critic.parameters(), cfg.optimizer, cfg.lr_critic, (0.0, 0.999), 0.01)
    gen = torch.Generator().manual_seed(cfg.seed)  # prompts, noise, exit steps, DMD timesteps
    shift = generator.cfg.shift
    steps, first_steps = step_lists(cfg.num_steps, cfg.frames_per_block, shift)
    it, log = 0, []  # it counts critic updates; a generator update happens when it % critic_ratio == 0
    if ckpt is not None:
        load_whole(generator, ckpt["model"]), load_whole(critic, ckpt["critic"])  # any N resumes any N's run
        load_whole_optimizer(opt_g, ckpt["optimizer"]), load_whole_optimizer(opt_c, ckpt["optimizer_critic"])
        if ckpt["ema_started"]:
            ema = ema_model
            load_whole(ema, ckpt["ema"])
        gen.set_state(ckpt["rng"])
        it, log = ckpt["iteration"], ckpt["log"]
        print(f"resumed {src} at generator update {it // cfg.critic_ratio}")
    print(f"dmd: init {cfg.init} ({init_ckpt['stage']}), {cfg.num_steps}-step list {[round(s, 1) for s in steps]}"
          + (f", block 0 on {[round(s, 1) for s in first_steps]}" if first_steps else "") + f", device {device}")
    print(cfg)

    def batch():  # prompts (and actions) only: the clips DMD trains on are the generator's own rollouts
        ctx, null, _, actions = map(part, data.texts(cfg.batch_size, generator=gen))  # torchrun: own rows
        noise = part.randn((cfg.batch_size // part.world, n_frames, data.channels, H, W), generator=gen)
        return ctx.to(device), null.to(device), noise.to(device), None if actions is None else actions.to(device)

    def dmd_t_eps(like):
        t = part(sample_dmd_t(cfg.batch_size, shift, cfg.min_t, cfg.max_t, gen)).to(device)
        return t, part.randn(like.shape, generator=gen).to(device)

    def save(finished=False):  # unfinished: X.partial.pt (model.save_run)
        states = whole(dict(model=generator.state_dict(), ema=(ema or generator).state_dict(), critic=critic.state_dict(),
                            optimizer=opt_g.state_dict(), optimizer_critic=opt_c.state_dict()), part)  # every process
        on_main(part, lambda: save_run(path, finished, stage="dmd", model_config=init_ckpt["model_config"],
                                       config=asdict(cfg), **states, ema_started=ema is not None, rng=gen.get_state(),
                                       iteration=it, log=log))

    def evaluate(tag):
        if not data.is_toy:  # Wan scale: no toy evaluator; the log keeps the losses
            return {}, None
        model = (ema or generator).eval()
        clips, prompts, actions = toy_few_step_samples(model, cfg.eval_clips, cfg.num_steps, cfg.frames_per_block,
                                                       first_block_4step=first_steps is not None)
        m = toy_data.evaluate(clips, prompts, actions=actions)  # a world model: + action accuracy and response
        tqdm.write(f"{tag} | {toy_data.metric_line(m)}")
        fit = critic_fit(critic.eval(), base, clips.to(device), toy_data.TextEncoder()(prompts).to(device),
                         None if actions is None else actions.to(device))
        critic.train()
        line = f"critic_fit {fit:+.2%}"
        if not cfg.actions:  # the exposure report asks about the plain toy's law (constant velocity)
            m.update(toy_exposure_report(model, clips, prompts, steps, cfg.frames_per_block, n=cfg.eval_clips))
            line = f"{exposure_line(m)} | {line}"
        m["critic_fit"] = fit
        tqdm.write(f"{'':{len(tag)}} | {line}")
        model.train()
        return m, clips

    def critic_update():
        ctx, _, noise, actions = batch()
        with torch.no_grad(), autocast(device, generator):
            x = rollout(generator, noise, ctx, steps, first_steps, cfg.frames_per_block, gen, actions, part)
        t, eps = dmd_t_eps(x)
        with autocast(device, critic):
            loss_c = critic_loss(critic, x, ctx, t, eps, actions)
        opt_c.zero_grad(set_to_none=True)
        loss_c.backward()
        torch.nn.utils.clip_grad_norm_(critic.parameters(), 10.0)
        opt_c.step()
        return mean_over_processes(loss_c.item(), part)

    total = cfg.gen_updates * cfg.critic_ratio
    if it == 0:
        log.append({"update": 0, **evaluate("before DMD   ")[0]})
        if cfg.critic_warmup:  # let the fake score learn the initial generator before the first DMD step
            losses = [critic_update() for _ in tqdm(range(cfg.critic_warmup), desc="critic warm-up", leave=False,
                                                        disable=part.rank > 0)]
            tqdm.write(f"critic warm-up: {cfg.critic_warmup} updates, loss {losses[0]:.3f} -> "
                       f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    pbar = tqdm(total=cfg.gen_updates, initial=it // cfg.critic_ratio, desc=f"DMD {cfg.init} {cfg.num_steps}-step",
                dynamic_ncols=True, disable=part.rank > 0)
    stats = {}
    while it < total:
        if it % cfg.critic_ratio == 0:  # ---- generator update: rollout with grad at the exit steps, DMD loss
            ctx, null, noise, actions = batch()
            with autocast(device, generator):
                x = rollout(generator, noise, ctx, steps, first_steps, cfg.frames_per_block, gen, actions, part)
                t, eps = dmd_t_eps(x)
                loss_g, g_abs = dmd_loss(x, real, critic, ctx, null, cfg.real_guidance, t, eps, actions)
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            torch.nn.utils.clip_grad_norm_(generator.parameters(), 10.0)  # official clip 10
            opt_g.step()
            update = it // cfg.critic_ratio + 1
            if update == cfg.ema_start and ema is None:
                ema = ema_model
                ema.load_state_dict(generator.state_dict())  # the EMA starts from the generator of this update
            elif ema is not None:
                ema_update(ema, generator, cfg.ema_decay)
            stats.update(loss_g=mean_over_processes(loss_g.item(), part), g=mean_over_processes(g_abs, part))

        # ---- critic update (every iteration): flow matching on a fresh rollout made without grad
        stats["loss_critic"] = critic_update()
        it += 1

        if it % cfg.critic_ratio == 0:
            update = it // cfg.critic_ratio
            log.append({"update": update, **stats})
            pbar.update(1)
            pbar.set_postfix(loss_g=f"{stats['loss_g']:.2e}", critic=f"{stats['loss_critic']:.3f}",
                             g=f"{stats['g']:.3f}")
            if update % cfg.eval_every == 0 or update == cfg.gen_updates:
                log[-1].update(evaluate(f"update {update:4d}  ")[0])
            if update % cfg.ckpt_every == 0:
                save()
    pbar.close()
    report_memory(device, "dmd", cfg, cfg.batch_size, cfg.frames_per_block, ema=cfg.ema_start > 0)
    if "blur" not in log[-1]:  # (a resumed run that was already finished)
        log[-1].update(evaluate("after DMD    ")[0])
    save(finished=True)
    minutes = (time.time() - t_start) / 60
    if not data.is_toy:
        print(f"dmd: {cfg.gen_updates} generator / {total} critic updates, {minutes:.1f} min -> {path}")
        return {}, minutes
    clips, prompts, _ = toy_few_step_samples((ema or generator).eval(), 18, cfg.num_steps, cfg.frames_per_block,
                                             first_block_4step=first_steps is not None)
    gif = os.path.join(cfg.out_dir, "samples", os.path.basename(path).replace(".pt", ".gif"))
    os.makedirs(os.path.dirname(gif), exist_ok=True)
    on_main(part, lambda: toy_data.save_video(
        gif, clips, ncols=9, labels=prompts, title=f"DMD from {cfg.init}, {cfg.num_steps}-step"
        f"{' (block 0: 4-step)' if first_steps else ''}, {cfg.gen_updates} generator updates"))
    metrics = {k: log[-1][k] for k in ((*METRICS, "action_acc", "response") if cfg.actions else
                                       (*METRICS, "next_off", "own_off", "gap", "own_off_rigid", "own_rigid", "area",
                                        "critic_fit"))}
    print(f"dmd: {cfg.gen_updates} generator / {total} critic updates, {minutes:.1f} min -> {path}, samples {gif}")
    return metrics, minutes


def load_generator(path, device="cpu"):
    """A finished DMD generator (EMA weights) for sampling."""
    ckpt = load_checkpoint(path, stage="dmd", make_cmd="python dmd.py --init causal_cd --num-steps 2")
    return model_from_checkpoint(ckpt, key="ema", device=device).eval(), ckpt


# -----------------------------------------------------------------------------------------------------------
# The toy Table 2


TABLE_MD = "dmd_table.md"


def ensure_stage2(cfg, inits=INITS):
    """--table: make whichever stage-2 checkpoint of `inits` is missing (teachers come from checkpoints/ or
    pretrained/)."""
    same = dict(out_dir=cfg.out_dir, frames_per_block=cfg.frames_per_block, device=cfg.device)  # stage 2: seed 0
    ccfg = causal_cd.Config(toy=True, **same)
    todo = [("causal_cd", causal_cd.checkpoint_path(ccfg), lambda: causal_cd.train(ccfg))]
    for teacher in ("ar", "bidirectional"):
        ocfg = ode_init.Config(teacher=teacher, **same)
        todo.append((ode_init.stage_name(teacher), ode_init.student_path(ocfg), lambda c=ocfg: ode_init.train(c)))
    for name, path, make in (t for t in todo if t[0] in inits):
        if not os.path.exists(path):
            print(f"{path} is missing: training it now")
            make()


def table(cfg):
    """Rows: init x steps {1, 2, 4}, frame-wise, before and after DMD at the same budget and evaluation noise. The
    2-step rows (Causal Forcing++'s headline) run `table_seeds` DMD seeds each and print mean +- sd over them; the
    other rows are one seed (cfg.seed). A seed changes DMD's own randomness (prompts, rollout noise, exit steps,
    DMD timesteps), not the stage-2 init or the evaluation noise."""
    if cfg.actions:
        raise ConfigError("--table is the plain toy's Table 2; run the world model's stages one by one (README)")
    if (cfg.init, cfg.num_steps) != (Config.init, Config.num_steps):
        raise ConfigError("--init / --num-steps pick one DMD run; the table's rows are --table-inits / --table-steps")
    parts = [p.strip() for p in cfg.table_steps.split(",")]
    if not set(parts) <= {"1", "2", "4"} or len(set(parts)) != len(parts):
        raise ConfigError(f"--table-steps must list step counts out of 1, 2, 4, e.g. \"1,2,4\" or \"2\" "
                          f"(got {cfg.table_steps!r})")
    steps = sorted(int(p) for p in parts)
    names = [p.strip() for p in cfg.table_inits.split(",")]
    if not set(names) <= set(INITS) or len(set(names)) != len(names):
        raise ConfigError(f"--table-inits must list distinct inits out of {','.join(INITS)} (got {cfg.table_inits!r})")
    inits = [i for i in INITS if i in names]  # the table's row order
    if cfg.seed + cfg.table_seeds > 2 ** 32:  # its runs take seeds seed .. seed + table_seeds - 1
        raise ConfigError(f"--seed {cfg.seed} + --table-seeds {cfg.table_seeds}: the last run's seed passes 2^32 - 1")
    t0 = time.time()
    ensure_stage2(cfg, inits)
    device = pick_device(cfg.device)
    # Each finished run is recorded at once with the settings it ran under; `--table --resume` reuses the runs
    # recorded under today's settings and trains only the rest (a 2-hour table survives an interruption).
    done_path = os.path.join(cfg.out_dir, "dmd_table_runs.json")
    how = lambda c: {k: v for k, v in c.items() if k not in ("resume", "device", "table_seeds", "table_steps",
                                                              "table_inits", "out_dir")}
    settings = how(asdict(cfg))  # how the runs train (not where they are kept: a table folder may move)
    done = json.load(open(done_path)) if cfg.resume and os.path.exists(done_path) else {}
    done = {k: v for k, v in done.items() if how({**asdict(Config()), **v["settings"]}) == settings}  # new: default
    seeds = lambda n: [cfg.seed + i for i in range(cfg.table_seeds if n == 2 else 1)]
    table_flags = {k: getattr(Config, k) for k in TABLE_FLAGS}  # one run of the table is a plain run
    run_cfg = lambda init, n, seed: Config(**{**asdict(cfg), "init": init, "num_steps": n, "seed": seed,
                                             "table": False, "resume": False, **table_flags})
    # The 2-step rows (the headline, with their seeds) train first, so an interrupted table has them.
    for n in sorted(steps, key=lambda n: n != 2):
        for init in inits:
            for seed in seeds(n):
                run, key = run_cfg(init, n, seed), f"{init} {n}-step seed {seed}"
                if key in done and os.path.exists(checkpoint_path(run)):
                    print(f"table: {key} already finished (--resume): reusing it")
                    continue
                after, minutes = train(run)
                before = {k: v for k, v in load_checkpoint(checkpoint_path(run))["log"][0].items() if k != "update"}
                done[key] = dict(settings=settings, run=dict(seed=seed, before=before, after=after, minutes=minutes))
                json.dump(done, open(done_path + ".tmp", "w"), indent=1)
                os.replace(done_path + ".tmp", done_path)
    rows = []
    for init in inits:
        for n in steps:
            gen_model, _ = load_generator(checkpoint_path(run_cfg(init, n, cfg.seed)), device)
            speed = stream_speed(gen_model, n, cfg.frames_per_block, frames=toy_data.FRAMES,
                                 first_block_4step=n < 4 and cfg.frames_per_block == 1)
            rows.append(dict(init=init, steps=n, runs=[done[f"{init} {n}-step seed {s}"]["run"] for s in seeds(n)],
                             **speed))
    json.dump(rows, open(os.path.join(cfg.out_dir, "dmd_table.json"), "w"), indent=1)
    real_clips, real_prompts = toy_data.sample_clips(cfg.eval_clips, seed=0)
    own = toy_data.own_step_report(real_clips, real_prompts)
    real = {**toy_data.evaluate(real_clips, real_prompts), "own_off": own["off"], "own_off_rigid": own["off_rigid"]}
    text = table_markdown(rows, real)
    with open(os.path.join(cfg.out_dir, TABLE_MD), "w") as f:
        f.write(text + "\n")
    print(text)
    print(f"table: {sum(len(r['runs']) for r in rows)} DMD runs, {(time.time() - t0) / 60:.1f} min in all -> "
          f"{cfg.out_dir}/{TABLE_MD}")
    return rows


TABLE_KEYS = ("blur", "second_moment", "prompt_acc", "motion", "physics", "fd", "next_off", "own_off",
              "own_off_rigid")


def table_markdown(rows, real):
    """The table as markdown: one line before and one after DMD per row; mean +- sd (n = seeds) over seeds."""
    def cell(values, k):
        fmt = (lambda v: f"{v:.1f}") if k == "fd" else (lambda v: f"{100 * v:.1f}%") if "_off" in k else \
            (lambda v: f"{v:.3f}")
        if None in values:  # a run recorded before the number existed
            return "-"
        if len(values) == 1:
            return fmt(values[0])
        t = torch.tensor(values, dtype=torch.float64)
        return f"{fmt(t.mean().item())} +- {fmt(t.std().item())}"

    names = dict(next_off="next frame off (real past)", own_off="next frame off (own past)",
                 own_off_rigid="own past, shape keeps its size")
    head = ("| init | steps | | seeds | " + " | ".join(names.get(k, k) for k in TABLE_KEYS)
            + " | frames/s | first-frame latency | DMD time |")
    lines = [head, "|---|---|---|---|" + "---|" * len(TABLE_KEYS) + "---|---|---|"]
    for r in rows:
        for when in ("before", "after"):
            runs = r["runs"][:1] if when == "before" else r["runs"]  # the init is the same for every seed
            cells = " | ".join(cell([x[when].get(k) for x in runs], k) for k in TABLE_KEYS)
            minutes = sum(x["minutes"] for x in r["runs"]) / len(r["runs"])
            extra = (f"{r['fps']:.0f} | {1000 * r['first_frame_s']:.1f} ms | {minutes:.1f} min" if when == "after"
                     else " | | ")
            lines.append(f"| {r['init'] if when == 'before' else ''} | {r['steps'] if when == 'before' else ''} | "
                         f"{when} DMD | {len(runs)} | {cells} | {extra} |")
    lines.append("| real clips | | | | " + " | ".join(cell([real[k]], k) if k in real else "" for k in TABLE_KEYS)
                 + " | | | |")
    return "\n".join(lines)


if __name__ == "__main__":
    config = parse_config(Config, description=__doc__.split("\n\n")[0])
    run_main(table if config.table else train, config)
