"""The reasoning task's four properties, measured at its SFT checkpoint (docs/phenomena.md).

    python benchmarks/reasoning_task.py              # trains runs/sft_countdown_steps if missing, then measures
    python benchmarks/reasoning_task.py --fresh      # retrains first

countdown_steps (common/tasks.py) is built so that the token-level phenomena of the survey
"rl与sft" have room to happen. This checks that they do, on held-out problems:
  1. mean completion length >= 20 tokens (EOS included), of T = 1 samples;
  2. entropy is concentrated: the top 20% of completion tokens by entropy carry >= 70% of the summed
     entropy (few forks, many forced tokens);
  3. SFT pass@1 <= 0.5 and pass@64 - pass@1 >= 0.3 (RL has headroom the model can already sample);
  4. `sft.py --task countdown_steps` from scratch in <= 10 CPU-minutes (user + sys of the process).
It prints one line per property, `holds` or `DOES NOT HOLD` with the numbers, and exits 1 on a miss.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
RUN = "runs/sft_countdown_steps"
SFT_FLAGS = ["--task", "countdown_steps", "--run-name", "sft_countdown_steps", "--total-steps", "1500",
             "--batch-size", "64", "--no-tensorboard"]


def train(fresh: bool) -> float | None:
    """Train the SFT model unless it exists; return its CPU seconds (None when reused)."""
    if os.path.exists(os.path.join(REPO, RUN, "model.safetensors")) and not fresh:
        path = os.path.join(REPO, RUN, "cpu_seconds.json")  # absent when experiments.py trained it
        if not os.path.exists(path):
            return None
        with open(path) as f:
            return json.load(f)["cpu_seconds"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([sys.executable, "sft.py", *SFT_FLAGS], cwd=REPO, check=True,
                   env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    with open(os.path.join(REPO, RUN, "cpu_seconds.json"), "w") as f:
        json.dump({"cpu_seconds": cpu, "wall_seconds": time.perf_counter() - start, "flags": SFT_FLAGS}, f)
    return cpu


def measure(num_prompts: int, num_samples: int) -> dict:
    import torch

    from common.evaluation import evaluate
    from common.logprobs import rollout_logprobs
    from common.models import load_model_and_tokenizer
    from common.rollout import generate_hf
    from common.tasks import format_prompt, load_task

    torch.manual_seed(0)
    task = load_task("countdown_steps")
    model, tokenizer = load_model_and_tokenizer(os.path.join(REPO, RUN), torch.device("cpu"), torch.float32)
    model.eval()
    prompts = [format_prompt(tokenizer, q, task.system_prompt) for q in task.test["question"][:100]]
    with torch.no_grad():
        rollout = generate_hf(model, tokenizer, prompts, 8, 1.0, task.max_new_tokens, 1.0,
                              [tokenizer.eos_token_id])
        _, entropy = rollout_logprobs(model, rollout, with_entropy=True)  # (B, C)
    valid = entropy[rollout.completion_mask.bool()].sort(descending=True).values
    top = valid[: max(1, int(0.2 * len(valid)))]
    result = evaluate(model, tokenizer, task, num_prompts, num_samples, ks=range(1, num_samples + 1))
    return {"completion_length": rollout.completion_lengths.float().mean().item(),
            "top20_entropy_share": (top.sum() / valid.sum()).item(), **result}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fresh", action="store_true", help="retrain the SFT model")
    parser.add_argument("--num-prompts", type=int, default=200, help="held-out prompts for pass@k")
    parser.add_argument("--num-samples", type=int, default=64, help="samples per prompt (k up to this)")
    args = parser.parse_args()
    cpu = train(args.fresh)
    m = measure(args.num_prompts, args.num_samples)
    k = args.num_samples
    rows = [
        ("mean completion length >= 20 tokens", m["completion_length"] >= 20, f"{m['completion_length']:.1f}"),
        ("top 20% of tokens by entropy carry >= 70% of it", m["top20_entropy_share"] >= 0.7,
         f"{m['top20_entropy_share']:.3f}"),
        ("SFT pass@1 <= 0.5", m["pass@1"] <= 0.5, f"{m['pass@1']:.3f} (greedy {m['accuracy']:.3f})"),
        (f"pass@{k} - pass@1 >= 0.3", m[f"pass@{k}"] - m["pass@1"] >= 0.3,
         f"pass@{k} {m[f'pass@{k}']:.3f} - pass@1 {m['pass@1']:.3f} = {m[f'pass@{k}'] - m['pass@1']:.3f}"),
        ("sft.py from scratch <= 10 CPU-minutes", cpu is not None and cpu <= 600,
         f"{cpu / 60:.1f} CPU-min" if cpu is not None else "unknown"),
    ]
    print(f"countdown_steps at {RUN} ({m['num_prompts']} held-out prompts x {k} samples; "
          f"`python sft.py {' '.join(SFT_FLAGS)}`)")
    for claim, holds, numbers in rows:
        print(f"  {'holds' if holds else 'DOES NOT HOLD'}: {claim} ({numbers})")
    os.makedirs(os.path.join(REPO, "docs", "figures"), exist_ok=True)
    with open(os.path.join(REPO, "docs", "figures", "reasoning_task.json"), "w") as f:
        json.dump({"sft_flags": SFT_FLAGS, "cpu_seconds": cpu, **m,
                   "checks": [{"claim": c, "holds": bool(h), "numbers": n} for c, h, n in rows]}, f, indent=2)
    sys.exit(0 if all(h for _, h, _ in rows) else 1)


if __name__ == "__main__":
    main()
