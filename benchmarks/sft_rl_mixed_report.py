"""Tables for sft_rl_mixed.py's section of docs/results.md, from finished runs (commands: docs/sft_rl_mixed.md).

    python benchmarks/sft_rl_mixed_report.py --runs runs/A runs/B ... [--teacher runs/sft_add_teacher] [--window 10]

Per run: the final eval record (overall and per slice), and the first step at which the trailing mean of
`sampled_accuracy` over --window steps reaches the teacher's eval pass@1, with the wall seconds of the steps so far
(sum of `step_time`) and, where the run logs it, the process CPU seconds (`cpu_time`).
"""

import argparse
import json
import os


def read(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r for r in records if "event" not in r], next((r for r in records if r.get("event") == "eval"), {})


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", nargs="+", required=True)
    parser.add_argument("--teacher", default="runs/sft_add_teacher")
    parser.add_argument("--window", type=int, default=10)
    args = parser.parse_args()
    target = read(args.teacher)[1]["pass@1"]
    print(f"teacher {args.teacher}: eval pass@1 {target:.3f}; reached = trailing {args.window}-step mean of "
          "sampled_accuracy >= that")
    print("| run | steps | acc | pass@1 | acc/carry | pass@1/carry | pass@1/no_carry | reached at step | wall s "
          "| cpu s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for run in args.runs:
        steps, final = read(run)
        reached, wall = None, 0.0
        for i, r in enumerate(steps):
            wall += r["step_time"]
            window = steps[max(0, i + 1 - args.window):i + 1]
            if len(window) == args.window and sum(w["sampled_accuracy"] for w in window) / args.window >= target:
                reached = (r["step"], wall, r.get("cpu_time"))
                break
        cells = [f"{final.get(k, float('nan')):.3f}" for k in ("accuracy", "pass@1", "accuracy/carry", "pass@1/carry",
                                                                 "pass@1/no_carry")]
        hit = ["-", "-", "-"] if reached is None else [str(reached[0]), f"{reached[1]:.0f}",
                                                      "-" if reached[2] is None else f"{reached[2]:.0f}"]
        print(f"| {os.path.basename(run)} | {len(steps)} | " + " | ".join(cells + hit) + " |")


if __name__ == "__main__":
    main()
