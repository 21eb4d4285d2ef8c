"""Tests of model.py: the three attention paths agree where the method says they must, the Wan2.1 shape is
exact, the schedule helpers reproduce the official numbers, and bad weights / checkpoints fail loudly."""
import json
import os
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import save_file

import model as M
import wan_scale as WS


def random_model(preset="toy", seed=0, **overrides):
    """A model whose every weight is random (Wan's init zeroes the head, which would make outputs trivially 0)."""
    torch.manual_seed(seed)
    cfg = M.PRESETS[preset]
    cfg = M.ModelConfig(**{**cfg.__dict__, **overrides})
    m = M.DiT(cfg).eval()
    with torch.no_grad():
        m.head.head.weight.normal_(std=0.02)
    return m


def toy_inputs(B=2, F=6, seed=1, C=3, H=16, W=16, L=2, text_dim=32):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, F, C, H, W, generator=g)
    x_t = torch.randn(B, F, C, H, W, generator=g)
    ctx = torch.randn(B, L, text_dim, generator=g)
    return x0, x_t, ctx


def per_block_t(B, F, fpb, seed=2):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(B, F // fpb, generator=g) * 1000
    return t.repeat_interleave(fpb, dim=1)  # (B, F), constant inside a block


def stream_with_cache(m, x_t, t, ctx, clean, fpb, cache):
    """Path 3 block by block, writing the ground-truth clean block at t = 0 after each block."""
    outs = []
    for s in range(0, x_t.shape[1], fpb):
        blk = slice(s, s + fpb)
        outs.append(m(x_t[:, blk], t[:, blk], ctx, cache=cache, start_frame=s))
        m(clean[:, blk], torch.zeros_like(t[:, blk]), ctx, cache=cache, start_frame=s)  # t = 0 refresh
    return torch.cat(outs, dim=1)


# --- the three attention paths -----------------------------------------------------------------------------

@pytest.mark.parametrize("fpb", [1, 3])
def test_teacher_forcing_equals_kv_cache_streaming(fpb):
    m = random_model()
    x0, x_t, ctx = toy_inputs(F=6)
    t = per_block_t(2, 6, fpb)
    with torch.no_grad():
        v_tf = m(x_t, t, ctx, clean=x0, frames_per_block=fpb)
        v_kv = stream_with_cache(m, x_t, t, ctx, x0, fpb, M.KVCache(max_frames=6))
    assert v_tf.shape == x_t.shape
    assert (v_tf - v_kv).abs().max() < 1e-4
    assert v_tf.abs().mean() > 1e-2  # the comparison is not between two zeros


def dense_teacher_forcing_mask(F, tpf, fpb):
    """SPEC §2's mask written literally, token by token, as an independent reference for the block loop."""
    N = F * tpf
    blk = torch.arange(F).repeat_interleave(tpf) // fpb
    qb, kb = blk[:, None], blk[None, :]
    mask = torch.zeros(2 * N, 2 * N, dtype=torch.bool)
    mask[:N, :N] = kb <= qb  # clean sees clean 0..i
    mask[N:, :N] = kb < qb  # noisy sees clean 0..i-1
    mask[N:, N:] = kb == qb  # and its own noisy block
    return mask


@pytest.mark.parametrize("fpb", [1, 2])
def test_block_loop_implements_the_dense_mask(fpb):
    F, tpf = 4, 3
    q, k, v = (torch.randn(1, 2, 2 * F * tpf, 8) for _ in range(3))
    blocks = M.teacher_forcing_blocks(F, tpf, fpb)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense_teacher_forcing_mask(F, tpf, fpb))
    assert torch.equal(M.blocks_to_mask(blocks, 2 * F * tpf, 2 * F * tpf, "cpu"), dense_teacher_forcing_mask(F, tpf, fpb))
    for dense_limit in (0, 2 ** 26):  # the long-sequence loop and the short-sequence masked call
        assert (M.attention(q, k, v, blocks, dense_limit=dense_limit) - ref).abs().max() < 1e-5


@pytest.mark.parametrize("fpb", [1, 3])
def test_causality_later_frames_do_not_change_earlier_blocks(fpb):
    m = random_model()
    x0, x_t, ctx = toy_inputs(F=6)
    t = per_block_t(2, 6, fpb)
    i_end = fpb  # block 0 (and, for fpb=1, frames 1.. are "later")
    x0_b, x_t_b = x0.clone(), x_t.clone()
    x0_b[:, i_end:] += torch.randn_like(x0_b[:, i_end:])
    x_t_b[:, i_end:] += torch.randn_like(x_t_b[:, i_end:])
    with torch.no_grad():
        for kw_a, kw_b in [
            (dict(clean=x0, frames_per_block=fpb), dict(clean=x0_b, frames_per_block=fpb)),  # path 2
            (dict(frames_per_block=fpb), dict(frames_per_block=fpb)),  # block-causal (diffusion forcing)
        ]:
            a, b = m(x_t, t, ctx, **kw_a), m(x_t_b, t, ctx, **kw_b)
            assert (a[:, :i_end] - b[:, :i_end]).abs().max() < 1e-5
            assert (a[:, i_end:] - b[:, i_end:]).abs().max() > 1e-3  # later frames do react
        a = stream_with_cache(m, x_t, t, ctx, x0, fpb, M.KVCache(max_frames=6))  # path 3
        b = stream_with_cache(m, x_t_b, t, ctx, x0_b, fpb, M.KVCache(max_frames=6))
        assert (a[:, :i_end] - b[:, :i_end]).abs().max() < 1e-5
        # the bidirectional path is *not* causal: frame 0 depends on the future
        a, b = m(x_t, t, ctx), m(x_t_b, t, ctx)
        assert (a[:, :i_end] - b[:, :i_end]).abs().max() > 1e-3


@pytest.mark.parametrize("fpb", [1, 3])
def test_bidirectional_single_block_equals_kv_cache(fpb):
    m = random_model()
    _, x_t, ctx = toy_inputs(F=fpb)
    t = torch.full((2, fpb), 640.0)
    with torch.no_grad():
        a = m(x_t, t, ctx)
        b = m(x_t, t, ctx, cache=M.KVCache(max_frames=fpb))
    assert (a - b).abs().max() < 1e-5


def test_timestep_broadcast_forms_agree():
    m = random_model()
    _, x_t, ctx = toy_inputs(F=2)
    with torch.no_grad():
        a = m(x_t, torch.full((2, 2), 300.0), ctx)
        assert (a - m(x_t, torch.full((2,), 300.0), ctx)).abs().max() == 0
        assert (a - m(x_t, 300.0, ctx)).abs().max() == 0


# --- rolling cache and RoPE positions -----------------------------------------------------------------------

def test_rolling_cache_with_window_covering_clip_equals_full_cache():
    m = random_model()
    x0, x_t, ctx = toy_inputs(F=6)
    t = per_block_t(2, 6, 1)
    with torch.no_grad():
        full = stream_with_cache(m, x_t, t, ctx, x0, 1, M.KVCache(max_frames=6))
        roll = stream_with_cache(m, x_t, t, ctx, x0, 1, M.KVCache(window=6, sink=0))
        roll_sink = stream_with_cache(m, x_t, t, ctx, x0, 1, M.KVCache(window=5, sink=1))
    assert (full - roll).abs().max() < 1e-5
    assert (full - roll_sink).abs().max() < 1e-5


def test_rolling_cache_keeps_sinks_and_evicts_oldest():
    m = random_model()
    x0, x_t, ctx = toy_inputs(F=12)
    t = per_block_t(2, 12, 3)
    cache = M.KVCache(window=6, sink=2)
    with torch.no_grad():
        rolled = stream_with_cache(m, x_t, t, ctx, x0, 3, cache)
        full = stream_with_cache(m, x_t, t, ctx, x0, 3, M.KVCache(max_frames=12))
    assert cache.visible_frames() == [0, 1, 6, 7, 8, 9, 10, 11]  # sinks + the 6 most recent frames
    # the sinks' keys are still the ones written by their t = 0 refresh: compare against a fresh 2-frame run
    ref = M.KVCache(max_frames=12)
    with torch.no_grad():
        stream_with_cache(m, x_t[:, :3], t[:, :3], ctx, x0[:, :3], 3, ref)
    tpf = 16
    assert torch.equal(cache.k[:, :, :, :2 * tpf], ref.k[:, :, :, :2 * tpf])
    # the window fits the first blocks entirely, so they match the full cache; the last one does not
    assert (rolled[:, :6] - full[:, :6]).abs().max() < 1e-5
    assert (rolled[:, 9:] - full[:, 9:]).abs().max() > 1e-4


def test_rope_positions_keep_counting_and_are_relative():
    """Keys carry absolute frame positions; attention only sees differences, so the same stream started at
    frame 5000 (far past any training length, and past Wan's 1024-entry RoPE table) gives the same output."""
    m = random_model()
    x0, x_t, ctx = toy_inputs(F=4)
    t = per_block_t(2, 4, 1)
    with torch.no_grad():
        a = stream_with_cache(m, x_t, t, ctx, x0, 1, M.KVCache(window=4))
        cache = M.KVCache(window=4)
        b = []
        for s in range(4):
            b.append(m(x_t[:, s:s + 1], t[:, s:s + 1], ctx, cache=cache, start_frame=5000 + s))
            m(x0[:, s:s + 1], torch.zeros(2, 1), ctx, cache=cache, start_frame=5000 + s)
    assert cache.visible_frames() == [5000, 5001, 5002, 5003]
    assert (a - torch.cat(b, 1)).abs().max() < 1e-4


def test_rope_split_and_positions_wan_head_dim():
    # head dim 128 -> 22 frame pairs, 21 height pairs, 21 width pairs; angle of pair 0 = frame position,
    # first height pair = row, first width pair = column.
    cos, sin = M.rope_cos_sin(128, torch.tensor([7, 8]), (3, 5), "cpu")
    assert cos.shape == (2 * 3 * 5, 64)
    tok = 1 * 15 + 2 * 5 + 4  # frame 8, row 2, column 4
    for pair, angle in [(0, 8.0), (1, 8 * 10000 ** (-2 / 44)), (22, 2.0), (23, 2 * 10000 ** (-2 / 42)), (43, 4.0)]:
        assert abs(cos[tok, pair] - torch.cos(torch.tensor(angle))) < 1e-6
        assert abs(sin[tok, pair] - torch.sin(torch.tensor(angle))) < 1e-6


def test_cache_too_short_is_a_clear_error():
    m = random_model()
    _, x_t, ctx = toy_inputs(F=1)
    with pytest.raises(ValueError, match="rolling cache"):
        m(x_t, torch.zeros(2, 1), ctx, cache=M.KVCache(max_frames=2), start_frame=2)


def test_gradient_reaches_the_block_but_not_the_cached_past():
    m = random_model()
    x0, x_t, ctx = toy_inputs(F=2)
    cache = M.KVCache(max_frames=2)
    with torch.no_grad():  # block 0 written at t = 0, as after a finished block
        m(x0[:, :1], torch.zeros(2, 1), ctx, cache=cache, start_frame=0)
    x_in = x_t[:, 1:].clone().requires_grad_(True)
    v = m(x_in, torch.full((2, 1), 500.0), ctx, cache=cache, start_frame=1)
    v.square().mean().backward()
    assert not cache.k.requires_grad and not cache.v.requires_grad
    assert x_in.grad.abs().sum() > 0 and m.blocks[0].self_attn.k.weight.grad.abs().sum() > 0
    assert m.text_embedding[0].weight.grad.abs().sum() > 0  # text K/V recomputed on the grad path


def test_gradient_checkpointing_gives_same_gradients():
    m = random_model()
    x0, x_t, ctx = toy_inputs(F=2)
    t = per_block_t(2, 2, 1)
    grads = []
    for ckpt in (False, True):
        m.zero_grad()
        m.gradient_checkpointing = ckpt
        m(x_t, t, ctx, clean=x0, frames_per_block=1).square().mean().backward()
        grads.append(m.blocks[1].ffn[0].weight.grad.clone())
    assert (grads[0] - grads[1]).abs().max() < 1e-6



@pytest.mark.parametrize("cache_kind", ["full", "rolling"])
def test_gradient_checkpointing_through_the_kv_cache_gives_same_gradients(cache_kind):
    # DMD's rollout: every block's exit step carries gradient, then its t = 0 refresh overwrites its slot and the
    # stream moves on. Checkpointing recomputes each exit step in backward, when the cache is at the last block:
    # the recompute must attend to the past the forward saw (FrozenCacheLayer), or gradients silently change.
    m = random_model()
    x0, x_t, ctx = toy_inputs(F=5)
    grads = []
    for ckpt in (False, True):
        m.zero_grad()
        m.gradient_checkpointing = ckpt
        cache = M.KVCache(max_frames=5) if cache_kind == "full" else M.KVCache(window=2, sink=1)
        outs = []
        for f in range(5):
            v = m(x_t[:, f:f + 1], torch.full((2, 1), 600.0), ctx, cache=cache, start_frame=f)  # with grad
            outs.append(v)
            with torch.no_grad():
                m(x0[:, f:f + 1], torch.zeros(2, 1), ctx, cache=cache, start_frame=f)  # the refresh
        torch.cat(outs, 1).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], atol=1e-6, rtol=1e-5), name
    assert grads[0]["blocks.0.self_attn.k.weight"].abs().sum() > 0


# --- Wan2.1 shape and weights -------------------------------------------------------------------------------

def wan_expected_shapes(dim, ffn, layers, in_dim=16, out_dim=16, text_dim=4096, freq=256):
    """Wan2.1's original state-dict names and shapes, written out from the Wan2.1 code."""
    s = {"patch_embedding.weight": (dim, in_dim, 1, 2, 2), "patch_embedding.bias": (dim,),
         "text_embedding.0.weight": (dim, text_dim), "text_embedding.0.bias": (dim,),
         "text_embedding.2.weight": (dim, dim), "text_embedding.2.bias": (dim,),
         "time_embedding.0.weight": (dim, freq), "time_embedding.0.bias": (dim,),
         "time_embedding.2.weight": (dim, dim), "time_embedding.2.bias": (dim,),
         "time_projection.1.weight": (6 * dim, dim), "time_projection.1.bias": (6 * dim,),
         "head.head.weight": (4 * out_dim, dim), "head.head.bias": (4 * out_dim,), "head.modulation": (1, 2, dim)}
    for i in range(layers):
        b = f"blocks.{i}."
        s[b + "modulation"] = (1, 6, dim)
        for a in ("self_attn", "cross_attn"):
            for p in "qkvo":
                s[f"{b}{a}.{p}.weight"], s[f"{b}{a}.{p}.bias"] = (dim, dim), (dim,)
            s[f"{b}{a}.norm_q.weight"] = s[f"{b}{a}.norm_k.weight"] = (dim,)
        s[b + "norm3.weight"] = s[b + "norm3.bias"] = (dim,)
        s[b + "ffn.0.weight"], s[b + "ffn.0.bias"] = (ffn, dim), (ffn,)
        s[b + "ffn.2.weight"], s[b + "ffn.2.bias"] = (dim, ffn), (dim,)
    return s


@pytest.mark.parametrize("preset,params", [("wan2.1-1.3b", 1_418_996_800), ("wan2.1-14b", 14_288_491_584)])
def test_wan_parameter_count_and_names_on_meta_device(preset, params):
    with torch.device("meta"):
        m = M.DiT(M.PRESETS[preset])
    assert M.count_parameters(m) == params
    cfg = M.PRESETS[preset]
    got = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert got == wan_expected_shapes(cfg.dim, cfg.ffn_dim, cfg.num_layers)
    if preset == "wan2.1-1.3b":
        assert len(got) == 825


def test_wan_safetensors_roundtrip_single_and_sharded(tmp_path):
    src = random_model("wan-tiny", seed=3)
    state = {k: v.contiguous() for k, v in src.state_dict().items()}
    save_file(state, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    dst = WS.load_wan_weights(M.DiT(M.PRESETS["wan-tiny"]), str(tmp_path))  # a folder, like the HF download
    assert all(torch.equal(dst.state_dict()[k], v) for k, v in state.items())
    # sharded (the 14B layout): two files + an index
    keys = sorted(state)
    shard_dir = tmp_path / "sharded"
    shard_dir.mkdir()
    halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, ks in halves.items():
        save_file({k: state[k] for k in ks}, str(shard_dir / name))
    index = {"weight_map": {k: name for name, ks in halves.items() for k in ks}}
    (shard_dir / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    dst = WS.load_wan_weights(M.DiT(M.PRESETS["wan-tiny"]), str(shard_dir))
    assert all(torch.equal(dst.state_dict()[k], v) for k, v in state.items())


def test_wan_weights_mismatch_is_a_clear_error(tmp_path):
    state = {k: v.contiguous() for k, v in random_model("wan-tiny").state_dict().items()}
    del state["blocks.1.ffn.0.bias"]
    state["blocks.0.self_attn.q.weight"] = torch.zeros(3, 3)
    state["extra.weight"] = torch.zeros(1)
    path = str(tmp_path / "bad.safetensors")
    save_file(state, path)
    with pytest.raises(M.WeightsMismatchError) as err:
        WS.load_wan_weights(M.DiT(M.PRESETS["wan-tiny"]), path)
    msg = str(err.value)
    assert "1 missing" in msg and "blocks.1.ffn.0.bias" in msg
    assert "1 unexpected" in msg and "extra.weight" in msg
    assert "1 mis-shaped" in msg and "blocks.0.self_attn.q.weight: model (64, 64) vs file (3, 3)" in msg
    with pytest.raises(FileNotFoundError, match="huggingface-cli download"):
        WS.load_wan_weights(M.DiT(M.PRESETS["wan-tiny"]), str(tmp_path))


def test_unpatchify_order_is_pt_ph_pw_c_with_c_fastest():
    m = M.DiT(M.PRESETS["toy"])  # patch (1, 4, 4), 3 channels -> 48 outputs per token
    out = torch.arange(48.0).expand(1, 1, 48)  # one token
    video = m.unpatchify(out, 1, 4, 4)  # (1, 1, 3, 4, 4)
    for c, ph, pw in [(0, 0, 0), (2, 0, 0), (1, 3, 2)]:
        assert video[0, 0, c, ph, pw] == (ph * 4 + pw) * 3 + c


# --- schedule -----------------------------------------------------------------------------------------------

def test_schedule_grids_and_warped_lists_match_the_official_numbers():
    g48 = M.timestep_grid(48, 5.0)
    assert len(g48) == 48 and g48[0] == 1000 and abs(g48[1] - 995.8) < 0.05 and abs(g48[-1] - 96.15) < 0.01
    assert abs(g48[-2] - 178.6) < 0.05
    four = M.warped_steps(4, 5.0)
    assert [round(v, 2) for v in four] == [1000.0, 937.5, 833.33, 625.0]
    assert torch.allclose(torch.tensor(four), g48[[0, 12, 24, 36]])
    assert [round(v, 2) for v in M.warped_steps(2, 5.0)] == [1000.0, 833.33] and M.warped_steps(1, 5.0) == [1000.0]
    g1000 = M.timestep_grid(1000, 5.0)
    assert g1000[0] == 1000 and g1000.min() > 0 and abs(g1000[-1] - 4.98) < 0.01


def test_loss_weight_matches_official_bell_curve():
    w = M.loss_weight(M.timestep_grid(1000, 5.0), 5.0)
    assert abs(w.mean() - 1) < 1e-5 and w[0] == 0
    for t, ref in [(937.5, 0.40), (833.33, 1.02), (625.0, 1.91), (500.0, 2.08), (250.0, 1.46)]:
        assert abs(M.loss_weight(t, 5.0) - ref) < 0.01


def test_flow_conversions_and_euler_step_by_hand():
    x0, eps = torch.tensor([[[[[2.0]]]]]), torch.tensor([[[[[-1.0]]]]])  # (1,1,1,1,1)
    x_t = M.add_noise(x0, eps, 250.0)
    assert torch.allclose(x_t, torch.tensor(0.75 * 2 - 0.25))
    v = eps - x0  # the exact velocity
    assert torch.allclose(M.x0_from_v(x_t, v, 250.0), x0)
    assert torch.allclose(M.v_from_x0(x_t, x0, 250.0), v)
    # Euler from t=250 to t=100 along the exact velocity lands on the exact x_100
    assert torch.allclose(M.euler_step(x_t, v, 250.0, 100.0), M.add_noise(x0, eps, 100.0))


def test_sinusoidal_embedding_is_cos_first():
    e = M.sinusoidal_embedding(torch.tensor([3.0]), 256)
    assert torch.allclose(e[0, 0], torch.cos(torch.tensor(3.0))) and torch.allclose(e[0, 128], torch.sin(torch.tensor(3.0)))


# --- checkpoints and configs --------------------------------------------------------------------------------

def test_checkpoint_roundtrip_and_errors(tmp_path):
    m = random_model()
    path = str(tmp_path / "ckpt" / "ar_teacher.pt")
    M.save_checkpoint(path, stage="ar_teacher", model_config=m.cfg.__dict__, model=m.state_dict(), step=3)
    assert not os.path.exists(path + ".tmp")
    ckpt = M.load_checkpoint(path, stage="ar_teacher")
    m2 = M.model_from_checkpoint(ckpt)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))
    with pytest.raises(ValueError, match="'ar_teacher' checkpoint, but a 'causal_cd'"):
        M.load_checkpoint(path, stage="causal_cd")
    with pytest.raises(FileNotFoundError, match="python ar_teacher.py --phase ar"):
        M.load_checkpoint(str(tmp_path / "nope.pt"), make_cmd="python ar_teacher.py --phase ar")
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not read checkpoint .*; delete it and re-run: python x.py"):
        M.load_checkpoint(str(tmp_path / "broken.pt"), make_cmd="python x.py")
    (tmp_path / "notes.md").write_text("a user's file")
    with pytest.raises(ValueError, match="could not read checkpoint .*; give a .pt checkpoint of this project$"):
        M.load_checkpoint(str(tmp_path / "notes.md"), make_cmd="python x.py")  # never: "delete it"
    bad = dict(ckpt, model={k: v for k, v in ckpt["model"].items() if "blocks.0." not in k})
    with pytest.raises(M.WeightsMismatchError, match="missing"):
        M.model_from_checkpoint(bad)


def test_parse_config_flags_and_unknown_flag():
    @dataclass
    class Cfg:
        steps: int = 10
        lr: float = 1e-3
        ema: bool = True
        out_dir: str = "checkpoints"

    c = M.parse_config(Cfg, ["--steps", "3", "--no-ema", "--out-dir", "x"])
    assert (c.steps, c.lr, c.ema, c.out_dir) == (3, 1e-3, False, "x")
    with pytest.raises(SystemExit):
        M.parse_config(Cfg, ["--stpes", "3"])


# --- action conditioning (the world model) ------------------------------------------------------------------------

def world_model_pair(seed=0):
    """A toy DiT and the same weights with action conditioning added (its embedding zero, as initialised)."""
    plain = random_model("toy", seed=seed)
    world = M.DiT(M.ModelConfig(**{**plain.cfg.__dict__, "num_actions": 5})).eval()
    missing = world.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing == ["action_embedding.weight"] and not world.action_embedding.weight.any()
    return plain, world


@torch.no_grad()
def test_a_world_model_equals_the_plain_model_until_its_action_embedding_is_trained():
    plain, world = world_model_pair()
    g = torch.Generator().manual_seed(0)
    x, clean = torch.randn(2, 6, 3, 16, 16, generator=g), torch.randn(2, 6, 3, 16, 16, generator=g)
    ctx, t = torch.randn(2, 2, 32, generator=g), torch.rand(2, 6, generator=g) * 1000
    a = torch.randint(5, (2, 6), generator=g)
    for kw in ({}, dict(clean=clean, frames_per_block=1), dict(frames_per_block=2)):  # the three paths
        assert torch.equal(plain(x, t, ctx, **kw), world(x, t, ctx, actions=a, **kw))


@torch.no_grad()
def test_actions_condition_their_own_frame_and_causal_paths_keep_them_causal():
    _, world = world_model_pair()
    world.action_embedding.weight.normal_(std=1.0)  # "trained"
    g = torch.Generator().manual_seed(1)
    x, clean = torch.randn(1, 6, 3, 16, 16, generator=g), torch.randn(1, 6, 3, 16, 16, generator=g)
    ctx, t = torch.randn(1, 2, 32, generator=g), torch.full((1, 6), 500.0)
    a = torch.zeros(1, 6, dtype=torch.long)
    b = a.clone()
    b[0, 3] = 2  # another action at frame 3 only
    for kw in (dict(clean=clean, frames_per_block=1), dict(frames_per_block=1)):
        va, vb = world(x, t, ctx, actions=a, **kw), world(x, t, ctx, actions=b, **kw)
        assert torch.equal(va[:, :3], vb[:, :3]) and (va[:, 3:] - vb[:, 3:]).abs().amax((0, 2, 3, 4)).min() > 1e-4
    va, vb = world(x, t, ctx, actions=a), world(x, t, ctx, actions=b)  # bidirectional: every frame hears it
    assert (va[:, :3] - vb[:, :3]).abs().max() > 1e-4


def test_actions_must_match_the_model():
    plain, world = world_model_pair()
    x, ctx, t = torch.zeros(1, 2, 3, 16, 16), torch.zeros(1, 2, 32), torch.zeros(1, 2)
    with pytest.raises(ValueError, match="world model: pass actions"):
        world(x, t, ctx)
    with pytest.raises(ValueError, match="without action conditioning"):
        plain(x, t, ctx, actions=torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"actions must be \(B, F\) = \(1, 2\), got \(1, 3\)"):
        world(x, t, ctx, actions=torch.zeros(1, 3, dtype=torch.long))


def test_wan_weights_load_into_a_world_model_with_its_action_weights_reported_new(tmp_path, capsys):
    state = {k: v.contiguous() for k, v in random_model("wan-tiny", seed=3).state_dict().items()}
    save_file(state, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    world = WS.load_wan_weights(M.DiT(M.ModelConfig(**{**M.PRESETS["wan-tiny"].__dict__, "num_actions": 5})),
                                str(tmp_path))
    assert all(torch.equal(world.state_dict()[k], v) for k, v in state.items())
    assert "new (not in Wan2.1, zero-initialised): action_embedding.weight" in capsys.readouterr().out
