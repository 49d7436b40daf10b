"""SFT: supervised fine-tuning on expert demonstrations, completion-only loss.

    L = - sum_{i,t} mask_{i,t} * log pi_theta(y*_{i,t} | x_i, y*_{i,<t}) / sum_{i,t} mask_{i,t}

In the one view that ties this project together, loss = - E[ w * log pi_theta(y | x) ]:
SFT is the case "y from an expert (off-policy), w = 1 on every completion token, positives
only". The RL scripts keep the same shape and change where y comes from and what w is.

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
import os
import time
from dataclasses import asdict, dataclass

import torch
import tyro
from tqdm import tqdm

from common import distributed
from common.checkpoint import resume_from, save_checkpoint, save_final_model, stop_if_not_finite
from common.cli import Dtype, check, exact_div
from common.distributed import all_reduce, clip_grad_norm, grad_sync, setup_distributed, wrap_model
from common.evaluation import evaluate, greedy_accuracy
from common.logprobs import completion_logprobs, masked_sum
from common.models import (
    TINY,
    add_lora,
    build_char_tokenizer,
    build_tiny_model,
    eos_token_ids,
    load_model_and_tokenizer,
    pick_dtype,
)
from common.tasks import DEFAULT_TASK, encode_demonstrations, format_prompt, load_task, rows_at
from common.tracking import RunLogger, print_config, print_eval


@dataclass
class Args:
    model: str = TINY
    """`tiny` builds a fresh 0.5M-parameter model offline; else a local folder or a hub id"""
    task: str = DEFAULT_TASK
    """task name (see common/tasks.py): add_noisy, add_carry_noisy, add, countdown, gsm8k"""
    run_name: str = "sft"
    """outputs go to runs/<run_name>/; the RL scripts read runs/sft by default"""
    seed: int = 1
    """seed for initialisation, data order and sampling"""
    total_steps: int = 1200
    """optimizer steps"""
    batch_size: int = 128
    """demonstrations per optimizer step, over all ranks (each of N torchrun processes takes batch_size / N)"""
    micro_batch_size: int = 128
    """demonstrations per forward/backward on each rank; batch_size / N must be a multiple (accumulation)"""
    learning_rate: float = 2e-3
    """peak learning rate (from scratch the tiny model wants ~1e-3; a pretrained 0.5B ~1e-5)"""
    warmup_steps: int = 50
    """linear warm-up steps, then cosine decay to 10% of the peak"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping by global norm"""
    fsdp: bool = False
    """under torchrun: shard weights, gradients and AdamW state over the ranks (FSDP2) instead of DDP's full copies"""
    lora_rank: int = 0
    """r > 0: train LoRA adapters of rank r on every linear layer, base frozen (pip install -e '.[lora]'); 0 = full"""
    lora_alpha: float = 32.0
    """LoRA scale alpha: the adapter adds (alpha / r) B A x"""
    max_completion_len: int = 1024
    """demonstrations are cut to this many tokens"""
    eval_every: int = 100
    """steps between quick greedy-accuracy checks (shown in the progress bar); 0 = never"""
    save_every: int = 200
    """steps between resumable checkpoints; 0 = only at the end"""
    num_eval_prompts: int = 200
    """held-out prompts in the final evaluation"""
    num_eval_samples: int = 8
    """samples per prompt at T = 1 for pass@k in the final evaluation"""
    tiny_hidden_size: int = 128
    """hidden size of the tiny model (only with --model tiny)"""
    tiny_num_layers: int = 2
    """layers of the tiny model (only with --model tiny)"""
    device: str = "auto"
    """auto, cpu, cuda or cuda:N (under torchrun: cuda means each rank's own GPU, cuda:LOCAL_RANK)"""
    dtype: Dtype = "auto"
    """auto (bf16 on GPU, fp32 on CPU), float32, bfloat16 or float16"""
    resume: bool = False
    """continue from runs/<run_name>/checkpoint (same step, data order, optimizer and RNG)"""
    tensorboard: bool = True
    """write TensorBoard events to the run folder"""
    track: bool = False
    """also log to Weights & Biases (pip install wandb)"""
    wandb_project: str = "llm-post-training"
    """wandb project name, with --track"""


def parse_args(argv=None) -> Args:
    return tyro.cli(Args, args=argv)


def validate(args: Args, world_size: int = 1) -> int:
    """Reject bad values; return the demonstrations per rank per step."""
    check(args.total_steps > 0, "total_steps", "must be positive")
    rank_batch = exact_div(args.batch_size, world_size, "batch_size", "nproc_per_node")
    if world_size == 1:
        exact_div(rank_batch, args.micro_batch_size, "batch_size", "micro_batch_size")
    check(rank_batch % args.micro_batch_size == 0, "micro_batch_size", f"each of the {world_size} processes takes "
          f"--batch-size / {world_size} = {rank_batch} demonstrations, not a multiple of {args.micro_batch_size}")
    check(args.learning_rate > 0, "learning_rate", "must be positive")
    check(args.num_eval_samples >= 1, "num_eval_samples", "must be at least 1")
    check(args.lora_rank >= 0, "lora_rank", "must be >= 0 (0 = train every weight)")
    check(not (args.lora_rank and args.fsdp), "fsdp", "LoRA is for a model whose base fits one device; "
          "drop --fsdp (DDP then copies the base to each rank) or --lora-rank")
    return rank_batch


def sft_loss(logprobs: torch.Tensor, completion_mask: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """-sum(mask * logp) / num_tokens, num_tokens counted over the whole optimizer batch.

    logprobs, completion_mask (B, C). Summing micro-batch losses built this way gives
    exactly the full-batch token-mean loss, whatever the micro-batch size.
    """
    return -masked_sum(logprobs, completion_mask) / num_tokens


def main(args: Args):
    world = setup_distributed(args.device)  # rank 0 of 1 under plain python; see common/distributed.py
    rank_batch = validate(args, world.size)  # demonstrations per rank per step
    run_dir = os.path.join("runs", args.run_name)
    device = world.device
    dtype = pick_dtype(args.dtype, device)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    task = load_task(args.task)

    if args.model == TINY:
        tokenizer = build_char_tokenizer()
        model = build_tiny_model(tokenizer, args.tiny_hidden_size, args.tiny_num_layers, seed=args.seed)
        model = model.to(device=device, dtype=dtype)
    else:
        model, tokenizer = load_model_and_tokenizer(args.model, device, dtype)
    if args.lora_rank:  # LoRA: only low-rank adapters train
        model = add_lora(model, args.lora_rank, args.lora_alpha)
    model.train()
    eos_ids = eos_token_ids(model, tokenizer)
    train_model = wrap_model(model, world, args.fsdp)  # DDP / FSDP2 under torchrun; the model itself otherwise
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate,
                                  weight_decay=args.weight_decay)

    def lr_lambda(step):  # linear warm-up, then cosine to 10% of the peak
        if step < args.warmup_steps:
            return (step + 1) / args.warmup_steps
        progress = (step - args.warmup_steps) / max(1, args.total_steps - args.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)

    start_step, data_position = 0, 0
    if args.resume:
        start_step, extra = resume_from(run_dir, model, optimizer, scheduler, learning_rate=args.learning_rate)
        data_position = extra["data_position"]
    logger = RunLogger(run_dir, asdict(args), args.tensorboard, args.wandb_project if args.track else None,
                       resume_step=start_step if args.resume else None)
    print(f"sft: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, task {task.name}, "
          f"{len(task.train)} demonstrations, device {device}, dtype {dtype}, {world.size} process(es)")
    print_config(asdict(args))

    num_micro_batches = rank_batch // args.micro_batch_size
    progress = tqdm(range(start_step, args.total_steps), initial=start_step, total=args.total_steps, desc="sft",
                    disable=not world.is_main)
    quick_accuracy = float("nan")
    for step in progress:
        step_start = time.perf_counter()
        # 1. The next batch_size demonstrations of the shuffled stream (a function of seed and position);
        #    rank r takes the r-th slice of rank_batch of them.
        rows = task.train[rows_at(len(task.train), data_position + world.rank * rank_batch, rank_batch, args.seed)]
        data_position += args.batch_size
        prompts = [format_prompt(tokenizer, q, task.system_prompt) for q in rows["question"]]
        prompt_ids, prompt_mask, completion_ids, completion_mask = encode_demonstrations(
            tokenizer, prompts, rows["demonstration"], eos_ids[0], args.max_completion_len
        )
        num_tokens = int(all_reduce(completion_mask.sum()))  # normaliser over the whole optimizer batch, all ranks

        # 2. Gradient accumulation over micro-batches; the loss is a sum of per-token terms
        #    divided by the batch's token count, so the gradient equals the full-batch one.
        total_loss = 0.0
        for mb in range(num_micro_batches):
            grad_sync(train_model, last=mb == num_micro_batches - 1)  # DDP / FSDP2: average ranks' gradients once
            s = slice(mb * args.micro_batch_size, (mb + 1) * args.micro_batch_size)
            logprobs, _ = completion_logprobs(
                train_model, prompt_ids[s].to(device), prompt_mask[s].to(device),
                completion_ids[s].to(device), completion_mask[s].to(device),
            )  # (b, C)
            loss = sft_loss(logprobs, completion_mask[s].to(device), num_tokens)
            (loss * world.size).backward()  # the ranks' gradients are averaged: x N makes them a sum
            total_loss += loss.item()
        total_loss = all_reduce(total_loss)  # the batch's loss: the sum of the ranks' shares
        grad_norm = clip_grad_norm(train_model, args.max_grad_norm)
        stop_if_not_finite(step + 1, run_dir, loss=total_loss, grad_norm=grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        # 3. A quick greedy accuracy on held-out prompts, so the bar shows learning, not just loss.
        if args.eval_every and (step + 1) % args.eval_every == 0:
            quick_accuracy = greedy_accuracy(model, tokenizer, task, eos_ids=eos_ids)
        step_time = time.perf_counter() - step_start
        metrics = {
            "loss": total_loss,
            "grad_norm": grad_norm.item(),
            "learning_rate": scheduler.get_last_lr()[0],
            "num_tokens": num_tokens,
            "train_tokens_per_s": int((prompt_mask.sum() + completion_mask.sum()) / step_time),  # this rank's
            "step_time": step_time,
        }
        if args.eval_every and (step + 1) % args.eval_every == 0:
            metrics["eval_accuracy"] = quick_accuracy
        logger.log(step + 1, metrics)
        progress.set_postfix(loss=f"{total_loss:.3f}", acc=f"{quick_accuracy:.2f}")
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.total_steps:
            save_checkpoint(run_dir, model, tokenizer, optimizer, scheduler, step + 1,
                            {"data_position": data_position})

    save_checkpoint(run_dir, model, tokenizer, optimizer, scheduler, args.total_steps, {"data_position": data_position})
    save_final_model(run_dir, model, tokenizer)
    result = evaluate(model, tokenizer, task, args.num_eval_prompts, args.num_eval_samples, eos_ids=eos_ids)
    logger.log(args.total_steps, result)
    logger.close()
    print_eval(result, run_dir)
    distributed.cleanup()
    return result


if __name__ == "__main__":
    main(parse_args())
