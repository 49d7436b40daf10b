"""SFT and RL in one objective: weighted sum, LUFFY, rejection-sampling fine-tuning, on-policy distillation.

RL can only re-weight what the model can already sample; SFT can teach what it cannot. Each
`--mode` brings an expert's signal into GRPO's on-policy loop (docs/spec.md §5), per token t:

    weighted  L   = (1 - mu) L_GRPO + mu L_SFT          L_SFT = NLL of the expert's completion y*
    luffy     A   = group-relative over the G samples + the expert's y* (G + 1 members)
              l_t = -min(r_t A_i, clip(r_t) A_i)         on-policy members, as grpo.py
              l_t = -A_exp * f(pi_theta(y*_t))          the expert, f(p) = p / (p + gamma), no clip
    rft       l_t = -log pi_theta(y_t)                  only on samples the verifier accepted
    distill   A_t = sg(log pi_teacher(y_t) - log pi_theta(y_t)),   l_t = -min(r_t A_t, clip(r_t) A_t)

In the one view of this project, loss = - E[ w * log pi_theta(y | x) ]:
  method                 y comes from              w
  SFT (sft.py)           the expert (off-policy)   1
  RL (grpo.py)           the policy (on-policy)    A (times a clipped ratio)
  weighted               both                      (1 - mu) A on samples, mu on the expert's tokens
  luffy                  both, in one group        A on samples; A_exp * gamma / (p + gamma)^2 * p on the expert's
  rft                    the policy, filtered      1[accepted]: SFT on its own successes, no negatives
  distill                the policy                the teacher's per-token log-ratio (reverse KL, no reward)
Where it sits among the siblings:
  grpo.py          reward -> group-relative A; nothing the model cannot sample can be learnt
  sft_rl_mixed.py  the same loop, plus tokens whose weight comes from an expert or a teacher
  sft.py           the expert's tokens only, w = 1

Modes and their flags:
  --mode weighted  --mu 0.5 --mu-schedule constant|linear|chord (--mu-warmup-steps, --mu-min): CHORD-style
                   (Zhang et al. 2025) warm-up then decay. mu = 0 is grpo.py, mu = 1 is sft.py (tested).
  --mode luffy     Yan et al. 2025, --luffy-gamma 0.1. The task's `expert` column is the extra group member.
  --mode rft       Yuan et al. 2023: G samples per prompt, keep the accepted ones (--rft-dedup), SFT on them.
  --mode distill   Agarwal et al. 2024 (GKD), Thinking Machines 2025. --teacher PATH (same tokenizer).
                   --distill-form sampled (default): the teacher scores only the sampled tokens, once per
                   batch in step 4, and the loss is grpo.py's surrogate with a per-token advantage; any
                   server that returns logprobs can be the teacher. --distill-form full: the exact per-position
                   KL(pi_theta || pi_teacher) over the vocabulary, lower variance, but a teacher forward per
                   micro-batch and two (b, C, V) tensors in memory (fine for the tiny model; lower
                   --micro-batch-size for a large vocabulary).
Every mode logs how much of the loss and of the gradient comes from expert/teacher tokens (`loss/expert`,
`grad_norm/expert`, `grad_share/expert`) and how much from on-policy ones (`.../on_policy`).

Run:  python sft.py && python sft_rl_mixed.py --mode luffy
      python sft.py --task add --run-name sft_add_teacher && python sft_rl_mixed.py --mode distill \
          --teacher runs/sft_add_teacher                                      --help
"""

import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import tyro
from tqdm import tqdm

from common.checkpoint import (resume_from, save_checkpoint, save_final_model, stop_if_not_finite,
                               warn_if_task_mismatch)
from common import distributed
from common.cli import Dtype, arg_error, check, check_device, exact_div
from common.evaluation import evaluate, greedy_accuracy
from common.logprobs import (entropy_from_logits, masked_sum, rollout_logits, rollout_logprobs, score_rollout,
                             selective_log_softmax)
from common.distributed import all_gather, all_reduce, all_reduce_grads, clip_grad_norm, setup_distributed
from common.models import (add_lora, eos_token_ids, frozen_reference, load_model_and_tokenizer, looks_like_path,
                           pick_dtype)
from common.rollout import build_engine, demonstration_rollout, generate_and_score, reward_metrics
from common.tasks import DEFAULT_TASK, load_task, rows_at
from common.tracking import RunLogger, StepStats, print_config, print_eval, timed


@dataclass
class Args:
    # ---- what to train --------------------------------------------------------------------
    model: str = "runs/sft"
    """policy to start from (and the frozen reference): a folder, a hub id, or qwen2-tiny:random (offline)"""
    task: str = DEFAULT_TASK
    """task name (see common/tasks.py); weighted and luffy need one with an `expert` column"""
    mode: Literal["weighted", "luffy", "rft", "distill"] = "weighted"
    """how expert signal meets on-policy learning (see the docstring)"""
    teacher: str = ""
    """--mode distill: the frozen teacher, a model folder with the policy's tokenizer (e.g. runs/sft_add_teacher)"""
    run_name: str = "sft_rl_mixed"
    """outputs go to runs/<run_name>/"""
    seed: int = 1
    """seed for data order and sampling"""
    # ---- rollout ---------------------------------------------------------------------------
    total_steps: int = 200
    """optimizer steps (one rollout batch each, times num_epochs * num_minibatches updates)"""
    num_prompts: int = 16
    """prompts per rollout batch, over all ranks (each of N torchrun processes samples num_prompts / N)"""
    group_size: int = 8
    """G: completions sampled per prompt (rft: k, the samples the verifier filters)"""
    temperature: float = 1.0
    """sampling temperature; the trainer scores logits / temperature, the same distribution"""
    top_p: float = 1.0
    """nucleus sampling; < 1 biases the importance ratio (the trainer does not truncate)"""
    max_new_tokens: int = 0
    """completion budget; 0 = the task's default (expert demonstrations are cut to it too)"""
    rollout: Literal["hf", "vllm"] = "hf"
    """rollout backend: HF generate, or a vLLM engine in this process (pip install -e '.[cpu]' or '.[gpu]')"""
    vllm_gpu_memory_utilization: float = 0.3
    """--rollout vllm on CUDA: share of GPU memory vLLM reserves (weights + KV cache); ignored on CPU"""
    vllm_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """--rollout vllm: the engine's dtype; auto = bf16 on CUDA, the trainer's --dtype on CPU"""
    sync_every: int = 1
    """--rollout vllm: copy the trainer's weights into vLLM every k steps (k > 1: samples up to k-1 steps stale)"""
    # ---- reward ----------------------------------------------------------------------------
    format_weight: float = 0.0
    """weight of the format reward (ended with EOS and committed to an answer); distill ignores rewards"""
    # ---- advantage -------------------------------------------------------------------------
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """divide (R - group mean) by the group std (GRPO), the batch std, or nothing (Dr. GRPO)"""
    adv_eps: float = 1e-4
    """eps in (R - mean) / (std + eps)"""
    rft_dedup: bool = True
    """rft: keep each distinct accepted completion of a prompt once (Yuan et al.: distinct reasoning paths)"""
    # ---- policy loss -----------------------------------------------------------------------
    eps_low: float = 0.2
    """clip range below 1"""
    eps_high: float = 0.2
    """clip range above 1"""
    beta: float = 0.04
    """KL coefficient (on the policy's own tokens, every mode); 0 loads no reference model"""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """estimator of KL(pi_theta || pi_ref) used in the loss (Schulman): k3 is GRPO's"""
    ent_coef: float = 0.0
    """entropy bonus: subtract ent_coef * H_t from each on-policy token's loss"""
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = "seq-mean-token-mean"
    """how token losses become one number (see aggregate_loss); the SFT terms are token means, as sft.py"""
    mask_truncated: bool = False
    """drop completions that hit max_new_tokens without EOS from the loss"""
    mu: float = 0.5
    """weighted: the SFT share of the loss (its peak with a schedule); 0 = grpo.py, 1 = sft.py on the expert"""
    mu_schedule: Literal["constant", "linear", "chord"] = "constant"
    """weighted: constant mu; linear decay from mu to --mu-min; chord: linear warm-up to mu, then decay"""
    mu_warmup_steps: int = 20
    """weighted, --mu-schedule chord: steps of the warm-up from 0 to mu"""
    mu_min: float = 0.0
    """weighted, --mu-schedule linear|chord: mu at the last step"""
    luffy_gamma: float = 0.1
    """luffy: gamma in the policy shaping f(p) = p / (p + gamma) of the expert's tokens"""
    distill_form: Literal["sampled", "full"] = "sampled"
    """distill: per-token advantage on the sampled token, or the exact KL over the whole vocabulary"""
    # ---- optimisation ----------------------------------------------------------------------
    learning_rate: float = 2e-4
    """AdamW learning rate (constant)"""
    max_grad_norm: float = 1.0
    """gradient clipping by global norm"""
    num_epochs: int = 1
    """mu: passes over each rollout batch (> 1 makes r != 1 and the clip matter)"""
    num_minibatches: int = 1
    """optimizer steps per pass: the rollout batch is split into this many minibatches of whole groups"""
    micro_batch_size: int = 128
    """completions per forward/backward on each rank; gradients accumulate to the minibatch"""
    fsdp: bool = False
    """not supported here: the gradient split by source (expert / on-policy) needs each rank's full gradient"""
    lora_rank: int = 0
    """r > 0: train LoRA adapters of rank r on every linear layer, base frozen (pip install -e '.[lora]'); 0 = full"""
    lora_alpha: float = 32.0
    """LoRA scale alpha: the adapter adds (alpha / r) B A x"""
    # ---- evaluation, checkpoints, logging ----------------------------------------------------
    num_eval_prompts: int = 200
    """held-out prompts in the final evaluation"""
    num_eval_samples: int = 8
    """samples per prompt at T = 1 for pass@k"""
    eval_every: int = 25
    """steps between quick greedy-accuracy checks on 64 held-out prompts (`eval_accuracy`); 0 = never"""
    save_every: int = 50
    """steps between resumable checkpoints"""
    device: str = "auto"
    """auto, cpu, cuda or cuda:N (under torchrun: cuda means each rank's own GPU, cuda:LOCAL_RANK)"""
    dtype: Dtype = "auto"
    """auto (bf16 on GPU, fp32 on CPU), float32, bfloat16 or float16"""
    resume: bool = False
    """continue from runs/<run_name>/checkpoint"""
    tensorboard: bool = True
    """write TensorBoard events to the run folder"""
    track: bool = False
    """also log to Weights & Biases"""
    wandb_project: str = "llm-post-training"
    """wandb project name, with --track"""


def parse_args(argv=None) -> Args:
    return tyro.cli(Args, args=argv)


def validate(args: Args, max_new_tokens: int, world_size: int = 1) -> tuple[int, int, int]:
    """Reject bad values and silent knob combinations; derive the batch arithmetic once: a rollout batch
    of batch_size = num_prompts * G rows is cut into num_minibatches optimizer steps of whole groups
    (minibatch_size rows), each accumulated over micro-batches of micro_size rows."""
    check(args.group_size >= 2 or args.mode in ("rft", "distill"), "group_size",
          f"--mode {args.mode} needs >= 2 completions per prompt (the baseline is their mean)")
    check(args.group_size >= 1, "group_size", "must be >= 1")
    check(args.temperature > 0, "temperature", "must be > 0 for sampling")
    check(0 < args.top_p <= 1, "top_p", "must be in (0, 1]")
    check(args.eps_low >= 0 and args.eps_high >= 0, "eps_low", "clip ranges must be >= 0")
    check(args.beta >= 0 and args.ent_coef >= 0, "beta", "--beta and --ent-coef must be >= 0")
    check(0 <= args.mu_min <= args.mu <= 1, "mu", f"need 0 <= --mu-min <= --mu <= 1, got {args.mu_min}, {args.mu}")
    check(args.luffy_gamma > 0, "luffy_gamma", "must be > 0")
    check(args.mu_warmup_steps >= 0, "mu_warmup_steps", "must be >= 0")
    check_device(args.device)
    if args.top_p < 1:
        print("warning: --top-p < 1: the trainer scores the untruncated distribution, so ratios are biased")
    # knobs of one mode given to another would be silently ignored
    check(args.mode == "distill" or not args.teacher, "teacher", f"only --mode distill uses a teacher, not {args.mode}")
    check(args.mode != "distill" or bool(args.teacher), "teacher",
          "--mode distill needs a teacher folder, e.g. `python sft.py --task add --run-name sft_add_teacher` "
          "then --teacher runs/sft_add_teacher")
    defaults = Args()
    for name, mode in (("mu", "weighted"), ("mu_schedule", "weighted"), ("mu_warmup_steps", "weighted"),
                       ("mu_min", "weighted"), ("luffy_gamma", "luffy"), ("rft_dedup", "rft"),
                       ("distill_form", "distill")):
        check(args.mode == mode or getattr(args, name) == getattr(defaults, name), name,
              f"belongs to --mode {mode}; --mode {args.mode} would ignore it")
    check(args.mu_schedule != "constant" or args.mu_min == 0, "mu_min", "needs --mu-schedule linear or chord")
    check(args.sync_every == 1 or (args.rollout == "vllm" and args.sync_every > 1), "sync_every",
          "must be >= 1, and 1 with --rollout hf: HF generate always samples with the current weights")
    check(args.lora_rank >= 0, "lora_rank", "must be >= 0 (0 = train every weight)")
    check(not args.fsdp, "fsdp", "sft_rl_mixed.py splits each rank's full gradient by source (expert / "
          "on-policy), which FSDP2 shards; run it with DDP's full copies (drop --fsdp), or --lora-rank for memory")
    batch_size = exact_div(args.num_prompts, world_size, "num_prompts", "nproc_per_node") * args.group_size
    minibatch_size = exact_div(batch_size, args.num_minibatches, "num_prompts", "num_minibatches")
    check(minibatch_size % args.group_size == 0, "num_minibatches", "each minibatch must hold whole groups")
    micro_size = min(args.micro_batch_size, minibatch_size)
    exact_div(minibatch_size, micro_size, "num_prompts", "micro_batch_size")
    return batch_size, minibatch_size, micro_size


# ==== The algorithm: advantage, per-token loss, aggregation, KL. Pure functions; tests import them ====


def compute_advantages(rewards: torch.Tensor, scale_rewards: str, eps: float = 1e-4) -> torch.Tensor:
    """A_i = (R_i - mean(R_group)) / (std + eps), std over the group, the batch, or not at all.

    rewards (num_groups, G) -> advantages (num_groups, G); LUFFY passes G + 1 columns, the last
    one the expert's. std is the unbiased sample std (torch.std), as in grpo.py.
    >>> compute_advantages(torch.tensor([[0., 0., 0., 1.]]), "none")  # three samples wrong, the expert right
    tensor([[-0.2500, -0.2500, -0.2500,  0.7500]])
    """
    centred = rewards - rewards.mean(dim=1, keepdim=True)  # (num_groups, G)
    if scale_rewards == "group":
        return centred / (rewards.std(dim=1, keepdim=True) + eps)
    if scale_rewards == "batch":
        return centred / (rewards.std() + eps)
    return centred


def policy_token_loss(logp, logp_old, advantages, mask, args: Args):
    """The per-token loss l_t of the policy's own samples, before KL, entropy bonus and aggregation.

        r_t = exp(logp_t - logp_old_t);   l_t = -min(r_t A, clip(r_t, 1 - eps_low, 1 + eps_high) A)

    grpo.py's plain clipped surrogate. logp (b, C) with grad; logp_old (b, C) detached; advantages
    (b, 1) per completion (weighted, luffy) or (b, C) per token (distill). Returns (l_t, clipped_low,
    clipped_high), each (b, C).
    >>> one = torch.ones(1, 1)  # r = e^0.5 = 1.65 > 1 + eps, A = 1: the loss is clipped at -1.2 A
    >>> policy_token_loss(0.5 * one, 0 * one, one, one, Args())
    (tensor([[-1.2000]]), tensor([[False]]), tensor([[True]]))
    """
    ratio = torch.exp(logp - logp_old)  # (b, C)
    unclipped = -ratio * advantages
    clipped = -torch.clamp(ratio, 1 - args.eps_low, 1 + args.eps_high) * advantages
    loss = torch.maximum(unclipped, clipped)  # = -min(r A, clip(r) A)
    clipped_low = (ratio < 1 - args.eps_low) & (advantages < 0)
    clipped_high = (ratio > 1 + args.eps_high) & (advantages > 0)
    return loss, clipped_low, clipped_high


def aggregate_loss(token_loss, mask, mode: str, num_seqs: int, num_tokens: int, max_new_tokens: int):
    """Token losses (b, C) of one micro-batch -> its share of the minibatch loss.

    The normaliser is always the *minibatch's* (num_seqs sequences, num_tokens valid tokens),
    passed in, so that summing micro-batch shares gives the same gradient for any
    micro-batch size (the accumulation bug of several peers: normalising per micro-batch).
      token-mean               sum_{i,t} l / num_tokens                      (DAPO)
      seq-mean-token-mean      sum_i (sum_t l / |y_i|) / num_seqs            (GRPO)
      seq-mean-token-sum-norm  sum_{i,t} l / (num_seqs * max_new_tokens)     (Dr. GRPO)
    """
    if mode == "token-mean":
        return (token_loss * mask).sum() / num_tokens
    if mode == "seq-mean-token-mean":
        return ((token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1)).sum() / num_seqs
    return (token_loss * mask).sum() / (num_seqs * max_new_tokens)


def kl_penalty(logp: torch.Tensor, logp_ref: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) from samples of pi_theta (Schulman, 2020):
    d = logp_ref - logp;  k1 = -d;  k2 = d^2 / 2;  k3 = exp(d) - d - 1 (>= 0, unbiased)."""
    d = logp_ref - logp
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d**2
    return torch.exp(d) - d - 1


# ==== Variants: the four ways in for the expert's signal (docs/spec.md §5) ===========================


def sft_loss(logprobs: torch.Tensor, completion_mask: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """sft.py's loss: -sum(mask * logp) / num_tokens, num_tokens counted over the whole minibatch.
    The SFT term of `weighted` (on the expert's tokens) and all of `rft` (on the accepted samples)."""
    return -masked_sum(logprobs, completion_mask) / num_tokens


def mu_at(step: int, args: Args) -> float:
    """weighted: the SFT share of the loss at 0-based `step`.

      constant  mu
      linear    mu -> mu_min, linearly over the run
      chord     0 -> mu over mu_warmup_steps, then mu -> mu_min (CHORD, Zhang et al. 2025)
    >>> [round(mu_at(s, Args(mu_schedule="chord", total_steps=5, mu_warmup_steps=2)), 3) for s in range(5)]
    [0.25, 0.5, 0.333, 0.167, 0.0]
    """
    if args.mu_schedule == "constant":
        return args.mu
    warmup = args.mu_warmup_steps if args.mu_schedule == "chord" else 0
    if step < warmup:
        return args.mu * (step + 1) / warmup
    progress = (step + 1 - warmup) / max(1, args.total_steps - warmup)  # 1 at the last step
    return args.mu + (args.mu_min - args.mu) * progress


def luffy_expert_loss(logp: torch.Tensor, advantages: torch.Tensor, gamma: float) -> torch.Tensor:
    """LUFFY (Yan et al. 2025): the expert member's l_t = -A * f(pi_theta(y_t)), f(p) = p / (p + gamma).

    The behaviour probability is taken as 1 (no ratio to clip). d l / d logp = -A * gamma p / (p + gamma)^2:
    plain importance sampling (f(p) = p) would weight the gradient by p, vanishing on exactly the
    tokens the model does not know yet; the shaping lifts them (~10x at p = 0.01, gamma = 0.1).
    logp (b, C) with grad, advantages (b, 1) -> (b, C).
    >>> luffy_expert_loss(torch.log(torch.tensor([[0.1, 0.9]])), torch.ones(1, 1), 0.1)
    tensor([[-0.5000, -0.9000]])
    """
    p = torch.exp(logp)
    return -advantages * p / (p + gamma)


def rft_rows(correct: torch.Tensor, completions: list[str], G: int, dedup: bool) -> torch.Tensor:
    """RFT (Yuan et al. 2023): the rows the verifier accepted, each distinct completion of a prompt once
    if `dedup`. correct (B,) in {0, 1}, rows grouped by prompt -> (kept,) row indices, in order.
    >>> rft_rows(torch.tensor([1., 1., 0., 1.]), ["5", "5", "6", "7"], G=2, dedup=True)
    tensor([0, 3])
    """
    kept, seen = [], set()
    for i in correct.nonzero().squeeze(-1).tolist():
        if not dedup or (i // G, completions[i]) not in seen:
            seen.add((i // G, completions[i]))
            kept.append(i)
    return torch.tensor(kept, dtype=torch.long, device=correct.device)


def distill_advantages(logp_teacher: torch.Tensor, logp_old: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """On-policy distillation's per-token advantage: A_t = log pi_teacher(y_t) - log pi_theta(y_t), detached.

    y_t was sampled by the student, so -A_t is a one-sample estimate of the per-token reverse KL(pi_theta ||
    pi_teacher), and -A_t grad logp_t is, in expectation, its gradient (Agarwal et al. 2024; Thinking
    Machines 2025). No reward. (B, C) each -> (B, C), 0 on padding.
    """
    return ((logp_teacher - logp_old) * mask).detach()


def full_reverse_kl(logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """distill --distill-form full: l_t = sum_v p(v) (log p(v) - log q(v)), p the student, q the teacher,
    exactly, at every sampled prefix. logits (b, C, V) with grad, teacher_logits (b, C, V) -> (b, C)."""
    logp_all, logq_all = torch.log_softmax(logits, -1), torch.log_softmax(teacher_logits, -1)
    return (logp_all.exp() * (logp_all - logq_all)).sum(-1)


def backward_by_source(params, on_policy_loss, expert_loss, expert_grads):
    """Backward of on_policy_loss + expert_loss into .grad, and of expert_loss alone into expert_grads, so the
    log can say which share of the update came from expert/teacher tokens. A part that is a plain float (not a
    tensor with grad) is nothing from that source."""
    both = torch.is_tensor(on_policy_loss) and on_policy_loss.requires_grad
    if torch.is_tensor(expert_loss) and expert_loss.requires_grad:
        grads = torch.autograd.grad(expert_loss, params, retain_graph=both, allow_unused=True)
        for p, g, acc in zip(params, grads, expert_grads):
            if g is not None:
                acc += g
                p.grad = g.clone() if p.grad is None else p.grad + g
    if both:
        on_policy_loss.backward()


def number(loss) -> float:
    """The value of a loss part: a tensor, or a plain 0.0 where a source contributes nothing."""
    return loss.item() if torch.is_tensor(loss) else float(loss)


def gradient_split(params, expert_grads) -> dict:
    """Before clipping: the norms of the expert's and the on-policy part of the gradient g = g_exp + g_on,
    and grad_share/expert = <g_exp, g> / |g|^2 (the two shares add up to 1; each can leave [0, 1])."""
    dot = sq = sq_exp = 0.0
    for p, g_exp in zip(params, expert_grads):
        g = p.grad if p.grad is not None else torch.zeros_like(g_exp)
        dot, sq, sq_exp = dot + float((g_exp * g).sum()), sq + float((g * g).sum()), sq_exp + float((g_exp**2).sum())
    sq_on = sum(float(((p.grad if p.grad is not None else 0) - g_exp).pow(2).sum()) for p, g_exp in
                zip(params, expert_grads))
    share = dot / sq if sq > 0 else 0.0
    return {"grad_norm/expert": sq_exp**0.5, "grad_norm/on_policy": sq_on**0.5, "grad_share/expert": share,
            "grad_share/on_policy": 1 - share if sq > 0 else 0.0}


def check_teacher(teacher_path: str, teacher, teacher_tokenizer, model, tokenizer, task):
    """--teacher must speak the policy's tokens and have been trained on this task's prompts: one line if not."""
    if teacher_tokenizer.get_vocab() != tokenizer.get_vocab() or teacher.config.vocab_size != model.config.vocab_size:
        arg_error("teacher", f"{teacher_path} has another tokenizer ({len(teacher_tokenizer)} tokens, the policy "
                             f"{len(tokenizer)}); per-token distillation needs the same token ids")
    try:
        with open(os.path.join(teacher_path, "args.json")) as f:
            trained_on = json.load(f).get("task")
    except (OSError, ValueError):
        return  # a hub model or a folder we did not write: nothing to compare
    if trained_on and trained_on != task.name:
        other = load_task(trained_on)
        if other.test["question"][:64] != task.test["question"][:64]:
            arg_error("teacher", f"{teacher_path} was trained on task {trained_on!r}, whose prompts are not task "
                                 f"{task.name!r}'s; train a teacher on a task with these prompts")


def check_expert(task, mode: str):
    """weighted / luffy need the task's `expert` column, and it must be a correct source: one line if not."""
    if not task.has_expert:
        arg_error("mode", f"{mode} needs a task with an `expert` column (a correct demonstration per prompt); "
                          f"task {task.name} has none: use --mode rft or distill, or another task")
    from common.rewards import score_rows

    rows = task.prompts.select(range(min(64, len(task.prompts))))
    _, terms, _ = score_rows(task.verifier, rows["expert"], rows["answer"], [True] * len(rows))
    wrong = len(rows) - int(sum(terms["correct"]))
    if wrong > len(rows) // 10:
        arg_error("mode", f"{mode}: the `expert` column of task {task.name} fails its verifier on {wrong} of "
                          f"{len(rows)} prompts; it is not a correct source")


# ==== Training loop ====================================================================================


def main(args: Args):
    # ---- Setup: task, batch arithmetic, run folder, device ----------------------------------
    task = load_task(args.task)
    max_new_tokens = args.max_new_tokens or task.max_new_tokens
    world = setup_distributed(args.device)  # rank 0 of 1 under plain python; see common/distributed.py
    batch_size, _, micro_size = validate(args, max_new_tokens, world.size)  # batch_size: this rank's rows
    run_dir, device = os.path.join("runs", args.run_name), world.device
    dtype = pick_dtype(args.dtype, device)
    torch.manual_seed(args.seed + world.rank)  # each rank samples its own completions
    G = args.group_size
    shared = G if micro_size % G == 0 else 1  # micro-batches of whole groups run each prompt once
    warn_if_task_mismatch(args.model, task.name)
    uses_expert = args.mode == "luffy" or (args.mode == "weighted" and args.mu > 0)
    if uses_expert:
        check_expert(task, args.mode)

    # ---- Setup: policy, frozen reference, optimizer ----------------------------------------
    model, tokenizer = load_model_and_tokenizer(args.model, device, dtype)
    if args.lora_rank:  # LoRA: only low-rank adapters train; the reference is the base with them off
        model = add_lora(model, args.lora_rank, args.lora_alpha)
    model.train()
    ref_model = None
    if args.beta > 0:  # the frozen starting policy; beta = 0 skips it entirely
        ref_model = frozen_reference(model, args.model, device, dtype)
    teacher = None
    if args.mode == "distill":  # the frozen teacher: it scores the student's samples, never trains
        hint = "train one, e.g. `python sft.py --task add --run-name sft_add_teacher`"
        check(os.path.isdir(os.path.expanduser(args.teacher)) or not looks_like_path(args.teacher), "teacher",
              f"{args.teacher}: no such folder; {hint}")
        teacher, teacher_tokenizer = load_model_and_tokenizer(args.teacher, device, dtype, hint=hint)
        teacher.eval().requires_grad_(False)
        check_teacher(args.teacher, teacher, teacher_tokenizer, model, tokenizer, task)
    eos_ids = eos_token_ids(model, tokenizer)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=0.0)
    # Under torchrun: no DDP wrapper here. backward_by_source writes the expert's part of the gradient with
    # autograd.grad, which DDP's hooks never see, so the ranks' gradients are summed by all_reduce_grads.
    distributed.broadcast_parameters(model)  # every rank starts from rank 0's weights (as DDP would make sure)

    # ---- Setup: rollout engine (HF generate, or vLLM colocated on this device) ---------------
    # Built before a resume restores the RNG: the vLLM engine re-seeds torch's global generator.
    engine = build_engine(args.rollout, model, tokenizer, eos_ids, task=task, max_new_tokens=max_new_tokens,
                          model_path=args.model, dtype=dtype, vllm_dtype=args.vllm_dtype, max_num_seqs=batch_size,
                          gpu_memory_utilization=args.vllm_gpu_memory_utilization, seed=args.seed, device=device)

    # ---- Setup: resume, logger ----------------------------------------------------------------
    start_step, data_position = 0, 0
    if args.resume:
        start_step, extra = resume_from(run_dir, model, optimizer, learning_rate=args.learning_rate)
        data_position = extra["data_position"]
        engine.sync_weights(model)  # the engine loaded args.model; the resumed trainer is ahead of it
    last_sync = start_step  # the sampler holds the weights of this step; staleness = step - last_sync
    logger = RunLogger(run_dir, asdict(args), args.tensorboard, args.wandb_project if args.track else None,
                       resume_step=start_step if args.resume else None)
    print(f"sft_rl_mixed ({args.mode}): {args.model}, task {task.name}, {len(task.prompts)} prompts, "
          f"{args.num_prompts} x G={G} per step, device {device}, {world.size} process(es)")
    print_config(asdict(args))
    sample = dict(num_prompts=args.num_prompts // world.size, seed=args.seed, n=G, temperature=args.temperature,
                  max_new_tokens=max_new_tokens, top_p=args.top_p, format_weight=args.format_weight)
    # logp_old needs its own pass if the policy moves within a step; distill always scores it beside the teacher
    need_old_pass = args.num_epochs * args.num_minibatches > 1 or args.mode == "distill"
    start_cpu = time.process_time()

    progress = tqdm(range(start_step, args.total_steps), initial=start_step, total=args.total_steps,
                    desc=f"sft_rl_mixed {args.mode}", disable=not world.is_main)
    for step in progress:
        step_start, times = time.perf_counter(), dict.fromkeys(("gen", "score", "train", "sync"), 0.0)
        staleness = step - last_sync  # steps the sampler's weights lag behind the trainer's
        mu = mu_at(step, args) if args.mode == "weighted" else None
        # ---- 1. Generate + 2. Reward: G completions per prompt, each scored by the verifier ----
        first = data_position + world.rank * sample["num_prompts"]  # rank r samples the r-th share of the prompts
        n = sample["num_prompts"]
        with timed(times, "gen"):
            rollout = generate_and_score(engine, tokenizer, task, first, **sample)
            # weighted / luffy: the expert's demonstration of the same prompts, one row per prompt
            expert = demonstration_rollout(tokenizer, task, first, n, args.seed, "expert",
                                           eos_ids[0], max_new_tokens, device) if uses_expert else None
        slices = task.prompts[rows_at(len(task.prompts), first, n, args.seed)]["slice"] if task.slices else None
        data_position += args.num_prompts
        everything, group = rollout, G  # all that was sampled (for the log); rows per group in the update

        # ---- 3. Advantage: A_i = (R_i - mean_group R) / (std + eps), the same for every token ---
        rewards = all_gather(rollout.rewards).view(-1, G)  # every rank's, so --scale-rewards batch takes the global std
        advantages = compute_advantages(rewards, args.scale_rewards, args.adv_eps).view(-1)
        advantages = advantages.chunk(world.size)[world.rank]  # (B,) this rank's rows
        if args.mode == "luffy":  # LUFFY: the expert is member G + 1 of its group; the baseline sees all G + 1
            mixed = compute_advantages(torch.cat([rewards, all_gather(expert.rewards).unsqueeze(-1)], 1),
                                       args.scale_rewards, args.adv_eps).chunk(world.size)[world.rank]  # (n, G + 1)
            advantages, expert_advantages = mixed[:, :G].reshape(-1), mixed[:, G]  # (B,), (num_groups,)
        if args.mode == "rft":  # RFT: w = 1 on the accepted samples, which become the batch; no baseline
            rollout = rollout[rft_rows(rollout.reward_terms["correct"], rollout.completions, G, args.rft_dedup)]
            # under torchrun every rank keeps as many as the rank with the fewest: the same optimizer steps on all
            rollout = rollout[:all_reduce(len(rollout), "min")]
            advantages, group = torch.ones(len(rollout), device=device), 1
            if len(rollout) == 0:  # nothing accepted: nothing to imitate this step
                logger.log(step + 1, {**reward_metrics(everything, G), "loss": None, "skipped": 1})
                continue
        # distill: A_t needs the teacher's logprobs, so it is computed at the end of 4. Score
        mask = rollout.completion_mask.float()  # (B, C)
        if args.mask_truncated:  # completions cut at max_new_tokens say nothing about the answer
            mask = mask * rollout.is_eos.float().unsqueeze(-1)
        expert_mask = expert.completion_mask.float() if expert is not None else None  # (num_groups, C*)

        # ---- 4. Score: logprobs of the rollout-time policy, the reference and the teacher (no grad) ---
        with timed(times, "score"):  # (B, C) each, or None when not needed
            scoring = dict(temperature=args.temperature, group_size=shared if group > 1 else 1)
            logp_old = score_rollout(model, rollout, micro_size, **scoring)[0] if need_old_pass else None
            logp_ref = score_rollout(ref_model, rollout, micro_size, **scoring)[0] if ref_model is not None else None
            if args.mode == "distill":  # the teacher scores the student's own tokens
                logp_teacher = score_rollout(teacher, rollout, micro_size, **scoring)[0]
                advantages = distill_advantages(logp_teacher, logp_old, mask)  # (B, C): per token, no reward

        # ---- 5. Update: num_epochs passes, each num_minibatches optimizer steps of whole groups -
        stats = StepStats()
        scale_rl, scale_expert = (1 - mu, mu) if args.mode == "weighted" else (1.0, 1.0)
        with timed(times, "train"):
            num_groups = len(rollout) // group
            for epoch in range(args.num_epochs):
                for groups in torch.randperm(num_groups).chunk(args.num_minibatches):
                    minibatch_rows = (groups[:, None] * group + torch.arange(group)).flatten()  # (mb,)
                    # the normalisers of the whole minibatch, over all ranks (not this rank's share)
                    num_seqs = len(minibatch_rows) * world.size
                    num_tokens = int(all_reduce(mask[minibatch_rows].sum()).clamp(min=1))
                    num_expert_tokens = int(all_reduce(expert_mask[groups].sum()).clamp(min=1)) if expert is not None \
                        else 0
                    if args.mode == "luffy":  # one objective over the mixed groups: the normaliser counts both
                        num_seqs, num_tokens = num_seqs + len(groups) * world.size, num_tokens + num_expert_tokens
                    expert_grads = [torch.zeros_like(p) for p in params] if uses_expert or teacher is not None else None
                    loss_sum, loss_expert = 0.0, 0.0
                    for micro_rows in minibatch_rows.split(micro_size):
                        micro, m = rollout[micro_rows], mask[micro_rows]  # m: (b, C)
                        if args.distill_form == "full":  # one forward gives the logits, logp and entropy
                            logits = rollout_logits(model, micro, temperature=args.temperature)  # (b, C, V)
                            logp, entropy = selective_log_softmax(logits, micro.completion_ids), entropy_from_logits(
                                logits)
                        else:
                            logp, entropy = rollout_logprobs(model, micro, temperature=args.temperature,
                                                             with_entropy=True, group_size=shared if group > 1 else 1)
                        old = logp.detach() if logp_old is None else logp_old[micro_rows]
                        adv = advantages[micro_rows] if args.mode == "distill" else advantages[micro_rows].unsqueeze(-1)
                        token_loss, clipped_low, clipped_high = policy_token_loss(logp, old, adv, m, args)
                        if args.mode == "rft":  # RFT: the NLL of the accepted samples, sft.py's loss
                            token_loss = -logp
                        if args.distill_form == "full":  # the exact reverse KL to the teacher at each position
                            with torch.no_grad():
                                teacher_logits = rollout_logits(teacher, micro, temperature=args.temperature)
                            token_loss = full_reverse_kl(logits, teacher_logits)
                        teacher_loss = token_loss
                        kl = kl_penalty(logp, logp_ref[micro_rows], args.kl_estimator) if args.beta > 0 else None
                        if args.beta > 0:  # GRPO puts the KL to the reference in the loss, per token
                            token_loss = token_loss + args.beta * kl
                        if args.ent_coef > 0:
                            token_loss = token_loss - args.ent_coef * entropy
                        agg = "token-mean" if args.mode == "rft" else args.loss_agg  # rft: sft.py's token mean
                        if args.mode == "distill":  # the surrogate's weight is the teacher's; KL and entropy are not
                            part_expert = aggregate_loss(teacher_loss, m, agg, num_seqs, num_tokens, max_new_tokens)
                            part_on = (aggregate_loss(token_loss - teacher_loss, m, agg, num_seqs, num_tokens,
                                                      max_new_tokens) if args.beta > 0 or args.ent_coef > 0 else 0.0)
                        else:
                            part_expert = 0.0
                            part_on = scale_rl * aggregate_loss(token_loss, m, agg, num_seqs, num_tokens,
                                                                max_new_tokens)
                        backward_by_source(params, part_on, part_expert, expert_grads)
                        loss_sum += number(part_on) + number(part_expert)
                        loss_expert += number(part_expert)
                        gap = (old - micro.sampler_logprobs) * m  # trainer vs sampler, 0 on padding
                        stats.tokens(m, entropy=entropy, kl=kl, clip_frac_low=clipped_low, clip_frac_high=clipped_high,
                                     mismatch_mean_abs=gap.abs(), frac_tokens_kept=m > 0)
                        stats.maxes(mismatch_max_ratio=torch.exp(gap).max())
                        if args.mode == "distill":  # -A_t estimates the per-token reverse KL to the teacher
                            stats.tokens(m, reverse_kl=-advantages[micro_rows])
                    # weighted / luffy: the expert's rows of this minibatch's prompts, one per group
                    if expert is not None and scale_expert > 0:
                        for expert_rows in groups.split(micro_size):
                            e, em = expert[expert_rows], expert_mask[expert_rows]
                            temperature = 1.0 if args.mode == "weighted" else args.temperature  # sft.py scores at T=1
                            logp_e, _ = rollout_logprobs(model, e, temperature=temperature)  # (b, C*)
                            if args.mode == "weighted":  # mu * sft.py's loss, token mean over the minibatch
                                part_expert = scale_expert * sft_loss(logp_e, em, num_expert_tokens)
                            else:  # LUFFY: -A_exp f(p) on the expert's tokens, no clip; same normaliser as the group
                                expert_token_loss = luffy_expert_loss(logp_e, expert_advantages[expert_rows].unsqueeze(
                                    -1), args.luffy_gamma)
                                part_expert = aggregate_loss(expert_token_loss, em, args.loss_agg, num_seqs,
                                                             num_tokens, max_new_tokens)
                            backward_by_source(params, 0.0, part_expert, expert_grads)
                            loss_sum += number(part_expert)
                            loss_expert += number(part_expert)
                            stats.tokens(em, expert_nll=-logp_e, expert_prob=torch.exp(logp_e))
                    all_reduce_grads(params, expert_grads)  # the ranks' shares -> the minibatch's gradient
                    split = gradient_split(params, expert_grads) if expert_grads is not None else None
                    grad_norm = clip_grad_norm(model, args.max_grad_norm)
                    loss_sum, loss_expert = all_reduce(loss_sum), all_reduce(loss_expert)  # the ranks' shares
                    if split is None:  # rft, weighted with mu = 0: no expert or teacher tokens at all
                        split = {"grad_norm/expert": 0.0, "grad_norm/on_policy": float(grad_norm),
                                 "grad_share/expert": 0.0, "grad_share/on_policy": 1.0}
                    stop_if_not_finite(step + 1, run_dir, loss=loss_sum, grad_norm=grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    stats.values(loss=loss_sum, grad_norm=grad_norm, **{"loss/expert": loss_expert,
                                 "loss/on_policy": loss_sum - loss_expert}, **split)

        # ---- 6. Sync: copy the updated weights into the sampler (a no-op for HF generate) ---------
        if step + 1 - last_sync >= args.sync_every:
            with timed(times, "sync"):
                engine.sync_weights(model)
            last_sync = step + 1

        # ---- 7. Log -----------------------------------------------------------------------------
        train_tokens = int(rollout.prompt_mask.sum() + rollout.completion_mask.sum()) * args.num_epochs
        metrics = {
            **reward_metrics(everything, G), **stats.summary(),
            "completion_length": everything.completion_lengths.float().mean().item(),
            "frac_truncated": 1 - everything.is_eos.float().mean().item(),
            "learning_rate": args.learning_rate, "rollout_staleness": staleness,
            "gen_tokens_per_s": int(everything.completion_mask.sum()) / times["gen"],
            "train_tokens_per_s": train_tokens / times["train"],
            **{f"{k}_time": v for k, v in times.items()}, "step_time": time.perf_counter() - step_start,
            "cpu_time": time.process_time() - start_cpu,  # CPU seconds of this process since (re)start
        }
        if mu is not None:
            metrics["mu"] = mu
        if args.mode == "rft":  # the share of sampled tokens that became training data
            metrics["frac_tokens_kept"] = float(rollout.completion_mask.sum() / everything.completion_mask.sum())
        if slices is not None:  # sampled accuracy per slice of the task (e.g. carry / no_carry)
            correct, of = everything.reward_terms["correct"], everything.prompt_index.tolist()
            for name in task.slices:
                rows = [i for i, p in enumerate(of) if slices[p] == name]
                if rows:
                    metrics[f"sampled_accuracy/{name}"] = correct[rows].float().mean().item()
        if args.eval_every and (step + 1) % args.eval_every == 0:
            metrics["eval_accuracy"] = greedy_accuracy(model, tokenizer, task, 64, max_new_tokens, engine, eos_ids)
        logger.log(step + 1, metrics)
        progress.set_postfix(reward=f"{metrics['reward']:.2f}", acc=f"{metrics['sampled_accuracy']:.2f}",
                             expert=f"{metrics.get('grad_share/expert', 0):.2f}")
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.total_steps:
            save_checkpoint(run_dir, model, tokenizer, optimizer, None, step + 1, {"data_position": data_position})

    # ---- Finish: checkpoint, final model, held-out evaluation ----------------------------------
    save_checkpoint(run_dir, model, tokenizer, optimizer, None, args.total_steps, {"data_position": data_position})
    save_final_model(run_dir, model, tokenizer)
    engine.sync_weights(model)  # the final evaluation samples with the engine
    result = evaluate(model, tokenizer, task, args.num_eval_prompts, args.num_eval_samples, max_new_tokens,
                      engine=engine, eos_ids=eos_ids)
    logger.log(args.total_steps, result)
    logger.close()
    print_eval(result, run_dir)
    distributed.cleanup()
    return result


if __name__ == "__main__":
    main(parse_args())
