import os
import sys

# Tests import the top-level scripts (model.py, toy_data.py, ...) as modules.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Tests never download: with diffusers installed, loading the Wan VAE from the hub fails at once instead of
# retrying a network that CI does not have (the code's error message is what the test checks).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
