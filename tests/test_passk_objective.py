"""grpo.py's pass@k objectives (issue: pass@k as the training objective) against brute force written here.

Chen et al. 2025 ("Pass@k Training for Adaptively Balancing Exploration and Exploitation") give the group
advantage in closed form; the definition it closes is: draw every k-subset of the G samples, score the subset
max(R) (does any of its k pass?), normalise those scores by their mean and (population) std over the subsets,
and give each sample the mean normalised score of the subsets that hold it. verl's `grpo_passk` gives only the
group's best sample (r_max - r_second) / (std + eps).
"""

import itertools
import math
import statistics

import pytest
import torch

from grpo import Args, best_of_group_advantages, compute_advantages, pass_at_k_objective, passk_advantages
from common.rollout_data import Rollout


def brute_force(correct: list[int], k: int) -> list[float]:
    subsets = list(itertools.combinations(range(len(correct)), k))
    scores = {s: max(correct[i] for i in s) for s in subsets}
    mean = statistics.fmean(scores.values())
    std = statistics.pstdev(scores.values())
    if std == 0:
        return [0.0] * len(correct)
    return [statistics.fmean((scores[s] - mean) / std for s in subsets if i in s) for i in range(len(correct))]


GROUPS = [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 1, 0, 0], [1, 0, 1, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0, 0, 0],
          [1, 1, 1, 0, 0, 0, 0, 0], [0] * 8, [1] * 8, [1, 1, 1, 1, 1, 1, 1, 0]]


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_the_closed_form_is_the_mean_over_every_k_subset(k):
    for group in GROUPS:
        if k > len(group):
            continue
        got = passk_advantages(torch.tensor([group], dtype=torch.float64), k, eps=1e-12)[0]  # eps: 0 / 0 -> 0
        assert got.tolist() == pytest.approx(brute_force(group, k), abs=1e-9), (group, k)


@pytest.mark.parametrize("G, k", [(4, 2), (8, 4), (8, 3), (16, 8)])
def test_the_groups_pass_at_k_is_the_unbiased_estimator(G, k):
    """R in the closed form is the expected max over a random k-subset: Chen et al. (2021)'s unbiased pass@k."""
    for num_right in range(G + 1):
        correct = [1] * num_right + [0] * (G - num_right)
        subsets = list(itertools.combinations(range(G), k))
        expected = sum(max(correct[i] for i in s) for s in subsets) / len(subsets)
        unbiased = 1 - math.comb(G - num_right, k) / math.comb(G, k)
        assert expected == pytest.approx(unbiased)
        adv = passk_advantages(torch.tensor([correct], dtype=torch.float64), k, eps=0.0)[0]
        if 0 < expected < 1:  # the advantages are centred on R: E_i[A_i] over subsets = 0
            assert adv.mean().item() == pytest.approx(0.0, abs=1e-9)


def test_k_1_is_grpos_group_advantage_with_the_population_std():
    rewards = torch.tensor([[1., 0., 0., 1., 0., 0., 0., 0.], [0., 1., 1., 1., 1., 1., 1., 0.]])
    got = passk_advantages(rewards, 1, eps=0.0)
    G = rewards.shape[1]
    grpo = compute_advantages(rewards, "group", eps=0.0) * math.sqrt(G / (G - 1))  # sample std -> population std
    assert torch.allclose(got, grpo, atol=1e-6)


def test_larger_k_spends_less_on_pushing_wrong_samples_down_and_nothing_on_easy_groups():
    group = torch.tensor([[1., 1., 0., 0., 0., 0., 0., 0.]])
    wrong = [passk_advantages(group, k)[0, -1].item() for k in (1, 2, 4)]
    assert wrong[0] < wrong[1] < wrong[2] < 0  # k = 1 pushes a wrong sample down hardest
    # 7 of 8 right: every 2-subset passes, so at k = 2 the group has no signal (at k = 1 it has)
    easy = torch.tensor([[1., 1., 1., 1., 1., 1., 1., 0.]])
    assert passk_advantages(easy, 2).abs().max() < 1e-6 and passk_advantages(easy, 1).abs().max() > 0.1


def test_best_of_group_gives_the_only_advantage_to_the_best_sample():
    rewards = torch.tensor([[0.2, 0.9, 0.5, 0.1], [1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    got = best_of_group_advantages(rewards, eps=1e-6)
    expect = torch.zeros_like(rewards)
    expect[0, 1] = (0.9 - 0.5) / (statistics.stdev([0.2, 0.9, 0.5, 0.1]) + 1e-6)  # verl: the unbiased std
    expect[1, 0] = 1.0 / (statistics.stdev([1.0, 0, 0, 0]) + 1e-6)
    assert torch.allclose(got, expect, atol=1e-5)  # two right ones tie: r_max - r_second = 0, nobody learns


def test_passk_reads_the_verifiers_verdicts_not_the_shaped_reward():
    """A format or partial-credit reward is not pass/fail: --advantage passk counts only 'correct'."""
    reasons = ["correct", "wrong", "wrong", "no_answer"]
    rollout = Rollout.__new__(Rollout)
    rollout.reasons, rollout.rewards = reasons, torch.tensor([1.2, 0.7, 0.1, 0.0])  # shaped rewards
    got = pass_at_k_objective(rollout, Args(group_size=4, advantage="passk", passk_k=2))
    assert torch.allclose(got, passk_advantages(torch.tensor([[1., 0., 0., 0.]]), 2))
