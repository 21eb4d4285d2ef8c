"""Equivalences where a symptom test is not enough: I2V is sample_stream on a cache pre-filled with the image at
t = 0; the evaluator scores real clips exactly and really uses its reference; the speed numbers are exact ratios of
a fake clock; and one DiT block (and the head) equals SPEC §2's equations written out independently."""
import math
from types import SimpleNamespace

import imageio.v2 as imageio
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import model as M
import sample_stream as S
import toy_data
from test_model import random_model
from test_stage3 import streamable  # noqa: F401  (fixture)


# --- I2V ----------------------------------------------------------------------------------------------------------

def test_i2v_is_sample_stream_on_a_cache_prefilled_with_the_image(streamable, tmp_path):
    """--first-frame: frame 0 is the image, written into the cache at t = 0; frames 1.. are exactly the few-step
    stream (same seed, same rolling window) continuing from that cache. Without the write they would differ."""
    paths, _ = streamable
    clip = toy_data.sample_clips(1, seed=3)[0][0, 0]
    png = tmp_path / "first.png"
    imageio.imwrite(png, ((clip.permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy())
    out = S.main(["--ckpt", paths[1], "--frames", "6", "--first-frame", str(png),
                  "--out", str(tmp_path / "i2v.gif")])

    m, _ = S.load_streamable(paths[1])
    img = S.read_first_frame(str(png))  # (1, 1, 3, 16, 16)
    ctx = toy_data.TextEncoder()(["red circle"])
    steps = M.warped_steps(4, m.cfg.shift)  # the checkpoint's default: 4 steps, no special first block

    def by_hand(write_image):
        cache = M.KVCache(window=S.default_window(1), sink=0)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            if write_image:
                m(img, torch.zeros(1, 1), ctx, cache=cache, start_frame=0)  # the image at t = 0
            blocks = [img]
            for f in range(1, 6):
                noise = torch.randn(1, 1, 3, 16, 16, generator=g)
                blocks.append(S.sample_stream(m, noise, ctx, steps, 1, None, g, cache=cache, start_frame=f))
        return torch.cat(blocks, 1)

    ref = by_hand(True)
    assert torch.equal(out[:, :1], img)
    assert (out - ref).abs().max() < 1e-5
    assert (by_hand(False)[:, 1:] - ref[:, 1:]).abs().max() > 1e-3  # the write is what conditions the rest


# --- the evaluator ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real64():
    return toy_data.sample_clips(64, seed=0)


def test_evaluator_on_real_clips_is_exact(real64):
    """Real clips move exactly 1 px per frame on both axes: motion sqrt(2); the bounce fit leaves only its grid
    error; and the default reference is REF_N real clips at REF_SEED."""
    clips, prompts = real64
    m = toy_data.evaluate(clips, prompts)
    assert abs(m["motion"] - math.sqrt(2)) < 1e-4 and m["motion_gap"] < 1e-4
    assert m["physics"] < 0.04 and m["blur"] == 0 and m["second_moment"] == 1 and m["prompt_acc"] == 1
    same = toy_data.make_reference(toy_data.sample_clips(toy_data.REF_N, seed=toy_data.REF_SEED)[0])
    assert toy_data.evaluate(clips, prompts, reference=same)["fd"] == m["fd"]


def test_evaluator_uses_a_custom_reference(real64):
    """Against a reference of static clips, motion_gap is the whole sqrt(2) and fd explodes; against other real
    clips fd moves a little. A reference that is ignored would leave both unchanged."""
    clips, prompts = real64
    default = toy_data.evaluate(clips, prompts)
    static = toy_data.make_reference(clips[:, :1].expand_as(clips).contiguous())
    m = toy_data.evaluate(clips, prompts, reference=static)
    assert abs(m["motion_gap"] - math.sqrt(2)) < 1e-4 and m["fd"] > 10 * default["fd"] + 10
    other = toy_data.evaluate(clips, prompts, reference=toy_data.make_reference(toy_data.sample_clips(64, seed=5)[0]))
    assert abs(other["fd"] - default["fd"]) > 1e-3


# --- speed numbers from a fake clock ------------------------------------------------------------------------------

class ClockModel(nn.Module):
    """A stand-in whose every forward costs one clock unit per input frame and returns v = 0."""

    def __init__(self, clock):
        super().__init__()
        self.cfg = SimpleNamespace(shift=5.0, in_dim=3, num_actions=0)
        self.w = nn.Parameter(torch.zeros(()))
        self.clock = clock

    def forward(self, x, t, ctx, **kw):
        self.clock[0] += x.shape[1]
        return torch.zeros_like(x)


def test_stream_speed_is_exact_on_a_fake_clock(monkeypatch):
    """2-step frame-wise stream of 6 frames, block 0 on the 4-step list; one unit per frame per forward.
    Cached: block 0 = 4 steps + refresh = 5 units, blocks 1-5 = 2 + 1 = 3 units: 20 in all.
    Recompute (no cache, no refresh): block 0 = 4 x 1, block i = 2 x (i + 1) frames: 4 + 40 = 44.
    So first frame 5, per frame 3, 6/20 frames per unit, 6/44 recomputing, a cache speed-up of 44/20 = 2.2.
    Chunk-wise, per-frame latency divides a block's time by its 3 frames."""
    clock = [0.0]
    monkeypatch.setattr(S, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    for repeats in (1, 3):
        s = S.stream_speed(ClockModel(clock), 2, 1, frames=6, first_block_4step=True, repeats=repeats)
        assert s["first_frame_s"] == 5 and s["per_frame_s"] == 3
        assert s["fps"] == pytest.approx(6 / 20, rel=1e-12) and s["fps_recompute"] == pytest.approx(6 / 44, rel=1e-12)
        assert s["cache_speedup"] == pytest.approx(2.2, rel=1e-12)
    # chunk-wise 4-step, two 3-frame blocks: cached 5 forwards x 3 frames = 15 per block (per frame 5);
    # recompute 4 x 3 + 4 x 6 = 36; speed-up 36/30
    s = S.stream_speed(ClockModel(clock), 4, 3, frames=6, repeats=1)
    assert s["first_frame_s"] == 15 and s["per_frame_s"] == 5
    assert s["fps"] == pytest.approx(6 / 30, rel=1e-12) and s["cache_speedup"] == pytest.approx(1.2, rel=1e-12)


def test_cli_prints_the_measured_speed_as_is(streamable, monkeypatch, capsys):
    """The CLI's speed line shows stream_speed's numbers unchanged: ms, frames/s and the speed-up (not 1/it)."""
    paths, tmp = streamable
    fake = dict(frames=6, first_frame_s=0.005, per_frame_s=0.003, fps=300.0, fps_recompute=75.0, cache_speedup=4.0)
    monkeypatch.setattr(S, "stream_speed", lambda *a, **k: fake)
    S.main(["--ckpt", paths[1], "--frames", "2", "--speed", "--out", str(tmp / "s.gif")])
    out = capsys.readouterr().out
    assert ("first-frame latency 5.0 ms, per-frame 3.00 ms, 300 frames/s with the KV cache; "
            "75 frames/s recomputing the prefix: 4.0x") in out
    monkeypatch.setattr(S, "stream_speed", lambda *a, **k: pytest.fail("timed without --speed"))
    S.main(["--ckpt", paths[1], "--frames", "2", "--out", str(tmp / "s.gif")])  # the speed check is opt-in


# --- the DiT block, written out from SPEC §2 ----------------------------------------------------------------------

def rms_norm(z, weight, eps=1e-6):
    return z / torch.sqrt(z.pow(2).mean(-1, keepdim=True) + eps) * weight


def linear(layer, z):
    return z @ layer.weight.T + layer.bias


def softmax_attention(q, k, v):  # (B, h, N, d)
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v


def rope_complex(z, cos, sin):
    """Adjacent channel pairs as complex numbers, times e^{i angle}."""
    zc = torch.view_as_complex(z.reshape(*z.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(zc * torch.complex(cos, sin)).flatten(-2)


def block_by_hand(blk, x, e0, cos, sin, ctx, heads):
    """SPEC §2: (m0..m5) = modulation + e0 per frame;
    x += self_attn(norm1(x) (1 + m1) + m0) m2;  x += cross_attn(norm3(x), ctx);  x += ffn(norm2(x) (1 + m4) + m3) m5."""
    B, N, D = x.shape
    nF = e0.shape[1]
    m = blk.modulation[None] + e0  # (B, F, 6, D)
    mod = [m[:, :, i].repeat_interleave(N // nF, dim=1) for i in range(6)]  # each (B, N, D), per token
    norm = lambda z: F.layer_norm(z, (D,), eps=1e-6)
    split = lambda z: z.reshape(B, -1, heads, D // heads).transpose(1, 2)  # (B, h, n, d)
    merge = lambda z: z.transpose(1, 2).reshape(B, -1, D)
    sa, ca = blk.self_attn, blk.cross_attn

    u = norm(x) * (1 + mod[1]) + mod[0]
    q = rope_complex(split(rms_norm(linear(sa.q, u), sa.norm_q.weight)), cos, sin)
    k = rope_complex(split(rms_norm(linear(sa.k, u), sa.norm_k.weight)), cos, sin)
    x = x + linear(sa.o, merge(softmax_attention(q, k, split(linear(sa.v, u))))) * mod[2]

    u = F.layer_norm(x, (D,), blk.norm3.weight, blk.norm3.bias, eps=1e-6)
    q = split(rms_norm(linear(ca.q, u), ca.norm_q.weight))
    k = split(rms_norm(linear(ca.k, ctx), ca.norm_k.weight))
    x = x + linear(ca.o, merge(softmax_attention(q, k, split(linear(ca.v, ctx)))))

    u = norm(x) * (1 + mod[4]) + mod[3]
    hidden = F.gelu(linear(blk.ffn[0], u), approximate="tanh")
    return x + linear(blk.ffn[2], hidden) * mod[5]


def test_dit_block_and_head_equal_the_spec_equations():
    """Random weights everywhere (modulation, norm3's affine, biases) and per-frame e0: model.Block and model.Head
    agree with the hand-written equations, so any swapped shift/scale/gate or norm shows up."""
    torch.manual_seed(0)
    m = random_model()
    blk, head = m.blocks[0], m.head
    with torch.no_grad():
        for p in list(blk.parameters()) + list(head.parameters()):
            p.normal_(0, 0.3)
    B, nF, tpf, D = 2, 3, 16, m.cfg.dim
    heads = m.cfg.num_heads
    x = torch.randn(B, nF * tpf, D)
    e = torch.randn(B, nF, D)
    e0 = torch.randn(B, nF, 6, D)
    ctx = torch.randn(B, 2, D)
    cos, sin = M.rope_cos_sin(D // heads, torch.arange(nF), (4, 4), "cpu")
    with torch.no_grad():
        got = blk(x, e0, cos, sin, ctx)
        ref = block_by_hand(blk, x, e0, cos, sin, ctx, heads)
        assert (got - ref).abs().max() < 1e-4 * ref.abs().max()
        # head: (h0, h1) = head.modulation + e (not e0); out = head(norm(x) (1 + h1) + h0)
        h = head.modulation[None] + e[:, :, None]  # (B, F, 2, D)
        h0, h1 = (h[:, :, i].repeat_interleave(tpf, dim=1) for i in range(2))
        ref_head = linear(head.head, F.layer_norm(x, (D,), eps=1e-6) * (1 + h1) + h0)
        assert (head(x, e) - ref_head).abs().max() < 1e-4 * ref_head.abs().max()
