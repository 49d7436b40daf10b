"""GRPO and its descendants (Dr. GRPO, DAPO, GSPO, CISPO, Clip-Cov/KL-Cov, forking tokens, TIS/IcePop).

GRPO (Shao et al., 2024, DeepSeekMath) in one equation, per token t of completion i of a
group of G completions sampled for the same prompt:

    A_i  = (R_i - mean_j R_j) / (std_j R_j + eps)                      group-relative advantage
    r_t  = pi_theta(y_t) / pi_old(y_t)                                 importance ratio
    l_t  = -min(r_t A_i, clip(r_t, 1 - eps_low, 1 + eps_high) A_i)     clipped surrogate
           + beta * k3_t                                               KL to the reference, in the loss
    L    = aggregate(l_t)                                              seq-mean-token-mean

In the one view of this project, loss = - E[ w * log pi_theta(y | x) ]: y is the policy's own
sample (on-policy) and w = A_i times a clipped ratio, negative for below-average samples.
Compared with PPO (ppo.py) there is no value model: the baseline is the group mean.

Every departure from DeepSeekMath GRPO is a flag, off by default; `--preset` sets a named recipe:
  --preset dr_grpo  Liu et al. 2025: --scale-rewards none --loss-agg seq-mean-token-sum-norm
                    (1/|y| and 1/std bias the update; Dr. GRPO removes both)
  --preset dapo     Yu et al. 2025: --eps-high 0.28 --beta 0 --loss-agg token-mean
                    --dynamic-sampling --overlong-cache-len (a quarter of max_new_tokens)
  --preset gspo     Zheng et al. 2025: --importance-level sequence --eps-low 3e-4 --eps-high 4e-4
                    --beta 0 --loss-agg seq-mean-token-mean
  --preset cispo    MiniMax-M1 2025: --policy-loss cispo --beta 0 --loss-agg token-mean
Other knobs: --dual-clip-c (Ye et al. 2020), --kl-estimator k1|k2|k3, --ent-coef,
--num-epochs/--num-minibatches (then r != 1 and the clip acts), --mask-truncated,
--cov-penalty clip_cov|kl_cov (Cui et al. 2025), --top-entropy-rho (Wang et al. 2025),
--mismatch-correction tis|icepop (Yao et al. 2025; IcePop, Ling Team 2025),
--rollout vllm (a colocated vLLM engine; weights synced every --sync-every steps).

Note: with one update per rollout batch, r_t = 1 in value and the loss value is ~0 (the
advantages are mean-centred), while the gradient is not 0. Watch reward and
`frac_zero_std_groups` (when it is 1, no group has signal and nothing can be learnt).

Run:  python sft.py && python grpo.py        python grpo.py --preset dapo        --help
"""

import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Literal

import torch
import tyro
from tqdm import tqdm

from common.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint, save_final_model
from common.cli import arg_error, check, exact_div
from common.evaluation import evaluate, greedy_accuracy
from common.logprobs import completion_logprobs, masked_mean, masked_sum
from common.models import eos_token_ids, load_model_and_tokenizer, pick_device, pick_dtype
from common.rewards import overlong_penalty, score_completions
from common.rollout import concat_rollouts, generate, select_rows
from common.tasks import DEFAULT_TASK, format_prompt, load_task, rows_at
from common.tracking import RunLogger, print_config

LossAgg = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


@dataclass
class Args:
    # ---- what to train --------------------------------------------------------------------
    model: str = "runs/sft"
    """policy to start from (and the frozen reference): a folder or a hub id"""
    task: str = DEFAULT_TASK
    """task name (see common/tasks.py)"""
    preset: Literal["grpo", "dr_grpo", "dapo", "gspo", "cispo"] = "grpo"
    """named recipe; it sets the defaults listed in the file's docstring, explicit flags win"""
    run_name: str = "grpo"
    """outputs go to runs/<run_name>/"""
    seed: int = 1
    """seed for data order and sampling"""
    # ---- rollout ---------------------------------------------------------------------------
    total_steps: int = 200
    """optimizer steps (one rollout batch each, times num_epochs * num_minibatches updates)"""
    num_prompts: int = 16
    """prompts per rollout batch"""
    group_size: int = 8
    """G: completions sampled per prompt"""
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
    sync_every: int = 1
    """--rollout vllm: copy the trainer's weights into vLLM every k steps (k > 1: samples up to k-1 steps stale)"""
    # ---- reward ----------------------------------------------------------------------------
    format_weight: float = 0.0
    """weight of the format reward (ended with EOS and committed to an answer)"""
    overlong_cache_len: int = 0
    """DAPO overlong shaping: soft penalty over the last L_cache tokens of the budget; 0 = off"""
    # ---- advantage -------------------------------------------------------------------------
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """divide (R - group mean) by the group std (GRPO), the batch std, or nothing (Dr. GRPO)"""
    adv_eps: float = 1e-4
    """eps in (R - mean) / (std + eps)"""
    dynamic_sampling: bool = False
    """DAPO: drop groups whose rewards are all equal, resample until the batch is full"""
    max_resample_rounds: int = 4
    """dynamic sampling gives up after this many extra rollout rounds (and trains on what it has)"""
    # ---- policy loss -----------------------------------------------------------------------
    policy_loss: Literal["clip", "cispo"] = "clip"
    """clip: PPO clipped surrogate; cispo: -sg(min(r, 1 + cispo_eps_high)) * A * logp"""
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
    beta: float = 0.04
    """KL coefficient; 0 loads no reference model"""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """estimator of KL(pi_theta || pi_ref) used in the loss (Schulman): k3 is GRPO's"""
    ent_coef: float = 0.0
    """entropy bonus: subtract ent_coef * H_t from each token's loss"""
    loss_agg: LossAgg = "seq-mean-token-mean"
    """how token losses become one number (see aggregate_loss)"""
    mask_truncated: bool = False
    """drop completions that hit max_new_tokens without EOS from the loss"""
    cov_penalty: Literal["none", "clip_cov", "kl_cov"] = "none"
    """entropy-mechanism interventions (Cui et al. 2025) on high-covariance tokens"""
    clip_cov_ratio: float = 2e-4
    """Clip-Cov: fraction of tokens whose gradient is cut"""
    clip_cov_bounds: tuple[float, float] = (1.0, 5.0)
    """Clip-Cov: only tokens with lower < cov < upper are candidates"""
    kl_cov_ratio: float = 2e-3
    """KL-Cov: fraction of tokens (top by covariance) that get the |logp - logp_old| penalty"""
    kl_cov_coef: float = 1.0
    """KL-Cov: coefficient of that penalty"""
    top_entropy_rho: float = 1.0
    """keep the gradient only on the top rho fraction of highest-entropy tokens (Wang et al.: 0.2); 1 = off"""
    mismatch_correction: Literal["none", "tis", "icepop"] = "none"
    """correct for sampler != trainer logprobs: TIS weight min(k, C) or IcePop mask alpha <= k <= beta"""
    tis_cap: float = 2.0
    """TIS: C in min(exp(logp_old - logp_rollout), C)"""
    icepop_bounds: tuple[float, float] = (0.5, 5.0)
    """IcePop: keep tokens whose k = exp(logp_old - logp_rollout) lies in [alpha, beta]"""
    # ---- optimisation ----------------------------------------------------------------------
    learning_rate: float = 2e-4
    """AdamW learning rate (constant)"""
    max_grad_norm: float = 1.0
    """gradient clipping by global norm"""
    num_epochs: int = 1
    """mu: passes over each rollout batch (> 1 makes r != 1 and the clip matter)"""
    num_minibatches: int = 1
    """optimizer steps per pass: the rollout batch is split into this many minibatches"""
    micro_batch_size: int = 128
    """completions per forward/backward; gradients accumulate to the minibatch"""
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
    """auto, cpu or cuda"""
    dtype: str = "auto"
    """auto (bf16 on GPU, fp32 on CPU), float32 or bfloat16"""
    resume: bool = False
    """continue from runs/<run_name>/checkpoint"""
    tensorboard: bool = True
    """write TensorBoard events to the run folder"""
    track: bool = False
    """also log to Weights & Biases"""
    wandb_project: str = "llm-post-training"
    """wandb project name, with --track"""


PRESETS = {
    "grpo": {},
    "dr_grpo": dict(scale_rewards="none", loss_agg="seq-mean-token-sum-norm"),
    "dapo": dict(eps_high=0.28, beta=0.0, loss_agg="token-mean", dynamic_sampling=True, overlong_cache_len=-1),
    "gspo": dict(importance_level="sequence", eps_low=3e-4, eps_high=4e-4, beta=0.0, loss_agg="seq-mean-token-mean"),
    "cispo": dict(policy_loss="cispo", beta=0.0, loss_agg="token-mean"),
}
"""overlong_cache_len=-1 means "a quarter of max_new_tokens", resolved once that is known."""


def parse_args(argv=None) -> Args:
    """tyro CLI whose defaults are the chosen preset's: `--preset dapo --eps-high 0.3` keeps 0.3."""
    argv = sys.argv[1:] if argv is None else argv
    preset = "grpo"
    for i, arg in enumerate(argv):
        if arg == "--preset" and i + 1 < len(argv):
            preset = argv[i + 1]
        elif arg.startswith("--preset="):
            preset = arg.split("=", 1)[1]
    if preset not in PRESETS:
        arg_error("preset", f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return tyro.cli(Args, args=argv, default=replace(Args(), preset=preset, **PRESETS[preset]))


def validate(args: Args, max_new_tokens: int):
    check(args.group_size >= 2, "group_size", "GRPO needs >= 2 completions per prompt (the baseline is their mean)")
    check(args.temperature > 0, "temperature", "must be > 0 for sampling")
    check(0 < args.top_p <= 1, "top_p", "must be in (0, 1]")
    check(0 < args.top_entropy_rho <= 1, "top_entropy_rho", "must be in (0, 1]")
    check(args.eps_low >= 0 and args.eps_high >= 0, "eps_low", "clip ranges must be >= 0")
    check(args.dual_clip_c == 0 or args.dual_clip_c > 1, "dual_clip_c", "must be 0 (off) or > 1")
    check(args.beta >= 0, "beta", "must be >= 0")
    check(args.sync_every >= 1, "sync_every", "must be >= 1")
    check(args.overlong_cache_len < max_new_tokens, "overlong_cache_len",
          f"must be smaller than the completion budget ({max_new_tokens})")
    batch = args.num_prompts * args.group_size
    minibatch = exact_div(batch, args.num_minibatches, "num_prompts", "num_minibatches")
    check(minibatch % args.group_size == 0, "num_minibatches", "each minibatch must hold whole groups")
    exact_div(minibatch, min(args.micro_batch_size, minibatch), "num_prompts", "micro_batch_size")


# =========================================================================================
# The algorithm: advantages, the per-token loss, and its aggregation. Pure functions on
# tensors; tests import them (from grpo import compute_advantages, ...).
# =========================================================================================


def compute_advantages(rewards: torch.Tensor, scale_rewards: str, eps: float = 1e-4) -> torch.Tensor:
    """A_i = (R_i - mean(R_group)) / (std + eps), std over the group, the batch, or not at all.

    rewards (num_groups, G) -> advantages (num_groups, G). std is the unbiased sample std
    (torch.std), as in DeepSeekMath's and TRL's implementations.
    >>> compute_advantages(torch.tensor([[1., 0., 0., 1.]]), "none")
    tensor([[ 0.5000, -0.5000, -0.5000,  0.5000]])
    """
    centred = rewards - rewards.mean(dim=1, keepdim=True)  # (num_groups, G)
    if scale_rewards == "group":
        return centred / (rewards.std(dim=1, keepdim=True) + eps)
    if scale_rewards == "batch":
        return centred / (rewards.std() + eps)
    return centred


def kl_penalty(logp: torch.Tensor, logp_ref: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) from samples of pi_theta (Schulman, 2020).

    d = logp_ref - logp;  k1 = -d;  k2 = d^2 / 2;  k3 = exp(d) - d - 1 (>= 0, unbiased).
    """
    d = logp_ref - logp
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d**2
    return torch.exp(d) - d - 1


def clipped_surrogate(ratio, advantages, eps_low, eps_high, dual_clip_c=0.0):
    """PPO's clipped surrogate as a loss: l = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A).

    Dual clip (Ye et al., 2020): for A < 0 the loss is also capped at -c A, so a huge ratio on
    a bad token cannot produce an unbounded step. Returns (loss, clipped_low, clipped_high):
    the masks mark tokens whose gradient the clip removed (ratio below 1 - eps_low with A < 0,
    above 1 + eps_high with A > 0).
    """
    unclipped = -ratio * advantages
    clipped = -torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * advantages
    loss = torch.maximum(unclipped, clipped)  # = -min(r A, clip(r) A)
    if dual_clip_c > 0:
        loss = torch.where(advantages < 0, torch.minimum(loss, -dual_clip_c * advantages), loss)
    clipped_low = (ratio < 1 - eps_low) & (advantages < 0)
    clipped_high = (ratio > 1 + eps_high) & (advantages > 0)
    return loss, clipped_low, clipped_high


def cispo_loss(ratio, logp, advantages, eps_high_is):
    """CISPO (MiniMax-M1, eq. 4): l = -sg(min(r, 1 + eps_high_is)) * A * logp.

    The IS weight is clipped and detached; the gradient always flows through logp, so unlike
    PPO's clip no token (e.g. a rare "Wait") ever loses its gradient.
    """
    weight = torch.clamp(ratio, max=1 + eps_high_is).detach()
    return -weight * advantages * logp, ratio > 1 + eps_high_is


def clip_cov_mask(advantages, logp, mask, clipped, ratio_of_tokens, bounds, generator=None):
    """Clip-Cov (Cui et al., 2025): cut the gradient of a few random high-covariance tokens.

    cov_t = (A_t - mean A) * (logp_t - mean logp) over valid tokens (detached). Candidates are
    valid, not-already-clipped tokens with lower < cov_t < upper; max(1, floor(ratio * N)) of them
    are drawn at random. Returns a (B, C) float mask: 0 on the chosen tokens, 1 elsewhere.
    """
    valid = mask.bool()
    cov = (advantages - advantages[valid].mean()) * (logp - logp[valid].mean())  # (B, C)
    candidates = valid & ~clipped & (cov > bounds[0]) & (cov < bounds[1])
    num_cut = max(1, math.floor(ratio_of_tokens * int(valid.sum())))
    idx = candidates.flatten().nonzero().squeeze(-1)
    chosen = idx[torch.randperm(len(idx), generator=generator)[:num_cut]]
    keep = torch.ones(mask.numel(), device=mask.device)
    keep[chosen] = 0.0
    return keep.view_as(mask)


def kl_cov_mask(advantages, logp, mask, ratio_of_tokens):
    """KL-Cov (Cui et al., 2025): the top max(1, floor(ratio * N)) valid tokens by covariance.

    Returns a (B, C) bool mask of the tokens that get the |logp - logp_old| penalty.
    """
    valid = mask.bool()
    cov = (advantages - advantages[valid].mean()) * (logp - logp[valid].mean())  # (B, C)
    cov = cov.masked_fill(~valid, float("-inf")).flatten()
    k = min(max(1, math.floor(ratio_of_tokens * int(valid.sum()))), int(valid.sum()))
    chosen = torch.zeros_like(cov, dtype=torch.bool)
    chosen[cov.topk(k).indices] = True
    return chosen.view_as(mask)


def top_entropy_mask(entropy, mask, rho):
    """Keep the top ceil(rho * N) highest-entropy valid tokens (Wang et al., 2025: "forking
    tokens", rho = 0.2). entropy, mask (B, C) -> float mask (B, C)."""
    valid = mask.bool()
    k = math.ceil(rho * int(valid.sum()))
    scores = entropy.masked_fill(~valid, float("-inf")).flatten()
    keep = torch.zeros_like(scores)
    keep[scores.topk(k).indices] = 1.0
    return keep.view_as(mask) * mask


def mismatch_weights(logp_old, logp_rollout, mode, tis_cap=2.0, icepop_bounds=(0.5, 5.0)):
    """Training-inference mismatch correction, k_t = pi_trainer_old(y_t) / pi_sampler(y_t).

    TIS (Yao et al., 2025): weight sg(min(k_t, C)).  IcePop: weight 1 where
    alpha <= k_t <= beta, 0 elsewhere (the token is dropped). Identity when the two agree.
    """
    k = torch.exp(logp_old - logp_rollout).detach()
    if mode == "tis":
        return torch.clamp(k, max=tis_cap)
    if mode == "icepop":
        return ((k >= icepop_bounds[0]) & (k <= icepop_bounds[1])).float()
    return torch.ones_like(k)


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
        return masked_sum(token_loss, mask) / num_tokens
    if mode == "seq-mean-token-mean":
        return (masked_sum(token_loss, mask, dim=-1) / mask.sum(-1).clamp(min=1)).sum() / num_seqs
    return masked_sum(token_loss, mask) / (num_seqs * max_new_tokens)


def grpo_token_loss(logp, logp_old, logp_ref, entropy, advantages, mask, args: Args, extra_keep=None, kl_cov=None):
    """The per-token GRPO loss l_t, before aggregation, with every knob that acts per token.

    logp (b, C) with grad; logp_old, logp_ref (b, C) detached (logp_ref None when beta = 0);
    advantages (b, 1) broadcast over tokens; mask (b, C); extra_keep (b, C) float mask from
    Clip-Cov / top-entropy / TIS-IcePop weights; kl_cov (b, C) bool tokens for KL-Cov.
    Returns (token_loss (b, C), stats dict of (b, C) tensors for logging).
    """
    log_ratio = logp - logp_old  # (b, C)
    if args.importance_level == "sequence":
        # GSPO: s_i = exp(mean_t log_ratio); token form keeps the value s_i and gives every
        # token the gradient of log s_i: log s_i,t = sg(log s_i) + logp_t - sg(logp_t).
        seq_log_ratio = masked_mean(log_ratio, mask, dim=-1).unsqueeze(-1)  # (b, 1)
        log_ratio = seq_log_ratio.detach() + logp - logp.detach()
    ratio = torch.exp(log_ratio)  # (b, C)

    if args.policy_loss == "cispo":
        loss, clipped_high = cispo_loss(ratio, logp, advantages, args.cispo_eps_high)
        clipped_low = torch.zeros_like(clipped_high)
    elif args.cov_penalty == "kl_cov":
        # KL-Cov: plain -A r on every token (no clip) + |logp - logp_old| on high-cov tokens.
        loss = -advantages * ratio + args.kl_cov_coef * (logp - logp_old).abs() * kl_cov
        clipped_low = clipped_high = torch.zeros_like(mask, dtype=torch.bool)
    else:
        loss, clipped_low, clipped_high = clipped_surrogate(ratio, advantages, args.eps_low, args.eps_high,
                                                            args.dual_clip_c)
    if extra_keep is not None:
        loss = loss * extra_keep
    kl = None
    if args.beta > 0:
        kl = kl_penalty(logp, logp_ref, args.kl_estimator)  # (b, C)
        loss = loss + args.beta * kl
    if args.ent_coef > 0:
        loss = loss - args.ent_coef * entropy
    return loss, {"ratio": ratio.detach(), "clipped_low": clipped_low, "clipped_high": clipped_high, "kl": kl}


# =========================================================================================
# Training loop
# =========================================================================================


def main(args: Args):
    run_dir = os.path.join("runs", args.run_name)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    torch.manual_seed(args.seed)
    task = load_task(args.task)
    max_new_tokens = args.max_new_tokens or task.max_new_tokens
    if args.overlong_cache_len < 0:  # preset's "a quarter of the budget"
        args = replace(args, overlong_cache_len=max(1, max_new_tokens // 4))
    validate(args, max_new_tokens)

    hint = "Run `python sft.py` first (it writes runs/sft), or pass --model PATH." if args.model == "runs/sft" else ""
    model, tokenizer = load_model_and_tokenizer(args.model, device, dtype, hint)
    model.train()
    ref_model = None
    if args.beta > 0:  # the frozen starting policy; beta = 0 skips it entirely (DAPO, Dr. GRPO)
        ref_model, _ = load_model_and_tokenizer(args.model, device, dtype, hint)
        ref_model.eval().requires_grad_(False)
    eos_ids = eos_token_ids(model, tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.0)
    engine = None  # None = HF generate (common/rollout.py); else a colocated vLLM engine
    if args.rollout == "vllm":
        from common.vllm_engine import VLLMEngine  # imports vLLM only when asked for

        # Created before a resume restores the RNG: the engine re-seeds torch's global generator.
        questions = [*task.prompts["question"], *task.test["question"]]
        longest_prompt = max(len(tokenizer(format_prompt(tokenizer, q, task.system_prompt),
                                           add_special_tokens=False)["input_ids"]) for q in questions)
        engine = VLLMEngine(args.model, dtype, longest_prompt + max_new_tokens, args.vllm_gpu_memory_utilization,
                            args.seed, eos_ids, tokenizer.pad_token_id, tokenizer, device)
    if args.top_p < 1:
        print("warning: --top-p < 1: the trainer scores the untruncated distribution, so ratios are biased")

    start_step, data_position = 0, 0
    if args.resume:
        checkpoint = find_checkpoint(run_dir)
        check(checkpoint is not None, "resume", f"no checkpoint in {run_dir}/; run without --resume to start")
        state = load_checkpoint(checkpoint, model, optimizer, None)
        start_step, data_position = state["step"], state["extra"]["data_position"]
        print(f"resumed from {checkpoint} at step {start_step}")
    last_sync = start_step  # the engine holds the weights of this step; staleness = step - last_sync
    if engine is not None and args.resume:
        engine.sync_weights(model)  # the engine loaded args.model; the resumed trainer is ahead of it
    config = asdict(args)
    logger = RunLogger(run_dir, config, args.tensorboard, args.wandb_project if args.track else None,
                       resume_step=start_step if args.resume else None)
    print(f"grpo ({args.preset}): {args.model}, task {task.name}, {len(task.prompts)} prompts, "
          f"{args.num_prompts} x G={args.group_size} per step, device {device}")
    print_config(config)

    G = args.group_size
    prompt_pool = task.prompts
    need_old_pass = (args.num_epochs > 1 or args.num_minibatches > 1 or args.cov_penalty != "none"
                     or args.top_entropy_rho < 1)
    progress = tqdm(range(start_step, args.total_steps), initial=start_step, total=args.total_steps, desc="grpo")
    for step in progress:
        step_start = time.perf_counter()
        staleness = step - last_sync if engine is not None else 0  # steps the sampler's weights lag behind
        # ---- 1. Generate: G completions for each of num_prompts prompts -------------------------
        # ---- 2. Reward: verifier (+ format, + overlong shaping), one scalar R_i per completion --
        # Dynamic sampling (DAPO) repeats 1-2 with fresh prompts until num_prompts groups have
        # non-zero reward std, or max_resample_rounds extra rounds are spent.
        kept, num_groups_kept, gen_time, gen_tokens, all_rewards, zero_std = [], 0, 0.0, 0, [], []
        reason_counts, terms_sum, num_scored = {}, {}, 0
        for round_ in range(1 + (args.max_resample_rounds if args.dynamic_sampling else 0)):
            rows = prompt_pool[rows_at(len(prompt_pool), data_position, args.num_prompts, args.seed)]
            data_position += args.num_prompts
            prompts = [format_prompt(tokenizer, q, task.system_prompt) for q in rows["question"]]
            t0 = time.perf_counter()
            rollout = generate(engine, model, tokenizer, prompts, G, args.temperature, max_new_tokens,
                               args.top_p, eos_ids)
            gen_time += time.perf_counter() - t0
            gen_tokens += int(rollout.completion_mask.sum())
            answers = [rows["answer"][i] for i in rollout.prompt_index.tolist()]
            rewards, terms, reasons = score_completions(task.verifier, rollout.completions, answers,
                                                        rollout.is_eos.tolist(), args.format_weight)
            rewards = torch.tensor(rewards)  # (num_prompts * G,)
            if args.overlong_cache_len > 0:
                lengths = rollout.completion_lengths.tolist()
                overlong = torch.tensor([overlong_penalty(n, max_new_tokens, args.overlong_cache_len) for n in lengths])
                rewards = rewards + overlong
                terms["overlong"] = overlong.tolist()
            for key, values in terms.items():
                terms_sum[key] = terms_sum.get(key, 0.0) + sum(values)
            for key, count in reasons.items():
                reason_counts[key] = reason_counts.get(key, 0) + count
            num_scored += len(rewards)
            group_rewards = rewards.view(-1, G)  # (num_prompts, G)
            group_has_signal = group_rewards.std(dim=1) > 0  # (num_prompts,)
            zero_std.append(1 - group_has_signal.float().mean().item())
            all_rewards.append(rewards)
            if args.dynamic_sampling:
                keep_rows = group_has_signal.repeat_interleave(G).nonzero().squeeze(-1)
                rollout, rewards = select_rows(rollout, keep_rows), rewards[keep_rows]
            kept.append((rollout, rewards))
            num_groups_kept += len(rewards) // G
            if num_groups_kept >= args.num_prompts:
                break
        if num_groups_kept == 0:  # every group had equal rewards: no gradient signal at all
            logger.log(step + 1, {"loss": None, "reward": torch.cat(all_rewards).mean().item(),
                                  "frac_zero_std_groups": 1.0, "skipped": 1})
            continue
        rollout = concat_rollouts([r for r, _ in kept], tokenizer.pad_token_id)
        rewards = torch.cat([r for _, r in kept])
        if args.dynamic_sampling:  # keep exactly num_prompts groups (the batch size is fixed)
            n_rows = min(num_groups_kept, args.num_prompts) * G
            rollout, rewards = select_rows(rollout, torch.arange(n_rows)), rewards[:n_rows]

        # ---- 3. Advantage: A_i = (R_i - mean_group R) / (std + eps), the same for every token ---
        advantages = compute_advantages(rewards.view(-1, G), args.scale_rewards, args.adv_eps).view(-1)  # (B,)
        advantages = advantages.to(device)
        mask = rollout.completion_mask.float()  # (B, C)
        if args.mask_truncated:
            mask = mask * rollout.is_eos.float().unsqueeze(-1)

        # ---- 4. Score: old and reference logprobs (no grad) ------------------------------------
        # With one update per batch, logp_old = sg(logp) inside the update (same weights) and
        # this pass is skipped; with several updates, or batch-level token selection, it is needed.
        train_start = time.perf_counter()
        B = len(rewards)
        mb_size = min(args.micro_batch_size, B // args.num_minibatches)
        # Micro-batches of whole groups run each prompt once, not G times (common/logprobs.py).
        shared = G if mb_size % G == 0 else 1
        logp_old = entropy_old = logp_ref = None
        with torch.no_grad():
            chunks = [slice(i, i + mb_size) for i in range(0, B, mb_size)]
            if need_old_pass:
                old_entropy = [completion_logprobs(model, rollout.prompt_ids[s], rollout.prompt_mask[s],
                                                   rollout.completion_ids[s], rollout.completion_mask[s],
                                                   args.temperature, True, shared) for s in chunks]
                logp_old = torch.cat([lp for lp, _ in old_entropy])  # (B, C)
                entropy_old = torch.cat([h for _, h in old_entropy])  # (B, C)
            if ref_model is not None:
                logp_ref = torch.cat([completion_logprobs(ref_model, rollout.prompt_ids[s], rollout.prompt_mask[s],
                                                          rollout.completion_ids[s], rollout.completion_mask[s],
                                                          args.temperature, False, shared)[0]
                                      for s in chunks])  # (B, C)

        # ---- 5. Update: num_epochs passes, num_minibatches optimizer steps each ----------------
        stats = {k: [] for k in ("loss", "clip_low", "clip_high", "kl", "entropy", "grad_norm", "mismatch",
                                 "mismatch_max_ratio", "kept_tokens")}
        minibatch_size = B // args.num_minibatches
        for epoch in range(args.num_epochs):
            order = torch.randperm(B // G).repeat_interleave(G) * G + torch.arange(G).repeat(B // G)  # whole groups
            for mb_start in range(0, B, minibatch_size):
                rows_mb = order[mb_start:mb_start + minibatch_size]
                mask_mb = mask[rows_mb]
                num_seqs, num_tokens = len(rows_mb), int(mask_mb.sum().clamp(min=1))
                # Batch-level token selection (Clip-Cov, KL-Cov, top-rho entropy) is made once per
                # minibatch on the rollout-time logprobs/entropy, so it does not depend on how the
                # minibatch is cut into micro-batches. (verl selects inside each micro-batch with the
                # current logprobs; at r = 1 no token is "already clipped", hence the zeros below.)
                keep_mb = torch.ones_like(mask_mb)
                kl_cov_mb = None
                adv_tokens = advantages[rows_mb].unsqueeze(-1).expand_as(mask_mb)  # (mb, C)
                if args.cov_penalty == "clip_cov":
                    keep_mb = keep_mb * clip_cov_mask(adv_tokens, logp_old[rows_mb], mask_mb,
                                                      torch.zeros_like(mask_mb, dtype=torch.bool),
                                                      args.clip_cov_ratio, args.clip_cov_bounds)
                if args.cov_penalty == "kl_cov":
                    kl_cov_mb = kl_cov_mask(adv_tokens, logp_old[rows_mb], mask_mb, args.kl_cov_ratio)
                if args.top_entropy_rho < 1:
                    keep_mb = keep_mb * top_entropy_mask(entropy_old[rows_mb], mask_mb, args.top_entropy_rho)
                loss_total = 0.0
                for mb in range(0, minibatch_size, mb_size):
                    rows = rows_mb[mb:mb + mb_size]
                    m = mask_mb[mb:mb + mb_size]  # (b, C)
                    logp, entropy = completion_logprobs(
                        model, rollout.prompt_ids[rows], rollout.prompt_mask[rows], rollout.completion_ids[rows],
                        rollout.completion_mask[rows], args.temperature, True, shared)  # (b, C) each
                    old = logp.detach() if logp_old is None else logp_old[rows]
                    keep = keep_mb[mb:mb + mb_size]
                    weights = mismatch_weights(old, rollout.sampler_logprobs[rows], args.mismatch_correction,
                                               args.tis_cap, args.icepop_bounds)
                    token_loss, s = grpo_token_loss(
                        logp, old, None if logp_ref is None else logp_ref[rows], entropy,
                        advantages[rows].unsqueeze(-1), m, args, keep * weights,
                        None if kl_cov_mb is None else kl_cov_mb[mb:mb + mb_size])
                    loss = aggregate_loss(token_loss, m, args.loss_agg, num_seqs, num_tokens, max_new_tokens)
                    loss.backward()
                    loss_total += loss.item()
                    # diagnostics, all over valid tokens
                    stats["clip_low"].append(masked_mean(s["clipped_low"].float(), m).item())
                    stats["clip_high"].append(masked_mean(s["clipped_high"].float(), m).item())
                    stats["entropy"].append(masked_mean(entropy.detach(), m).item())
                    if s["kl"] is not None:
                        stats["kl"].append(masked_mean(s["kl"].detach(), m).item())
                    gap = (old - rollout.sampler_logprobs[rows]) * m
                    stats["mismatch"].append(masked_mean(gap.abs(), m).item())
                    stats["mismatch_max_ratio"].append(torch.exp(gap).max().item())
                    stats["kept_tokens"].append(masked_mean((keep * weights > 0).float(), m).item())
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                stats["loss"].append(loss_total)
                stats["grad_norm"].append(grad_norm.item())
        train_time = time.perf_counter() - train_start

        # ---- 6. Sync: copy the updated weights into the vLLM engine, every sync_every steps ---------
        sync_time = 0.0
        if engine is not None and step + 1 - last_sync >= args.sync_every:
            t0 = time.perf_counter()
            engine.sync_weights(model)
            sync_time, last_sync = time.perf_counter() - t0, step + 1

        # ---- 7. Log -----------------------------------------------------------------------------
        mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")
        step_rewards = torch.cat(all_rewards)
        metrics = {
            "loss": mean(stats["loss"]),
            "reward": step_rewards.mean().item(),
            **{f"reward/{k}": v / num_scored for k, v in terms_sum.items()},
            "sampled_accuracy": terms_sum["correct"] / num_scored,  # pass@1 of the rollouts (eval's is greedy)
            "completion_length": rollout.completion_lengths.float().mean().item(),
            "frac_truncated": 1 - rollout.is_eos.float().mean().item(),
            "entropy": mean(stats["entropy"]),
            "kl": mean(stats["kl"]),
            "clip_frac_low": mean(stats["clip_low"]),
            "clip_frac_high": mean(stats["clip_high"]),
            "frac_zero_std_groups": mean(zero_std),
            "mismatch_mean_abs": mean(stats["mismatch"]),
            "mismatch_max_ratio": max(stats["mismatch_max_ratio"]),
            "frac_tokens_kept": mean(stats["kept_tokens"]),
            "grad_norm": mean(stats["grad_norm"]),
            "learning_rate": args.learning_rate,
            "resample_rounds": round_,
            "gen_tokens_per_s": gen_tokens / gen_time,
            "train_tokens_per_s": (rollout.prompt_mask.sum() + rollout.completion_mask.sum()).item()
            * args.num_epochs / train_time,
            "gen_time": gen_time,
            "sync_time": sync_time,
            "rollout_staleness": staleness,
            "train_time": train_time,
            "step_time": time.perf_counter() - step_start,
            **{f"reasons/{k}": v / num_scored for k, v in reason_counts.items()},
        }
        if args.eval_every and (step + 1) % args.eval_every == 0:
            metrics["eval_accuracy"] = greedy_accuracy(model, tokenizer, task, 64, max_new_tokens, engine, eos_ids)
        logger.log(step + 1, metrics)
        progress.set_postfix(reward=f"{metrics['reward']:.2f}", acc=f"{metrics['sampled_accuracy']:.2f}",
                             zero_std=f"{metrics['frac_zero_std_groups']:.2f}")
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.total_steps:
            save_checkpoint(run_dir, model, tokenizer, optimizer, None, step + 1, {"data_position": data_position})

    save_checkpoint(run_dir, model, tokenizer, optimizer, None, args.total_steps, {"data_position": data_position})
    save_final_model(run_dir, model, tokenizer)
    if engine is not None:
        engine.sync_weights(model)  # the final evaluation samples with the engine
    result = evaluate(model, tokenizer, task, args.num_eval_prompts, args.num_eval_samples, max_new_tokens,
                      engine=engine, eos_ids=eos_ids)
    logger.log(args.total_steps, result)
    logger.close()
    summary = ", ".join(f"{k} {v:.3f}" for k, v in result.items() if k == "accuracy" or k.startswith("pass@"))
    print(f"eval on {result['num_prompts']} held-out prompts: {summary}")
    print(f"model saved to {run_dir}/")
    return result


if __name__ == "__main__":
    main(parse_args())
