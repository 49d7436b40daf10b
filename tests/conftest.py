"""Shared fixtures: the offline char tokenizer and a tiny, untrained Llama (fp32, eval mode).

Both are session-scoped: tests that need to change a model build their own
(`build_tiny_model` takes ~0.1 s) and never mutate `tiny_model`.

The fast subset for the inner loop of development: `python -m pytest tests -m "not slow"`. A test
is `slow` when it trains (it uses the `sft_run` fixture, or runs a script end to end), launches
torchrun or a vLLM engine, or fuzzes the flags; the README's command runs everything.
"""

import os

import pytest
import torch

from common.models import build_char_tokenizer, build_tiny_model
from common.tracking import read_metrics

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


@pytest.fixture(scope="session")
def sft_run(tmp_path_factory):
    """A short SFT run of the default tiny model on the default task, shared by every script's tests:
    (run folder, its eval record). 400 steps: sampled accuracy ~0.5, so most groups have both right
    and wrong samples. TEST_SFT_RUN=runs/some_sft reuses a finished run instead (local iteration)."""
    import sft

    reuse = os.environ.get("TEST_SFT_RUN")
    if reuse:
        return os.path.abspath(reuse), read_metrics(reuse)[-1]
    root = tmp_path_factory.mktemp("sft")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        result = sft.main(sft.Args(total_steps=400, eval_every=100, save_every=200, num_eval_prompts=100,
                                   tensorboard=False))
    finally:
        os.chdir(cwd)
    return str(root / "runs" / "sft"), result


@pytest.fixture(scope="session")
def tool_sft(tmp_path_factory):
    """runs/sft of 250 steps of sft.py on tool_calc (batch 64): it calls the tool in about a third of its samples, so
    the multi-turn path runs from the first step (tests/test_tool_scripts.py, tests/test_distributed.py)."""
    import sft

    root = tmp_path_factory.mktemp("tool_sft")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        sft.main(sft.Args(task="tool_calc", total_steps=250, batch_size=64, eval_every=0, num_eval_prompts=16,
                          num_eval_samples=2, tensorboard=False))
    finally:
        os.chdir(cwd)
    return str(root / "runs" / "sft")


@pytest.fixture
def interrupt_at():
    """interrupt_at(monkeypatch, step): RunLogger.log raises KeyboardInterrupt at that step's record, as if the
    user pressed Ctrl-C during the step (after its update, before its checkpoint): the resume tests' stop."""
    from common.tracking import RunLogger

    def patch(monkeypatch, step: int):
        original = RunLogger.log

        def log(self, s, metrics):
            if s == step and "event" not in metrics:
                raise KeyboardInterrupt
            return original(self, s, metrics)

        monkeypatch.setattr(RunLogger, "log", log)

    return patch


SLOW_MODULES = ("test_distributed.py", "test_vllm.py", "test_fuzz_flags.py", "test_lora.py", "test_qwen_offline.py",
                "test_tool_scripts.py")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if {"sft_run", "tool_sft"} & set(getattr(item, "fixturenames", ())) or item.path.name in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
