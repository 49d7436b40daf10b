"""SFT: supervised fine-tuning on expert demonstrations, completion-only loss.

    L = - sum_{i,t} mask_{i,t} * log pi_theta(y*_{i,t} | x_i, y*_{i,<t}) / sum_{i,t} mask_{i,t}

In the one view that ties this project together, loss = - E[ w * log pi_theta(y | x) ]:
SFT is the case "y from an expert (off-policy), w = 1 on every completion token, positives
only". The RL scripts keep the same shape and change where y comes from and what w is.
Against its siblings (grpo.py is the template), the loop keeps their numbered banners:
  1. Generate   none: the demonstrations come from the data stream, as a `Rollout`
  2-4.          no reward, no advantage, no scoring pass: w = 1 on every demonstration token
  5. Update     one optimizer step per batch (1 epoch x 1 minibatch), accumulated over micro-batches
  6. Sync       none: nothing samples during training
and a learning-rate schedule (warm-up, cosine) where the RL scripts keep a constant rate.

How this departs from a textbook recipe, and why:
- Completion-only: prompt and padding tokens are masked; the EOS that ends the completion
  counts (the model must learn to stop).
- The normaliser is the number of completion tokens in the *whole* optimizer batch, not per
  micro-batch, so gradient accumulation gives the same gradient for any micro-batch size
  (a bug peers have had: per-micro-batch means weight short micro-batches more).
- `--model tiny` (the default) trains a 0.5M-parameter Llama from scratch on the offline
  task; `--model Qwen/Qwen2.5-0.5B-Instruct --task gsm8k` is the same script on a GPU.

Run:  python sft.py                     (tiny model, default task, ~5 CPU-minutes)
      python sft.py --help              (every flag)
Output: runs/sft/ (from_pretrained-loadable model, checkpoint/, metrics.jsonl), which is
the default --model of every RL script.
"""

import math
import time
from dataclasses import dataclass

import torch
import tyro
from tqdm import tqdm

from common.checkpoint import resume_from, save_checkpoint
from common.cli import RunArgs, check, check_at_least, check_positive, exact_div
from common.distributed import wrap_model
from common.evaluation import greedy_accuracy
from common.logprobs import masked_sum, rollout_logprobs
from common.minibatch import minibatches
from common.models import (TINY, add_lora, build_char_tokenizer, build_tiny_model, eos_token_ids,
                           load_model_and_tokenizer)
from common.rollout import demonstration_rollout
from common.run import finish_run, start_run
from common.tasks import DEFAULT_TASK, load_task
from common.tracking import RunLogger


@dataclass
class Args(RunArgs):
    """SFT's knobs; the run's plumbing (run name, seed, device, evaluation, torchrun, LoRA) is RunArgs."""

    # ---- what to train --------------------------------------------------------------------
    model: str = TINY
    """`tiny` builds a fresh 0.5M-parameter model offline; else a local folder or a hub id"""
    task: str = DEFAULT_TASK
    """task name (see common/tasks.py): add_noisy, add_carry_noisy, add, countdown, gsm8k"""
    tiny_hidden_size: int = 128
    """hidden size of the tiny model (only with --model tiny)"""
    tiny_num_layers: int = 2
    """layers of the tiny model (only with --model tiny)"""
    # ---- data (in place of the RL scripts' rollout) -----------------------------------------
    total_steps: int = 1200
    """optimizer steps"""
    batch_size: int = 128
    """demonstrations per optimizer step, GLOBAL: over all ranks (each of N torchrun processes takes batch_size / N)"""
    max_new_tokens: int = 1024
    """demonstrations are cut to this many completion tokens (a cut one loses its EOS)"""
    # ---- optimisation ----------------------------------------------------------------------
    learning_rate: float = 2e-3
    """peak learning rate (from scratch the tiny model wants ~1e-3; a pretrained 0.5B ~1e-5)"""
    warmup_steps: int = 50
    """linear warm-up steps, then cosine decay to 10% of the peak; 0 = none"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    # ---- evaluation, checkpoints ----------------------------------------------------------
    # redeclared: SFT takes 1200 cheap steps (the RL scripts ~200 dear ones), so it checks 4x less often
    eval_every: int = 100
    """steps between quick greedy-accuracy checks on 64 held-out prompts (`eval_accuracy`); 0 = never"""
    save_every: int = 200
    """steps between resumable checkpoints; 0 = only at the end"""


def parse_args(argv=None) -> Args:
    return tyro.cli(Args, args=argv)


def validate(args: Args, world_size: int = 1) -> tuple[int, int]:
    """Reject bad values; derive the batch arithmetic once: each of world_size ranks takes
    rank_rows = batch_size / world_size demonstrations per step, accumulated over micro-batches of
    micro_size rows. Returns (rank_rows, micro_size)."""
    check_at_least(args, 1, "total_steps", "batch_size", "max_new_tokens", "tiny_hidden_size", "tiny_num_layers")
    check_at_least(args, 0, "warmup_steps", "weight_decay")
    check_positive(args, "learning_rate", "max_grad_norm")
    check(args.tiny_hidden_size % 4 == 0, "tiny_hidden_size", "must be a multiple of 4 (the tiny model's heads)")
    rank_rows = exact_div(args.batch_size, world_size, "batch_size", "nproc_per_node")
    micro_size = min(args.micro_batch_size, rank_rows)
    exact_div(rank_rows, micro_size, "batch_size", "micro_batch_size")
    return rank_rows, micro_size


# ==== The algorithm: the loss, and the schedule. Pure functions; tests import them ====


def sft_loss(logp: torch.Tensor, mask: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """-sum(mask * logp) / num_tokens, num_tokens counted over the whole optimizer batch (all ranks).

    logp, mask (b, C). Summing micro-batch losses built this way gives exactly the full-batch
    token-mean loss, whatever the micro-batch size: e.g. logp = [[-1, -3]], mask = [[1, 0]] and
    num_tokens = 4 (three more tokens in other micro-batches) give 0.25.
    """
    return -masked_sum(logp, mask) / num_tokens


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """The multiplier of the peak learning rate: linear warm-up, then cosine to 10% of the peak.
    E.g. warmup 50, total 1200: step 0 -> 0.02, step 49 -> 1.0, step 1200 -> 0.1."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def main(args: Args):
    # ---- Setup: batch arithmetic, run folder, device, task ----------------------------------
    world, run_dir, dtype = start_run(args, "sft", rank_seed=False)  # --seed on every rank: the same initial weights
    rank_rows, micro_size = validate(args, world.size)  # rank_rows: this rank's demonstrations per step
    task = load_task(args.task)

    # ---- Setup: policy (from scratch or loaded), optimizer, schedule --------------------------
    if args.model == TINY:  # a fresh Llama with a character tokenizer, offline
        tokenizer = build_char_tokenizer()
        model = build_tiny_model(tokenizer, args.tiny_hidden_size, args.tiny_num_layers, seed=args.seed)
        model = model.to(device=world.device, dtype=dtype)
    else:
        model, tokenizer = load_model_and_tokenizer(args.model, world.device, dtype)
    if args.lora_rank:  # LoRA: only low-rank adapters train
        model = add_lora(model, args.lora_rank, args.lora_alpha)
    model.train()
    eos_ids = eos_token_ids(model, tokenizer)
    policy = wrap_model(model, world, args.fsdp)  # what the update runs: DDP / FSDP2 under torchrun, else the model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate,
                                  weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, args.warmup_steps, args.total_steps))

    # ---- Setup: resume, logger ----------------------------------------------------------------
    start_step, data_position = 0, 0
    if args.resume:
        start_step, extra = resume_from(run_dir, model, optimizer, scheduler, learning_rate=args.learning_rate)
        data_position = extra["data_position"]
    logger = RunLogger(run_dir, args, "sft", resume_step=start_step if args.resume else None)
    print(f"sft: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, task {task.name}, "
          f"{len(task.train)} demonstrations, device {world.device}, dtype {dtype}, {world.size} process(es)")

    progress = tqdm(range(start_step, args.total_steps), initial=start_step, total=args.total_steps, desc="sft",
                    disable=not world.is_main)
    quick_accuracy = float("nan")
    for step in progress:
        step_start = time.perf_counter()
        # ---- 1. Generate: none; the next batch_size demonstrations of the (seed, position) stream ----
        # rank r takes the r-th slice of rank_rows of them
        rollout = demonstration_rollout(tokenizer, task, data_position + world.rank * rank_rows, rank_rows, args.seed,
                                        "demonstration", eos_ids[0], args.max_new_tokens, world.device, split="train")
        data_position += args.batch_size
        # ---- 2. Reward, 3. Advantage, 4. Score: none, w = 1 on every demonstration token ---------
        mask = rollout.policy_mask.float()  # (B, C) the demonstrator's tokens (not tool observations)

        # ---- 5. Update: one optimizer step on the whole batch (1 epoch x 1 minibatch) ------------
        for minibatch in minibatches(policy, mask, 1, 1, 1, micro_size):
            for micro_rows in minibatch:
                micro, m = rollout[micro_rows], mask[micro_rows]  # m: (b, C)
                logp, _ = rollout_logprobs(policy, micro)  # (b, C) at T = 1: SFT samples nothing
                loss = sft_loss(logp, m, minibatch.num_tokens)  # -sum(m * logp) / tokens of the whole batch
                minibatch.backward(loss)
            loss, grad_norm = minibatch.step(optimizer, args.max_grad_norm, step + 1, run_dir)
            scheduler.step()
        # ---- 6. Sync: none, nothing samples during training ----------------------------------------

        # ---- 7. Log (and a quick greedy accuracy now and then: the bar shows learning, not just loss) ----
        evaluating = args.eval_every and (step + 1) % args.eval_every == 0
        if evaluating:
            quick_accuracy = greedy_accuracy(model, tokenizer, task, eos_ids=eos_ids)
        step_time = time.perf_counter() - step_start
        metrics = {"loss": loss, "grad_norm": grad_norm, "learning_rate": scheduler.get_last_lr()[0],
                   "num_tokens": minibatch.num_tokens,
                   "train_tokens_per_s": int((rollout.prompt_mask.sum() + mask.sum()) / step_time),  # this rank's
                   "step_time": step_time, **({"eval_accuracy": quick_accuracy} if evaluating else {})}
        logger.log(step + 1, metrics)
        progress.set_postfix(loss=f"{loss:.3f}", acc=f"{quick_accuracy:.2f}")
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.total_steps:
            save_checkpoint(run_dir, model, tokenizer, optimizer, scheduler, step + 1, {"data_position": data_position})

    # ---- Finish: checkpoint, final model, held-out evaluation ----------------------------------
    save_checkpoint(run_dir, model, tokenizer, optimizer, scheduler, args.total_steps, {"data_position": data_position})
    return finish_run(run_dir, model, tokenizer, task, None, eos_ids, args, task.max_new_tokens, logger)


if __name__ == "__main__":
    main(parse_args())
