"""The real scripts, end to end at tiny scale: they learn, resume exactly, and reject bad flags."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import grpo
import sft
from common.evaluation import evaluate
from common.tasks import load_task
from common.tracking import RunLogger, read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUIET = dict(tensorboard=False)


@pytest.fixture(scope="session")
def sft_run(tmp_path_factory):
    """A short SFT run of the default tiny model on the default task (shared by the tests)."""
    root = tmp_path_factory.mktemp("sft")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        result = sft.main(sft.Args(total_steps=400, eval_every=100, save_every=200, num_eval_prompts=100, **QUIET))
    finally:
        os.chdir(cwd)
    return str(root / "runs" / "sft"), result


def test_sft_learns_well_above_chance(sft_run):
    _, result = sft_run
    # chance for a 2-digit sum is ~1%; a noisy teacher is right 60% of the time, and the mode is right
    assert result["accuracy"] > 0.5
    assert 0.2 < result["pass@1"] < 0.8  # sampling follows the noisy teacher
    assert result["pass@8"] > result["pass@1"]


def test_sft_checkpoint_reloads_with_from_pretrained(sft_run):
    run_dir, result = sft_run
    model = AutoModelForCausalLM.from_pretrained(run_dir)
    tokenizer = AutoTokenizer.from_pretrained(run_dir)
    tokenizer.padding_side = "left"
    again = evaluate(model, tokenizer, load_task("add_noisy"), num_prompts=100, num_samples=8,
                     eos_ids=[tokenizer.eos_token_id])
    assert again["accuracy"] == result["accuracy"]  # greedy: the same weights give the same answers
    assert again["pass@8"] == result["pass@8"]  # eval sampling runs under its own seed


def test_metrics_jsonl_contract(sft_run):
    run_dir, _ = sft_run
    records = read_metrics(run_dir)
    steps = [r for r in records if "event" not in r]
    assert [r["step"] for r in steps] == list(range(1, 401))
    assert all("loss" in r and "grad_norm" in r for r in steps)
    assert steps[-1]["loss"] < steps[0]["loss"]
    final = records[-1]
    assert final["event"] == "eval"
    assert {"accuracy", "pass@1", "pass@2", "pass@4", "pass@8"} <= set(final)


def _interrupt_at(monkeypatch, step):
    original = RunLogger.log

    def log(self, s, metrics):
        if s == step and "event" not in metrics:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C during this step
        return original(self, s, metrics)

    monkeypatch.setattr(RunLogger, "log", log)


def _weights(run_dir):
    return AutoModelForCausalLM.from_pretrained(run_dir).state_dict()


def test_sft_resume_continues_exactly(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    small = dict(total_steps=12, save_every=4, eval_every=0, num_eval_prompts=8, num_eval_samples=2,
                 tiny_hidden_size=32, batch_size=32, micro_batch_size=32, **QUIET)
    sft.main(sft.Args(run_name="straight", **small))
    with monkeypatch.context() as m:
        _interrupt_at(m, 11)
        with pytest.raises(KeyboardInterrupt):
            sft.main(sft.Args(run_name="resumed", **small))
    sft.main(sft.Args(run_name="resumed", resume=True, **small))
    straight, resumed = read_metrics("runs/straight"), read_metrics("runs/resumed")
    assert [r["step"] for r in resumed if "event" not in r] == list(range(1, 13))  # each step once
    assert [r["loss"] for r in resumed[:12]] == [r["loss"] for r in straight[:12]]  # same data order
    for name, value in _weights("runs/straight").items():
        assert torch.equal(value, _weights("runs/resumed")[name]), name


def test_sft_gradient_does_not_depend_on_micro_batch_size(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    common = dict(total_steps=2, eval_every=0, num_eval_prompts=4, num_eval_samples=1, batch_size=64, **QUIET)
    sft.main(sft.Args(run_name="mb64", micro_batch_size=64, **common))
    sft.main(sft.Args(run_name="mb16", micro_batch_size=16, **common))
    a, b = read_metrics("runs/mb64")[:2], read_metrics("runs/mb16")[:2]
    for x, y in zip(a, b):  # grad_norm is measured before clipping: it sees the whole gradient
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)


def _run(script, *flags, cwd):
    return subprocess.run([sys.executable, os.path.join(REPO, script), *flags], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize(
    "script, flags, expected",
    [
        ("sft.py", ["--batch-size", "100", "--micro-batch-size", "32"], "--batch-size"),
        ("sft.py", ["--task", "nope"], "--task"),
        ("sft.py", ["--model", "./missing-folder"], "--model"),
        ("grpo.py", ["--model", "runs/sft"], "python sft.py"),
        ("grpo.py", ["--preset", "nonsense"], "--preset"),
        ("grpo.py", ["--group-size", "1"], "--group-size"),
        ("grpo.py", ["--num-prompts", "3", "--num-minibatches", "2"], "--num-minibatches"),
    ],
)
def test_bad_flags_exit_with_one_line_naming_the_flag(tmp_path, script, flags, expected):
    out = _run(script, *flags, cwd=tmp_path)
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert "Traceback" not in out.stderr
    assert expected in last and last.startswith("error:"), out.stderr[-2000:]


# ------------------------------------------------------------------------------------------
# grpo.py
# ------------------------------------------------------------------------------------------


def _grpo(model_dir, *flags):
    args = grpo.parse_args(["--model", model_dir, "--no-tensorboard", "--num-eval-prompts", "16",
                            "--num-eval-samples", "2", *flags])
    return grpo.main(args)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_grpo_gradient_does_not_depend_on_micro_batch_size(sft_run, tmp_path, monkeypatch, agg):
    monkeypatch.chdir(tmp_path)
    flags = ["--total-steps", "1", "--num-prompts", "8", "--loss-agg", agg]
    _grpo(sft_run[0], *flags, "--run-name", "mb64", "--micro-batch-size", "64")
    _grpo(sft_run[0], *flags, "--run-name", "mb8", "--micro-batch-size", "8")
    _grpo(sft_run[0], *flags, "--run-name", "mb4", "--micro-batch-size", "4")  # < G: prompts not shared
    a, b = read_metrics("runs/mb64")[0], read_metrics("runs/mb8")[0]
    c = read_metrics("runs/mb4")[0]
    assert c["loss"] == pytest.approx(a["loss"], abs=1e-5)
    assert c["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    assert a["reward"] == b["reward"]  # same seed, same rollouts
    assert a["grad_norm"] > 0
    assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


PRESETS_AND_KNOBS = [
    ["--preset", "dr_grpo"],
    ["--preset", "dapo"],
    ["--preset", "gspo"],
    ["--preset", "cispo"],
    ["--num-epochs", "2", "--num-minibatches", "2", "--dual-clip-c", "3"],
    ["--cov-penalty", "clip_cov", "--clip-cov-ratio", "0.05"],
    ["--cov-penalty", "kl_cov"],
    ["--top-entropy-rho", "0.2", "--ent-coef", "0.01"],
    ["--mismatch-correction", "tis"],
    ["--mismatch-correction", "icepop", "--kl-estimator", "k2", "--mask-truncated"],
    ["--scale-rewards", "batch", "--format-weight", "0.5", "--overlong-cache-len", "2"],
]


@pytest.mark.parametrize("flags", PRESETS_AND_KNOBS, ids=lambda f: " ".join(f))
def test_every_preset_and_knob_runs(sft_run, tmp_path, monkeypatch, flags):
    monkeypatch.chdir(tmp_path)
    result = _grpo(sft_run[0], "--total-steps", "2", "--num-prompts", "8", *flags)
    steps = [r for r in read_metrics("runs/grpo") if "event" not in r]
    assert len(steps) == 2 and all(r["grad_norm"] is not None for r in steps if "skipped" not in r)
    assert 0 <= result["accuracy"] <= 1


def test_grpo_resume_continues_exactly(sft_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    flags = ["--total-steps", "6", "--save-every", "2", "--num-prompts", "4"]
    _grpo(sft_run[0], *flags, "--run-name", "straight")
    with monkeypatch.context() as m:
        _interrupt_at(m, 5)
        with pytest.raises(KeyboardInterrupt):
            _grpo(sft_run[0], *flags, "--run-name", "resumed")
    _grpo(sft_run[0], *flags, "--run-name", "resumed", "--resume")
    straight, resumed = read_metrics("runs/straight"), read_metrics("runs/resumed")
    assert [r["step"] for r in resumed if "event" not in r] == list(range(1, 7))
    keys = ("reward", "loss", "completion_length")
    assert [[r[k] for k in keys] for r in resumed[:6]] == [[r[k] for k in keys] for r in straight[:6]]
    with open("runs/resumed/checkpoint/trainer_state.pt", "rb"):
        state = torch.load("runs/resumed/checkpoint/trainer_state.pt", weights_only=False)
    assert state["step"] == 6 and state["extra"]["data_position"] == 6 * 4


def test_grpo_learns_beyond_the_teacher(sft_run, tmp_path, monkeypatch):
    """From the SFT checkpoint, sampled accuracy rises well above the noisy teacher's ~60%.

    (The strict "greedy does not fall" claim is measured on the default 1200-step SFT model
    in the README; this short 400-step model's greedy answers wobble by a few points on 100
    prompts while GRPO sharpens it, so here greedy must merely stay within 0.1.)"""
    monkeypatch.chdir(tmp_path)
    before = sft_run[1]
    result = _grpo(sft_run[0], "--total-steps", "60", "--num-eval-prompts", "100", "--num-eval-samples", "8")
    steps = [r for r in read_metrics("runs/grpo") if "event" not in r]
    first, last = steps[:5], steps[-5:]
    assert sum(r["sampled_accuracy"] for r in last) / 5 > sum(r["sampled_accuracy"] for r in first) / 5 + 0.1
    assert result["pass@1"] > before["pass@1"] + 0.15
    assert result["accuracy"] >= before["accuracy"] - 0.1  # greedy does not collapse
    print(json.dumps({"sft": before, "grpo": result}))


def test_grpo_learns_with_vllm_rollouts_like_hf(sft_run, tmp_path, monkeypatch):
    """--rollout vllm: the same learning criterion as the HF path, and the sampler matches the trainer."""
    pytest.importorskip("vllm")
    monkeypatch.chdir(tmp_path)
    before = sft_run[1]
    result = _grpo(sft_run[0], "--rollout", "vllm", "--total-steps", "60", "--num-eval-prompts", "100",
                   "--num-eval-samples", "8")
    steps = [r for r in read_metrics("runs/grpo") if "event" not in r]
    first, last = steps[:5], steps[-5:]
    assert sum(r["sampled_accuracy"] for r in last) / 5 > sum(r["sampled_accuracy"] for r in first) / 5 + 0.1
    assert result["pass@1"] > before["pass@1"] + 0.15
    assert max(r["mismatch_mean_abs"] for r in steps) < 1e-4  # synced every step: sampler == trainer
    assert all(r["rollout_staleness"] == 0 for r in steps)
