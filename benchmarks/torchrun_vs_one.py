"""grpo.py in one process vs under torchrun with N processes, side by side: learning and wall time.

    python benchmarks/torchrun_vs_one.py                 # 1 vs 2 processes, 200 steps from runs/sft (CPU, gloo)
    python benchmarks/torchrun_vs_one.py --nproc 2 --steps 200 -- --num-prompts 32

Both runs get the same global batch (--num-prompts prompts per step, split over the ranks), the
same seed and the same flags; under torchrun each rank samples its own share with its own RNG
stream, so the two runs see different samples and their numbers differ by sampling noise.
Prints a markdown table: wall time (the whole command: start-up, training and the final
evaluation), median step time, and the eval record (greedy accuracy, pass@1, pass@8).
On a CPU each process gets OMP_NUM_THREADS=1: N processes on N cores, no oversubscription.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from common.tracking import read_metrics  # noqa: E402


def run(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("extra", nargs="*", help="flags passed to grpo.py (after --)")
    args = parser.parse_args()
    common = ["--total-steps", str(args.steps), "--no-tensorboard", *args.extra]
    rows = []
    for name, launcher in (("python grpo.py", [sys.executable]),
                           (f"torchrun --nproc_per_node {args.nproc} grpo.py",
                            [sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node", str(args.nproc)])):
        run_name = f"bench_torchrun_{1 if launcher == [sys.executable] else args.nproc}"
        wall = run([*launcher, "grpo.py", "--run-name", run_name, *common])
        records = read_metrics(os.path.join(REPO, "runs", run_name))
        steps = [r for r in records if "event" not in r]
        result = [r for r in records if r.get("event") == "eval"][-1]
        rows.append((name, wall, statistics.median(r["step_time"] for r in steps), result))
    print("| command | wall s | median s/step | greedy | pass@1 | pass@8 |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, wall, step_time, r in rows:
        print(f"| `{name}` | {wall:.0f} | {step_time:.3f} | {r['accuracy']:.3f} | {r['pass@1']:.3f} | "
              f"{r['pass@8']:.3f} |")


if __name__ == "__main__":
    main()
