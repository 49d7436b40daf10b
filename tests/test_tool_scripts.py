"""The tool task end to end: every RL script runs multi-turn rollouts on tool_calc, GRPO learns to call the tool,
a stopped run resumes exactly, and the tool flags fail with one line on bad input.

One short SFT model on tool_calc serves every test (the session fixture `tool_sft` of conftest.py, ~1 min): its
teacher calls the tool in 30% of the demonstrations, so its samples call sometimes and the multi-turn path is
exercised from the first step.
The unit tests of the loop, the masks and the math are in tests/test_tools.py; HF vs vLLM in tests/test_vllm.py.
"""

import importlib
import os
import subprocess
import sys

import pytest
import torch

from common.tracking import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--task", "tool_calc", "--num-prompts", "4", "--group-size", "8", "--num-eval-prompts", "16",
         "--num-eval-samples", "2", "--eval-every", "0", "--no-tensorboard"]


def run(script: str, model: str, *flags: str):
    module = importlib.import_module(script)
    return module.main(module.parse_args(["--model", model, *SMALL, *flags]))


def step_records(run_dir: str) -> list[dict]:
    return [r for r in read_metrics(run_dir) if "event" not in r]


@pytest.mark.parametrize("script,flags", [("grpo", []), ("reinforce", []), ("ppo", []),
                                          ("sft_rl_mixed", ["--mode", "luffy"])])
def test_every_rl_script_runs_the_tool_task(tool_sft, tmp_path, monkeypatch, script, flags):
    monkeypatch.chdir(tmp_path)
    run(script, tool_sft, "--total-steps", "2", "--run-name", "tools", *flags)
    steps, final = step_records("runs/tools"), read_metrics("runs/tools")[-1]
    assert len(steps) == 2
    for record in steps:
        for key in ("tool/turns", "tool/tool_calls", "tool/tool_errors", "tool/call_rate",
                    "tool/observation_token_share", "tool/accuracy_with_call", "tool/accuracy_without_call"):
            assert key in record, key
    assert sum(r["tool/tool_calls"] for r in steps) > 0  # the SFT model calls: observations were in the context
    assert all(0 < r["tool/observation_token_share"] < 0.6 for r in steps if r["tool/tool_calls"] > 0)
    assert final["event"] == "eval" and 0 <= final["tool_call_rate"] <= 1
    assert {"tool_call_rate/mul", "tool_call_rate/add", "pass@1/mul", "pass@1/add", "pass@1_with_call",
            "pass@1_without_call/mul", "pass@1_with_call/add"} <= set(final)
    # pass@1 is the mix of the samples that called and those that did not, weighted by the call rate
    for part in ("", "/mul", "/add"):
        rate, with_call, without = (final[k + part] for k in ("tool_call_rate", "pass@1_with_call",
                                                              "pass@1_without_call"))
        mix = (rate * with_call if with_call is not None else 0) + ((1 - rate) * without if without is not None else 0)
        assert final["pass@1" + part] == pytest.approx(mix, abs=1e-9)


def test_grpo_learns_to_call_the_tool(tool_sft, tmp_path, monkeypatch):
    """On `mul` a call is right and a guess is wrong: within 25 steps GRPO calls more and is right more often."""
    monkeypatch.chdir(tmp_path)
    run("grpo", tool_sft, "--total-steps", "25", "--num-prompts", "16", "--run-name", "learn")
    steps = step_records("runs/learn")
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)
    assert mean(steps[-5:], "tool/call_rate") > mean(steps[:5], "tool/call_rate") + 0.2
    assert mean(steps[-5:], "sampled_accuracy") > mean(steps[:5], "sampled_accuracy") + 0.1
    # a call is what makes `mul` right: completions that call are far more often right than those that do not
    assert mean(steps, "tool/accuracy_with_call") > mean(steps, "tool/accuracy_without_call") + 0.2


def test_grpo_with_vllm_rollouts_runs_the_tool_task(tool_sft, tmp_path, monkeypatch):
    """--rollout vllm: the multi-turn loop on the colocated engine (whole context re-submitted each turn, prefix
    cache on); the sampler's logprobs match the trainer's on the policy's tokens, and the weights sync each step."""
    pytest.importorskip("vllm")
    monkeypatch.chdir(tmp_path)
    run("grpo", tool_sft, "--total-steps", "3", "--rollout", "vllm", "--run-name", "vllm")
    steps = step_records("runs/vllm")
    assert sum(r["tool/tool_calls"] for r in steps) > 0
    assert all(r["mismatch_mean_abs"] < 1e-4 and r["mismatch_max_ratio"] < 1.001 for r in steps)


def test_tool_call_cost_is_a_reward_term(tool_sft, tmp_path, monkeypatch):
    """R_i = correct - cost * calls: the logged term is -cost x the calls per completion, and the reward is the sum."""
    monkeypatch.chdir(tmp_path)
    run("grpo", tool_sft, "--total-steps", "2", "--tool-call-cost", "0.25", "--run-name", "cost")
    for r in step_records("runs/cost"):
        assert r["reward/call_cost"] == pytest.approx(-0.25 * r["tool/tool_calls"], abs=1e-6)
        assert r["reward"] == pytest.approx(r["reward/correct"] + r["reward/call_cost"], abs=1e-6)


def test_grpo_resume_on_the_tool_task_is_exact(tool_sft, tmp_path, monkeypatch, interrupt_at):
    monkeypatch.chdir(tmp_path)
    flags = ["--total-steps", "4", "--save-every", "2"]
    run("grpo", tool_sft, *flags, "--run-name", "straight")
    with monkeypatch.context() as m:
        interrupt_at(m, 3)
        with pytest.raises(KeyboardInterrupt):
            run("grpo", tool_sft, *flags, "--run-name", "resumed")
    run("grpo", tool_sft, *flags, "--run-name", "resumed", "--resume")
    straight, resumed = step_records("runs/straight"), step_records("runs/resumed")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    keys = ("reward", "loss", "completion_length", "grad_norm", "tool/tool_calls", "tool/observation_token_share")
    assert [[r[k] for k in keys] for r in resumed] == [[r[k] for k in keys] for r in straight]
    from safetensors.torch import load_file

    a, b = load_file("runs/straight/model.safetensors"), load_file("runs/resumed/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("flags,message", [
    (["--max-turns", "2"], "error: --max-turns 2: task add_noisy has no tool"),
    (["--task", "add_noisy", "--tool-call-cost", "0.1"], "error: --tool-call-cost 0.1: task add_noisy has no tool"),
    (["--task", "tool_calc", "--max-turns", "-1"], "error: --max-turns: must be >= 0"),
])
def test_tool_flags_fail_with_one_line(tmp_path, flags, message):
    out = subprocess.run([sys.executable, os.path.join(REPO, "grpo.py"), "--model", "qwen2-tiny:random", *flags,
                          "--no-tensorboard"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1].startswith(message), out.stderr[-500:]


@pytest.mark.parametrize("script,flags", [("dpo.py", ["--model"]), ("dpo.py", ["--online", "--model"]),
                                          ("reward_model.py", ["--policy"])])
def test_preference_scripts_refuse_the_tool_task_with_one_line(tmp_path, script, flags):
    """Pairs are single-turn texts: a tool task's observations would be trained on as the policy's words."""
    out = subprocess.run([sys.executable, os.path.join(REPO, script), *flags, "qwen2-tiny:random", "--task",
                          "tool_calc", "--no-tensorboard"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1].startswith("error: --task tool_calc: a tool task's"), out.stderr[-500:]
