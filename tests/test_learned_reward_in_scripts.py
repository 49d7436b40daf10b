"""--reward-model in every RL script: the learned score is the reward the advantage sees, the verifier is still
logged as the gold accuracy, and a constant reward model gives every group the same reward.

A BT reward folder is built here without training (a sequence classifier whose head is set by hand), so what it
scores is known exactly: a zero head scores every completion 0, so every group's rewards tie, whatever the
verifier says."""

import json
import os

import pytest
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

import grpo
import ppo
import reinforce
import sft_rl_mixed
from common.learned_reward import MARKER
from common.tracking import read_metrics

SCRIPTS = {"grpo": grpo, "reinforce": reinforce, "ppo": ppo, "sft_rl_mixed": sft_rl_mixed}


def _reward_folder(policy_dir: str, path: str, constant: bool) -> str:
    """A BT reward model on the policy's config and tokenizer: a zero score head (every input scores 0), or a random
    one (the scores vary). Llama's score head has no bias."""
    config = AutoConfig.from_pretrained(policy_dir, num_labels=1)
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    config.pad_token_id = tokenizer.pad_token_id
    model = AutoModelForSequenceClassification.from_config(config)
    with torch.no_grad():
        weight = model.score.weight
        weight.zero_() if constant else weight.normal_(0, 1, generator=torch.Generator().manual_seed(0))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    with open(os.path.join(path, MARKER), "w") as f:
        json.dump({"mode": "bt", "reference": False, "task": "add_noisy", "base": policy_dir}, f)
    return path


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_a_learned_reward_replaces_the_verifier_and_the_verifier_stays_gold(sft_run, tmp_path, monkeypatch, name):
    """Score 0 for every completion: the proxy reward is logged as 0 while sampled_accuracy (the verifier) is not, and
    the policy's update is zero for the scripts whose baseline is the group mean (every group ties)."""
    monkeypatch.chdir(tmp_path)
    rm = _reward_folder(sft_run[0], str(tmp_path / "rm"), constant=True)
    module = SCRIPTS[name]
    flags = ["--model", sft_run[0], "--reward-model", rm, "--total-steps", "2", "--num-prompts", "4",
             "--eval-every", "0", "--no-tensorboard", "--num-eval-prompts", "8", "--num-eval-samples", "2"]
    if name == "ppo":
        flags += ["--beta", "0", "--value-model", "shared"]  # no KL in the reward: the reward is the proxy alone
    module.main(module.parse_args(flags))
    steps = [r for r in read_metrics(f"runs/{name}") if "event" not in r]
    assert len(steps) == 2
    for record in steps:
        assert record["reward/proxy"] == 0 and record["reward"] == 0  # the learned score is what is optimised
        assert record["sampled_accuracy"] == record["reward/correct"] > 0  # ... the verifier is still logged: gold
        if name in ("grpo", "reinforce"):
            assert record["frac_zero_std_groups"] == 1  # every group ties under a constant reward


def test_the_reward_model_is_frozen_and_not_saved_with_the_policy(sft_run, tmp_path, monkeypatch):
    """The reward folder is read, never written: its weights are bit-identical after a GRPO run on it."""
    monkeypatch.chdir(tmp_path)
    rm = _reward_folder(sft_run[0], str(tmp_path / "rm"), constant=False)
    before = {k: v.clone() for k, v in AutoModelForSequenceClassification.from_pretrained(rm).state_dict().items()}
    grpo.main(grpo.parse_args(["--model", sft_run[0], "--reward-model", rm, "--total-steps", "1", "--num-prompts", "4",
                               "--eval-every", "0", "--no-tensorboard", "--num-eval-prompts", "8",
                               "--num-eval-samples", "2"]))
    after = AutoModelForSequenceClassification.from_pretrained(rm).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    step = [r for r in read_metrics("runs/grpo") if "event" not in r][0]
    assert step["reward/proxy"] != 0 and step["reward"] == step["reward/proxy"]
