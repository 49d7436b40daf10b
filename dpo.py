"""DPO (Rafailov et al. 2023), IPO (Azar et al. 2023), conservative DPO (Mitchell 2023), online DPO (Guo et al. 2024).

DPO trains on pairs (x, y+, y-), "y+ beats y-", with no reward model and no sampling during training: the
policy's own log-ratio to a frozen reference is the reward, r(y) = beta * (log pi(y|x) - log pi_ref(y|x)), and
the loss is Bradley-Terry's on it (docs/dpo.md):

    m = (log pi(y+|x) - log pi_ref(y+|x)) - (log pi(y-|x) - log pi_ref(y-|x))      log-ratio margin
    L = -mean_pairs log sigmoid(beta * m)                                            log pi = sum over completion tokens

In the one view of this project, loss = - E[ w * log pi_theta(y | x) ], its gradient is

    dL/dtheta = -mean_pairs beta * sigmoid(-beta m) * (grad log pi(y+|x) - grad log pi(y-|x))

so y+ gets w = +beta * sigmoid(-beta m) and y- gets w = -beta * sigmoid(-beta m) on every token (w held fixed): SFT
on y+ and "unlikelihood" on y-, weighted by how wrongly the implicit reward still orders the pair (w -> beta/2 at
m = 0, -> 0 once m >> 1/beta). Against sft.py (its nearest sibling) the loop keeps the numbered banners:
  1. Generate   offline: the next pairs of a set built once at start (the starting model's own samples,
                y+ verifier-right, y- wrong); --online: G fresh samples per prompt from the current policy
  2. Reward     offline: none (labelled at start); --online: the verifier (or --reward-model) labels best vs worst
  3. Advantage  none: the per-pair weight beta * sigmoid(-beta m) comes out of the loss
  4. Score      the frozen reference's log-probs of the batch, once, no grad (SFT has no reference)
  5. Update     one optimizer step per batch on -log sigmoid(beta m), accumulated over micro-batches of whole pairs
  6. Sync       --online: copy the weights into the sampler (a no-op for HF); offline: none
Variants (off by default):
  --loss ipo              Azar et al. 2023: (m - 1/(2 beta))^2, m from per-token MEAN log-probs (as TRL does)
  --label-smoothing eps   cDPO (Mitchell 2023): -(1 - eps) log sigmoid(beta m) - eps log sigmoid(-beta m)
  --label-noise p         swap y+ and y- of a share p of the offline pairs: the noisy labeller cDPO is for
  --online                Guo et al. 2024: pairs from the current policy each step; best vs worst of G, ties skipped
  --pairs FILE            train on a pairs file (JSON lines: question, answer, chosen, rejected) instead of samples

Run:  python sft.py && python dpo.py        python dpo.py --online        python dpo.py --loss ipo        --help
"""

import os
import time
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
import tyro
from tqdm import tqdm

from common.checkpoint import resume_from, save_checkpoint
from common.cli import RLRunArgs, arg_error, check, check_at_least, check_positive, exact_div
from common.distributed import fewest_over_ranks, wrap_model
from common.evaluation import greedy_accuracy
from common.learned_reward import load_reward_model
from common.logprobs import masked_sum, rollout_logprobs, score_rollout
from common.minibatch import minibatches
from common.models import frozen_reference, load_policy, trainable_parameters
from common.preferences import (drop_identical, encode_pairs, flip_labels, load_pairs, pairs_from_graded,
                                sample_graded, save_pairs)
from common.rollout import Rollout, build_engine, generate_and_score, reward_metrics
from common.run import finish_run, start_run
from common.tasks import DEFAULT_TASK, load_task, rows_at
from common.tracking import RunLogger, StepStats


@dataclass
class Args(RLRunArgs):  # RLRunArgs, not sft.py's RunArgs: DPO samples (its pairs at start; --online every step)
    # ---- what to train --------------------------------------------------------------------
    model: str = "runs/sft"
    """policy to start from, the frozen reference, and (offline) the model whose samples make the pairs"""
    task: str = DEFAULT_TASK
    """task name (see common/tasks.py)"""
    # ---- pairs (in place of the RL scripts' rollout) -----------------------------------------
    total_steps: int = 200
    """optimizer steps, one batch of pairs each"""
    batch_size: int = 64
    """pairs per step, GLOBAL (each of N torchrun processes takes batch_size / N); --online: prompts sampled"""
    online: bool = False
    """online DPO: sample each step's pairs from the current policy instead of a set built once at start"""
    pairs: str = ""
    """a pairs file (JSON lines, common/preferences.py save_pairs) to train on; empty = sample them from --model"""
    num_pair_prompts: int = 4096
    """offline: training questions (at most all) whose samples make the pairs: each right one meets a wrong one"""
    group_size: int = 4
    """G: samples per prompt (offline pair set, and each --online step); a prompt needs a right and a wrong one"""
    temperature: float = 1.0
    """sampling temperature of the pairs; the loss scores pi at T = 1, the policy the implicit reward is of"""
    label_noise: float = 0.0
    """offline: swap y+ and y- of exactly this share of the pairs (a noisy labeller, --label-smoothing's case)"""
    # ---- policy loss -----------------------------------------------------------------------
    loss: Literal["sigmoid", "ipo"] = "sigmoid"
    """sigmoid: DPO's -log sigmoid(beta m); ipo: (m - 1/(2 beta))^2 on per-token mean log-probs"""
    beta: float = 2.0
    """the KL coefficient: r = beta * log-ratio; TRL's 0.1 collapses the tiny task's greedy accuracy (docs/dpo.md)"""
    label_smoothing: float = 0.0
    """cDPO's eps in [0, 0.5): the share of labels assumed flipped; 0 = DPO"""
    # ---- optimisation ----------------------------------------------------------------------
    learning_rate: float = 1e-4
    """AdamW learning rate (constant; a pretrained 0.5B wants ~1e-6, as in TRL)"""


def parse_args(argv=None) -> Args:
    return tyro.cli(Args, args=argv)


def validate(args: Args, world_size: int = 1) -> tuple[int, int]:
    """Reject bad values; derive the batch arithmetic once: each rank takes rank_pairs = batch_size / world_size
    pairs per step (--online: samples that many prompts), 2 rows each, in micro-batches of micro_size rows
    (even: y+ and y- of a pair always meet in one forward). Returns (rank_pairs, micro_size)."""
    check_at_least(args, 1, "total_steps", "batch_size", "num_pair_prompts")
    check_positive(args, "beta", "temperature", "learning_rate")
    check(args.group_size >= 2, "group_size", "a pair needs >= 2 samples per prompt (one right, one wrong)")
    check(0 <= args.label_smoothing < 0.5, "label_smoothing", f"must be in [0, 0.5), got {args.label_smoothing}")
    check(args.label_smoothing == 0 or args.loss == "sigmoid", "label_smoothing", "is cDPO's, for --loss sigmoid")
    check(0 <= args.label_noise <= 1, "label_noise", f"must be in [0, 1], got {args.label_noise}")
    check(not (args.online and (args.pairs or args.label_noise)), "online", "samples its own pairs each step; "
          "drop --pairs / --label-noise (they describe an offline pair set)")
    check(args.online or not args.reward_model, "reward_model", "labels the pairs of --online; the offline pair "
          "set is labelled by the verifier")
    rank_pairs = exact_div(args.batch_size, world_size, "batch_size", "nproc_per_node")
    micro_size = min(args.micro_batch_size, 2 * rank_pairs)
    check(micro_size % 2 == 0, "micro_batch_size", f"must be even: a micro-batch holds whole pairs, got {micro_size}")
    check(2 * rank_pairs % micro_size == 0, "micro_batch_size",
          f"{micro_size} rows must divide each rank's {2 * rank_pairs} rows a step (2 per pair)")
    return rank_pairs, micro_size


# ==== The algorithm: sequence log-probs and the pair loss. Pure functions; tests import them ====


def sequence_logps(logp: torch.Tensor, mask: torch.Tensor, loss: str) -> torch.Tensor:
    """log pi(y|x) = sum_t logp_t over the completion (DPO); for IPO the mean over its tokens, as TRL does (IPO's
    target margin 1/(2 beta) is then per token, the same for short and long answers). (b, C) -> (b,).
    E.g. logp [[-1, -3, -9]], mask [[1, 1, 0]]: sigmoid -4, ipo -2."""
    total = masked_sum(logp, mask, -1)  # (b,)
    return total / mask.sum(-1).clamp(min=1) if loss == "ipo" else total


def dpo_loss(logp_chosen, logp_rejected, ref_chosen, ref_rejected, beta: float, loss: str = "sigmoid",
             label_smoothing: float = 0.0):
    """Per-pair losses and implicit rewards from (P,) sequence log-probs of y+ and y- under the policy and reference.

        r(y) = beta * (log pi(y|x) - log pi_ref(y|x))                     the implicit reward (DPO §5)
        m    = (log pi(y+) - log pi_ref(y+)) - (log pi(y-) - log pi_ref(y-))
        DPO   l = -log sigmoid(beta m)                                    dl/dm = -beta sigmoid(-beta m)
        cDPO  l = -(1 - eps) log sigmoid(beta m) - eps log sigmoid(-beta m)
        IPO   l = (m - 1/(2 beta))^2                                      dl/dm = 2 (m - 1/(2 beta))
    so dl/dlog pi(y+) = dl/dm and dl/dlog pi(y-) = -dl/dm. Returns (losses (P,), chosen rewards (P,),
    rejected rewards (P,)), the rewards detached. At pi = pi_ref, m = 0: DPO's loss is log 2, IPO's 1/(4 beta^2).
    >>> dpo_loss(*torch.zeros(4, 1), beta=0.1)[0]
    tensor([0.6931])
    """
    chosen_ratio, rejected_ratio = logp_chosen - ref_chosen, logp_rejected - ref_rejected  # (P,) each
    m = chosen_ratio - rejected_ratio  # (P,)
    if loss == "ipo":  # Azar et al.: a squared loss to a finite target, so m cannot run off to infinity
        losses = (m - 1 / (2 * beta)) ** 2
    else:  # cDPO: with eps of the labels flipped, the expected Bradley-Terry loss (eps = 0: DPO)
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * m) - label_smoothing * F.logsigmoid(-beta * m)
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def best_and_worst(rewards: torch.Tensor) -> torch.Tensor:
    """Online DPO's pair of each group: rows of its highest and lowest reward, y+ first; a group whose rewards
    are all equal (a tie: no preference) gives none. (num_groups, G) -> (2 P,) row indices into the G-row layout.
    >>> best_and_worst(torch.tensor([[0., 1., 1.], [1., 1., 1.], [1., 0., 0.]]))
    tensor([1, 0, 6, 7])
    """
    G = rewards.shape[1]
    useful = (rewards.max(1).values > rewards.min(1).values).nonzero().squeeze(-1)  # (P,)
    best, worst = rewards.argmax(1)[useful], rewards.argmin(1)[useful]  # the first of equals: a random one
    return torch.stack([useful * G + best, useful * G + worst], 1).flatten()


def as_rows(pairs, tokenizer, system_prompt, eos_id: int, max_new_tokens: int, device) -> Rollout:
    """PreferencePairs -> one Rollout of rows y+_0, y-_0, y+_1, y-_1, ...: rows 2i and 2i+1 share a prompt, so
    `group_size=2` runs it once and a micro-batch of whole pairs holds both sides."""
    chosen, rejected = encode_pairs(tokenizer, pairs, system_prompt, eos_id, max_new_tokens, device)
    both, n = Rollout.cat([chosen, rejected], tokenizer.pad_token_id), len(pairs)  # rows: all y+, then all y-
    return both[torch.stack([torch.arange(n), torch.arange(n) + n], 1).flatten()]


def build_pair_set(args: Args, model, tokenizer, task, max_new_tokens: int, eos_ids, path: str, is_main: bool):
    """Offline DPO's data, built once: --pairs FILE, or G samples of the starting model on num_pair_prompts training
    prompts (a forked RNG seeded by --seed: every rank builds the same set), each right one paired with a wrong one,
    --label-noise of them swapped. Saved to the run folder; --resume reads it back, so the data is exactly the same."""
    if args.resume and os.path.exists(path):
        return load_pairs(path)
    if args.pairs:
        check(os.path.isfile(args.pairs), "pairs", f"{args.pairs}: no such file")
        pairs = load_pairs(args.pairs)
    else:
        num_prompts = min(args.num_pair_prompts, len(task.prompts))  # each training question at most once
        graded = sample_graded(model, tokenizer, task, "prompts", 0, num_prompts, args.group_size, args.temperature,
                               max_new_tokens, args.seed, eos_ids)
        pairs = pairs_from_graded(graded, torch.Generator().manual_seed(args.seed))
        print(f"dpo: {len(pairs)} pairs from {num_prompts} prompts x {args.group_size} samples; "
              f"{num_prompts - len(set(pairs.questions))} prompts had no right-and-wrong pair (skipped)")
    pairs, _ = flip_labels(pairs, args.label_noise, torch.Generator().manual_seed(args.seed + 1))
    kept, identical = drop_identical(pairs)
    check(identical == 0, "pairs", f"{identical} of {len(pairs)} pairs have the same chosen and rejected completion; "
          "a pair must say which of two different answers is better")
    if len(kept) == 0:
        arg_error("model", f"{args.model}: its {args.group_size} samples of each prompt were all right or all "
                           "wrong, so there is no pair; train it longer, raise --group-size or check --max-new-tokens")
    if is_main:
        save_pairs(path, kept)
    return kept


def held_out_pairs(args: Args, model, tokenizer, task, max_new_tokens: int, eos_ids, device) -> Rollout | None:
    """Pairs of the starting model's samples of the first 64 test questions (never trained on), as rows; None when
    --eval-every 0 or no question has a right and a wrong sample."""
    graded = sample_graded(model, tokenizer, task, "test", 0, 64 * bool(args.eval_every), args.group_size,
                           args.temperature, max_new_tokens, args.seed, eos_ids)
    pairs = pairs_from_graded(graded, torch.Generator().manual_seed(args.seed))
    return as_rows(pairs, tokenizer, task.system_prompt, eos_ids[0], max_new_tokens, device) if len(pairs) else None


@torch.no_grad()
def reward_accuracy(model, pairs: Rollout, logp_ref: torch.Tensor, micro_size: int, loss: str) -> float:
    """Share of pairs whose implicit reward ranks y+ above y-: `rewards/accuracies` on pairs given as rows."""
    mask = pairs.completion_mask.float()  # (2 P, C)
    logp = score_rollout(model, pairs, micro_size, group_size=2)[0]  # (2 P, C)
    seq, ref = (sequence_logps(x, mask, loss).view(-1, 2) for x in (logp, logp_ref))  # (P, 2) each
    return ((seq[:, 0] - ref[:, 0]) > (seq[:, 1] - ref[:, 1])).float().mean().item()


def main(args: Args):
    # ---- Setup: batch arithmetic, run folder, device, task ----------------------------------
    world, run_dir, dtype = start_run(args, "dpo")  # seed + rank: under --online each rank samples its own
    rank_pairs, micro_size = validate(args, world.size)  # rank_pairs: this rank's pairs (--online: prompts) a step
    task = load_task(args.task)
    max_new_tokens = args.max_new_tokens or task.max_new_tokens

    # ---- Setup: policy, frozen reference, optimizer ----------------------------------------
    model, tokenizer, eos_ids = load_policy(args, world.device, dtype)  # + LoRA adapters with --lora-rank
    ref_model = wrap_model(frozen_reference(model, args.model, world.device, dtype), world, args.fsdp)  # LoRA: base
    policy = wrap_model(model, world, args.fsdp)  # what the update runs: DDP / FSDP2 under torchrun, else the model
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=args.learning_rate, weight_decay=0.0)

    # ---- Setup: the pairs (offline: one set, built once) or the rollout engine (--online) ----
    os.makedirs(run_dir, exist_ok=True)
    pair_set = None if args.online else build_pair_set(args, model, tokenizer, task, max_new_tokens, eos_ids,
                                                       os.path.join(run_dir, "pairs.jsonl"), world.is_main)
    engine = build_engine(args, model, tokenizer, eos_ids, task, max_new_tokens, dtype, world.device,
                          rank_pairs * args.group_size) if args.online else None
    reward_model = load_reward_model(args.reward_model, tokenizer, world.device, dtype)  # None: the verifier labels
    # held-out pairs (the starting model's samples of 64 test questions): the implicit reward off the training set
    eval_pairs = held_out_pairs(args, model, tokenizer, task, max_new_tokens, eos_ids, world.device)
    eval_ref = score_rollout(ref_model, eval_pairs, micro_size, group_size=2)[0] if eval_pairs else None  # (2 P', C)

    # ---- Setup: resume, logger ----------------------------------------------------------------
    start_step, data_position = 0, 0
    if args.resume:
        start_step, extra = resume_from(run_dir, model, optimizer, learning_rate=args.learning_rate)
        data_position = extra["data_position"]
        if engine is not None:
            engine.sync_weights(model)  # the engine loaded args.model; the resumed trainer is ahead of it
    logger = RunLogger(run_dir, args, "dpo", resume_step=start_step if args.resume else None)
    print(f"dpo ({args.loss}{', online' if args.online else ''}): {args.model}, task {task.name}, "
          f"{'fresh pairs' if args.online else f'{len(pair_set)} pairs'}, {args.batch_size} a step, "
          f"beta {args.beta}, device {world.device}, {world.size} process(es)")

    progress = tqdm(range(start_step, args.total_steps), initial=start_step, total=args.total_steps, desc="dpo",
                    disable=not world.is_main)
    quick_accuracy = float("nan")
    for step in progress:
        step_start = time.perf_counter()
        # ---- 1. Generate + 2. Reward ---------------------------------------------------------------
        if args.online:  # Guo et al. 2024: G samples per prompt from the current policy, labelled by the verifier
            everything = generate_and_score(engine, tokenizer, task, data_position + world.rank * rank_pairs,
                                            rank_pairs, args.seed, args.group_size, args.temperature, max_new_tokens,
                                            args.top_p, reward_model=reward_model)
            rows = best_and_worst(everything.rewards.view(-1, args.group_size))  # (2 P,): y+, y- of each untied group
            pairs = everything[rows[:2 * fewest_over_ranks(len(rows) // 2)]]  # as many pairs on every rank
        else:  # the next batch_size pairs of the (seed, position) stream over the set; rank r takes the r-th slice
            pairs = as_rows(pair_set[rows_at(len(pair_set), data_position + world.rank * rank_pairs, rank_pairs,
                                             args.seed)], tokenizer, task.system_prompt, eos_ids[0], max_new_tokens,
                            world.device)
        data_position += args.batch_size
        if len(pairs) == 0:  # --online: every group tied on some rank (all right or all wrong), nothing to prefer
            logger.log(step + 1, {**reward_metrics(everything, args.group_size), "loss": None, "num_pairs": 0})
            continue
        # ---- 3. Advantage: none; the pair's weight beta * sigmoid(-beta m) is the loss's own gradient -------
        mask = pairs.completion_mask.float()  # (2 P, C)

        # ---- 4. Score: the reference's log-probs of the batch (no grad), once ------------------------
        logp_ref = score_rollout(ref_model, pairs, micro_size, group_size=2)[0]  # (2 P, C) at T = 1

        # ---- 5. Update: one optimizer step on the whole batch (1 epoch x 1 minibatch) ------------
        stats = StepStats()
        for minibatch in minibatches(policy, mask, 2, 1, 1, micro_size):
            for micro_rows in minibatch:
                micro, m = pairs[micro_rows], mask[micro_rows]  # m: (b, C), rows y+, y-, y+, y-, ...: whole pairs
                logp, _ = rollout_logprobs(policy, micro, group_size=2)  # (b, C) at T = 1: pi's own implicit reward
                seq, ref = (sequence_logps(x, m, args.loss).view(-1, 2) for x in (logp, logp_ref[micro_rows]))
                losses, chosen_rewards, rejected_rewards = dpo_loss(seq[:, 0], seq[:, 1], ref[:, 0], ref[:, 1],
                                                                    args.beta, args.loss, args.label_smoothing)
                loss = losses.sum() / (minibatch.num_seqs // 2)  # mean over the step's pairs on all ranks
                minibatch.backward(loss)
                log_ratio = logp_ref[micro_rows] - logp.detach()  # (b, C)
                stats.tokens(m, kl=torch.exp(log_ratio) - log_ratio - 1)  # k3 (Schulman) on the pairs' tokens
                stats.tokens(torch.ones_like(chosen_rewards), **{  # pair means
                    "rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
                    "rewards/margins": chosen_rewards - rejected_rewards,
                    "rewards/accuracies": chosen_rewards > rejected_rewards,
                    "logps/chosen": seq[:, 0], "logps/rejected": seq[:, 1]})
            loss, grad_norm = minibatch.step(optimizer, args.max_grad_norm, step + 1, run_dir)
        # ---- 6. Sync: --online copies the updated weights into the sampler (a no-op for HF); offline none -
        if args.online:
            engine.sync_weights(model)

        # ---- 7. Log (and a quick greedy accuracy now and then: the bar shows learning, not just loss) ----
        evaluating = args.eval_every and (step + 1) % args.eval_every == 0
        if evaluating:
            quick_accuracy = greedy_accuracy(model, tokenizer, task, 64, max_new_tokens, engine, eos_ids)
            held_out = reward_accuracy(model, eval_pairs, eval_ref, micro_size, args.loss) if eval_pairs else None
        metrics = {"loss": loss, "grad_norm": grad_norm, "learning_rate": args.learning_rate,
                   "num_pairs": minibatch.num_seqs // 2, **stats.summary(),
                   **(reward_metrics(everything, args.group_size) if args.online else {}),
                   "step_time": time.perf_counter() - step_start,
                   **({"eval_accuracy": quick_accuracy, "eval_reward_accuracy": held_out} if evaluating else {})}
        logger.log(step + 1, metrics)
        progress.set_postfix(loss=f"{loss:.3f}", acc=f"{quick_accuracy:.2f}")
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.total_steps:
            save_checkpoint(run_dir, model, tokenizer, optimizer, None, step + 1, {"data_position": data_position})

    # ---- Finish: checkpoint, final model, held-out evaluation ----------------------------------
    save_checkpoint(run_dir, model, tokenizer, optimizer, None, args.total_steps, {"data_position": data_position})
    return finish_run(run_dir, model, tokenizer, task, engine, eos_ids, args, max_new_tokens, logger)


if __name__ == "__main__":
    main(parse_args())
