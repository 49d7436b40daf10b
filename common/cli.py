"""The flags every script shares (RunArgs, RLRunArgs) and argument checks that fail with one line
naming the flag and the fix, never a stack trace."""

import math
import os
import re
import sys
from dataclasses import dataclass, replace
from typing import Literal

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
"""The --dtype of every script: tyro rejects anything else. auto = bf16 on a GPU, fp32 on CPU."""


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def arg_error(name: str, message: str):
    raise SystemExit(f"error: {flag(name)}: {message}")


def check(condition: bool, name: str, message: str):
    if not condition:
        arg_error(name, message)


def exact_div(a: int, b: int, a_name: str, b_name: str) -> int:
    """a // b, failing loudly (naming both flags) when b does not divide a."""
    check(b > 0, b_name, f"must be positive, got {b}")
    check(a % b == 0, a_name, f"{a} is not divisible by {flag(b_name)} {b}; pick a multiple of {b}")
    return a // b


def rollout_batch_sizes(num_prompts: int, group_size: int, num_minibatches: int, micro_batch_size: int,
                        world_size: int) -> tuple[int, int]:
    """The batch arithmetic of every RL script, derived once: each of world_size ranks samples
    num_prompts / world_size prompts, a rollout batch of rank_rows = that * G rows, cut into
    num_minibatches optimizer steps of whole groups, each accumulated over micro-batches of
    micro_size rows. Fails naming the flags when they do not divide. Returns (rank_rows, micro_size)."""
    rank_rows = exact_div(num_prompts, world_size, "num_prompts", "nproc_per_node") * group_size
    minibatch_size = exact_div(rank_rows, num_minibatches, "num_prompts", "num_minibatches")
    check(minibatch_size % group_size == 0, "num_minibatches", "each minibatch must hold whole groups")
    micro_size = min(micro_batch_size, minibatch_size)
    exact_div(minibatch_size, micro_size, "num_prompts", "micro_batch_size")
    return rank_rows, micro_size


def check_at_least(args, minimum: float, *names: str):
    """Each named flag is a finite number >= minimum (counts: 1; budgets and coefficients: 0)."""
    for name in names:
        value = getattr(args, name)
        check(math.isfinite(value) and value >= minimum, name, f"must be >= {minimum}, got {value}")


def check_positive(args, *names: str):
    """Each named flag is a finite number > 0 (learning rates, temperatures, epsilons)."""
    for name in names:
        value = getattr(args, name)
        check(math.isfinite(value) and value > 0, name, f"must be a finite number > 0, got {value}")


def check_fraction(args, *names: str):
    """Each named flag lies in (0, 1]."""
    for name in names:
        value = getattr(args, name)
        check(0 < value <= 1, name, f"must be in (0, 1], got {value}")


def check_device(device: str):
    """--device is auto, cpu, cuda or cuda:N (N a GPU index), and a cuda device exists on this machine
    (under torchrun each rank takes cuda:LOCAL_RANK whatever N says, so N is not checked there)."""
    check(device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", device) is not None, "device",
          f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")
    if device.startswith("cuda"):
        import torch

        count = torch.cuda.device_count()
        check(count > 0, "device", f"{device}: torch sees no CUDA GPU here (torch {torch.__version__}, CUDA "
              f"{torch.version.cuda or 'not compiled in'}); use --device cpu, or auto to take a GPU when there is one")
        index = int(device.partition(":")[2] or 0)
        check(index < count or "WORLD_SIZE" in os.environ, "device",
              f"{device}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}")


def parse_with_presets(args_class, presets: dict, argv=None):
    """tyro CLI whose defaults are the chosen `--preset`'s: `--preset dapo --eps-high 0.3` keeps 0.3."""
    import tyro

    argv = sys.argv[1:] if argv is None else argv
    preset = "grpo" if "grpo" in presets else next(iter(presets))
    for i, arg in enumerate(argv):
        if arg == "--preset" and i + 1 < len(argv):
            preset = argv[i + 1]
        elif arg.startswith("--preset="):
            preset = arg.split("=", 1)[1]
    if preset not in presets:
        arg_error("preset", f"unknown preset {preset!r}; choose one of {', '.join(presets)}")
    return tyro.cli(args_class, args=argv, default=replace(args_class(), preset=preset, **presets[preset]))


# ==== The run's plumbing: every script's Args extends these, so its own Args holds its algorithm ====


@dataclass
class RunArgs:
    """Flags of every script: run folder, seed, hardware, torchrun / FSDP2 / LoRA, evaluation, logging."""

    # ---- run, hardware, scale-out ------------------------------------------------------------
    run_name: str = ""
    """outputs go to runs/<run_name>/; empty = the script's name (runs/sft, runs/grpo, ...)"""
    seed: int = 1
    """seed for initialisation, data order and sampling (the held-out evaluation prompts never change)"""
    device: str = "auto"
    """auto, cpu, cuda or cuda:N (under torchrun: cuda means each rank's own GPU, cuda:LOCAL_RANK)"""
    dtype: Dtype = "auto"
    """auto (bf16 on GPU, fp32 on CPU), float32 or bfloat16 (float16 is refused: AdamW turns it NaN in one step)"""
    micro_batch_size: int = 128
    """rows per forward/backward on each rank; gradients accumulate to the optimizer step (same result)"""
    max_grad_norm: float = 1.0
    """gradient clipping by global norm"""
    fsdp: bool = False
    """under torchrun: shard weights, gradients and AdamW state over the ranks (FSDP2) instead of DDP's full copies"""
    lora_rank: int = 0
    """r > 0: train LoRA adapters of rank r on every linear layer, base frozen (pip install -e '.[lora]'); 0 = full"""
    lora_alpha: float = 32.0
    """LoRA scale alpha: the adapter adds (alpha / r) B A x"""
    # ---- evaluation, checkpoints, logging ----------------------------------------------------
    num_eval_prompts: int = 200
    """held-out prompts in the final evaluation"""
    num_eval_samples: int = 8
    """samples per prompt at T = 1 for pass@k in the final evaluation"""
    eval_every: int = 25
    """steps between quick greedy-accuracy checks on 64 held-out prompts (`eval_accuracy`); 0 = never"""
    save_every: int = 50
    """steps between resumable checkpoints; 0 = only at the end"""
    resume: bool = False
    """continue from runs/<run_name>/checkpoint (same step, data order, optimizer and RNG)"""
    tensorboard: bool = True
    """write TensorBoard events to the run folder"""
    track: bool = False
    """also log to Weights & Biases (pip install wandb)"""
    wandb_project: str = "llm-post-training"
    """wandb project name, with --track"""


@dataclass
class RLRunArgs(RunArgs):
    """RunArgs plus the rollout engine the RL scripts sample with."""

    # ---- rollout engine ------------------------------------------------------------------------
    max_new_tokens: int = 0
    """completion budget; 0 = the task's default"""
    top_p: float = 1.0
    """nucleus sampling; < 1 biases the importance ratio (the trainer does not truncate)"""
    max_turns: int = 0
    """a tool task (tool_calc): policy turns per completion, tool calls in between; 0 = the task's own (3)"""
    tool_call_cost: float = 0.0
    """a tool task: R_i loses this per tool call (logged as reward/call_cost); 0 = calls are free"""
    rollout: Literal["hf", "vllm"] = "hf"
    """rollout backend: HF generate, or a vLLM engine in this process (pip install -e '.[cpu]' or '.[gpu]')"""
    vllm_gpu_memory_utilization: float = 0.3
    """--rollout vllm on CUDA: share of GPU memory vLLM reserves (weights + KV cache); ignored on CPU"""
    vllm_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """--rollout vllm: the engine's dtype; auto = bf16 on CUDA, the trainer's --dtype on CPU"""
    sync_every: int = 1
    """--rollout vllm: copy the trainer's weights into vLLM every k steps (k > 1: samples up to k-1 steps stale)"""
    # ---- learned reward ------------------------------------------------------------------------
    reward_model: str = ""
    """a reward_model.py run (bt or judge): its score replaces the verifier's in the advantage; the verifier
    still runs and is logged as the gold accuracy. "" = the verifier is the reward"""


def validate_run(args: RunArgs):
    """The checks of the shared flags, once for every script."""
    check_device(args.device)
    check_at_least(args, 1, "micro_batch_size", "num_eval_prompts", "num_eval_samples")
    check_positive(args, "max_grad_norm")
    check_at_least(args, 0, "eval_every", "save_every", "lora_rank")
    check(args.dtype != "float16", "dtype", "float16 weights turn NaN at the first AdamW step (no loss scaling or fp32 "
          "master weights here; AdamW's eps 1e-8 is 0 in float16); use bfloat16 (GPU) or float32")
    check(not args.lora_rank or (math.isfinite(args.lora_alpha) and args.lora_alpha > 0), "lora_alpha",
          f"must be a finite number > 0 with --lora-rank, got {args.lora_alpha}")
    check(not (args.lora_rank and args.fsdp), "fsdp", "LoRA is for a model whose base fits one device; "
          "drop --fsdp (DDP then copies the base to each rank) or --lora-rank")
    check(re.fullmatch(r"[\w.\-]+(/[\w.\-]+)*", args.run_name or "x") is not None and ".." not in args.run_name,
          "run_name", f"{args.run_name!r} is not a folder name; use letters, digits, '.', '-', '_' (and '/')")
    if isinstance(args, RLRunArgs):
        check_at_least(args, 0, "max_new_tokens", "max_turns", "tool_call_cost")
        check_fraction(args, "top_p", "vllm_gpu_memory_utilization")
        if args.top_p < 1:
            print("warning: --top-p < 1: the trainer scores the untruncated distribution, so ratios are biased")
        check(args.sync_every == 1 or (args.rollout == "vllm" and args.sync_every > 1), "sync_every",
              "must be >= 1, and 1 with --rollout hf: HF generate always samples with the current weights")
        if args.reward_model:
            check_reward_model_folder(args.reward_model)


def check_reward_model_folder(path: str):
    """--reward-model is a folder reward_model.py wrote (it holds reward_model.json), else one line says what it is."""
    check(os.path.isdir(path), "reward_model", f"{path}: no such folder; train one with `python reward_model.py` "
          "(it writes runs/reward_model)")
    check(os.path.isfile(os.path.join(path, "reward_model.json")), "reward_model",
          f"{path} is not a reward_model.py run (no reward_model.json)"
          + ("; it holds a policy (pass it as --model)" if os.path.isfile(os.path.join(path, "config.json")) else ""))
