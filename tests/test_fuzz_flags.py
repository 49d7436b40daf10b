"""Fuzz every script's flags as a careless user would: 1-3 flags at edge values, two steps, no traceback.

For each script, hypothesis draws 1 to 3 fields of its `Args` (read at test time with
dataclasses.fields, so a new flag is fuzzed the day it is added) and for each an edge value of its
type: 0, -1, 1e9 for counts; nan, inf, -inf, 0, -1, 1e9 for floats; every choice of a Literal plus an
unknown one; both spellings of a bool; an empty or unknown string. It runs the script on the tiny
model for two steps (tests/script_runner.py) and fails on

    a Python traceback in stdout or stderr, a hang (no exit within FUZZ_TIMEOUT), a crash by signal,
    or a failed exit whose last line is not one `error: ... --flag ...` line (tyro's own parse-error
    box, which names the flag, also passes).

Every run is made and judged; the test fails at the end with all failing command lines.

    FUZZ_EXAMPLES=n   runs per script (default 12: about a minute for the five scripts on 2 CPU cores)
    FUZZ_SEED=s       replay: the same seed draws the same flags (printed by every run of the test). Default:
                      a fresh random seed on a developer's machine (each run explores), a fixed one under
                      CI=true (a submission's CI is reproducible; a new flag is still drawn the day it exists)
    FUZZ_TIMEOUT=t    seconds before a run counts as a hang (default 120)
    FUZZ_VLLM=1       also draw --rollout vllm (an engine start per run: slow)
"""

import dataclasses
import importlib
import itertools
import os
import random
import shutil
import tempfile
import typing

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from script_runner import REPO, SCRIPTS, get_runner, tiny_sft_model

from common.tasks import TASKS

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "12"))
SEED = int(os.environ.get("FUZZ_SEED") or (2024 if os.environ.get("CI") else random.SystemRandom().randrange(2**32)))
TIMEOUT = float(os.environ.get("FUZZ_TIMEOUT", "120"))

# Flags not drawn at all, and why.
SKIP = {
    "track": "logs to Weights & Biases: a network login and files outside the temp folder",
    "wandb_project": "read only with --track",
}
# Counts whose large values make a run legitimately long (1e9 prompts, samples, tokens, layers or batches):
# drawn from small edge values only. value_warmup_steps is ppo.py's count of critic-only batches before step 1.
SMALL = {"total_steps", "num_prompts", "group_size", "batch_size", "max_new_tokens", "num_eval_prompts",
         "num_eval_samples", "num_epochs", "num_minibatches", "max_resample_rounds", "tiny_hidden_size",
         "tiny_num_layers", "lora_rank", "eval_every", "num_pair_prompts", "value_warmup_steps"}
# Values of str flags worth trying beyond "" and an unknown one. No real GPU (--device cuda), no absolute
# or hub paths (a run stays on the CPU, offline and inside its temp folder), no qwen2-tiny:random (its
# BPE model takes 30-120 s for two steps on 2 cores).
STRINGS = {
    "model": ["tiny", "common", "runs", "./missing"],
    "teacher": ["tiny", "common", "./missing"],
    "task": list(TASKS),
    "device": ["cpu", "auto", "cuda:99", "gpu"],
    "run_name": ["a/b", "../up", "a b", "."],
}
EXCLUDED_CHOICES = {"rollout": set() if os.environ.get("FUZZ_VLLM") == "1" else {"vllm"}}
INTS = ["0", "-1", "1", "2", "1000000000"]
SMALL_INTS = ["0", "-1", "1", "2", "3"]
FLOATS = ["0", "-1", "1", "0.5", "1e-09", "1000000000.0", "nan", "inf", "-inf"]
# A quick run: two steps, tiny batches, no periodic evaluation, a small final one. Drawn flags replace these.
BASE = dict(total_steps="2", num_prompts="2", group_size="2", batch_size="4", micro_batch_size="4",
            eval_every="0", num_eval_prompts="2", num_eval_samples="1", tensorboard=False, tiny_hidden_size="32",
            num_pair_prompts="8")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def values(name: str, kind) -> list[list[str]]:
    """The argv tails to try for field `name` of type `kind`: [[value], ...]; [] for a bool (the flag itself)."""
    origin, inner = typing.get_origin(kind), typing.get_args(kind)
    if kind is bool:
        return [["true"], ["false"]]  # turned into --name / --no-name by `command`
    if origin is typing.Literal:
        return [[str(c)] for c in inner if c not in EXCLUDED_CHOICES.get(name, ())] + [["nope"]]
    if kind is int:
        return [[v] for v in (SMALL_INTS if name in SMALL else INTS)]
    if kind is float:
        return [[v] for v in FLOATS]
    if origin is tuple:
        numbers = SMALL_INTS if inner[0] is int else FLOATS
        return [list(pair) for pair in itertools.product(numbers, repeat=2 if Ellipsis in inner else len(inner))]
    return [[v] for v in ["", "nope", *STRINGS.get(name, [])]]


def fuzzed_fields(args_class) -> dict:
    hints = typing.get_type_hints(args_class)
    return {f.name: hints[f.name] for f in dataclasses.fields(args_class) if f.name not in SKIP}


@st.composite
def flag_sets(draw, fields: dict) -> dict[str, list[str]]:
    names = draw(st.lists(st.sampled_from(sorted(fields)), min_size=1, max_size=3, unique=True))
    return {name: draw(st.sampled_from(values(name, fields[name]))) for name in names}


def command(fields: dict, drawn: dict, model: str | None) -> list[str]:
    """BASE (the fields this script has) with the drawn flags on top, as argv."""
    chosen = {k: v for k, v in BASE.items() if k in fields}
    if model is not None:
        chosen["model"] = model
    chosen.update({k: v[0] == "true" if fields[k] is bool else v for k, v in drawn.items()})
    argv = []
    for name, value in chosen.items():
        if isinstance(value, bool):
            argv.append(flag(name) if value else "--no-" + name.replace("_", "-"))
        else:
            argv += [flag(name), *([value] if isinstance(value, str) else value)]
    return argv


def verdict(result, timeout: float) -> str | None:
    """None when the run passed: it succeeded, or failed with one `error: ... --flag ...` line."""
    if result.timed_out:
        return f"hang: still running after {timeout:.0f} s"
    if "Traceback (most recent call last)" in result.stdout + result.stderr:
        return "traceback"
    if result.returncode == 0:
        return None
    if result.returncode < 0:
        return f"killed by signal {-result.returncode}"
    lines = result.stderr.strip().splitlines()
    last = lines[-1] if lines else ""
    if last.startswith("error:") and "--" in last:
        return None
    if "For full helptext" in result.stderr:  # tyro's parse error (a type or choice it rejects): names the flag
        return None
    return f"exit {result.returncode} without a last line `error: ... --flag ...` (it is {last!r})"


def raised_at(text: str) -> list[str]:
    """The traceback's deepest frame in this repository (the line to fix), with its source line."""
    lines = text.splitlines()
    ours = [i for i, line in enumerate(lines) if line.strip().startswith(f'File "{REPO}/')
            and "/tests/" not in line and "/.venv/" not in line]
    return [lines[i].strip() + " :: " + (lines[i + 1].strip() if i + 1 < len(lines) else "") for i in ours[-1:]]


def fuzz(script: str, examples: int, seed: int) -> tuple[list[str], int]:
    """Run `examples` drawn flag sets of `script`; return (failure reports, runs made)."""
    module = importlib.import_module(script.removesuffix(".py"))
    fields = fuzzed_fields(module.Args)
    model = None if script == "sft.py" else tiny_sft_model()
    runner, root = get_runner(), tempfile.mkdtemp(prefix=f"fuzz_{script[:-3]}_")
    failures, runs = [], []  # runs: the drawn flags of each run made

    @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck), print_blob=False)
    @hypothesis_seed(seed)
    @given(flag_sets(fields))
    def one_run(drawn):
        argv = command(fields, drawn, model)
        cwd = os.path.join(root, str(len(runs)))
        runs.append(drawn)
        result = runner.run(script, argv, cwd=cwd, timeout=TIMEOUT)
        problem = verdict(result, TIMEOUT)
        last = (result.stderr.strip().splitlines() or [""])[-1][:150]
        print(f"{'FAIL' if problem else 'ok  '} rc={result.returncode} {result.seconds:5.1f}s {drawn}  | {last}")
        if problem:
            text = result.stderr.strip() or result.stdout.strip()
            tail = "\n".join([*raised_at(text), *text.splitlines()[-4:]])
            failures.append(f"{problem}: python {script} {' '.join(argv)}\n{tail}")
        shutil.rmtree(cwd, ignore_errors=True)

    one_run()
    shutil.rmtree(root, ignore_errors=True)
    return failures, len(runs)


@pytest.mark.parametrize("script", SCRIPTS)
def test_random_flags_end_in_success_or_one_error_line(script):
    print(f"fuzz seed {SEED}: replay with FUZZ_SEED={SEED} pytest "
          f"'tests/test_fuzz_flags.py::test_random_flags_end_in_success_or_one_error_line[{script}]'")
    failures, runs = fuzz(script, EXAMPLES, SEED)
    assert runs > 0
    assert not failures, (f"{len(failures)} of {runs} fuzzed runs of {script} failed (FUZZ_SEED={SEED} replays):\n\n"
                          + "\n\n".join(failures))


# ---- the fuzzer's own pieces ---------------------------------------------------------------------


def test_values_cover_each_kind_of_field():
    assert values("fsdp", bool) == [["true"], ["false"]]
    assert ["nope"] in values("loss_agg", typing.Literal["a", "b"]) and ["a"] in values("loss_agg",
                                                                                       typing.Literal["a", "b"])
    assert ["vllm"] not in values("rollout", typing.Literal["hf", "vllm"]) or os.environ.get("FUZZ_VLLM") == "1"
    assert ["1000000000"] in values("seed", int) and ["1000000000"] not in values("num_prompts", int)
    assert {"nan", "inf", "0", "-1"} <= {v[0] for v in values("learning_rate", float)}
    assert all(len(v) == 2 for v in values("sapo_taus", tuple[float, float]))
    assert [""] in values("task", str) and ["nope"] in values("task", str) and ["add_noisy"] in values("task", str)


def test_fields_are_read_from_args_so_new_flags_are_fuzzed():
    @dataclasses.dataclass
    class Args:
        brand_new_count: int = 3
        track: bool = False

    assert fuzzed_fields(Args) == {"brand_new_count": int}


def test_command_puts_drawn_flags_over_the_base():
    fields = {"total_steps": int, "tensorboard": bool, "model": str, "beta": float}
    argv = command(fields, {"tensorboard": ["true"], "beta": ["nan"]}, "runs/x")
    assert argv == ["--total-steps", "2", "--tensorboard", "--model", "runs/x", "--beta", "nan"]
