"""reward_model.py and its common/ parts (preferences.py, learned_reward.py, generate_and_score's learned reward):
the losses against hand computations, the score read where transformers reads it, the labeller's noise
and bias, the loader's one-line errors, and short runs that learn."""

import json
import math
import os

import pytest
import torch
from transformers import AutoModelForSequenceClassification, LlamaForSequenceClassification

import reward_model
from common.learned_reward import (MARKER, LearnedReward, bt_inputs, bt_score, judge_questions, load_reward_model,
                                   reference_question, verdict_token_ids, yes_probability)
from common.models import build_char_tokenizer, build_tiny_model
from common.preferences import (Graded, PreferencePairs, drop_identical, encode_completions, flip_labels,
                                load_pairs, pairs_from_graded, prefer_longer, save_pairs)
from common.rewards import score_rows
from common.rollout import generate_and_score, generate_hf, reward_metrics
from common.tasks import format_prompt, load_task
from common.tracking import read_metrics
from reward_model import Args, auc, bt_loss, build_pairs, equivalent_forms, pair_accuracy


def _pairs(n: int) -> PreferencePairs:
    """n pairs: right answer "a+b" against a wrong one, some wrong ones one character longer."""
    questions = [f"{10 + i % 80}+{20 + i % 7}" for i in range(n)]
    answers = [str(10 + i % 80 + 20 + i % 7) for i in range(n)]
    wrong = [a + "0" if i % 3 == 0 else str(int(a) + 1) for i, a in enumerate(answers)]
    return PreferencePairs(questions, answers, list(answers), wrong, [1.0] * n, [0.0] * n)


def _seq_cls_model(tokenizer, seed=0):
    """A tiny LlamaForSequenceClassification (num_labels 1) with the policy's config, random weights."""
    config = build_tiny_model(tokenizer, hidden_size=32, num_layers=2).config
    config.num_labels = 1
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(config).eval()


# ==== The math ====


def test_bt_loss_matches_a_hand_computation():
    r_chosen, r_rejected = torch.tensor([2.0, -1.0, 0.5, 0.0]), torch.tensor([0.0, 0.5, 0.5, 0.0])
    margin, coef = 0.3, 0.01
    by_hand = [math.log(1 + math.exp(-(c - r - margin))) + coef * (c + r) ** 2
               for c, r in zip(r_chosen.tolist(), r_rejected.tolist())]
    assert bt_loss(r_chosen, r_rejected, margin, coef).tolist() == pytest.approx(by_hand, rel=1e-6)
    assert bt_loss(torch.zeros(1), torch.zeros(1)).item() == pytest.approx(math.log(2))  # at init: log 2
    assert bt_loss(torch.tensor([2.0]), torch.tensor([0.0]), 1.0).item() == pytest.approx(0.3133, abs=1e-4)
    # the gradient: -sigmoid(-(d - m)) on r+, +sigmoid(-(d - m)) on r-, plus the centring's 2c(r+ + r-) on both
    c, r = torch.tensor([1.5], requires_grad=True), torch.tensor([0.5], requires_grad=True)
    bt_loss(c, r, margin, coef).sum().backward()
    weight = 1 / (1 + math.exp(1.0 - margin))
    assert c.grad.item() == pytest.approx(-weight + 2 * coef * 2.0, rel=1e-6)
    assert r.grad.item() == pytest.approx(weight + 2 * coef * 2.0, rel=1e-6)


def test_pair_accuracy_and_auc():
    assert pair_accuracy(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0])) == 0.75  # a tie counts half
    assert auc(torch.tensor([0.9, 0.2, 0.5]), torch.tensor([1.0, 0.0, 0.0])) == 1.0
    assert math.isnan(auc(torch.tensor([0.9, 0.2]), torch.tensor([1.0, 1.0])))
    scores, labels = torch.rand(40, generator=torch.Generator().manual_seed(0)), torch.tensor([1.0, 0.0] * 20)
    brute = sum((s > t) + 0.5 * (s == t) for s, y in zip(scores, labels) if y for t, z in zip(scores, labels)
                if not z) / (20 * 20)
    assert auc(scores, labels) == pytest.approx(float(brute))


def test_equivalent_forms_are_right_answers_the_verifier_rejects():
    assert reward_model.number_words(38) == "thirty-eight" and reward_model.number_words(120) == "one hundred twenty"
    assert reward_model.number_words(107) == "one hundred seven"
    for answer in ("20", "38", "100", "198"):
        forms = equivalent_forms(answer)
        assert float(forms["scientific"]) == int(answer)  # 3.8e1 is 38
        _, terms, _ = score_rows("number", list(forms.values()), [answer] * 2, [True] * 2)
        assert terms["correct"] == [0.0, 0.0], forms  # the strict rule rejects both
    # forms the rule already accepts are not in the set
    _, terms, _ = score_rows("number", ["38.0", "=38", "38 units", "038"], ["38"] * 4, [True] * 4)
    assert terms["correct"] == [1.0] * 4


# ==== Pairs: built from graded completions, the labeller's noise and bias ====


def test_pairs_pair_each_right_completion_with_a_wrong_one_of_its_question():
    graded = Graded(["q1"] * 4 + ["q2"] * 2 + ["q3"] * 2, ["38"] * 4 + ["5"] * 2 + ["7"] * 2,
                    ["38", "37", "38", "39", "5", "5", "6", "8"], [1, 0, 1, 0, 1, 1, 0, 0])
    pairs = pairs_from_graded(graded, torch.Generator().manual_seed(0))
    assert pairs.questions == ["q1", "q1"]  # q2: all right, q3: all wrong -> no pair
    assert pairs.chosen == ["38", "38"] and sorted(pairs.rejected) == ["37", "39"]
    assert pairs.agreement() == 1.0


def test_label_noise_flips_exactly_the_stated_share():
    pairs = _pairs(1000)
    for share in (0.0, 0.1, 0.25, 1.0):
        noisy, flipped = flip_labels(pairs, share, torch.Generator().manual_seed(1))
        assert sum(flipped) == round(share * 1000)
        assert noisy.agreement() == pytest.approx(1 - share)
        for i in range(len(pairs)):
            expected = (pairs.rejected[i], pairs.chosen[i]) if flipped[i] else (pairs.chosen[i], pairs.rejected[i])
            assert (noisy.chosen[i], noisy.rejected[i]) == expected
            assert noisy.chosen_correct[i] == (0.0 if flipped[i] else 1.0)


def test_length_bias_prefers_the_longer_completion():
    pairs = _pairs(300)
    longer = [len(r) > len(c) for c, r in zip(pairs.chosen, pairs.rejected)]
    assert sum(longer) >= 100  # every third has a 0 appended; 99 -> 100 adds a few
    biased, swapped = prefer_longer(pairs, 1.0, torch.Generator().manual_seed(0))
    assert swapped == longer
    assert all(len(c) >= len(r) for c, r in zip(biased.chosen, biased.rejected))
    _, none = prefer_longer(pairs, 0.0, torch.Generator().manual_seed(0))
    assert not any(none)
    _, some = prefer_longer(pairs, 0.5, torch.Generator().manual_seed(0))
    assert 30 <= sum(some) <= 70 and all(longer[i] for i, s in enumerate(some) if s)


def test_identical_pairs_are_dropped_and_counted(tmp_path):
    pairs = _pairs(6)
    pairs.rejected[1], pairs.rejected[4] = pairs.chosen[1], " " + pairs.chosen[4]
    kept, dropped = drop_identical(pairs)
    assert dropped == 2 and len(kept) == 4
    save_pairs(tmp_path / "p.jsonl", pairs)
    assert load_pairs(tmp_path / "p.jsonl") == pairs
    # through the script: a warning with the count, or one error line naming the flag when nothing is left
    args = Args(pairs_file=str(tmp_path / "p.jsonl"))
    assert len(build_pairs(args, None, None, None, 6, [0])) == 4
    pairs.rejected = list(pairs.chosen)
    save_pairs(tmp_path / "same.jsonl", pairs)
    with pytest.raises(SystemExit, match="--pairs-file"):
        build_pairs(Args(pairs_file=str(tmp_path / "same.jsonl")), None, None, None, 6, [0])


# ==== The scores: where transformers reads them, and the judge's one forward pass ====


def test_sequence_classification_score_is_the_last_token_head_whatever_the_padding(tokenizer):
    model = _seq_cls_model(tokenizer)
    assert isinstance(model, LlamaForSequenceClassification) and model.config.pad_token_id == tokenizer.pad_token_id
    questions, completions = ["12+26", "3+4", "99+1"], ["38", "7", "100 apples"]
    batch = encode_completions(tokenizer, questions, completions, None, tokenizer.eos_token_id, 16, "cpu")
    with torch.no_grad():
        scores = bt_score(model, batch)  # (3,)
        for i, (q, c) in enumerate(zip(questions, completions)):  # by hand: one row, no padding at all
            ids = tokenizer(format_prompt(tokenizer, q) + c, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([ids + [tokenizer.eos_token_id]])
            hidden = model.model(input_ids=ids).last_hidden_state[0, -1]  # (H,): the EOS position
            assert scores[i].item() == pytest.approx((model.score.weight[0] @ hidden).item(), abs=1e-5)
        # more right padding on the completions, more left padding on the prompts: the same scores
        wider = encode_completions(tokenizer, questions, completions, None, tokenizer.eos_token_id, 16, "cpu")
        pad = torch.full((3, 5), tokenizer.pad_token_id)
        wider.completion_ids = torch.cat([wider.completion_ids, pad], 1)
        wider.completion_mask = torch.cat([wider.completion_mask, torch.zeros(3, 5, dtype=torch.long)], 1)
        wider.prompt_ids = torch.cat([pad, wider.prompt_ids], 1)
        wider.prompt_mask = torch.cat([torch.zeros(3, 5, dtype=torch.long), wider.prompt_mask], 1)
        assert torch.allclose(bt_score(model, wider), scores, atol=1e-5)


def test_judge_p_yes_is_one_forward_pass_normalised_over_the_verdicts(tokenizer, tiny_model):
    yes_id, no_id = verdict_token_ids(tokenizer)
    assert tokenizer.decode([yes_id]) == "y" and tokenizer.decode([no_id]) == "n"
    questions, answers, completions = ["12+26", "3+4", "50+50"], ["38", "7", "100"], ["38", "eight", "99"]
    texts = judge_questions(questions, answers, completions, reference=True)
    assert texts[0] == "12+26\n38\n38" and judge_questions(questions, answers, completions, False)[0] == "12+26\n38"
    enc = tokenizer([format_prompt(tokenizer, t) for t in texts], return_tensors="pt", padding=True)
    with torch.no_grad():
        p_yes = yes_probability(tiny_model, enc["input_ids"], enc["attention_mask"], yes_id, no_id)
        for i, text in enumerate(texts):  # by hand: the full logits of one unpadded row, its last position
            ids = torch.tensor([tokenizer(format_prompt(tokenizer, text))["input_ids"]])
            z = tiny_model(input_ids=ids).logits[0, -1]
            expected = math.exp(z[yes_id]) / (math.exp(z[yes_id]) + math.exp(z[no_id]))
            assert p_yes[i].item() == pytest.approx(expected, abs=1e-5)
        # LearnedReward.score: the same numbers from the rollout's completion texts, in micro-batches of 2
        rollout = encode_completions(tokenizer, questions, completions, None, tokenizer.eos_token_id, 16, "cpu")
        scored = LearnedReward(tiny_model, tokenizer, "judge", True).score(rollout, questions, answers, micro_size=2)
    assert torch.allclose(scored, p_yes, atol=1e-5)


# ==== Loading a reward model for the RL scripts: --reward-model ====


def _save_reward_folder(path, tokenizer, mode="bt", reference=False):
    model = _seq_cls_model(tokenizer) if mode == "bt" else build_tiny_model(tokenizer, 32, 2)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    with open(os.path.join(path, MARKER), "w") as f:
        json.dump({"mode": mode, "reference": reference, "task": "add_noisy", "base": "test"}, f)
    return model


def test_load_reward_model_loads_frozen_and_scores_like_the_saved_model(tokenizer, tmp_path):
    assert load_reward_model("", tokenizer, "cpu", torch.float32) is None
    saved = _save_reward_folder(tmp_path / "bt", tokenizer)
    reward = load_reward_model(str(tmp_path / "bt"), tokenizer, "cpu", torch.float32)
    assert reward.mode == "bt" and not reward.model.training
    assert not any(p.requires_grad for p in reward.model.parameters())
    questions, answers = ["1+2", "20+30", "7+7"], ["3", "50", "15"]
    rollout = encode_completions(tokenizer, questions, answers, None, tokenizer.eos_token_id, 8, "cpu")
    with torch.no_grad():  # without the reference: the rollout's own tokens, in micro-batches of 2
        assert torch.allclose(reward.score(rollout, questions, answers, micro_size=2), bt_score(saved, rollout),
                              atol=1e-6)
    # with the reference: the question and its reference answer as the prompt, the completion re-encoded
    _save_reward_folder(tmp_path / "bt_ref", tokenizer, reference=True)
    reward = load_reward_model(str(tmp_path / "bt_ref"), tokenizer, "cpu", torch.float32)
    expected = encode_completions(tokenizer, [reference_question(q, a) for q, a in zip(questions, answers)],
                                  rollout.completions, None, tokenizer.eos_token_id, 8, "cpu")
    assert torch.equal(bt_inputs(tokenizer, rollout, questions, answers, True).completion_ids, expected.completion_ids)
    with torch.no_grad():
        assert torch.allclose(reward.score(rollout, questions, answers), bt_score(reward.model, expected), atol=1e-6)
    _save_reward_folder(tmp_path / "judge", tokenizer, "judge", reference=True)
    judge = load_reward_model(str(tmp_path / "judge"), tokenizer, "cpu", torch.float32)
    p = judge.score(rollout, questions, answers)
    assert judge.mode == "judge" and p.shape == (3,) and ((p > 0) & (p < 1)).all()


def test_load_reward_model_refuses_a_wrong_folder_in_one_line(tokenizer, tmp_path):
    with pytest.raises(SystemExit, match=r"^error: --reward-model: .*missing: no such folder"):
        load_reward_model(str(tmp_path / "missing"), tokenizer, "cpu", torch.float32)
    policy = build_tiny_model(tokenizer, 32, 2)  # a policy folder: weights and tokenizer, no marker
    policy.save_pretrained(tmp_path / "policy")
    tokenizer.save_pretrained(tmp_path / "policy")
    with pytest.raises(SystemExit, match=r"^error: --reward-model: .* not a reward_model.py run .*policy"):
        load_reward_model(str(tmp_path / "policy"), tokenizer, "cpu", torch.float32)
    other = build_char_tokenizer()  # the policy's tokenizer with one more token: another vocabulary
    other.add_tokens(["<|extra|>"])
    _save_reward_folder(tmp_path / "other", other)
    with pytest.raises(SystemExit, match=r"^error: --reward-model: .* tokenizer is not the policy's"):
        load_reward_model(str(tmp_path / "other"), tokenizer, "cpu", torch.float32)
    for err in ("missing", "policy", "other"):  # one line each
        with pytest.raises(SystemExit) as info:
            load_reward_model(str(tmp_path / err), tokenizer, "cpu", torch.float32)
        assert "\n" not in str(info.value)


# ==== generate_and_score with a learned reward ====


class _Engine:
    """generate_hf with a fixed seed: the same rollout at every call."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    def generate(self, prompts, n, temperature, max_new_tokens, top_p):
        torch.manual_seed(0)
        return generate_hf(self.model, self.tokenizer, prompts, n, temperature, max_new_tokens, top_p,
                           [self.tokenizer.eos_token_id])


def test_generate_and_score_without_a_reward_model_is_unchanged(tokenizer, tiny_model):
    task = load_task("add_noisy")
    engine = _Engine(tiny_model, tokenizer)
    rollout = generate_and_score(engine, tokenizer, task, 5, 3, 1, 4, 1.0, 6, format_weight=0.5)
    again = generate_and_score(engine, tokenizer, task, 5, 3, 1, 4, 1.0, 6, format_weight=0.5, reward_model=None)
    answers = [task.prompts[i]["answer"] for i in __import__("common.tasks").tasks.rows_at(len(task.prompts), 5, 3, 1)]
    rewards, terms, reasons = score_rows("number", rollout.completions, [a for a in answers for _ in range(4)],
                                         rollout.is_eos.tolist(), 0.5)
    for scored in (rollout, again):  # what the function computed before it took a reward model, bit for bit
        assert torch.equal(scored.rewards, torch.tensor(rewards))
        assert set(scored.reward_terms) == {"correct", "format"} and scored.reasons == reasons
        assert all(torch.equal(scored.reward_terms[k], torch.tensor(v)) for k, v in terms.items())


def test_generate_and_score_with_a_learned_reward_keeps_the_verifier_as_gold(tokenizer, tiny_model, tmp_path):
    task = load_task("add_noisy")
    engine = _Engine(tiny_model, tokenizer)
    _save_reward_folder(tmp_path / "rm", tokenizer)
    reward = load_reward_model(str(tmp_path / "rm"), tokenizer, "cpu", torch.float32)
    gold = generate_and_score(engine, tokenizer, task, 0, 4, 1, 4, 1.0, 6, format_weight=0.5)
    proxied = generate_and_score(engine, tokenizer, task, 0, 4, 1, 4, 1.0, 6, format_weight=0.5, reward_model=reward)
    assert proxied.completions == gold.completions
    proxy = reward.score(proxied, [""] * len(proxied), [""] * len(proxied))  # without the reference: tokens only
    assert torch.equal(proxied.reward_terms["proxy"], proxy)
    assert torch.allclose(proxied.rewards, proxy + 0.5 * gold.reward_terms["format"])
    assert torch.equal(proxied.reward_terms["correct"], gold.reward_terms["correct"])  # the verifier's verdict
    metrics = reward_metrics(proxied, 4)
    assert metrics["sampled_accuracy"] == reward_metrics(gold, 4)["sampled_accuracy"]  # gold accuracy
    assert metrics["reward/proxy"] == pytest.approx(proxy.mean().item())


# ==== End to end: the script learns, saves a loadable model, resumes exactly ====

QUICK = dict(tensorboard=False, num_eval_prompts=100, num_eval_samples=8, save_every=0, eval_every=0)
# Measured with the sft_run fixture's SFT (400 steps; `python sft.py --total-steps 400 --num-eval-prompts 100`),
# 200 bt steps: held-out pair accuracy 0.957, agreement (AUC) 0.813, 57 s on a shared 2-core CPU
BT_FLAGS = dict(total_steps=200)
BT_PAIR_ACCURACY, BT_AGREEMENT = 0.8, 0.65
# The judge learns later (pair accuracy 0.63 after 200 steps, 0.81 after 300 on runs/sft): here it only runs
JUDGE_FLAGS = dict(total_steps=60)


def test_bt_run_learns_and_saves_a_sequence_classifier(sft_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = reward_model.main(Args(policy=sft_run[0], run_name="bt", **BT_FLAGS, **QUICK))
    assert result["pair_accuracy"] > BT_PAIR_ACCURACY, result
    assert result["agreement"] > BT_AGREEMENT, result
    records = read_metrics("runs/bt")
    assert records[-1]["event"] == "eval" and records[0]["loss"] == pytest.approx(math.log(2), abs=0.05)
    loaded = AutoModelForSequenceClassification.from_pretrained("runs/bt")
    assert type(loaded).__name__ == "LlamaForSequenceClassification" and loaded.config.num_labels == 1
    with open(f"runs/bt/{MARKER}") as f:
        assert json.load(f) == {"mode": "bt", "reference": True, "task": "add_noisy", "base": sft_run[0]}
    assert len(load_pairs("runs/bt/pairs.jsonl")) > 100


def test_judge_run_end_to_end(sft_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = reward_model.main(Args(mode="judge", policy=sft_run[0], run_name="judge", **JUDGE_FLAGS, **QUICK))
    for key in ("pair_accuracy", "agreement", "verdict_accuracy", "equivalent_yes_rate/words",
                "equivalent_wrong_yes_rate/scientific"):
        assert 0 <= result[key] <= 1, key
    assert result["num_equivalent"] == result["num_equivalent_wrong"] == 200  # 100 questions x 2 forms
    records = read_metrics("runs/judge")
    assert records[0]["loss"] > 2 * records[-2]["loss"]  # the verdict's format ("es", EOS) is learnt at once
    with open(f"runs/judge/{MARKER}") as f:
        assert json.load(f)["mode"] == "judge"
    judge = load_reward_model("runs/judge", build_char_tokenizer(), "cpu", torch.float32)
    assert judge.mode == "judge" and judge.reference


def test_resume_continues_exactly(sft_run, tmp_path, monkeypatch):
    from common.tracking import RunLogger

    monkeypatch.chdir(tmp_path)
    small = dict(policy=sft_run[0], total_steps=6, save_every=3, eval_every=0, num_pair_prompts=64, batch_size=16,
                 num_eval_prompts=8, num_eval_samples=4, tensorboard=False)
    reward_model.main(Args(run_name="straight", **small))
    original = RunLogger.log

    def log(self, step, metrics):
        if step == 5 and "event" not in metrics:
            raise KeyboardInterrupt
        return original(self, step, metrics)

    with monkeypatch.context() as m:
        m.setattr(RunLogger, "log", log)
        with pytest.raises(KeyboardInterrupt):
            reward_model.main(Args(run_name="resumed", **small))
    reward_model.main(Args(run_name="resumed", resume=True, **small))
    straight, resumed = read_metrics("runs/straight"), read_metrics("runs/resumed")
    assert [r["step"] for r in resumed if "event" not in r] == list(range(1, 7))
    assert [r["loss"] for r in resumed[:6]] == [r["loss"] for r in straight[:6]]
    a = AutoModelForSequenceClassification.from_pretrained("runs/straight").state_dict()
    b = AutoModelForSequenceClassification.from_pretrained("runs/resumed").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
