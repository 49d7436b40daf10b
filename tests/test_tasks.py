"""common/tasks.py: countdown's generator and split, the carry tasks' expert and slice columns;
common/evaluation.py: evaluate's keys, ks and per-slice breakdown (with a scripted generate)."""

import time
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset

import common.evaluation
from common.evaluation import evaluate, pass_at_k_curve
from common.rewards import countdown_verifier
from common.tasks import Task, has_carry, load_task, make_countdown_task, random_countdown_problem

# ---------------------------------------------------------------------------------------
# countdown
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def countdown():
    return load_task("countdown")


def canonical(question):
    """'7 3 12->45' -> ((3, 7, 12), 45): the problem whatever the order of its numbers."""
    numbers, target = question.split("->")
    return tuple(sorted(map(int, numbers.split()))), int(target)


def test_countdown_is_too_large_to_memorise_and_test_is_unseen(countdown):
    train, test = countdown.train[:], countdown.test[:]
    train_problems = {canonical(q) for q in train["question"]}
    assert len(train_problems) == len(train["question"]) >= 30_000  # distinct problems, one demonstration each
    test_problems = [canonical(q) for q in test["question"]]
    assert len(set(test_problems)) == len(test_problems) >= 200
    assert not train_problems & set(test_problems)  # not even with the numbers reordered
    assert len(countdown.prompts) == len(train["question"])


def test_countdown_demonstrations_are_right_and_fit_the_budget(countdown):
    for split in (countdown.train[:], countdown.test[:]):
        for question, answer, demo, slice_ in zip(split["question"], split["answer"], split["demonstration"],
                                                   split["slice"]):
            assert answer == question
            assert countdown_verifier(demo, answer) == (1.0, "correct"), (demo, answer)
            numbers, target = canonical(question)
            assert 1 <= target <= 99 and all(1 <= n <= 20 for n in numbers)
            assert slice_ == f"{len(numbers)}_numbers"
            assert len(demo) + 1 <= countdown.max_new_tokens  # + EOS
    shares = [sum(s == "3_numbers" for s in split["slice"]) / len(split["slice"])
              for split in (countdown.train, countdown.test)]
    assert all(0.2 <= share <= 0.3 for share in shares), shares  # both splits mix sizes alike


def test_countdown_test_split_depends_on_the_seed_only():
    a, b = make_countdown_task(seed=3, num_train=100, num_test=50), make_countdown_task(seed=3, num_train=2000)
    assert a.test["question"][:] == b.test["question"][:50]
    assert a.test["demonstration"][:] == b.test["demonstration"][:50]
    assert make_countdown_task(seed=4, num_train=100).test["question"][:] != b.test["question"][:]


def test_countdown_builds_in_a_few_seconds():
    start = time.perf_counter()
    make_countdown_task(seed=7)
    assert time.perf_counter() - start < 6  # ~1 s on an idle 2-core machine; slack for a busy one


def test_random_countdown_problem_brackets_only_where_needed():
    import random

    rng = random.Random(0)
    for _ in range(2000):
        numbers, value, expression = random_countdown_problem(rng, rng.choice((3, 4)))
        answer = f"{' '.join(map(str, numbers))}->{value}"
        assert countdown_verifier(expression, answer) == (1.0, "correct"), (expression, answer)
        assert "((" not in expression and not (expression.startswith("(") and expression.endswith(")")
                                               and expression.count("(") == 1)


# ---------------------------------------------------------------------------------------
# the carry tasks: expert and slice columns
# ---------------------------------------------------------------------------------------


def test_add_carry_always_wrong_teacher_never_carries_and_expert_is_right():
    task = load_task("add_carry_always_wrong")
    assert task.has_expert and task.slices == ("carry", "no_carry")
    for split in (task.train[:], task.test[:]):
        for q, a, expert, slice_ in zip(split["question"], split["answer"], split["expert"], split["slice"]):
            x, y = map(int, q.split("+"))
            assert int(a) == int(expert) == x + y
            assert slice_ == ("carry" if has_carry(x, y) else "no_carry")
    train = task.train[:]
    for q, demo, slice_ in zip(train["question"], train["demonstration"], train["slice"]):
        x, y = map(int, q.split("+"))
        assert int(demo) == (x + y - 10 if slice_ == "carry" else x + y)  # always, not sometimes
    assert set(task.test["slice"][:]) == {"carry", "no_carry"}
    assert task.prompts.column_names == ["question", "answer", "expert", "slice"]


def test_other_addition_tasks_keep_their_data_and_gain_an_expert():
    noisy, carry = load_task("add_noisy"), load_task("add_carry_noisy")
    assert "slice" not in noisy.train.column_names and noisy.slices == ()  # its eval record keeps its keys
    assert noisy.has_expert and carry.has_expert and carry.slices == ("carry", "no_carry")
    rows = carry.train[:]
    wrong = [d != e for d, e, s in zip(rows["demonstration"], rows["expert"], rows["slice"]) if s == "carry"]
    assert 0.75 <= sum(wrong) / len(wrong) <= 0.85  # p_drop = 0.8, as before


def test_task_rejects_columns_it_does_not_have():
    split = Dataset.from_dict({"question": ["1+1"], "answer": ["2"], "demonstration": ["2"]})
    with pytest.raises(ValueError, match="expert"):
        Task("t", split, split, "number", has_expert=True)
    with pytest.raises(ValueError, match="slices"):
        Task("t", split, split, "number", slices=("a", "b"))
    sliced = split.add_column("slice", ["c"])
    with pytest.raises(ValueError, match="slices"):
        Task("t", sliced, sliced, "number", slices=("a", "b"))


# ---------------------------------------------------------------------------------------
# evaluate: keys, ks, slices (generate is scripted: prompt i gets right answers as listed)
# ---------------------------------------------------------------------------------------


def scripted_generate(right_per_prompt: dict[str, int]):
    """A stand-in for common.rollout.generate: for question q, the first right_per_prompt[q]
    of the n samples are right ('2'), the rest wrong ('3'); greedy is right when any is."""

    def generate(engine, model, tokenizer, prompts, n, temperature, max_new_tokens, eos_ids=None, environment=None):
        completions = []
        for prompt in prompts:
            right = min(n, next(v for q, v in right_per_prompt.items() if q in prompt))
            right = (n if right else 0) if temperature == 0 else right
            completions += ["2"] * right + ["3"] * (n - right)
        return SimpleNamespace(completions=completions, is_eos=torch.ones(len(completions), dtype=torch.bool),
                               prompt_index=torch.arange(len(prompts)).repeat_interleave(n))

    return generate


@pytest.fixture
def two_slice_task(tokenizer, monkeypatch):
    questions = ["1+1?a", "1+1?b", "1+1?c", "1+1?d"]
    right = {"1+1?a": 64, "1+1?b": 1, "1+1?c": 0, "1+1?d": 16}
    test = Dataset.from_dict({"question": questions, "answer": ["2"] * 4, "demonstration": ["2"] * 4,
                              "slice": ["easy", "hard", "hard", "easy"]})
    monkeypatch.setattr(common.evaluation, "generate", scripted_generate(right))
    return Task("t", test, test, "number", slices=("easy", "hard")), right


def test_evaluate_default_keys_are_unchanged(two_slice_task, tokenizer):
    task, _ = two_slice_task
    plain = Task("t", task.train.remove_columns("slice"), task.test.remove_columns("slice"), "number")
    result = evaluate(None, tokenizer, plain, num_samples=8, batch_size=3)
    assert list(result) == ["event", "accuracy", "pass@1", "pass@2", "pass@4", "pass@8", "num_prompts", "num_samples"]


def test_evaluate_curve_and_slices(two_slice_task, tokenizer):
    task, right = two_slice_task
    result = evaluate(None, tokenizer, task, num_samples=64, ks=range(1, 65), batch_size=3)
    counts = [(64, right[q]) for q in task.test["question"]]
    assert {k: result[f"pass@{k}"] for k in range(1, 65)} == pytest.approx(pass_at_k_curve(counts, range(1, 65)))
    assert result["pass@64"] == pytest.approx(3 / 4) and result["accuracy"] == pytest.approx(3 / 4)
    assert result["num_prompts/easy"] == result["num_prompts/hard"] == 2
    assert result["accuracy/easy"] == 1.0 and result["accuracy/hard"] == 0.5
    assert result["pass@1/hard"] == pytest.approx(1 / 64 / 2) and result["pass@64/hard"] == pytest.approx(0.5)
    assert result["pass@1/easy"] == pytest.approx((1 + 16 / 64) / 2)
    for k in (1, 8, 64):  # the slices average back to the whole
        assert (result[f"pass@{k}/easy"] + result[f"pass@{k}/hard"]) / 2 == pytest.approx(result[f"pass@{k}"])
    assert list(result)[:68] == ["event", "accuracy", *[f"pass@{k}" for k in range(1, 65)], "num_prompts",
                                 "num_samples"]  # the usual keys first, then the slices'


def test_evaluate_rejects_ks_beyond_the_samples(two_slice_task, tokenizer):
    task, _ = two_slice_task
    with pytest.raises(ValueError, match="ks"):
        evaluate(None, tokenizer, task, num_samples=8, ks=[16])


def test_countdown_steps_task_is_unseen_right_and_long_enough(tokenizer):
    from common.tasks import make_countdown_steps_task
    from common.rewards import countdown_steps_verifier

    task = load_task("countdown_steps")
    key = lambda q: (tuple(sorted(q.split("->")[0].split())), q.split("->")[1])  # numbers as a multiset, target
    assert not {key(q) for q in task.test["question"]} & {key(q) for q in task.train["question"]}
    for row in task.train.select(range(2000)):
        assert countdown_steps_verifier(row["demonstration"], row["answer"]) == (1.0, "correct")
    # completions of >= 20 tokens on average (EOS included): room for forks and forced tokens
    lengths = [len(tokenizer(d, add_special_tokens=False)["input_ids"]) + 1 for d in task.train["demonstration"][:5000]]
    assert sum(lengths) / len(lengths) >= 20
    assert load_task("countdown_steps_partial").partial_credit and not task.partial_credit
    # `sizes` draws the count of numbers (half each) and labels the slice: an out-of-distribution test split
    mixed = make_countdown_steps_task(num_train=2000, num_test=400, sizes=(3, 4))
    assert 0.4 < mixed.test["slice"].count("3_numbers") / len(mixed.test) < 0.6
    assert all(len(q.split("->")[0].split()) == int(s[0]) for q, s in zip(mixed.test["question"], mixed.test["slice"]))
    # the "don't" variant: its teacher never multiplies; the one-more-number test split has four numbers
    nomul = load_task("countdown_steps_nomul")
    assert not any("*" in d for d in nomul.train["demonstration"]) and nomul.verifier == "countdown_steps_nomul"
    assert all(len(q.split("->")[0].split()) == 4 for q in load_task("countdown_steps_4numbers").test["question"])
    shifted = load_task("countdown_steps_to40").test["question"]  # larger numbers: none of it is a training problem
    assert all(max(int(n) for n in q.split("->")[0].split()) > 25 for q in shifted)
    assert not {key(q) for q in shifted} & {key(q) for q in task.train["question"]}
    with pytest.raises(ValueError, match="distinct problems"):  # a space too small for num_train says so
        make_countdown_steps_task(num_train=30_000)
    # the held-out problems do not depend on anything a run's --seed changes
    assert load_task("countdown_steps").test["question"] == task.test["question"]
