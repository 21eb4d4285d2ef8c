"""Wan scale's encode -> train -> decode path with the real library classes: diffusers' `AutoencoderKLWan`,
transformers' `UMT5EncoderModel` and a tokenizer, built tiny here and saved in the -Diffusers download's folder
layout (vae/, text_encoder/, tokenizer/), so WanVAE, WanTextEncoder and the latent-folder encoder run the code
path a user with the real download runs, on CPU, in seconds. Skipped without requirements-wan.txt."""
import os

import numpy as np
import pytest
import torch

for _module in ("diffusers", "transformers", "tokenizers", "imageio_ffmpeg"):
    pytest.importorskip(_module, reason="pip install -r requirements-wan.txt")

import ar_teacher  # noqa: E402
import model as M  # noqa: E402
import wan_scale as WS  # noqa: E402

WORDS = ["<pad>", "</s>", "<unk>", "a", "red", "ball", "rolls", "blue", "cube", "on", "the", "table", "blurry"]


@pytest.fixture(scope="module")
def tiny_wan(tmp_path_factory):
    """A Wan2.1-Diffusers-shaped folder with tiny random models: the VAE's 16 latent channels and 8x / 4x
    compression, umT5 features 4096 wide, a word-level tokenizer that appends </s> as umT5's does."""
    from diffusers import AutoencoderKLWan
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel
    root = tmp_path_factory.mktemp("Wan2.1-tiny-Diffusers")
    torch.manual_seed(0)
    AutoencoderKLWan(base_dim=8, dim_mult=[1, 1, 1, 1], num_res_blocks=1).save_pretrained(str(root / "vae"))
    UMT5EncoderModel(UMT5Config(vocab_size=len(WORDS), d_model=4096, d_kv=8, d_ff=16, num_layers=1, num_heads=2,
                                relative_attention_num_buckets=8)).save_pretrained(str(root / "text_encoder"))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(str(root / "tokenizer"))
    return root


def test_text_features_are_the_unpadded_rows_and_padding_does_not_leak(tiny_wan):
    encode = WS.WanTextEncoder(str(tiny_wan))
    alone, = encode(["a red ball"])
    short, longer = encode(["a red ball", "a blue cube on the table"])
    assert alone.shape == (4, 4096) and longer.shape == (7, 4096)  # the words + </s>; the 512-padding rows dropped
    assert torch.allclose(alone, short, atol=1e-2 * alone.abs().max().item())  # (bf16 weights, as Wan's pipeline)


def test_encode_videos_train_a_step_and_decode_to_mp4(tiny_wan, tmp_path):
    import imageio.v3 as iio
    from safetensors.torch import load_file
    videos, out = tmp_path / "clips", tmp_path / "latents"
    videos.mkdir()
    for i, prompt in enumerate(["a red ball rolls", "a blue cube on the table"]):  # a square moving right
        frames = np.zeros((9, 32, 64, 3), np.uint8)
        for f in range(9):
            frames[f, 8:24, 4 * f:4 * f + 16, i * 2] = 255
        iio.imwrite(videos / f"clip_{i}.mp4", frames, fps=8)
        (videos / f"clip_{i}.txt").write_text(prompt)
    WS.make_latent_folder(str(videos), str(out), negative="blurry", frames=9, size=(16, 32), wan=str(tiny_wan))
    folder = WS.LatentFolder(str(out), in_dim=16, text_dim=4096, text_len=512)
    assert folder.shape == (3, 2, 4)  # 9 frames -> 1 + 8/4 latent frames; 16x32 -> 2x4
    clip = load_file(str(out / "clip_1.safetensors"))
    assert clip["latents"].shape == (3, 16, 2, 4) and clip["text"].shape == (7, 4096)
    written = os.path.getmtime(out / "clip_0.safetensors")  # a rerun keeps the clips already written
    WS.make_latent_folder(str(videos), str(out), negative="blurry", frames=9, size=(16, 32), wan=str(tiny_wan))
    assert os.path.getmtime(out / "clip_0.safetensors") == written
    # one step of stage 1 on the folder, from random weights in the Wan shape
    ar_teacher.train(M.parse_config(ar_teacher.Config, [
        "--phase", "ar", "--model", "wan-tiny", "--init-weights", "random", "--data", str(out), "--ar-steps", "1",
        "--batch-size", "2", "--out-dir", str(tmp_path / "ckpt")]))
    assert torch.load(tmp_path / "ckpt" / "ar_teacher.pt", weights_only=False)["step"] == 1
    # and back to pixels with the same VAE, written as MP4
    video = WS.WanVAE(str(tiny_wan)).decode(clip["latents"])
    assert video.shape == (9, 16, 32, 3) and video.dtype == np.uint8
    iio.imwrite(tmp_path / "decoded.mp4", video, fps=8)
    assert iio.imread(tmp_path / "decoded.mp4", index=None).shape[:3] == (9, 16, 32)


def test_streaming_decode_block_by_block_is_the_whole_clip_decode(tiny_wan):
    """The VAE's temporal caches carry over between blocks: block-by-block decoding, inline or overlapped on a
    worker thread, gives the whole clip's frames exactly, and a second video starts clean."""
    vae = WS.WanVAE(str(tiny_wan))
    lat = torch.randn(5, 16, 2, 4, generator=torch.Generator().manual_seed(0))
    whole = vae.decode(lat)
    assert whole.shape == (17, 16, 32, 3)  # 1 + 4 x 4 video frames
    for overlap in (False, True, True):
        dec = WS.OverlappedDecoder(vae, overlap)
        for block in (lat[:1], lat[1:3], lat[3:]):  # frame-wise first block, then 2-frame blocks
            dec.push(block)
        assert np.array_equal(dec.frames(), whole)
    dec = WS.OverlappedDecoder(vae, overlap=False)
    dec.push(lat[:3])  # the first block alone: 1 + 4 x 2 frames, which the whole clip's first frames equal
    assert np.array_equal(dec.frames(), whole[:9])


def test_wan_stream_decodes_to_mp4_while_streaming(tiny_wan, tmp_path, capsys):
    """sample_stream.py on a Wan-shaped checkpoint with --vae writes its latents and an MP4 decoded block by block
    during the stream (that decode equals the whole clip's: the test above); --cuda-graph without a GPU is refused
    before any work."""
    import imageio.v3 as iio
    import sample_stream
    from safetensors.torch import load_file, save_file
    from test_model import random_model
    m = random_model("wan-tiny")
    ckpt = str(tmp_path / "student.pt")
    M.save_checkpoint(ckpt, stage="causal_cd", model_config=m.cfg.__dict__, config={"frames_per_block": 1},
                      model=m.state_dict(), ema=m.state_dict())
    save_file({"text": torch.randn(5, 4096)}, str(tmp_path / "prompt.safetensors"))
    out = tmp_path / "stream.mp4"
    args = ["--ckpt", ckpt, "--text", str(tmp_path / "prompt.safetensors"), "--frames", "3", "--latent-hw", "2x4",
            "--vae", str(tiny_wan), "--out", str(out), "--device", "cpu"]
    latents = sample_stream.main(args)
    assert "decoded 9 frames while streaming" in capsys.readouterr().out
    assert torch.equal(load_file(str(tmp_path / "stream.safetensors"))["latents"], latents)
    assert iio.imread(out, index=None).shape[:3] == (9, 16, 32)
    if not torch.cuda.is_available():
        written = os.path.getmtime(out)
        with pytest.raises(SystemExit):
            M.run_main(sample_stream.main, args + ["--cuda-graph"])
        assert "needs a CUDA GPU" in capsys.readouterr().err and os.path.getmtime(out) == written
