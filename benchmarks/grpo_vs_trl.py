"""GRPO step time: our grpo.py vs TRL's GRPOTrainer, same model, prompts, reward and hyper-parameters.

In one process, on one machine, with the same torch thread count, this runs
  1. grpo.main(...) for --steps optimizer steps from the SFT checkpoint (16 prompts x G=8,
     6 new tokens, T=1, lr 2e-4, beta 0.04, eps 0.2, seq-mean-token-mean, group std);
  2. trl.GRPOTrainer with the same settings (loss_type="grpo" is seq-mean-token-mean,
     per_device_train_batch_size=128 completions = one generation batch = one optimizer step,
     top_k=0, top_p=1, use_bias_correction_kl=False: plain k3 as ours) on the *same prompts
     in the same order* (shuffle_dataset=False over our data stream) and the same verifier;
  3. the bare work of one step at that shape: model.generate (16 x 8 prompts, 6 sampled tokens)
     plus one forward+backward of completion_logprobs (and, separately, the reference forward).
Seconds/step are wall-clock gaps between consecutive optimizer steps (TRL: on_step_end;
ours: each metrics record), median after --warmup steps. Results go to benchmarks/results_grpo_vs_trl.md.

    pip install -e ".[bench]"
    python benchmarks/grpo_vs_trl.py                  # 30 steps each, all cores
    python benchmarks/grpo_vs_trl.py --steps 5 --threads 1
"""

import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.chdir(ROOT)  # grpo.py writes runs/<run_name>/ relative to the repository root
import grpo  # noqa: E402
from common.logprobs import completion_logprobs  # noqa: E402
from common.models import eos_token_ids, load_model_and_tokenizer  # noqa: E402
from common.rewards import number_verifier  # noqa: E402
from common.tasks import build_messages, format_prompt, load_task, rows_at  # noqa: E402
from common.tracking import read_metrics  # noqa: E402


@dataclass
class Args:
    model: str = "runs/sft"
    """SFT checkpoint both trainers start from"""
    steps: int = 30
    """optimizer steps for each trainer"""
    warmup: int = 3
    """first steps left out of the median step time"""
    threads: int = len(os.sched_getaffinity(0))
    """torch.set_num_threads for everything (default: all usable cores)"""
    repeats: int = 5
    """timed repeats of the bare generate / forward-backward"""
    seed: int = 1
    out: str = "benchmarks/results_grpo_vs_trl.md"


NUM_PROMPTS, G, MAX_NEW, LR, BETA, EPS, TEMP = 16, 8, 6, 2e-4, 0.04, 0.2, 1.0


def run_ours(args: Args):
    """grpo.main; a RunLogger subclass stamps the wall clock at every step record."""
    stamps = []

    class StampingLogger(grpo.RunLogger):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            stamps.append(time.perf_counter())

        def log(self, step, metrics):
            if "event" not in metrics:
                stamps.append(time.perf_counter())
            super().log(step, metrics)

    grpo.RunLogger = StampingLogger
    grpo.main(grpo.parse_args([
        "--model", args.model, "--run-name", "bench_ours", "--seed", str(args.seed), "--total-steps", str(args.steps),
        "--num-prompts", str(NUM_PROMPTS), "--group-size", str(G), "--max-new-tokens", str(MAX_NEW),
        "--temperature", str(TEMP), "--learning-rate", str(LR), "--beta", str(BETA), "--eps-low", str(EPS),
        "--eps-high", str(EPS), "--loss-agg", "seq-mean-token-mean", "--scale-rewards", "group",
        "--no-tensorboard", "--save-every", "0", "--num-eval-prompts", "32"]))
    records = [r for r in read_metrics("runs/bench_ours") if "event" not in r]
    return [b - a for a, b in zip(stamps, stamps[1:])], [r["reward"] for r in records]


def run_trl(args: Args):
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    from datasets import Dataset

    task = load_task("add_noisy")
    pool = task.prompts
    model, tokenizer = load_model_and_tokenizer(args.model, torch.device("cpu"), torch.float32)
    order = pool[rows_at(len(pool), 0, NUM_PROMPTS * args.steps, args.seed)]  # our data stream, in our order
    dataset = Dataset.from_dict({"prompt": [build_messages(q) for q in order["question"]], "answer": order["answer"]})
    # TRL tokenizes conversational prompts with apply_chat_template; check it gives our prompt ids exactly.
    trl_ids = tokenizer.apply_chat_template(dataset[0]["prompt"], add_generation_prompt=True, tokenize=True,
                                            return_dict=True)["input_ids"]
    our_ids = tokenizer(format_prompt(tokenizer, order["question"][0]), add_special_tokens=False)["input_ids"]
    assert list(trl_ids) == our_ids, (trl_ids, our_ids)

    def correctness(completions, answer, **_):
        return [number_verifier(c[0]["content"], a)[0] for c, a in zip(completions, answer)]

    stamps = []

    class Stamp(TrainerCallback):
        def on_train_begin(self, *_, **__):
            assert torch.get_num_threads() == args.threads, torch.get_num_threads()
            stamps.append(time.perf_counter())

        def on_step_end(self, *_, **__):
            stamps.append(time.perf_counter())

    config = GRPOConfig(
        output_dir="runs/bench_trl", max_steps=args.steps, seed=args.seed, data_seed=args.seed,
        per_device_train_batch_size=NUM_PROMPTS * G, gradient_accumulation_steps=1,  # 128 completions = 1 step
        num_generations=G, max_completion_length=MAX_NEW, temperature=TEMP, top_k=0, top_p=1.0,
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        beta=BETA, epsilon=EPS, num_iterations=1, loss_type="grpo", scale_rewards="group",
        use_bias_correction_kl=False, shuffle_dataset=False, bf16=False, use_cpu=True,
        gradient_checkpointing=False, report_to="none", logging_steps=1, save_strategy="no", disable_tqdm=True)
    trainer = GRPOTrainer(model=model, reward_funcs=correctness, args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[Stamp()])
    trainer.train()
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    return [b - a for a, b in zip(stamps, stamps[1:])], rewards


def median_time(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bare_step(args: Args):
    """Median seconds of a bare generate, forward+backward, and reference forward at the benchmark's shape."""
    model, tokenizer = load_model_and_tokenizer(args.model, torch.device("cpu"), torch.float32)
    task = load_task("add_noisy")
    prompts = [format_prompt(tokenizer, q) for q in task.prompts[:NUM_PROMPTS]["question"]]
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    ids, mask = enc["input_ids"].repeat_interleave(G, 0), enc["attention_mask"].repeat_interleave(G, 0)
    eos = eos_token_ids(model, tokenizer)
    sample = lambda: model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=TEMP,  # noqa: E731
                                    top_k=0, top_p=1.0, max_new_tokens=MAX_NEW, eos_token_id=eos,
                                    pad_token_id=tokenizer.pad_token_id)
    model.eval()
    gen = median_time(sample, args.repeats)
    completion = sample()[:, ids.shape[1]:]
    completion_mask = torch.ones_like(completion)
    model.train()

    def forward_backward():
        model.zero_grad(set_to_none=True)
        completion_logprobs(model, ids, mask, completion, completion_mask, TEMP, with_entropy=True)[0].sum().backward()

    def ref_forward():
        with torch.no_grad():
            completion_logprobs(model, ids, mask, completion, completion_mask, TEMP)

    return gen, median_time(forward_backward, args.repeats), median_time(ref_forward, args.repeats)


def main(args: Args):
    import transformers
    import trl

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    ours_dt, ours_r = run_ours(args)
    torch.set_num_threads(args.threads)  # in case anything changed it
    trl_dt, trl_r = run_trl(args)
    torch.set_num_threads(args.threads)
    gen, fwd_bwd, ref = bare_step(args)

    ours_s, trl_s = statistics.median(ours_dt[args.warmup:]), statistics.median(trl_dt[args.warmup:])
    last = lambda xs: sum(xs[-10:]) / len(xs[-10:])  # noqa: E731
    table = "\n".join([
        "| | ours (grpo.py) | TRL GRPOTrainer | ours / TRL | goal |",
        "|---|---:|---:|---:|---|",
        f"| seconds / step (median, steps {args.warmup + 1}-{args.steps}) | {ours_s:.3f} | {trl_s:.3f} "
        f"| {ours_s / trl_s:.2f} | <= 0.8 |",
        f"| mean reward, last 10 steps | {last(ours_r):.3f} | {last(trl_r):.3f} | | |",
        f"| overhead: ours / (bare generate {gen:.3f} s + fwd+bwd {fwd_bwd:.3f} s) | {ours_s / (gen + fwd_bwd):.2f} "
        "| | | <= 1.25 |",
        f"| same, bare work also counting the reference forward ({ref:.3f} s; beta = {BETA}) "
        f"| {ours_s / (gen + fwd_bwd + ref):.2f} | | | |",
    ])
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    info = (f"command: `python {' '.join(sys.argv)}`\n\n"
            f"machine: {cpu}, nproc {os.cpu_count()} ({len(os.sched_getaffinity(0))} usable), "
            f"torch.set_num_threads({args.threads}); torch {torch.__version__}, transformers "
            f"{transformers.__version__}, trl {trl.__version__}; {NUM_PROMPTS} prompts x G={G}, {MAX_NEW} new "
            f"tokens, {args.steps} steps each, model {args.model}\n\n"
            f"per-step seconds, ours: {' '.join(f'{t:.2f}' for t in ours_dt)}\n\n"
            f"per-step seconds, TRL: {' '.join(f'{t:.2f}' for t in trl_dt)}\n")
    print("\n" + table + "\n\n" + info)
    with open(args.out, "w") as f:
        f.write("# GRPO step time: grpo.py vs TRL GRPOTrainer\n\n" + table + "\n\n" + info)


if __name__ == "__main__":
    main(tyro.cli(Args))
