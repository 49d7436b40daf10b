"""REINFORCE and its baselines (RLOO, ReMax, REINFORCE++), and sign weighting (PSR, NSR, W-REINFORCE).

REINFORCE (Williams, 1992) in one equation, per token t of completion i of a group of G
completions sampled for the same prompt (docs/spec.md §2):

    A_i  = R_i - b                                                     reward minus a baseline
    l_t  = -A_i * log pi_theta(y_t)                                    no ratio, no clip
           + beta * k3_t                                               KL to the reference, in the loss
    L    = aggregate(l_t)                                              seq-mean-token-mean

In the one view of this project, loss = - E[ w * log pi_theta(y | x) ]: y is the policy's own
sample (on-policy) and w = A_i. SFT (sft.py) is this same loss with y from an expert (off-policy)
and A = 1 on every token: tests/test_reinforce.py checks that the two losses and gradients agree.
Where it sits among the siblings (like nanochat's chat_rl.py, what the others add on top):
  reinforce.py  one gradient step per rollout batch, so logp_old = sg(logp): no ratio, no clip
  grpo.py       + baseline scaled by the group std; + ratio and clip, so a batch can be reused
  ppo.py        + a learned value model (GAE) as the baseline; ratio + clip; KL in the reward

The baseline b is `--baseline` (it never depends on y_i, so the gradient stays unbiased):
  none                  b = 0
  ema                   b = running mean of past batches' rewards, decay --ema-decay (saved, resume is exact)
  group                 b = mean of the G rewards of the prompt (GRPO without the std)
  rloo                  b = mean of the other G-1 rewards: A_i = G/(G-1) (R_i - mean)      (default)
  remax                 b = reward of the greedy completion of the prompt (one extra rollout, `baseline_time`)
  reinforce++           per-token reward -beta * k1_t, + R_i at the last token; return-to-go;
                        whitened over the batch's valid tokens. beta is in the *reward*: no KL in the loss
  reinforce++-baseline  the same, R_i - group mean instead of R_i
`--sign-weighting` (Zhu et al. 2025) replaces A_i by a weight of the sign of the outcome, with
`--baseline none` only (R in {0, 1}, no baseline, as in the paper):
  psr  A = +1 right, 0 wrong      nsr  A = 0 right, -1 wrong      w-reinforce  A = +lambda right, -1 wrong

Note: with a centred baseline the loss *value* is ~0, the gradient is not. Watch reward and
`frac_zero_std_groups` (group and rloo learn nothing from a group whose rewards are all equal).

Run:  python sft.py && python reinforce.py        python reinforce.py --baseline remax        --help
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
from common.distributed import all_reduce, clip_grad_norm, grad_sync, setup_distributed, wrap_model
from common.evaluation import evaluate, greedy_accuracy
from common.logprobs import masked_whiten, rollout_logprobs, score_rollout
from common.models import add_lora, eos_token_ids, frozen_reference, load_model_and_tokenizer, pick_dtype
from common.rollout import build_engine, generate_and_score, groups_with_signal, reward_metrics
from common.tasks import DEFAULT_TASK, load_task
from common.tracking import RunLogger, StepStats, print_config, print_eval, timed

@dataclass
class Args:
    # ---- what to train --------------------------------------------------------------------
    model: str = "runs/sft"
    """policy to start from (and the frozen reference): a folder, a hub id, or qwen2-tiny:random (offline)"""
    task: str = DEFAULT_TASK
    """task name (see common/tasks.py)"""
    run_name: str = "reinforce"
    """outputs go to runs/<run_name>/"""
    seed: int = 1
    """seed for data order and sampling"""
    # ---- rollout ---------------------------------------------------------------------------
    total_steps: int = 200
    """optimizer steps (one rollout batch each, one optimizer step each)"""
    num_prompts: int = 16
    """prompts per rollout batch, over all ranks (each of N torchrun processes samples num_prompts / N)"""
    group_size: int = 8
    """G: completions sampled per prompt"""
    temperature: float = 1.0
    """sampling temperature; the trainer scores logits / temperature, the same distribution"""
    top_p: float = 1.0
    """nucleus sampling; < 1 makes the samples off-policy for the untruncated distribution the trainer scores"""
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
    # ---- advantage -------------------------------------------------------------------------
    baseline: Literal["none", "ema", "group", "rloo", "remax", "reinforce++", "reinforce++-baseline"] = "rloo"
    """b in A = R - b (see the file's docstring)"""
    ema_decay: float = 0.9
    """--baseline ema: b <- decay * b + (1 - decay) * mean(R of the batch), b = 0 at the start"""
    adv_eps: float = 1e-8
    """--baseline reinforce++(-baseline): eps in the whitening (Ret - mean) / sqrt(var + eps)"""
    sign_weighting: Literal["none", "psr", "nsr", "w-reinforce"] = "none"
    """Zhu et al. 2025: train on positives only (psr), negatives only (nsr), or both weighted (w-reinforce)"""
    w_reinforce_lambda: float = 0.1
    """--sign-weighting w-reinforce: the weight of a correct sample (a wrong one gets -1)"""
    # ---- policy loss -----------------------------------------------------------------------
    beta: float = 0.04
    """KL coefficient (in the loss; in the reward for reinforce++); 0 loads no reference model"""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """estimator of KL(pi_theta || pi_ref) used in the loss (Schulman); reinforce++ puts k1 in the reward"""
    ent_coef: float = 0.0
    """entropy bonus: subtract ent_coef * H_t from each token's loss"""
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = "seq-mean-token-mean"
    """how token losses become one number (see aggregate_loss)"""
    mask_truncated: bool = False
    """drop completions that hit max_new_tokens without EOS from the loss"""
    # ---- optimisation ----------------------------------------------------------------------
    learning_rate: float = 2e-4
    """AdamW learning rate (constant)"""
    max_grad_norm: float = 1.0
    """gradient clipping by global norm"""
    micro_batch_size: int = 128
    """completions per forward/backward on each rank; gradients accumulate to the whole rollout batch"""
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


def validate(args: Args, max_new_tokens: int, world_size: int = 1) -> tuple[int, int]:
    """Reject bad values and silent knob combinations; derive the batch arithmetic once: each of the
    world_size ranks samples num_prompts / world_size prompts, a rollout batch of batch_size = that * G
    rows, one optimizer step, accumulated over micro-batches of micro_size rows."""
    check(args.group_size >= 2 or args.baseline not in ("group", "rloo", "reinforce++-baseline"), "group_size",
          f"--baseline {args.baseline} needs >= 2 completions per prompt (the baseline is the others' mean)")
    check(args.group_size >= 1, "group_size", "must be >= 1")
    check(args.temperature > 0, "temperature", "must be > 0 for sampling")
    check(0 < args.top_p <= 1, "top_p", "must be in (0, 1]")
    check(0 <= args.ema_decay < 1, "ema_decay", "must be in [0, 1)")
    check(args.w_reinforce_lambda >= 0, "w_reinforce_lambda", "must be >= 0")
    check(args.beta >= 0 and args.ent_coef >= 0, "beta", "--beta and --ent-coef must be >= 0")
    check_device(args.device)
    if args.top_p < 1:
        print("warning: --top-p < 1: the trainer scores the untruncated distribution, so samples are off-policy")
    # Sign weighting *replaces* A = R: with a baseline, or with a format term in R, one of the two would be dropped.
    check(args.sign_weighting == "none" or args.baseline == "none", "sign_weighting",
          f"--sign-weighting {args.sign_weighting} replaces A = R (Zhu et al. use no baseline); "
          f"add --baseline none (not {args.baseline})")
    check(args.sign_weighting == "none" or args.format_weight == 0, "format_weight",
          "--sign-weighting weights correctness alone, so the format reward would be ignored; drop one")
    check(args.sync_every == 1 or (args.rollout == "vllm" and args.sync_every > 1), "sync_every",
          "must be >= 1, and 1 with --rollout hf: HF generate always samples with the current weights")
    check(args.lora_rank >= 0, "lora_rank", "must be >= 0 (0 = train every weight)")
    check(not (args.lora_rank and args.fsdp), "fsdp", "LoRA is for a model whose base fits one device; "
          "drop --fsdp (DDP then copies the base to each rank) or --lora-rank")
    batch_size = exact_div(args.num_prompts, world_size, "num_prompts", "nproc_per_node") * args.group_size
    micro_size = min(args.micro_batch_size, batch_size)
    exact_div(batch_size, micro_size, "num_prompts", "micro_batch_size")
    return batch_size, micro_size


# ==== The algorithm: advantage, per-token loss, aggregation, KL. Pure functions; tests import them ====


def compute_advantages(rewards: torch.Tensor, baseline: str, group_size: int, ema_value: float = 0.0,
                       greedy_rewards: torch.Tensor | None = None) -> torch.Tensor:
    """A_i = R_i - b_i for each baseline of the file's docstring. rewards (B,) in groups of G -> (B,).

    ema: b = ema_value (the running mean *before* this batch); remax: b = greedy_rewards (num_prompts,),
    one per group; reinforce++: b = 0 (its per-token advantage is built by reinforce_pp_advantages);
    reinforce++-baseline: the group mean.
    >>> compute_advantages(torch.tensor([1., 0., 0., 1.]), "rloo", 4)  # 1 - 1/3, 0 - 2/3
    tensor([ 0.6667, -0.6667, -0.6667,  0.6667])
    """
    groups = rewards.view(-1, group_size)  # (num_groups, G)
    if baseline in ("group", "reinforce++-baseline"):
        return (groups - groups.mean(dim=1, keepdim=True)).view(-1)
    if baseline == "rloo":  # leave one out: b_i = (sum_j R_j - R_i) / (G - 1)
        return (groups - (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)).view(-1)
    if baseline == "ema":
        return rewards - ema_value
    if baseline == "remax":
        return (groups - greedy_rewards.view(-1, 1)).view(-1)
    return rewards  # none, reinforce++


def policy_token_loss(logp, advantages, mask):
    """The per-token policy loss l_t = -A * logp_t, before KL, entropy bonus and aggregation.

    logp (b, C) with grad; advantages (b, 1) per completion or (b, C) per token (REINFORCE++);
    mask (b, C), unused here (aggregate_loss masks), kept for the siblings' signature.
    One gradient step per batch, so logp_old = sg(logp): the ratio is 1 and there is nothing to clip.
    >>> policy_token_loss(torch.tensor([[-0.5, -2.0]]), torch.tensor([[2.0]]), torch.ones(1, 2))
    tensor([[1., 4.]])
    """
    return -advantages * logp


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


# ==== Variants: each one a flag, off by default (docs/spec.md §2) =====================================


def reinforce_pp_advantages(outcome, kl, mask, beta: float, eps: float = 1e-8):
    """REINFORCE++ (Hu 2025): per-token advantages (B, C) from outcome rewards (B,) and k1 (B, C).

        r_t   = -beta * k1_t on every valid token, + outcome_i at the last valid token
        Ret_t = sum_{s >= t} r_s                      (return-to-go, gamma = 1)
        A_t   = (Ret_t - mean) / sqrt(var + eps)      mean, var over the valid tokens of the whole batch
    Padding gets no reward, no return and A = 0.
    >>> reinforce_pp_advantages(torch.tensor([1., 0.]), torch.zeros(2, 2), torch.tensor([[1., 1.], [1., 0.]]), 0.1)
    tensor([[ 0.5774,  0.5774],
            [-1.1547,  0.0000]])
    """
    last = mask.cumsum(-1) == mask.sum(-1, keepdim=True)  # (B, C): True from the last valid token on
    is_last = last & (mask > 0)  # exactly the last valid token (an empty completion has none)
    token_rewards = (-beta * kl + outcome.unsqueeze(-1) * is_last) * mask  # (B, C), 0 on padding
    returns = token_rewards.flip(-1).cumsum(-1).flip(-1) * mask  # sum over s >= t
    return masked_whiten(returns, mask, eps=eps).masked_fill(mask == 0, 0.0)


def sign_weights(correct, mode: str, lam: float):
    """Zhu et al. 2025 ("The Surprising Effectiveness of Negative Reinforcement"): A from the sign alone.

      psr          +1 right, 0 wrong        (SFT on the policy's own successes)
      nsr           0 right, -1 wrong       (push mass off wrong answers; the prior spreads it)
      w-reinforce  +lambda right, -1 wrong
    correct (B,) in {0, 1} -> A (B,).
    >>> sign_weights(torch.tensor([1., 0.]), "w-reinforce", 0.1)
    tensor([ 0.1000, -1.0000])
    """
    right = correct.float()
    if mode == "psr":
        return right
    if mode == "nsr":
        return right - 1
    return lam * right - (1 - right)


# ==== Training loop ====================================================================================


def main(args: Args):
    # ---- Setup: task, batch arithmetic, run folder, device ----------------------------------
    task = load_task(args.task)
    max_new_tokens = args.max_new_tokens or task.max_new_tokens
    world = setup_distributed(args.device)  # rank 0 of 1 under plain python; see common/distributed.py
    batch_size, micro_size = validate(args, max_new_tokens, world.size)  # batch_size: this rank's rows
    run_dir, device = os.path.join("runs", args.run_name), world.device
    dtype = pick_dtype(args.dtype, device)
    torch.manual_seed(args.seed + world.rank)  # each rank samples its own completions
    G = args.group_size
    shared = G if micro_size % G == 0 else 1  # micro-batches of whole groups run each prompt once
    warn_if_task_mismatch(args.model, task.name)
    token_level = args.baseline.startswith("reinforce++")  # REINFORCE++: KL in the reward, per-token advantages

    # ---- Setup: policy, frozen reference, optimizer ----------------------------------------
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

    # ---- Setup: rollout engine (HF generate, or vLLM colocated on this device) ---------------
    # Built before a resume restores the RNG: the vLLM engine re-seeds torch's global generator.
    engine = build_engine(args.rollout, model, tokenizer, eos_ids, task=task, max_new_tokens=max_new_tokens,
                          model_path=args.model, dtype=dtype, vllm_dtype=args.vllm_dtype, max_num_seqs=batch_size,
                          gpu_memory_utilization=args.vllm_gpu_memory_utilization, seed=args.seed, device=device)

    # ---- Setup: resume, logger ----------------------------------------------------------------
    start_step, data_position, ema = 0, 0, 0.0  # ema: the EMA baseline's running mean reward
    if args.resume:
        start_step, extra = resume_from(run_dir, model, optimizer, learning_rate=args.learning_rate)
        data_position, ema = extra["data_position"], extra["ema_baseline"]
        engine.sync_weights(model)  # the engine loaded args.model; the resumed trainer is ahead of it
    last_sync = start_step  # the sampler holds the weights of this step; staleness = step - last_sync
    logger = RunLogger(run_dir, asdict(args), args.tensorboard, args.wandb_project if args.track else None,
                       resume_step=start_step if args.resume else None)
    print(f"reinforce ({args.baseline}, sign weighting {args.sign_weighting}): {args.model}, task {task.name}, "
          f"{len(task.prompts)} prompts, {args.num_prompts} x G={G} per step, device {device}, "
          f"{world.size} process(es)")
    print_config(asdict(args))
    sample = dict(num_prompts=args.num_prompts // world.size, seed=args.seed, n=G, temperature=args.temperature,
                  max_new_tokens=max_new_tokens, top_p=args.top_p, format_weight=args.format_weight)

    progress = tqdm(range(start_step, args.total_steps), initial=start_step, total=args.total_steps, desc="reinforce",
                    disable=not world.is_main)
    for step in progress:
        step_start, times = time.perf_counter(), dict.fromkeys(("gen", "score", "train", "sync"), 0.0)
        staleness = step - last_sync  # steps the sampler's weights lag behind the trainer's
        # ---- 1. Generate + 2. Reward: G completions per prompt, each scored by the verifier ----
        first = data_position + world.rank * sample["num_prompts"]  # rank r samples the r-th share of the prompts
        with timed(times, "gen"):
            rollout = generate_and_score(engine, tokenizer, task, first, **sample)
        greedy_rewards = None
        if args.baseline == "remax":  # ReMax: one greedy completion of the same prompts, its reward is b
            with timed(times, "baseline"):
                greedy = generate_and_score(engine, tokenizer, task, first, **{**sample, "n": 1, "temperature": 0.0})
            greedy_rewards = greedy.rewards  # (num_prompts,)
        data_position += args.num_prompts

        # ---- 3. Advantage: A_i = R_i - b, the same for every token ------------------------------
        advantages = compute_advantages(rollout.rewards, args.baseline, G, ema, greedy_rewards).unsqueeze(-1)  # (B, 1)
        if args.sign_weighting != "none":  # Zhu et al.: A from the sign of the outcome alone (baseline none)
            advantages = sign_weights(rollout.reward_terms["correct"], args.sign_weighting,
                                      args.w_reinforce_lambda).unsqueeze(-1)
        baseline_value = ema  # EMA: the baseline used this step, then updated with this batch's rewards
        batch_mean = all_reduce(rollout.rewards.sum().item()) / (len(rollout) * world.size)  # over all ranks
        ema = args.ema_decay * ema + (1 - args.ema_decay) * batch_mean
        mask = rollout.completion_mask.float()  # (B, C)
        if args.mask_truncated:  # completions cut at max_new_tokens say nothing about the answer
            mask = mask * rollout.is_eos.float().unsqueeze(-1)

        # ---- 4. Score: only the reference (no grad); logp_old = sg(logp), one update per batch ---
        with timed(times, "score"):  # (B, C), or None when not needed
            logp_ref = score_rollout(ref_model, rollout, micro_size, temperature=args.temperature,
                                     group_size=shared)[0] if ref_model is not None else None
            # REINFORCE++: k1 = logp_old - logp_ref goes into the per-token reward, so logp_old is scored
            # here (the loss has no KL then) and the advantage becomes per token: (B, C).
            if token_level:
                reward_kl = torch.zeros_like(mask) if ref_model is None else kl_penalty(score_rollout(
                    model, rollout, micro_size, temperature=args.temperature, group_size=shared)[0], logp_ref, "k1")
                advantages = reinforce_pp_advantages(advantages.squeeze(-1), reward_kl, mask, args.beta, args.adv_eps)

        # ---- 5. Update: one optimizer step on the whole rollout batch, in micro-batches ---------
        stats = StepStats()
        with timed(times, "train"):
            minibatch_rows = torch.arange(len(rollout))  # (B,): every row, one optimizer step
            # the normalisers of the whole batch, over all ranks (not this rank's share)
            num_seqs = len(minibatch_rows) * world.size
            num_tokens = int(all_reduce(mask[minibatch_rows].sum()).clamp(min=1))
            loss_sum, micro_batches = 0.0, minibatch_rows.split(micro_size)
            for i, micro_rows in enumerate(micro_batches):
                # DDP / FSDP2 average the ranks' gradients in the last micro-batch's backward only
                grad_sync(train_model, last=i == len(micro_batches) - 1)
                micro, m = rollout[micro_rows], mask[micro_rows]  # m: (b, C)
                logp, entropy = rollout_logprobs(train_model, micro, temperature=args.temperature,
                                                 with_entropy=True, group_size=shared)  # (b, C) each
                token_loss = policy_token_loss(logp, advantages[micro_rows], m)
                kl = kl_penalty(logp, logp_ref[micro_rows], args.kl_estimator) if args.beta > 0 else None
                if args.beta > 0 and not token_level:  # the KL to the reference in the loss, per token
                    token_loss = token_loss + args.beta * kl
                if token_level:  # REINFORCE++: the KL is in the reward (step 4), not the loss; log that k1
                    kl = reward_kl[micro_rows] if args.beta > 0 else None
                if args.ent_coef > 0:
                    token_loss = token_loss - args.ent_coef * entropy
                loss = aggregate_loss(token_loss, m, args.loss_agg, num_seqs, num_tokens, max_new_tokens)
                (loss * world.size).backward()  # the ranks' gradients are averaged: x N makes them a sum
                loss_sum += loss.item()
                gap = (logp.detach() - micro.sampler_logprobs) * m  # trainer vs sampler, 0 on padding
                no_clip = torch.zeros_like(m)  # no ratio, no clip: logged as 0 for the shared metrics
                stats.tokens(m, entropy=entropy, kl=kl, clip_frac_low=no_clip, clip_frac_high=no_clip,
                             mismatch_mean_abs=gap.abs(), frac_tokens_kept=m > 0,
                             advantage_abs=advantages[micro_rows].abs())
                stats.maxes(mismatch_max_ratio=torch.exp(gap).max())
            grad_norm = clip_grad_norm(train_model, args.max_grad_norm)
            loss_sum = all_reduce(loss_sum)  # the batch's loss: the sum of the ranks' shares
            stop_if_not_finite(step + 1, run_dir, loss=loss_sum, grad_norm=grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            stats.values(loss=loss_sum, grad_norm=grad_norm)

        # ---- 6. Sync: copy the updated weights into the sampler (a no-op for HF generate) ---------
        if step + 1 - last_sync >= args.sync_every:
            with timed(times, "sync"):
                engine.sync_weights(model)
            last_sync = step + 1

        # ---- 7. Log -----------------------------------------------------------------------------
        train_tokens = int(rollout.prompt_mask.sum() + rollout.completion_mask.sum())
        metrics = {
            **reward_metrics(rollout, G), **stats.summary(),
            "frac_zero_std_groups_trained": 1 - len(groups_with_signal(rollout.rewards, G)) / len(rollout)
            if G > 1 else None,
            "completion_length": rollout.completion_lengths.float().mean().item(),
            "frac_truncated": 1 - rollout.is_eos.float().mean().item(),
            "learning_rate": args.learning_rate, "rollout_staleness": staleness,
            "gen_tokens_per_s": int(rollout.completion_mask.sum()) / times["gen"],
            "train_tokens_per_s": train_tokens / times["train"],
            **{f"{k}_time": v for k, v in times.items()}, "step_time": time.perf_counter() - step_start,
        }
        if args.baseline == "ema":
            metrics["ema_baseline"] = baseline_value
        if greedy_rewards is not None:
            metrics["greedy_reward"] = greedy_rewards.mean().item()
        if args.eval_every and (step + 1) % args.eval_every == 0:
            metrics["eval_accuracy"] = greedy_accuracy(model, tokenizer, task, 64, max_new_tokens, engine, eos_ids)
        logger.log(step + 1, metrics)
        progress.set_postfix(reward=f"{metrics['reward']:.2f}", acc=f"{metrics['sampled_accuracy']:.2f}",
                             zero_std=metrics["frac_zero_std_groups"])  # None with G = 1
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.total_steps:
            save_checkpoint(run_dir, model, tokenizer, optimizer, None, step + 1,
                            {"data_position": data_position, "ema_baseline": ema})

    # ---- Finish: checkpoint, final model, held-out evaluation ----------------------------------
    save_checkpoint(run_dir, model, tokenizer, optimizer, None, args.total_steps,
                    {"data_position": data_position, "ema_baseline": ema})
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
