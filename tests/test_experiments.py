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


@pytest.mark.parametrize("name, fraction", [("countdown_steps_wrongref5", 0.05), ("countdown_steps_wrongref20", 0.2)])
def test_countdown_steps_wrong_references_move_the_target_of_that_share_of_training_problems(name, fraction):
    from common.rewards import countdown_steps_verifier

    clean, noisy = load_task("countdown_steps"), load_task(name)
    prompts = noisy.prompts
    wrong = [i for i, (a, q) in enumerate(zip(prompts["answer"], prompts["question"])) if a != q]
    assert abs(len(wrong) / len(prompts) - fraction) < 0.01
    for i in wrong[:200]:
        numbers, target = prompts["question"][i].split("->")
        assert prompts["answer"][i] == f"{numbers}->{int(target) + 1}"  # the prompt still shows the true target
        # the clean demonstration reaches the shown target, so the wrong reference scores it 0
        assert countdown_steps_verifier(prompts["expert"][i], prompts["answer"][i])[0] == 0.0
        assert countdown_steps_verifier(prompts["expert"][i], prompts["question"][i])[0] == 1.0
    assert noisy.test["answer"] == clean.test["answer"]  # evaluation stays clean
    assert noisy.train["demonstration"] == clean.train["demonstration"]  # the same SFT data


def test_the_audit_compares_countdown_samples_by_their_last_result():
    from reference_audit import final_answer

    paths = ["14+9=23 (2 17 23) 23+17=40 (2 40) 40-2=38", "17-9=8 (14 2 8) 14*2=28 (8 28) 28+8=36",
             "2+9=11 (14 17 11) 17-11=6 (14 6) 14-6=8"]
    assert [final_answer("countdown_steps", p) for p in paths] == ["38", "36", "8"]
    assert final_answer("countdown_steps", "no steps") == "no steps" and final_answer("number", " 27 ") == "27"
    # two different paths to the same result agree; the whole completions would not
    assert classify([final_answer("countdown_steps", p) for p in (paths[0], "9+14=23 (2 17 23) 17+23=40 (2 40) "
                                                                  "40-2=38")], [0, 0], 0.5, 0.25)[0] \
        == "likely_wrong_reference"


def test_seed_checks_say_holds_only_when_every_seed_agrees(capsys):
    from experiments import SeedChecks

    check = SeedChecks()
    check("all", [True, True, True], "")
    check("some", [True, False, True], "")
    check("none", [False, False, False], "")
    assert [r["verdict"] for r in check.results] == ["holds", "mixed", "DOES NOT HOLD"]
    assert not check.ok and "mixed (2/3 seeds): some" in capsys.readouterr().out


def test_run_all_runs_two_at_a_time_after_what_each_needs_and_reuses_finished_runs(tmp_path):
    import json
    import sys

    from experiments import run_all

    def write(run: str, wait: float) -> list[str]:  # a stand-in script: sleeps, then writes an eval record
        code = (f"import json, os, time; time.sleep({wait}); os.makedirs({run!r}, exist_ok=True); "
                f"open(os.path.join({run!r}, 'metrics.jsonl'), 'w').write(json.dumps({{'event': 'eval', "
                f"'t': time.time()}}) + chr(10))")
        return [sys.executable, "-c", code]

    a, b, c = (str(tmp_path / name) for name in ("a", "b", "c"))
    run_all([(a, write(a, 1.0), 1), (b, write(b, 0.1), 1, [a]), (c, write(c, 0.1), 1)], fresh=False, jobs=2)
    t = {r: json.loads(open(os.path.join(r, "metrics.jsonl")).read())["t"] for r in (a, b, c)}
    assert t[b] > t[a] and t[c] < t[a]  # b waited for a; c ran beside a
    run_all([(a, [sys.executable, "-c", "raise SystemExit(3)"], 1)], fresh=False, jobs=2)  # finished: not re-run
    with pytest.raises(SystemExit, match="1 runs failed"):
        run_all([(a, [sys.executable, "-c", "raise SystemExit(3)"], 1)], fresh=True, jobs=2)
