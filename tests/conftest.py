"""Shared fixtures: the offline char tokenizer and a tiny, untrained Llama (fp32, eval mode).

Both are session-scoped: tests that need to change a model build their own
(`build_tiny_model` takes ~0.1 s) and never mutate `tiny_model`.
"""

import pytest
import torch

from common.models import build_char_tokenizer, build_tiny_model

# One thread, not two: the tiny model's matrices are too small to gain from a second thread, and
# on 2 cores shared with other jobs two threads spin-wait on each other (measured under load:
# 16 forward passes 5.3 s with 2 threads; these three test files 85 s -> 40 s with 1).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tokenizer():
    return build_char_tokenizer()


@pytest.fixture(scope="session")
def tiny_model(tokenizer):
    model = build_tiny_model(tokenizer, seed=0).to(torch.float32)
    model.eval()
    return model
