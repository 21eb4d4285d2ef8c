"""
wan_scale.py — everything that exists only to run the stages at Wan2.1 scale on one 24 GB GPU. The toy never
needs this file; read it after model.py and the stage scripts.

    LatentFolder / write_latent_clip     the training data at scale: Wan VAE latents + umT5 features, one file a clip
    WanTextEncoder / WanVAE              encoding prompts and videos, decoding latents (requirements-wan.txt)
    ScaleOptions / open_data / wan_base  the options every stage script shares (--data / --model / --init-weights ...)
    LeanAdamW / prepare                  bf16 weights with a factored second moment and stochastic rounding
    plan_memory / dry_run / ...          the memory planner: what fits in 24 GB, before anything is allocated
    Part / start_distributed / shard     torchrun + FSDP2: N processes, each a shard of the models and of the batch
    bench_wan / main_wan                 the streaming speed benchmark and streaming latents to MP4

Commands (needs requirements-wan.txt): make a latent folder from videos (NAME.mp4) and their prompts (NAME.txt),
    python wan_scale.py --videos VIDEO_DIR --out LATENT_DIR [--negative "..."] [--frames 81] [--size 480x832]
"""
import argparse
import dataclasses
import json
import math
import os
import sys
import threading
import time
from dataclasses import dataclass

import torch
import torch.nn as nn

import torch.nn.functional as F

from model import (PRESETS, ConfigError, DiT, OneLineParser, RMSNorm, WeightsMismatchError, autocast, check_preset,
                   describe_mismatch, pick_device, rope_cos_sin, run_main, warped_steps)
from sample_stream import _sync, fast_mode, timed_stream


# -----------------------------------------------------------------------------------------------------------
# Wan2.1 weights: the original format or the -Diffusers repo's


def _safetensors_files(path):
    """A .safetensors file, a sharded .index.json, or a folder holding either: the original repo
    (Wan2.1-T2V-1.3B / -14B), or the -Diffusers repo (its transformer/ subfolder) or that subfolder itself."""
    if os.path.isdir(path):
        if os.path.isdir(os.path.join(path, "transformer")):  # the root of a -Diffusers download
            return _safetensors_files(os.path.join(path, "transformer"))
        for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json"):
            if os.path.exists(os.path.join(path, name)):
                return _safetensors_files(os.path.join(path, name))
        raise FileNotFoundError(f"{path} holds no diffusion_pytorch_model.safetensors(.index.json); download it with "
                                f"`huggingface-cli download Wan-AI/Wan2.1-T2V-1.3B-Diffusers --local-dir {path}`")
    if not os.path.exists(path):
        raise FileNotFoundError(f"Wan weights not found: {path}")
    if path.endswith(".json"):
        with open(path) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(os.path.dirname(path), s) for s in shards]
    if not path.endswith(".safetensors"):
        raise ConfigError(f"{path} is not Wan2.1's weights: give its folder, diffusion_pytorch_model.safetensors or "
                          f"its .index.json")
    return [path]


# The diffusers format (Wan-AI/Wan2.1-T2V-1.3B-Diffusers, transformer/) renames Wan2.1's parameters; the same
# tensors, in the same shapes. (diffusers name prefix, Wan2.1 name prefix), outside the blocks and inside each block:
DIFFUSERS_TOP = [("condition_embedder.text_embedder.linear_1.", "text_embedding.0."),
                 ("condition_embedder.text_embedder.linear_2.", "text_embedding.2."),
                 ("condition_embedder.time_embedder.linear_1.", "time_embedding.0."),
                 ("condition_embedder.time_embedder.linear_2.", "time_embedding.2."),
                 ("condition_embedder.time_proj.", "time_projection.1."),
                 ("proj_out.", "head.head."), ("scale_shift_table", "head.modulation")]
DIFFUSERS_BLOCK = [(f"{a}.{d}.", f"{o}.{w}.") for a, o in (("attn1", "self_attn"), ("attn2", "cross_attn"))
                   for d, w in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "o"),
                                ("norm_q", "norm_q"), ("norm_k", "norm_k"))] + [
                  ("ffn.net.0.proj.", "ffn.0."), ("ffn.net.2.", "ffn.2."),
                  ("norm2.", "norm3."),  # diffusers' norm2 is the cross-attention norm, Wan's norm3
                  ("scale_shift_table", "modulation")]


def wan_name(key):
    """A diffusers-format parameter name -> Wan2.1's original name (original names pass through unchanged)."""
    if key.startswith("blocks."):
        _, i, rest = key.split(".", 2)
        return next((f"blocks.{i}.{w}{rest[len(d):]}" for d, w in DIFFUSERS_BLOCK if rest.startswith(d)), key)
    return next((w + key[len(d):] for d, w in DIFFUSERS_TOP if key.startswith(d)), key)


def load_wan_weights(model, path):
    """Load Wan2.1 DiT weights into `model`: the original format, or the -Diffusers repo's (renamed by `wan_name`,
    detected from the names). Every key and shape is checked before anything is copied; tensors are copied one by
    one, so peak memory stays ~one model. Raises WeightsMismatchError listing missing / unexpected / mis-shaped keys."""
    from safetensors import safe_open
    files = _safetensors_files(path)
    shapes, where = {}, {}
    for fname in files:
        with safe_open(fname, framework="pt") as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_slice(key).get_shape())
                where[key] = fname
    diffusers = any(k.startswith("condition_embedder.") or ".attn1." in k for k in shapes)
    name = wan_name if diffusers else (lambda k: k)
    new = [k for k in model.state_dict() if k.startswith("action_embedding.")]  # a world model's own weights
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in new}
    report = describe_mismatch(expected, {name(k): v for k, v in shapes.items()}, what="file")
    if report:
        raise WeightsMismatchError(
            f"{path} ({'diffusers' if diffusers else 'original'} format) does not match DiT({model.cfg}):\n{report}\n"
            "Wan2.1-T2V-1.3B (original or -Diffusers) matches the 'wan2.1-1.3b' preset, -14B 'wan2.1-14b'.")
    params = model.state_dict()
    with torch.no_grad():
        for fname in files:
            with safe_open(fname, framework="pt") as f:
                for key in f.keys():
                    params[name(key)].copy_(f.get_tensor(key))
    if new:
        print(f"{path}: every Wan2.1 weight loaded; new (not in Wan2.1, zero-initialised): {', '.join(new)}")
    return model


# -----------------------------------------------------------------------------------------------------------
# Wan-scale data: a latent folder (precomputed Wan VAE latents and umT5 text features, one file per clip)


def write_latent_clip(path, latents, text, prompt=""):
    """Write one clip of a latent folder, atomically: latents (F, 16, H, W) from the Wan VAE (as its encoder
    returns them, already normalised), text (L, 4096) the umT5-XXL features of the prompt (unpadded, L <= 512)."""
    from safetensors.torch import save_file
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    save_file({"latents": latents.contiguous(), "text": text.contiguous()}, tmp, metadata={"prompt": prompt})
    os.replace(tmp, path)


class LatentFolder:
    """The training data of every stage at Wan scale (stage 0 is skipped there: the base is Wan2.1 itself).

    <folder>/*.safetensors, one per clip, each holding
        latents   (F, C, H, W)  Wan VAE latents, C = 16; 81 frames of 480x832 are (21, 16, 60, 104)
        text      (L, 4096)     umT5-XXL features of the prompt, L <= text_len (512), zero-padded here
    and, optionally, negative.safetensors holding `text` for the unconditional / negative prompt (Wan's CFG uses
    its default negative prompt; without the file the unconditional branch is all zeros, like the toy).
    Every file's keys and shapes are checked when the folder is opened, so a bad entry fails before training
    starts, with the file and what differs."""

    def __init__(self, path, in_dim=16, text_dim=4096, text_len=512, frames=None):
        from safetensors import safe_open
        if not os.path.isdir(path):
            raise FileNotFoundError(f"latent folder {path} not found; write one clip per file with "
                                    f"wan_scale.write_latent_clip(path, latents (F, {in_dim}, H, W), text (L, {text_dim}))")
        self.files = sorted(os.path.join(path, f) for f in os.listdir(path)
                            if f.endswith(".safetensors") and f != "negative.safetensors")
        if not self.files:
            raise ConfigError(f"latent folder {path} holds no *.safetensors clips")
        self.in_dim, self.text_dim, self.text_len, self.frames = in_dim, text_dim, text_len, frames
        problems, shapes = [], {}
        for fname in self.files:
            with safe_open(fname, framework="pt") as f:
                keys = set(f.keys())
                missing = {"latents", "text"} - keys
                if missing:
                    problems.append(f"{fname}: missing {sorted(missing)} (has {sorted(keys)})")
                    continue
                lat, txt = tuple(f.get_slice("latents").get_shape()), tuple(f.get_slice("text").get_shape())
            if len(lat) != 4 or lat[1] != in_dim:
                problems.append(f"{fname}: latents {lat}, expected (F, {in_dim}, H, W)")
            elif frames is not None and lat[0] < frames:
                problems.append(f"{fname}: {lat[0]} latent frames, fewer than the {frames} a clip needs")
            if len(txt) != 2 or txt[1] != text_dim or txt[0] > text_len:
                problems.append(f"{fname}: text {txt}, expected (L <= {text_len}, {text_dim})")
            shapes.setdefault((lat[0] if frames is None else frames,) + lat[2:], []).append(fname)
        if len(shapes) > 1 and not problems:
            summary = "; ".join(f"{len(v)} clip(s) of (F, H, W) = {k}, e.g. {v[0]}" for k, v in shapes.items())
            problems.append(f"clips differ in size and cannot be batched: {summary} (re-encode at one size, or "
                            f"pass frames= to crop to a common length)")
        if problems:
            shown = "\n  ".join(problems[:10]) + (f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else "")
            raise ConfigError(f"latent folder {path} has {len(problems)} bad entr{'y' if len(problems) == 1 else 'ies'}:"
                             f"\n  {shown}")
        self.shape = next(iter(shapes))  # (F, H, W)
        neg = os.path.join(path, "negative.safetensors")
        self.negative = self._load(neg)[1] if os.path.exists(neg) else torch.zeros(text_len, text_dim)

    def _pad_text(self, text):
        out = torch.zeros(self.text_len, self.text_dim)
        out[:text.shape[0]] = text.float()
        return out

    def _load(self, fname):
        from safetensors.torch import load_file
        d = load_file(fname)
        lat = d["latents"].float()[:self.frames] if "latents" in d else None
        return lat, self._pad_text(d["text"])

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        """(latents (F, C, H, W) float32, text (text_len, text_dim) float32)"""
        return self._load(self.files[i])

    is_toy = False

    @property
    def channels(self):
        return self.in_dim

    def batch(self, n, generator=None):
        """n random clips: latents (n, F, C, H, W), text (n, text_len, text_dim), the matching null text, and
        None for the prompts and the actions (the same interface as toy_data.ToyData)."""
        idx = torch.randint(0, len(self), (n,), generator=generator).tolist()
        lat, txt = zip(*(self[i] for i in idx))
        return torch.stack(lat), torch.stack(txt), self.negative.expand(n, -1, -1).clone(), None, None

    def texts(self, n, generator=None):
        """Text features of n random clips (DMD needs prompts only): text, null text, None, None."""
        idx = torch.randint(0, len(self), (n,), generator=generator).tolist()
        from safetensors import safe_open
        txt = []
        for i in idx:
            with safe_open(self.files[i], framework="pt") as f:
                txt.append(self._pad_text(f.get_tensor("text")))
        return torch.stack(txt), self.negative.expand(n, -1, -1).clone(), None, None


# The values the stage configs' numeric options may take, by name: ScaleOptions checks each option a stage config has, so a
# bad number ends in one line before any work (not in a ZeroDivisionError, nor in a "finished" run of nothing).
OPTION_RANGES = [
    (("steps", "base_steps", "ar_steps", "world_steps", "world_ar_steps", "gen_updates", "batch_size",
      "frames_per_block", "ckpt_every", "eval_every", "eval_clips", "eval_steps", "num_pairs", "critic_ratio",
      "table_seeds"), lambda v: v >= 1, "at least 1"),
    (("lr", "lr_critic", "shift", "grad_clip"), lambda v: v > 0, "positive"),
    (("warmup", "weight_decay", "guidance", "real_guidance", "clip_frames", "memory_cap_gib", "gpus", "critic_warmup",
      "ema_start", "unseen_pairs"), lambda v: v >= 0, "at least 0"),
    (("ema_decay", "prompt_dropout"), lambda v: 0 <= v <= 1, "between 0 and 1"),
    (("min_t", "max_t"), lambda v: 0 <= v <= 1000, "between 0 and 1000"),
    (("seed",), lambda v: 0 <= v < 2 ** 32, "between 0 and 2^32 - 1"),  # torch's generators take 64 bits; the
    # stages add small offsets to the seed, and 32 bits is the range numpy and most tools accept
]


@dataclass
class ScaleOptions:
    """Options every stage script shares for Wan scale (README, "Wan scale"); each script's Config extends it.
    At the defaults the scripts run the toy exactly as before."""
    data: str = "toy"  # "toy", or a latent folder of Wan VAE latents + umT5 features (wan_scale.LatentFolder)
    model: str = "toy"  # preset of the base model: "toy" (ar_teacher.py --phase base trains it) or a Wan preset
    init_weights: str = ""  # Wan2.1 weights of the base: at Wan scale the base *is* Wan2.1 and stage 0 is skipped;
    # "random": random weights in the preset's shape (memory / speed measurement)
    param_dtype: str = "float32"  # "bfloat16" halves weights and gradients (pair it with --optimizer lean)
    optimizer: str = "adamw"  # "adamw" (torch) or "lean" (LeanAdamW: factored 2nd moment, stochastic rounding)
    grad_checkpointing: bool = False  # recompute each block in backward: activations ~ one block + block inputs
    dry_run: bool = False  # print this stage's planned peak memory (nothing is allocated) and exit; with
    # --data may also be a latent clip size FxHxW, e.g. 21x60x104 (81 frames of 480x832): the plan for that size,
    # or, in a run, synthetic random latents of that size (with --init-weights random: memory / speed measurement)
    clip_frames: int = 0  # train on the first N latent frames of each clip of a latent folder or FxHxW size (0 = all): 9 of the
    # 21 of an 81-frame 480x832 clip fit stages 1-3 in 24 GiB (README, "Wan scale")
    memory_cap_gib: float = 24.0  # GPU memory this process may use (0 = all) and the plan is checked against
    gpus: int = 0  # --dry-run: plan one GPU of a torchrun run on N GPUs (0: torchrun's WORLD_SIZE, else 1)
    actions: bool = False  # the action-conditioned world model (toy only, Causal Forcing++ §3.3): every stage
    # trains and samples with per-frame actions; its checkpoints live in checkpoints/world/ unless --out-dir says

    def __post_init__(self):  # checked when the flags are read, so a --dry-run checks them too
        for names, allowed, in_words in OPTION_RANGES:
            for name in names:
                if hasattr(self, name) and not allowed(getattr(self, name)):
                    raise ConfigError(f"--{name.replace('_', '-')} must be {in_words} (got {getattr(self, name)})")
        check_preset(self.model)
        check_memory_options(self.optimizer, self.param_dtype)
        if os.path.isfile(getattr(self, "out_dir", "")):
            raise ConfigError(f"--out-dir {self.out_dir} is a file; give the folder checkpoints go to")
        if self.data != "toy" and not parse_clip_size(self.data) and not os.path.isdir(self.data):  # before weights load
            raise ConfigError(f"--data {self.data}: no such latent folder (make one with python wan_scale.py --videos "
                              f"<clips> --out {self.data}); the toy world is --data toy")
        if self.data == "toy":  # (a latent folder's clip length is checked when the folder is opened)
            if self.clip_frames:
                raise ConfigError("--clip-frames crops the clips of a latent folder (or an FxHxW size); the toy's clips "
                                  "are 6 frames")
            import toy_data
            fpb = getattr(self, "frames_per_block", 1)
            if toy_data.FRAMES % fpb:
                raise ConfigError(f"--frames-per-block {fpb} must divide the {toy_data.FRAMES} frames of a toy clip")
        if self.actions and getattr(self, "out_dir", None) == "checkpoints":  # the world model's checkpoints keep
            self.out_dir = WORLD_DIR  # their own folder, under the same file names


WORLD_DIR = "checkpoints/world"  # the default --out-dir of every stage with --actions
RUN_PLACE = ("resume", "device", "dry_run", "out_dir", "memory_cap_gib", "gpus", "grad_checkpointing")  # where and how
# a stage runs, not what it computes: settings a --resume may change (each stage adds its length and logging)


def run_flags(cfg):
    """The --actions / --out-dir part of a command that remakes a checkpoint of this run (for error messages)."""
    default = WORLD_DIR if cfg.actions else "checkpoints"
    return (" --actions" if cfg.actions else "") + (f" --out-dir {cfg.out_dir}" if cfg.out_dir != default else "")


# Encoding prompts and videos, decoding latents: the optional extra (requirements-wan.txt). The stages never
# need it: they read a latent folder. Text: umT5-XXL features exactly as Wan's pipeline makes them (tokens padded
# to 512, the padding rows dropped, zero rows appended later by LatentFolder). Video: the Wan VAE's latent mean,
# normalised per channel, (z - latents_mean) / latents_std, the form the DiT is trained on.

WAN_DIFFUSERS = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"  # the repo with tokenizer/, text_encoder/ and vae/ subfolders


def _optional(module):
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"encoding prompts / videos and decoding latents needs `{module}`: pip install -r "
                          f"requirements-wan.txt (the stage scripts themselves run on precomputed latents "
                          f"without it)") from err


class WanTextEncoder:
    """Prompts -> umT5-XXL features [(L_i, 4096)], L_i <= 512 the prompt's token count (Wan's prompt_embeds)."""

    def __init__(self, repo=WAN_DIFFUSERS, device="cpu"):
        transformers = _optional("transformers")
        self.device = torch.device(device)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(repo, subfolder="tokenizer")
        self.encoder = transformers.UMT5EncoderModel.from_pretrained(repo, subfolder="text_encoder",
                                                                    torch_dtype=torch.bfloat16).to(device).eval()

    @torch.no_grad()
    def __call__(self, prompts):
        tok = self.tokenizer(prompts, padding="max_length", max_length=512, truncation=True,
                             add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        mask = tok.attention_mask.to(self.device)
        hidden = self.encoder(tok.input_ids.to(self.device), mask).last_hidden_state
        return [h[:n].float().cpu() for h, n in zip(hidden, mask.sum(1).tolist())]


class WanVAE:
    """Videos (T, H, W, 3) uint8, T = 4k + 1 -> latents (k + 1, 16, H/8, W/8), and back."""

    def __init__(self, repo=WAN_DIFFUSERS, device="cpu", dtype=torch.float32):
        diffusers = _optional("diffusers")
        self.device, self.dtype = torch.device(device), dtype
        if repo == "random":  # AutoencoderKLWan's default config is the Wan2.1 VAE's: timing decode without weights
            print("--vae random: the Wan2.1 VAE architecture with RANDOM weights (decode timing only)")
            self.vae = diffusers.AutoencoderKLWan().to(device, dtype).eval()
        else:
            try:
                self.vae = diffusers.AutoencoderKLWan.from_pretrained(repo, subfolder="vae", torch_dtype=dtype)
            except OSError as err:  # no such folder, and the hub unreachable or the repo missing
                raise OSError(f"could not load the Wan2.1 VAE from {repo!r} ({str(err).splitlines()[0]}); download "
                              f"{WAN_DIFFUSERS} and pass its folder with --vae") from None
            self.vae = self.vae.to(device).eval()
        c = self.vae.config
        self.mean = torch.tensor(c.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self.std = torch.tensor(c.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)

    @torch.no_grad()
    def encode(self, video):
        x = torch.as_tensor(video).float().div(127.5).sub(1).permute(3, 0, 1, 2)[None]  # (1, 3, T, H, W) in [-1, 1]
        z = self.vae.encode(x.to(self.device, self.dtype)).latent_dist.mode().float().cpu()
        return ((z - self.mean) / self.std)[0].transpose(0, 1).contiguous()  # (F, 16, h, w)

    @torch.no_grad()
    def decode(self, latents):
        x = self.vae.decode(self._vae_latents(latents)).sample[0].float().cpu()  # (3, T, H, W)
        return self._to_uint8(x)

    def _vae_latents(self, latents):  # (F, 16, h, w) normalised -> (1, 16, F, h, w) as the VAE takes them
        z = latents.to(self.device).float().transpose(0, 1)[None]
        return (z * self.std.to(self.device) + self.mean.to(self.device)).to(self.dtype)

    @staticmethod
    def _to_uint8(x):  # (3, T, H, W) in [-1, 1] -> (T, H, W, 3) uint8
        return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()

    @torch.no_grad()
    @torch.autocast("cuda", enabled=False)  # the VAE's own dtype, whichever thread calls (autocast is per thread)
    @torch.autocast("cpu", enabled=False)
    def decode_block(self, latents, first):
        """Streaming decode: the next block's latents (n, 16, h, w) -> its video frames, 1 + 4 (n - 1) for the
        first block of a video (first=True) and 4 n after. The Wan VAE's decoder is causal in time, one latent frame
        at a time, each of its temporal convolutions keeping the frames it needs from the previous call (diffusers'
        `_feat_map`, the loop inside AutoencoderKLWan._decode); those caches persist between calls here, so decoding
        block by block gives exactly what decode() of the whole clip gives (a test)."""
        v = self.vae
        if getattr(v, "use_tiling", False):
            raise ConfigError("streaming decode needs the VAE without tiling (vae.disable_tiling())")
        if first:
            v.clear_cache()
        x = v.post_quant_conv(self._vae_latents(latents))  # a 1-frame kernel: per frame
        out = []
        for i in range(x.shape[2]):
            v._conv_idx = [0]
            out.append(v.decoder(x[:, :, i:i + 1], feat_cache=v._feat_map, feat_idx=v._conv_idx,
                                 first_chunk=first and i == 0))
        return self._to_uint8(torch.cat(out, 2)[0].float().cpu())


GPU_WORK = threading.Lock()  # held by a CUDA-graph capture and by the decoder thread's GPU work


class OverlappedDecoder:
    """Decodes a stream's blocks while the next ones are generated: push() hands a block's latents to a worker
    thread that decodes them (WanVAE.decode_block) on its own CUDA stream, so the VAE's kernels fill the gaps of
    the launch-bound DiT stream; frames() waits for the last block and returns the video. overlap=False decodes
    each block inside push() instead (the same frames, for comparison)."""

    def __init__(self, vae, overlap=True):
        import queue
        self.vae, self.overlap, self.video, self.first_frame_at = vae, overlap, [], None
        self.count, self.error = 0, None
        self.side = torch.cuda.Stream(device=vae.device) if overlap and vae.device.type == "cuda" else None
        if overlap:
            self.queue = queue.Queue()
            self.thread = threading.Thread(target=self._work, daemon=True)
            self.thread.start()

    def _decode(self, latents, first, ready):
        if self.side is not None:
            with GPU_WORK, torch.cuda.stream(self.side):  # (never during a CUDA-graph capture)
                self.side.wait_event(ready)  # the block is written before its decode reads it
                frames = self.vae.decode_block(latents, first)
        else:
            frames = self.vae.decode_block(latents, first)
        self.video.append(frames)
        self.first_frame_at = self.first_frame_at or time.perf_counter()

    def _work(self):
        while (item := self.queue.get()) is not None:
            try:
                self._decode(*item)
            except BaseException as err:  # stop at the first error (the VAE's caches are then half-updated);
                self.error = err  # frames() raises it
                return

    def push(self, latents):
        """latents: (n, 16, h, w), the next block of the stream."""
        latents = latents.detach().clone()
        ready = None
        if self.side is not None:
            ready = torch.cuda.Event()
            ready.record()
            latents.record_stream(self.side)
        self.count += 1
        if self.overlap:
            self.queue.put((latents, self.count == 1, ready))
        else:
            self._decode(latents, self.count == 1, ready)

    def frames(self):
        """(T, H, W, 3) uint8, all blocks pushed so far, after the last one is decoded."""
        if self.overlap:
            self.queue.put(None)
            self.thread.join()
            if self.error is not None:
                raise self.error
        if len(self.video) != self.count:
            raise RuntimeError(f"{self.count} blocks pushed but {len(self.video)} decoded")
        import numpy as np
        return np.concatenate(self.video)


def read_video(path, frames=81, size=(480, 832)):
    """The first `frames` frames of a video file, centre-cropped to the aspect of `size` and resized to it:
    (T, H, W, 3) uint8. Wan2.1-1.3B's native clip is 81 frames of 480 x 832."""
    import imageio.v3 as iio
    import numpy as np
    video = np.asarray(iio.imread(path, index=None))[:frames]  # (T, H, W, 3)
    if len(video) < frames:
        raise ConfigError(f"{path} has {len(video)} frames, fewer than the {frames} asked for")
    x = torch.from_numpy(video[..., :3]).permute(0, 3, 1, 2).float()  # (T, 3, H, W)
    H, W = x.shape[2:]
    scale = max(size[0] / H, size[1] / W)
    x = F.interpolate(x, size=(max(size[0], round(H * scale)), max(size[1], round(W * scale))), mode="area")
    top, left = (x.shape[2] - size[0]) // 2, (x.shape[3] - size[1]) // 2
    x = x[:, :, top:top + size[0], left:left + size[1]]
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def make_latent_folder(videos, out, negative="", frames=81, size=(480, 832), device="cpu", wan=WAN_DIFFUSERS):
    """videos/NAME.mp4 with its prompt in videos/NAME.txt -> out/NAME.safetensors (wan_scale.LatentFolder's format),
    with the umT5 encoder and the VAE of `wan` (the -Diffusers download's folder, or its hub name)."""
    if not os.path.isdir(videos):
        raise ConfigError(f"--videos {videos}: " + ("a file; give the folder" if os.path.exists(videos) else "no such folder")
                          + " of NAME.mp4 + NAME.txt (the prompt) pairs")
    if os.path.isfile(out):
        raise ConfigError(f"--out {out} is a file; give the folder the latent clips go to")
    if frames < 1:
        raise ConfigError(f"--frames {frames}: encode at least one frame per video")
    if min(size) < 1:
        raise ConfigError(f"--size {size[0]}x{size[1]}: height and width must be positive")
    names = sorted(os.path.splitext(f)[0] for f in os.listdir(videos) if f.endswith((".mp4", ".gif", ".webm", ".mov")))
    missing = [n for n in names if not os.path.exists(os.path.join(videos, n + ".txt"))]
    if not names or missing:
        raise ConfigError(f"{videos}: expected NAME.mp4 + NAME.txt (the prompt) pairs; "
                         + (f"no prompt file for {missing[:5]}" if names else "no videos found"))
    from tqdm import tqdm
    text, vae = WanTextEncoder(wan, device=device), WanVAE(wan, device=device)
    if negative:
        write_latent_clip(os.path.join(out, "negative.safetensors"), torch.zeros(1, 16, 1, 1), text([negative])[0])
    for name in tqdm(names, desc="encoding clips"):
        dest = os.path.join(out, name + ".safetensors")
        if os.path.exists(dest):  # resumable: clips already written are kept
            continue
        video_path = next(os.path.join(videos, name + e) for e in (".mp4", ".gif", ".webm", ".mov")
                          if os.path.exists(os.path.join(videos, name + e)))
        prompt = open(os.path.join(videos, name + ".txt")).read().strip()
        write_latent_clip(dest, vae.encode(read_video(video_path, frames, size)), text([prompt])[0], prompt)


def check_actions(actions, model_cfg, spec="toy"):
    """A world model (ModelConfig.num_actions > 0) needs --actions and --actions needs a world model: say which."""
    if actions and spec != "toy":
        raise ConfigError(f"--actions: the world with actions exists on the toy only (--data toy, not {spec}); at Wan "
                          f"scale Causal Forcing++ conditions on camera poses (docs/RESULTS.md, the world model)")
    if actions and not model_cfg.num_actions:
        raise ConfigError("--actions needs a world model, and this checkpoint has no action conditioning; train one "
                          "with: python ar_teacher.py --phase base --actions")
    if model_cfg.num_actions and not actions:
        raise ConfigError(f"this checkpoint is a world model ({model_cfg.num_actions} actions): add --actions")


def open_data(spec, model_cfg, clip_frames=0, actions=False):
    """A stage's training data: "toy" (toy_data.ToyData, the 16x16 world; with `actions` the world with actions), a
    latent folder for a Wan-shaped model (its clips cropped to their first `clip_frames` latent frames when > 0),
    or "FxHxW" (SyntheticLatents). All answer batch(n, generator) -> (x0, text, null text, prompts, actions) and
    texts(n, generator) -> (text, null text, prompts, actions); actions is None except in the toy world model."""
    check_actions(actions, model_cfg, spec)
    if spec == "toy":
        if model_cfg.in_dim != 3:
            raise ConfigError(f"--data toy needs the toy model (in_dim 3), not in_dim {model_cfg.in_dim}; pass "
                             f"--data <latent folder> for a Wan-shaped model")
        import toy_data
        return toy_data.ToyData(actions)
    if model_cfg.in_dim == 3:
        raise ConfigError(f"--data {spec}: a latent folder needs a Wan-shaped model, but the checkpoint this stage "
                         f"starts from (in --out-dir, else a shipped toy teacher) is the toy's; train the earlier stages "
                         f"at Wan scale into that --out-dir first, from stage 1: python ar_teacher.py --phase ar --model "
                         f"wan2.1-1.3b --init-weights <Wan2.1 folder> --data {spec}")
    size = synthetic_size(spec, clip_frames)
    if size:
        return SyntheticLatents(size, model_cfg)
    return LatentFolder(spec, in_dim=model_cfg.in_dim, text_dim=model_cfg.text_dim, text_len=model_cfg.text_len,
                        frames=clip_frames or None)


def parse_clip_size(spec):
    """"21x60x104" -> (21, 60, 104) (latent frames, height, width); anything else -> None."""
    parts = spec.lower().split("x")
    return tuple(int(v) for v in parts) if len(parts) == 3 and all(v.isdigit() for v in parts) else None


def synthetic_size(spec, clip_frames=0):
    """--data FxHxW with --clip-frames N (0: all): its first N latent frames, as for a latent folder's clips ->
    (N, H, W); None when spec is no size."""
    size = parse_clip_size(spec)
    if size and clip_frames > size[0]:
        raise ConfigError(f"--clip-frames {clip_frames}: a {spec} clip has only {size[0]} latent frames")
    return size and (clip_frames or size[0], *size[1:])


class SyntheticLatents:
    """--data FxHxW at Wan scale: random latents of that size and random umT5-shaped text (64 tokens, zero-padded
    to text_len), with LatentFolder's interface. For measuring a stage's memory and speed (with
    --init-weights random) without a dataset; there is nothing to learn in it."""

    is_toy = False

    def __init__(self, size, model_cfg, prompt_tokens=64):
        self.shape, self.in_dim = size, model_cfg.in_dim
        self.text_len, self.text_dim, self.prompt_tokens = model_cfg.text_len, model_cfg.text_dim, prompt_tokens
        self.negative = torch.zeros(self.text_len, self.text_dim)
        print(f"--data {'x'.join(map(str, size))}: SYNTHETIC random latents (memory / speed measurement only)")

    @property
    def channels(self):
        return self.in_dim

    def texts(self, n, generator=None):
        txt = torch.zeros(n, self.text_len, self.text_dim)
        txt[:, :self.prompt_tokens] = torch.randn(n, min(self.prompt_tokens, self.text_len), self.text_dim,
                                                  generator=generator)
        return txt, self.negative.expand(n, -1, -1).clone(), None, None

    def batch(self, n, generator=None):
        x0 = torch.randn(n, self.shape[0], self.in_dim, *self.shape[1:], generator=generator)
        return (x0, *self.texts(n, generator))


def wan_base(preset, init_weights, device="cpu"):
    """The pretrained bidirectional base at Wan scale (stage 0 is skipped there: the base *is* Wan2.1): a DiT of
    the preset with the weights at `init_weights`, plus a checkpoint-like record for the stages that cite it.
    init_weights="random": random weights in the preset's shape, for measuring memory and speed without a download
    (memory and speed do not depend on the values; the zero-initialised head is filled in so outputs are not 0)."""
    check_preset(preset)
    if init_weights == "random":
        print(f"--init-weights random: {preset} with RANDOM weights (memory / speed measurement only, nothing to learn)")
        torch.manual_seed(0)
        with torch.device(device):  # built where it runs: initialising 1.4B weights on a CPU takes ~20 s
            model = DiT(PRESETS[preset])
        with torch.no_grad():
            for p in model.parameters():
                if not p.any():
                    p.normal_(0, 0.02)
    else:
        model = load_wan_weights(DiT(PRESETS[preset]), init_weights)
    record = dict(stage="base", model_config=dataclasses.asdict(model.cfg), step=0, init_weights=init_weights)
    return model.to(device).eval(), record


# -----------------------------------------------------------------------------------------------------------
# Memory for one 24 GB GPU: bf16 weights with a lean optimizer, and a planner that says what fits before
# anything is allocated. (Gradient checkpointing is DiT.gradient_checkpointing.)


def stochastic_round_bf16(x):
    """float32 -> bfloat16, rounding up or down at random with the probability that makes the result unbiased
    (E[round(x)] = x). bf16 keeps 8 mantissa bits, so an update 1000x smaller than a weight is lost by
    round-to-nearest every time; stochastic rounding lands it on average. Trick: add 16 random low bits to the
    float32 bit pattern, then drop the low 16 bits (what is left is exactly a bf16 number)."""
    bits = x.float().contiguous().view(torch.int32)
    noise = torch.randint_like(bits, 0, 1 << 16)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)


class LeanAdamW(torch.optim.Optimizer):
    """AdamW for bf16 weights on one GPU. The second moment of every matrix is factored into row and column means
    (Adafactor, Shazeer & Stern 2018: v_ij ~ r_i c_j / mean(r), O(m + n) floats instead of O(mn)); the first
    moment, if beta1 > 0, is kept in the weights' dtype; the step is computed in float32 and written back to
    bf16 weights with stochastic rounding. Per parameter: 2 bytes weight + 2 grad (+ 2 momentum) against
    4 + 4 + 8 for float32 AdamW. With beta1 = 0 (the official stage 2-3 betas (0, 0.999)) there is no first
    moment at all. Parameters with one dimension keep an unfactored second moment."""

    def __init__(self, params, lr=1e-4, betas=(0.0, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.float().reshape(p.shape[0], -1) if p.dim() >= 2 else p.grad.float()
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    if p.dim() >= 2:  # rows: first dim; columns: everything else flattened
                        state["row"] = torch.zeros(g.shape[0], device=p.device)
                        state["col"] = torch.zeros(g.shape[1], device=p.device)
                    else:
                        state["v"] = torch.zeros_like(g)
                    if b1 > 0:
                        state["m"] = torch.zeros(g.shape, device=p.device, dtype=p.dtype)
                state["step"] += 1
                n = state["step"]
                g2 = g * g + 1e-30
                if p.dim() >= 2:
                    state["row"].lerp_(g2.mean(1), 1 - b2)
                    state["col"].lerp_(g2.mean(0), 1 - b2)
                    v = state["row"][:, None] * state["col"][None, :] / state["row"].mean()
                else:
                    v = state["v"].lerp_(g2, 1 - b2)
                if b1 > 0:
                    m = state["m"].float().lerp_(g, 1 - b1)
                    state["m"].copy_(m)
                    g = m / (1 - b1 ** n)
                update = g / ((v / (1 - b2 ** n)).sqrt() + eps)  # bias-corrected, like AdamW
                w = p.float().reshape(g.shape)
                w.mul_(1 - lr * wd).add_(update, alpha=-lr)  # decoupled weight decay
                w = w.reshape(p.shape)
                p.copy_(stochastic_round_bf16(w) if p.dtype == torch.bfloat16 else w)


def check_memory_options(optimizer="adamw", param_dtype="float32"):
    """--optimizer and --param-dtype: ScaleOptions checks them when the flags are read, the functions using them too."""
    if optimizer not in ("adamw", "lean"):
        raise ConfigError(f"--optimizer must be 'adamw' or 'lean' (got {optimizer!r})")
    if param_dtype not in DTYPES:
        raise ConfigError(f"--param-dtype must be one of {sorted(DTYPES)} (got {param_dtype!r})")


def make_optimizer(params, name, lr, betas, weight_decay):
    """'adamw': torch AdamW (its states take the parameters' dtype). 'lean': LeanAdamW."""
    check_memory_options(optimizer=name)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
    return LeanAdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def prepare(model, param_dtype="float32", grad_checkpointing=False):
    """Apply a script's memory options to a model: weight dtype and gradient checkpointing. With bfloat16 the
    matrices (Linear, Conv3d) and the q/k RMSNorm scales become bf16; the LayerNorm of the float32 residual
    stream and the modulation vectors (added to float32 time embeddings) stay float32: ~0.1% of the weights."""
    check_memory_options(param_dtype=param_dtype)
    model.gradient_checkpointing = grad_checkpointing
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv3d, RMSNorm)):
            m.to(DTYPES[param_dtype])
    return model


def activation_bytes(cfg, batch, tokens, queries_out, text_len, act_bytes, grad_checkpointing):
    """Bytes autograd keeps for one forward of `tokens` tokens per sample through the DiT (backward peak).
    Per layer and token, counted from Block.forward: the residual stream (float32, kept between sublayers),
    ~24 D-wide and 2 ffn-wide activations in the compute dtype (norm/modulate outputs, q/k/v before and after
    RMSNorm and RoPE, attention in/out, ffn hidden before and after GELU), and the text K/V per layer. With
    gradient checkpointing only each block's float32 input is kept, plus one block's activations while it is
    recomputed in backward. `queries_out` tokens go through the head (the noisy half under teacher forcing)."""
    D, Fh, layers = cfg.dim, cfg.ffn_dim, cfg.num_layers
    per_layer = batch * tokens * (24 * D * act_bytes + 2 * Fh * act_bytes + 3 * D * 4) \
        + batch * text_len * 4 * D * act_bytes
    head = batch * queries_out * (3 * D * 4 + 2 * math.prod(cfg.patch) * cfg.out_dim * 4)
    if grad_checkpointing:
        return layers * batch * tokens * D * 4 + per_layer + head
    return layers * per_layer + head


def kv_cache_bytes(cfg, batch, frames, tokens_per_frame, act_bytes):
    """The self-attention K/V of `frames` frames in every layer, plus the text K/V per layer."""
    return cfg.num_layers * batch * (2 * frames * tokens_per_frame + 2 * cfg.text_len) * cfg.dim * act_bytes


def plan_memory(stage, cfg, batch, frames, H, W, frames_per_block=1, param_dtype="float32", optimizer="adamw",
                grad_checkpointing=False, ema=True, act_dtype=None, momentum=False, gpus=1):
    """Estimated peak memory of one training step of a stage, in bytes, by part. Nothing is allocated.
    stage: 'base' (stage 0, bidirectional), 'ar' (teacher forcing, stage 1) and 'ode' (stage 2a student), 'cd'
    (stage 2b: + frozen teacher + EMA target), 'dmd' (stage 3: generator + critic trainable, frozen real score),
    'stream' (inference).
    act_dtype: the compute dtype of activations (bfloat16 under CUDA autocast, float32 on CPU).
    gpus > 1: one GPU of a torchrun + FSDP2 run: weights, gradients and optimizer states divided by N, activations
    for batch / N clips, plus two blocks gathered whole at a time (the running one and the next, prefetched)."""
    batch = max(1, batch // gpus)  # this GPU's clips
    pb = DTYPES[param_dtype].itemsize
    ab = (DTYPES[act_dtype] if act_dtype else torch.float32).itemsize
    n_params = sum(math.prod(s) for s in _param_shapes(cfg))
    w = n_params * pb
    opt = _optimizer_bytes_from_shapes(cfg, optimizer, pb, momentum)
    tpf = (H // cfg.patch[1]) * (W // cfg.patch[2])
    N = frames * tpf
    tf_act = activation_bytes(cfg, batch, 2 * N, N, cfg.text_len, ab, grad_checkpointing)  # [clean | noisy]
    bi_act = activation_bytes(cfg, batch, N, N, cfg.text_len, ab, grad_checkpointing)
    io = 8 * batch * frames * cfg.in_dim * H * W * 4  # clips, noise, targets, predictions (float32)
    parts = {}
    if stage == "base":  # model + EMA, whole clips bidirectionally
        parts = dict(weights=w * (2 if ema else 1), grads=w, optimizer=opt, activations=bi_act)
    elif stage in ("ar", "ode"):  # model + EMA, teacher forcing over [clean | noisy]
        parts = dict(weights=w * (2 if ema else 1), grads=w, optimizer=opt, activations=tf_act)
    elif stage == "cd":  # student (trainable) + EMA target + frozen teacher
        parts = dict(weights=3 * w, grads=w, optimizer=opt, activations=tf_act)
    elif stage == "dmd":  # generator + critic trainable, real score frozen, optional generator EMA
        kv = kv_cache_bytes(cfg, batch, frames, tpf, ab)
        # generator update: the exit-step forwards of all blocks keep ~one whole-clip forward of activations (with
        # checkpointing: each block's layer inputs); the critic's whole-clip forward keeps the same, after it
        parts = dict(weights=w * (4 if ema else 3), grads=2 * w, optimizer=2 * opt, activations=bi_act,
                     kv_cache=kv)
        if not grad_checkpointing:  # each exit step also keeps [past | own] K/V per layer, a copy: block b of
            Lb, nb = frames_per_block * tpf, frames // frames_per_block  # Lb tokens sees (b + 1) Lb keys
            parts["exit_step_kv"] = cfg.num_layers * batch * 2 * Lb * nb * (nb + 1) // 2 * cfg.dim * ab
    elif stage == "stream":
        parts = dict(weights=w, kv_cache=kv_cache_bytes(cfg, batch, frames, tpf, ab),
                     activations=batch * frames_per_block * tpf * (4 * cfg.dim + cfg.ffn_dim) * ab * 2)
    else:
        raise ConfigError(f"unknown stage {stage!r}")
    parts["inputs"] = io
    if gpus > 1:
        for k in ("weights", "grads", "optimizer"):
            if k in parts:
                parts[k] = -(-parts[k] // gpus)
        parts["gathered_blocks"] = 2 * sum(math.prod(s) for s in _param_shapes(cfg, blocks_only=True)) // cfg.num_layers * pb
    parts["total"] = sum(parts.values())
    return parts


def plan_for(stage, opts, batch, frames_per_block=1, ema=True, momentum=False):
    """The plan of one training step of a stage script with these options, at the data's clip size:
    (parts, a line describing what was planned). Activations are bf16 on a GPU (autocast) or with bf16 weights."""
    cfg = PRESETS[opts.model]  # a known preset: ScaleOptions checks it when the flags are read
    if opts.data == "toy":
        import toy_data
        frames, H, W = toy_data.ToyData.shape
    elif parse_clip_size(opts.data):  # --data FxHxW (its first --clip-frames frames)
        frames, H, W = synthetic_size(opts.data, opts.clip_frames)
    else:
        frames, H, W = LatentFolder(opts.data, cfg.in_dim, cfg.text_dim, cfg.text_len, opts.clip_frames or None).shape
    act = "bfloat16" if torch.cuda.is_available() or opts.param_dtype == "bfloat16" else "float32"
    gpus = opts.gpus or int(os.environ.get("WORLD_SIZE", "1"))
    parts = plan_memory(stage, cfg, batch, frames, H, W, frames_per_block, opts.param_dtype, opts.optimizer,
                        opts.grad_checkpointing, ema=ema, act_dtype=act, momentum=momentum, gpus=gpus)
    what = ((f"one GPU of {gpus} (FSDP2), " if gpus > 1 else "") + f"{opts.model}, batch {batch}, clips of {frames} x {H} x {W} "
            f"({frames * (H // cfg.patch[1]) * (W // cfg.patch[2])} tokens), weights {opts.param_dtype}, activations "
            f"{act}, optimizer {opts.optimizer}, gradient checkpointing {'on' if opts.grad_checkpointing else 'off'}")
    return parts, what


def dry_run(stage, opts, batch, frames_per_block=1, ema=True, momentum=False):
    """--dry-run: the plan for this stage at the data's clip size, printed before anything is loaded."""
    parts, what = plan_for(stage, opts, batch, frames_per_block, ema, momentum)
    print(what)
    print(format_plan(stage, parts, opts.memory_cap_gib))
    return parts


def limit_memory(device, cap_gib):
    """On a GPU, hold this process to cap_gib of device memory (torch.cuda.set_per_process_memory_fraction), so a
    bigger card behaves like the 24 GB one this project targets: what would not fit there fails here too, with
    PyTorch's out-of-memory error. cap_gib <= 0: no cap. Nothing happens on a CPU."""
    if device.type != "cuda" or cap_gib <= 0:
        return
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * 2 ** 30 / total), index)
    torch.cuda.reset_peak_memory_stats(index)
    print(f"GPU memory capped at {min(cap_gib, total / 2 ** 30):.1f} of {total / 2 ** 30:.1f} GiB "
          f"(--memory-cap-gib; 0 = no cap)")


def report_memory(device, stage, opts, batch, frames_per_block=1, ema=True, momentum=False):
    """After a run on a GPU: the measured peak (torch.cuda.max_memory_allocated, since limit_memory) beside the
    planner's estimate for the same options, so the plan can be checked at scale. Returns the peak in bytes."""
    if device.type != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated(device)
    reserved = torch.cuda.max_memory_reserved(device)
    parts, what = plan_for(stage, opts, batch, frames_per_block, ema, momentum)
    print(f"{stage}: peak GPU memory {peak / 2 ** 30:.2f} GiB allocated ({reserved / 2 ** 30:.2f} GiB reserved); "
          f"planned {parts['total'] / 2 ** 30:.2f} GiB (plan / measured {parts['total'] / peak:.2f}); {what}")
    return peak


def _param_shapes(cfg, blocks_only=False):
    with torch.device("meta"):  # shapes only: a 14B model costs nothing here
        model = DiT(cfg)
        return [tuple(p.shape) for p in (model.blocks if blocks_only else model).parameters()]


def _optimizer_bytes_from_shapes(cfg, name, param_bytes, momentum):
    """AdamW: exp_avg + exp_avg_sq in the parameter dtype. Lean: row + column means (float32) per matrix, a full
    float32 second moment per vector, and a first moment in the parameter dtype only when beta1 > 0."""
    total = 0
    for s in _param_shapes(cfg):
        n = math.prod(s)
        if name == "adamw":
            total += 2 * n * param_bytes
        else:
            total += 4 * (s[0] + n // s[0] if len(s) >= 2 else n) + (n * param_bytes if momentum else 0)
    return total


def format_plan(stage, parts, cap_gib=24.0):
    gib = lambda b: f"{b / 2 ** 30:.2f} GiB"
    body = ", ".join(f"{k} {gib(v)}" for k, v in parts.items() if k != "total")
    verdict = "fits" if parts["total"] <= cap_gib * 2 ** 30 else "does NOT fit"
    return f"{stage}: estimated peak {gib(parts['total'])} ({body}) -> {verdict} in {cap_gib:g} GiB"


# -----------------------------------------------------------------------------------------------------------
# Past one GPU: torchrun + FSDP2. `torchrun --nproc_per_node N <stage>.py ...` starts N copies of a stage. Each
# keeps a 1/N shard of every model (FSDP2's fully_shard, one unit per DiT block: a block's weights are gathered
# just before it runs and freed after), computes its 1/N of every global batch, and the reduce-scatter of the
# gradients averages them over the processes. Every process draws all the random numbers of the *global* batch
# from the same generators and keeps its own rows (Part), so N processes compute what one does, to float error,
# and a run can resume at another N: checkpoints hold whole tensors, written by process 0.


@dataclass
class Part:
    """This process's share of every global batch: rows [rank * n / world, (rank + 1) * n / world). Part() is a
    single process, for which every method is the identity."""
    rank: int = 0
    world: int = 1

    def __call__(self, x):  # the own rows of a global-batch tensor or list (None passes through)
        if self.world == 1 or x is None:
            return x
        n = len(x) // self.world
        return x[self.rank * n:(self.rank + 1) * n]

    def randn(self, shape, generator=None):  # shape: the own rows'. Drawn for the global batch, then the own rows:
        return self(torch.randn((shape[0] * self.world, *shape[1:]), generator=generator))  # RNG in step with N = 1

    def rand(self, n, generator=None):  # n: the own rows
        return self(torch.rand(n * self.world, generator=generator))

    def check(self, cfg, *counts):
        """Before any work: a run's options that N processes cannot honour. counts: (flag, value) pairs that must
        divide among the processes, --batch-size always."""
        if cfg.actions and cfg.data != "toy":
            check_actions(True, None, cfg.data)
        if self.world > 1 and cfg.optimizer == "lean":
            raise ConfigError("--optimizer lean factors the second moment over whole matrices; under torchrun each "
                              "process holds a slice: use --optimizer adamw (its states shard with the weights)")
        for flag, n in (("--batch-size", cfg.batch_size), *counts):
            if n % self.world:
                raise ConfigError(f"{flag} {n} must be a multiple of the {self.world} processes")


def start_distributed(device):
    """Under torchrun (WORLD_SIZE > 1): join the process group (NCCL on GPUs, one GPU per process; gloo on CPU).
    Returns (Part, device); a plain `python` run gets (Part(), device) and nothing else happens."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Part(), device
    import torch.distributed as dist
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():  # on GPUs NCCL for CUDA tensors and gloo for the few CPU ones (a logged loss)
        dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
    if dist.get_rank() > 0:  # process 0 prints for all (errors still reach stderr from every process)
        sys.stdout = open(os.devnull, "w")
    return Part(dist.get_rank(), world), device


def on_main(part, write):
    """Run `write` (a checkpoint or file write) on process 0 only, then wait for it in every process."""
    if part.rank == 0:
        write()
    if part.world > 1:
        torch.distributed.barrier()


def shard(model, part):
    """FSDP2 on a DiT: one unit per block, then the rest (patch/text/time embeddings and the head). Frozen models
    (a teacher, the real score) are sharded the same way. Nothing happens for one process.
    FSDP gathers a unit's weights as one flat buffer of one dtype, so --param-dtype bfloat16 (prepare keeps a few
    vectors in float32) becomes FSDP's mixed precision here: float32 shards, gathered and computed in bfloat16,
    gradients reduced in float32."""
    if part.world == 1:
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    bf16 = any(p.dtype == torch.bfloat16 for p in model.parameters())
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
        MixedPrecisionPolicy()
    model.float()
    for block in model.blocks:
        fully_shard(block.norm3, mp_policy=MixedPrecisionPolicy())  # its affine LayerNorm acts on the float32 stream
        fully_shard(block, mp_policy=policy)
    # the root too is resharded after its forward (FSDP2 keeps a root whole by default, for the backward): a model
    # run without a backward, like CD's target network, must be back in shards before its EMA update
    return fully_shard(model, mp_policy=policy, reshard_after_forward=True)


def whole(state, part):
    """A state dict (a model's or an optimizer's) with FSDP's shards (DTensor) gathered into whole tensors on the
    CPU of process 0 (the others keep None): what a checkpoint holds, whatever N wrote it. Collective: every
    process calls it. For one process it returns the state as it is."""
    from torch.distributed.tensor import DTensor
    if isinstance(state, dict):
        return {k: whole(v, part) for k, v in state.items()}
    if isinstance(state, list):
        return [whole(v, part) for v in state]
    if not isinstance(state, DTensor):
        return state
    full = state.full_tensor()  # one tensor at a time is whole on each device, then dropped
    return full.cpu() if part.rank == 0 else None


def load_whole(module, state):
    """Load a checkpoint's whole tensors into a (possibly sharded) model: each process keeps its shard."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    live = module.state_dict()
    module.load_state_dict({k: distribute_tensor(v.to(live[k].device), live[k].device_mesh, live[k].placements)
                            if isinstance(live[k], DTensor) else v for k, v in state.items()})


def load_whole_optimizer(opt, state):
    """The optimizer's twin of load_whole: every per-parameter state tensor shaped like its parameter is sharded
    like it (the states are keyed by the parameter's position, the same at every N)."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    params = [p for group in opt.param_groups for p in group["params"]]
    shard_like = lambda v, p: distribute_tensor(v.to(p.device), p.device_mesh, p.placements) \
        if isinstance(p, DTensor) and torch.is_tensor(v) and v.shape == p.shape else v
    opt.load_state_dict({**state, "state": {i: {k: shard_like(v, params[int(i)]) for k, v in s.items()}
                                            for i, s in state["state"].items()}})


def gather_rows(x, part):
    """The inverse of Part: every process's rows of a chunk, in rank order, gathered into the whole chunk."""
    if part.world == 1:
        return x
    import torch.distributed as dist
    out = [torch.empty_like(x) for _ in range(part.world)]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


def sum_over_processes(x, part):
    """A number summed over the processes: every process gets the same total."""
    if part.world == 1:
        return x
    import torch.distributed as dist
    t = torch.tensor([float(x)], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item()


def mean_over_processes(x, part):
    """A number averaged over the processes (a loss to log): every process gets the same mean."""
    return sum_over_processes(x, part) / part.world


# -----------------------------------------------------------------------------------------------------------
# Wan scale: the speed benchmark (random weights in the real shape) and streaming latents to MP4


class _StaticView:
    """What one static-shape forward sees of the KV cache: it writes its block's K/V at the token indices in
    `write` (a tensor at a fixed address, refilled in place before each call) and attends to the first `n_keys`
    tokens of the buffer, a Python constant of the captured graph."""

    def __init__(self, cache, write, n_keys, cross_kv):
        self.cache, self.write, self.n_keys, self.cross_kv = cache, write, n_keys, cross_kv

    def update(self, layer, k, v):
        c = self.cache
        if c.k is None:  # allocated by the first (eager) call, never inside a capture
            shape = (c.num_layers, *k.shape[:2], c.num_slots * c.tpf, k.shape[-1])
            c.k, c.v = k.new_zeros(shape), v.new_zeros(shape)
        c.k[layer].index_copy_(2, self.write, k.to(c.k.dtype))
        c.v[layer].index_copy_(2, self.write, v.to(c.v.dtype))
        return c.k[layer][:, :, :self.n_keys], c.v[layer][:, :, :self.n_keys]


def static_forward(model, view, x, t, actions, frame_pos, mask):
    """DiT.forward's path 3 (no gradient) with every per-block quantity a tensor at a fixed address: the frame
    positions of RoPE (`frame_pos`), the cache slots written (`view.write`), the keys seen (the first
    `view.n_keys`, or with `mask` the whole buffer and a boolean mask of the visible tokens). Nothing here reads a
    Python value that changes from block to block, so a CUDA graph captured once replays it."""
    B, nF, C, H, W = x.shape
    grid = (H // model.cfg.patch[1], W // model.cfg.patch[2])
    cos, sin = rope_cos_sin(model.cfg.dim // model.cfg.num_heads, frame_pos, grid, x.device)
    e, e0 = model.time_conditioning(t, actions)
    tokens = model.patchify(x)
    for layer, block in enumerate(model.blocks):
        tokens = block(tokens, e0, cos, sin, None, mask, view, layer)
    return model.unpatchify(model.head(tokens, e).float(), nF, H, W)


class FastStep:
    """The streaming forward with static shapes: a drop-in for `model` in sample_stream / Stream
    (fast(x, t, ctx, cache=, start_frame=, actions=)) that computes the same frames.

    At Wan scale a batch-1 stream is launch-bound (a profiled 6-frame stream: 0.32 s of GPU time against 1.9 s of
    CPU time in operators, docs/RESULTS.md, Wan scale). Here every forward of a given shape is captured once as a
    CUDA graph (mode "graph") and replayed: one launch.
    What changes from block to block (RoPE positions, the slots written, the visible tokens) lives in tensors
    refilled in place before the replay. The number of keys attended is a constant of each graph: a full cache
    from frame 0 sees a prefix of its buffer that grows by a block at a time, so a 21-frame stream captures 21
    graphs (sharing one memory pool), each an unmasked SDPA over exactly the visible keys (flash attention; a mask
    over the whole buffer would cost 1.5x the FLOPs per forward at 480x832 and lose the flash kernel). A rolling
    cache is full after `window` frames: one graph from then on. Only when the visible tokens are not a prefix (a
    rolling cache re-encoding its past under a new prompt) does a step attend to the whole buffer under a boolean
    mask.
    mode "compile": torch.compile(mode="reduce-overhead") of the same function; "static": eager (the CPU test)."""

    def __init__(self, model, cache, mode="graph"):
        if mode not in ("graph", "compile", "static"):
            raise ConfigError(f"unknown fast mode {mode!r} (graph, compile or static)")
        if mode == "graph" and not torch.cuda.is_available():
            raise ConfigError("--cuda-graph needs a CUDA GPU (on CPU the eager path is the fast one)")
        self.model, self.cache, self.mode = model, cache, mode
        self.run = static_forward
        if mode == "compile":  # one compiled graph per key count, like the captured graphs
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 512)
            self.run = torch.compile(static_forward, mode="reduce-overhead", dynamic=False)
        self.graphs, self.pool, self.buffers = {}, None, {}
        self.context, self.cross_kv, self.mask = None, None, None
        self.calls = self.captures = 0

    @torch.no_grad()
    def set_prompt(self, context):
        """The prompt's per-layer cross-attention K/V, written in place into the tensors the graphs read."""
        text = self.model.embed_text(context)
        kv = [block.cross_attn.text_kv(text) for block in self.model.blocks]
        if self.cross_kv is not None and all(a.shape == b.shape for (a, _), (b, _) in zip(self.cross_kv, kv)):
            for (k0, v0), (k1, v1) in zip(self.cross_kv, kv):
                k0.copy_(k1), v0.copy_(v1)
        else:  # the first prompt, or another text length: new tensors, so new graphs
            self.cross_kv, self.graphs = kv, {}
            self._static(*(t for pair in kv for t in pair))
        self.context = context

    def _static(self, *tensors):
        """torch.compile: tensors the compiled graphs read or write in place keep their address (no copies into
        the graph's own inputs, and no 'mutated inputs' fallback to running without CUDA graphs)."""
        if self.mode == "compile":
            for t in tensors:
                torch._dynamo.mark_static_address(t, guard=False)

    @torch.no_grad()
    def __call__(self, x, t, context, *, cache, start_frame=0, actions=None):
        if cache is not self.cache:
            raise ValueError("FastStep was built for another KV cache")
        m, c = self.model, self.cache
        B, nF, C, H, W = x.shape
        if c.k is not None and c.k.shape[1] != B:
            raise ConfigError(f"this stream's KV cache holds batch {c.k.shape[1]}, not {B}: start a new Stream")
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device).expand(B, nF)
        tpf = m.tokens_per_frame(H, W)
        c.num_layers = m.cfg.num_layers
        c.begin(start_frame, nF, tpf)  # the cache's bookkeeping, on the CPU, as in the eager path
        if context is not self.context:
            self.set_prompt(context)
        if nF not in self.buffers:
            self.buffers[nF] = (torch.zeros(nF, dtype=torch.long, device=x.device),
                                torch.zeros(nF * tpf, dtype=torch.long, device=x.device))
            self._static(*self.buffers[nF])
        frame_pos, write = self.buffers[nF]
        frame_pos.copy_(torch.arange(start_frame, start_frame + nF))
        write.copy_(c.write_tokens)
        mask = None
        if isinstance(c.visible_tokens, slice):
            n_keys = c.visible_tokens.stop
        else:  # not a prefix: the whole buffer, under a mask
            n_keys = c.num_slots * tpf
            if self.mask is None:
                self.mask = torch.zeros(1, 1, 1, n_keys, dtype=torch.bool, device=x.device)
                self._static(self.mask)
            self.mask.zero_()
            self.mask[..., c.visible_tokens.to(x.device)] = True
            mask = self.mask
        self.calls += 1
        view = _StaticView(c, write, n_keys, self.cross_kv)
        if c.k is None:  # the first forward runs eagerly: it allocates the cache, on this stream, outside any graph
            out = static_forward(m, view, x, t, actions, frame_pos, mask)
            self._static(c.k, c.v)
            return out
        if self.mode != "graph":
            return self.run(m, view, x, t, actions, frame_pos, mask).clone()
        key = (tuple(x.shape), actions is not None, n_keys, mask is not None)
        if key not in self.graphs:
            self.graphs[key] = self._capture(view, x, t, actions, frame_pos, mask)
        graph, xs, ts, acts, out = self.graphs[key]
        xs.copy_(x), ts.copy_(t)
        if actions is not None:
            acts.copy_(actions)
        graph.replay()
        return out.clone()  # the next replay of any graph may reuse this memory

    def _capture(self, view, x, t, actions, frame_pos, mask):
        """Warm up on a side stream (kernel plans), then capture one forward. No other thread's GPU work may run
        during a capture (an OverlappedDecoder's worker waits on GPU_WORK)."""
        with GPU_WORK:
            return self._capture_now(view, x, t, actions, frame_pos, mask)

    def _capture_now(self, view, x, t, actions, frame_pos, mask):
        xs, ts = x.clone(), t.clone()
        acts = None if actions is None else actions.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            static_forward(self.model, view, xs, ts, acts, frame_pos, mask)
        torch.cuda.current_stream().wait_stream(side)
        self.pool = self.pool or torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            out = static_forward(self.model, view, xs, ts, acts, frame_pos, mask)
        self.captures += 1
        return graph, xs, ts, acts, out


def stream_flops(cfg, tokens_per_frame, frames, frames_per_block, steps, first_steps=None):
    """Model FLOPs per frame of a full-cache stream (2 per multiply-add). Every block runs one forward per
    denoising step plus the t = 0 refresh, its Tb tokens attending to the cache (all earlier blocks + itself).
    Per layer: 2 Tb (4 D^2 self-attn q/k/v/o + 2 D^2 cross-attn q/o + 2 D ffn) linear FLOPs, 4 Tb K D for
    self-attention over K keys, 4 Tb L D for cross-attention over the L text tokens (their K/V are cached)."""
    D, Fh, L = cfg.dim, cfg.ffn_dim, cfg.text_len
    Tb = frames_per_block * tokens_per_frame
    total = 0
    for b in range(frames // frames_per_block):
        n_forwards = len(first_steps if (b == 0 and first_steps) else steps) + 1
        per_layer = 2 * Tb * (6 * D * D + 2 * D * Fh) + 4 * Tb * (b + 1) * Tb * D + 4 * Tb * L * D
        total += n_forwards * cfg.num_layers * per_layer
    return total / frames


def bench_wan(args):
    """Streaming speed at Wan scale with random weights in the preset's shape (speed does not depend on the
    values): frame-wise 1/2/4-step and chunk-wise 4-step over --latent-frames latent frames of --latent-hw, bf16
    SDPA on a GPU, each row run eagerly and through the fast path (FastStep: CUDA-graph replay on a GPU, or
    torch.compile with --compile; on a CPU the static eager step, which only checks the code path), side by side.
    Prints latent and video frames/s (the Wan VAE makes 4 video frames per latent frame after the first),
    first-frame latency, the ratio fast / eager, peak memory, FLOPs per latent frame and the implied utilisation
    of --peak-tflops; with --vae, also the VAE decode time and frames/s including it."""
    device = pick_device(args.device)
    cfg = PRESETS[args.model]
    h, w = parse_hw(args.latent_hw)
    n_lat = args.latent_frames
    _, ph, pw = cfg.patch
    if h < ph or w < pw or h % ph or w % pw:
        raise ConfigError(f"--latent-hw {args.latent_hw}: height and width must be positive multiples of the patch "
                          f"({ph}x{pw}), e.g. 60x104")
    if n_lat < 3:
        raise ConfigError(f"--latent-frames {n_lat}: the bench needs at least 3 (one 3-frame chunk)")
    if args.peak_tflops <= 0:
        raise ConfigError(f"--peak-tflops {args.peak_tflops:g}: the GPU's peak must be positive")
    fast = fast_mode(args) or ("graph" if device.type == "cuda" else "static")
    limit_memory(device, args.memory_cap_gib)
    print(format_plan("stream", plan_memory("stream", cfg, 1, n_lat, h, w, param_dtype="bfloat16",
                                            act_dtype="bfloat16"), args.memory_cap_gib or float("inf")))
    torch.manual_seed(0)
    with torch.device(device):
        model = DiT(cfg)
    if device.type == "cuda":
        model = model.to(torch.bfloat16)
    model.eval().requires_grad_(False)
    for p in model.parameters():  # Wan's zero-initialised head would make every output 0: fill it in
        if p.abs().sum() == 0:
            p.normal_(0, 0.02)
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim, device=device)
    tpf = model.tokens_per_frame(h, w)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{args.model} ({sum(p.numel() for p in model.parameters()):,} parameters, random weights), {name}, "
          f"{n_lat} latent frames of {h}x{w} ({tpf} tokens/frame), batch 1, "
          f"{'bf16 autocast' if device.type == 'cuda' else 'float32'}, SDPA, full KV cache; "
          f"eager vs fast path '{fast}' (after one untimed warm-up stream each)")
    print(f"{'mode':36s}{'path':>7s}{'latent f/s':>11s}{'video f/s':>10s}{'first frame':>13s}{'fast/eager':>11s}"
          f"{'peak mem':>10s}{'TFLOP/frame':>12s}{'util':>7s}")
    rows = [("frame-wise 1-step (block 0 4-step)", 1, 1, True), ("frame-wise 2-step (block 0 4-step)", 2, 1, True),
            ("frame-wise 4-step", 4, 1, False), ("chunk-wise 4-step", 4, 3, False)]
    results = []
    with torch.no_grad(), autocast(device, model):  # bf16 on a GPU
        for label, n, fpb, first4 in rows:
            frames = n_lat - n_lat % fpb
            steps = warped_steps(n, cfg.shift)
            first = warped_steps(4, cfg.shift) if first4 else None
            flops = stream_flops(cfg, tpf, frames, fpb, steps, first)
            for path in ("eager", fast):
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                # warm-up over the full length: every cache length is a new attention shape (one cuDNN plan, and
                # on the fast path one captured graph, per shape)
                clip, times = timed_stream(model, frames, steps, fpb, first, ctx=ctx, frame_hw=(h, w),
                                           fast=None if path == "eager" else path, warmup=True)
                peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else float("nan")
                total = sum(times)
                r = dict(mode=label, path=path, latent_fps=frames / total, video_fps=(4 * frames - 3) / total,
                         first_frame_s=times[0], peak_gib=peak / 2 ** 30, tflop_per_frame=flops / 1e12,
                         utilisation=flops * frames / total / (args.peak_tflops * 1e12), seconds=total)
                if path == "eager":
                    eager_clip, eager_fps = clip, r["latent_fps"]
                else:  # the same frames, up to bf16 rounding of a different kernel order
                    r["max_abs_diff"] = (clip.float() - eager_clip.float()).abs().max().item()
                r["ratio"] = r["latent_fps"] / eager_fps
                results.append(r)
                print(f"{label if path == 'eager' else '':36s}{path:>7s}{r['latent_fps']:11.2f}{r['video_fps']:10.2f}"
                      f"{r['first_frame_s']:12.3f}s{r['ratio']:10.2f}x{r['peak_gib']:8.1f}GiB"
                      f"{r['tflop_per_frame']:12.2f}{100 * r['utilisation']:6.1f}%")
        diffs = [r["max_abs_diff"] for r in results if "max_abs_diff" in r]
        print(f"fast vs eager frames: max |difference| {max(diffs):.2e} over all rows")
    if args.vae:
        vae = WanVAE(args.vae, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
        lat = torch.randn(n_lat, cfg.in_dim, h, w)
        vae.decode(lat[:2])  # warm-up
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        vae.decode(lat)
        _sync(device)
        dec = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else float("nan")
        print(f"VAE decode of {n_lat} latent frames: {dec:.2f} s (after the stream, not overlapped), peak memory "
              f"{peak:.1f} GiB (the DiT's weights held beside it)")
        for r in results:
            print(f"{r['mode']:36s} {r['path']:>7s} with decode after: {(4 * n_lat - 3) / (r['seconds'] + dec):.2f} "
                  f"video frames/s")
        # end to end: frame-wise 2-step on the fast path, decoding each block as it comes, inline or overlapped
        steps, first = warped_steps(2, cfg.shift), warped_steps(4, cfg.shift)
        for overlap in (False, True):
            decoder = OverlappedDecoder(vae, overlap)
            with torch.no_grad(), autocast(device, model):
                _, times = timed_stream(model, n_lat, steps, 1, first, ctx=ctx, frame_hw=(h, w), fast=fast,
                                        warmup=True, on_block=lambda block: decoder.push(block[0]))
            t0 = time.perf_counter()
            video = decoder.frames()
            total = sum(times) + time.perf_counter() - t0
            print(f"frame-wise 2-step, {fast}, decoding each block {'overlapped' if overlap else 'inline'}: "
                  f"{len(video) / total:.2f} video frames/s end to end ({len(video)} frames in {total:.2f} s)")
    return results


def parse_hw(spec, flag="--latent-hw", example="60x104"):
    try:
        h, w = (int(v) for v in spec.lower().split("x"))
    except ValueError:
        raise ConfigError(f"{flag} {spec!r}: expected HxW, e.g. {example}") from None
    return h, w


def main_wan(args, model, ckpt, device):
    """Stream a Wan-shaped checkpoint: latents to OUT.safetensors and, when OUT is .mp4 and the optional extra is
    installed, video decoded block by block while the stream goes on (OverlappedDecoder). The prompt is umT5
    features: --text FILE (a latent-folder clip or any safetensors with `text` (L, 4096)), or --prompt encoded on
    the spot (needs requirements-wan.txt)."""
    if device.type == "cuda":
        model = model.to(torch.bfloat16)
    limit_memory(device, args.memory_cap_gib)
    if args.text:
        from safetensors.torch import load_file
        text = load_file(args.text)["text"].float()
    else:
        text = WanTextEncoder(args.vae or WAN_DIFFUSERS, device=device)([args.prompt])[0]
    ctx = torch.zeros(1, model.cfg.text_len, model.cfg.text_dim)
    ctx[0, :len(text)] = text
    fpb = ckpt["config"].get("frames_per_block", 1)
    n_steps = args.steps or ckpt["config"].get("num_steps", 4)
    frames = args.frames or 21
    if frames % fpb:
        raise ConfigError(f"--frames {frames} is not a whole number of {fpb}-frame blocks")
    h, w = parse_hw(args.latent_hw)
    steps = warped_steps(n_steps, model.cfg.shift)
    first = warped_steps(4, model.cfg.shift) if (fpb == 1 and n_steps < 4) else None
    decoder = None
    if args.out.endswith(".mp4"):
        try:
            decoder = OverlappedDecoder(WanVAE(args.vae or WAN_DIFFUSERS, device=device))
        except (ImportError, OSError) as err:  # the optional extra missing, or the VAE weights out of reach
            print(f"not decoded (the latents are kept): {err}")
    t0 = time.perf_counter()
    with autocast(device, model):  # bf16 on a GPU
        clip, times = timed_stream(model, frames, steps, fpb, first, args.window or None, args.sink, ctx.to(device),
                                   seed=args.seed, frame_hw=(h, w), fast=fast_mode(args),
                                   on_block=decoder and (lambda block: decoder.push(block[0])))
    latents = clip[0].float().cpu()  # (F, 16, h, w)
    base = os.path.splitext(args.out)[0]
    write_latent_clip(base + ".safetensors", latents, text, args.prompt if not args.text else args.text)
    print(f"{frames} latent frames in {sum(times):.2f} s (first block {times[0]:.2f} s) -> {base}.safetensors")
    if decoder is not None:
        video = decoder.frames()
        total = time.perf_counter() - t0
        import imageio.v3 as iio
        iio.imwrite(args.out, video, fps=16)
        print(f"decoded {len(video)} frames while streaming (first video frame after "
              f"{decoder.first_frame_at - t0:.2f} s; {len(video) / total:.2f} video frames/s end to end) -> {args.out}")
    return latents


if __name__ == "__main__":
    parser = OneLineParser(description="Encode videos (NAME.mp4) and prompts (NAME.txt) into a latent folder for "
                                       "the stage scripts' --data (needs requirements-wan.txt)")
    parser.add_argument("--videos", required=True, help="a folder of NAME.mp4 clips, each with its prompt in NAME.txt")
    parser.add_argument("--out", required=True, help="the latent folder to write (NAME.safetensors per clip)")
    parser.add_argument("--negative", default="", help="negative prompt; its features become the unconditional text")
    parser.add_argument("--frames", type=int, default=81, help="video frames read per clip (81 -> 21 latent frames)")
    parser.add_argument("--size", default="480x832", help="HxW of the videos fed to the VAE")
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    parser.add_argument("--wan", default=WAN_DIFFUSERS, help="the Wan2.1-T2V-1.3B-Diffusers download (a folder with "
                        "vae/, text_encoder/, tokenizer/) or its hub name")
    a = parser.parse_args()
    run_main(lambda: make_latent_folder(a.videos, a.out, a.negative, a.frames, parse_hw(a.size, "--size", "480x832"),
                                        pick_device(a.device), a.wan))  # a bad --size or --device: one line too
