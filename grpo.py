"""GRPO and its descendants (Dr. GRPO, DAPO, GSPO, CISPO, SAPO, Clip-Cov/KL-Cov, forking tokens, TIS/IcePop).

GRPO (Shao et al., 2024, DeepSeekMath) in one equation, per token t of completion i of a
group of G completions sampled for the same prompt (docs/spec.md §3):

    A_i  = (R_i - mean_j R_j) / (std_j R_j + eps)                      group-relative advantage
    r_t  = pi_theta(y_t) / pi_old(y_t)                                 importance ratio
    l_t  = -min(r_t A_i, clip(r_t, 1 - eps_low, 1 + eps_high) A_i)     clipped surrogate
           + beta * k3_t                                               KL to the reference, in the loss
    L    = aggregate(l_t)                                              seq-mean-token-mean

In the one view of this project, loss = - E[ w * log pi_theta(y | x) ]: y is the policy's own sample
(on-policy) and w = A_i times a clipped ratio, negative for below-average samples. Among the siblings:
  reinforce.py  no ratio, no clip, one step per batch; baseline = group mean, RLOO, EMA, ...
  grpo.py       baseline = group mean (scaled by the group std); ratio + clip; KL in the loss
  ppo.py        baseline = a learned value model (GAE); ratio + clip; KL in the reward

Every departure from DeepSeekMath GRPO is a flag, off by default; `--preset` sets a named recipe:
  --preset dr_grpo  Liu et al. 2025: --scale-rewards none --loss-agg seq-mean-token-sum-norm
  --preset dapo     Yu et al. 2025: --eps-high 0.28 --beta 0 --loss-agg token-mean --num-minibatches 4
                    --dynamic-sampling --overlong-cache-len (a quarter of max_new_tokens)
  --preset gspo     Zheng et al. 2025: --importance-level sequence --eps-low 0.0003 --eps-high 0.0004
                    --beta 0 --loss-agg seq-mean-token-mean --num-minibatches 4
  --preset cispo    MiniMax-M1 2025: --policy-loss cispo --beta 0 --loss-agg token-mean --num-minibatches 4
  --preset sapo     Gao et al. 2025: --policy-loss sapo --beta 0 --loss-agg seq-mean-token-mean --num-minibatches 4

Note: with one update per batch r_t = 1 and the loss *value* is ~0 (mean-centred advantages), the gradient
is not. Watch reward and `frac_zero_std_groups` (at 1 no group has signal and nothing is learnt).

Run:  python sft.py && python grpo.py        python grpo.py --preset dapo        --help
"""

import math
import time
from dataclasses import dataclass
from typing import Literal

import torch
from tqdm import tqdm

from common.checkpoint import resume_from, save_checkpoint
from common.cli import (RLRunArgs, check, check_at_least, check_fraction, check_positive, parse_with_presets,
                        rollout_batch_sizes)
from common.distributed import all_gather, any_rank, fewest_over_ranks, gather_rows, own_rows, wrap_model
from common.evaluation import greedy_accuracy
from common.learned_reward import load_reward_model
from common.logprobs import masked_mean, rollout_logprobs, score_rollout, top_tokens
from common.minibatch import minibatches
from common.models import frozen_reference, load_policy, trainable_parameters
from common.rollout import Rollout, build_engine, generate_and_score, reward_metrics
from common.run import finish_run, start_run
from common.tasks import DEFAULT_TASK, load_task
from common.tracking import RunLogger, StepStats, rollout_metrics, timed, token_diagnostics


@dataclass
class Args(RLRunArgs):  # + the flags every RL script shares (run, hardware, evaluation, vLLM): common/cli.py
    # ---- what to train --------------------------------------------------------------------
    model: str = "runs/sft"
    """policy to start from (and the frozen reference): a folder, a hub id, or qwen2-tiny:random (offline)"""
    task: str = DEFAULT_TASK
    """task name (see common/tasks.py)"""
    preset: Literal["grpo", "dr_grpo", "dapo", "gspo", "cispo", "sapo"] = "grpo"
    """named recipe; it sets the defaults listed in the file's docstring, explicit flags win"""
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
    overlong_cache_len: int = 0
    """DAPO overlong shaping: soft penalty over the last L_cache tokens of the budget; 0 = off"""
    # ---- advantage -------------------------------------------------------------------------
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """divide (R - group mean) by the group std (GRPO), the batch std, or nothing (Dr. GRPO)"""
    std_eps: float = 1e-4
    """eps in (R - mean) / (std + eps)"""
    advantage: Literal["group", "passk", "best_of_group"] = "group"
    """group: optimise pass@1 (GRPO); passk: pass@k of the group (Chen et al. 2025); best_of_group: verl's"""
    passk_k: int = 4
    """--advantage passk: the k of pass@k, at most group_size"""
    dynamic_sampling: bool = False
    """DAPO: drop groups whose rewards are all equal, resample until the batch is full"""
    max_resample_rounds: int = 4
    """dynamic sampling gives up after this many extra rollout rounds (and trains on what it has)"""
    # ---- policy loss -----------------------------------------------------------------------
    policy_loss: Literal["clip", "cispo", "sapo"] = "clip"
    """clip: PPO clipped surrogate; cispo: -sg(min(r, 1 + cispo_eps_high)) A logp; sapo: soft sigmoid gate"""
    importance_level: Literal["token", "sequence"] = "token"
    """token: r_t per token (GRPO); sequence: GSPO's length-normalised sequence ratio"""
    eps_low: float = 0.2
    """clip range below 1"""
    eps_high: float = 0.2
    """clip range above 1 (DAPO clip-higher: 0.28)"""
    dual_clip_c: float = 0.0
    """dual clip for A < 0: l_t = min(l_t, -c * A); 0 = off, 3 is usual"""
    cispo_eps_high: float = 5.0
    """CISPO: cap of the (stop-gradient) IS weight is 1 + this; MiniMax-M1 only tunes the upper side"""
    sapo_taus: tuple[float, float] = (1.0, 1.05)
    """SAPO: gate temperatures for A > 0 and A < 0 (larger = closes faster off-policy; negatives are riskier)"""
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
    cov_penalty: Literal["none", "clip_cov", "kl_cov"] = "none"
    """entropy-mechanism interventions (Cui et al. 2025) on high-covariance tokens"""
    clip_cov_frac: float = 2e-4
    """Clip-Cov: fraction of the minibatch's tokens whose gradient is cut"""
    clip_cov_bounds: tuple[float, float] = (1.0, 5.0)
    """Clip-Cov: only tokens with lower < cov < upper are candidates"""
    kl_cov_frac: float = 2e-3
    """KL-Cov: fraction of the minibatch's tokens (top by covariance) that get the |logp - logp_old| penalty"""
    kl_cov_coef: float = 1.0
    """KL-Cov: coefficient of that penalty"""
    top_entropy_rho: float = 1.0
    """keep the gradient only on the top rho fraction of highest-entropy tokens (Wang et al.: 0.2); 1 = off"""
    entropy_tokens: Literal["top", "bottom"] = "top"
    """with --top-entropy-rho < 1: train on that top fraction, or on the rest (Wang et al.'s bottom-80% ablation)"""
    mismatch_correction: Literal["none", "tis", "icepop", "seq_mask", "seq_mask_geo"] = "none"
    """correct for sampler != trainer logprobs (see mismatch_weights)"""
    tis_cap: float = 2.0
    """TIS: C in min(exp(logp_old - logp_rollout), C)"""
    icepop_bounds: tuple[float, float] = (0.5, 5.0)
    """IcePop: keep tokens whose k = exp(logp_old - logp_rollout) lies in [low, high]"""
    seq_mask_bounds: tuple[float, float] = (0.0, 3.0)
    """seq_mask(_geo): keep completions whose sequence ratio lies in [low, high] (TRL masks above 3)"""
    # ---- optimisation ----------------------------------------------------------------------
    learning_rate: float = 2e-4
    """AdamW learning rate (constant)"""
    num_epochs: int = 1
    """passes over each rollout batch (> 1 makes r != 1 and the clip matter)"""
    num_minibatches: int = 1
    """optimizer steps per pass: the rollout batch is split into this many minibatches of whole groups"""


# Recipes that change the ratio's treatment take 4 optimizer steps a batch, as their papers do (one: r = 1, no clip).
PRESETS = {
    "grpo": {},
    "dr_grpo": dict(scale_rewards="none", loss_agg="seq-mean-token-sum-norm"),
    "dapo": dict(eps_high=0.28, beta=0.0, loss_agg="token-mean", dynamic_sampling=True, overlong_cache_len=-1,
                 num_minibatches=4),
    "gspo": dict(importance_level="sequence", eps_low=3e-4, eps_high=4e-4, beta=0.0, loss_agg="seq-mean-token-mean",
                 num_minibatches=4),
    "cispo": dict(policy_loss="cispo", beta=0.0, loss_agg="token-mean", num_minibatches=4),
    "sapo": dict(policy_loss="sapo", beta=0.0, loss_agg="seq-mean-token-mean", num_minibatches=4),
}


def parse_args(argv=None) -> Args:
    return parse_with_presets(Args, PRESETS, argv)


def validate(args: Args, max_new_tokens: int, world_size: int = 1) -> tuple[int, int]:
    """Reject bad values and silent knob combinations; return the batch arithmetic (rank_rows, micro_size)."""
    check_at_least(args, 1, "total_steps", "num_prompts", "num_epochs", "num_minibatches")
    check_at_least(args, 0, "max_resample_rounds", "eps_low", "eps_high", "cispo_eps_high", "beta",
                   "ent_coef", "kl_cov_coef")
    check_positive(args, "temperature", "learning_rate", "max_grad_norm", "std_eps", "tis_cap")
    check_fraction(args, "top_entropy_rho", "clip_cov_frac", "kl_cov_frac")
    check(args.group_size >= 2, "group_size", "GRPO needs >= 2 completions per prompt (the baseline is their mean)")
    check(args.advantage != "passk" or 1 <= args.passk_k <= args.group_size, "passk_k", "needs 1 <= k <= group_size")
    check(args.entropy_tokens == "top" or args.top_entropy_rho < 1, "entropy_tokens",
          "--entropy-tokens bottom trains on the tokens outside the top --top-entropy-rho; set it below 1 (e.g. 0.2)")
    check(min(args.sapo_taus) > 0, "sapo_taus", f"gate temperatures must be > 0, got {args.sapo_taus}")
    for name in ("clip_cov_bounds", "icepop_bounds", "seq_mask_bounds"):
        check(getattr(args, name)[0] <= getattr(args, name)[1], name, f"needs low <= high, got {getattr(args, name)}")
    check(args.dual_clip_c == 0 or args.dual_clip_c > 1, "dual_clip_c", "must be 0 (off) or > 1")
    check(-1 <= args.overlong_cache_len < max_new_tokens, "overlong_cache_len",
          f"must be in [0, {max_new_tokens}) (the completion budget), or -1 for a quarter of it")
    # CISPO, SAPO, KL-Cov each replace the clipped surrogate (the dual clip is part of it): two would drop one.
    chosen = ([f"--policy-loss {args.policy_loss}"] * (args.policy_loss != "clip") + ["--dual-clip-c"] *
              (args.dual_clip_c > 0) + ["--cov-penalty kl_cov"] * (args.cov_penalty == "kl_cov"))
    check(len(chosen) <= 1, "policy_loss", f"{' and '.join(chosen)} exclude each other; pick one")
    check(args.cov_penalty != "kl_cov" or args.num_epochs * args.num_minibatches > 1, "cov_penalty", "KL-Cov's "
          "|logp - logp_old| is 0, gradient too, with one update per batch; add --num-minibatches 4")
    return rollout_batch_sizes(args.num_prompts, args.group_size, args.num_minibatches, args.micro_batch_size,
                               world_size)


# ==== The algorithm: advantage, per-token loss, aggregation, KL. Pure functions; tests import them ====


def compute_advantages(rewards: torch.Tensor, scale_rewards: str, eps: float = 1e-4,
                       batch_std: torch.Tensor | None = None) -> torch.Tensor:
    """A_i = (R_i - mean(R_group)) / (std + eps), std over the group, the batch, or not at all.

    rewards (num_groups, G) -> (num_groups, G). std is the unbiased sample std, as in DeepSeekMath's and
    TRL's code. batch_std: the std of a larger batch (every rank's rewards); default rewards.std().
    >>> compute_advantages(torch.tensor([[1., 0., 0., 1.]]), "none")
    tensor([[ 0.5000, -0.5000, -0.5000,  0.5000]])
    """
    centred = rewards - rewards.mean(dim=1, keepdim=True)  # (num_groups, G)
    if scale_rewards == "group":
        return centred / (rewards.std(dim=1, keepdim=True) + eps)
    if scale_rewards == "batch":  # Hu et al. (REINFORCE++): the batch std is less noisy than a group's
        return centred / ((rewards.std() if batch_std is None else batch_std) + eps)
    return centred  # Dr. GRPO: dividing by std over-weights nearly-all-right and all-wrong groups


def passk_advantages(correct: torch.Tensor, k: int, eps: float = 1e-4) -> torch.Tensor:
    """Pass@k training (Chen et al. 2025): A_i is the mean normalised pass@k of the k-subsets of i's group that hold i.
    With n_neg of the G wrong:  R = 1 - C(n_neg, k) / C(G, k) (the group's pass@k),  s = sqrt(R (1 - R)) + eps,
        A_right = (1 - R) / s,    A_wrong = (1 - R - C(n_neg - 1, k - 1) / C(G - 1, k - 1)) / s.
    correct (num_groups, G) of 0/1 -> (num_groups, G). k = 1 is (R_i - mean) / population std: GRPO's form."""
    G = correct.shape[1]
    n_neg = (G - correct.sum(dim=1, keepdim=True)).long()  # (num_groups, 1)
    table = lambda f: torch.tensor([f(n) for n in range(G + 1)], dtype=correct.dtype, device=correct.device)[n_neg]
    group = table(lambda n: 1 - math.comb(n, k) / math.comb(G, k))  # R
    wrong = table(lambda n: 1 - math.comb(n - 1, k - 1) / math.comb(G - 1, k - 1) if n else 1.0)  # R of i's subsets
    std = (group * (1 - group)).sqrt() + eps
    return torch.where(correct.bool(), (1 - group) / std, (wrong - group) / std).to(correct.dtype)


def best_of_group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """verl's grpo_passk: only a group's best sample learns, A = (r_max - r_second) / (std + eps). (num_groups, G)."""
    top2 = rewards.topk(2, dim=1)  # values and indices, (num_groups, 2)
    gap = (top2.values[:, :1] - top2.values[:, 1:]) / (rewards.std(dim=1, keepdim=True) + eps)  # (num_groups, 1)
    return torch.zeros_like(rewards).scatter(1, top2.indices[:, :1], gap)


def pass_at_k_objective(rollout: Rollout, args: Args) -> torch.Tensor:
    """--advantage passk (on the verifier's verdicts) or best_of_group (on the rewards), (B / G, G)."""
    if args.advantage == "best_of_group":
        return best_of_group_advantages(rollout.rewards.view(-1, args.group_size), args.std_eps)
    correct = torch.tensor([r == "correct" for r in rollout.reasons], dtype=torch.float, device=rollout.rewards.device)
    return passk_advantages(correct.view(-1, args.group_size), args.passk_k, args.std_eps)


def policy_token_loss(logp, logp_old, advantages, mask, args: Args, kl_cov_tokens=None):
    """The per-token policy loss l_t, before KL, entropy bonus and aggregation.

        r_t = exp(logp_t - logp_old_t);   l_t = -min(r_t A, clip(r_t, 1 - eps_low, 1 + eps_high) A)

    logp (b, C) with grad; logp_old (b, C) detached; advantages (b, 1); mask (b, C). Returns (l_t, clipped_low,
    clipped_high), each (b, C): where the clip removed the gradient (r < 1 - eps_low, A < 0; r > 1 + eps_high, A > 0).
    >>> one = torch.ones(1, 1)  # r = e^0.5 = 1.65 > 1 + eps, A = 1: the loss is clipped at -1.2 A
    >>> policy_token_loss(0.5 * one, 0 * one, one, one, Args())
    (tensor([[-1.2000]]), tensor([[False]]), tensor([[True]]))
    """
    log_ratio = logp - logp_old  # (b, C)
    if args.importance_level == "sequence":  # GSPO: one length-normalised ratio per completion
        log_ratio = gspo_log_ratio(logp, logp_old, mask)
    ratio = torch.exp(log_ratio)  # (b, C)
    not_clipped = torch.zeros_like(mask, dtype=torch.bool)
    if args.policy_loss == "cispo":  # CISPO: clip the (detached) IS weight, never the gradient
        loss, capped = cispo_loss(ratio, logp, advantages, args.cispo_eps_high)
        return loss, not_clipped, capped
    if args.policy_loss == "sapo":  # SAPO: a soft sigmoid gate on the ratio instead of the hard clip
        return sapo_loss(ratio, advantages, *args.sapo_taus), not_clipped, not_clipped
    if args.cov_penalty == "kl_cov":  # KL-Cov: no clip; a |logp - logp_old| penalty on high-covariance tokens
        loss = -ratio * advantages + args.kl_cov_coef * (logp - logp_old).abs() * kl_cov_tokens
        return loss, not_clipped, not_clipped

    unclipped = -ratio * advantages
    clipped = -torch.clamp(ratio, 1 - args.eps_low, 1 + args.eps_high) * advantages
    loss = torch.maximum(unclipped, clipped)  # = -min(r A, clip(r) A)
    if args.dual_clip_c > 0:  # Dual clip (Ye et al. 2020): for A < 0, cap the loss at -c A
        loss = torch.where(advantages < 0, torch.minimum(loss, -args.dual_clip_c * advantages), loss)
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


# ==== Variants: each one a flag, off by default (docs/spec.md §3) =====================================


def gspo_log_ratio(logp, logp_old, mask):
    """GSPO (Zheng et al. 2025): log s_i = mean_t (logp_t - logp_old_t), one ratio per completion, in the
    token form log s_i,t = sg(log s_i) + logp_t - sg(logp_t): value log s_i, gradient d log s_i. (b, C)."""
    seq_log_ratio = masked_mean(logp - logp_old, mask, dim=-1).unsqueeze(-1)  # (b, 1)
    return seq_log_ratio.detach() + logp - logp.detach()


def cispo_loss(ratio, logp, advantages, eps_high_is):
    """CISPO (MiniMax-M1, eq. 4): l = -sg(min(r, 1 + eps_high_is)) * A * logp: the weight is capped and
    detached, so unlike PPO's clip no token (a rare "Wait") ever loses its gradient. Returns (loss, capped)."""
    weight = torch.clamp(ratio, max=1 + eps_high_is).detach()
    return -weight * advantages * logp, ratio > 1 + eps_high_is


def sapo_loss(ratio, advantages, tau_pos, tau_neg):
    """SAPO (Gao et al. 2025, arXiv 2511.20347): l = -f(r) A with f(r) = (4 / tau) sigmoid(tau (r - 1)).
    f'(1) = 1: on-policy the gradient is the unclipped one; off-policy its weight 4 sigmoid(x)(1 - sigmoid(x)),
    x = tau (r - 1), fades smoothly instead of dropping to 0 at an edge. tau = tau_pos if A > 0, else tau_neg."""
    tau = torch.where(advantages > 0, tau_pos, tau_neg)  # (b, 1)
    return -(4 / tau) * torch.sigmoid(tau * (ratio - 1)) * advantages


def overlong_shaping(rollout: Rollout, max_new_tokens: int, cache_len: int) -> Rollout:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), added to R_i (logged as reward/overlong):
    0 up to L_max - L_cache tokens, ((L_max - L_cache) - |y|) / L_cache up to L_max, -1 beyond.
    cache_len -1 (the dapo preset's): a quarter of the budget."""
    cache_len = max(1, max_new_tokens // 4) if cache_len == -1 else cache_len
    lengths = rollout.completion_lengths.float()  # (B,)
    rollout.reward_terms["overlong"] = ((max_new_tokens - cache_len - lengths) / cache_len).clamp(-1, 0)
    rollout.rewards = rollout.rewards + rollout.reward_terms["overlong"]
    return rollout


def groups_with_signal(rewards: torch.Tensor, G: int) -> torch.Tensor:
    """DAPO's filter: rows of the groups whose rewards are not all equal, the only ones a group-relative advantage
    gives a gradient. rewards (B,) -> (rows,).
    >>> groups_with_signal(torch.tensor([1., 1., 0., 1.]), 2)
    tensor([2, 3])
    """
    has_signal = rewards.view(-1, G).std(dim=1, correction=0) > 0  # (num_groups,)
    return has_signal.repeat_interleave(G).nonzero().squeeze(-1)


def dynamic_sampling(rollout: Rollout, sample_prompts, position: int, args: Args, rank_rows: int, pad_id: int):
    """DAPO's dynamic sampling: a group whose rewards are all equal has zero advantage and no gradient, so drop
    it and top the batch up with fresh prompts from `position` on, at most max_resample_rounds rounds. Every rank
    draws while any rank is short and keeps as many groups as the fewest. Returns (kept, all sampled, rounds)."""
    sampled, G = [rollout], args.group_size
    rollout = rollout[groups_with_signal(rollout.rewards, G)]
    while any_rank(len(rollout) < rank_rows) and len(sampled) <= args.max_resample_rounds:
        sampled.append(sample_prompts(position + (len(sampled) - 1) * args.num_prompts))
        rollout = Rollout.cat([rollout, sampled[-1][groups_with_signal(sampled[-1].rewards, G)]], pad_id)
    everything = Rollout.cat(sampled, pad_id)
    return rollout[:fewest_over_ranks(min(len(rollout), rank_rows))], everything, len(sampled) - 1


def select_tokens(args: Args, rows, advantages, logp_old, entropy_old, mask, generator=None):
    """Batch-level token selections for the minibatch `rows`: (keep (B, C) float, kl_cov_tokens (B, C) bool).
    Clip-Cov / KL-Cov (Cui et al. 2025) and forking tokens (Wang et al. 2025) rank the minibatch's tokens
    once, on rollout-time logprobs and entropy (verl ranks each micro-batch on current ones), over every
    rank's rows with one generator: the choice depends on neither the micro-batch size nor the number of
    ranks. With every variant off: all kept, no KL-Cov token."""
    keep, kl_cov_tokens = torch.ones_like(mask), torch.zeros_like(mask, dtype=torch.bool)  # (B, C)
    if args.cov_penalty == "none" and args.top_entropy_rho == 1:
        return keep, kl_cov_tokens
    # every rank's minibatch rows (N * mb, C_max), so the ranking is the same on every rank; mine() takes back ours
    m, adv, logp, entropy = gather_rows(mask[rows], advantages[rows], logp_old[rows], entropy_old[rows])
    mine = lambda x: own_rows(x, len(rows), mask.shape[1])  # (N * mb, C_max) -> (mb, C)
    adv_tokens = adv.unsqueeze(-1).expand_as(m)  # (N * mb, C_max)
    if args.cov_penalty == "clip_cov":
        not_clipped = torch.zeros_like(m, dtype=torch.bool)  # r = 1 at selection: nothing is clipped yet
        keep[rows] *= mine(clip_cov_mask(adv_tokens, logp, m, not_clipped, args.clip_cov_frac, args.clip_cov_bounds,
                                         generator))
    if args.cov_penalty == "kl_cov":
        kl_cov_tokens[rows] = mine(kl_cov_mask(adv_tokens, logp, m, args.kl_cov_frac))
    if args.top_entropy_rho < 1:
        top = top_entropy_mask(entropy, m, args.top_entropy_rho)
        keep[rows] *= mine(top if args.entropy_tokens == "top" else m - top)  # bottom: every other valid token
    return keep, kl_cov_tokens


def token_covariance(advantages, logp, mask):
    """cov_t = (A_t - mean A) * (logp_t - mean logp) over valid tokens, (B, C) -> (B, C). Cui et al.
    2025: entropy falls by this covariance, so its largest tokens are where entropy collapses."""
    valid = mask.bool()
    return (advantages - advantages[valid].mean()) * (logp - logp[valid].mean())


def clip_cov_mask(advantages, logp, mask, clipped, frac, bounds, generator=None):
    """Clip-Cov: (B, C) float, 0 on max(1, floor(frac N)) random valid unclipped tokens with lower < cov_t < upper."""
    valid = mask.bool()
    cov = token_covariance(advantages, logp, mask)  # (B, C)
    candidates = valid & ~clipped & (cov > bounds[0]) & (cov < bounds[1])
    num_cut = max(1, math.floor(frac * int(valid.sum())))
    idx = candidates.flatten().nonzero().squeeze(-1)
    chosen = idx[torch.randperm(len(idx), generator=generator)[:num_cut]]
    keep = torch.ones(mask.numel(), device=mask.device)
    keep[chosen] = 0.0
    return keep.view_as(mask)


def kl_cov_mask(advantages, logp, mask, frac):
    """KL-Cov: (B, C) bool, the top max(1, floor(frac N)) valid tokens by cov_t (they get |logp - logp_old|)."""
    k = min(max(1, math.floor(frac * int(mask.sum()))), int(mask.sum()))
    return top_tokens(token_covariance(advantages, logp, mask), mask, k)


def top_entropy_mask(entropy, mask, rho):
    """Forking tokens (Wang et al. 2025, rho = 0.2): (B, C) float, 1 on the top ceil(rho N) entropies."""
    return top_tokens(entropy, mask, math.ceil(rho * int(mask.sum()))).float()


def mismatch_weights(logp_old, logp_rollout, mask, args: Args):
    """Per-token weights that correct for sampler != trainer, from k_t = pi_old(y_t) / pi_sampler(y_t):
      tis           sg(min(k_t, C))                                   (Yao et al. 2025)
      icepop        k_t where low <= k_t <= high, else 0              (IcePop; TRL's token_mask)
      seq_mask      k_i = prod_t k_t on every token of completion i where low <= k_i <= high,
                    else 0 for the whole completion                   (TRL's sequence_mask)
      seq_mask_geo  the same with k_i = exp(mean_t log k_t)           (verl's Geo-RS)
    All are 1 when the sampler and the trainer agree. (b, C) -> (b, C), detached."""
    mode, log_k = args.mismatch_correction, ((logp_old - logp_rollout) * mask).detach()  # (b, C), 0 on padding
    k = torch.exp(log_k)  # (b, C)
    if mode == "tis":
        return torch.clamp(k, max=args.tis_cap)
    if mode == "icepop":
        return k * ((k >= args.icepop_bounds[0]) & (k <= args.icepop_bounds[1]))
    if mode in ("seq_mask", "seq_mask_geo"):
        log_k_seq = log_k.sum(-1, keepdim=True)  # (b, 1); Geo-RS: the mean over the completion's tokens
        k_seq = torch.exp(log_k_seq / (mask.sum(-1, keepdim=True).clamp(min=1) if mode == "seq_mask_geo" else 1))
        kept = (k_seq >= args.seq_mask_bounds[0]) & (k_seq <= args.seq_mask_bounds[1])
        return (k_seq * kept).expand_as(log_k)
    return torch.ones_like(log_k)


def main(args: Args):
    # ---- Setup: task, batch arithmetic, run folder, device ----------------------------------
    task = load_task(args.task, max_turns=args.max_turns, call_cost=args.tool_call_cost)  # a tool task's flags
    max_new_tokens = args.max_new_tokens or task.max_new_tokens
    world, run_dir, dtype = start_run(args, "grpo")  # world: this process among torchrun's (1 of 1 under python)
    rank_rows, micro_size = validate(args, max_new_tokens, world.size)  # rank_rows: this rank's rows per step
    G = args.group_size
    prefix_group = G if micro_size % G == 0 else 1  # micro-batches of whole groups run each prompt once

    # ---- Setup: policy, frozen reference, optimizer ----------------------------------------
    model, tokenizer, eos_ids = load_policy(args, world.device, dtype)  # + LoRA adapters with --lora-rank
    ref_model = wrap_model(frozen_reference(model, args.model, world.device, dtype), world, args.fsdp) \
        if args.beta > 0 else None  # the frozen starting policy; none at beta = 0
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
    logger = RunLogger(run_dir, args, "grpo", resume_step=start_step if args.resume else None)
    print(f"grpo ({args.preset}): {args.model}, task {task.name}, {len(task.prompts)} prompts, "
          f"{args.num_prompts} x G={G} per step, device {world.device}, {world.size} process(es)")
    rank_prompts = args.num_prompts // world.size

    def sample_prompts(position: int) -> Rollout:  # this rank's share of num_prompts prompts, G completions each
        rollout = generate_and_score(engine, tokenizer, task, position + world.rank * rank_prompts, rank_prompts,
                                     args.seed, G, args.temperature, max_new_tokens, args.top_p, args.format_weight,
                                     reward_model)
        if args.overlong_cache_len != 0:  # DAPO: a soft penalty over the last L_cache tokens of the budget
            rollout = overlong_shaping(rollout, max_new_tokens, args.overlong_cache_len)
        return rollout

    # logp_old needs its own pass only if the policy moves within a step or tokens are ranked; else it is sg(logp)
    need_old_pass = args.num_epochs * args.num_minibatches > 1 or args.cov_penalty != "none" or args.top_entropy_rho < 1
    progress = tqdm(range(start_step, args.total_steps), initial=start_step, total=args.total_steps, desc="grpo",
                    disable=not world.is_main)
    for step in progress:
        step_start, times = time.perf_counter(), dict.fromkeys(("gen", "score", "train", "sync"), 0.0)
        staleness = step - last_sync  # steps the sampler's weights lag behind the trainer's
        # ---- 1. Generate + 2. Reward: G completions per prompt, each scored by the verifier ----
        with timed(times, "gen"):
            rollout = everything = sample_prompts(data_position)  # everything: all that was sampled, for the log
        data_position += args.num_prompts
        if args.dynamic_sampling:  # DAPO: keep the groups with signal, top the batch up with fresh prompts
            with timed(times, "gen"):
                rollout, everything, rounds = dynamic_sampling(rollout, sample_prompts, data_position, args,
                                                               rank_rows, tokenizer.pad_token_id)
            data_position += rounds * args.num_prompts
            if len(rollout) == 0:  # no group had signal: nothing to learn from this step
                logger.log(step + 1, {**reward_metrics(everything, G), "loss": None, "skipped": 1,
                                      "resample_rounds": rounds})
                continue

        # ---- 3. Advantage: A_i = (R_i - mean_group R) / (std + eps), the same for every token ---
        batch_std = all_gather(rollout.rewards).std() if args.scale_rewards == "batch" else None  # over every rank
        advantages = compute_advantages(rollout.rewards.view(-1, G), args.scale_rewards, args.std_eps, batch_std)
        if args.advantage != "group":  # Chen et al. 2025 / verl: the group's pass@k, not each sample's pass@1
            advantages = pass_at_k_objective(rollout, args)  # passk_advantages or best_of_group_advantages
        advantages = advantages.view(-1)
        mask = rollout.policy_mask.float()  # (B, C) the tokens the policy sampled (not tool observations)
        if args.mask_truncated:  # completions cut at max_new_tokens say nothing about the answer
            mask = mask * rollout.is_eos.float().unsqueeze(-1)

        # ---- 4. Score: logprobs of the rollout-time policy and of the reference (no grad) -------
        with timed(times, "score"):  # (B, C) each, or None when not needed
            logp_old, entropy_old = (None, None) if not need_old_pass else score_rollout(
                model, rollout, micro_size, temperature=args.temperature, with_entropy=True, group_size=prefix_group)
            logp_ref = score_rollout(ref_model, rollout, micro_size, temperature=args.temperature,
                                     group_size=prefix_group)[0] if ref_model is not None else None

        # ---- 5. Update: num_epochs passes, each num_minibatches optimizer steps of whole groups -
        stats = StepStats()
        selection_rng = torch.Generator().manual_seed(args.seed * 100_003 + step)  # Clip-Cov's draw: same on all ranks
        with timed(times, "train"):
            for minibatch in minibatches(policy, mask, G, args.num_epochs, args.num_minibatches, micro_size):
                # Clip-Cov / KL-Cov / forking tokens: tokens ranked over the minibatch (all kept when off)
                keep, kl_cov_tokens = select_tokens(args, minibatch.rows, advantages, logp_old, entropy_old, mask,
                                                    selection_rng)
                for micro_rows in minibatch:
                    micro, m = rollout[micro_rows], mask[micro_rows]  # m: (b, C)
                    logp, entropy = rollout_logprobs(policy, micro, temperature=args.temperature, with_entropy=True,
                                                     group_size=prefix_group)  # (b, C) each
                    logp_old_mb = logp.detach() if logp_old is None else logp_old[micro_rows]
                    token_loss, clipped_low, clipped_high = policy_token_loss(
                        logp, logp_old_mb, advantages[micro_rows].unsqueeze(-1), m, args, kl_cov_tokens[micro_rows])
                    # TIS / IcePop / sequence masking: reweight tokens by trainer-vs-sampler ratios
                    weights = keep[micro_rows] * mismatch_weights(logp_old_mb, micro.sampler_logprobs, m, args)
                    token_loss = token_loss * weights
                    kl = kl_penalty(logp, logp_ref[micro_rows], args.kl_estimator) if args.beta > 0 else None
                    if args.beta > 0:  # GRPO puts the KL to the reference in the loss, per token
                        token_loss = token_loss + args.beta * kl
                    if args.ent_coef > 0:
                        token_loss = token_loss - args.ent_coef * entropy
                    loss = aggregate_loss(token_loss, m, args.loss_agg, minibatch.num_seqs, minibatch.num_tokens,
                                          max_new_tokens)
                    minibatch.backward(loss)
                    gap = (logp_old_mb - micro.sampler_logprobs) * m  # trainer vs sampler, 0 on padding
                    stats.tokens(m, entropy=entropy, kl=kl, clip_frac_low=clipped_low, clip_frac_high=clipped_high,
                                 mismatch_mean_abs=gap.abs(), frac_tokens_kept=weights > 0)
                    stats.maxes(mismatch_max_ratio=torch.exp(gap).max())
                loss, grad_norm = minibatch.step(optimizer, args.max_grad_norm, step + 1, run_dir)
                stats.values(loss=loss, grad_norm=grad_norm)

        # ---- 6. Sync: copy the updated weights into the sampler (a no-op for HF generate) ---------
        if step + 1 - last_sync >= args.sync_every:
            with timed(times, "sync"):
                engine.sync_weights(model)
            last_sync = step + 1

        # ---- 7. Log -----------------------------------------------------------------------------
        metrics = {**reward_metrics(everything, G), **stats.summary(),
                   **rollout_metrics(rollout, everything, times, args.num_epochs, G),
                   **token_diagnostics(rollout.sampler_logprobs, advantages, mask),
                   "learning_rate": args.learning_rate, "resample_rounds": len(everything) // rank_rows - 1,
                   "rollout_staleness": staleness, "step_time": time.perf_counter() - step_start}
        if args.eval_every and (step + 1) % args.eval_every == 0:
            metrics["eval_accuracy"] = greedy_accuracy(model, tokenizer, task, 64, max_new_tokens, engine, eos_ids)
        logger.log(step + 1, metrics)
        progress.set_postfix(reward=f"{metrics['reward']:.2f}", acc=f"{metrics['sampled_accuracy']:.2f}",
                             zero_std=metrics["frac_zero_std_groups"])
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.total_steps:
            save_checkpoint(run_dir, model, tokenizer, optimizer, None, step + 1, {"data_position": data_position})

    # ---- Finish: checkpoint, final model, held-out evaluation ----------------------------------
    save_checkpoint(run_dir, model, tokenizer, optimizer, None, args.total_steps, {"data_position": data_position})
    return finish_run(run_dir, model, tokenizer, task, engine, eos_ids, args, max_new_tokens, logger)


if __name__ == "__main__":
    main(parse_args())
