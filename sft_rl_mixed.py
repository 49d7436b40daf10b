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

Modes (a knob of another mode is an error):
  weighted  --mu, --mu-schedule constant|linear|chord (CHORD, Zhang et al. 2025); mu = 0 is grpo.py, 1 is sft.py.
  luffy     Yan et al. 2025, --luffy-gamma: the task's `expert` column is member G + 1 of each group.
  rft       Yuan et al. 2023: G = k samples per prompt, SFT on the accepted ones (--rft-dedup).
  distill   Agarwal et al. 2024 (GKD), Thinking Machines 2025: --teacher PATH (the policy's tokenizer), no reward.
            sampled (default): the teacher scores the sampled tokens once per batch (any server returning
            logprobs can teach); full: the exact KL over the vocabulary, lower variance, but a teacher forward
            and two (b, C, V) tensors per micro-batch.
The expert's rows (cut to max_new_tokens) train inside their prompts' micro-batches, one backward each, so DDP and
FSDP2 (--fsdp) scale every mode as grpo.py. `loss/expert` is the expert's (teacher's) part of the loss; every
--grad-split-every steps `grad_norm/expert` and `grad_share/expert` are its part of the gradient (a diagnostic).

Run:  python sft.py && python sft_rl_mixed.py --mode luffy
      python sft.py --task add --run-name sft_add_teacher && python sft_rl_mixed.py --mode distill \
          --teacher runs/sft_add_teacher                                      --help
"""

import json
import os
import time
from dataclasses import dataclass, replace
from typing import Literal

import torch
import tyro
from tqdm import tqdm

from common.checkpoint import resume_from, save_checkpoint
from common.cli import RLRunArgs, arg_error, check, check_at_least, check_positive, rollout_batch_sizes
from common.distributed import all_gather, all_reduce, fewest_over_ranks, wrap_model
from common.evaluation import greedy_accuracy
from common.learned_reward import load_reward_model
from common.logprobs import (entropy_from_logits, rollout_logits, rollout_logprobs, score_rollout,
                             selective_log_softmax)
from common.minibatch import Minibatch, minibatches
from common.models import frozen_reference, load_model_and_tokenizer, load_policy, looks_like_path, trainable_parameters
from common.rewards import score_rows
from common.rollout import Rollout, build_engine, demonstration_rollout, generate_and_score, reward_metrics
from common.run import finish_run, start_run
from common.tasks import DEFAULT_TASK, load_task, rows_at
from common.tracking import RunLogger, StepStats, rollout_metrics, timed, token_diagnostics


@dataclass
class Args(RLRunArgs):  # + the flags every RL script shares (run, hardware, evaluation, vLLM): common/cli.py
    # ---- what to train --------------------------------------------------------------------
    model: str = "runs/sft"
    """policy to start from (and the frozen reference): a folder, a hub id, or qwen2-tiny:random (offline)"""
    task: str = DEFAULT_TASK
    """task name (see common/tasks.py); weighted and luffy need one with an `expert` column"""
    mode: Literal["weighted", "luffy", "rft", "distill"] = "weighted"
    """how expert signal meets on-policy learning (see the docstring)"""
    teacher: str = ""
    """--mode distill: the frozen teacher, a model folder with the policy's tokenizer (e.g. runs/sft_add_teacher)"""
    # ---- rollout ---------------------------------------------------------------------------
    total_steps: int = 200
    """steps: one rollout batch each, trained on with num_epochs * num_minibatches optimizer steps"""
    num_prompts: int = 16
    """prompts per rollout batch, over all ranks (each of N torchrun processes samples num_prompts / N)"""
    group_size: int = 8
    """G: completions sampled per prompt"""
    temperature: float = 1.0
    """sampling temperature; the trainer scores logits / temperature, the same distribution"""
    # ---- reward ----------------------------------------------------------------------------
    format_weight: float = 0.0
    """weight of the format reward (ended with EOS and committed to an answer)"""
    # ---- advantage -------------------------------------------------------------------------
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """divide (R - group mean) by the group std (GRPO), the batch std, or nothing (Dr. GRPO)"""
    std_eps: float = 1e-4
    """eps in (R - mean) / (std + eps)"""
    rft_dedup: bool = True
    """rft: keep each distinct accepted completion of a prompt once (Yuan et al.: distinct reasoning paths)"""
    # ---- policy loss -----------------------------------------------------------------------
    eps_low: float = 0.2
    """clip range below 1"""
    eps_high: float = 0.2
    """clip range above 1 (DAPO clip-higher: 0.28)"""
    beta: float = 0.04
    """KL coefficient; 0 loads no reference model"""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """estimator of KL(pi_theta || pi_ref) used in the loss (Schulman): k3 is GRPO's"""
    ent_coef: float = 0.0
    """entropy bonus: subtract ent_coef * H_t from each token's loss"""
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = "seq-mean-token-mean"
    """how token losses become one number (see aggregate_loss)"""
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
    """passes over each rollout batch (> 1 makes r != 1 and the clip matter)"""
    num_minibatches: int = 1
    """optimizer steps per pass: the rollout batch is split into this many minibatches of whole groups"""
    grad_split_every: int = 1
    """steps between logs of the gradient's expert part (grad_norm/expert, ...): one extra backward; 0 = never"""


def parse_args(argv=None) -> Args:
    return tyro.cli(Args, args=argv)


def validate(args: Args, max_new_tokens: int, world_size: int = 1) -> tuple[int, int]:
    """Reject bad values and knobs of one mode given to another; return the batch arithmetic (rank_rows,
    micro_size), as grpo.py's (rft then trains on the accepted rows of the rollout batch)."""
    check_at_least(args, 1, "total_steps", "num_prompts", "group_size", "num_epochs", "num_minibatches")
    check_at_least(args, 0, "eps_low", "eps_high", "beta", "ent_coef", "mu_warmup_steps", "grad_split_every")
    check_positive(args, "temperature", "learning_rate", "max_grad_norm", "std_eps", "luffy_gamma")
    check(args.group_size >= 2 or args.mode in ("rft", "distill"), "group_size",
          f"--mode {args.mode} needs >= 2 completions per prompt (the baseline is their mean)")
    check(0 <= args.mu_min <= args.mu <= 1, "mu", f"need 0 <= --mu-min <= --mu <= 1, got {args.mu_min}, {args.mu}")
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
    check(args.mode != "rft" or args.loss_agg in ("token-mean", defaults.loss_agg), "loss_agg",
          "--mode rft trains with sft.py's token mean; drop --loss-agg")
    return rollout_batch_sizes(args.num_prompts, args.group_size, args.num_minibatches, args.micro_batch_size,
                               world_size)


# ==== The algorithm: advantage, per-token loss, aggregation, KL. Pure functions; tests import them ====


def compute_advantages(rewards: torch.Tensor, scale_rewards: str, eps: float = 1e-4,
                       batch_std: torch.Tensor | None = None) -> torch.Tensor:
    """A_i = (R_i - mean(R_group)) / (std + eps), std over the group, the batch, or not at all, as in grpo.py.

    rewards (num_groups, G) -> advantages (num_groups, G); LUFFY passes G + 1 columns, the last one the
    expert's. batch_std: the std of the whole batch when it is larger than `rewards` (all ranks' rewards).
    >>> compute_advantages(torch.tensor([[0., 0., 0., 1.]]), "none")  # three samples wrong, the expert right
    tensor([[-0.2500, -0.2500, -0.2500,  0.7500]])
    """
    centred = rewards - rewards.mean(dim=1, keepdim=True)  # (num_groups, G)
    if scale_rewards == "group":
        return centred / (rewards.std(dim=1, keepdim=True) + eps)
    if scale_rewards == "batch":
        return centred / ((rewards.std() if batch_std is None else batch_std) + eps)
    return centred


def policy_token_loss(logp, logp_old, advantages, mask, args: Args):
    """The per-token loss l_t of the policy's own samples, before KL, entropy bonus and aggregation.

        r_t = exp(logp_t - logp_old_t);   l_t = -min(r_t A, clip(r_t, 1 - eps_low, 1 + eps_high) A)

    grpo.py's plain clipped surrogate. logp (b, C) with grad; logp_old (b, C) detached; advantages (b, 1) per
    completion (weighted, luffy) or (b, C) per token (distill). Returns (l_t, clipped_low, clipped_high), (b, C).
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
    """The per-token KL penalty term k_t, an estimate of KL(pi_theta || pi_ref) from samples of pi_theta
    (Schulman, 2020); the loss adds beta * k_t. (b, C), (b, C) -> (b, C):
    d = logp_ref - logp;  k1 = -d;  k2 = d^2 / 2;  k3 = exp(d) - d - 1 (>= 0, unbiased)."""
    d = logp_ref - logp
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d**2
    return torch.exp(d) - d - 1


# ==== Variants: the four ways in for the expert's signal (docs/spec.md §5) ===========================


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

    The behaviour probability is taken as 1 (no ratio to clip). d l / d logp = -A * gamma p / (p + gamma)^2: plain
    importance sampling (f(p) = p) would weight the gradient by p, vanishing on exactly the tokens the model does
    not know yet; the shaping lifts them (~10x at p = 0.01, gamma = 0.1). logp (b, C), advantages (b, 1) -> (b, C).
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
    pi_teacher), and -A_t grad logp_t, in expectation, its gradient (Agarwal et al. 2024; Thinking Machines
    2025). No reward. (B, C) each -> (B, C), 0 on padding."""
    return ((logp_teacher - logp_old) * mask).detach()


def full_reverse_kl(logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """distill --distill-form full: l_t = sum_v p(v) (log p(v) - log q(v)), p the student, q the teacher,
    exactly, at every sampled prefix. logits (b, C, V) with grad, teacher_logits (b, C, V) -> (b, C)."""
    logp_all, logq_all = torch.log_softmax(logits, -1), torch.log_softmax(teacher_logits, -1)
    return (logp_all.exp() * (logp_all - logq_all)).sum(-1)


class SourceSplit:
    """For the log: a minibatch's loss and (every --grad-split-every steps; not under FSDP2, whose .grad is a shard)
    its gradient g, split into the expert/teacher part (weighted's and luffy's expert rows, distill's teacher term)
    and the rest. `add` before each backward takes d expert_part alone with autograd.grad into its own buffers
    (one extra backward; .grad and DDP never see it); `summary`, before the step clips: |g_exp|, |g - g_exp| and
    grad_share/expert = <g_exp, g> / |g|^2 (the shares add to 1, each can leave [0, 1]), over all ranks."""

    def __init__(self, model, step: int, args: Args):
        measure = args.grad_split_every > 0 and step % args.grad_split_every == 0 and not args.fsdp
        self.params, self.loss, self.expert_loss = trainable_parameters(model), 0.0, 0.0
        self.expert_grads = [torch.zeros_like(p) for p in self.params] if measure else None

    def add(self, loss: torch.Tensor, expert_part):
        self.loss += loss.item()
        if not torch.is_tensor(expert_part):  # a plain 0.0: no expert or teacher term in this micro-batch
            return
        self.expert_loss += expert_part.item()
        if self.expert_grads is not None:
            for acc, g in zip(self.expert_grads, torch.autograd.grad(expert_part, self.params, retain_graph=True,
                                                                     materialize_grads=True)):
                acc += g

    def summary(self) -> dict:
        loss, expert_loss = all_reduce(self.loss), all_reduce(self.expert_loss)  # the ranks' shares
        out = {"loss/expert": expert_loss, "loss/on_policy": loss - expert_loss}
        if self.expert_grads is None:
            return out
        g = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]  # DDP: the ranks' sum
        g_exp = [all_reduce(part) for part in self.expert_grads]  # each rank's part -> the minibatch's
        dot, sq = sum(float((a * b).sum()) for a, b in zip(g_exp, g)), sum(float((b * b).sum()) for b in g)
        norm = lambda tensors: sum(float((t * t).sum()) for t in tensors) ** 0.5
        share = dot / sq if sq > 0 else 0.0
        return {**out, "grad_norm/expert": norm(g_exp), "grad_norm/on_policy": norm(b - a for a, b in zip(g_exp, g)),
                "grad_share/expert": share, "grad_share/on_policy": 1 - share if sq > 0 else 0.0}


def load_teacher(args: Args, model, tokenizer, task, world, dtype):
    """--mode distill: the frozen teacher (sharded like the reference under --fsdp), else None. It must speak
    the policy's tokens and have been trained on this task's prompts: one line if not."""
    if (path := args.teacher) == "":
        return None
    hint = "train one, e.g. `python sft.py --task add --run-name sft_add_teacher`"
    check(os.path.isdir(os.path.expanduser(path)) or not looks_like_path(path), "teacher",
          f"{path}: no such folder; {hint}")
    teacher, teacher_tokenizer = load_model_and_tokenizer(path, world.device, dtype, hint=hint)
    teacher.eval().requires_grad_(False)
    if teacher_tokenizer.get_vocab() != tokenizer.get_vocab() or teacher.config.vocab_size != model.config.vocab_size:
        arg_error("teacher", f"{path} has another tokenizer ({len(teacher_tokenizer)} tokens, the policy "
                             f"{len(tokenizer)}); per-token distillation needs the same token ids")
    try:
        with open(os.path.join(path, "args.json")) as f:
            trained_on = json.load(f).get("task")
    except (OSError, ValueError):
        trained_on = None  # a hub model or a folder we did not write: nothing to compare
    if trained_on and trained_on != task.name and load_task(trained_on).test["question"][:64] != \
            task.test["question"][:64]:
        arg_error("teacher", f"{path} was trained on task {trained_on!r}, whose prompts are not task "
                             f"{task.name!r}'s; train a teacher on a task with these prompts")
    return wrap_model(teacher, world, args.fsdp)


def check_expert(task, args: Args) -> bool:
    """Whether the run trains on the task's `expert` column (weighted with mu > 0, luffy). It must exist and
    be a correct source: one line if not."""
    if not ((mode := args.mode) == "luffy" or (mode == "weighted" and args.mu > 0)):
        return False
    if not task.has_expert:
        arg_error("mode", f"{mode} needs a task with an `expert` column (a correct demonstration per prompt); "
                          f"task {task.name} has none: use --mode rft or distill, or another task")
    rows = task.prompts.select(range(min(64, len(task.prompts))))
    _, terms, _ = score_rows(task.verifier, rows["expert"], rows["answer"], [True] * len(rows))
    wrong = len(rows) - int(sum(terms["correct"]))
    if wrong > len(rows) // 10:
        arg_error("mode", f"{mode}: the `expert` column of task {task.name} fails its verifier on {wrong} of "
                          f"{len(rows)} prompts; it is not a correct source")
    return True


def slice_accuracy(task, rollout: Rollout, position: int, seed: int) -> dict:
    """sampled_accuracy/<slice> on a task with slices (e.g. carry / no_carry), {} on one without; rollout: the
    samples of the prompts at `position` of the prompt stream (as generate_and_score draws them)."""
    of = rollout.prompt_index.tolist()
    names = task.prompts[rows_at(len(task.prompts), position, max(of) + 1, seed)]["slice"] if task.slices else []
    rows = {name: [i for i, p in enumerate(of) if names[p] == name] for name in task.slices}
    correct = rollout.reward_terms["correct"].float()
    return {f"sampled_accuracy/{name}": correct[r].mean().item() for name, r in rows.items() if r}


# ==== Training loop ====================================================================================


def main(args: Args):
    # ---- Setup: task, batch arithmetic, run folder, device ----------------------------------
    task = load_task(args.task, max_turns=args.max_turns, call_cost=args.tool_call_cost)  # a tool task's flags
    max_new_tokens = args.max_new_tokens or task.max_new_tokens
    world, run_dir, dtype = start_run(args, "sft_rl_mixed")  # this process among torchrun's (1 of 1 under python)
    rank_rows, micro_size = validate(args, max_new_tokens, world.size)  # rank_rows: this rank's rows per step
    args = replace(args, loss_agg="token-mean") if args.mode == "rft" else args  # RFT: sft.py's token-mean NLL
    G = args.group_size
    group = 1 if args.mode == "rft" else G  # rows per group in the update: RFT's accepted rows are no groups
    prefix_group = group if micro_size % group == 0 else 1  # micro-batches of whole groups run each prompt once
    uses_expert = check_expert(task, args)  # weighted (mu > 0) and luffy train on the task's expert column

    # ---- Setup: policy, frozen reference, optimizer ----------------------------------------
    model, tokenizer, eos_ids = load_policy(args, world.device, dtype)  # + LoRA adapters with --lora-rank
    ref_model = wrap_model(frozen_reference(model, args.model, world.device, dtype), world, args.fsdp) \
        if args.beta > 0 else None  # the frozen starting policy; none at beta = 0
    teacher = load_teacher(args, model, tokenizer, task, world, dtype)  # distill: the frozen teacher, else None
    policy = wrap_model(model, world, args.fsdp)  # what the update runs: DDP / FSDP2 under torchrun, else the model
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=args.learning_rate, weight_decay=0.0)

    # ---- Setup: rollout engine (HF generate, or vLLM colocated on this device) ---------------
    # Built before a resume restores the RNG: the vLLM engine re-seeds torch's global generator.
    engine = build_engine(args, model, tokenizer, eos_ids, task, max_new_tokens, dtype, world.device, rank_rows)
    reward_model = load_reward_model(args.reward_model, tokenizer, world.device, dtype)  # --reward-model, or None

    # ---- Setup: resume, logger ----------------------------------------------------------------
    start_step, data_position = 0, 0
    if args.resume:
        start_step, extra = resume_from(run_dir, model, optimizer, learning_rate=args.learning_rate)
        data_position = extra["data_position"]
        engine.sync_weights(model)  # the engine loaded args.model; the resumed trainer is ahead of it
    last_sync = start_step  # the sampler holds the weights of this step; staleness = step - last_sync
    logger = RunLogger(run_dir, args, "sft_rl_mixed", resume_step=start_step if args.resume else None)
    print(f"sft_rl_mixed ({args.mode}): {args.model}, task {task.name}, {len(task.prompts)} prompts, "
          f"{args.num_prompts} x G={G} per step, device {world.device}, {world.size} process(es)")
    rank_prompts = args.num_prompts // world.size

    def sample_prompts(position: int) -> tuple[Rollout, Rollout | None]:  # this rank's share of num_prompts prompts
        rollout = generate_and_score(engine, tokenizer, task, position + world.rank * rank_prompts, rank_prompts,
                                     args.seed, G, args.temperature, max_new_tokens, args.top_p, args.format_weight,
                                     reward_model)
        expert = demonstration_rollout(tokenizer, task, position + world.rank * rank_prompts, rank_prompts, args.seed,
                                       "expert", eos_ids[0], max_new_tokens, world.device) if uses_expert else None
        return rollout, expert  # G completions each; weighted / luffy: the expert's completion of each, one row

    # logp_old needs its own pass if the policy moves within a step; distill always scores it beside the teacher
    need_old_pass = args.num_epochs * args.num_minibatches > 1 or args.mode == "distill"
    progress = tqdm(range(start_step, args.total_steps), initial=start_step, total=args.total_steps, desc=args.mode,
                    disable=not world.is_main)
    for step in progress:
        step_start, times = time.perf_counter(), dict.fromkeys(("gen", "score", "train", "sync"), 0.0)
        staleness = step - last_sync  # steps the sampler's weights lag behind the trainer's
        mu = mu_at(step, args) if args.mode == "weighted" else None
        # ---- 1. Generate + 2. Reward: G completions per prompt, each scored by the verifier ----
        with timed(times, "gen"):
            rollout, expert = sample_prompts(data_position)
        everything = rollout  # all that was sampled, for the log
        sliced = slice_accuracy(task, rollout, data_position + world.rank * rank_prompts, args.seed)
        data_position += args.num_prompts
        if args.mode == "rft":  # RFT: the accepted samples (each distinct one once: --rft-dedup) are the batch
            rollout = rollout[rft_rows(rollout.reward_terms["correct"], rollout.completions, G, args.rft_dedup)]
            rollout = rollout[:fewest_over_ranks(len(rollout))]  # as many rows on every rank
            if len(rollout) == 0:  # nothing accepted: nothing to imitate this step
                logger.log(step + 1, {**reward_metrics(everything, G), "loss": None, "skipped": 1})
                continue

        # ---- 3. Advantage: A_i = (R_i - mean_group R) / (std + eps), the same for every token ---
        if args.mode in ("weighted", "luffy"):  # rft's weight is 1; distill's A_t needs the teacher: 4. Score
            rewards = rollout.rewards.view(-1, G)  # (B / G, G)
            if args.mode == "luffy":  # LUFFY: the expert is member G + 1 of its group; the baseline sees all G + 1
                rewards = torch.cat([rewards, expert.rewards.unsqueeze(-1)], dim=1)  # (B / G, G + 1)
            batch_std = all_gather(rewards).std() if args.scale_rewards == "batch" else None  # over every rank
            advantages = compute_advantages(rewards, args.scale_rewards, args.std_eps, batch_std)
            advantages, expert_advantages = advantages[:, :G].reshape(-1, 1), advantages[:, G:]  # (B, 1), LUFFY's
        mask = rollout.policy_mask.float()  # (B, C) the tokens the policy sampled (not tool observations)
        if args.mask_truncated:  # completions cut at max_new_tokens say nothing about the answer
            mask = mask * rollout.is_eos.float().unsqueeze(-1)

        # ---- 4. Score: logprobs of the rollout-time policy and of the reference (no grad) -------
        with timed(times, "score"):  # (B, C) each, or None when not needed
            logp_old = score_rollout(model, rollout, micro_size, temperature=args.temperature,
                                     group_size=prefix_group)[0] if need_old_pass else None
            logp_ref = score_rollout(ref_model, rollout, micro_size, temperature=args.temperature,
                                     group_size=prefix_group)[0] if ref_model is not None else None
            if args.mode == "distill":  # and the teacher's, of the student's own tokens: A_t (B, C), no reward
                logp_teacher = score_rollout(teacher, rollout, micro_size, temperature=args.temperature,
                                             group_size=prefix_group)[0]
                advantages = distill_advantages(logp_teacher, logp_old, mask)

        # ---- 5. Update: num_epochs passes, each num_minibatches optimizer steps of whole groups -
        stats = StepStats()
        with timed(times, "train"):
            for minibatch in minibatches(policy, mask, group, args.num_epochs, args.num_minibatches, micro_size):
                split = SourceSplit(model, step, args)  # for the log: the loss and gradient by source
                if uses_expert:  # weighted / luffy: the expert's row of each of these groups, counted over all ranks
                    experts = Minibatch([], minibatch.rows[::G] // G, expert.policy_mask, micro_size)
                if args.mode == "luffy":  # one objective over the mixed groups of G + 1: the normalisers count both
                    minibatch.num_seqs += experts.num_seqs
                    minibatch.num_tokens += experts.num_tokens
                for micro_rows in minibatch:
                    micro, m = rollout[micro_rows], mask[micro_rows]  # m: (b, C)
                    if args.distill_form == "full":  # distill, exact: the whole next-token distribution
                        logits = rollout_logits(policy, micro, temperature=args.temperature)  # (b, C, V)
                        logp, entropy = selective_log_softmax(logits, micro.completion_ids), entropy_from_logits(logits)
                    else:
                        logp, entropy = rollout_logprobs(policy, micro, temperature=args.temperature, with_entropy=True,
                                                         group_size=prefix_group)  # (b, C) each
                    logp_old_mb = logp.detach() if logp_old is None else logp_old[micro_rows]
                    if args.mode == "rft":  # RFT: sft.py's NLL of the accepted samples
                        token_loss, clipped_low, clipped_high = -logp, None, None
                    elif args.distill_form == "full":  # the exact reverse KL to the teacher at each position
                        teacher_logits = rollout_logits(teacher, micro, temperature=args.temperature)  # frozen
                        token_loss, clipped_low, clipped_high = full_reverse_kl(logits, teacher_logits), None, None
                    else:  # grpo.py's clipped surrogate; distill's advantage is per token
                        token_loss, clipped_low, clipped_high = policy_token_loss(logp, logp_old_mb,
                                                                                  advantages[micro_rows], m, args)
                    # distill: the teacher's term alone, for the log (the rest of the loss is the KL and entropy terms)
                    expert_part = aggregate_loss(token_loss, m, args.loss_agg, minibatch.num_seqs, minibatch.num_tokens,
                                                 max_new_tokens) if args.mode == "distill" else 0.0
                    kl = kl_penalty(logp, logp_ref[micro_rows], args.kl_estimator) if args.beta > 0 else None
                    if args.beta > 0:  # GRPO puts the KL to the reference in the loss, per token
                        token_loss = token_loss + args.beta * kl
                    if args.ent_coef > 0:
                        token_loss = token_loss - args.ent_coef * entropy
                    loss = aggregate_loss(token_loss, m, args.loss_agg, minibatch.num_seqs, minibatch.num_tokens,
                                          max_new_tokens)
                    loss = (1 - mu) * loss if args.mode == "weighted" else loss  # weighted: (1 - mu) L_GRPO + mu L_SFT
                    if uses_expert and len(expert_rows := micro_rows[micro_rows % G == 0] // G):  # groups starting here
                        e, em = expert[expert_rows], expert.policy_mask[expert_rows]  # em: (e, C*)
                        temperature = 1.0 if args.mode == "weighted" else args.temperature  # sft.py scores at T = 1
                        logp_e = rollout_logprobs(policy, e, temperature=temperature)[0]  # (e, C*)
                        if args.mode == "weighted":  # mu * sft.py's loss: the NLL's token mean over the expert's tokens
                            expert_part = mu * aggregate_loss(-logp_e, em, "token-mean", experts.num_seqs,
                                                              experts.num_tokens, max_new_tokens)
                        else:  # LUFFY: -A_exp f(p) on the expert's tokens, no clip, in the mixed group's normalisers
                            token_loss_e = luffy_expert_loss(logp_e, expert_advantages[expert_rows], args.luffy_gamma)
                            expert_part = aggregate_loss(token_loss_e, em, args.loss_agg, minibatch.num_seqs,
                                                         minibatch.num_tokens, max_new_tokens)
                        loss = loss + expert_part
                        stats.tokens(em, expert_nll=-logp_e, expert_prob=torch.exp(logp_e))
                    split.add(loss, expert_part)
                    minibatch.backward(loss)
                    gap = (logp_old_mb - micro.sampler_logprobs) * m  # trainer vs sampler, 0 on padding
                    stats.tokens(m, entropy=entropy, kl=kl, clip_frac_low=clipped_low, clip_frac_high=clipped_high,
                                 mismatch_mean_abs=gap.abs(),  # distill: -A_t estimates the reverse KL to the teacher
                                 reverse_kl=-advantages[micro_rows] if args.mode == "distill" else None)
                    stats.maxes(mismatch_max_ratio=torch.exp(gap).max())
                stats.values(**split.summary())  # before the optimizer step clips the gradient
                loss, grad_norm = minibatch.step(optimizer, args.max_grad_norm, step + 1, run_dir)
                stats.values(loss=loss, grad_norm=grad_norm)

        # ---- 6. Sync: copy the updated weights into the sampler (a no-op for HF generate) ---------
        if step + 1 - last_sync >= args.sync_every:
            with timed(times, "sync"):
                engine.sync_weights(model)
            last_sync = step + 1

        # ---- 7. Log -----------------------------------------------------------------------------
        metrics = {**reward_metrics(everything, G), **stats.summary(),
                   **rollout_metrics(rollout, everything, times, args.num_epochs, group), **sliced,
                   **token_diagnostics(rollout.sampler_logprobs, advantages if args.mode != "rft" else mask, mask),
                   "learning_rate": args.learning_rate, "rollout_staleness": staleness,
                   "step_time": time.perf_counter() - step_start}
        if args.mode == "weighted":  # the SFT share of this step
            metrics["mu"] = mu
        if args.mode == "rft":  # the share of sampled tokens that became training data
            metrics["frac_tokens_accepted"] = float(rollout.policy_mask.sum() / everything.policy_mask.sum())
        if args.eval_every and (step + 1) % args.eval_every == 0:
            metrics["eval_accuracy"] = greedy_accuracy(model, tokenizer, task, 64, max_new_tokens, engine, eos_ids)
        logger.log(step + 1, metrics)
        progress.set_postfix(reward=f"{metrics['reward']:.2f}", acc=f"{metrics['sampled_accuracy']:.2f}",
                             expert=metrics.get("grad_share/expert"))
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.total_steps:
            save_checkpoint(run_dir, model, tokenizer, optimizer, None, step + 1, {"data_position": data_position})

    # ---- Finish: checkpoint, final model, held-out evaluation ----------------------------------
    save_checkpoint(run_dir, model, tokenizer, optimizer, None, args.total_steps, {"data_position": data_position})
    return finish_run(run_dir, model, tokenizer, task, engine, eos_ids, args, max_new_tokens, logger)


if __name__ == "__main__":
    main(parse_args())
