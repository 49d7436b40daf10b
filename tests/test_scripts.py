"""The real scripts, end to end at tiny scale: they learn, resume exactly, and reject bad flags."""

import json
import math
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
from common.tracking import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUIET = dict(tensorboard=False)


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


def _weights(run_dir):
    return AutoModelForCausalLM.from_pretrained(run_dir).state_dict()


def test_sft_resume_continues_exactly(tmp_path, monkeypatch, interrupt_at):
    monkeypatch.chdir(tmp_path)
    small = dict(total_steps=12, save_every=4, eval_every=0, num_eval_prompts=8, num_eval_samples=2,
                 tiny_hidden_size=32, batch_size=32, micro_batch_size=32, **QUIET)
    sft.main(sft.Args(run_name="straight", **small))
    with monkeypatch.context() as m:
        interrupt_at(m, 11)
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
        ("grpo.py", ["--device", "nope"], "--device"),
        # knob pairs that would silently drop one of the two
        ("grpo.py", ["--policy-loss", "cispo", "--cov-penalty", "kl_cov"], "cispo and --cov-penalty kl_cov"),
        ("grpo.py", ["--policy-loss", "sapo", "--cov-penalty", "kl_cov"], "sapo and --cov-penalty kl_cov"),
        ("grpo.py", ["--policy-loss", "cispo", "--dual-clip-c", "3"], "--dual-clip-c"),
        ("grpo.py", ["--cov-penalty", "kl_cov", "--dual-clip-c", "3"], "--dual-clip-c"),
        ("grpo.py", ["--sync-every", "2"], "--sync-every"),
    ],
)
def test_bad_flags_exit_with_one_line_naming_the_flag(tmp_path, script, flags, expected):
    out = _run(script, *flags, cwd=tmp_path)
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert "Traceback" not in out.stderr
    assert expected in last and last.startswith("error:"), out.stderr[-2000:]


@pytest.mark.parametrize("script", ["sft.py", "grpo.py"])
def test_a_bad_dtype_is_rejected_by_the_parser(tmp_path, script):
    """--dtype is a Literal: tyro names the flag and the choices, no KeyError from deep inside."""
    out = _run(script, "--dtype", "nope", cwd=tmp_path)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "--dtype" in out.stderr and "bfloat16" in out.stderr, out.stderr[-2000:]


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


def _steps(run="grpo"):
    return [r for r in read_metrics(f"runs/{run}") if "event" not in r]


@pytest.mark.parametrize("preset", list(grpo.PRESETS))
def test_every_preset_runs_and_trains(sft_run, tmp_path, monkeypatch, preset):
    monkeypatch.chdir(tmp_path)
    result = _grpo(sft_run[0], "--preset", preset, "--total-steps", "2", "--num-prompts", "8")
    steps = _steps()
    assert len(steps) == 2
    trained = [r for r in steps if not r.get("skipped")]
    assert trained and all(r["grad_norm"] > 0 and math.isfinite(r["loss"]) for r in trained)
    assert {"accuracy", "pass@1", "pass@2"} <= set(result)


def test_top_entropy_rho_keeps_that_fraction_of_tokens(sft_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _grpo(sft_run[0], "--total-steps", "2", "--num-prompts", "8", "--top-entropy-rho", "0.2")
    kept = [r["frac_tokens_kept"] for r in _steps()]
    assert all(abs(k - 0.2) < 0.02 for k in kept), kept  # ceil(0.2 N) of N ~ 240 tokens
    # the ablation: the other 80% (the same first batch, so the two sets partition its tokens)
    _grpo(sft_run[0], "--total-steps", "2", "--num-prompts", "8", "--top-entropy-rho", "0.2", "--entropy-tokens",
          "bottom", "--run-name", "bottom")
    bottom = [r["frac_tokens_kept"] for r in read_metrics("runs/bottom") if "event" not in r]
    assert all(abs(k - 0.8) < 0.02 for k in bottom), bottom
    assert bottom[0] + kept[0] == pytest.approx(1.0, abs=1e-6)


def test_clip_acts_only_when_the_policy_moves_within_a_step(sft_run, tmp_path, monkeypatch):
    """One update per batch: r = 1, nothing is clipped. Several: later minibatches see r != 1."""
    monkeypatch.chdir(tmp_path)
    tight = ["--total-steps", "2", "--num-prompts", "8", "--eps-low", "0.002", "--eps-high", "0.002"]
    _grpo(sft_run[0], *tight, "--run-name", "one")
    _grpo(sft_run[0], *tight, "--run-name", "many", "--num-epochs", "2", "--num-minibatches", "2")
    assert all(r["clip_frac_low"] == 0 and r["clip_frac_high"] == 0 for r in _steps("one"))
    assert all(r["clip_frac_low"] + r["clip_frac_high"] > 0 for r in _steps("many"))


def test_dynamic_sampling_trains_on_groups_with_signal_only(sft_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _grpo(sft_run[0], "--total-steps", "3", "--num-prompts", "8", "--dynamic-sampling", "--run-name", "dapo")
    assert all(r["frac_zero_std_groups_trained"] == 0 for r in _steps("dapo"))
    # with one new token every 2-digit answer is wrong: every group has zero std. Plain GRPO trains on
    # them anyway (zero advantages); dynamic sampling finds nothing to keep and skips the step.
    one_token = ["--total-steps", "2", "--num-prompts", "4", "--max-new-tokens", "1"]
    _grpo(sft_run[0], *one_token, "--run-name", "plain")
    assert all(r["frac_zero_std_groups_trained"] == 1 == r["frac_zero_std_groups"] for r in _steps("plain"))
    _grpo(sft_run[0], *one_token, "--dynamic-sampling", "--max-resample-rounds", "1", "--run-name", "hopeless")
    hopeless = _steps("hopeless")
    assert all(r["skipped"] == 1 and r["loss"] is None and r["frac_zero_std_groups"] == 1 for r in hopeless)
    assert all(r["resample_rounds"] == 1 for r in hopeless)  # it tried once more before giving up


def test_mask_truncated_removes_cut_completions_from_the_gradient(sft_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    short = ["--total-steps", "1", "--num-prompts", "8", "--max-new-tokens", "2", "--beta", "0"]
    _grpo(sft_run[0], *short, "--run-name", "kept")
    _grpo(sft_run[0], *short, "--run-name", "masked", "--mask-truncated")
    kept, masked = _steps("kept")[0], _steps("masked")[0]
    assert kept["frac_truncated"] > 0.9  # a 2-digit answer and its EOS need 3 tokens
    assert kept["grad_norm"] > 0 and masked["grad_norm"] < 1e-6 * kept["grad_norm"] + 1e-12


def test_entropy_bonus_and_reward_terms_show_in_the_loss_and_log(sft_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = ["--total-steps", "1", "--num-prompts", "8", "--beta", "0", "--loss-agg", "token-mean"]
    _grpo(sft_run[0], *base, "--run-name", "plain")
    _grpo(sft_run[0], *base, "--run-name", "bonus", "--ent-coef", "0.1")
    plain, bonus = _steps("plain")[0], _steps("bonus")[0]
    assert bonus["loss"] - plain["loss"] == pytest.approx(-0.1 * plain["entropy"], rel=1e-4)
    _grpo(sft_run[0], "--total-steps", "1", "--num-prompts", "8", "--format-weight", "0.5", "--max-new-tokens", "3",
          "--overlong-cache-len", "1", "--run-name", "terms")
    terms = _steps("terms")[0]
    assert terms["reward"] == pytest.approx(terms["sampled_accuracy"] + 0.5 * terms["reward/format"]
                                            + terms["reward/overlong"], abs=1e-6)
    assert terms["reward/overlong"] < 0  # 3 tokens = L_max: inside the cache window


def test_kl_cov_and_clip_cov_change_the_update(sft_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = ["--total-steps", "1", "--num-prompts", "8", "--num-minibatches", "2", "--beta", "0"]
    _grpo(sft_run[0], *base, "--run-name", "plain")
    _grpo(sft_run[0], *base, "--run-name", "klcov", "--cov-penalty", "kl_cov", "--kl-cov-frac", "0.2")
    _grpo(sft_run[0], *base, "--run-name", "clipcov", "--cov-penalty", "clip_cov", "--clip-cov-frac", "0.05",
          "--clip-cov-bounds", "-100", "100")
    plain, klcov, clipcov = _steps("plain")[0], _steps("klcov")[0], _steps("clipcov")[0]
    assert klcov["loss"] != pytest.approx(plain["loss"], abs=1e-7)  # |logp - logp_old| > 0 in minibatch 2
    assert clipcov["frac_tokens_kept"] < 1 and plain["frac_tokens_kept"] == 1


def test_the_passk_objectives_change_the_update_and_only_it(sft_run, tmp_path, monkeypatch):
    """The same rollout (same seed): --advantage passk / best_of_group change the gradient, not what is sampled."""
    monkeypatch.chdir(tmp_path)
    base = ["--total-steps", "1", "--num-prompts", "8", "--beta", "0"]
    _grpo(sft_run[0], *base, "--run-name", "group")
    _grpo(sft_run[0], *base, "--run-name", "passk", "--advantage", "passk", "--passk-k", "4")
    _grpo(sft_run[0], *base, "--run-name", "best", "--advantage", "best_of_group")
    group, passk, best = _steps("group")[0], _steps("passk")[0], _steps("best")[0]
    assert group["reward"] == passk["reward"] == best["reward"]  # one rollout
    assert group["frac_zero_std_groups"] < 1  # some group has signal: the objectives weigh it differently
    assert len({round(r["grad_norm"], 7) for r in (group, passk, best)}) == 3


def test_sync_every_makes_the_sampler_stale(sft_run, tmp_path, monkeypatch):
    pytest.importorskip("vllm")
    monkeypatch.chdir(tmp_path)
    _grpo(sft_run[0], "--rollout", "vllm", "--sync-every", "2", "--total-steps", "4", "--num-prompts", "4")
    steps = _steps()
    assert [r["rollout_staleness"] for r in steps] == [0, 1, 0, 1]
    assert [r["sync_time"] > 0 for r in steps] == [False, True, False, True]
    assert steps[1]["mismatch_mean_abs"] > 1e-4 > steps[0]["mismatch_mean_abs"]  # stale weights differ


def test_task_mismatch_warns_in_one_line(sft_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _grpo(sft_run[0], "--task", "add", "--total-steps", "1", "--num-prompts", "2")
    warning = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning: --task add")]
    assert len(warning) == 1 and "add_noisy" in warning[0]


def test_a_diverging_run_stops_at_the_first_non_finite_step(sft_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        _grpo(sft_run[0], "--learning-rate", "1e4", "--max-grad-norm", "1e9", "--total-steps", "6", "--save-every", "1",
              "--num-prompts", "4")
    message = str(stop.value)
    assert message.startswith("error: step ") and "stopped before the optimizer applied it" in message
    step = int(message.split()[2].rstrip(":"))
    assert f"runs/grpo/checkpoint (step {step - 1})" in message and "--resume" in message
    assert len(_steps()) == step - 1  # the bad step was never applied nor logged
    with pytest.raises(SystemExit, match="error: step .*: (loss|grad_norm) is"):
        sft.main(sft.Args(run_name="sft_boom", learning_rate=1e4, max_grad_norm=1e9, total_steps=20, eval_every=0,
                          tiny_hidden_size=32, batch_size=16, micro_batch_size=16, **QUIET))


def test_resume_from_a_damaged_checkpoint_names_the_file(sft_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _grpo(sft_run[0], "--total-steps", "2", "--save-every", "1", "--num-prompts", "2")
    weights = "runs/grpo/checkpoint/model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    out = _run("grpo.py", "--model", sft_run[0], "--resume", "--total-steps", "3", "--num-prompts", "2",
               "--no-tensorboard", cwd=tmp_path)
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert last.startswith("error: --resume:") and weights in last and "damaged" in last, out.stderr[-1500:]


def test_grpo_docs_list_every_metric_a_grpo_step_logs(sft_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _grpo(sft_run[0], "--total-steps", "1", "--num-prompts", "2")
    record = _steps()[0]
    with open(os.path.join(REPO, "docs", "grpo.md")) as f:
        page = f.read()
    section = page[page.index("## Logged metrics"):]
    section = section[:section.index("\n## ")]
    for key in record:
        shown = key.split("/")[0] + "/" if "/" in key else key
        assert f"`{shown}" in section, f"docs/grpo.md's Logged metrics does not list {key}"


def test_grpo_resume_continues_exactly(sft_run, tmp_path, monkeypatch, interrupt_at):
    monkeypatch.chdir(tmp_path)
    flags = ["--total-steps", "6", "--save-every", "2", "--num-prompts", "4"]
    _grpo(sft_run[0], *flags, "--run-name", "straight")
    with monkeypatch.context() as m:
        interrupt_at(m, 5)
        with pytest.raises(KeyboardInterrupt):
            _grpo(sft_run[0], *flags, "--run-name", "resumed")
    _grpo(sft_run[0], *flags, "--run-name", "resumed", "--resume")
    straight, resumed = read_metrics("runs/straight"), read_metrics("runs/resumed")
    assert [r["step"] for r in resumed if "event" not in r] == list(range(1, 7))
    keys = ("reward", "loss", "completion_length", "grad_norm")
    assert [[r[k] for k in keys] for r in resumed[:6]] == [[r[k] for k in keys] for r in straight[:6]]
    state = torch.load("runs/resumed/checkpoint/trainer_state.pt", weights_only=False)
    assert state["step"] == 6 and state["extra"]["data_position"] == 6 * 4
    for name, value in _weights("runs/straight").items():
        assert torch.equal(value, _weights("runs/resumed")[name]), name


def test_grpo_learns_beyond_the_teacher(sft_run, tmp_path, monkeypatch):
    """From the SFT checkpoint, sampled accuracy rises well above the noisy teacher's ~60%.

    (The strict "greedy does not fall" claim is measured on the default 1200-step SFT model
    in docs/results.md; this short 400-step model's greedy answers wobble by a few points on 100
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


@pytest.mark.parametrize("script", ["grpo", "reinforce", "ppo", "sft_rl_mixed"])
def test_seed_changes_what_is_sampled_but_not_the_held_out_prompts(script, sft_run, tmp_path, monkeypatch):
    """--seed picks the training-prompt order and the sampling stream; the held-out split every seed is
    evaluated on is the same, so runs with different seeds compare (docs/phenomena.md)."""
    import importlib

    import common.run

    module = importlib.import_module(script)
    monkeypatch.chdir(tmp_path)
    seen = {}

    def recording(name):
        real_generate, real_evaluate = module.generate_and_score, common.run.evaluate

        def generate(engine, tokenizer, task, position, num_prompts, *args, **kwargs):
            rollout = real_generate(engine, tokenizer, task, position, num_prompts, *args, **kwargs)
            seen.setdefault(name, {}).setdefault("completions", []).extend(rollout.completions)
            return rollout

        def evaluate(model, tokenizer, task, num_prompts, *args, **kwargs):
            seen[name]["held_out"] = list(task.test["question"][:num_prompts])
            return real_evaluate(model, tokenizer, task, num_prompts, *args, **kwargs)

        monkeypatch.setattr(module, "generate_and_score", generate)
        monkeypatch.setattr(common.run, "evaluate", evaluate)

    for seed in ("1", "2"):
        recording(seed)
        module.main(module.parse_args(["--model", sft_run[0], "--seed", seed, "--run-name", f"s{seed}", "--total-steps",
                                       "1", "--num-prompts", "8", "--no-tensorboard", "--num-eval-prompts", "8",
                                       "--num-eval-samples", "1", "--eval-every", "0"]))
        monkeypatch.undo()
        monkeypatch.chdir(tmp_path)
    assert seen["1"]["completions"] != seen["2"]["completions"]
    assert seen["1"]["held_out"] == seen["2"]["held_out"] and len(seen["1"]["held_out"]) == 8
    from common.tasks import rows_at

    assert rows_at(1000, 0, 16, 1) != rows_at(1000, 0, 16, 2)  # the prompt order is a function of the seed
