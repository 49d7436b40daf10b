"""common/plot.py: the reading helpers against hand-computed values, then the CLI end to end.

The fake runs are handwritten metrics.jsonl files shaped like the real ones: an sft.py-like run
(no rollouts, so no sampled_accuracy), an RL run evaluated with 64 samples (pass@1..pass@64,
per-slice keys, a null in one step) and an RL run killed before its eval record. The learning-curve
figures read a small made-up compare.json instead (the shape `benchmarks/experiments.py compare` saves).
"""

import json
import os
import subprocess
import sys

import pytest

from common.plot import SCRIPTS, learning_curve_points, load_runs, passk_points, plot_learning_curves, series

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ERROR_LINE = "error: plotting needs matplotlib: pip install -e '.[plot]'"


def write_run(folder, records):
    os.makedirs(folder)
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return str(folder)


@pytest.fixture
def runs(tmp_path):
    sft = write_run(tmp_path / "sft", [
        {"step": 1, "loss": 4.0, "step_time": 0.5},
        {"step": 2, "loss": 3.0, "step_time": 0.5, "eval_accuracy": 0.1},
        {"step": 3, "loss": 2.0, "step_time": 1.0},
        {"step": 3, "event": "eval", "accuracy": 0.9, "pass@1": 0.6, "pass@2": 0.8, "pass@4": 0.95, "pass@8": 1.0},
    ])
    # Keys in file order 1, 16, 2, 32, ...: a string sort would put 16 before 2.
    ks = [1, 16, 2, 32, 4, 64, 8]
    grpo = write_run(tmp_path / "grpo", [
        {"step": 1, "sampled_accuracy": 0.2, "entropy": 0.3, "kl": 0.0, "completion_length": 4.0, "step_time": 2.0},
        {"step": 2, "sampled_accuracy": 0.4, "entropy": None, "kl": 0.1, "completion_length": 5.0, "step_time": 2.0},
        {"step": 3, "sampled_accuracy": 0.6, "entropy": 0.2, "kl": 0.2, "completion_length": 6.0, "step_time": 3.0},
        {"step": 4, "sampled_accuracy": 1.0, "entropy": 0.1, "kl": 0.3, "completion_length": 3.0, "step_time": 1.0},
        {"step": 4, "event": "eval", "accuracy": 0.8, **{f"pass@{k}": 1 - 0.5 / k for k in ks},
         "pass@1/carry": 0.1, "pass@64/carry": 0.9, "num_samples": 64},
    ])
    killed = write_run(tmp_path / "killed", [
        {"step": 1, "sampled_accuracy": 0.5, "entropy": 0.3, "kl": 0.0, "completion_length": 4.0, "step_time": 1.0},
        {"step": 2, "sampled_accuracy": 0.5, "entropy": 0.3, "kl": 0.1, "completion_length": 4.0, "step_time": 1.0},
    ])
    return [sft, grpo, killed]


def test_load_runs_splits_steps_from_the_eval_record(runs):
    loaded = load_runs(runs)
    assert list(loaded) == ["sft", "grpo", "killed"]  # folder names, in the order given
    steps, eval_record = loaded["grpo"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert eval_record["pass@64"] == pytest.approx(1 - 0.5 / 64)
    assert loaded["killed"][1] is None
    assert list(load_runs(runs, ["A", "B", "C"])) == ["A", "B", "C"]
    with pytest.raises(ValueError):
        load_runs(runs, ["A", "B"])


def test_load_runs_keeps_runs_with_the_same_folder_name_apart(tmp_path):
    a = write_run(tmp_path / "a" / "grpo", [{"step": 1, "kl": 0.0}])
    b = write_run(tmp_path / "b" / "grpo", [{"step": 1, "kl": 1.0}])
    assert len(load_runs([a, b])) == 2


def test_series_trailing_mean_and_dropped_values(runs):
    steps = load_runs(runs)["grpo"][0]
    assert series(steps, "sampled_accuracy") == ([1, 2, 3, 4], pytest.approx([0.2, 0.4, 0.6, 1.0]))
    # window 3: 0.2 | (0.2+0.4)/2 | (0.2+0.4+0.6)/3 | (0.4+0.6+1.0)/3
    assert series(steps, "sampled_accuracy", smooth=3) == ([1, 2, 3, 4], pytest.approx([0.2, 0.3, 0.4, 2.0 / 3]))
    # step 2's null entropy is dropped, and the window runs over the kept values: 0.3 | 0.25 | 0.15
    assert series(steps, "entropy", smooth=2) == ([1, 3, 4], pytest.approx([0.3, 0.25, 0.15]))


def test_series_cumulative_wall_clock_and_missing_key(runs):
    loaded = load_runs(runs)
    assert series(loaded["grpo"][0], "step_time", cumulative=True) == ([1, 2, 3, 4], [2.0, 4.0, 7.0, 8.0])
    assert series(loaded["sft"][0], "step_time", cumulative=True) == ([1, 2, 3], [0.5, 1.0, 2.0])
    assert series(loaded["sft"][0], "sampled_accuracy", smooth=5) == ([], [])  # sft.py logs none: no line, no crash


def test_passk_points_orders_k_numerically_and_skips_slices(runs):
    loaded = load_runs(runs)
    ks, values = passk_points(loaded["grpo"][1])
    assert ks == [1, 2, 4, 8, 16, 32, 64]
    assert values == pytest.approx([1 - 0.5 / k for k in ks])
    assert passk_points(loaded["sft"][1]) == ([1, 2, 4, 8], [0.6, 0.8, 0.95, 1.0])
    assert passk_points(None) == ([], [])


def test_cli_writes_both_pngs(runs, tmp_path):
    pytest.importorskip("matplotlib")
    out, passk_out = tmp_path / "figs" / "compare.png", tmp_path / "figs" / "passk.png"
    done = subprocess.run([sys.executable, "-m", "common.plot", *runs, "--out", str(out), "--passk-out",
                           str(passk_out), "--labels", "SFT", "GRPO", "killed"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "killed has no eval record" in done.stdout
    for path in (out, passk_out):
        data = path.read_bytes()
        assert data[:8] == PNG_MAGIC
        assert len(data) > 10_000  # a figure with axes and lines, not an empty canvas


def test_cli_without_matplotlib_exits_with_one_line(runs, tmp_path):
    # None in sys.modules makes `import matplotlib` raise ImportError, as if it were not installed.
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "from common.plot import main\n"
            f"main({[*runs, '--out', str(tmp_path / 'c.png')]!r})")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.strip() == ERROR_LINE
    assert not (tmp_path / "c.png").exists()


def synthetic_compare(curves: bool) -> dict:
    """A compare.json shaped like the one `python benchmarks/experiments.py compare` saves, with made-up numbers."""
    def record(step, p1):
        return {"step": step, "event": "eval", "accuracy": 1.0, **{f"pass@{k}": 1 - (1 - p1) / k for k in (1, 2, 4)}}
    compare = {"teacher_accuracy": 0.6, "checks": [],
               "runs": {"runs/cmp_sft": record(30, 0.6), "runs/cmp_sft_more": record(10, 0.6),
                        **{f"runs/cmp_{s}": record(10, 0.9) for s in ("grpo", "reinforce", "ppo", "sft_rl_mixed")}}}
    if curves:  # the optional per-step records, one metrics.jsonl-like list per run
        compare["curves"] = {"runs/cmp_grpo": [{"step": s, "sampled_accuracy": 0.6 + 0.03 * s} for s in range(1, 11)],
                             "runs/cmp_sft": [{"step": s, "eval_accuracy": s / 30} for s in (10, 20, 30)]}
    return compare


def test_learning_curve_points_place_each_run_on_its_scripts_axis():
    compare = synthetic_compare(curves=False)
    grpo = learning_curve_points(compare, "grpo")
    assert [(p.x, p.run) for p in grpo] == [(0, "runs/cmp_sft"), (10, "runs/cmp_grpo")]  # RL starts from SFT
    sft = learning_curve_points(compare, "sft")
    assert [(p.x, p.run) for p in sft] == [(30, "runs/cmp_sft"), (40, "runs/cmp_sft_more")]  # 10 more SFT steps
    del compare["runs"]["runs/cmp_ppo"]
    with pytest.raises(ValueError, match="runs/cmp_ppo"):
        learning_curve_points(compare, "ppo")


@pytest.mark.parametrize("curves, scripts", [(False, None), (True, ["sft", "grpo"])],
                         ids=["eval-points-only", "with-per-step-records"])
def test_plot_learning_curves_writes_one_png_per_script(tmp_path, curves, scripts):
    pytest.importorskip("matplotlib")
    path = tmp_path / "compare.json"
    path.write_text(json.dumps(synthetic_compare(curves)))
    written = plot_learning_curves(str(path), str(tmp_path / "figs"), scripts)
    assert [os.path.basename(p) for p in written] == [f"curve_{s}.png" for s in scripts or SCRIPTS]
    for p in written:
        data = open(p, "rb").read()
        assert data[:8] == PNG_MAGIC
        assert len(data) > 10_000  # axes, points and text, not an empty canvas


def test_cli_draws_the_token_diagnostic_of_runs_that_log_it(tmp_path):
    pytest.importorskip("matplotlib")
    import torch

    from common.tracking import token_diagnostics

    g = torch.Generator().manual_seed(0)
    records = [{"step": s, **token_diagnostics(torch.log(torch.rand(8, 6, generator=g)), torch.randn(8, generator=g),
                                               torch.ones(8, 6))} for s in range(1, 6)]
    run = write_run(tmp_path / "grpo", records)
    out = tmp_path / "tokens.png"
    done = subprocess.run([sys.executable, "-m", "common.plot", run, "--out", str(tmp_path / "c.png"), "--passk-out",
                           str(tmp_path / "p.png"), "--tokens-out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "token diagnostic written" in done.stdout
    assert out.read_bytes()[:8] == PNG_MAGIC and out.stat().st_size > 10_000
