"""The Wan-scale latent folder: a synthetic folder loads and batches; missing or mis-shaped entries fail at open
with the file and what differs."""
import os

import pytest
import torch

import wan_scale as WS
from model import ConfigError


def make_folder(tmp_path, n=3, F=5, H=6, W=8, text_dim=64):
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        WS.write_latent_clip(str(tmp_path / f"clip_{i:03d}.safetensors"), torch.randn(F, 16, H, W, generator=g),
                            torch.randn(3 + i, text_dim, generator=g), prompt=f"clip {i}")
    return tmp_path


def test_latent_folder_loads_pads_and_batches(tmp_path):
    folder = WS.LatentFolder(str(make_folder(tmp_path)), text_dim=64, text_len=10)
    assert len(folder) == 3 and folder.shape == (5, 6, 8)
    lat, txt = folder[2]
    assert lat.shape == (5, 16, 6, 8) and txt.shape == (10, 64)
    assert txt[:5].abs().sum(-1).min() > 0 and torch.equal(txt[5:], torch.zeros(5, 64))  # 5 tokens, zero-padded
    lat, txt, null, prompts, actions = folder.batch(4, torch.Generator().manual_seed(0))
    assert lat.shape == (4, 5, 16, 6, 8) and txt.shape == (4, 10, 64) and torch.equal(null, torch.zeros(4, 10, 64))
    assert prompts is None and actions is None and folder.channels == 16
    txt2, null2, _, _ = folder.texts(4, torch.Generator().manual_seed(0))  # same clips drawn, text only
    assert torch.equal(txt2, txt) and torch.equal(null2, null)
    # a negative prompt file becomes the unconditional text; frames= crops every clip
    WS.write_latent_clip(str(tmp_path / "negative.safetensors"), torch.zeros(1, 16, 1, 1), torch.ones(2, 64))
    folder = WS.LatentFolder(str(tmp_path), text_dim=64, text_len=10, frames=3)
    assert len(folder) == 3 and folder[0][0].shape == (3, 16, 6, 8) and folder.negative[:2].eq(1).all()
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]  # atomic writes left nothing behind


def test_latent_folder_errors_name_the_file_and_the_difference(tmp_path):
    with pytest.raises(FileNotFoundError, match="write_latent_clip"):
        WS.LatentFolder(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="holds no"):
        WS.LatentFolder(str(tmp_path))
    make_folder(tmp_path, text_dim=64)
    from safetensors.torch import save_file
    save_file({"latents": torch.zeros(5, 16, 6, 8)}, str(tmp_path / "clip_no_text.safetensors"))
    WS.write_latent_clip(str(tmp_path / "clip_bad.safetensors"), torch.zeros(5, 4, 6, 8), torch.zeros(3, 64))
    with pytest.raises(ValueError, match=r"2 bad entries(.|\n)*clip_bad.safetensors: latents \(5, 4, 6, 8\), "
                                         r"expected \(F, 16, H, W\)(.|\n)*clip_no_text.safetensors: missing \['text'\]"):
        WS.LatentFolder(str(tmp_path), text_dim=64)
    os.remove(tmp_path / "clip_bad.safetensors"), os.remove(tmp_path / "clip_no_text.safetensors")
    with pytest.raises(ValueError, match=r"text \(3, 64\), expected \(L <= 512, 4096\)"):
        WS.LatentFolder(str(tmp_path))  # features of another text encoder width
    WS.write_latent_clip(str(tmp_path / "clip_big.safetensors"), torch.zeros(5, 16, 12, 8), torch.zeros(3, 64))
    with pytest.raises(ValueError, match=r"cannot be batched.*\(5, 12, 8\)"):
        WS.LatentFolder(str(tmp_path), text_dim=64)
    with pytest.raises(ValueError, match="4 latent frames, fewer than the 6"):
        WS.write_latent_clip(str(tmp_path / "clip_big.safetensors"), torch.zeros(4, 16, 6, 8), torch.zeros(3, 64))
        WS.LatentFolder(str(tmp_path), text_dim=64, frames=6)


def test_bad_input_to_the_wan_tools_is_refused_before_anything_loads(tmp_path):
    """The encoder CLI (wan_scale.py --videos), Wan weights and the Wan stream bench: one-line errors that name the
    flag, raised before any encoder, VAE or model is built."""
    import sample_stream as S
    (tmp_path / "f.txt").write_text("not a folder")
    out = str(tmp_path / "latents")
    with pytest.raises(ConfigError, match="--videos .*nope: no such folder of NAME.mp4"):
        WS.make_latent_folder(str(tmp_path / "nope"), out)
    with pytest.raises(ConfigError, match="--videos .*f.txt: a file; give the folder"):
        WS.make_latent_folder(str(tmp_path / "f.txt"), out)
    with pytest.raises(ConfigError, match="--out .*f.txt is a file"):
        WS.make_latent_folder(str(tmp_path), str(tmp_path / "f.txt"))
    with pytest.raises(ConfigError, match="--frames 0: encode at least one frame per video"):
        WS.make_latent_folder(str(tmp_path), out, frames=0)
    with pytest.raises(ConfigError, match="--size '480': expected HxW, e.g. 480x832"):
        WS.parse_hw("480", "--size", "480x832")
    with pytest.raises(ConfigError, match="is not Wan2.1's weights"):
        WS.load_wan_weights(None, str(tmp_path / "f.txt"))
    with pytest.raises(ConfigError, match="--latent-hw 7x9: height and width must be positive multiples of the patch"):
        S.main(["--bench", "--model", "wan-tiny", "--latent-hw", "7x9"])
