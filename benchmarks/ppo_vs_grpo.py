"""PPO step time and memory against GRPO: ppo.py vs grpo.py, same model, prompts and batch, one process.

In one process, with the same torch thread count, this runs grpo.main and ppo.main for --steps
optimizer steps each from the SFT checkpoint, both at grpo.py's default batch (16 prompts x G = 8,
the task's 6 new tokens, T = 1, lr 2e-4) and each script's own defaults otherwise: GRPO one
update per batch, PPO --num-epochs 4 updates plus a value model. Seconds/step are clock gaps
between consecutive metrics records (per run the median after --warmup steps; across --rounds the
best, since load on a shared machine only adds time). --clock cpu counts this process's CPU seconds
(robust to other jobs on the machine); the gen / score / train split is wall time from metrics.jsonl.

--memory then runs each script for --memory-steps steps in its own subprocess and reports that
process's peak RSS (ru_maxrss): PPO holds the policy, the reference and the value model (+ its Adam
moments), GRPO the policy and the reference.

    python benchmarks/ppo_vs_grpo.py                            # 20 steps each, wall clock, all cores
    python benchmarks/ppo_vs_grpo.py --threads 1 --clock cpu    # robust to other jobs on the machine
"""

import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Literal

import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.chdir(ROOT)  # the scripts write runs/<run_name>/ relative to the repository root
import grpo  # noqa: E402
import ppo  # noqa: E402
from common.tracking import RunLogger, read_metrics  # noqa: E402


@dataclass
class Args:
    model: str = "runs/sft"
    """SFT checkpoint both scripts start from"""
    steps: int = 20
    """optimizer steps per run"""
    warmup: int = 2
    """first steps of each run left out of the median"""
    rounds: int = 1
    """runs of each script, alternating which goes first (2 = ABBA)"""
    threads: int = len(os.sched_getaffinity(0))
    """torch.set_num_threads for everything (default: all usable cores)"""
    clock: Literal["wall", "cpu"] = "wall"
    """wall: seconds on the clock; cpu: this process's CPU seconds"""
    memory: bool = True
    """also measure each script's peak RSS in a subprocess of its own"""
    memory_steps: int = 5
    """steps of each memory run"""
    ppo_flags: tuple[str, ...] = ()
    """extra flags for ppo.py (e.g. --value-model shared)"""


COMMON = ["--num-prompts", "16", "--group-size", "8", "--eval-every", "0", "--save-every", "0",
          "--num-eval-prompts", "8", "--num-eval-samples", "1", "--no-tensorboard"]


def timed_run(script, flags: list[str], clock) -> tuple[list[float], list[dict]]:
    """Run script.main in this process; return the clock gaps between its step records and the records."""
    stamps, original = [], RunLogger.log

    def log(self, step, metrics):
        if "event" not in metrics:
            stamps.append(clock())
        return original(self, step, metrics)

    RunLogger.log = log
    try:
        start = clock()
        script.main(script.parse_args(flags))
    finally:
        RunLogger.log = original
    run_name = flags[flags.index("--run-name") + 1]
    records = [r for r in read_metrics(f"runs/{run_name}") if "event" not in r]
    return [b - a for a, b in zip([start, *stamps], stamps)], records


def peak_rss_mb(script: str, flags: list[str], threads: int) -> float:
    """Run `python script flags` in a subprocess that reports its own peak RSS (Linux: ru_maxrss in KiB)."""
    code = (f"import resource, runpy, sys, torch; torch.set_num_threads({threads}); sys.argv = {[script, *flags]!r}; "
            f"runpy.run_path({script!r}, run_name='__main__'); "
            "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    line = [s for s in out.stdout.splitlines() if s.startswith("PEAK_RSS_KB")][-1]
    return int(line.split()[1]) / 1024


def main(args: Args):
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    scripts = {"grpo.py": (grpo, []), "ppo.py": (ppo, list(args.ppo_flags))}
    per_step, splits = {name: [] for name in scripts}, {name: None for name in scripts}
    for r in range(args.rounds):
        order = list(scripts) if r % 2 == 0 else list(scripts)[::-1]
        for name in order:
            module, extra = scripts[name]
            flags = ["--model", args.model, "--total-steps", str(args.steps), "--run-name",
                     f"bench_{name[:-3]}", *COMMON, *extra]
            gaps, records = timed_run(module, flags, clock)
            per_step[name].append(statistics.median(gaps[args.warmup:]))
            if splits[name] is None or per_step[name][-1] == min(per_step[name]):
                splits[name] = {k: statistics.median(rec[f"{k}_time"] for rec in records[args.warmup:])
                                for k in ("gen", "score", "train")}
    best = {name: min(v) for name, v in per_step.items()}
    rss = {}
    if args.memory:
        for name in scripts:
            rss[name] = peak_rss_mb(name, ["--model", args.model, "--total-steps", str(args.memory_steps),
                                           "--run-name", f"bench_mem_{name[:-3]}", *COMMON, *scripts[name][1]],
                                    args.threads)
    unit = "CPU s" if args.clock == "cpu" else "s"
    lines = [f"| script | {unit}/step (median) | gen / score / train, wall s (median) | peak RSS (MB) |",
             "|---|---|---|---|"]
    for name in scripts:
        split = " / ".join(f"{splits[name][k]:.3f}" for k in ("gen", "score", "train"))
        memory = f"{rss[name]:.1f}" if name in rss else "-"
        lines.append(f"| `{name}` | {best[name]:.3f} | {split} | {memory} |")
    lines.append(f"\nppo.py / grpo.py time per step: **{best['ppo.py'] / best['grpo.py']:.2f}x**"
                 + (f"; peak RSS: {rss['ppo.py'] / rss['grpo.py']:.2f}x" if rss else ""))
    lines.append(f"({args.steps} steps, median after {args.warmup}, best of {args.rounds} round(s), "
                 f"{args.threads} thread(s), {args.clock} clock, model {args.model}, ppo flags {list(args.ppo_flags)})")
    print("\n".join(lines))


if __name__ == "__main__":
    main(tyro.cli(Args))
