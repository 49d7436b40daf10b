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

              baseline from             ratio and clip         KL to the reference    value loss   aggregation
  REINFORCE   batch/group stats, EMA    none (1 step/batch)    reward or loss         none         per flag
  GRPO        group mean / group std    token ratio, 0.2       loss, k3, beta 0.04    none         seq-mean-token-mean
  PPO (here)  a critic V_t, GAE         token ratio, 0.2       reward, k1, beta 0.05  clipped MSE  token-mean

What departs from N+ (each a flag where it can be): the value model starts from the *policy* (N+ starts
it from the reward model; a verifier has none) with a zero head; --value-model shared puts the head on the
policy's own trunk; --num-prompts x --group-size completions per batch (N+ samples one per prompt, G = 1;
the default 16 x 8 is grpo.py's batch, so the two compare like for like); --kl-target turns on Ziegler et
al.'s adaptive KL controller.

Note: GAE with lambda < 1 discounts the final reward towards early tokens (lambda^(|y|-t)); reasoning-RL
recipes (Open-Reasoner-Zero, VC-PPO) use lambda = 1 so that a reward at the end of a long answer reaches
every token. Here answers are 3 tokens long, and 0.95 is N+'s default.
On the default task the critic learns the mean return but not which answers are right: explained variance
stays ~0 (a perfect critic: 0.3-0.45), so PPO here acts like REINFORCE with a mean baseline (docs/ppo.md).

Run:  python sft.py && python ppo.py        python ppo.py --value-model shared        --help
"""

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
from common.cli import Dtype, check, check_device, exact_div
from common.distributed import (all_reduce, clip_grad_norm, full_state_dict, grad_sync, load_full_state_dict,
                                load_optimizer_state_dict, optimizer_state_dict, setup_distributed, wrap_model)
from common.evaluation import evaluate, greedy_accuracy
from common.logprobs import masked_mean, masked_var, masked_whiten, position_ids_from_mask, rollout_logprobs, \
    score_rollout
from common.models import add_lora, eos_token_ids, frozen_reference, load_model_and_tokenizer, pick_dtype
from common.rollout import build_engine, generate_and_score, reward_metrics
from common.tasks import DEFAULT_TASK, load_task
from common.tracking import RunLogger, StepStats, print_config, print_eval, timed

@dataclass
class Args:
    # ---- what to train --------------------------------------------------------------------
    model: str = "runs/sft"
    """policy to start from (and the frozen reference): a folder, a hub id, or qwen2-tiny:random (offline)"""
    task: str = DEFAULT_TASK
    """task name (see common/tasks.py)"""
    value_model: Literal["separate", "shared"] = "separate"
    """the critic: a separate copy of the starting policy's trunk + a scalar head, or the head on the policy's trunk"""
    run_name: str = "ppo"
    """outputs go to runs/<run_name>/"""
    seed: int = 1
    """seed for data order and sampling"""
    # ---- rollout ---------------------------------------------------------------------------
    total_steps: int = 100
    """optimizer steps (one rollout batch each, times num_epochs * num_minibatches updates)"""
    num_prompts: int = 16
    """prompts per rollout batch, over all ranks (each of N torchrun processes samples num_prompts / N)"""
    group_size: int = 8
    """G: completions sampled per prompt (PPO needs no groups: N+ uses 1; 8 matches grpo.py's batch)"""
    temperature: float = 1.0
    """sampling temperature; the trainer scores logits / temperature, the same distribution"""
    top_p: float = 1.0
    """nucleus sampling; < 1 biases the importance ratio (the trainer does not truncate)"""
    max_new_tokens: int = 0
    """completion budget; 0 = the task's default"""
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
    lam: float = 0.95
    """GAE lambda: 1 = Monte-Carlo return minus V (unbiased, noisy); 0 = one-step TD (biased by V, quiet)"""
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
    """adaptive KL controller: horizon in completions (beta moves by at most 20% * batch_size / horizon a step)"""
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
    """AdamW learning rate (constant), policy"""
    vf_learning_rate: float = 1e-3
    """AdamW learning rate (constant), value model (its head starts at zero and has the most to learn)"""
    max_grad_norm: float = 1.0
    """gradient clipping by global norm (policy and value model each)"""
    num_epochs: int = 4
    """mu: passes over each rollout batch (N+: 4)"""
    num_minibatches: int = 1
    """optimizer steps per pass: the rollout batch is split into this many minibatches of whole groups"""
    micro_batch_size: int = 128
    """completions per forward/backward on each rank; gradients accumulate to the minibatch"""
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
    """Reject bad values and silent knob combinations; derive the batch arithmetic once: each of the
    world_size ranks samples num_prompts / world_size prompts, a rollout batch of batch_size =
    that * G rows, cut into num_minibatches optimizer steps of whole groups (minibatch_size rows
    per rank), each accumulated over micro-batches of micro_size rows."""
    check(args.group_size >= 1, "group_size", "must be >= 1 (PPO's baseline is the value model, not the group)")
    check(args.temperature > 0, "temperature", "must be > 0 for sampling")
    check(0 < args.top_p <= 1, "top_p", "must be in (0, 1]")
    check(args.eps_low >= 0 and args.eps_high >= 0, "eps_low", "clip ranges must be >= 0")
    check(args.beta >= 0 and args.ent_coef >= 0, "beta", "--beta and --ent-coef must be >= 0")
    check(0 <= args.gamma <= 1 and 0 <= args.lam <= 1, "gamma", "--gamma and --lam must be in [0, 1]")
    check(args.cliprange_value > 0 and args.vf_coef > 0, "cliprange_value",
          "--cliprange-value and --vf-coef must be > 0")
    check(args.kl_target >= 0 and args.kl_horizon > 0, "kl_target", "--kl-target must be >= 0, --kl-horizon > 0")
    check(args.kl_target == 0 or args.beta > 0, "kl_target",
          "the adaptive controller scales --beta, which is 0 (no reference model); set --beta > 0")
    check_device(args.device)
    if args.top_p < 1:
        print("warning: --top-p < 1: the trainer scores the untruncated distribution, so ratios are biased")
    check(args.sync_every == 1 or (args.rollout == "vllm" and args.sync_every > 1), "sync_every",
          "must be >= 1, and 1 with --rollout hf: HF generate always samples with the current weights")
    check(args.lora_rank >= 0, "lora_rank", "must be >= 0 (0 = train every weight)")
    check(not (args.lora_rank and args.fsdp), "fsdp", "LoRA is for a model whose base fits one device; "
          "drop --fsdp (DDP then copies the base to each rank) or --lora-rank")
    check(not (args.fsdp and args.value_model == "shared"), "value_model", "--fsdp shards the policy and a "
          "separate critic; a critic on the policy's sharded trunk is not supported: use --value-model separate")
    check(not (args.lora_rank and args.value_model == "shared"), "value_model", "under LoRA the policy's trunk "
          "is frozen, so a shared critic would learn its head only: use --value-model separate")
    batch_size = exact_div(args.num_prompts, world_size, "num_prompts", "nproc_per_node") * args.group_size
    minibatch_size = exact_div(batch_size, args.num_minibatches, "num_prompts", "num_minibatches")
    check(minibatch_size % args.group_size == 0, "num_minibatches", "each minibatch must hold whole groups")
    micro_size = min(args.micro_batch_size, minibatch_size)
    exact_div(minibatch_size, micro_size, "num_prompts", "micro_batch_size")
    return batch_size, minibatch_size, micro_size


# ==== The algorithm: advantage, per-token loss, aggregation, KL. Pure functions; tests import them ====


def compute_advantages(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
                       lam: float) -> torch.Tensor:
    """GAE (Schulman et al. 2016), per token, by the reversed loop of N+:

        delta_t = r_t + gamma V_{t+1} - V_t          (V after the last real token = 0: the episode ends)
        A_t     = delta_t + gamma lambda A_{t+1}

    rewards, values, mask (B, C), right-padded -> advantages (B, C), 0 on padding. V_t is the value of
    the state *before* y_t (see token_values). gamma = lambda = 1 gives A_t = sum_{s>=t} r_s - V_t.
    >>> compute_advantages(torch.tensor([[0., 0., 1.]]), torch.full((1, 3), 0.5), torch.ones(1, 3), 1.0, 0.5)
    tensor([[0.1250, 0.2500, 0.5000]])
    """
    values, rewards = values * mask, rewards * mask  # (B, C): padding is past the end of the episode
    advantages, running = torch.zeros_like(rewards), torch.zeros_like(rewards[:, 0])  # (B, C), (B,)
    for t in reversed(range(rewards.shape[1])):
        next_values = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_values - values[:, t]  # (B,)
        running = delta + gamma * lam * running
        advantages[:, t] = running
    return advantages * mask


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """N+ step 4: r_t = -beta * kl_t on every completion token, plus the sequence score R at the last real
    token (the EOS, or the last token of a truncated completion); 0 on padding.

    scores (B,), kl (B, C) per-token KL estimate, mask (B, C) -> (B, C).
    >>> token_rewards(torch.tensor([1.]), torch.tensor([[0.1, 0.2, 9.0]]), torch.tensor([[1., 1., 0.]]), 0.5)
    tensor([[-0.0500,  0.9000,  0.0000]])
    """
    rewards = torch.where(mask.bool(), -beta * kl, 0.0)  # (B, C)
    last = (mask.sum(-1).long() - 1).clamp(min=0)  # (B,) index of the last real token
    rewards[torch.arange(len(scores)), last] += scores
    return rewards


def whiten_advantages(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """N+ step 7: (A - mean) / std over the *valid* tokens of the batch only, 0 on padding.

    Padding counted as zeros would pull the mean towards 0 and shrink the std (more so the longer
    the padding), so the scale of every advantage would depend on the batch's length spread.
    advantages, mask (B, C) -> (B, C).
    """
    return masked_whiten(advantages, mask) * mask


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


def token_values(trunk, head, batch) -> torch.Tensor:
    """V_t for each completion token: the head on the hidden state that *predicts* y_t, i.e. the value of
    the state (prompt, y_<t) before y_t is emitted. V_0 is the value of the prompt alone.

    Input = prompt (P, left-padded) + completion (C, right-padded); position P - 1 + t predicts token t,
    so V = head(h[:, P-1 : P+C-1]): (b, C), fp32. Values at padding are meaningless; callers mask them.
    """
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

    # ---- Setup: policy, frozen reference, value model, optimizers ------------------------------
    model, tokenizer = load_model_and_tokenizer(args.model, device, dtype)
    if args.lora_rank:  # LoRA: only low-rank adapters train; the reference is the base with them off
        model = add_lora(model, args.lora_rank, args.lora_alpha)
    model.train()
    ref_model = None
    if args.beta > 0:  # the frozen starting policy; beta = 0 skips it entirely
        ref_model = wrap_model(frozen_reference(model, args.model, device, dtype), world, args.fsdp)
    eos_ids = eos_token_ids(model, tokenizer)
    train_model = wrap_model(model, world, args.fsdp)  # DDP / FSDP2 under torchrun; the model itself otherwise
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate,
                                  weight_decay=0.0)
    # PPO: the critic. A trunk (a second copy of the starting policy without its LM head, or the policy's own
    # trunk) and a scalar head, zero-initialised: V = 0 everywhere at the start, so the first advantages are
    # the plain returns, not the returns minus random values (N+'s N(0, 1/sqrt(hidden + 1)) head sits on a
    # trained reward model; ours would sit on a trunk never trained to predict reward).
    head = torch.nn.Linear(model.config.hidden_size, 1, device=device)
    torch.nn.init.zeros_(head.weight), torch.nn.init.zeros_(head.bias)
    trunk = None  # --value-model shared: the critic reads the policy's own trunk
    if args.value_model == "separate":
        trunk = load_model_and_tokenizer(args.model, device, dtype)[0].base_model
    value_model = Critic(head, trunk, shared_trunk=model.base_model).train()
    train_value_model = wrap_model(value_model, world, args.fsdp)  # DDP / FSDP2 under torchrun, like the policy
    # shared: the head's optimizer holds the head only; the value loss reaches the trunk through the policy's
    value_optimizer = torch.optim.AdamW(value_model.parameters(), lr=args.vf_learning_rate, weight_decay=0.0)

    # ---- Setup: rollout engine (HF generate, or vLLM colocated on this device) ---------------
    # Built before a resume restores the RNG: the vLLM engine re-seeds torch's global generator.
    engine = build_engine(args.rollout, model, tokenizer, eos_ids, task=task, max_new_tokens=max_new_tokens,
                          model_path=args.model, dtype=dtype, vllm_dtype=args.vllm_dtype, max_num_seqs=batch_size,
                          gpu_memory_utilization=args.vllm_gpu_memory_utilization, seed=args.seed, device=device)

    # ---- Setup: resume, logger ----------------------------------------------------------------
    start_step, data_position, beta = 0, 0, args.beta
    if args.resume:
        start_step, extra = resume_from(run_dir, model, optimizer, learning_rate=args.learning_rate)
        data_position, beta = extra["data_position"], extra["beta"]
        load_full_state_dict(value_model, extra["value_model"])  # PPO: the critic and its optimizer resume too
        load_optimizer_state_dict(value_model, value_optimizer, extra["value_optimizer"])
        for group in value_optimizer.param_groups:
            group["lr"] = args.vf_learning_rate
        engine.sync_weights(model)  # the engine loaded args.model; the resumed trainer is ahead of it
    last_sync = start_step  # the sampler holds the weights of this step; staleness = step - last_sync
    logger = RunLogger(run_dir, asdict(args), args.tensorboard, args.wandb_project if args.track else None,
                       resume_step=start_step if args.resume else None)
    print(f"ppo ({args.value_model} value model): {args.model}, task {task.name}, {len(task.prompts)} prompts, "
          f"{args.num_prompts} x G={G} per step, device {device}, {world.size} process(es)")
    print_config(asdict(args))
    sample = dict(num_prompts=args.num_prompts // world.size, seed=args.seed, n=G, temperature=args.temperature,
                  max_new_tokens=max_new_tokens, top_p=args.top_p, format_weight=args.format_weight)

    def checkpoint_extra():  # PPO: the critic, its optimizer and the (adaptive) beta, for an exact resume
        return {"data_position": data_position, "beta": beta, "value_model": full_state_dict(value_model, to_cpu=True),
                "value_optimizer": optimizer_state_dict(value_model, value_optimizer)}  # collectives under FSDP2

    progress = tqdm(range(start_step, args.total_steps), initial=start_step, total=args.total_steps, desc="ppo",
                    disable=not world.is_main)
    for step in progress:
        step_start, times = time.perf_counter(), dict.fromkeys(("gen", "score", "train", "sync"), 0.0)
        staleness = step - last_sync  # steps the sampler's weights lag behind the trainer's
        # ---- 1. Generate + 2. Reward: G completions per prompt, each scored by the verifier ----
        # N+ 1. truncate after the first EOS: the engine's completion_mask ends at it, padding after.
        # N+ 2. score the truncated text: generate_and_score's verifier, R_i in rollout.rewards.
        first = data_position + world.rank * sample["num_prompts"]  # rank r samples the r-th share of the prompts
        with timed(times, "gen"):
            rollout = generate_and_score(engine, tokenizer, task, first, **sample)
        data_position += args.num_prompts

        # ---- 3. Advantage: per token, by GAE; it needs 4. Score's logp_old, logp_ref and V_old, so it follows it
        mask = rollout.completion_mask.float()  # (B, C)

        # ---- 4. Score: logprobs of the rollout-time policy and of the reference, and V_old (no grad) --
        with timed(times, "score"):  # (B, C) each
            logp_old, _ = score_rollout(model, rollout, micro_size, temperature=args.temperature, group_size=shared)
            logp_ref = score_rollout(ref_model, rollout, micro_size, temperature=args.temperature,
                                     group_size=shared)[0] if ref_model is not None else logp_old
            with torch.no_grad():  # PPO: V_old, the critic at rollout time (the value clip's anchor)
                values_old = torch.cat([value_model(rollout[i:i + micro_size])
                                        for i in range(0, len(rollout), micro_size)]) * mask  # (B, C)

        # PPO: 3. Advantage, the N+ response processing after scoring:
        # N+ 3. missing-EOS penalty: a completion cut at max_new_tokens gets penalty_reward_value as its score
        scores = rollout.rewards.float()  # (B,)
        if args.non_eos_penalty:
            scores = torch.where(rollout.is_eos, scores, torch.full_like(scores, args.penalty_reward_value))
        # N+ 4. per-token rewards: -beta * kl_t on every completion token, the score at the last real token
        kl = kl_penalty(logp_old, logp_ref, args.kl_estimator) * mask  # (B, C); 0 when beta = 0 (ref = old)
        rewards = token_rewards(scores, kl, mask, beta)  # (B, C)
        if args.whiten_rewards:  # N+ option, off by default: scale the rewards, keep their mean
            rewards = masked_whiten(rewards, mask, shift_mean=False) * mask
        # N+ 5. GAE: advantages from the rewards and the critic's V_old
        advantages = compute_advantages(rewards, values_old, mask, args.gamma, args.lam)  # (B, C)
        # N+ 6. returns, the critic's target: Ret = A + V_old, before whitening
        returns = advantages + values_old  # (B, C)
        # N+ 7. whiten the advantages over the valid tokens of the batch only (padding would shift mean and std)
        advantages = whiten_advantages(advantages, mask)  # (B, C)
        explained_variance = 1 - masked_var(returns - values_old, mask) / masked_var(returns, mask)

        # ---- 5. Update: num_epochs passes, each num_minibatches optimizer steps of whole groups -
        stats = StepStats()
        stats.tokens(mask, kl=kl, non_score_reward=-beta * kl)
        with timed(times, "train"):
            num_groups = len(rollout) // G
            for epoch in range(args.num_epochs):
                for groups in torch.randperm(num_groups).chunk(args.num_minibatches):
                    minibatch_rows = (groups[:, None] * G + torch.arange(G)).flatten()  # (mb,)
                    # the normalisers of the whole minibatch, over all ranks (not this rank's share)
                    num_seqs = len(minibatch_rows) * world.size
                    num_tokens = int(all_reduce(mask[minibatch_rows].sum()).clamp(min=1))
                    loss_sum, value_loss_sum, micro_batches = 0.0, 0.0, minibatch_rows.split(micro_size)
                    for i, micro_rows in enumerate(micro_batches):
                        # DDP / FSDP2 average the ranks' gradients in the last micro-batch's backward only
                        grad_sync(train_model, last=i == len(micro_batches) - 1)
                        grad_sync(train_value_model, last=i == len(micro_batches) - 1)
                        micro, m = rollout[micro_rows], mask[micro_rows]  # m: (b, C)
                        logp, entropy = rollout_logprobs(train_model, micro, temperature=args.temperature,
                                                         with_entropy=True, group_size=shared)  # (b, C) each
                        old = logp_old[micro_rows]
                        token_loss, clipped_low, clipped_high = policy_token_loss(
                            logp, old, advantages[micro_rows], m, args)
                        if args.ent_coef > 0:
                            token_loss = token_loss - args.ent_coef * entropy
                        # PPO: the critic's loss, clipped around V_old, on the same tokens and normaliser
                        values = train_value_model(micro)  # (b, C)
                        value_token_loss, value_clipped = value_loss(values, values_old[micro_rows],
                                                                     returns[micro_rows], args.cliprange_value)
                        value_part = aggregate_loss(value_token_loss, m, args.loss_agg, num_seqs, num_tokens,
                                                    max_new_tokens)
                        loss = (aggregate_loss(token_loss, m, args.loss_agg, num_seqs, num_tokens, max_new_tokens)
                                + args.vf_coef * value_part)
                        (loss * world.size).backward()  # the ranks' gradients are averaged: x N makes them a sum
                        loss_sum += loss.item()
                        value_loss_sum += value_part.item()
                        gap = (old - micro.sampler_logprobs) * m  # trainer vs sampler, 0 on padding
                        stats.tokens(m, entropy=entropy, clip_frac_low=clipped_low, clip_frac_high=clipped_high,
                                     clipfrac=clipped_low | clipped_high, vf_clipfrac=value_clipped,
                                     approx_kl=kl_penalty(old, logp.detach(), "k3"),  # k3 of KL(old || new)
                                     mismatch_mean_abs=gap.abs(), frac_tokens_kept=m, value_mean=values)
                        stats.maxes(mismatch_max_ratio=torch.exp(gap).max())
                    grad_norm = clip_grad_norm(train_model, args.max_grad_norm)
                    value_grad_norm = clip_grad_norm(train_value_model, args.max_grad_norm)
                    loss_sum, value_loss_sum = all_reduce(loss_sum), all_reduce(value_loss_sum)  # ranks' shares
                    stop_if_not_finite(step + 1, run_dir, loss=loss_sum, grad_norm=grad_norm,
                                       value_grad_norm=value_grad_norm)
                    optimizer.step()
                    value_optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    value_optimizer.zero_grad(set_to_none=True)
                    stats.values(loss=loss_sum, grad_norm=grad_norm, value_loss=value_loss_sum,
                                 value_grad_norm=value_grad_norm)

        with torch.no_grad():  # PPO: the critic after its update, on the same batch (how well it fits what it saw)
            values_new = torch.cat([value_model(rollout[i:i + micro_size])
                                    for i in range(0, len(rollout), micro_size)]) * mask  # (B, C)
        explained_variance_after = 1 - masked_var(returns - values_new, mask) / masked_var(returns, mask)

        # ---- 6. Sync: copy the updated weights into the sampler (a no-op for HF generate) ---------
        if step + 1 - last_sync >= args.sync_every:
            with timed(times, "sync"):
                engine.sync_weights(model)
            last_sync = step + 1

        # ---- 7. Log -----------------------------------------------------------------------------
        train_tokens = int(rollout.prompt_mask.sum() + rollout.completion_mask.sum()) * args.num_epochs
        metrics = {
            **reward_metrics(rollout, G), **stats.summary(),  # G = 1: frac_zero_std_groups is None (no std)
            "score": scores.mean().item(), "beta": beta, "explained_variance": explained_variance.item(),
            "explained_variance_after": explained_variance_after.item(),
            "returns_mean": masked_mean(returns, mask).item(),
            "completion_length": rollout.completion_lengths.float().mean().item(),
            "frac_truncated": 1 - rollout.is_eos.float().mean().item(),
            "learning_rate": args.learning_rate, "rollout_staleness": staleness,
            "gen_tokens_per_s": int(rollout.completion_mask.sum()) / times["gen"],
            "train_tokens_per_s": train_tokens / times["train"],
            **{f"{k}_time": v for k, v in times.items()}, "step_time": time.perf_counter() - step_start,
        }
        if args.kl_target > 0:  # Ziegler et al.: adapt beta towards the target KL per completion
            kl_per_completion = all_reduce(kl.sum().item()) / (len(rollout) * world.size)  # over all ranks
            beta = adaptive_kl_beta(beta, kl_per_completion, args.kl_target, args.kl_horizon, len(rollout) * world.size)
        if args.eval_every and (step + 1) % args.eval_every == 0:
            metrics["eval_accuracy"] = greedy_accuracy(model, tokenizer, task, 64, max_new_tokens, engine, eos_ids)
        logger.log(step + 1, metrics)
        progress.set_postfix(reward=f"{metrics['reward']:.2f}", acc=f"{metrics['sampled_accuracy']:.2f}",
                             ev=f"{metrics['explained_variance']:.2f}")
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.total_steps:
            save_checkpoint(run_dir, model, tokenizer, optimizer, None, step + 1, checkpoint_extra())

    # ---- Finish: checkpoint, final model, held-out evaluation ----------------------------------
    save_checkpoint(run_dir, model, tokenizer, optimizer, None, args.total_steps, checkpoint_extra())
    save_final_model(run_dir, model, tokenizer)
    critic = full_state_dict(value_model, to_cpu=True)  # a collective under FSDP2
    if world.is_main:
        torch.save(critic, os.path.join(run_dir, "value_model.pt"))  # PPO: the critic, for study
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
