"""Tests of the toy world: the generator makes what the docstring says, and the evaluator scores real clips
ideally and each kind of corruption badly. CPU, a few seconds in all."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import toy_data as td  # noqa: E402
toy_data = td


@pytest.fixture(scope="module")
def real():
    clips, prompts = td.sample_clips(64, seed=0)
    return clips, prompts, td.evaluate(clips, prompts)


# -----------------------------------------------------------------------------
# the generator

def test_sample_clips_shape_dtype_determinism():
    a, pa = td.sample_clips(5, seed=3)
    b, pb = td.sample_clips(5, seed=3)
    c, pc = td.sample_clips(5, generator=torch.Generator().manual_seed(3))
    d, _ = td.sample_clips(5, seed=4)
    assert a.shape == (5, td.FRAMES, 3, td.SIZE, td.SIZE) and a.dtype == torch.float32
    assert torch.equal(a, b) and torch.equal(a, c) and pa == pb == pc
    assert not torch.equal(a, d)
    assert all(p in td.PROMPTS for p in pa)
    assert td.sample_clips(2, seed=0, frames=13)[0].shape[1] == 13


def test_every_pixel_is_a_palette_colour():
    clips, _ = td.sample_clips(64, seed=1)
    pixels = clips.permute(0, 1, 3, 4, 2).reshape(-1, 3)
    assert (pixels[:, None] == td.PALETTE).all(-1).any(-1).all()
    assert clips.pow(2).mean().item() == 1.0  # every value is +-1: the data's second moment is exactly 1


def test_given_prompts_are_rendered():
    prompts = [td.PROMPTS[i % 9] for i in range(18)]
    clips, out = td.sample_clips(18, seed=2, prompts=prompts)
    assert out == prompts
    for clip, prompt in zip(clips, prompts):
        colour = td.COLOURS[prompt.split()[0]]
        fg = (clip != -1).any(1)  # (F, H, W)
        assert fg.sum((1, 2)).min() > 0  # the shape is visible in every frame
        assert (clip.permute(0, 2, 3, 1)[fg] == torch.tensor(colour)).all()
    with pytest.raises(ValueError, match="valid prompts"):
        td.sample_clips(1, prompts=["purple circle"])


def test_half_extent_is_the_shapes_bounding_box():
    # the walls [h, SIZE - h] keep the shape inside the frame only if every shape pixel lies within pos +- h,
    # and they are tight only if the shape reaches within a pixel of that box
    g = torch.Generator().manual_seed(0)
    c = torch.arange(td.SIZE) + 0.5
    for s in range(len(td.SHAPES)):
        h = td.HALF_EXTENT[s]
        pos = h + (td.SIZE - 2 * h) * torch.rand(200, 2, generator=g)  # (200, 2)
        m = td.shape_mask(torch.full((200,), s), pos)  # (200, H, W)
        dx = (c - pos[:, 0, None, None]).expand_as(m)[m].abs()
        dy = (c[:, None] - pos[:, 1, None, None]).expand_as(m)[m].abs()
        assert dx.max() <= h[0] and dy.max() <= h[1]
        assert dx.max() > h[0] - 1 and dy.max() > h[1] - 1


def test_trajectory_is_straight_line_with_bounce():
    tr = td.sample_trajectories(256, seed=5, frames=24)
    lo = td.HALF_EXTENT[tr["shape"]]  # (n, 2)
    hi = td.SIZE - lo
    pos, p0, v = tr["pos"], tr["p0"], tr["v"]
    assert ((pos >= lo[:, None] - 1e-5) & (pos <= hi[:, None] + 1e-5)).all()  # the shape never leaves the frame
    assert (v.abs() == td.SPEED).all() and torch.equal(p0 - lo, (p0 - lo).round())  # integer lattice
    # an independent step-by-step simulation: move by v, reflect off a wall and flip that velocity component
    p, vel = p0.clone(), v.clone()
    for f in range(pos.shape[1]):
        torch.testing.assert_close(pos[:, f], p, atol=1e-4, rtol=0)
        p = p + vel
        over, under = p > hi, p < lo
        p = torch.where(over, 2 * hi - p, torch.where(under, 2 * lo - p, p))
        vel = torch.where(over | under, -vel, vel)
    # and the randomness is per clip: the speed along each axis is the same in every frame
    step = (pos[:, 1:] - pos[:, :-1]).abs()  # (n, F-1, 2)
    free = step > v.abs()[:, None] - 1e-4  # steps without a wall hit move exactly |v|
    assert free.float().mean() > 0.7
    assert (step <= v.abs()[:, None] + 1e-4).all()


# -----------------------------------------------------------------------------
# the text encoder

def test_text_encoder():
    torch.manual_seed(123)
    a = td.TextEncoder()(td.PROMPTS + [""])
    torch.manual_seed(456)
    b = td.TextEncoder()(td.PROMPTS + [""])
    assert a.shape == (10, td.TEXT_LEN, td.TEXT_DIM) and a.dtype == torch.float32 and a.device.type == "cpu"
    assert torch.equal(a, b)  # fixed embeddings, independent of the global RNG
    assert (a[-1] == 0).all()  # "" is the unconditional branch
    assert torch.equal(a[0, 0], a[1, 0]) and torch.equal(a[0, 1], a[3, 1])  # colour token, shape token
    assert len({tuple(e.flatten().tolist()) for e in a[:9]}) == 9
    assert 0.5 < td.TextEncoder().embedding.std() < 1.5
    for bad in ["purple circle", "circle red", "red", "red circle big", "Red circle"]:
        with pytest.raises(ValueError, match="valid prompts") as e:
            td.TextEncoder()([bad])
        assert repr(bad) in str(e.value) and "'green square'" in str(e.value)


# -----------------------------------------------------------------------------
# the evaluator

def test_real_clips_score_ideal(real):
    _, _, m = real
    assert m["blur"] == 0.0
    assert m["second_moment"] == 1.0
    assert m["prompt_acc"] == 1.0
    assert 1.2 < m["motion"] < 1.6 and m["motion_gap"] < 0.15
    assert m["physics"] < 0.3  # only pixel quantisation of the centroid
    assert m["fd"] < 3.0  # sampling noise of 64 vs 512 clips


def test_blurred_clips_score_worse(real):
    clips, prompts, m = real
    # the conditional-expectation failure: the average of 4 clips of the same prompt
    same, _ = td.sample_clips(4 * 64, seed=1, prompts=[p for p in prompts for _ in range(4)])
    blurred = same.view(64, 4, *clips.shape[1:]).mean(1)
    b = td.evaluate(blurred, prompts)
    assert b["blur"] > 0.1 and b["second_moment"] < 0.95
    assert b["fd"] > 10 * max(m["fd"], 1.0)
    # a spatially blurred clip (3x3 box filter on every frame)
    k = torch.ones(3, 1, 3, 3) / 9
    smooth = torch.nn.functional.conv2d(clips.flatten(0, 1), k, padding=1, groups=3).view_as(clips)
    s = td.evaluate(smooth, prompts)
    assert s["blur"] > 0.1 and s["second_moment"] < 0.95


def test_wrong_prompt_static_and_shuffled(real):
    clips, prompts, m = real
    wrong = [td.PROMPTS[(td.PROMPTS.index(p) + 1) % 9] for p in prompts]
    assert td.evaluate(clips, wrong)["prompt_acc"] == 0.0
    static = td.evaluate(clips[:, :1].expand_as(clips), prompts)
    assert static["motion"] == 0.0 and static["motion_gap"] > 1.0 and static["prompt_acc"] == 1.0
    shuffled = td.evaluate(clips[:, [3, 0, 5, 1, 4, 2]], prompts)
    assert shuffled["physics"] > 4 * m["physics"] and shuffled["fd"] > 10 * max(m["fd"], 1.0)
    # each frame from a different clip of the same prompt: right content, no consistent motion
    frames = torch.stack([td.sample_clips(64, seed=10 + f, prompts=prompts)[0][:, f] for f in range(td.FRAMES)], 1)
    jumpy = td.evaluate(frames, prompts)
    assert jumpy["prompt_acc"] == 1.0 and jumpy["physics"] > 4 * m["physics"]


def test_measure_positions_recovers_the_renderers_positions():
    traj = td.sample_trajectories(300, seed=5)
    clips = td.render(traj["shape"], traj["colour"], traj["pos"])
    for shapes in (None, traj["shape"]):  # detected shape, or the true one
        pos, shows = td.measure_positions(clips, shapes)
        assert pos.shape == (300, td.FRAMES, 2) and shows.all()
        assert (pos - traj["pos"]).abs().max() < 0.13
    # a shape moved by one pixel is measured one pixel away; an empty frame shows no shape
    moved = td.render(traj["shape"], traj["colour"], traj["pos"] + torch.tensor([1.0, 0.0]))
    pos, _ = td.measure_positions(moved[:20], traj["shape"][:20])
    inner = (traj["pos"][:20, :, 0] + 1 <= td.SIZE - td.HALF_EXTENT[traj["shape"][:20], 0][:, None])  # still inside
    assert ((pos[..., 0] - traj["pos"][:20, :, 0] - 1).abs()[inner] < 0.13).all()
    empty = clips[:2].clone()
    empty[:, 1] = -1.0
    assert not td.measure_positions(empty)[1][:, 1].any()


def test_prompt_acc_is_robust_to_stray_pixels_and_empty_frames_are_wrong(real):
    clips, prompts, _ = real
    noisy = clips.clone()
    g = torch.Generator().manual_seed(0)
    B, F = clips.shape[:2]
    for _ in range(3):  # 3 stray pixels of random palette colours in every frame
        i, j = torch.randint(td.SIZE, (2, B, F), generator=g)
        colour = td.PALETTE[torch.randint(1, 4, (B, F), generator=g)]  # (B, F, 3)
        noisy[torch.arange(B)[:, None], torch.arange(F), :, i, j] = colour
    assert td.evaluate(noisy, prompts)["prompt_acc"] == 1.0
    empty = td.evaluate(torch.full_like(clips, -1.0), prompts)
    assert empty["prompt_acc"] == 0.0 and empty["motion"] == 0.0 and np.isnan(empty["physics"])
    half = clips.clone()
    half[:, 2:] = -1.0  # shape visible in 2 of 6 frames: the majority vote says "no shape"
    assert td.evaluate(half, prompts)["prompt_acc"] == 0.0


def test_custom_reference_and_other_lengths():
    ref = td.make_reference(td.sample_clips(128, seed=7, frames=12)[0])
    clips, prompts = td.sample_clips(32, seed=8, frames=12)
    m = td.evaluate(clips, prompts, reference=ref)
    assert m["prompt_acc"] == 1.0 and m["physics"] < 0.3 and m["motion_gap"] < 0.2
    with pytest.raises(ValueError, match="prompts"):
        td.evaluate(clips, prompts[:-1], reference=ref)


def test_frechet_distance_closed_forms():
    g = np.random.default_rng(0)
    a = g.normal(size=(5, 5))
    s = a @ a.T
    mu = g.normal(size=5)
    assert abs(td.frechet_distance(mu, s, mu, s)) < 1e-6
    # 1-D: (m1 - m2)^2 + (sigma1 - sigma2)^2
    fd = td.frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([-1.0]), np.array([[9.0]]))
    assert abs(fd - (4.0 + 1.0)) < 1e-4


# -----------------------------------------------------------------------------
# videos

def test_accuracy_interval_is_wilsons():
    # textbook cases: 5 of 10 -> 0.237-0.763; none wrong still leaves room below 1; it always contains p
    lo, hi = td.accuracy_interval(0.5, 10)
    assert abs(lo - 0.2366) < 1e-4 and abs(hi - 0.7634) < 1e-4
    lo, hi = td.accuracy_interval(1.0, 72)
    assert abs(lo - (72 / (72 + 1.96 ** 2))) < 1e-12 and hi == 1.0
    for p, n in [(0.0, 9), (0.9, 72), (0.97, 288)]:
        lo, hi = td.accuracy_interval(p, n)
        assert 0.0 <= lo <= p <= hi <= 1.0


def test_roughen_flips_exactly_k_edge_pixels_and_stays_on_the_palette(real):
    clips, prompts, _ = real
    for k in (1, 4):
        rough = td.roughen(clips, k)
        changed = (rough != clips).any(2)  # (B, F, H, W)
        assert (changed.sum((-1, -2)) == k).all()
        m = td.evaluate(rough, prompts)
        assert m["blur"] == 0.0 and m["second_moment"] == 1.0  # every pixel still a palette colour
    assert td.evaluate(td.roughen(clips, 4), prompts)["physics"] > td.evaluate(clips, prompts)["physics"]


def test_to_uint8_grid():
    clips, _ = td.sample_clips(5, seed=0)
    grid = td.to_uint8_grid(clips, ncols=3, scale=2)
    h = td.SIZE * 2
    assert grid.shape == (td.FRAMES, 2 * h + 2, 3 * h + 4, 3) and grid.dtype == np.uint8
    cell = grid[:, h + 2:, h + 2:2 * h + 2]  # clip 4: row 1, column 1
    expected = ((clips[4].permute(0, 2, 3, 1) + 1) * 127.5).round().numpy().astype(np.uint8)
    assert np.array_equal(cell[:, ::2, ::2], expected)
    assert (grid[:, h:h + 2] == 128).all() and (grid[:, h + 2:, 2 * h + 4:] == 128).all()  # separator, empty cell


def test_save_video_gif(tmp_path):
    import imageio.v3 as iio
    clips, _ = td.sample_clips(6, seed=0)
    path = tmp_path / "clips.gif"
    td.save_video(path, clips, ncols=3, scale=4)
    frames = iio.imread(path, index=None)
    assert frames.shape[:3] == (td.FRAMES, 2 * 64 + 2, 3 * 64 + 4)
    assert np.array_equal(frames[..., :3], td.to_uint8_grid(clips, ncols=3, scale=4))  # GIF keeps our 5 colours
    with pytest.raises(ValueError, match=".gif or .mp4"):
        td.save_video(tmp_path / "clips.avi", clips)


def test_save_video_labels_each_clip_and_titles_each_frame(tmp_path):
    import imageio.v3 as iio
    clips, prompts = td.sample_clips(6, seed=0)
    td.save_video(tmp_path / "l.gif", clips, ncols=3, scale=4, labels=prompts,
                  title=[f"frame {i}" for i in range(td.FRAMES)])
    frames = iio.imread(tmp_path / "l.gif", index=None)[..., :3]
    grid = td.to_uint8_grid(clips, ncols=3, scale=4)
    strip = 16  # one line of text: 12 + 4 px
    assert frames.shape[1:3] == (grid.shape[1] + 3 * strip, grid.shape[2])  # title + one label strip per row
    assert np.array_equal(frames[:, 2 * strip:2 * strip + 66], grid[:, :66])  # row 0 (and its separator) intact
    assert np.array_equal(frames[:, 3 * strip + 66:], grid[:, 66:])  # row 1 intact below its label strip
    for c in range(3):  # ink above every tile of both rows
        for top in (strip, 2 * strip + 66):
            assert (frames[0, top:top + strip, c * 66:c * 66 + 64] < 100).any()
    assert not np.array_equal(frames[0, :strip], frames[1, :strip])  # the title changes frame by frame
    assert np.array_equal(frames[0, strip:2 * strip], frames[1, strip:2 * strip])  # the labels do not


def test_save_video_mp4_needs_imageio_ffmpeg(tmp_path):
    pytest.importorskip("imageio")
    try:
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="pip install imageio-ffmpeg"):
            td.save_video(tmp_path / "clips.mp4", td.sample_clips(2, seed=0)[0])
    else:
        td.save_video(tmp_path / "clips.mp4", td.sample_clips(2, seed=0)[0])
        assert (tmp_path / "clips.mp4").stat().st_size > 0


def test_step_report_is_zero_on_real_clips_and_names_the_pairs_around_a_stopped_frame():
    clips, prompts = toy_data.sample_clips(64, seed=5)
    assert toy_data.step_report(clips, prompts) == dict(off=0.0, per_pair=[0.0] * (toy_data.FRAMES - 1), resized=0.0)
    grown = clips.clone()
    grown[:, 2] = torch.maximum(clips[:, 2], clips[:, 2].roll(1, dims=-1))  # frame 2's shape one column wider
    assert toy_data.step_report(grown, prompts)["resized"] == pytest.approx(2 / (toy_data.FRAMES - 1))  # 1-2, 2-3
    broken = clips.clone()
    broken[:, 3] = clips[:, 2]  # the shape stops for a frame: step 2-3 is 0 px, step 3-4 is 2 px or 0 (a bounce)
    r = toy_data.step_report(broken, prompts)
    assert r["per_pair"][:2] == [0.0, 0.0] and r["per_pair"][2:4] == [1.0, 1.0] and r["per_pair"][4] == 0.0
    empty = clips.clone()
    empty[:, 0] = -1.0  # a frame without a shape makes its pair off
    assert toy_data.step_report(empty, prompts)["per_pair"] == [1.0, 0.0, 0.0, 0.0, 0.0]


def test_own_step_report_is_zero_on_real_clips_and_flags_a_frame_that_breaks_the_motion():
    clips, prompts = toy_data.sample_clips(64, seed=5)
    assert toy_data.own_step_report(clips, prompts)["off"] == 0.0
    broken = clips.clone()
    broken[:, 3] = clips[:, 2]  # frame 3 repeats frame 2: the shape stops for a frame
    r = toy_data.own_step_report(broken, prompts)
    # frame 2 is untouched; frame 3 is off on both axes (a 1 px step expected, 0 seen); frames 4 and 5 continue a
    # past that now contains the stop, so they are off too except where a bounce happens to cancel it
    assert r["per_frame"][:2] == [0.0, 1.0] and min(r["per_frame"][2:]) > 0.5
    assert r["rigid"] == 1.0 and r["off_rigid"] == r["off"]  # a stopped shape keeps its size: the motion is off
    empty = clips.clone()
    empty[:, 5] = -1.0  # an empty frame counts as off
    assert toy_data.own_step_report(empty, prompts)["per_frame"][-1] == 1.0


def test_own_step_report_splits_off_a_shape_that_changes_size():
    clips, prompts = toy_data.sample_clips(64, seed=5)
    assert toy_data.own_step_report(clips, prompts)["rigid"] == 1.0
    grown = clips.clone()
    grown[:, 3] = torch.maximum(clips[:, 3], clips[:, 3].roll(1, dims=-1))  # frame 3's shape one column wider
    r = toy_data.own_step_report(grown, prompts)
    # only the check of frame 2 (frames 0-1-2) keeps one size; frame 3's centroid moved half a pixel, so the
    # checks through it are off, all on resized triples: nothing is off where the shape keeps its size
    assert r["rigid"] == pytest.approx(1 / (toy_data.FRAMES - 2)) and r["off_rigid"] == 0.0
    assert r["per_frame"][0] == 0.0 and r["per_frame"][1] > 0.4 and r["off"] > 0.1


def test_true_box_per_frame_is_one_on_real_clips_and_zero_for_a_frame_drawn_too_wide():
    clips, prompts = toy_data.sample_clips(64, seed=5)
    assert toy_data.true_box_per_frame(clips, prompts).tolist() == [1.0] * toy_data.FRAMES
    grown = clips.clone()
    grown[:, 3] = torch.maximum(clips[:, 3], clips[:, 3].roll(1, dims=-1))  # frame 3's shape one column wider
    assert toy_data.true_box_per_frame(grown, prompts).tolist() == [1.0, 1.0, 1.0, 0.0, 1.0, 1.0]
    swapped = ["red square" if "circle" in p else p for p in prompts]  # a rigid circle is not the square asked for
    want = torch.tensor([0.0 if "circle" in p else 1.0 for p in prompts]).mean().item()
    assert toy_data.true_box_per_frame(clips, swapped).tolist() == pytest.approx([want] * toy_data.FRAMES)


def test_next_block_report_scores_the_continuation_of_the_real_past():
    def oracle(prefix, noise, prompts):  # re-render the true next frame from the prompts' trajectories
        traj = toy_data.sample_trajectories(len(prompts), seed=4321, prompts=prompts)
        i = prefix.shape[1]
        return toy_data.render(traj["shape"], traj["colour"], traj["pos"])[:, i:i + noise.shape[1]]
    r = toy_data.next_block_report(oracle, 36, 1)
    assert r["off"] == 0.0 and r["rms"] < 0.15 and r["frames"] == (2, 5)
    copy_last = lambda prefix, noise, prompts: prefix[:, -1:]  # a model that never moves the shape
    assert toy_data.next_block_report(copy_last, 36, 1)["off"] == 1.0
    assert toy_data.next_block_report(oracle, 36, 3)["frames"] == (3, 5)


def test_area_per_frame_is_the_mean_foreground_area():
    clips, prompts = toy_data.sample_clips(9, seed=0, prompts=toy_data.PROMPTS)
    area = toy_data.area_per_frame(clips)
    fg = (clips.max(2).values > 0).float().sum((-1, -2)).mean(0)
    assert area.shape == (6,) and torch.equal(area, fg)


def test_exact_denoiser_known_answers():
    """E[x0 | x_t] over the toy's finite law: the prompt's mean at pure noise; the clip itself once the clean past
    determines it (frames >= 2 given frames < i), at any noise; the clip itself at low noise without a past."""
    assert [len(toy_data.all_clips(p)) for p in ("red circle", "red square", "red triangle")] == [324, 484, 360]
    clips, prompts = toy_data.sample_clips(6, seed=2)
    noise = torch.randn(clips.shape, generator=torch.Generator().manual_seed(0))
    pure = toy_data.exact_x0(noise, torch.full((6,), 1000.0), prompts)
    for b, p in enumerate(prompts):
        assert torch.allclose(pure[b], toy_data.all_clips(p).mean(0), atol=1e-5)
    s = 0.99
    x_t = (1 - s) * clips + s * noise
    ar = toy_data.exact_x0(x_t, torch.full((6,), 1000 * s), prompts, past=clips)
    assert torch.equal(ar[:, 2:], clips[:, 2:])  # 2 clean frames fix start and velocity
    assert not torch.allclose(ar[:, 1], clips[:, 1], atol=0.1)  # frame 1: 4 directions still possible at s = 0.99
    low = toy_data.exact_x0(0.8 * clips + 0.2 * noise, torch.full((6,), 200.0), prompts)
    assert (low - clips).abs().max() < 1e-4


def test_exact_denoiser_equals_bayes_rule_with_gaussian_likelihoods():
    """At a noise level where the posterior is spread over many clips, exact_x0 equals the posterior mean computed
    independently from torch.distributions.Normal log-likelihoods of x_t under each candidate clip."""
    clips, prompts = toy_data.sample_clips(2, seed=4)
    s = 0.9
    x_t = (1 - s) * clips + s * torch.randn(clips.shape, generator=torch.Generator().manual_seed(1))
    out = toy_data.exact_x0(x_t, torch.full((2,), 1000 * s), prompts)
    for b, p in enumerate(prompts):
        X = toy_data.all_clips(p).double()
        logp = torch.distributions.Normal((1 - s) * X, s).log_prob(x_t[b].double()).flatten(1).sum(1)
        w = torch.softmax(logp, 0)
        assert w.max() < 0.9  # a spread posterior: the test can see the noise scale
        assert torch.allclose(out[b].double(), torch.einsum("k,k...->...", w, X), atol=1e-4)


def test_exact_denoiser_of_each_frame_alone_is_bayes_rule_per_frame_and_loses_what_pooling_gains():
    """frames_alone: frame f's posterior mean from x_t^f only (Normal log-likelihoods per frame, computed here
    independently). At s = 0.8 the whole clip names its clip (joint error ~0) while single frames do not."""
    clips, prompts = toy_data.sample_clips(3, seed=5)
    s = 0.8
    x_t = (1 - s) * clips + s * torch.randn(clips.shape, generator=torch.Generator().manual_seed(2))
    alone = toy_data.exact_x0(x_t, torch.full((3,), 1000 * s), prompts, frames_alone=True)
    for b, p in enumerate(prompts):
        X = toy_data.all_clips(p).double()  # (K, F, 3, H, W)
        logp = torch.distributions.Normal((1 - s) * X, s).log_prob(x_t[b].double()).flatten(2).sum(2)  # (K, F)
        w = torch.softmax(logp, 0)
        assert torch.allclose(alone[b].double(), torch.einsum("kf,kf...->f...", w, X), atol=1e-4)
    joint = toy_data.exact_x0(x_t, torch.full((3,), 1000 * s), prompts)
    err = lambda x: (x - clips).pow(2).mean().item()
    assert err(joint) < 1e-3 < 0.01 < err(alone)
    with pytest.raises(ValueError, match="no clean past"):
        toy_data.exact_x0(x_t, torch.full((3,), 1000 * s), prompts, past=clips, frames_alone=True)


def test_exact_score_reads_the_prompt_back_and_returns_the_exact_velocity():
    score = toy_data.ExactScore()
    text = toy_data.TextEncoder()
    prompts = ["red circle", "blue triangle", ""]
    assert score.prompts(text(prompts)) == prompts
    clips, _ = toy_data.sample_clips(3, seed=0, prompts=["red circle", "blue triangle", "green square"])
    x_t = 0.5 * clips + 0.5 * torch.randn(clips.shape, generator=torch.Generator().manual_seed(0))
    v = score(x_t, torch.full((3,), 500.0), text(prompts))
    x0 = toy_data.exact_x0(x_t, torch.full((3,), 500.0), prompts)
    assert torch.allclose(x_t - 0.5 * v, x0, atol=1e-5)  # x0_hat = x_t - s v
    assert (x0 - clips).abs().max() < 1e-3  # at s = 0.5 the clip is decided, even unconditionally


# --- the world with actions (Causal Forcing++ §3.3 on the toy) --------------------------------------------------

def test_real_action_clips_follow_their_actions_and_shuffled_actions_do_not():
    clips, prompts, actions = td.sample_action_clips(256, seed=0, frames=12)
    real = td.action_report(clips, prompts, actions)
    assert real["accuracy"] == 1.0 and real["response"] == 0.0 and real["changes"] > 500
    wrong = td.action_report(clips, prompts, actions[torch.randperm(256, generator=torch.Generator().manual_seed(0))])
    assert wrong["accuracy"] < 0.5 and wrong["response"] > 1
    assert td.evaluate(clips[:, :td.FRAMES], prompts)["prompt_acc"] == 1.0  # the same shapes and colours


def test_walls_clamp_and_the_next_action_is_obeyed():
    shape = torch.tensor([1])  # square: walls at 3 and 13
    up_left, down_right = td.ACTIONS.index("up-left"), td.ACTIONS.index("down-right")
    pos = td.action_positions(torch.tensor([[4.0, 3.0]]), torch.tensor([[0, up_left, up_left, down_right]]), shape)
    assert pos[0].tolist() == [[4.0, 3.0], [3.0, 3.0], [3.0, 3.0], [4.0, 4.0]]


def test_a_one_frame_late_response_is_measured_as_one_frame():
    a = [td.ACTIONS.index(n) for n in ("stay", "down-right", "down-right", "up-right", "up-right", "up-right")]
    late = [a[0], td.ACTIONS.index("stay")] + a[1:-1]  # the shape does at frame i what was asked at frame i - 1
    clips, prompts, _ = td.sample_action_clips(1, seed=0, prompts=["red square"], actions=torch.tensor([late]))
    p0 = td.measure_positions(clips, torch.tensor([1]))[0][0, 0]
    assert (p0 >= 5).all() and (p0 <= 11).all()  # far enough from the walls that no step is clamped
    r = td.action_report(clips, prompts, torch.tensor([a]))
    assert r["changes"] == 1 and r["response"] == 1.0 and r["accuracy"] == pytest.approx(3 / 5)


def test_action_sequences_hold_and_change_at_the_set_rate_deterministically():
    a = td.sample_actions(4000, 12, torch.Generator().manual_seed(0))
    assert torch.equal(a, td.sample_actions(4000, 12, torch.Generator().manual_seed(0)))
    assert abs((a[:, 1:] != a[:, :-1]).float().mean().item() - td.P_CHANGE) < 0.01
    assert set(a.flatten().tolist()) == set(range(len(td.ACTIONS)))


def test_action_scripts_are_checked():
    assert td.parse_actions("up-left, stay,3", 3).tolist() == [0, 4, 3]
    with pytest.raises(ValueError, match="unknown action 'left'; the actions are up-left, up-right"):
        td.parse_actions("up-left,left", 2)
    with pytest.raises(ValueError, match="2 actions, fewer than the 3 frames"):
        td.parse_actions(["stay", "stay"], 3)


def test_prefix_report_scores_real_continuations_as_real_clips():
    def oracle(prefix, noise, prompts):  # the true continuation of the prompts' trajectories
        traj = toy_data.sample_trajectories(len(prompts), seed=4321, prompts=prompts)
        return toy_data.render(traj["shape"], traj["colour"], traj["pos"])[:, prefix.shape[1]:]
    r = toy_data.prefix_report(oracle, 36)
    prompts = [toy_data.PROMPTS[i % 9] for i in range(36)]
    real = toy_data.evaluate(oracle(torch.zeros(36, 0), None, prompts), prompts)["physics"]
    assert list(r) == [0, 1, 2] and all(v["step"] == 0.0 and v["physics"] == real for v in r.values())
    still = lambda prefix, noise, prompts: prefix[:, -1:].expand(-1, noise.shape[1], -1, -1, -1)  # never moves
    r = toy_data.prefix_report(still, 36, prefixes=(1, 2))
    assert r[1]["step"] == 1.0 and r[2]["step"] == 1.0 and r[2]["physics"] > 10 * real
