"""Shared fixtures: the offline char tokenizer and a tiny, untrained Llama (fp32, eval mode).

Both are session-scoped: tests that need to change a model build their own
(`build_tiny_model` takes ~0.1 s) and never mutate `tiny_model`.
"""

import pytest
import torch

from common.models import build_char_tokenizer, build_tiny_model

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tokenizer():
    return build_char_tokenizer()


@pytest.fixture(scope="session")
def tiny_model(tokenizer):
    model = build_tiny_model(tokenizer, seed=0).to(torch.float32)
    model.eval()
    return model
