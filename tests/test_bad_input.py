"""Known bad input, each script: one line `error: --flag ...`, never a traceback (issue 23).

The counterpart of tests/test_fuzz_flags.py: a few fixed faults every script must reject by name,
and `--resume` on a run folder another script wrote (same --run-name by accident), end to end.
"""

import dataclasses
import importlib
import json
import os
import shutil

import pytest
import torch
from script_runner import SCRIPTS, get_runner, tiny_sft_model

from common.checkpoint import checkpoint_script, resume_from, save_checkpoint
from common.models import build_tiny_model

QUICK = ["--total-steps", "2", "--eval-every", "0", "--num-eval-prompts", "2", "--num-eval-samples", "1",
         "--no-tensorboard"]
SIZES = {"sft.py": ["--batch-size", "4", "--micro-batch-size", "4"]}  # the RL scripts: 2 prompts x 2 samples

# (flag, value, *more flags): wrong for every script that has the flag
BAD = [
    ("--num-eval-prompts", "0"),
    ("--num-eval-samples", "-1"),
    ("--micro-batch-size", "0"),
    ("--learning-rate", "nan"),
    ("--learning-rate", "-1"),
    ("--max-grad-norm", "inf"),
    ("--total-steps", "0"),
    ("--num-prompts", "0"),
    ("--group-size", "0"),
    ("--batch-size", "0"),
    ("--temperature", "0"),
    ("--save-every", "-1"),
    ("--eval-every", "-1"),
    ("--lora-rank", "-1"),
    ("--run-name", "../outside"),
    ("--device", "nope"),
    ("--device", "cuda:99"),  # no CUDA here, or fewer GPUs: not a traceback from model.to(device)
    ("--lora-alpha", "inf", "--lora-rank", "2"),  # a NaN model from the start: torch.multinomial crashed
    ("--dtype", "float16"),  # NaN weights after the first AdamW step: torch.multinomial crashed at the next sample
]


def _model_flags(script: str) -> list[str]:
    return [] if script == "sft.py" else ["--model", tiny_sft_model()]


def _has(script: str, flag: str) -> bool:
    fields = {f.name for f in dataclasses.fields(importlib.import_module(script.removesuffix(".py")).Args)}
    return flag[2:].replace("-", "_") in fields


def assert_one_error_line(out, *names: str):
    """Failed, no traceback, and stderr holds exactly one `error:` line: the last, naming each of names."""
    text = out.stdout + out.stderr
    assert out.returncode not in (0, None) and not out.timed_out, text[-2000:]
    assert "Traceback" not in text, text[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    last = out.stderr.strip().splitlines()[-1]
    assert len(errors) == 1 and last == errors[0], out.stderr[-2000:]
    assert all(name in last for name in names), last
    return last


@pytest.mark.parametrize("script", SCRIPTS)
def test_known_bad_values_exit_with_one_line_naming_the_flag(script, tmp_path):
    checked = 0
    for flag, value, *more in BAD:
        if not _has(script, flag):
            continue
        out = get_runner().run(script, [*_model_flags(script), *QUICK[:2], flag, value, *more],
                               cwd=str(tmp_path / flag), timeout=300)
        last = assert_one_error_line(out, flag)
        assert last.startswith("error: " + flag), last
        checked += 1
    assert checked >= 10


# ---- --resume on a folder another script wrote -----------------------------------------------------


def _quick_run(script, cwd, *flags):
    sizes = SIZES.get(script, ["--num-prompts", "2", "--group-size", "2"])
    return get_runner().run(script, [*_model_flags(script), *QUICK, *sizes, *flags], cwd=str(cwd), timeout=300)


@pytest.mark.parametrize("other", ["reinforce.py", "ppo.py", "sft_rl_mixed.py"])
def test_resume_of_another_scripts_run_names_both_scripts(tmp_path, other):
    """`python grpo.py` then `python reinforce.py --run-name grpo --resume`: one line, both names, the way out."""
    first = _quick_run("grpo.py", tmp_path, "--run-name", "shared")
    assert first.returncode == 0, first.stderr[-3000:]
    assert json.load(open(tmp_path / "runs/shared/checkpoint/args.json"))["script"] == "grpo"
    out = _quick_run(other, tmp_path, "--run-name", "shared", "--resume")
    last = assert_one_error_line(out, "error: --resume:", "grpo.py", other, "--run-name")
    assert "runs/shared/checkpoint" in last


def test_resume_of_an_sft_run_by_grpo_is_refused(tmp_path):
    shutil.copytree(tiny_sft_model(), tmp_path / "runs" / "sft")
    out = _quick_run("grpo.py", tmp_path, "--run-name", "sft", "--resume")
    assert_one_error_line(out, "error: --resume:", "sft.py", "grpo.py")


def test_resume_by_the_same_script_still_works(tmp_path):
    assert _quick_run("grpo.py", tmp_path, "--run-name", "again").returncode == 0
    out = _quick_run("grpo.py", tmp_path, "--run-name", "again", "--resume", "--total-steps", "3")
    assert out.returncode == 0 and "resumed from runs/again/checkpoint at step 2" in out.stdout, out.stderr[-3000:]


@pytest.mark.parametrize("script, key", [("sft.py", "data_position"), ("grpo.py", "data_position"),
                                         ("reinforce.py", "ema_baseline"), ("ppo.py", "beta"),
                                         ("ppo.py", "value_model"), ("sft_rl_mixed.py", "data_position")])
def test_resume_of_a_checkpoint_without_a_key_names_the_key(tmp_path, script, key):
    """The script matches but the checkpoint's extra state lacks a value it reads (an older version of the
    script saved it): one line naming the key, not a KeyError."""
    first = _quick_run(script, tmp_path, "--run-name", "old")
    assert first.returncode == 0, first.stderr[-3000:]
    path = tmp_path / "runs/old/checkpoint/trainer_state.pt"
    state = torch.load(path, weights_only=False)
    del state["extra"][key]
    torch.save(state, path)
    out = _quick_run(script, tmp_path, "--run-name", "old", "--resume", "--total-steps", "3")
    assert_one_error_line(out, "error: --resume:", repr(key), script)


# ---- resume_from itself -------------------------------------------------------------------------------


def _saved_run(tokenizer, run_dir, script: str | None, extra: dict):
    model = build_tiny_model(tokenizer, seed=0).to(torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    os.makedirs(run_dir, exist_ok=True)
    if script is not None:
        with open(os.path.join(run_dir, "args.json"), "w") as f:
            json.dump({"script": script, "seed": 1}, f)
    save_checkpoint(run_dir, model, tokenizer, optimizer, None, step=2, extra=extra)
    return model, optimizer


def test_resume_from_refuses_another_scripts_checkpoint(tokenizer, tmp_path):
    run_dir = str(tmp_path / "run")
    model, optimizer = _saved_run(tokenizer, run_dir, "grpo", {"data_position": 4})
    assert checkpoint_script(os.path.join(run_dir, "checkpoint")) == "grpo"
    with pytest.raises(SystemExit) as e:
        resume_from(run_dir, model, optimizer, script="ppo")
    message = str(e.value.code)
    assert message.startswith("error: --resume:") and "\n" not in message
    assert "grpo.py" in message and "ppo.py" in message and "--run-name" in message
    assert resume_from(run_dir, model, optimizer, script="grpo") == (2, {"data_position": 4})


def test_resume_from_names_a_missing_extra_key(tokenizer, tmp_path):
    run_dir = str(tmp_path / "run")
    model, optimizer = _saved_run(tokenizer, run_dir, "reinforce", {"data_position": 4})
    with pytest.raises(SystemExit) as e:
        resume_from(run_dir, model, optimizer, script="reinforce", expect=("data_position", "ema_baseline"))
    message = str(e.value.code)
    assert message.startswith("error: --resume:") and "'ema_baseline'" in message and "\n" not in message
    assert "reinforce.py" in message and "without --resume" in message


def test_resume_from_a_folder_that_names_no_script_is_not_checked(tokenizer, tmp_path):
    """Runs written before args.json had "script" (or by hand) resume as before."""
    run_dir = str(tmp_path / "run")
    model, optimizer = _saved_run(tokenizer, run_dir, None, {"data_position": 4})
    assert checkpoint_script(os.path.join(run_dir, "checkpoint")) is None
    assert resume_from(run_dir, model, optimizer, script="ppo", expect=("data_position",))[0] == 2


def test_the_checkpoints_own_args_json_wins_over_the_run_folders(tokenizer, tmp_path):
    """A new script started (without --resume) in the folder rewrites args.json before its first save;
    the checkpoint still there is the old script's, and its copy of args.json says so."""
    run_dir = str(tmp_path / "run")
    model, optimizer = _saved_run(tokenizer, run_dir, "grpo", {"data_position": 4})
    with open(os.path.join(run_dir, "args.json"), "w") as f:
        json.dump({"script": "ppo"}, f)
    with pytest.raises(SystemExit, match=r"written by grpo.py \(its args.json\), not ppo.py"):
        resume_from(run_dir, model, optimizer, script="ppo")
