"""The vLLM rollout backend agrees with the HF one and with the trainer (needs vLLM; skipped without it).

One engine serves every test (starting one costs ~15 s on 2 CPU cores). Each test first
pushes the weights it needs with `sync_weights`, so the tests do not depend on their order.
"""

import copy
import sys

import pytest
import torch

pytest.importorskip("vllm")

from common.logprobs import completion_logprobs
from common.models import build_char_tokenizer, build_tiny_model, eos_token_ids
from common.rollout import generate_hf
from common.tasks import encode_demonstrations, format_prompt
from common.vllm_engine import VLLMEngine

QUESTIONS = ["12+34", "7+5", "99+99", "123+4", "50+50", "1+1", "31+18", "8+80"]  # mixed lengths: left padding
TOL = 1e-4  # fp32, same weights: observed differences are ~1e-6


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(engine, tokenizer, random-init model, prompts); the engine starts from the random model."""
    tokenizer = build_char_tokenizer()
    model = build_tiny_model(tokenizer, seed=0).to(torch.float32).eval()
    path = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    engine = VLLMEngine(str(path), torch.float32, max_model_len=256, gpu_memory_utilization=0.3, seed=0,
                        eos_ids=eos_token_ids(model, tokenizer), pad_token_id=tokenizer.pad_token_id,
                        tokenizer=tokenizer)
    prompts = [format_prompt(tokenizer, q) for q in QUESTIONS]
    return engine, tokenizer, model, prompts


@pytest.fixture(scope="module")
def eos_model(setup):
    """The random model after 30 steps of learning to answer "42" + EOS: it stops, so masks are exercised."""
    _, tokenizer, model, prompts = setup
    model = copy.deepcopy(model).train()
    batch = encode_demonstrations(tokenizer, prompts, ["42"] * len(prompts), tokenizer.eos_token_id, 8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(30):
        logprobs, _ = completion_logprobs(model, *batch)
        loss = -(logprobs * batch[3]).sum() / batch[3].sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def trainer_logprobs(model, rollout, temperature):
    with torch.no_grad():
        logprobs, _ = completion_logprobs(model, rollout.prompt_ids, rollout.prompt_mask, rollout.completion_ids,
                                          rollout.completion_mask, temperature)
    return logprobs * rollout.completion_mask  # (B, C), 0 on padding like sampler_logprobs


@pytest.mark.parametrize("which,max_new_tokens", [("random", 12), ("eos", 12), ("eos", 2)])
def test_greedy_matches_hf(setup, eos_model, which, max_new_tokens):
    engine, tokenizer, random_model, prompts = setup
    model = random_model if which == "random" else eos_model
    engine.sync_weights(model)
    hf = generate_hf(model, tokenizer, prompts, n=2, temperature=0.0, max_new_tokens=max_new_tokens,
                     eos_ids=engine.eos_ids)
    vl = engine.generate(prompts, n=2, temperature=0.0, max_new_tokens=max_new_tokens)
    if which == "eos":  # the trained model stops after "42" when it has the budget, and is cut when not
        assert hf.completions == ["42"] * len(hf.completions)
        assert hf.is_eos.all() == (max_new_tokens > 2)
    for field in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "is_eos", "prompt_index"):
        assert torch.equal(getattr(vl, field), getattr(hf, field)), field
    assert vl.completions == hf.completions
    # greedy logprobs are of the T = 1 distribution in both backends
    assert torch.allclose(vl.sampler_logprobs, hf.sampler_logprobs, atol=TOL)


@pytest.mark.parametrize("temperature", [0.7, 1.0])
@pytest.mark.parametrize("which", ["random", "eos"])
def test_sampler_logprobs_match_trainer(setup, eos_model, which, temperature):
    engine, _, random_model, prompts = setup
    model = random_model if which == "random" else eos_model
    engine.sync_weights(model)
    rollout = engine.generate(prompts, n=4, temperature=temperature, max_new_tokens=10)
    diff = (rollout.sampler_logprobs - trainer_logprobs(model, rollout, temperature)).abs()  # (B, C)
    assert diff.max() < TOL, f"max |vLLM - trainer| = {diff.max():.2e}"


def test_weight_sync_is_real(setup):
    engine, tokenizer, random_model, prompts = setup
    model = copy.deepcopy(random_model)
    engine.sync_weights(model)
    # one optimizer step on the trainer's copy only
    batch = encode_demonstrations(tokenizer, prompts, ["42"] * len(prompts), tokenizer.eos_token_id, 8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    logprobs, _ = completion_logprobs(model.train(), *batch)
    (-(logprobs * batch[3]).sum()).backward()
    optimizer.step()
    model.eval()

    # the engine still samples from the old weights: its logprobs are not the trainer's
    stale = engine.generate(prompts, n=2, temperature=1.0, max_new_tokens=10)
    before = (stale.sampler_logprobs - trainer_logprobs(model, stale, 1.0)).abs().max()
    engine.sync_weights(model)
    fresh = engine.generate(prompts, n=2, temperature=1.0, max_new_tokens=10)
    after = (fresh.sampler_logprobs - trainer_logprobs(model, fresh, 1.0)).abs().max()
    assert before > 1e-2, f"before sync: {before:.2e}"
    assert after < TOL, f"after sync: {after:.2e}"


def test_sync_casts_to_engine_dtype(setup):
    """bf16 trainer weights into the fp32 engine: the engine then holds exactly the bf16 values."""
    engine, _, random_model, prompts = setup
    model_bf16 = copy.deepcopy(random_model).to(torch.bfloat16)
    engine.sync_weights(model_bf16)
    rollout = engine.generate(prompts, n=2, temperature=1.0, max_new_tokens=8)
    reference = model_bf16.to(torch.float32)  # bf16 values, fp32 compute, as in the engine
    assert (rollout.sampler_logprobs - trainer_logprobs(reference, rollout, 1.0)).abs().max() < TOL


def test_rollout_layout(setup, eos_model):
    engine, tokenizer, _, prompts = setup
    engine.sync_weights(eos_model)
    n, pad = 3, tokenizer.pad_token_id
    rollout = engine.generate(prompts, n=n, temperature=1.0, max_new_tokens=6)
    B, C = rollout.completion_ids.shape
    assert B == len(prompts) * n and C <= 6
    assert rollout.prompt_ids.shape == rollout.prompt_mask.shape and rollout.prompt_ids.shape[0] == B
    assert rollout.sampler_logprobs.shape == rollout.completion_mask.shape == (B, C)
    assert rollout.is_eos.shape == rollout.prompt_index.shape == (B,) and len(rollout.completions) == B
    # rows i*n .. i*n+n-1 are prompt i
    assert rollout.prompt_index.tolist() == [i for i in range(len(prompts)) for _ in range(n)]
    for i, prompt in enumerate(prompts):
        row = i * n
        ids = rollout.prompt_ids[row][rollout.prompt_mask[row].bool()]
        assert tokenizer.decode(ids) == prompt
        assert (rollout.prompt_ids[row][rollout.prompt_mask[row] == 0] == pad).all()  # left padding
        assert torch.equal(rollout.prompt_ids[row : row + n], rollout.prompt_ids[row].expand(n, -1))
    # completion mask: a prefix of ones, ending at the first EOS; pad id and logprob 0 after it
    eos = torch.tensor(engine.eos_ids)
    for ids, mask, lp, ended, text in zip(rollout.completion_ids, rollout.completion_mask, rollout.sampler_logprobs,
                                          rollout.is_eos, rollout.completions):
        length = int(mask.sum())
        assert mask[:length].all() and not mask[length:].any()
        is_eos = torch.isin(ids[:length], eos)
        assert bool(ended) == bool(is_eos[-1]) and not is_eos[:-1].any()
        assert (ids[length:] == pad).all() and (lp[length:] == 0).all() and (lp[:length] < 0).all()
        assert text == tokenizer.decode(ids[:length], skip_special_tokens=True)
    assert rollout.is_eos.any()  # the trained model does stop: the EOS path is covered


def test_missing_vllm_exits_with_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    with pytest.raises(SystemExit, match="--rollout vllm needs vLLM"):
        VLLMEngine("unused", torch.float32, 64, 0.3, 0, [3], 0, None)
