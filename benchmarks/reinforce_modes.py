"""Every reinforce.py mode from one SFT checkpoint: final sampled pass@1 .. pass@k, entropy, wall and CPU time.

Each mode is one `python reinforce.py ...` run (the exact command is printed in the table), timed
with the child's user+sys CPU seconds as well as wall seconds (wall is inflated on a shared
machine). The SFT row is the starting checkpoint evaluated the same way (same prompts, same
samples per prompt, the eval's own seed). Entropy is the mean token entropy of the policy's
samples over 5-step windows at the start, middle and end of training (metrics.jsonl `entropy`).

Run:  python benchmarks/reinforce_modes.py --model runs/sft --steps 150                      (every mode, add_noisy)
      python benchmarks/reinforce_modes.py --model runs/sft_add_carry_noisy --task add_carry_noisy \
          --modes rloo psr nsr w-reinforce --num-eval-samples 64 --steps 150                 (PSR vs NSR, pass@k)
"""

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

MODES = {
    "none": ["--baseline", "none"],
    "ema": ["--baseline", "ema"],
    "group": ["--baseline", "group"],
    "rloo": ["--baseline", "rloo"],
    "remax": ["--baseline", "remax"],
    "reinforce++": ["--baseline", "reinforce++"],
    "reinforce++-baseline": ["--baseline", "reinforce++-baseline"],
    "psr": ["--baseline", "none", "--sign-weighting", "psr"],
    "nsr": ["--baseline", "none", "--sign-weighting", "nsr"],
    "w-reinforce": ["--baseline", "none", "--sign-weighting", "w-reinforce"],
}


def run_mode(mode, args):
    flags = [*MODES[mode], "--model", args.model, "--task", args.task, "--total-steps", str(args.steps),
             "--run-name", f"{args.prefix}_{mode}", "--num-eval-prompts", str(args.num_eval_prompts),
             "--num-eval-samples", str(args.num_eval_samples), "--eval-every", "0", "--save-every", "0",
             "--no-tensorboard", *args.extra]
    command = ["python", "reinforce.py", *flags]
    wall = time.perf_counter()
    # wait4 gives this child's own rusage, so jobs running side by side are timed separately
    log = os.path.join(REPO, "runs", f"{args.prefix}_{mode}.log")
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "reinforce.py", *flags], cwd=REPO, stdout=out, stderr=out,
                                   env={**os.environ, "OMP_NUM_THREADS": "1"})
        _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - wall
    if status != 0:
        raise RuntimeError(f"{' '.join(command)} failed, see {log}")
    with open(os.path.join(REPO, "runs", f"{args.prefix}_{mode}", "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return dict(mode=mode, command=" ".join(command), wall=wall, cpu=usage.ru_utime + usage.ru_stime,
                steps=[r for r in records if "event" not in r], eval=records[-1])


def window(steps, at, key="entropy", width=5):
    start = min(max(0, at - width // 2), max(0, len(steps) - width))
    values = [r[key] for r in steps[start:start + width] if r.get(key) is not None]
    return sum(values) / len(values)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="runs/sft")
    parser.add_argument("--task", default="add_noisy")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--num-eval-prompts", type=int, default=200)
    parser.add_argument("--num-eval-samples", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=1, help="modes run side by side (each on one thread)")
    parser.add_argument("--prefix", default="reinforce_modes")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more reinforce.py flags")
    args = parser.parse_args()

    import torch

    from common.evaluation import evaluate
    from common.models import eos_token_ids, load_model_and_tokenizer
    from common.tasks import load_task

    with ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(run_mode, mode, args) for mode in args.modes]
        torch.set_num_threads(1)
        model, tokenizer = load_model_and_tokenizer(os.path.join(REPO, args.model), "cpu", torch.float32)
        sft = evaluate(model, tokenizer, load_task(args.task), args.num_eval_prompts, args.num_eval_samples,
                       eos_ids=eos_token_ids(model, tokenizer))
        results = [f.result() for f in futures]

    ks = sorted(int(k.split("@")[1]) for k in sft if k.startswith("pass@") and "/" not in k)
    kcols = [k for k in ks if k in (1, 8)] if args.num_eval_samples <= 8 else ks
    print(f"\n{args.task}, from {args.model}, {args.steps} steps, {args.num_eval_prompts} held-out prompts x "
          f"{args.num_eval_samples} samples at T = 1\n")
    head = ("| mode | " + " | ".join(f"pass@{k}" for k in kcols)
            + " | greedy | entropy start → mid → end | wall s | CPU s |")
    print(head + "\n|" + "---|" * (head.count("|") - 1))
    print("| SFT | " + " | ".join(f"{sft[f'pass@{k}']:.3f}" for k in kcols) + f" | {sft['accuracy']:.3f} | | | |")
    for r in results:
        s, e = r["steps"], r["eval"]
        entropy = " → ".join(f"{window(s, at):.3f}" for at in (0, len(s) // 2, len(s) - 1))
        print(f"| {r['mode']} | " + " | ".join(f"{e[f'pass@{k}']:.3f}" for k in kcols)
              + f" | {e['accuracy']:.3f} | {entropy} | {r['wall']:.0f} | {r['cpu']:.0f} |")
    print("\nCommands (from the repository root):")
    for r in results:
        print(f"  {r['command']}")
    out = os.path.join(REPO, "runs", f"{args.prefix}.json")
    with open(out, "w") as f:
        json.dump({"sft": sft, "runs": [{k: v for k, v in r.items()} for r in results]}, f)
    print(f"\nall numbers, every step's record too: {out}")


if __name__ == "__main__":
    main()
