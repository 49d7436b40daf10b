"""LoRA (--lora-rank): adapters start at zero, the reference is the base with them off, syncs and saves merge."""

import copy
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

import grpo
from common.distributed import full_state_dict
from common.logprobs import completion_logprobs
from common.models import AdaptersOff, add_lora, frozen_reference
from common.tracking import read_metrics

pytest.importorskip("peft")


def _logprobs(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, 30, (4, 6), generator=generator)
    completion = torch.randint(3, 30, (4, 5), generator=generator)
    with torch.no_grad():
        return completion_logprobs(model, prompt, torch.ones_like(prompt), completion, torch.ones_like(completion))[0]


def _perturb_adapters(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)


def test_lora_at_its_initial_state_gives_the_base_logprobs(tiny_model):
    base = copy.deepcopy(tiny_model)
    lora = add_lora(copy.deepcopy(tiny_model), rank=4, alpha=8)
    torch.testing.assert_close(_logprobs(lora), _logprobs(base), rtol=0, atol=0)
    assert all(("lora_" in n) == p.requires_grad for n, p in lora.named_parameters())  # only adapters train


def test_the_reference_is_the_base_with_adapters_off_not_a_copy(tiny_model):
    base = copy.deepcopy(tiny_model)
    lora = add_lora(copy.deepcopy(tiny_model), rank=4, alpha=8)
    _perturb_adapters(lora)
    ref = frozen_reference(lora, "unused: no second copy is loaded", torch.device("cpu"), torch.float32)
    assert isinstance(ref, AdaptersOff) and list(ref.parameters()) == []  # no weights of its own
    adapted = _logprobs(lora)
    assert not torch.allclose(adapted, _logprobs(base), atol=1e-3)  # the adapters act...
    torch.testing.assert_close(_logprobs(ref), _logprobs(base), rtol=0, atol=0)  # ...and are off for the reference
    torch.testing.assert_close(_logprobs(lora), adapted, rtol=0, atol=0)  # and on again after the reference


def test_the_merged_weights_are_w_plus_scaled_ba_and_load_as_the_adapted_model(tiny_model, tmp_path):
    lora = add_lora(copy.deepcopy(tiny_model), rank=4, alpha=8)
    _perturb_adapters(lora)
    merged = full_state_dict(lora)
    assert set(merged) == set(tiny_model.state_dict())  # the base model's names: what vLLM and from_pretrained take
    q = lora.base_model.model.model.layers[0].self_attn.q_proj
    expected = q.base_layer.weight + (8 / 4) * q.lora_B["default"].weight @ q.lora_A["default"].weight
    torch.testing.assert_close(merged["model.layers.0.self_attn.q_proj.weight"], expected)
    plain = copy.deepcopy(tiny_model)
    plain.load_state_dict(merged)
    torch.testing.assert_close(_logprobs(plain), _logprobs(lora), rtol=1e-5, atol=1e-5)


def test_grpo_with_lora_trains_adapters_saves_merged_weights_and_resumes(sft_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    flags = ["--model", sft_run[0], "--lora-rank", "8", "--learning-rate", "1e-3", "--num-prompts", "4",
             "--no-tensorboard", "--num-eval-prompts", "8", "--num-eval-samples", "2", "--eval-every", "0",
             "--save-every", "2", "--beta", "0.04"]
    grpo.main(grpo.parse_args([*flags, "--total-steps", "2", "--run-name", "lora"]))
    grpo.main(grpo.parse_args([*flags, "--total-steps", "4", "--run-name", "lora", "--resume"]))
    steps = [r for r in read_metrics("runs/lora") if "event" not in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and all(r["grad_norm"] > 0 for r in steps)
    assert os.path.exists("runs/lora/adapter/adapter_model.safetensors")
    start = AutoModelForCausalLM.from_pretrained(sft_run[0]).state_dict()
    trained = AutoModelForCausalLM.from_pretrained("runs/lora").state_dict()  # merged, full weights
    assert torch.equal(trained["model.embed_tokens.weight"], start["model.embed_tokens.weight"])  # not adapted
    moved = [k for k in start if not torch.equal(trained[k], start[k])]
    assert moved and all(k.endswith("proj.weight") for k in moved)  # only the adapted linear layers moved
    # KL to the reference (the base, adapters off) is 0 at the start and grows as the adapters train
    assert steps[0]["kl"] == pytest.approx(0, abs=1e-7) and steps[-1]["kl"] > 0
