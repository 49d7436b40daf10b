"""PPO with a learned value function: actor-critic RLHF as in "The N+ implementation details of RLHF with PPO".

PPO (Schulman et al. 2017) run on language models as Huang et al. 2024 (N+) run it, per token t of a
completion y of length |y| (docs/spec.md §4):

    r_t   = -beta * k1_t + 1[t = |y|] R                     KL to the reference, in the *reward*
    A_t   = sum_s (gamma lambda)^(s-t) delta_s,  delta_t = r_t + gamma V_{t+1} - V_t      GAE (the baseline is V)
    Ret_t = A_t + V_t,  then A_t <- whiten(A_t) over the valid tokens of the batch
    l_t   = -min(rho_t A_t, clip(rho_t, 1 - eps_low, 1 + eps_high) A_t)   rho_t = pi_theta(y_t) / pi_old(y_t)
    v_t   = 0.5 max((V_t - Ret_t)^2, (V_old_t + clip(V_t - V_old_t, -eps_v, eps_v) - Ret_t)^2)
    L     = aggregate(l_t) + vf_coef * aggregate(v_t)      token-mean

In the one view of this project, loss = - E[ w * log pi_theta(y | x) ]: y is the policy's own sample
and w_t = A_t times a clipped ratio, one weight *per token* (GRPO has one per completion).
Where it sits among the siblings (the full table: docs/ppo.md):
  reinforce.py  no ratio, no clip, one step per batch; baseline = group mean, RLOO, EMA, ...
  grpo.py       baseline = group mean (scaled by the group std); ratio + clip; KL in the loss
  ppo.py        baseline = a learned value model (GAE); ratio + clip; KL in the reward

Departures from N+: the value model starts from the *policy* (N+: from the reward model; a verifier has
none) with a zero head; --value-model shared puts the head on the policy's trunk; 16 prompts x G = 8
completions per batch, grpo.py's batch (N+: G = 1); --kl-target: Ziegler et al.'s adaptive KL controller.

Critic fixes, each a flag (docs/spec.md §4): --value-warmup-steps N (VC-PPO: fit the critic to the starting
policy before the policy moves), --lam-critic 1 (VC-PPO / VAPO: the critic's target is the return, the actor
keeps --lam-actor), --lam-actor-alpha (VAPO: lambda_actor = 1 - 1 / (alpha |y|)). What they buy, 3 seeds, and
why --num-epochs 1 matches REINFORCE where N+'s 4 fit the critic's noise: docs/ppo.md, "What the critic buys here".

Run:  python sft.py && python ppo.py        python ppo.py --value-model shared        --help
"""

import math
import os
import time
from dataclasses import dataclass
from typing import Literal

import torch
import tyro
from tqdm import tqdm

from common.checkpoint import resume_from, save_checkpoint
from common.cli import RLRunArgs, check, check_at_least, check_positive, rollout_batch_sizes
from common.distributed import (all_gather, full_state_dict, load_full_state_dict, load_optimizer_state_dict,
                                optimizer_state_dict, rank, wrap_model)
from common.evaluation import greedy_accuracy
from common.learned_reward import load_reward_model
from common.logprobs import batch_moments, masked_mean, masked_var, position_ids_from_mask, rollout_logprobs, \
    score_rollout
from common.minibatch import minibatches
from common.models import frozen_reference, load_model_and_tokenizer, load_policy, trainable_parameters
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
    value_model: Literal["separate", "shared"] = "separate"
    """the critic: a separate copy of the starting policy's trunk + a scalar head, or the head on the policy's trunk"""
    # ---- rollout ---------------------------------------------------------------------------
    total_steps: int = 200
    """steps: one rollout batch each (200: its siblings' sample budget), trained num_epochs * num_minibatches times"""
    num_prompts: int = 16
    """prompts per rollout batch, over all ranks (each of N torchrun processes samples num_prompts / N)"""
    group_size: int = 8
    """G: completions sampled per prompt (PPO needs no groups: N+ uses 1; 8 matches grpo.py's batch)"""
    temperature: float = 1.0
    """sampling temperature; the trainer scores logits / temperature, the same distribution"""
    # ---- reward ----------------------------------------------------------------------------
    format_weight: float = 0.0
    """weight of the format reward (ended with EOS and committed to an answer)"""
    non_eos_penalty: bool = True
    """N+: a completion that ends without EOS gets the score penalty_reward_value instead of the verifier's"""
    penalty_reward_value: float = -1.0
    """the score of a completion without EOS when --non-eos-penalty is on"""
    whiten_rewards: bool = False
    """N+ (off by default there too): whiten the per-token rewards over valid tokens, mean kept, before GAE"""
    # ---- advantage -------------------------------------------------------------------------
    gamma: float = 1.0
    """GAE discount (1: a reward at the end counts as much for the first token as for the last)"""
    lam_actor: float = 0.95
    """GAE lambda of the policy's advantages: 1 = Monte-Carlo return minus V (unbiased, noisy); 0 = one-step TD"""
    lam_critic: float = 0.95
    """GAE lambda of the critic's targets Ret = A + V (VC-PPO, VAPO: 1, a target that does not bootstrap from V)"""
    lam_actor_alpha: float = 0.0
    """VAPO's length-adaptive lambda: > 0 sets lam_actor = 1 - 1 / (alpha |y|) per completion (VAPO: 0.05); 0 = off"""
    whiten_advantages: bool = True
    """N+: whiten the advantages over the batch's valid tokens (--no-whiten-advantages keeps GAE's scale)"""
    # ---- policy loss -----------------------------------------------------------------------
    eps_low: float = 0.2
    """clip range below 1"""
    eps_high: float = 0.2
    """clip range above 1"""
    beta: float = 0.05
    """KL coefficient of the per-token reward -beta * kl_t (N+: 0.05); 0 loads no reference model"""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """estimator of KL(pi_old || pi_ref) in the reward: k1 = logp_old - logp_ref, as N+ (docs/spec.md §0)"""
    kl_target: float = 0.0
    """adaptive KL controller (Ziegler et al. 2019): target KL per completion (nats); 0 = fixed beta"""
    kl_horizon: int = 10000
    """adaptive KL controller: horizon in completions (beta moves by at most 20% * completions / horizon a step)"""
    ent_coef: float = 0.0
    """entropy bonus: subtract ent_coef * H_t from each token's loss"""
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = "token-mean"
    """how token losses (policy and value) become one number (see aggregate_loss); N+: token-mean"""
    vf_coef: float = 0.1
    """weight of the value loss (N+: 0.1); with --value-model separate it only scales the value gradient"""
    cliprange_value: float = 0.2
    """value clipping: V may move at most this far from V_old per rollout batch before its loss is clipped"""
    # ---- optimisation ----------------------------------------------------------------------
    learning_rate: float = 2e-4
    """AdamW learning rate (constant)"""
    vf_learning_rate: float = 1e-3
    """AdamW learning rate (constant) of the value model (its head starts at zero and has the most to learn)"""
    max_grad_norm: float = 1.0
    """gradient clipping by global norm (the policy and the value model each)"""
    num_epochs: int = 4
    """passes over each rollout batch (> 1 makes r != 1 and the clip matter; N+: 4)"""
    num_minibatches: int = 1
    """optimizer steps per pass: the rollout batch is split into this many minibatches of whole groups"""
    value_warmup_steps: int = 0
    """VC-PPO: critic-only steps on rollouts of the starting policy before step 1 (extra batches); 0 = none"""


def parse_args(argv=None) -> Args:
    return tyro.cli(Args, args=argv)


def validate(args: Args, max_new_tokens: int, world_size: int = 1) -> tuple[int, int]:
    """Reject bad values and silent knob combinations; return the batch arithmetic (rank_rows, micro_size)."""
    check_at_least(args, 1, "total_steps", "num_prompts", "group_size", "num_epochs", "num_minibatches", "kl_horizon")
    check_at_least(args, 0, "format_weight", "eps_low", "eps_high", "beta", "kl_target", "ent_coef", "lam_actor_alpha",
                   "value_warmup_steps")
    check_positive(args, "temperature", "learning_rate", "vf_learning_rate", "max_grad_norm", "vf_coef",
                   "cliprange_value")
    for name in ("gamma", "lam_actor", "lam_critic"):
        check(0 <= getattr(args, name) <= 1, name, f"must be in [0, 1], got {getattr(args, name)}")
    check(math.isfinite(args.penalty_reward_value), "penalty_reward_value", "must be a finite number")
    check(args.kl_target == 0 or args.beta > 0, "kl_target",
          "the adaptive controller scales --beta, which is 0 (no reference model); set --beta > 0")
    check(args.value_model == "separate" or not (args.fsdp or args.lora_rank), "value_model", "a shared critic needs "
          "the policy's whole trunk: --fsdp shards it, LoRA freezes it (the head alone would learn); use separate")
    return rollout_batch_sizes(args.num_prompts, args.group_size, args.num_minibatches, args.micro_batch_size,
                               world_size)


# ==== The algorithm: advantage, per-token loss, aggregation, KL. Pure functions; tests import them ====


def compute_advantages(token_rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
                       gae_lambda: float | torch.Tensor) -> torch.Tensor:
    """GAE (Schulman et al. 2016), per token, by the reversed loop of N+:

        delta_t = r_t + gamma V_{t+1} - V_t          (V after the last real token = 0: the episode ends)
        A_t     = delta_t + gamma lambda A_{t+1}

    token_rewards, values, mask (B, C), right-padded -> advantages (B, C), 0 on padding; a hole in the mask (a
    tool's observation: the environment's move, not an action) is skipped. V_t is the value of the state *before*
    y_t (see token_values). gamma = lambda = 1 gives A_t = sum_{s>=t} r_s - V_t.
    gae_lambda: one number, or (B,) one per completion (VAPO's length-adaptive lambda).
    >>> compute_advantages(torch.tensor([[0., 0., 1.]]), torch.full((1, 3), 0.5), torch.ones(1, 3), 1.0, 0.5)
    tensor([[0.1250, 0.2500, 0.5000]])
    """
    values, token_rewards = values * mask, token_rewards * mask  # (B, C): padding is past the end of the episode
    advantages, running, next_values = torch.zeros_like(token_rewards), torch.zeros_like(token_rewards[:, 0]), 0.0
    for t in reversed(range(token_rewards.shape[1])):  # next_values: V of the next *policy* token, (B,)
        delta = token_rewards[:, t] + gamma * next_values - values[:, t]  # (B,)
        valid = mask[:, t].bool()  # (B,) a masked token (padding, an observation) leaves the recursion as it is
        running = torch.where(valid, delta + gamma * gae_lambda * running, running)
        next_values = torch.where(valid, values[:, t], next_values)
        advantages[:, t] = running
    return advantages * mask


def compute_token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """N+ step 4: r_t = -beta * kl_t on every completion token, plus the sequence score R at the last real
    token (the EOS, or the last token of a truncated completion); 0 on padding.

    scores (B,), kl (B, C) per-token KL estimate, mask (B, C) -> token_rewards (B, C).
    >>> compute_token_rewards(torch.tensor([1.]), torch.tensor([[0.1, 0.2, 9.0]]), torch.tensor([[1., 1., 0.]]), 0.5)
    tensor([[-0.0500,  0.9000,  0.0000]])
    """
    token_rewards = torch.where(mask.bool(), -beta * kl, 0.0)  # (B, C)
    last = (mask * torch.arange(1, mask.shape[1] + 1, device=mask.device)).argmax(-1)  # (B,) the last real token
    token_rewards[torch.arange(len(scores)), last] += scores
    return token_rewards


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the valid positions of the whole batch (every rank's: batch_moments);
    shift_mean=False adds the mean back (TRL's convention for rewards)."""
    mean, var = batch_moments(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    return whitened if shift_mean else whitened + mean


def policy_token_loss(logp, logp_old, advantages, mask, args: Args):
    """The per-token policy loss l_t, before entropy bonus and aggregation (no KL: PPO has it in the reward).

        rho_t = exp(logp_t - logp_old_t);   l_t = -min(rho_t A_t, clip(rho_t, 1 - eps_low, 1 + eps_high) A_t)

    logp (b, C) with grad; logp_old (b, C) detached; advantages (b, C) per token (GRPO: (b, 1)); mask (b, C).
    Returns (l_t, clipped_low, clipped_high), each (b, C): the masks mark tokens whose gradient
    the clip removed (rho < 1 - eps_low with A < 0, rho > 1 + eps_high with A > 0).
    >>> one = torch.ones(1, 1)  # rho = e^0.5 = 1.65 > 1 + eps, A = 1: the loss is clipped at -1.2 A
    >>> policy_token_loss(0.5 * one, 0 * one, one, one, Args())
    (tensor([[-1.2000]]), tensor([[False]]), tensor([[True]]))
    """
    ratio = torch.exp(logp - logp_old)  # (b, C)
    unclipped = -ratio * advantages
    clipped = -torch.clamp(ratio, 1 - args.eps_low, 1 + args.eps_high) * advantages
    loss = torch.maximum(unclipped, clipped)  # = -min(rho A, clip(rho) A)
    clipped_low = (ratio < 1 - args.eps_low) & (advantages < 0)
    clipped_high = (ratio > 1 + args.eps_high) & (advantages > 0)
    return loss, clipped_low, clipped_high


def value_loss(values, values_old, returns, cliprange_value: float):
    """The per-token clipped value loss of N+ (and PPO2):

        v_t = 0.5 * max( (V_t - Ret_t)^2, (V_old_t + clip(V_t - V_old_t, -eps_v, eps_v) - Ret_t)^2 )

    values (b, C) with grad; values_old, returns (b, C) detached. Returns (v_t, clipped), clipped (b, C)
    bool where the clipped branch is the larger (its gradient is 0: V already moved eps_v towards Ret).
    >>> value_loss(torch.tensor([[1.0]]), torch.tensor([[0.0]]), torch.tensor([[2.0]]), 0.2)  # max(1, 3.24) / 2
    (tensor([[1.6200]]), tensor([[True]]))
    """
    values_clipped = values_old + torch.clamp(values - values_old, -cliprange_value, cliprange_value)
    loss_unclipped, loss_clipped = (values - returns) ** 2, (values_clipped - returns) ** 2
    return 0.5 * torch.maximum(loss_unclipped, loss_clipped), loss_clipped > loss_unclipped


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


# ==== The critic: V_t from a transformer trunk and a scalar head ======================================


def token_values(trunk, head, batch) -> torch.Tensor:
    """V_t for each completion token: the head on the hidden state that *predicts* y_t, i.e. the value of
    the state (prompt, y_<t) before y_t is emitted. V_0 is the value of the prompt alone.
    Input = prompt (P, left-padded) + completion (C, right-padded); position P - 1 + t predicts token t,
    so V = head(h[:, P-1 : P+C-1]): (b, C), fp32. Values at padding are meaningless; callers mask them."""
    input_ids = torch.cat([batch.prompt_ids, batch.completion_ids], dim=1)[:, :-1]  # (b, P + C - 1)
    attention_mask = torch.cat([batch.prompt_mask, batch.completion_mask], dim=1)[:, :-1]  # the last token
    hidden = trunk(input_ids=input_ids, attention_mask=attention_mask,  # predicts nothing: dropped
                   position_ids=position_ids_from_mask(attention_mask), use_cache=False).last_hidden_state
    P = batch.prompt_ids.shape[1]
    return head(hidden[:, P - 1:].float()).squeeze(-1)  # (b, C)


class Critic(torch.nn.Module):
    """V: a trunk and the zero-initialised scalar head; forward(batch) -> token_values, (b, C). A module of
    its own so that DDP / FSDP2 can wrap it. shared_trunk (the policy's, --value-model shared) is used when
    trunk is None and is not registered: it is trained, saved and synced as part of the policy."""

    def __init__(self, head, trunk=None, shared_trunk=None):
        super().__init__()
        self.head, self.trunk, self._shared_trunk = head, trunk, [shared_trunk]

    def forward(self, batch):
        return token_values(self.trunk if self.trunk is not None else self._shared_trunk[0], self.head, batch)


def build_critic(args: Args, model, world, dtype):
    """PPO's value model: (value_model, critic = what the update runs, wrapped like the policy, value_optimizer).

    A trunk (a second copy of the starting policy without its LM head; with --value-model shared the policy's
    own trunk, which the policy's optimizer trains) and a scalar head that starts at zero: V = 0, so the first
    advantages are the plain returns, not returns minus random values (N+'s N(0, 1/sqrt(h + 1)) head sits on a
    trained reward model; ours would sit on a trunk never trained to predict reward). The optimizer is built
    after the wrap: FSDP2 shards the parameters in place."""
    head = torch.nn.Linear(model.config.hidden_size, 1, device=world.device)
    torch.nn.init.zeros_(head.weight), torch.nn.init.zeros_(head.bias)
    trunk = None  # --value-model shared: the critic reads the policy's own trunk
    if args.value_model == "separate":
        trunk = load_model_and_tokenizer(args.model, world.device, dtype)[0].base_model
    value_model = Critic(head, trunk, shared_trunk=model.base_model).train()
    critic = wrap_model(value_model, world, args.fsdp)
    return value_model, critic, torch.optim.AdamW(value_model.parameters(), lr=args.vf_learning_rate, weight_decay=0.0)


@torch.no_grad()
def score_values(value_model, rollout, micro_size: int) -> torch.Tensor:
    """V_t of the whole rollout, no grad, in micro-batches of micro_size rows: (B, C), unmasked."""
    return torch.cat([value_model(rollout[i:i + micro_size]) for i in range(0, len(rollout), micro_size)])


def explained_variance(returns, values, mask) -> float:
    """1 - Var(Ret - V) / Var(Ret) over the valid tokens: 1 for a perfect critic, 0 for V = 0 (or a constant)."""
    return (1 - masked_var(returns - values, mask) / masked_var(returns, mask)).item()


def critic_state(value_model, value_optimizer) -> dict:
    """The critic's weights and optimizer state, for the checkpoint (collectives under FSDP2)."""
    return {"value_model": full_state_dict(value_model, to_cpu=True),
            "value_optimizer": optimizer_state_dict(value_model, value_optimizer)}


def load_critic_state(extra: dict, value_model, value_optimizer, learning_rate: float) -> float:
    """Resume the critic and its optimizer (at this run's --vf-learning-rate) from a checkpoint's extra;
    returns the checkpoint's (adaptive) beta."""
    load_full_state_dict(value_model, extra["value_model"])
    load_optimizer_state_dict(value_model, value_optimizer, extra["value_optimizer"])
    for group in value_optimizer.param_groups:
        group["lr"] = learning_rate
    return extra["beta"]


def save_critic(run_dir: str, value_model):
    """The final critic's weights as runs/<run_name>/value_model.pt, for study (written by rank 0)."""
    state = full_state_dict(value_model, to_cpu=True)  # a collective under FSDP2
    if rank() == 0:
        torch.save(state, os.path.join(run_dir, "value_model.pt"))


# ==== Variants: each one a flag, off by default (docs/spec.md §4) =====================================


def adaptive_kl_beta(beta: float, kl: float, kl_target: float, horizon: int, n_steps: int) -> float:
    """Ziegler et al. 2019 (arXiv 1909.08593), --kl-target > 0: a proportional controller on beta.

        e = clip(KL / KL_target - 1, -0.2, 0.2);   beta <- beta * (1 + e * n_steps / horizon)

    kl is the batch's mean KL per completion (sum over its tokens), n_steps the completions in the batch.
    >>> round(adaptive_kl_beta(0.1, 12.0, 6.0, 10000, 1000), 4)  # KL twice the target: +20% * 0.1
    0.102
    """
    error = min(max(kl / kl_target - 1, -0.2), 0.2)
    return beta * (1 + error * n_steps / horizon)


def length_adaptive_lambda(lengths: torch.Tensor, alpha: float) -> torch.Tensor:
    """VAPO (Yue et al. 2025, arXiv 2504.05118), --lam-actor-alpha: lambda_actor = 1 - 1 / (alpha |y|) per completion.

    GAE's weights (gamma lambda)^k sum to 1 / (1 - lambda) = alpha |y| tokens: a long completion looks as far
    ahead as a short one does, relative to its length. Clamped at 0 when |y| < 1 / alpha (VAPO's completions are
    thousands of tokens long; alpha = 0.05 gives a 3-token answer lambda 0, pure TD). lengths (B,) -> (B,).
    >>> length_adaptive_lambda(torch.tensor([40., 100., 4.]), 0.05)
    tensor([0.5000, 0.8000, 0.0000])
    """
    return (1 - 1 / (alpha * lengths.clamp(min=1))).clamp(min=0)


def decoupled_gae(token_rewards, values, mask, gamma: float, lam_actor, lam_critic: float):
    """VC-PPO (Yuan et al. 2025, arXiv 2503.01491), --lam-critic / --lam-actor: one GAE for the policy, another for
    the critic's target. Returns (advantages A(lam_actor), returns Ret = A(lam_critic) + V), each (B, C).

    lambda < 1 builds the target from V itself: an untrained critic's errors enter its own target and, with a
    reward only at the end, reach early tokens as lambda^(|y| - t). lam_critic = 1 makes the target the return
    (unbiased whatever V is); lam_actor < 1 keeps the policy's advantages quiet. Equal lambdas: N+ (one GAE)."""
    advantages = compute_advantages(token_rewards, values, mask, gamma, lam_actor)
    same = isinstance(lam_actor, float) and lam_actor == lam_critic
    critic_advantages = advantages if same else compute_advantages(token_rewards, values, mask, gamma, lam_critic)
    return advantages, critic_advantages + values * mask


def warm_up_critic(args: Args, sample_prompts, value_model, critic, value_optimizer, micro_size: int,
                   max_new_tokens: int, run_dir: str, logger) -> int:
    """VC-PPO's value pretraining, --value-warmup-steps N: N batches sampled from the starting policy train the
    critic alone (its targets with --lam-critic; the policy's weights are not touched), so that step 1's
    advantages are not a zero-head critic's. No KL term: the policy is still the reference. Each batch is
    logged as {"event": "value_warmup", ...}; returns the data position after them (the stream goes on)."""
    G, data_position = args.group_size, 0
    for i in tqdm(range(args.value_warmup_steps), desc="value warm-up", disable=rank() != 0):
        rollout = sample_prompts(data_position)
        data_position += args.num_prompts
        mask = rollout.policy_mask.float()  # (B, C) the tokens the policy sampled (not tool observations)
        scores = rollout.rewards.float()  # (B,), N+ 3. missing-EOS penalty as in the loop
        if args.non_eos_penalty:
            scores = torch.where(rollout.is_eos, scores, torch.full_like(scores, args.penalty_reward_value))
        token_rewards = compute_token_rewards(scores, torch.zeros_like(mask), mask, 0.0)  # (B, C)
        values_old = score_values(value_model, rollout, micro_size) * mask
        returns = compute_advantages(token_rewards, values_old, mask, args.gamma, args.lam_critic) + values_old
        for minibatch in minibatches([critic], mask, G, args.num_epochs, args.num_minibatches, micro_size):
            for micro_rows in minibatch:
                value_token_loss, _ = value_loss(critic(rollout[micro_rows]), values_old[micro_rows],
                                                 returns[micro_rows], args.cliprange_value)
                minibatch.backward(aggregate_loss(value_token_loss, mask[micro_rows], args.loss_agg,
                                                  minibatch.num_seqs, minibatch.num_tokens, max_new_tokens))
            loss, grad_norm = minibatch.step([value_optimizer], args.max_grad_norm, 0, run_dir)
        logger.log(0, {"event": "value_warmup", "warmup_step": i + 1, "value_loss": loss, "value_grad_norm": grad_norm,
                       "sampled_accuracy": rollout.reward_terms["correct"].float().mean().item(),
                       "explained_variance": explained_variance(returns, values_old, mask),
                       "explained_variance_after": explained_variance(
                           returns, score_values(value_model, rollout, micro_size), mask)})
    return data_position


# ==== Training loop ====================================================================================


def main(args: Args):
    # ---- Setup: task, batch arithmetic, run folder, device ----------------------------------
    task = load_task(args.task, max_turns=args.max_turns, call_cost=args.tool_call_cost)  # a tool task's flags
    max_new_tokens = args.max_new_tokens or task.max_new_tokens
    world, run_dir, dtype = start_run(args, "ppo")  # world: this process among torchrun's (1 of 1 under python)
    rank_rows, micro_size = validate(args, max_new_tokens, world.size)  # rank_rows: this rank's rows per step
    G = args.group_size
    prefix_group = G if micro_size % G == 0 else 1  # micro-batches of whole groups run each prompt once

    # ---- Setup: policy, frozen reference, optimizer ----------------------------------------
    model, tokenizer, eos_ids = load_policy(args, world.device, dtype)  # + LoRA adapters with --lora-rank
    ref_model = wrap_model(frozen_reference(model, args.model, world.device, dtype), world, args.fsdp) \
        if args.beta > 0 else None  # the frozen starting policy; none at beta = 0
    policy = wrap_model(model, world, args.fsdp)  # what the update runs: DDP / FSDP2 under torchrun, else the model
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=args.learning_rate, weight_decay=0.0)
    value_model, critic, value_optimizer = build_critic(args, model, world, dtype)  # PPO: V_t, wrapped, its AdamW

    # ---- Setup: rollout engine (HF generate, or vLLM colocated on this device) ---------------
    # Built before a resume restores the RNG: the vLLM engine re-seeds torch's global generator.
    engine = build_engine(args, model, tokenizer, eos_ids, task, max_new_tokens, dtype, world.device, rank_rows)
    reward_model = load_reward_model(args.reward_model, tokenizer, world.device, dtype)  # --reward-model, or None

    # ---- Setup: resume, logger ----------------------------------------------------------------
    start_step, data_position = 0, 0
    beta = args.beta  # PPO: the KL coefficient of the reward (--kl-target adapts it)
    if args.resume:
        start_step, extra = resume_from(run_dir, model, optimizer, learning_rate=args.learning_rate)
        data_position = extra["data_position"]
        beta = load_critic_state(extra, value_model, value_optimizer, args.vf_learning_rate)  # PPO: critic, beta too
        engine.sync_weights(model)  # the engine loaded args.model; the resumed trainer is ahead of it
    last_sync = start_step  # the sampler holds the weights of this step; staleness = step - last_sync
    logger = RunLogger(run_dir, args, "ppo", resume_step=start_step if args.resume else None)
    print(f"ppo ({args.value_model} value model): {args.model}, task {task.name}, {len(task.prompts)} prompts, "
          f"{args.num_prompts} x G={G} per step, device {world.device}, {world.size} process(es)")
    rank_prompts = args.num_prompts // world.size

    def sample_prompts(position: int) -> Rollout:  # this rank's share of num_prompts prompts, G completions each
        rollout = generate_and_score(engine, tokenizer, task, position + world.rank * rank_prompts, rank_prompts,
                                     args.seed, G, args.temperature, max_new_tokens, args.top_p, args.format_weight,
                                     reward_model)
        return rollout

    if args.value_warmup_steps and not args.resume:  # VC-PPO: fit the critic to the starting policy first
        data_position = warm_up_critic(args, sample_prompts, value_model, critic, value_optimizer, micro_size,
                                       max_new_tokens, run_dir, logger)

    def checkpoint_extra() -> dict:  # PPO: the critic, its optimizer and the (adaptive) beta, for an exact resume
        return {"data_position": data_position, "beta": beta, **critic_state(value_model, value_optimizer)}

    progress = tqdm(range(start_step, args.total_steps), initial=start_step, total=args.total_steps, desc="ppo",
                    disable=not world.is_main)
    for step in progress:
        step_start, times = time.perf_counter(), dict.fromkeys(("gen", "score", "train", "sync"), 0.0)
        staleness = step - last_sync  # steps the sampler's weights lag behind the trainer's
        # ---- 1. Generate + 2. Reward: G completions per prompt, each scored by the verifier ----
        with timed(times, "gen"):
            rollout = sample_prompts(data_position)  # N+ 1. cut after the first EOS (completion_mask), 2. score: R_i
        data_position += args.num_prompts

        # ---- 3. Advantage: per token, by GAE; it needs 4. Score's logp_old, logp_ref and V_old, so it follows it
        mask = rollout.policy_mask.float()  # (B, C) the tokens the policy sampled (not tool observations)

        # ---- 4. Score: logprobs of the rollout-time policy and of the reference (no grad) -------
        with timed(times, "score"):  # (B, C) each, or None when not needed
            logp_old = score_rollout(model, rollout, micro_size, temperature=args.temperature,
                                     group_size=prefix_group)[0]
            logp_ref = score_rollout(ref_model, rollout, micro_size, temperature=args.temperature,
                                     group_size=prefix_group)[0] if ref_model is not None else None
            values_old = score_values(value_model, rollout, micro_size) * mask  # PPO: V_old, the value clip's anchor
        # PPO: 3. Advantage, by N+'s response processing. N+ 3. missing-EOS penalty: no EOS, penalty_reward_value
        scores = rollout.rewards.float()  # (B,)
        if args.non_eos_penalty:
            scores = torch.where(rollout.is_eos, scores, torch.full_like(scores, args.penalty_reward_value))
        # N+ 4. per-token rewards: -beta * kl_t on every completion token, the score at the last real token
        kl = kl_penalty(logp_old, logp_ref, args.kl_estimator) * mask if args.beta > 0 else torch.zeros_like(mask)
        token_rewards = compute_token_rewards(scores, kl, mask, beta)  # (B, C)
        if args.whiten_rewards:  # N+ option, off by default: scale the rewards, keep their mean
            token_rewards = masked_whiten(token_rewards, mask, shift_mean=False) * mask
        lam_actor = args.lam_actor  # VAPO: with --lam-actor-alpha, 1 - 1 / (alpha |y|) per completion
        lam_actor = length_adaptive_lambda(mask.sum(-1), args.lam_actor_alpha) if args.lam_actor_alpha else lam_actor
        # N+ 5. GAE, 6. returns Ret = A + V_old, the critic's target (VC-PPO: its own lambda), before whitening
        advantages, returns = decoupled_gae(token_rewards, values_old, mask, args.gamma, lam_actor, args.lam_critic)
        if args.whiten_advantages:
            advantages = masked_whiten(advantages, mask) * mask  # N+ 7. whiten over the batch's valid tokens only

        # ---- 5. Update: num_epochs passes, each num_minibatches optimizer steps of whole groups -
        stats = StepStats()
        stats.tokens(mask, kl=kl, non_score_reward=-beta * kl)
        with timed(times, "train"):
            for minibatch in minibatches([policy, critic], mask, G, args.num_epochs, args.num_minibatches, micro_size):
                for micro_rows in minibatch:
                    micro, m = rollout[micro_rows], mask[micro_rows]  # m: (b, C)
                    logp, entropy = rollout_logprobs(policy, micro, temperature=args.temperature, with_entropy=True,
                                                     group_size=prefix_group)  # (b, C) each
                    logp_old_mb = logp_old[micro_rows]
                    token_loss, clipped_low, clipped_high = policy_token_loss(
                        logp, logp_old_mb, advantages[micro_rows], m, args)
                    if args.ent_coef > 0:
                        token_loss = token_loss - args.ent_coef * entropy
                    # PPO: the critic's loss, clipped around V_old, on the same tokens and normaliser
                    values = critic(micro)  # (b, C)
                    value_token_loss, value_clipped = value_loss(values, values_old[micro_rows], returns[micro_rows],
                                                                 args.cliprange_value)
                    value_part = aggregate_loss(value_token_loss, m, args.loss_agg, minibatch.num_seqs,
                                                minibatch.num_tokens, max_new_tokens)
                    loss = aggregate_loss(token_loss, m, args.loss_agg, minibatch.num_seqs, minibatch.num_tokens,
                                          max_new_tokens)
                    loss = loss + args.vf_coef * value_part  # PPO: L = L_pg + vf_coef * L_vf, one backward
                    minibatch.backward(loss, value_loss=value_part)
                    gap = (logp_old_mb - micro.sampler_logprobs) * m  # trainer vs sampler, 0 on padding
                    log_ratio = (logp - logp_old_mb).detach()  # log rho_t; approx_kl: k3 of KL(pi_old || pi_theta)
                    stats.tokens(m, entropy=entropy, clip_frac_low=clipped_low, clip_frac_high=clipped_high,
                                 mismatch_mean_abs=gap.abs(), clipfrac=clipped_low | clipped_high,
                                 approx_kl=torch.exp(log_ratio) - 1 - log_ratio,  # mean((rho - 1) - log rho)
                                 vf_clipfrac=value_clipped, value_mean=values)
                    stats.maxes(mismatch_max_ratio=torch.exp(gap).max())
                loss, grad_norm = minibatch.step([optimizer, value_optimizer], args.max_grad_norm, step + 1, run_dir)
                stats.values(loss=loss, grad_norm=grad_norm, value_loss=minibatch.parts["value_loss"],
                             value_grad_norm=minibatch.grad_norms[1])
        values_new = score_values(value_model, rollout, micro_size)  # PPO: the critic after its update, same batch

        # ---- 6. Sync: copy the updated weights into the sampler (a no-op for HF generate) ---------
        if step + 1 - last_sync >= args.sync_every:
            with timed(times, "sync"):
                engine.sync_weights(model)
            last_sync = step + 1

        # ---- 7. Log -----------------------------------------------------------------------------
        metrics = {**reward_metrics(rollout, G), **stats.summary(),  # G = 1: frac_zero_std_groups is None (no std)
                   **rollout_metrics(rollout, rollout, times, args.num_epochs, G),
                   **token_diagnostics(rollout.sampler_logprobs, advantages, mask),
                   "score": scores.mean().item(), "beta": beta, "returns_mean": masked_mean(returns, mask).item(),
                   "explained_variance": explained_variance(returns, values_old, mask),  # the critic before its update
                   "explained_variance_after": explained_variance(returns, values_new, mask),  # and after it
                   "learning_rate": args.learning_rate, "lam_actor": torch.as_tensor(lam_actor).float().mean().item(),
                   "rollout_staleness": staleness, "step_time": time.perf_counter() - step_start}
        if args.kl_target > 0:  # Ziegler et al.: move beta towards the target KL per completion (every rank's)
            beta = adaptive_kl_beta(beta, all_gather(kl.sum(-1)).mean().item(), args.kl_target, args.kl_horizon,
                                    args.num_prompts * G)
        if args.eval_every and (step + 1) % args.eval_every == 0:
            metrics["eval_accuracy"] = greedy_accuracy(model, tokenizer, task, 64, max_new_tokens, engine, eos_ids)
        logger.log(step + 1, metrics)
        progress.set_postfix(reward=f"{metrics['reward']:.2f}", acc=f"{metrics['sampled_accuracy']:.2f}",
                             ev=f"{metrics['explained_variance']:.2f}")
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.total_steps:
            save_checkpoint(run_dir, model, tokenizer, optimizer, None, step + 1, checkpoint_extra())

    # ---- Finish: checkpoint, final model, held-out evaluation ----------------------------------
    save_checkpoint(run_dir, model, tokenizer, optimizer, None, args.total_steps, checkpoint_extra())
    save_critic(run_dir, value_model)  # PPO: the final critic, for study
    return finish_run(run_dir, model, tokenizer, task, engine, eos_ids, args, max_new_tokens, logger)


if __name__ == "__main__":
    main(parse_args())
