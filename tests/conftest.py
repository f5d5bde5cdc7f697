import os
import sys

import torch

# Two cores: keep each test process from oversubscribing them.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
# No hub at test time: every model is built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Let test modules import the shared multi-process launcher as `_multiproc`.
sys.path.insert(0, os.path.dirname(__file__))
