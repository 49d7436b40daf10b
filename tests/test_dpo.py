"""dpo.py: DPO, cDPO and IPO against hand computations, the gradient in the one view, the invariances, end to end.

The losses are checked number by number against math written out here; their gradient with respect to the
sequence log-probs is -beta sigmoid(-beta m) on y+ and +beta sigmoid(-beta m) on y- (the one view's w), and
through a real model it equals the gradient of -mean(w+ log pi(y+) + w- log pi(y-)) with w held fixed. With the
policy equal to the reference every loss sits at its start value. The script learns offline and online from the
shared SFT run, resumes exactly, has a gradient that does not depend on the micro-batch size, and rejects an
identical pair and a reward model with another tokenizer in one line naming the flag.
"""

import copy
import json
import math
import os
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

import dpo
from common.logprobs import rollout_logprobs
from common.models import build_char_tokenizer, build_tiny_model
from common.preferences import PreferencePairs, load_pairs, save_pairs
from common.tracking import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUIET = ["--no-tensorboard", "--num-eval-prompts", "8", "--num-eval-samples", "2", "--eval-every", "0"]
SMALL = ["--num-pair-prompts", "64", "--batch-size", "8"]  # ~80 pairs built in ~1 s; 8 pairs a step
sigmoid = lambda x: 1 / (1 + math.exp(-x))


def _dpo(model_dir, *flags):
    return dpo.main(dpo.parse_args(["--model", model_dir, *QUIET, *flags]))


def _steps(run="dpo"):
    return [r for r in read_metrics(f"runs/{run}") if "event" not in r]


def _weights(run_dir):
    return AutoModelForCausalLM.from_pretrained(run_dir).state_dict()


# ---- the loss, by hand ------------------------------------------------------------------------------------

LOGPS = dict(logp_chosen=[-1.0, -4.0, -2.5], logp_rejected=[-3.0, -1.0, -2.5], ref_chosen=[-2.0, -3.0, -2.0],
             ref_rejected=[-2.0, -2.0, -3.5])


def _margins():
    c, r, rc, rr = LOGPS.values()
    return [(a - b) - (x - y) for a, x, b, y in zip(c, r, rc, rr)]  # m_i = (lc - rc) - (lr - rr)


@pytest.mark.parametrize("loss, eps", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0)])
def test_losses_and_rewards_match_a_hand_computation(loss, eps):
    beta = 0.5
    losses, chosen, rejected = dpo.dpo_loss(*(torch.tensor(v) for v in LOGPS.values()), beta, loss, eps)
    for i, m in enumerate(_margins()):
        if loss == "ipo":
            expected = (m - 1 / (2 * beta)) ** 2
        else:
            expected = -(1 - eps) * math.log(sigmoid(beta * m)) - eps * math.log(sigmoid(-beta * m))
        assert losses[i].item() == pytest.approx(expected, rel=1e-6)
        assert chosen[i].item() == pytest.approx(beta * (LOGPS["logp_chosen"][i] - LOGPS["ref_chosen"][i]))
        assert rejected[i].item() == pytest.approx(beta * (LOGPS["logp_rejected"][i] - LOGPS["ref_rejected"][i]))


@pytest.mark.parametrize("loss, eps", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0)])
def test_gradient_on_the_sequence_logprobs_is_the_one_views_weight(loss, eps):
    """dL/dlog pi(y+) = -beta sigmoid(-beta m) and dL/dlog pi(y-) = +beta sigmoid(-beta m) for DPO: y+ is pushed up
    and y- down by the same weight (cDPO and IPO: their own dl/dm, same pattern). The reference gets none."""
    beta = 0.5
    chosen, rejected = (torch.tensor(LOGPS[k], requires_grad=True) for k in ("logp_chosen", "logp_rejected"))
    losses, _, _ = dpo.dpo_loss(chosen, rejected, torch.tensor(LOGPS["ref_chosen"]),
                                torch.tensor(LOGPS["ref_rejected"]), beta, loss, eps)
    losses.sum().backward()
    for i, m in enumerate(_margins()):
        if loss == "ipo":
            dl_dm = 2 * (m - 1 / (2 * beta))
        else:
            dl_dm = -beta * ((1 - eps) * sigmoid(-beta * m) - eps * sigmoid(beta * m))  # eps = 0: -beta sigma(-beta m)
        assert chosen.grad[i].item() == pytest.approx(dl_dm, rel=1e-5, abs=1e-7)
        assert rejected.grad[i].item() == pytest.approx(-dl_dm, rel=1e-5, abs=1e-7)


def test_sequence_logps_sum_for_dpo_and_average_for_ipo():
    logp, mask = torch.tensor([[-1.0, -3.0, -9.0], [-2.0, -2.0, -2.0]]), torch.tensor([[1.0, 1.0, 0.0], [1, 1, 1]])
    assert dpo.sequence_logps(logp, mask, "sigmoid").tolist() == [-4.0, -6.0]
    assert dpo.sequence_logps(logp, mask, "ipo").tolist() == [-2.0, -2.0]


def test_best_and_worst_takes_one_pair_per_untied_group():
    rewards = torch.tensor([[0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.2, 0.9, -0.5, 0.0]])
    assert dpo.best_and_worst(rewards).tolist() == [1, 0, 9, 10]  # group 1 tied: no pair
    assert dpo.best_and_worst(torch.zeros(2, 3)).tolist() == []


# ---- through a real model: the one view, and policy == reference --------------------------------------------

PAIRS = PreferencePairs(questions=["12+26", "40+45", "99+99"], answers=["38", "85", "198"], chosen=["38", "85", "198"],
                        rejected=["37", "86", "188"], chosen_correct=[1.0] * 3, rejected_correct=[0.0] * 3)


def _pair_rows(tokenizer):
    return dpo.as_rows(PAIRS, tokenizer, None, tokenizer.eos_token_id, 8, torch.device("cpu"))


def _sequence(model, rows, loss="sigmoid"):
    logp, _ = rollout_logprobs(model, rows, group_size=2)
    return dpo.sequence_logps(logp, rows.completion_mask.float(), loss).view(-1, 2)  # (P, 2): y+, y-


def test_rows_interleave_chosen_and_rejected_of_one_prompt(tokenizer):
    rows = _pair_rows(tokenizer)
    assert rows.completions == ["38", "37", "85", "86", "198", "188"]
    assert torch.equal(rows.prompt_ids[0::2], rows.prompt_ids[1::2])  # each pair shares its prompt


def test_the_gradient_through_the_model_is_sft_on_y_plus_minus_sft_on_y_minus(tokenizer):
    """d/dtheta of mean_pairs -log sigmoid(beta m) == d/dtheta of -mean_pairs w (log pi(y+) - log pi(y-)),
    w = beta sigmoid(-beta m) held fixed: DPO is the one view's loss with w on y+ and -w on y-."""
    beta, rows = 0.5, _pair_rows(tokenizer)
    model = build_tiny_model(tokenizer, seed=3).float()
    ref = build_tiny_model(tokenizer, seed=4).float().requires_grad_(False)  # another model: m != 0
    ref_seq = _sequence(ref, rows)
    seq = _sequence(model, rows)
    losses, _, _ = dpo.dpo_loss(seq[:, 0], seq[:, 1], ref_seq[:, 0], ref_seq[:, 1], beta)
    direct = torch.autograd.grad(losses.mean(), list(model.parameters()))
    seq = _sequence(model, rows)
    m = ((seq[:, 0] - ref_seq[:, 0]) - (seq[:, 1] - ref_seq[:, 1])).detach()
    w = beta * torch.sigmoid(-beta * m)  # (P,)
    one_view = torch.autograd.grad(-(w * (seq[:, 0] - seq[:, 1])).mean(), list(model.parameters()))
    assert m.abs().max() > 0.5  # the weights differ from pair to pair (not all beta / 2)
    for a, b in zip(direct, one_view):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("loss, eps", [("sigmoid", 0.0), ("sigmoid", 0.3), ("ipo", 0.0)])
def test_policy_equal_to_reference_starts_at_log_2_with_zero_rewards(tokenizer, tiny_model, loss, eps):
    beta, rows = 2.0, _pair_rows(tokenizer)
    seq, ref = _sequence(tiny_model, rows, loss), _sequence(copy.deepcopy(tiny_model), rows, loss)
    losses, chosen, rejected = dpo.dpo_loss(seq[:, 0], seq[:, 1], ref[:, 0], ref[:, 1], beta, loss, eps)
    start = 1 / (4 * beta**2) if loss == "ipo" else math.log(2)
    torch.testing.assert_close(losses, torch.full((3,), start), rtol=0, atol=1e-6)
    assert chosen.abs().max() < 1e-6 and rejected.abs().max() < 1e-6


# ---- bad input: one line naming the flag ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def random_policy(tmp_path_factory):
    """An untrained tiny model in a folder: loads in no time; its samples are nearly all wrong."""
    path = tmp_path_factory.mktemp("policy")
    tokenizer = build_char_tokenizer()
    build_tiny_model(tokenizer, hidden_size=32).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _one_line_error(run, flag):
    with pytest.raises(SystemExit) as stop:
        run()
    message = str(stop.value.code)
    assert message.startswith(f"error: {flag}") and "\n" not in message, message
    return message


def test_a_pair_with_identical_chosen_and_rejected_fails_naming_pairs(random_policy, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    broken = PreferencePairs(["12+26", "40+45"], ["38", "85"], ["38", "85"], ["37", " 85"], [1.0, 1.0], [0.0, 1.0])
    save_pairs("pairs.jsonl", broken)
    message = _one_line_error(lambda: _dpo(random_policy, "--pairs", "pairs.jsonl", "--total-steps", "1"), "--pairs")
    assert "1 of 2 pairs have the same chosen and rejected" in message
    _one_line_error(lambda: _dpo(random_policy, "--pairs", "missing.jsonl", "--total-steps", "1"), "--pairs")


def test_a_reward_model_with_another_tokenizer_fails_naming_it(random_policy, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tokenizer = build_char_tokenizer()
    tokenizer.add_tokens(["<extra>"])
    tokenizer.save_pretrained(tmp_path / "rm")
    (tmp_path / "rm" / "reward_model.json").write_text(json.dumps({"mode": "bt"}))
    message = _one_line_error(lambda: _dpo(random_policy, "--online", "--reward-model", str(tmp_path / "rm"),
                                           "--total-steps", "1"), "--reward-model")
    assert "tokenizer is not the policy's" in message


def test_a_model_whose_samples_give_no_pair_fails_naming_model(random_policy, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _one_line_error(lambda: _dpo(random_policy, *SMALL, "--total-steps", "1", "--max-new-tokens", "1"), "--model")


@pytest.mark.parametrize("flags, name", [
    (["--label-smoothing", "0.5"], "--label-smoothing"),
    (["--loss", "ipo", "--label-smoothing", "0.1"], "--label-smoothing"),
    (["--batch-size", "8", "--micro-batch-size", "3"], "--micro-batch-size"),
    (["--batch-size", "8", "--micro-batch-size", "6"], "--micro-batch-size"),
    (["--group-size", "1"], "--group-size"),
    (["--beta", "0"], "--beta"),
    (["--label-noise", "1.5"], "--label-noise"),
    (["--online", "--pairs", "x.jsonl"], "--online"),
    (["--reward-model", "runs/rm"], "--reward-model"),
])
def test_bad_flags_fail_naming_the_flag(flags, name):
    _one_line_error(lambda: dpo.validate(dpo.parse_args(flags)), name)


# ---- the script, end to end, from the shared SFT run ------------------------------------------------------------


@pytest.mark.parametrize("flags, start", [
    ([], math.log(2)),
    (["--label-smoothing", "0.2"], math.log(2)),
    (["--loss", "ipo", "--beta", "2"], 1 / 16),
    (["--lora-rank", "4"], math.log(2)),  # the reference is the base with the adapters (B = 0) off
    (["--label-noise", "0.25"], math.log(2)),
])
def test_the_first_step_starts_where_policy_equals_reference(sft_run, tmp_path, monkeypatch, flags, start):
    monkeypatch.chdir(tmp_path)
    _dpo(sft_run[0], *SMALL, "--total-steps", "1", *flags)
    first = _steps()[0]
    assert first["loss"] == pytest.approx(start, abs=1e-5)
    assert abs(first["rewards/margins"]) < 1e-5 and first["kl"] < 1e-6 and first["grad_norm"] > 0
    pairs = load_pairs("runs/dpo/pairs.jsonl")
    noise = 0.25 if "--label-noise" in flags else 0.0
    assert pairs.agreement() == pytest.approx(1 - noise, abs=1 / len(pairs))  # exactly that share swapped


@pytest.mark.parametrize("mode", [[], ["--online"]], ids=["offline", "online"])
def test_gradient_does_not_depend_on_micro_batch_size(sft_run, tmp_path, monkeypatch, mode):
    monkeypatch.chdir(tmp_path)
    for micro in ("16", "4"):
        _dpo(sft_run[0], *SMALL, *mode, "--total-steps", "2", "--micro-batch-size", micro, "--run-name", f"mb{micro}")
    for a, b in zip(_steps("mb16"), _steps("mb4"), strict=True):
        assert a["num_pairs"] == b["num_pairs"] > 0
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


@pytest.mark.parametrize("mode", [[], ["--online"]], ids=["offline", "online"])
def test_resume_continues_exactly(sft_run, tmp_path, monkeypatch, mode, interrupt_at):
    monkeypatch.chdir(tmp_path)
    flags = [*SMALL, *mode, "--total-steps", "6", "--save-every", "2"]
    _dpo(sft_run[0], *flags, "--run-name", "straight")
    with monkeypatch.context() as m:
        interrupt_at(m, 5)
        with pytest.raises(KeyboardInterrupt):
            _dpo(sft_run[0], *flags, "--run-name", "resumed")
    real = dpo.sample_graded

    def no_new_training_pairs(model, tokenizer, task, split, *args, **kwargs):
        assert split != "prompts", "a resumed run reads its pairs back from the run folder"
        return real(model, tokenizer, task, split, *args, **kwargs)

    monkeypatch.setattr(dpo, "sample_graded", no_new_training_pairs)
    _dpo(sft_run[0], *flags, "--run-name", "resumed", "--resume")
    straight, resumed = _steps("straight"), _steps("resumed")
    assert [r["step"] for r in resumed] == list(range(1, 7))
    keys = ("loss", "grad_norm", "rewards/margins", "logps/chosen", "num_pairs")
    assert [[r[k] for k in keys] for r in resumed] == [[r[k] for k in keys] for r in straight]
    for name, value in _weights("runs/straight").items():
        assert torch.equal(value, _weights("runs/resumed")[name]), name


def test_docs_list_every_metric_a_step_logs(sft_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _dpo(sft_run[0], *SMALL, "--total-steps", "1", "--eval-every", "1", "--run-name", "offline")
    _dpo(sft_run[0], *SMALL, "--total-steps", "1", "--eval-every", "1", "--run-name", "online", "--online")
    with open(os.path.join(REPO, "docs", "dpo.md")) as f:
        page = f.read()
    section = page[page.index("## Logged metrics"):]
    section = section[:section.index("\n## ")]
    for key in {**_steps("offline")[0], **_steps("online")[0]}:
        shown = key.split("/")[0] + "/" if key.startswith(("reward/", "reasons/")) else key
        assert f"`{shown}" in section, f"docs/dpo.md's Logged metrics does not list {key}"


def test_offline_dpo_learns_beyond_the_teacher(sft_run, tmp_path, monkeypatch):
    """From the SFT run (sampled accuracy ~0.5, the noisy teacher's level): DPO on the SFT model's own right-vs-wrong
    samples raises pass@1 well above it, keeps greedy accuracy, and its implicit reward ranks held-out pairs."""
    monkeypatch.chdir(tmp_path)
    before = sft_run[1]
    result = _dpo(sft_run[0], "--total-steps", "100", "--num-pair-prompts", "2048", "--eval-every", "50",
                  "--num-eval-prompts", "100", "--num-eval-samples", "8")
    steps = _steps()
    assert result["pass@1"] > before["pass@1"] + 0.15
    assert result["accuracy"] >= before["accuracy"] - 0.1  # greedy does not collapse (it does at beta 0.1)
    assert steps[-1]["eval_reward_accuracy"] > 0.8  # chance: 0.5
    assert sum(r["rewards/accuracies"] for r in steps[-10:]) / 10 > 0.9
    print(json.dumps({"sft": before, "dpo": result, "eval_reward_accuracy": steps[-1]["eval_reward_accuracy"]}))


def test_online_dpo_learns(sft_run, tmp_path, monkeypatch):
    """--online: the policy's own best-vs-worst pairs each step; sampled and held-out accuracy rise within 40 steps."""
    monkeypatch.chdir(tmp_path)
    before = sft_run[1]
    result = _dpo(sft_run[0], "--online", "--total-steps", "40", "--num-eval-prompts", "100", "--num-eval-samples", "8")
    steps = _steps()
    first, last = steps[:5], steps[-5:]
    assert sum(r["sampled_accuracy"] for r in last) / 5 > sum(r["sampled_accuracy"] for r in first) / 5 + 0.08
    assert all(0 < r["num_pairs"] <= 64 for r in steps)  # one pair per untied group of the 64 prompts
    assert result["pass@1"] > before["pass@1"] + 0.08
    print(json.dumps({"sft": before, "online_dpo": result}))


def test_the_loop_keeps_the_numbered_banners_in_order():
    source = open(os.path.join(REPO, "dpo.py")).read()
    banners = " | ".join(m.group(1) for m in re.finditer(r"# ---- (.+?)(?: -{3,})?\n", source))
    positions = [banners.find(b) for b in ("1. Generate", "2. Reward", "3. Advantage", "4. Score", "5. Update",
                                           "6. Sync", "7. Log")]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), banners


@pytest.mark.parametrize("sharding", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_two_processes_take_the_one_process_step(sft_run, tmp_path, sharding):
    """torchrun: every rank builds the same pair set, takes its slice of each batch, and divides by the global pair
    count, so 2 processes (DDP, or FSDP2 with the reference sharded too) take the 1-process step."""
    from test_distributed import QUICK as DIST_QUICK
    from test_distributed import assert_same_step, torchrun

    one, two = tmp_path / "one", tmp_path / "two"
    flags = ["--model", sft_run[0], *SMALL, "--total-steps", "2", "--micro-batch-size", "4", "--run-name", "dist",
             *DIST_QUICK]
    torchrun(1, one, "dpo", *flags)
    torchrun(2, two, "dpo", *flags, *sharding)
    assert_same_step(one, two, "dist")
    assert read_metrics(one / "runs/dist")[0]["loss"] == pytest.approx(read_metrics(two / "runs/dist")[0]["loss"],
                                                                       abs=1e-6)
