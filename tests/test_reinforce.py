"""reinforce.py: each baseline and sign weighting against an independent re-computation, the
unification with SFT (A = 1 on expert samples), and the real script end to end."""

import math
import statistics

import pytest
import torch

import reinforce
import sft
from common.logprobs import completion_logprobs
from common.models import build_char_tokenizer, build_tiny_model
from common.tasks import encode_demonstrations, format_prompt, load_task
from common.tracking import RunLogger, read_metrics
from reinforce import (aggregate_loss, compute_advantages, policy_token_loss, reinforce_pp_advantages,
                       sign_weights)

QUIET = dict(tensorboard=False)
BASELINES = ["none", "ema", "group", "rloo", "remax", "reinforce++", "reinforce++-baseline"]


# ------------------------------------------------------------------------------------------
# The math, against re-computations written here with plain Python
# ------------------------------------------------------------------------------------------

REWARDS = [[1.0, 0.0, 0.0, 1.0], [0.2, 0.9, 0.4, 0.4], [1.0, 1.0, 1.0, 1.0]]  # 3 prompts, G = 4
FLAT = torch.tensor([r for group in REWARDS for r in group])


def test_every_sequence_baseline_against_a_loop():
    G = 4
    got = {b: compute_advantages(FLAT, b, G, ema_value=0.3, greedy_rewards=torch.tensor([1.0, 0.0, 0.5]))
           for b in ("none", "ema", "group", "rloo", "remax", "reinforce++", "reinforce++-baseline")}
    greedy = [1.0, 0.0, 0.5]
    for g, group in enumerate(REWARDS):
        mean = statistics.fmean(group)
        for i, r in enumerate(group):
            row = g * G + i
            others = [group[j] for j in range(G) if j != i]
            expected = {"none": r, "ema": r - 0.3, "group": r - mean, "rloo": r - statistics.fmean(others),
                        "remax": r - greedy[g], "reinforce++": r, "reinforce++-baseline": r - mean}
            for baseline, value in expected.items():
                assert got[baseline][row].item() == pytest.approx(value, abs=1e-6), (baseline, g, i)
            # RLOO's identity: leave-one-out = G/(G-1) * (R - group mean)
            assert got["rloo"][row].item() == pytest.approx(G / (G - 1) * (r - mean), abs=1e-6)
    assert torch.all(got["rloo"][8:] == 0) and torch.all(got["group"][8:] == 0)  # all-equal group: no signal


def test_remax_uses_the_greedy_completions_reward_per_prompt():
    """b is the reward of prompt g's greedy completion, for all G samples of that prompt and no other."""
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0])  # 2 prompts, G = 2
    a = compute_advantages(rewards, "remax", 2, greedy_rewards=torch.tensor([1.0, 0.0]))
    assert a.tolist() == [0.0, -1.0, 1.0, 0.0]
    b = compute_advantages(rewards, "remax", 2, greedy_rewards=torch.tensor([0.0, 1.0]))
    assert b.tolist() == [1.0, 0.0, 0.0, -1.0]


def _reinforce_pp_by_hand(outcome, kl, mask, beta, eps):
    """Per-token rewards, return-to-go and whitening written as loops over Python lists."""
    returns, valid = [], []
    for i, (row_kl, row_m) in enumerate(zip(kl.tolist(), mask.tolist())):
        n = int(sum(row_m))
        rewards = [-beta * row_kl[t] + (outcome[i] if t == n - 1 else 0.0) for t in range(n)]
        rets = [sum(rewards[t:]) for t in range(n)]
        returns.append(rets)
        valid += rets
    mean, var = statistics.fmean(valid), statistics.variance(valid)
    out = torch.zeros_like(kl)
    for i, rets in enumerate(returns):
        for t, ret in enumerate(rets):
            out[i, t] = (ret - mean) / math.sqrt(var + eps)
    return out


def test_reinforce_pp_returns_kl_placement_and_global_whitening():
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.float)
    kl = torch.randn(4, 4)
    outcome = torch.tensor([1.0, 0.0, 1.0, 0.0])
    got = reinforce_pp_advantages(outcome, kl, mask, beta=0.1, eps=1e-8)
    assert torch.allclose(got, _reinforce_pp_by_hand(outcome.tolist(), kl, mask, 0.1, 1e-8), atol=1e-5)
    assert torch.all(got[mask == 0] == 0)  # nothing on padding
    # The KL on padding never enters: garbage there changes nothing.
    garbage = kl.masked_fill(mask == 0, 1e6)
    assert torch.equal(reinforce_pp_advantages(outcome, garbage, mask, 0.1), got)
    # Whitened over the valid tokens of the whole batch: mean 0, unbiased std 1 there, not per row.
    valid = got[mask.bool()]
    assert valid.mean().item() == pytest.approx(0, abs=1e-6) and valid.std().item() == pytest.approx(1, abs=1e-4)
    # With beta = 0 every token of a completion carries its outcome: the return is R_i on each token.
    flat = reinforce_pp_advantages(outcome, kl, mask, beta=0.0)
    for i in range(4):
        assert torch.allclose(flat[i][mask[i].bool()], flat[i, 0].expand(int(mask[i].sum())))


def test_reinforce_pp_baseline_centres_per_group_then_whitens_globally():
    mask = torch.ones(4, 2)
    centred = compute_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0]), "reinforce++-baseline", 2)  # [.5, -.5, 0, 0]
    got = reinforce_pp_advantages(centred, torch.zeros(4, 2), mask, beta=0.1)
    expected = _reinforce_pp_by_hand(centred.tolist(), torch.zeros(4, 2), mask, 0.1, 1e-8)
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.all(got[2:] == 0)  # a solved group stays at 0 after whitening (its mean is the batch mean)


def test_sign_weights():
    correct = torch.tensor([1.0, 0.0, 1.0, 0.0])
    assert sign_weights(correct, "psr", 0.1).tolist() == [1.0, 0.0, 1.0, 0.0]
    assert sign_weights(correct, "nsr", 0.1).tolist() == [0.0, -1.0, 0.0, -1.0]
    assert sign_weights(correct, "w-reinforce", 0.25).tolist() == [0.25, -1.0, 0.25, -1.0]


def test_policy_loss_is_minus_advantage_times_logp_and_its_gradient_is_minus_advantage():
    logp = torch.tensor([[-0.5, -2.0, -1.0]], requires_grad=True)
    adv = torch.tensor([[2.0, -1.0, 0.5]])
    loss = policy_token_loss(logp, adv, torch.ones(1, 3))
    assert loss.tolist() == [[1.0, -2.0, 0.5]]
    loss.sum().backward()
    assert logp.grad.tolist() == [[-2.0, 1.0, -0.5]]


# ------------------------------------------------------------------------------------------
# SFT is RL with A = 1 on off-policy (expert) samples, made executable
# ------------------------------------------------------------------------------------------


def test_sft_is_reinforce_with_advantage_one_on_expert_samples():
    """reinforce.py's loss with A = 1 and token-mean aggregation, on an expert batch, equals
    sft.py's loss in value and in gradient. Both are -sum(m * logp) / N: the only arithmetic
    difference is -(1 * logp) vs -(logp), which is exact in floating point, so equality is exact."""
    tokenizer = build_char_tokenizer()
    task = load_task("add_noisy")
    rows = task.train.select(range(16))
    prompts = [format_prompt(tokenizer, q, task.system_prompt) for q in rows["question"]]
    prompt_ids, prompt_mask, completion_ids, completion_mask = encode_demonstrations(
        tokenizer, prompts, rows["demonstration"], tokenizer.eos_token_id, 1024)
    mask = completion_mask.float()
    num_seqs, num_tokens = len(prompts), int(mask.sum())

    def loss_and_grad(loss_fn):
        model = build_tiny_model(tokenizer, seed=3).to(torch.float32)
        logp, _ = completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask)
        loss = loss_fn(logp)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    sft_loss, sft_grads = loss_and_grad(lambda logp: sft.sft_loss(logp, mask, num_tokens))
    rl_loss, rl_grads = loss_and_grad(lambda logp: aggregate_loss(
        policy_token_loss(logp, torch.ones(num_seqs, 1), mask), mask, "token-mean", num_seqs, num_tokens, 0))
    assert torch.equal(rl_loss, sft_loss), (rl_loss, sft_loss)
    assert all(torch.equal(a, b) for a, b in zip(rl_grads, sft_grads))
    assert sft_loss.item() > 0 and any(g.abs().sum() > 0 for g in sft_grads)


# ------------------------------------------------------------------------------------------
# The real script
# ------------------------------------------------------------------------------------------


def _reinforce(model_dir, *flags):
    args = reinforce.parse_args(["--model", model_dir, "--no-tensorboard", "--num-eval-prompts", "16",
                                 "--num-eval-samples", "2", *flags])
    return reinforce.main(args)


def _steps(run="reinforce"):
    return [r for r in read_metrics(f"runs/{run}") if "event" not in r]


@pytest.mark.parametrize("mode", [["--baseline", b] for b in BASELINES]
                         + [["--baseline", "none", "--sign-weighting", s] for s in ("psr", "nsr", "w-reinforce")],
                         ids=lambda m: m[-1])
def test_every_mode_runs_and_trains(sft_run, tmp_path, monkeypatch, mode):
    monkeypatch.chdir(tmp_path)
    result = _reinforce(sft_run[0], *mode, "--total-steps", "2", "--num-prompts", "4", "--eval-every", "0")
    steps = _steps()
    assert len(steps) == 2
    assert all(r["grad_norm"] > 0 and math.isfinite(r["loss"]) for r in steps)
    assert {"accuracy", "pass@1", "pass@2"} <= set(result)
    assert ("baseline_time" in steps[0]) == (mode[1] == "remax")  # ReMax's greedy rollout shows in the split
    if mode[1] == "remax":
        assert all(r["baseline_time"] > 0 and 0 <= r["greedy_reward"] <= 1 for r in steps)


@pytest.mark.parametrize("flags, expected", [
    (["--baseline", "rloo", "--sign-weighting", "nsr"], "--sign-weighting"),
    (["--baseline", "none", "--sign-weighting", "psr", "--format-weight", "0.5"], "--format-weight"),
    (["--baseline", "group", "--group-size", "1"], "--group-size"),
    (["--ema-decay", "1"], "--ema-decay"),
])
def test_bad_flags_exit_with_one_line_naming_the_flag(flags, expected):
    with pytest.raises(SystemExit) as stop:
        reinforce.validate(reinforce.parse_args(flags), 8)
    assert str(stop.value).startswith(f"error: {expected}")


def test_baselines_without_a_group_allow_g_1():
    for baseline in ("none", "ema", "remax", "reinforce++"):
        assert reinforce.validate(reinforce.parse_args(["--baseline", baseline, "--group-size", "1"]), 8) == (16, 16)


def test_a_run_with_one_sample_per_prompt_logs_no_group_statistics(sft_run, tmp_path, monkeypatch):
    """G = 1 (ema): a group of one has no spread, so the zero-std fractions are null, not 1.0 or NaN."""
    monkeypatch.chdir(tmp_path)
    _reinforce(sft_run[0], "--baseline", "ema", "--group-size", "1", "--total-steps", "2", "--num-prompts", "8",
               "--eval-every", "0")
    steps = _steps()
    assert all(r["frac_zero_std_groups"] is None and r["frac_zero_std_groups_trained"] is None for r in steps)
    assert all(r["grad_norm"] > 0 and math.isfinite(r["loss"]) for r in steps)


def test_ema_baseline_resumes_exactly(sft_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    flags = ["--baseline", "ema", "--ema-decay", "0.5", "--total-steps", "6", "--save-every", "2",
             "--num-prompts", "4", "--eval-every", "0"]
    _reinforce(sft_run[0], *flags, "--run-name", "straight")
    original = RunLogger.log

    def log(self, s, metrics):
        if s == 5 and "event" not in metrics:
            raise KeyboardInterrupt
        return original(self, s, metrics)

    with monkeypatch.context() as m:
        m.setattr(RunLogger, "log", log)
        with pytest.raises(KeyboardInterrupt):
            _reinforce(sft_run[0], *flags, "--run-name", "resumed")
    _reinforce(sft_run[0], *flags, "--run-name", "resumed", "--resume")
    straight, resumed = _steps("straight"), _steps("resumed")
    keys = ("reward", "ema_baseline", "loss", "grad_norm")
    assert [[r[k] for k in keys] for r in resumed] == [[r[k] for k in keys] for r in straight]
    # the running mean, by hand: b_1 = 0, b_{s+1} = 0.5 b_s + 0.5 mean(R_s)
    b = 0.0
    for r in straight:
        assert r["ema_baseline"] == pytest.approx(b, abs=1e-9)
        b = 0.5 * b + 0.5 * r["reward"]
    state = torch.load("runs/resumed/checkpoint/trainer_state.pt", weights_only=False)
    assert state["extra"]["ema_baseline"] == pytest.approx(b, abs=1e-9)
    from transformers import AutoModelForCausalLM
    a, c = (AutoModelForCausalLM.from_pretrained(f"runs/{n}").state_dict() for n in ("straight", "resumed"))
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_token_level_advantage_does_not_depend_on_micro_batch_size(sft_run, tmp_path, monkeypatch):
    """REINFORCE++ whitens over the whole batch before any micro-batch is cut."""
    monkeypatch.chdir(tmp_path)
    flags = ["--baseline", "reinforce++", "--total-steps", "1", "--num-prompts", "8", "--eval-every", "0"]
    _reinforce(sft_run[0], *flags, "--run-name", "mb64")
    _reinforce(sft_run[0], *flags, "--run-name", "mb8", "--micro-batch-size", "8")
    a, b = _steps("mb64")[0], _steps("mb8")[0]
    assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4) and a["grad_norm"] > 0


def test_rloo_learns_beyond_the_teacher(sft_run, tmp_path, monkeypatch):
    """The default baseline raises sampled accuracy well above the noisy teacher's ~60%."""
    monkeypatch.chdir(tmp_path)
    before = sft_run[1]
    result = _reinforce(sft_run[0], "--total-steps", "60", "--num-eval-prompts", "100", "--num-eval-samples", "8")
    steps = _steps()
    first, last = steps[:5], steps[-5:]
    assert sum(r["sampled_accuracy"] for r in last) / 5 > sum(r["sampled_accuracy"] for r in first) / 5 + 0.1
    assert result["pass@1"] > before["pass@1"] + 0.15
