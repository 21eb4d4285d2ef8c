"""The toy teachers shipped in pretrained/ load into the current code with strict key and shape checks, and are
the checkpoints `python ar_teacher.py --phase {base,ar} --ship` writes."""
import os

import pytest

import ar_teacher
import model as M

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name,stage,phase", [("base.pt", "base", "base"), ("ar_teacher.pt", "ar_teacher", "ar")])
def test_shipped_teacher_loads_strictly(name, stage, phase):
    path = os.path.join(ROOT, ar_teacher.SHIPPED_DIR, name)
    ckpt = M.load_checkpoint(path, stage=stage)
    model = M.model_from_checkpoint(ckpt, key="ema")  # strict: every key and shape must match the current DiT
    assert M.count_parameters(model) == 1_774_000 and model.cfg == M.ModelConfig(**{
        **M.PRESETS["toy"].__dict__, "shift": ckpt["config"]["shift"]})
    assert ckpt["config"]["phase"] == phase and ckpt["step"] == ckpt["config"][f"{phase}_steps"]
    assert set(ckpt["metrics"]) >= {"blur", "prompt_acc", "motion", "physics", "fd"}
    assert os.path.getsize(path) < 5 * 2 ** 20
