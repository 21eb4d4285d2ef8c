"""The action-conditioned world model (Causal Forcing++ §3.3 on the toy): actions reach every stage's loss and every
sampler, a frame hears only the actions up to its own, scripted streams are reproducible, and a world model and
--actions must go together. Tiny models with a random (trained-looking) action embedding, so actions matter."""
import io

import pytest
import torch

import ar_teacher
import causal_cd
import dmd
import model as M
import ode_init
import sample_stream as S
import toy_data
import wan_scale
from model import ConfigError
from test_ar_teacher import tiny_run

TINY = M.ModelConfig(**{**M.PRESETS["toy"].__dict__, "dim": 32, "ffn_dim": 64, "num_heads": 2, "num_layers": 2,
                        "num_actions": len(toy_data.ACTIONS)})


def world_model(seed=0):
    """A tiny world model whose head and action embedding are random (as initialised both are zero)."""
    torch.manual_seed(seed)
    m = M.DiT(TINY).eval()
    with torch.no_grad():
        m.head.head.weight.normal_(std=0.02)
        m.action_embedding.weight.normal_(std=1.0)
    return m.requires_grad_(False)


def inputs(B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 6, 3, 16, 16, generator=g)
    ctx, null = torch.randn(B, 2, 32, generator=g), torch.zeros(B, 2, 32)
    a = torch.randint(len(toy_data.ACTIONS), (B, 6), generator=g)
    return x, ctx, null, a


def changed_from(a, k):
    """The same actions with every frame >= k turned to another action."""
    b = a.clone()
    b[:, k:] = (b[:, k:] + 1) % len(toy_data.ACTIONS)
    return b


@pytest.mark.parametrize("sampler", ["stream", "ar", "recompute"])
@torch.no_grad()
def test_actions_change_only_the_frames_at_and_after_the_step_they_are_given(sampler):
    m, (noise, ctx, null, a) = world_model(), inputs()
    steps = M.warped_steps(2, m.cfg.shift)
    run = {"stream": lambda acts: S.sample_stream(m, noise, ctx, steps, generator=torch.Generator().manual_seed(1),
                                                  actions=acts),
           "ar": lambda acts: S.sample_ar(m, noise, ctx, null, 3, 2.0, actions=acts),
           "recompute": lambda acts: S.sample_recompute(m, noise, ctx, steps, generator=torch.Generator().manual_seed(1),
                                                        actions=acts)}[sampler]
    base = run(a)
    for k in (1, 3, 5):
        other = run(changed_from(a, k))
        assert torch.equal(other[:, :k], base[:, :k])  # the past never hears a later key
        assert (other[:, k] - base[:, k]).abs().max() > 1e-4  # frame k does hear its own


@torch.no_grad()
def test_the_bidirectional_sampler_hears_future_actions():
    """The world base is bidirectional: its frame 0 depends on later actions (the injectivity argument's premise)."""
    m, (noise, ctx, null, a) = world_model(), inputs()
    x = S.sample_bidirectional(m, noise, ctx, null, 3, 2.0, actions=a)
    y = S.sample_bidirectional(m, noise, ctx, null, 3, 2.0, actions=changed_from(a, 3))
    assert (x[:, 0] - y[:, 0]).abs().max() > 1e-4


@torch.no_grad()
def test_a_recache_replays_each_held_block_under_its_own_actions():
    """Re-caching under the same prompt must rewrite exactly the K/V the blocks were written with: the next block
    then equals the one of a stream that never re-cached (it would not if the re-cache used other actions)."""
    m, (_, ctx, _, a) = world_model(), inputs(B=1)
    steps = M.warped_steps(2, m.cfg.shift)

    def stream(recache):
        st = S.Stream(m, steps, max_frames=6, generator=torch.Generator().manual_seed(1))
        st.set_prompt(ctx)
        blocks = [st.next_block(actions=a[:, i:i + 1]) for i in range(4)]
        st.set_prompt(ctx, recache=recache)
        return torch.cat(blocks + [st.next_block(actions=a[:, 4:5])], 1), st

    kept, _ = stream(False)
    recached, st = stream(True)
    assert st.recache_calls == 4 and torch.allclose(recached, kept, atol=1e-5)


def test_every_stage_loss_hears_the_actions():
    """Dropping the actions anywhere in a loss would leave it unchanged when they change: each must move."""
    m, (x0, ctx, null, a) = world_model(), inputs()
    b, eps, g = changed_from(a, 0), torch.randn_like(x0), lambda: torch.Generator().manual_seed(3)
    t = torch.full((2, 6), 500.0)
    fm = lambda acts, **path: ar_teacher.flow_matching_loss(m, x0, ctx, t, eps, 2.0, False, actions=acts, **path)
    grid = M.timestep_grid(48, 2.0)
    cd = lambda acts: causal_cd.cd_loss(m, world_model(1), world_model(2), x0, ctx, null, grid, 3.0, 1, g(), acts)
    states = torch.stack([x0 + k for k in range(5)], 1)
    ode = lambda acts, kind: ode_init.ode_regression_loss(m, (states, x0), ctx, kind, 1, 2.0, g(), actions=acts)
    tt = torch.full((2,), 500.0)
    critic = lambda acts: dmd.critic_loss(m, x0, ctx, tt, eps, acts)
    gen_loss = lambda acts: dmd.dmd_loss(x0.clone().requires_grad_(), m, world_model(1), ctx, null, 4.0, tt, eps, acts)[1]
    pairs = [(fm(a), fm(b)), (fm(a, clean=x0, frames_per_block=1), fm(b, clean=x0, frames_per_block=1)),
             (cd(a), cd(b)), (ode(a, "ar"), ode(b, "ar")), (ode(a, "bidirectional"), ode(b, "bidirectional")),
             (critic(a), critic(b)), (gen_loss(a), gen_loss(b))]
    for i, (la, lb) in enumerate(pairs):
        assert abs(float(la) - float(lb)) > 1e-3 * abs(float(la)) > 0, f"loss {i} ignores the actions"
    # DMD with the critic equal to the real score and no CFG: both scores agree, so g = 0, if both hear the same actions
    assert dmd.dmd_loss(x0.clone().requires_grad_(), m, m, ctx, null, 1.0, tt, eps, a)[1] == 0


def test_the_world_data_and_its_evaluator():
    data = toy_data.ToyData(actions=True)
    x0, text, null, prompts, actions = data.batch(64, torch.Generator().manual_seed(0))
    assert actions.shape == (64, 6) and text.shape == (64, 2, 32)
    m = toy_data.evaluate(x0, prompts, actions=actions)
    assert m["action_acc"] == 1.0 and m["response"] == 0.0 and m["prompt_acc"] == 1.0
    wrong = toy_data.evaluate(x0, prompts, actions=changed_from(actions, 1))
    assert wrong["action_acc"] < 0.5
    assert m["fd"] < 5 < toy_data.evaluate(x0, prompts)["fd"]  # scored against the action world, not the plain one
    _, _, _, acts = data.texts(8, torch.Generator().manual_seed(0))
    assert acts.shape == (8, 6)
    assert toy_data.ToyData().batch(2)[4] is None  # the plain toy: no actions


def test_keys_steer_one_axis_and_keep_the_other():
    assert S.steer("stay", "up") == "up-right" and S.steer("stay", "left") == "down-left"
    assert S.steer("down-right", "up") == "up-right" and S.steer("up-right", "left") == "up-left"
    assert S.steer("up-left", "stay") == "stay" and S.steer("down-left", "down") == "down-left"
    assert {S.KEYS[k] for k in ("w", "\x1b[A")} == {"up"} and S.KEYS[" "] == "stay"


@pytest.fixture
def world_ckpt(tmp_path):
    path = tmp_path / "dmd_world.pt"
    M.save_checkpoint(str(path), stage="dmd", model_config=TINY.__dict__, config=dict(frames_per_block=1, num_steps=2),
                      model=world_model().state_dict(), ema=world_model().state_dict())
    return str(path)


def test_scripted_streams_are_deterministic_and_follow_the_script(world_ckpt, tmp_path):
    script = ",".join(["down-right"] * 4 + ["up-left"] * 4)
    run = lambda spec, seed=0: S.main(["--ckpt", world_ckpt, "--frames", "8", "--actions", spec, "--seed", str(seed),
                                       "--out", str(tmp_path / "s.gif")])
    first, again = run(script), run(script)
    assert torch.equal(first, again)
    other = run(",".join(["down-right"] * 4 + ["stay"] * 4))
    assert torch.equal(other[:, :4], first[:, :4]) and not torch.equal(other[:, 4:], first[:, 4:])
    (tmp_path / "keys.txt").write_text(script.replace(",", "\n") + "\n")
    assert torch.equal(run(str(tmp_path / "keys.txt")), first)  # a file of one action per line: the same stream
    alone = S.main(["--ckpt", world_ckpt, "--actions", script, "--out", str(tmp_path / "s.gif")])
    assert torch.equal(alone, first)  # without --frames the script sets the stream's length


def test_a_script_longer_than_the_stream_is_cut_with_a_word(world_ckpt, tmp_path, capsys):
    S.main(["--ckpt", world_ckpt, "--frames", "4", "--actions", ",".join(["stay"] * 6), "--out", str(tmp_path / "s.gif")])
    assert "the script has 6 actions; the stream is 4 frames (--frames, whole 1-frame blocks): the first 4 are " \
           "used" in capsys.readouterr().out


def test_world_model_bad_input(world_ckpt, tmp_path, capsys, monkeypatch):
    out = ["--out", str(tmp_path / "s.gif")]
    with pytest.raises(ConfigError, match="is a world model: give it actions"):
        S.main(["--ckpt", world_ckpt, "--frames", "4", *out])
    with pytest.raises(ConfigError, match="unknown action 'left'; the actions are up-left"):
        S.main(["--ckpt", world_ckpt, "--frames", "4", "--actions", "up-left,left,stay,stay", *out])
    (tmp_path / "notes.txt").write_text("turn left\n")
    with pytest.raises(ConfigError, match=r"unknown action 'turn left'; the actions are .*\(or their indices 0-4\)$"):
        S.main(["--ckpt", world_ckpt, "--frames", "4", "--actions", str(tmp_path / "notes.txt"), *out])  # a file
    with pytest.raises(ConfigError, match=r"\(and no file keys.txt exists\)"):
        S.main(["--ckpt", world_ckpt, "--frames", "4", "--actions", "keys.txt", *out])  # a file that is not there
    with pytest.raises(ConfigError, match="has 2 actions, fewer than the 4 frames"):
        S.main(["--ckpt", world_ckpt, "--frames", "4", "--actions", "stay,stay", *out])
    with pytest.raises(ConfigError, match="pick one"):
        S.main(["--ckpt", world_ckpt, "--frames", "4", "--actions", "stay,stay,stay,stay", "--interactive", *out])
    with pytest.raises(ConfigError, match="is a world model; --bench"):
        S.main(["--ckpt", world_ckpt, "--bench"])
    monkeypatch.setattr(S.sys, "stdin", io.StringIO())  # a pipe: its end does not stop the keyboard steering
    with pytest.raises(ConfigError, match="--interactive steers a world model from the keyboard; from a pipe or file"):
        S.main(["--ckpt", world_ckpt, "--interactive", *out])
    plain = tmp_path / "plain.pt"
    M.save_checkpoint(str(plain), stage="dmd", model_config={**TINY.__dict__, "num_actions": 0},
                      config=dict(frames_per_block=1), **dict.fromkeys(("model", "ema"), M.DiT(M.ModelConfig(
                          **{**TINY.__dict__, "num_actions": 0})).state_dict()))
    with pytest.raises(ConfigError, match="is not a world model"):
        S.main(["--ckpt", str(plain), "--frames", "4", "--actions", "stay,stay,stay,stay", *out])


def test_stages_refuse_a_world_checkpoint_without_actions_and_the_reverse(tmp_path, monkeypatch):
    """Before any training: the stage that reads a teacher checks it against --actions."""
    monkeypatch.setitem(M.PRESETS, "toy", M.ModelConfig(**{**TINY.__dict__, "num_actions": 0}))
    plain_dir = tmp_path / "plain"
    ar_teacher.train(tiny_run(plain_dir, phase="base", base_steps=1, eval_clips=2))
    plain = M.load_checkpoint(f"{plain_dir}/base.pt")
    # the world's base starts as the plain base, its new action embedding zero
    cfg = tiny_run(tmp_path, phase="base", actions=True, world_steps=1, eval_clips=2, plain_base=f"{plain_dir}/base.pt")
    start = ar_teacher.world_from_plain_base(M.DiT(M.ModelConfig(**{**TINY.__dict__, "shift": 2.0})), cfg).state_dict()
    assert not start.pop("action_embedding.weight").any()
    assert all(torch.equal(start[k], v.float()) for k, v in plain["ema"].items()) and start.keys() == plain["ema"].keys()
    ar_teacher.train(cfg)
    world_dir = str(tmp_path)
    with pytest.raises(ConfigError, match="already a world model"):
        ar_teacher.train(tiny_run(tmp_path / "w2", phase="base", actions=True, plain_base=f"{world_dir}/base.pt"))
    with pytest.raises(ConfigError, match=r"world model \(5 actions\): add --actions"):
        ar_teacher.train(tiny_run(tmp_path, phase="ar"))
    with pytest.raises(ConfigError, match=r"world model \(5 actions\): add --actions"):
        ode_init.train(ode_init.Config(teacher="bidirectional", out_dir=world_dir))
    with pytest.raises(ConfigError, match="--actions needs a world model"):
        ar_teacher.train(tiny_run(plain_dir, phase="ar", actions=True))
    with pytest.raises(ConfigError, match="exists on the toy only"):
        wan_scale.check_actions(True, TINY, "21x60x104")
    with pytest.raises(ConfigError, match="--table is the plain toy's"):
        dmd.table(dmd.Config(table=True, actions=True, out_dir=world_dir))
    assert ar_teacher.Config(actions=True).out_dir == "checkpoints/world"  # the world's own folder by default
    assert ar_teacher.make_command(ar_teacher.Config(phase="ar", actions=True)) == \
        "python ar_teacher.py --phase ar --actions"
