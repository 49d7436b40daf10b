"""The pieces of benchmarks/experiments.py and benchmarks/reference_audit.py that decide a phenomenon's
direction: the entropy fit, the wrong-reference signature, and the corrupted-reference tasks."""

import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from experiments import entropy_fit  # noqa: E402
from reference_audit import classify, summary  # noqa: E402

from common.tasks import load_task  # noqa: E402


def test_entropy_fit_recovers_a_and_b():
    records = [{"entropy": h, "sampled_accuracy": 0.9 - 0.3 * math.exp(h)} for h in (0.05, 0.2, 0.4, 0.7, 1.0)]
    fit = entropy_fit(records)
    assert fit["a"] == pytest.approx(0.3) and fit["b"] == pytest.approx(0.9) and fit["r2"] == pytest.approx(1.0)
    records.append({"entropy": None, "sampled_accuracy": 0.5})  # steps without the metric are skipped
    assert entropy_fit(records)["a"] == pytest.approx(0.3)


@pytest.mark.parametrize("answers, correct, label", [
    (["12"] * 7 + ["13"], [0] * 8, "likely_wrong_reference"),  # sure, and never the reference
    (["12", "13", "14", "15", "16", "17", "18", "19"], [1] + [0] * 7, "hard"),  # unsure, rarely right
    (["12"] * 8, [1] * 8, "ok"),
    (["12"] * 7 + ["13"], [0] * 7 + [1], "ok"),  # matches the reference sometimes: not the wrong-label signature
])
def test_the_audit_tells_a_wrong_reference_from_a_hard_prompt(answers, correct, label):
    assert classify(answers, correct, agree=0.5, rarely=0.25)[0] == label


def test_audit_summary_scores_flags_against_the_truth():
    records = [{"label": "likely_wrong_reference", "reference_is_right": False},
               {"label": "likely_wrong_reference", "reference_is_right": True},
               {"label": "ok", "reference_is_right": False}, {"label": "ok", "reference_is_right": True}]
    s = summary(records)
    assert s["flagged"] == 2 and s["wrong_references"] == 2 and s["precision"] == 0.5 and s["recall"] == 0.5


@pytest.mark.parametrize("name, fraction", [("add_noisy_wrongref5", 0.05), ("add_noisy_wrongref20", 0.2)])
def test_wrong_reference_tasks_corrupt_that_share_of_training_answers_only(name, fraction):
    clean, noisy = load_task("add_noisy"), load_task(name)
    prompts = noisy.prompts
    wrong = [i for i, (a, e) in enumerate(zip(prompts["answer"], prompts["expert"])) if a != e]
    assert abs(len(wrong) / len(prompts) - fraction) < 0.02
    assert all(int(prompts["answer"][i]) == int(prompts["expert"][i]) + 1 for i in wrong)  # a + b + 1
    assert noisy.test["answer"] == clean.test["answer"]  # evaluation stays clean
    assert noisy.train["demonstration"] == clean.train["demonstration"]  # the same SFT data
