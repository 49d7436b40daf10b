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
  reinforce++           per-token reward -beta * k1_t, + R_i at the last token; return-to-go, whitened
                        over the batch's valid tokens (masked_whiten). beta is in the *reward*: no KL in the loss
  reinforce++-baseline  the same, R_i - group mean instead of R_i
`--sign-weighting` (Zhu et al. 2025) replaces A_i by a weight of the sign of the outcome, with
`--baseline none` only (R in {0, 1}, no baseline, as in the paper):
  psr  A = +1 right, 0 wrong      nsr  A = 0 right, -1 wrong      w-reinforce  A = +lambda right, -1 wrong

Note: with a centred baseline the loss *value* is ~0, the gradient is not. Watch reward and
`frac_zero_std_groups` (group and rloo learn nothing from a group whose rewards are all equal).

Run:  python sft.py && python reinforce.py        python reinforce.py --baseline remax        --help
"""

import time
from dataclasses import dataclass
from typing import Literal

import torch
import tyro
from tqdm import tqdm

from common.checkpoint import resume_from, save_checkpoint
from common.cli import RLRunArgs, check, check_at_least, check_positive, rollout_batch_sizes
from common.distributed import all_gather, wrap_model
from common.evaluation import greedy_accuracy
from common.learned_reward import load_reward_model
from common.logprobs import batch_moments, rollout_logprobs, score_rollout
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
    # ---- rollout ---------------------------------------------------------------------------
    total_steps: int = 200
    """steps: one rollout batch each, trained on with one optimizer step"""
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
    baseline: Literal["none", "ema", "group", "rloo", "remax", "reinforce++", "reinforce++-baseline"] = "rloo"
    """b in A = R - b (see the file's docstring)"""
    ema_decay: float = 0.9
    """--baseline ema: b <- decay * b + (1 - decay) * mean(R of the batch), b = 0 at the start"""
    whiten_eps: float = 1e-8
    """--baseline reinforce++(-baseline): eps in the whitening (Ret - mean) / sqrt(var + eps)"""
    sign_weighting: Literal["none", "psr", "nsr", "w-reinforce"] = "none"
    """Zhu et al. 2025: train on positives only (psr), negatives only (nsr), or both weighted (w-reinforce)"""
    w_reinforce_lambda: float = 0.1
    """--sign-weighting w-reinforce: the weight of a correct sample (a wrong one gets -1)"""
    # ---- policy loss -----------------------------------------------------------------------
    beta: float = 0.04
    """KL coefficient (in the loss; in the reward for reinforce++); 0 loads no reference model"""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """estimator of KL(pi_theta || pi_ref) in the loss and the logged `kl` (Schulman); reinforce++'s reward uses k1"""
    ent_coef: float = 0.0
    """entropy bonus: subtract ent_coef * H_t from each token's loss"""
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = "seq-mean-token-mean"
    """how token losses become one number (see aggregate_loss)"""
    mask_truncated: bool = False
    """drop completions that hit max_new_tokens without EOS from the loss"""
    # ---- optimisation ----------------------------------------------------------------------
    learning_rate: float = 2e-4
    """AdamW learning rate (constant)"""


def parse_args(argv=None) -> Args:
    return tyro.cli(Args, args=argv)


def validate(args: Args, max_new_tokens: int, world_size: int = 1) -> tuple[int, int]:
    """Reject bad values and silent knob combinations; return the batch arithmetic (rank_rows, micro_size):
    one optimizer step per rollout batch, so one minibatch. (max_new_tokens: the siblings' signature.)"""
    check_at_least(args, 1, "total_steps", "num_prompts", "group_size")
    check_at_least(args, 0, "format_weight", "w_reinforce_lambda", "beta", "ent_coef")
    check_positive(args, "temperature", "learning_rate", "max_grad_norm", "whiten_eps")
    check(0 <= args.ema_decay < 1, "ema_decay", f"must be in [0, 1), got {args.ema_decay}")
    check(args.group_size >= 2 or args.baseline not in ("group", "rloo", "reinforce++-baseline"), "group_size",
          f"--baseline {args.baseline} needs >= 2 completions per prompt (the baseline is the others' mean)")
    # Sign weighting *replaces* A = R: with a baseline, or with a format term in R, one of the two would be dropped.
    check(args.sign_weighting == "none" or args.baseline == "none", "sign_weighting",
          f"--sign-weighting {args.sign_weighting} replaces A = R (Zhu et al. use no baseline); "
          f"add --baseline none (not {args.baseline})")
    check(args.sign_weighting == "none" or args.format_weight == 0, "format_weight",
          "--sign-weighting weights correctness alone, so the format reward would be ignored; drop one")
    return rollout_batch_sizes(args.num_prompts, args.group_size, 1, args.micro_batch_size, world_size)


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
    """The per-token KL penalty term k_t, an estimate of KL(pi_theta || pi_ref) from samples of pi_theta
    (Schulman, 2020); the loss adds beta * k_t. (b, C), (b, C) -> (b, C):
    d = logp_ref - logp;  k1 = -d;  k2 = d^2 / 2;  k3 = exp(d) - d - 1 (>= 0, unbiased)."""
    d = logp_ref - logp
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d**2
    return torch.exp(d) - d - 1


# ==== Variants: each one a flag, off by default (docs/spec.md §2) =====================================


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the valid positions of the whole batch (every rank's: batch_moments);
    shift_mean=False adds the mean back (TRL's convention for rewards)."""
    mean, var = batch_moments(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    return whitened if shift_mean else whitened + mean


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


def sign_weights(correct, mode: str, w_reinforce_lambda: float):
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
    return w_reinforce_lambda * right - (1 - right)


def main(args: Args):
    # ---- Setup: task, batch arithmetic, run folder, device ----------------------------------
    task = load_task(args.task, max_turns=args.max_turns, call_cost=args.tool_call_cost)  # a tool task's flags
    max_new_tokens = args.max_new_tokens or task.max_new_tokens
    world, run_dir, dtype = start_run(args, "reinforce")  # world: this process among torchrun's (1 of 1 under python)
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
    start_step, data_position, ema, greedy_rewards = 0, 0, 0.0, None  # ema, greedy_rewards: the EMA's, ReMax's b
    if args.resume:
        start_step, extra = resume_from(run_dir, model, optimizer, learning_rate=args.learning_rate)
        data_position, ema = extra["data_position"], extra["ema_baseline"]
        engine.sync_weights(model)  # the engine loaded args.model; the resumed trainer is ahead of it
    last_sync = start_step  # the sampler holds the weights of this step; staleness = step - last_sync
    logger = RunLogger(run_dir, args, "reinforce", resume_step=start_step if args.resume else None)
    print(f"reinforce ({args.baseline}): {args.model}, task {task.name}, {len(task.prompts)} prompts, "
          f"{args.num_prompts} x G={G} per step, device {world.device}, {world.size} process(es)")
    rank_prompts = args.num_prompts // world.size

    def sample_prompts(position: int) -> Rollout:  # this rank's share of num_prompts prompts, G completions each
        rollout = generate_and_score(engine, tokenizer, task, position + world.rank * rank_prompts, rank_prompts,
                                     args.seed, G, args.temperature, max_new_tokens, args.top_p, args.format_weight,
                                     reward_model)
        return rollout

    progress = tqdm(range(start_step, args.total_steps), initial=start_step, total=args.total_steps, desc="reinforce",
                    disable=not world.is_main)
    for step in progress:
        step_start, times = time.perf_counter(), dict.fromkeys(("gen", "score", "train", "sync"), 0.0)
        staleness = step - last_sync  # steps the sampler's weights lag behind the trainer's
        # ---- 1. Generate + 2. Reward: G completions per prompt, each scored by the verifier ----
        with timed(times, "gen"):
            rollout = sample_prompts(data_position)
        if args.baseline == "remax":  # ReMax: b = the reward of one greedy (T = 0) completion of the same prompts
            with timed(times, "baseline"):
                greedy_rewards = generate_and_score(engine, tokenizer, task, data_position + world.rank * rank_prompts,
                                                    rank_prompts, args.seed, 1, 0.0, max_new_tokens, 1.0,
                                                    args.format_weight, reward_model).rewards  # (B / G,)
        data_position += args.num_prompts

        # ---- 3. Advantage: A_i = R_i - b, the same for every token (REINFORCE++: per token, in 4.) ---
        advantages = compute_advantages(rollout.rewards, args.baseline, G, ema, greedy_rewards).unsqueeze(-1)  # (B, 1)
        if args.sign_weighting != "none":  # Zhu et al.: A = R = correct (baseline none, no format term) -> its sign
            advantages = sign_weights(advantages, args.sign_weighting, args.w_reinforce_lambda)
        if args.baseline == "ema":  # b <- decay b + (1 - decay) mean(R), the batch's over every rank; A used the old b
            ema_used, ema = ema, args.ema_decay * ema + (1 - args.ema_decay) * all_gather(rollout.rewards).mean().item()
        mask = rollout.policy_mask.float()  # (B, C) the tokens the policy sampled (not tool observations)
        if args.mask_truncated:  # completions cut at max_new_tokens say nothing about the answer
            mask = mask * rollout.is_eos.float().unsqueeze(-1)

        # ---- 4. Score: only the reference (no grad); on-policy, so logp_old = sg(logp) needs no pass ---
        with timed(times, "score"):  # (B, C) each, or None when not needed
            logp_ref = score_rollout(ref_model, rollout, micro_size, temperature=args.temperature,
                                     group_size=prefix_group)[0] if ref_model is not None else None
            if args.baseline.startswith("reinforce++"):  # REINFORCE++: -beta k1_t is a per-token reward; A (B, C)
                k1 = torch.zeros_like(mask) if ref_model is None else score_rollout(  # k1 = logp_old - logp_ref
                    model, rollout, micro_size, temperature=args.temperature, group_size=prefix_group)[0] - logp_ref
                advantages = reinforce_pp_advantages(advantages.squeeze(-1), k1, mask, args.beta, args.whiten_eps)

        # ---- 5. Update: one optimizer step on the whole rollout batch (1 epoch x 1 minibatch) ----
        stats = StepStats()
        with timed(times, "train"):
            for minibatch in minibatches(policy, mask, G, 1, 1, micro_size):
                for micro_rows in minibatch:
                    micro, m = rollout[micro_rows], mask[micro_rows]  # m: (b, C)
                    logp, entropy = rollout_logprobs(policy, micro, temperature=args.temperature, with_entropy=True,
                                                     group_size=prefix_group)  # (b, C) each
                    token_loss = policy_token_loss(logp, advantages[micro_rows], m)
                    kl = kl_penalty(logp, logp_ref[micro_rows], args.kl_estimator) if args.beta > 0 else None
                    if args.beta > 0 and not args.baseline.startswith("reinforce++"):  # REINFORCE++: in the reward
                        token_loss = token_loss + args.beta * kl
                    if args.ent_coef > 0:
                        token_loss = token_loss - args.ent_coef * entropy
                    loss = aggregate_loss(token_loss, m, args.loss_agg, minibatch.num_seqs, minibatch.num_tokens,
                                          max_new_tokens)
                    minibatch.backward(loss)
                    gap = (logp.detach() - micro.sampler_logprobs) * m  # trainer vs sampler, 0 on padding
                    stats.tokens(m, entropy=entropy, kl=kl, mismatch_mean_abs=gap.abs(),
                                 advantage_abs=advantages[micro_rows].abs())
                    stats.maxes(mismatch_max_ratio=torch.exp(gap).max())
                loss, grad_norm = minibatch.step(optimizer, args.max_grad_norm, step + 1, run_dir)
                stats.values(loss=loss, grad_norm=grad_norm)

        # ---- 6. Sync: copy the updated weights into the sampler (a no-op for HF generate) ---------
        if step + 1 - last_sync >= args.sync_every:
            with timed(times, "sync"):
                engine.sync_weights(model)
            last_sync = step + 1

        # ---- 7. Log -----------------------------------------------------------------------------
        metrics = {**reward_metrics(rollout, G), **stats.summary(), **rollout_metrics(rollout, rollout, times, 1, G),
                   **token_diagnostics(rollout.sampler_logprobs, advantages, mask),
                   "learning_rate": args.learning_rate,
                   "rollout_staleness": staleness, "step_time": time.perf_counter() - step_start}
        if args.baseline == "ema":
            metrics["ema_baseline"] = ema_used
        if args.baseline == "remax":
            metrics["greedy_reward"] = greedy_rewards.mean().item()
        if args.eval_every and (step + 1) % args.eval_every == 0:
            metrics["eval_accuracy"] = greedy_accuracy(model, tokenizer, task, 64, max_new_tokens, engine, eos_ids)
        logger.log(step + 1, metrics)
        progress.set_postfix(reward=f"{metrics['reward']:.2f}", acc=f"{metrics['sampled_accuracy']:.2f}",
                             zero_std=metrics["frac_zero_std_groups"])
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.total_steps:
            save_checkpoint(run_dir, model, tokenizer, optimizer, None, step + 1,
                            {"data_position": data_position, "ema_baseline": ema})

    # ---- Finish: checkpoint, final model, held-out evaluation ----------------------------------
    save_checkpoint(run_dir, model, tokenizer, optimizer, None, args.total_steps,
                    {"data_position": data_position, "ema_baseline": ema})
    return finish_run(run_dir, model, tokenizer, task, engine, eos_ids, args, max_new_tokens, logger)


if __name__ == "__main__":
    main(parse_args())
