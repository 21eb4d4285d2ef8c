import os
import sys

# Tests import the top-level scripts (model.py, toy_data.py, ...) as modules.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Tests never download: with diffusers installed, loading the Wan VAE from the hub fails at once instead of
# retrying a network that CI does not have (the code's error message is what the test checks).
os.environ.setdefault("HF_HUB_OFFLINE", "1")


import shutil  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def _trained_tiny_teachers(tmp_path_factory):
    """A tiny base and AR teacher (a few steps of the real scripts on a shrunken toy preset), trained once."""
    import ar_teacher
    from test_ar_teacher import shrink_toy_preset, tiny_run
    with pytest.MonkeyPatch.context() as mp:
        shrink_toy_preset(mp)
        d = tmp_path_factory.mktemp("teachers")
        ar_teacher.train(tiny_run(d, phase="base"))
        ar_teacher.train(tiny_run(d, phase="ar"))
    return d


@pytest.fixture
def tiny_teachers(_trained_tiny_teachers, tmp_path, monkeypatch):
    """A fresh folder holding copies of the tiny teachers, with the toy preset shrunk to match them."""
    from test_ar_teacher import shrink_toy_preset
    shrink_toy_preset(monkeypatch)
    for name in ("base.pt", "ar_teacher.pt"):
        shutil.copy(_trained_tiny_teachers / name, tmp_path / name)
    return tmp_path
