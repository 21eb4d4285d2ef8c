"""model.py's DiT against an independent implementation of Wan2.1: diffusers' `WanTransformer3DModel`.

Both models get the same random weights: ours are converted to diffusers' names by diffusers' OWN converter for
original Wan checkpoints (`convert_wan_transformer_to_diffusers`, what `from_single_file` uses on
`diffusion_pytorch_model.safetensors`) and loaded with strict key checking, then the two forwards must agree in
float32. This checks, against code we did not write, the state-dict names and everything the test of our own
parameter count cannot see: the timestep embedding, adaLN shift/scale/gate order, the norm2/norm3 swap, q/k
RMSNorm, the 3D RoPE split and pairing, cross-attention, the head's modulation and the unpatchify order.

Skipped when diffusers is not installed (CI installs it: see .ci/run)."""
import pytest
import torch

import model as M
import wan_scale as WS

diffusers = pytest.importorskip("diffusers")
from diffusers import WanTransformer3DModel  # noqa: E402
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers  # noqa: E402

# Wan-shaped and tiny: Wan's in/out 16 channels, text_dim 4096, patch (1, 2, 2), freq_dim 256; head_dim 32
# (not a multiple of 6) so RoPE splits it 12/10/10 frame/height/width. text_len 16 keeps the padded context small.
CFG = M.ModelConfig(**{**M.PRESETS["wan-tiny"].__dict__, "text_len": 16})
TOL = 1e-4


def random_dit(cfg, seed=0):
    """Our DiT with every parameter random: Wan's init leaves biases and the head at 0 and the norm / RMSNorm
    scales at 1, which would hide a swapped or missing bias, norm or head, so those get small random values."""
    torch.manual_seed(seed)
    m = M.DiT(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            if torch.all(p == 0) or torch.all(p == 1):
                p.add_(0.1 * torch.randn_like(p))
    return m


def diffusers_twin(ours):
    """WanTransformer3DModel with our weights, converted by diffusers' original-Wan converter, loaded strictly."""
    cfg = ours.cfg
    theirs = WanTransformer3DModel(
        patch_size=cfg.patch, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.dim // cfg.num_heads,
        in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=cfg.eps).eval()
    # the converter pops from the dict it is given: hand it a shallow copy
    converted = convert_wan_transformer_to_diffusers(dict(ours.state_dict()))
    theirs.load_state_dict(converted, strict=True)  # every key on both sides, every shape
    return theirs


def inputs(B, nF, H, W, cfg, seed=1, prompt_tokens=5):
    """Noisy latents (B, F, C, H, W) and a text context zero-padded to text_len, as LatentFolder makes it."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, nF, cfg.in_dim, H, W, generator=g)
    ctx = torch.zeros(B, cfg.text_len, cfg.text_dim)
    ctx[:, :prompt_tokens] = torch.randn(B, prompt_tokens, cfg.text_dim, generator=g)
    return x, ctx


@pytest.fixture(scope="module")
def pair():
    ours = random_dit(CFG)
    return ours, diffusers_twin(ours)


def theirs_v(theirs, x, t, ctx):
    """diffusers takes (B, C, F, H, W) and t of shape (B,) or, per token, (B, N) (Wan2.2's path)."""
    out = theirs(x.permute(0, 2, 1, 3, 4), t, ctx, return_dict=False)[0]
    return out.permute(0, 2, 1, 3, 4)  # (B, F, C, H, W)


@pytest.mark.parametrize("nF,H,W", [(1, 4, 4), (3, 6, 10)])  # 3 frames, non-square 3 x 5 token grid
@torch.no_grad()
def test_forward_matches_diffusers_wan(pair, nF, H, W):
    ours, theirs = pair
    x, ctx = inputs(2, nF, H, W, CFG)
    t = torch.tensor([937.5, 96.25])  # one t per sample, all frames of a sample at it (the bidirectional model)
    v_ours = ours(x, t, ctx)
    v_theirs = theirs_v(theirs, x, t, ctx)
    assert v_ours.shape == v_theirs.shape == x.shape
    assert v_ours.abs().mean() > 1e-2  # a non-trivial output
    diff = (v_ours - v_theirs).abs().max().item()
    print(f"F={nF} H={H} W={W}: max |ours - diffusers| = {diff:.3e} (output scale {v_ours.abs().max():.2f})")
    assert diff < TOL


@torch.no_grad()
def test_per_frame_timesteps_match_diffusers_per_token(pair):
    """Our per-frame t (the causal variant) equals diffusers' per-token t (Wan2.2 TI2V) with each frame's t on all
    its tokens: the per-frame adaLN of the blocks and of the head is applied to the right frame."""
    ours, theirs = pair
    nF, H, W = 3, 6, 10
    x, ctx = inputs(2, nF, H, W, CFG, seed=3)
    t = torch.tensor([[1000.0, 625.0, 0.0], [833.25, 250.0, 937.5]])  # (B, F)
    tpf = (H // CFG.patch[1]) * (W // CFG.patch[2])
    v_ours = ours(x, t, ctx)
    v_theirs = theirs_v(theirs, x, t.repeat_interleave(tpf, dim=1), ctx)
    diff = (v_ours - v_theirs).abs().max().item()
    print(f"per-frame t: max |ours - diffusers| = {diff:.3e}")
    assert diff < TOL


# --- the -Diffusers download: its transformer/ weights load with our loader ------------------------------------

def test_diffusers_names_map_back_to_ours_exactly():
    """diffusers' own converter takes our (original Wan2.1) names to diffusers'; wan_scale.wan_name takes them back:
    every key, every tensor, exactly."""
    ours = random_dit(CFG)
    sd = ours.state_dict()
    converted = convert_wan_transformer_to_diffusers(dict(sd))
    back = {WS.wan_name(k): v for k, v in converted.items()}
    assert sorted(back) == sorted(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


@torch.no_grad()
def test_a_diffusers_save_pretrained_folder_loads_and_matches(pair, tmp_path):
    """A tiny WanTransformer3DModel saved as the -Diffusers repo lays it out (transformer/ under the repo root)
    loads into our DiT by load_wan_weights, and the two forwards agree."""
    ours, theirs = pair
    theirs.save_pretrained(str(tmp_path / "transformer"), safe_serialization=True)
    loaded = WS.load_wan_weights(M.DiT(CFG).eval(), str(tmp_path))  # the repo root, as downloaded
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), ours.state_dict().values()))
    x, ctx = inputs(2, 3, 6, 10, CFG, seed=5)
    t = torch.tensor([1000.0, 250.0])
    diff = (loaded(x, t, ctx) - theirs_v(theirs, x, t, ctx)).abs().max().item()
    print(f"loaded from a diffusers folder: max |ours - diffusers| = {diff:.3e}")
    assert diff < 1e-5


def test_a_diffusers_folder_of_another_shape_is_refused_with_what_differs(pair, tmp_path):
    ours, theirs = pair
    theirs.save_pretrained(str(tmp_path / "transformer"), safe_serialization=True)
    bigger = M.ModelConfig(**{**CFG.__dict__, "ffn_dim": CFG.ffn_dim * 2})
    expected = r"(?s)diffusers format.*mis-shaped.*blocks.0.ffn.0.weight: model \(256, 64\) vs file \(128, 64\)"
    with pytest.raises(M.WeightsMismatchError, match=expected):
        WS.load_wan_weights(M.DiT(bigger), str(tmp_path / "transformer"))
