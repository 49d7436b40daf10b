"""GRPO step time: our grpo.py vs TRL's GRPOTrainer, same model, prompts, reward and hyper-parameters.

In one process, on one machine, with the same torch thread count, this runs
  1. grpo.main(...) for --steps optimizer steps from the SFT checkpoint (16 prompts x G=8,
     6 new tokens, T=1, lr 2e-4, beta 0.04, eps 0.2, seq-mean-token-mean, group std);
  2. trl.GRPOTrainer with the same settings (loss_type="grpo" is seq-mean-token-mean,
     per_device_train_batch_size=128 completions = one generation batch = one optimizer step,
     top_k=0, top_p=1, use_bias_correction_kl=False: plain k3 as ours) on the *same prompts
     in the same order* (shuffle_dataset=False over our data stream) with the same verifier;
  3. the bare work of one step at that shape: model.generate (16 x 8 prompts, 6 sampled tokens),
     one forward+backward of completion_logprobs, and one reference forward (beta > 0 needs it).
Seconds/step are clock gaps between consecutive optimizer steps (TRL: on_step_end;
ours: each step's metrics record); per run the median after --warmup steps, across runs the best
(load on a shared machine only adds time). --rounds 2 runs ours, TRL, TRL, ours (ABBA).
--clock cpu counts this process's CPU seconds instead of wall seconds (use with --threads 1).
The table also goes to benchmarks/results_grpo_vs_trl.md with the command and machine info.

    pip install -e ".[bench]"
    python benchmarks/grpo_vs_trl.py                  # 30 steps x 2 rounds each, all cores
    python benchmarks/grpo_vs_trl.py --threads 1 --clock cpu     # robust to other jobs on the machine
"""

import itertools
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Literal

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
from common.tracking import RunLogger, read_metrics  # noqa: E402

NUM_PROMPTS, G, MAX_NEW, LR, BETA, EPS, TEMP = 16, 8, 6, 2e-4, 0.04, 0.2, 1.0
clock = time.perf_counter  # main() sets it from --clock


@dataclass
class Args:
    model: str = "runs/sft"
    """SFT checkpoint both trainers start from"""
    steps: int = 30
    """optimizer steps per run"""
    rounds: int = 2
    """runs of each trainer, alternating which goes first (2 = ABBA)"""
    warmup: int = 3
    """first steps of each run left out of the median"""
    threads: int = len(os.sched_getaffinity(0))
    """torch.set_num_threads for everything (default: all usable cores)"""
    clock: Literal["wall", "cpu"] = "wall"
    """wall: time.perf_counter; cpu: time.process_time (this process's CPU seconds: with --threads 1
    nearly immune to other jobs on a shared machine)"""
    repeats: int = 10
    """timed repeats of the bare generate / forward+backward / reference forward"""
    seed: int = 1
    out: str = "benchmarks/results_grpo_vs_trl.md"


def run_ours(args: Args):
    """grpo.main; a RunLogger subclass stamps the clock when the loop starts and at each step."""
    stamps = []

    class StampingLogger(RunLogger):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            stamps.append(clock())

        def log(self, step, metrics):
            if "event" not in metrics:
                stamps.append(clock())
            super().log(step, metrics)

    grpo.RunLogger = StampingLogger
    grpo.main(grpo.parse_args([
        "--model", args.model, "--run-name", "bench_ours", "--seed", str(args.seed), "--total-steps", str(args.steps),
        "--num-prompts", str(NUM_PROMPTS), "--group-size", str(G), "--max-new-tokens", str(MAX_NEW),
        "--temperature", str(TEMP), "--learning-rate", str(LR), "--beta", str(BETA), "--eps-low", str(EPS),
        "--eps-high", str(EPS), "--loss-agg", "seq-mean-token-mean", "--scale-rewards", "group",
        "--rollout", "hf", "--no-tensorboard", "--save-every", "0", "--eval-every", "0",  # TRL: no in-loop eval
        "--num-eval-prompts", "32"]))
    grpo.RunLogger = RunLogger
    rewards = [r["reward"] for r in read_metrics("runs/bench_ours") if "event" not in r]
    return [b - a for a, b in itertools.pairwise(stamps)], rewards


def run_trl(args: Args):
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    model, tokenizer = load_model_and_tokenizer(args.model, torch.device("cpu"), torch.float32)
    pool = load_task("add_noisy").prompts
    rows = pool[rows_at(len(pool), 0, NUM_PROMPTS * args.steps, args.seed)]  # our data stream, in our order
    dataset = Dataset.from_dict({"prompt": [build_messages(q) for q in rows["question"]], "answer": rows["answer"]})
    # TRL tokenizes conversational prompts with apply_chat_template: check that it gives our prompt ids exactly.
    trl_ids = tokenizer.apply_chat_template(dataset[0]["prompt"], add_generation_prompt=True, return_dict=True)
    our_ids = tokenizer(format_prompt(tokenizer, rows["question"][0]), add_special_tokens=False)["input_ids"]
    assert list(trl_ids["input_ids"]) == our_ids, (trl_ids["input_ids"], our_ids)

    def correctness(completions, answer, **_):
        return [number_verifier(c[0]["content"], a)[0] for c, a in zip(completions, answer)]

    stamps = []

    class Stamp(TrainerCallback):
        def on_train_begin(self, *_, **__):
            assert torch.get_num_threads() == args.threads, torch.get_num_threads()
            stamps.append(clock())

        def on_step_end(self, *_, **__):
            stamps.append(clock())

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
    return [b - a for a, b in itertools.pairwise(stamps)], rewards


def median_time(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    return statistics.median(times)


def bare_step(args: Args):
    """Median seconds of a bare generate, forward+backward and reference forward at the benchmark's shape."""
    model, tokenizer = load_model_and_tokenizer(args.model, torch.device("cpu"), torch.float32)
    prompts = [format_prompt(tokenizer, q) for q in load_task("add_noisy").prompts[:NUM_PROMPTS]["question"]]
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    ids, mask = enc["input_ids"].repeat_interleave(G, 0), enc["attention_mask"].repeat_interleave(G, 0)
    eos = eos_token_ids(model, tokenizer)

    def sample():
        return model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=TEMP, top_k=0,
                              top_p=1.0, max_new_tokens=MAX_NEW, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)

    model.eval()
    gen = median_time(sample, args.repeats)
    completion = sample()[:, ids.shape[1]:]
    scored = (model, ids, mask, completion, torch.ones_like(completion), TEMP)
    model.train()

    def forward_backward():
        model.zero_grad(set_to_none=True)
        completion_logprobs(*scored, with_entropy=True)[0].sum().backward()

    def ref_forward():
        with torch.no_grad():
            completion_logprobs(*scored)

    return gen, median_time(forward_backward, args.repeats), median_time(ref_forward, args.repeats)


def main(args: Args):
    import transformers
    import trl

    global clock
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    times, rewards = {"ours": [], "trl": []}, {"ours": [], "trl": []}
    for round_ in range(args.rounds):
        for name in ("ours", "trl") if round_ % 2 == 0 else ("trl", "ours"):
            torch.set_num_threads(args.threads)
            torch.manual_seed(args.seed)
            dt, r = (run_ours if name == "ours" else run_trl)(args)
            times[name].append(dt)
            rewards[name].append(r)
    torch.set_num_threads(args.threads)
    gen, fwd_bwd, ref = bare_step(args)

    # Per run: median step after warm-up. Across runs: the minimum, since a shared machine's load only adds time.
    medians = {k: [statistics.median(dt[args.warmup:]) for dt in times[k]] for k in times}
    ours, theirs = min(medians["ours"]), min(medians["trl"])
    ours_r, trl_r = (statistics.mean(x for r in rewards[k] for x in r[-10:]) for k in ("ours", "trl"))
    rows = [
        ("| | ours (grpo.py) | TRL GRPOTrainer | ours / TRL | goal |"),
        ("|---|---:|---:|---:|---|"),
        (f"| {args.clock} seconds / step (median of steps {args.warmup + 1}-{args.steps}; best of {args.rounds} runs) "
         f"| {ours:.3f} | {theirs:.3f} | {ours / theirs:.2f} | <= 0.8 |"),
        (f"| mean reward, last 10 steps of each run | {ours_r:.3f} | {trl_r:.3f} | | |"),
        (f"| overhead: ours / (bare generate {gen:.3f} s + fwd+bwd {fwd_bwd:.3f} s) "
         f"| {ours / (gen + fwd_bwd):.2f} | | | <= 1.25 |"),
        (f"| same, the bare work also counting the reference forward ({ref:.3f} s; beta = {BETA}) "
         f"| {ours / (gen + fwd_bwd + ref):.2f} | | | |"),
    ]
    table = "\n".join(rows)
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    info = (f"command: `python {' '.join(sys.argv)}`\n\n"
            f"machine: {cpu}, nproc {os.cpu_count()} ({len(os.sched_getaffinity(0))} usable), load average "
            f"{os.getloadavg()[0]:.1f} at the end, torch.set_num_threads({args.threads}); torch {torch.__version__}, "
            f"transformers {transformers.__version__}, trl {trl.__version__}; {NUM_PROMPTS} prompts x G={G}, "
            f"{MAX_NEW} new tokens, {args.steps} steps x {args.rounds} runs each, model {args.model}\n\n")
    info += "".join(f"{k} run {i + 1}: median {medians[k][i]:.3f} s; per step {' '.join(f'{t:.2f}' for t in dt)}\n\n"
                    for k in ("ours", "trl") for i, dt in enumerate(times[k]))
    print("\n" + table + "\n\n" + info)
    with open(args.out, "w") as f:
        f.write("# GRPO step time: grpo.py vs TRL GRPOTrainer\n\n" + table + "\n\n" + info)


if __name__ == "__main__":
    main(tyro.cli(Args))
