"""Compare finished runs from their metrics.jsonl: a markdown table, and a plot if matplotlib is installed.

    python benchmarks/compare_runs.py runs/sft runs/grpo runs/preset_dapo [--plot curves.png]

Columns: optimizer steps, summed step time (seconds of training, excluding start-up and the
final evaluation), then the eval record: greedy accuracy and unbiased pass@k at T = 1.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.tracking import read_metrics  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders (runs/<run_name>)")
    parser.add_argument("--plot", help="write sampled accuracy / reward curves to this PNG")
    args = parser.parse_args()
    print("| run | steps | train seconds | greedy accuracy | pass@1 | pass@2 | pass@4 | pass@8 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    curves = {}
    for run in args.runs:
        records = read_metrics(run)
        steps = [r for r in records if "event" not in r]
        evals = [r for r in records if r.get("event") == "eval"]
        e = evals[-1] if evals else {}
        cells = [f"{e.get(k, float('nan')):.3f}" for k in ("accuracy", "pass@1", "pass@2", "pass@4", "pass@8")]
        seconds = sum(r.get("step_time") or 0 for r in steps)
        print(f"| {run} | {len(steps)} | {seconds:.0f} | " + " | ".join(cells) + " |")
        curves[run] = [(r["step"], r.get("sampled_accuracy", r.get("eval_accuracy"))) for r in steps]
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        for run, points in curves.items():
            points = [(s, a) for s, a in points if a is not None]
            if points:
                plt.plot(*zip(*points), label=run)
        plt.xlabel("step")
        plt.ylabel("accuracy (sampled for RL, greedy for SFT)")
        plt.legend()
        plt.savefig(args.plot, dpi=120)
        print(f"plot written to {args.plot}")


if __name__ == "__main__":
    main()
