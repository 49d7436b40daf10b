"""N processes under torchrun (gloo, CPU) take the same optimizer step as one process on the same global batch.

Each test launches `python -m torch.distributed.run --nproc_per_node N tests/dist_driver.py`, which
runs a script with sampling made a function of the prompt alone (so 1 and 2 processes draw the same
completions for the same global batch) and saves every gradient before the optimizer applies it.
A per-rank normaliser (token counts, the batch std, a token ranking) would make the 2-process
gradient differ: that is the multi-GPU version of the micro-batch accumulation bug.
"""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from common.tracking import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = ["--no-tensorboard", "--num-eval-prompts", "4", "--num-eval-samples", "2", "--eval-every", "0"]


def torchrun(nproc, out_dir, script, *flags, env=None, check=True):
    os.makedirs(out_dir, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           os.path.join(REPO, "tests", "dist_driver.py"), str(out_dir), script, *flags]
    run_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO, **(env or {})}
    done = subprocess.run(cmd, cwd=out_dir, capture_output=True, text=True, timeout=300, env=run_env)
    if check:
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def gradients(out_dir, rank=0):
    return torch.load(os.path.join(out_dir, f"grads_rank{rank}.pt"))


def assert_same_step(one, two, run_name, atol=1e-6):
    """The 2-process run's gradients (both ranks) and weights equal the 1-process run's."""
    g1, g2, g2b = gradients(one), gradients(two), gradients(two, 1)
    assert len(g1) == len(g2) > 0
    for step, (a, b, c) in enumerate(zip(g1, g2, g2b)):
        scale = max(x.abs().max().item() for x in a)
        assert scale > 0
        for i, (x, y, z) in enumerate(zip(a, b, c, strict=True)):
            assert torch.allclose(x, y, atol=atol * scale, rtol=1e-4), (step, i, (x - y).abs().max().item(), scale)
            assert torch.equal(y, z), "ranks disagree on the averaged gradient"
    # Weights after the step. AdamW's first update is lr * g / (|g| + 1e-8): where |g| is ~1e-8, float noise
    # of 1e-10 in g moves the weight by a visible fraction of lr. So compare where |g| > 1e-6 (the policy's
    # gradients come first in the saved list, in named_parameters order).
    w1 = load_file(os.path.join(one, "runs", run_name, "model.safetensors"))
    w2 = load_file(os.path.join(two, "runs", run_name, "model.safetensors"))
    names = [n for n, p in AutoModelForCausalLM.from_pretrained(os.path.join(one, "runs", run_name)).named_parameters()]
    compared = 0
    for name, g in zip(names, g1[0]):
        if name in w1 and g.shape == w1[name].shape:
            clear = g.abs() > 1e-6
            assert torch.allclose(w1[name][clear], w2[name][clear], atol=1e-6, rtol=0), name
            compared += int(clear.sum())
    assert compared > 0


def one_vs_two(tmp_path, script, *flags, run_name="dist"):
    one, two = tmp_path / "one", tmp_path / "two"
    torchrun(1, one, script, "--run-name", run_name, *QUICK, *flags)
    torchrun(2, two, script, "--run-name", run_name, *QUICK, *flags)
    assert_same_step(one, two, run_name)
    return one, two


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_grpo_two_processes_take_the_one_process_step(sft_run, tmp_path, agg):
    one, two = one_vs_two(tmp_path, "grpo", "--model", sft_run[0], "--total-steps", "1", "--num-prompts", "4",
                          "--loss-agg", agg, "--beta", "0.04", "--micro-batch-size", "8")
    # the logged loss is the global one, not rank 0's share
    loss1 = read_metrics(os.path.join(one, "runs", "dist"))[0]["loss"]
    loss2 = read_metrics(os.path.join(two, "runs", "dist"))[0]["loss"]
    assert loss1 == pytest.approx(loss2, abs=1e-6)


def test_grpo_batch_level_statistics_are_global(sft_run, tmp_path):
    """The batch std (--scale-rewards batch) and the token rankings (forking tokens, KL-Cov) span all ranks."""
    one_vs_two(tmp_path, "grpo", "--model", sft_run[0], "--total-steps", "1", "--num-prompts", "4",
               "--scale-rewards", "batch", "--top-entropy-rho", "0.2", "--cov-penalty", "kl_cov",
               "--num-epochs", "2", "--loss-agg", "token-mean")  # KL-Cov acts once the policy moves


def test_sft_two_processes_take_the_one_process_step(tmp_path):
    """Each rank takes its slice of the batch; the token count that normalises the loss is global."""
    one_vs_two(tmp_path, "sft", "--total-steps", "2", "--batch-size", "16", "--micro-batch-size", "4",
               "--tiny-hidden-size", "32", "--save-every", "0")


@pytest.mark.parametrize("flags", [["--baseline", "rloo"], ["--baseline", "reinforce++", "--beta", "0.01"]],
                         ids=["rloo", "reinforce++"])
def test_reinforce_two_processes_take_the_one_process_step(sft_run, tmp_path, flags):
    """REINFORCE++ whitens its returns over the whole batch: the mean and variance are all-reduced."""
    one_vs_two(tmp_path, "reinforce", "--model", sft_run[0], "--total-steps", "1", "--num-prompts", "4",
               "--loss-agg", "token-mean", *flags)


@pytest.mark.parametrize("value_model", ["separate", "shared"])
def test_ppo_two_processes_take_the_one_process_step(sft_run, tmp_path, value_model):
    """PPO's whitened advantages and the critic's gradient (DDP-wrapped Critic) match the 1-process run."""
    one_vs_two(tmp_path, "ppo", "--model", sft_run[0], "--total-steps", "1", "--num-prompts", "4",
               "--value-model", value_model, "--beta", "0.05", "--num-epochs", "1")


@pytest.mark.parametrize("mode", ["weighted", "luffy"])
def test_sft_rl_mixed_two_processes_take_the_one_process_step(sft_run, tmp_path, mode):
    """The expert's tokens and the on-policy tokens share global normalisers; gradients are summed over ranks."""
    one_vs_two(tmp_path, "sft_rl_mixed", "--model", sft_run[0], "--mode", mode, "--total-steps", "1",
               "--num-prompts", "4", "--scale-rewards", "batch")


def test_sft_rl_mixed_fsdp_takes_the_one_process_step(sft_run, tmp_path):
    """--fsdp: LUFFY's expert rows run a second forward through the sharded policy in each micro-batch, before
    its one backward; the step is the 1-process one."""
    one, two = tmp_path / "one", tmp_path / "two"
    flags = ["--model", sft_run[0], "--mode", "luffy", "--total-steps", "1", "--num-prompts", "4", "--run-name",
             "dist", *QUICK]
    torchrun(1, one, "sft_rl_mixed", *flags)
    torchrun(2, two, "sft_rl_mixed", *flags, "--fsdp")
    assert_same_step(one, two, "dist")


def test_grpo_fsdp_takes_the_one_process_step(sft_run, tmp_path):
    """--fsdp: weights, gradients and AdamW state sharded over 2 ranks (FSDP2), the reference too; the step
    is the 1-process one, and the checkpoint and final model hold the full weights."""
    one, two = tmp_path / "one", tmp_path / "two"
    flags = ["--model", sft_run[0], "--total-steps", "1", "--num-prompts", "4", "--beta", "0.04",
             "--loss-agg", "token-mean", "--run-name", "dist", *QUICK]
    torchrun(1, one, "grpo", *flags)
    torchrun(2, two, "grpo", *flags, "--fsdp")
    assert_same_step(one, two, "dist")
    AutoModelForCausalLM.from_pretrained(two / "runs" / "dist" / "checkpoint")  # full weights, loadable


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_a_run_killed_under_torchrun_resumes_exactly(sft_run, tmp_path, sharding):
    """2 processes with their own sampling streams: killed at step 3 (no cleanup), resumed from the step-2
    checkpoint, the run logs the same steps and metrics and ends with the same weights as an unbroken run."""
    flags = ["--model", sft_run[0], "--total-steps", "4", "--save-every", "2", "--num-prompts", "4", "--beta",
             "0.04", "--num-minibatches", "2", *QUICK, *(["--fsdp"] if sharding == "fsdp" else [])]
    own = {"DIST_PER_PROMPT_SAMPLING": "0"}
    torchrun(2, tmp_path, "grpo", *flags, "--run-name", "straight", env=own)
    killed = torchrun(2, tmp_path, "grpo", *flags, "--run-name", "resumed", env={**own, "DIST_KILL_AT_STEP": "3"},
                      check=False)
    assert killed.returncode != 0
    torchrun(2, tmp_path, "grpo", *flags, "--run-name", "resumed", "--resume", env=own)
    straight, resumed = read_metrics(tmp_path / "runs" / "straight"), read_metrics(tmp_path / "runs" / "resumed")
    assert [r["step"] for r in resumed if "event" not in r] == [1, 2, 3, 4]
    keys = ("reward", "loss", "completion_length", "grad_norm", "entropy")
    assert [[r[k] for k in keys] for r in resumed[:4]] == [[r[k] for k in keys] for r in straight[:4]]
    w1 = load_file(tmp_path / "runs" / "straight" / "model.safetensors")
    w2 = load_file(tmp_path / "runs" / "resumed" / "model.safetensors")
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def test_a_world_size_that_does_not_divide_the_batch_is_one_line(sft_run, tmp_path):
    done = torchrun(2, tmp_path, "grpo", "--model", sft_run[0], "--num-prompts", "3", *QUICK, check=False)
    assert done.returncode != 0
    assert "error: --num-prompts: 3 is not divisible by --nproc-per-node 2" in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr.split("error: --num-prompts")[0][-200:]


def test_torchrun_grpo_learns_like_one_process(sft_run, tmp_path):
    """The real grpo.py (own sampling per rank) under 2 processes: the same bar as the 1-process test
    (tests/test_scripts.py::test_grpo_learns_beyond_the_teacher)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(REPO, "grpo.py"), "--model", sft_run[0], "--total-steps", "60", "--no-tensorboard",
           "--num-eval-prompts", "100", "--num-eval-samples", "8"]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    records = read_metrics(tmp_path / "runs" / "grpo")
    steps, result = [r for r in records if "event" not in r], records[-1]
    assert [r["step"] for r in steps] == list(range(1, 61))  # rank 0 alone writes, once per step
    first, last = steps[:5], steps[-5:]
    assert sum(r["sampled_accuracy"] for r in last) / 5 > sum(r["sampled_accuracy"] for r in first) / 5 + 0.1
    assert result["pass@1"] > sft_run[1]["pass@1"] + 0.15
    assert result["accuracy"] >= sft_run[1]["accuracy"] - 0.1


def test_torchrun_grpo_with_vllm_keeps_one_synced_engine_per_rank(sft_run, tmp_path):
    """--rollout vllm under torchrun: each rank builds its own in-process engine (external_launcher) and syncs
    it from its own rank's weights. After the first optimizer step the sampler's logprobs still equal the
    trainer's (the logged mismatch is the mean over both ranks: one stale engine would show)."""
    pytest.importorskip("vllm")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(REPO, "grpo.py"), "--model", sft_run[0], "--rollout", "vllm", "--total-steps", "3",
           "--num-prompts", "4", "--learning-rate", "1e-3", *QUICK]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [r for r in read_metrics(tmp_path / "runs" / "grpo") if "event" not in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(r["grad_norm"] > 0 for r in steps)
    assert all(r["mismatch_mean_abs"] < 1e-5 and r["mismatch_max_ratio"] < 1.001 for r in steps[1:]), steps


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_grpo_on_the_tool_task_takes_the_one_process_step(tool_sft, tmp_path, fsdp):
    """Multi-turn rollouts: each rank runs its own tool loop, the normalisers count every rank's policy tokens
    (not the observations), and under FSDP2 (collective generate steps) a rank whose rows are done keeps turning
    until every rank's are, instead of hanging."""
    one, two = tmp_path / "one", tmp_path / "two"
    flags = ["--model", tool_sft, "--task", "tool_calc", "--total-steps", "1", "--num-prompts", "4", "--beta", "0.04",
             "--loss-agg", "token-mean", "--run-name", "dist", *QUICK]
    torchrun(1, one, "grpo", *flags)
    torchrun(2, two, "grpo", *flags, *(["--fsdp"] if fsdp else []))
    assert_same_step(one, two, "dist")
    record = read_metrics(os.path.join(two, "runs", "dist"))[0]
    assert record["tool/tool_calls"] > 0  # the loop ran on the ranks
