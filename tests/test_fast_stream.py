"""The static-shape streaming step (wan_scale.FastStep, the --cuda-graph / --compile path) computes the frames the
eager path does. On a CPU it runs eagerly ("static"); the CUDA-graph capture itself is timed by the Wan bench."""
import pytest
import torch

import sample_stream as S
import toy_data
import wan_scale as WS
from test_model import random_model

STEPS2, STEPS4 = [1000.0, 833.3], [1000.0, 937.5, 833.3, 625.0]


def stream(model, fast, fpb=1, window=None, sink=0, n=6, switch_at=None, recache=False, actions=None, batch=2):
    text = toy_data.TextEncoder()
    st = S.Stream(model, STEPS2, fpb, STEPS4 if fpb == 1 else None, window=window, sink=sink,
                  max_frames=None if window else n, generator=torch.Generator().manual_seed(0), fast=fast)
    st.set_prompt(text(["red circle", "green square"][:batch]))
    out = []
    for b in range(n // fpb):
        if b * fpb in (switch_at or ()):  # alternate between two prompt pairs
            second = switch_at.index(b * fpb) % 2 == 0
            st.set_prompt(text(["blue triangle", "red square"][:batch] if second else ["red circle", "green square"][:batch]),
                          recache=recache)
        a = None if actions is None else actions[:, b * fpb:(b + 1) * fpb]
        out.append(st.next_block(batch, actions=a))
    return torch.cat(out, 1), st


@pytest.mark.parametrize("fpb,window,sink", [(1, None, 0), (3, None, 0), (1, 3, 1), (1, 2, 0)])
def test_static_step_is_bit_identical_to_the_eager_stream(fpb, window, sink):
    """Keys read as a prefix of the cache buffer: the same operations in the same order, so the same bits."""
    m = random_model()
    eager, _ = stream(m, None, fpb, window, sink, n=9 if fpb == 3 else 8)
    fast, st = stream(m, "static", fpb, window, sink, n=9 if fpb == 3 else 8)
    assert torch.equal(eager, fast)
    # every forward went through the static step: per block its steps + the t = 0 refresh
    assert st.forward.calls == (3 * (2 + 1) if fpb == 3 else (4 + 1) + 7 * (2 + 1))


def test_static_step_follows_a_prompt_switch_with_recache_in_a_rolling_cache():
    """The re-cache of a ring that has wrapped (frames 4, 5, 6 in slots 1, 2, 0; at the second switch 7, 8, 9) sees
    slots that are not a prefix of the buffer: the whole buffer under a mask, refilled at every call."""
    m = random_model()
    eager, _ = stream(m, None, window=3, n=13, switch_at=(7, 10), recache=True)
    fast, st = stream(m, "static", window=3, n=13, switch_at=(7, 10), recache=True)
    assert (eager - fast).abs().max() < 1e-5
    assert st.forward.mask is not None  # the masked path did run
    keep, _ = stream(m, "static", window=3, n=13, switch_at=(7, 10))
    assert torch.equal(keep[:, :7], fast[:, :7]) and (keep[:, 7:] - fast[:, 7:]).abs().max() > 1e-3


def test_static_step_runs_a_world_model_and_a_restarted_stream():
    m = random_model(num_actions=len(toy_data.ACTIONS))
    with torch.no_grad():
        m.action_embedding.weight.normal_(std=0.5)
    acts = torch.randint(0, len(toy_data.ACTIONS), (2, 6), generator=torch.Generator().manual_seed(3))
    eager, _ = stream(m, None, actions=acts)
    fast, st = stream(m, "static", actions=acts)
    assert torch.equal(eager, fast)
    # a restarted stream in the same buffers is a new stream: the same frames again from the same noise
    st.restart()
    st.generator.manual_seed(0)
    again = torch.cat([st.next_block(2, actions=acts[:, i:i + 1]) for i in range(6)], 1)
    assert torch.equal(again, fast)


def test_fast_modes_refuse_bad_input():
    m = random_model()
    with pytest.raises(WS.ConfigError, match="unknown fast mode"):
        S.Stream(m, STEPS2, max_frames=4, fast="turbo")
    _, st = stream(m, "static", n=2)  # a stream of batch 2 cannot go on at batch 1 in the same cache
    with pytest.raises(WS.ConfigError, match="holds batch 2, not 1"):
        st.next_block(1)
    if not torch.cuda.is_available():
        with pytest.raises(WS.ConfigError, match="needs a CUDA GPU"):
            S.Stream(m, STEPS2, max_frames=4, fast="graph")
