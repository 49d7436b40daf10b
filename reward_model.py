"""Reward models: learn the reward from preferences (Bradley-Terry) or as a yes/no judge.

--mode bt (Ouyang et al. 2022, InstructGPT; Stiennon et al. 2020; TRL's RewardTrainer): the policy's
trunk with a scalar head r_phi(x, y) read at the last token, trained on pairs "y+ beats y-":

    L = - mean_pairs log sigmoid( r(x, y+) - r(x, y-) - m )  +  c * mean_pairs (r(x, y+) + r(x, y-))^2

m = --margin (TRL takes a margin per pair from the data; here one constant), c = --center-rewards-coef
(TRL's centring term: r is only defined up to a constant, this pins it near 0). At the start L = log 2.
--mode judge (a generative reward model, Zhang et al. 2024 "Generative Verifiers"): the policy itself,
trained by next-token loss to answer "yes" / "no" (is this answer correct?) given the question, the
reference answer and a completion; its reward is P(yes) normalised over {yes, no}, read from one
forward pass (common/learned_reward.py), no sampling:

    L = - sum_{i,t} mask_{i,t} log pi_phi(v_{i,t} | judge prompt_i) / sum mask,   v_i = "yes" or "no" + EOS

In the one view of this project, loss = - E[ w * log pi_theta(y | x) ]: the judge is SFT on verdicts
(y = the verdict, from the verifier; w = 1). BT is not of that form: no policy token is weighted;
the loss is a logistic regression on the *difference of two scores*, and its gradient puts weight
sigmoid(-(r+ - r-)) on grad r(y+) and minus that on grad r(y-): the pair contrast DPO (dpo.py) moves
onto the policy's own log-ratios. Against its siblings (sft.py is the nearest), the loop keeps the banners:
  1. Generate   none: pairs are built once, before training (offline, as InstructGPT's comparisons)
  2-4.          no reward, advantage or scoring pass: the labels are the signal
  5. Update     one optimizer step per batch of pairs, accumulated over micro-batches
  6. Sync       none: nothing samples during training

How this departs from the textbook, and why:
- The labeller is the task's verifier (common/rewards.py): y+ a right completion, y- a wrong one of
  the same question, sampled from --policy (default) or taken from the task's noisy teacher
  (--pairs demonstrations). Its mistakes are flags: --label-noise p swaps exactly round(p * pairs)
  labels; --label-bias longer makes it prefer the longer completion (with --label-bias-prob) where
  the two differ in length, as human labellers prefer longer answers (Singhal et al. 2023).
- Both modes read the reference answer by default (--reference), as reference-guided verifiers do: the
  textbook RLHF reward model (--no-reference) sees the question only and must *solve* the sum to judge
  it, at the one position it is read at; from the 0.5M-parameter policy it stays at chance on held-out
  pairs after 1100 steps, while with the reference it learns to compare in ~200 (docs/reward_model.md).
- Identical y+ and y- (only --pairs-file can hold them) are dropped, with a count. The score head starts
  at N(0, 1 / (d + 1)) (Stiennon et al. 2020). Scores are not shifted to mean 0 on the SFT samples
  (InstructGPT does it): the RL scripts centre rewards per group anyway.
- Evaluation is on the policy's samples of held-out questions, judged by the verifier: what a reward
  model meets in RL. `agreement` is the AUC (the chance a right sample scores above a wrong one).

Run:  python sft.py && python reward_model.py        python reward_model.py --mode judge
Output: runs/reward_model/ (AutoModelForSequenceClassification for bt, AutoModelForCausalLM for judge,
reward_model.json, pairs.jsonl, metrics.jsonl); `grpo.py --reward-model runs/reward_model` trains on it.
"""

import json
import math
import os
import time
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
import tyro
from tqdm import tqdm
from transformers import AutoModelForSequenceClassification

from common.checkpoint import resume_from, save_checkpoint, save_final_model
from common.cli import RunArgs, check, check_at_least, check_positive, exact_div, flag
from common.distributed import cleanup, wrap_model
from common.learned_reward import MARKER, VERDICTS, LearnedReward, bt_inputs, bt_score, judge_questions
from common.logprobs import masked_sum, rollout_logprobs
from common.minibatch import minibatches
from common.models import eos_token_ids, load_model_and_tokenizer
from common.preferences import (Graded, PreferencePairs, demonstration_graded, drop_identical, encode_completions,
                                encode_pairs, flip_labels, load_pairs, pairs_from_graded, prefer_longer,
                                sample_graded, save_pairs)
from common.rewards import VERIFIERS
from common.rollout import Rollout
from common.run import start_run
from common.tasks import DEFAULT_TASK, load_task, rows_at
from common.tracking import RunLogger


@dataclass
class Args(RunArgs):
    """The reward model's knobs; RunArgs holds the run's plumbing (its --num-eval-prompts x --num-eval-samples
    policy samples make the held-out set)."""

    # ---- what to train --------------------------------------------------------------------
    mode: Literal["bt", "judge"] = "bt"
    """bt: a scalar head on the policy's trunk, Bradley-Terry loss on pairs; judge: the policy learns to say yes/no"""
    policy: str = "runs/sft"
    """the model the reward model starts from, and that samples the pairs and the held-out set"""
    task: str = DEFAULT_TASK
    """task name (see common/tasks.py): its verifier labels every pair"""
    reference: bool = True
    """the reward model reads the reference answer beside the question; --no-reference: the question only,
    as an RLHF reward model (which must then solve the task to judge it: on add_noisy it stays at chance)"""
    # ---- data: preference pairs (in place of the RL scripts' rollout) ------------------------
    pairs: Literal["sampled", "demonstrations"] = "sampled"
    """y+ and y- from the policy's samples, or from the task's (noisy) demonstrations; the verifier labels both"""
    pairs_file: str = ""
    """train on the pairs in this file (one JSON object a line, as runs/<run>/pairs.jsonl) instead of --pairs"""
    num_pair_prompts: int = 1024
    """train questions the pairs are built from"""
    group_size: int = 8
    """--pairs sampled: samples per question (each right one is paired with a wrong one)"""
    temperature: float = 1.0
    """sampling temperature of the pairs and of the held-out samples"""
    max_new_tokens: int = 0
    """completion budget; 0 = the task's default"""
    label_noise: float = 0.0
    """share of training pairs whose label is swapped: exactly round(share * pairs) of them"""
    label_bias: Literal["none", "longer"] = "none"
    """longer: where y+ and y- differ in length, the labeller prefers the longer one (--label-bias-prob)"""
    label_bias_prob: float = 1.0
    """with --label-bias longer: the chance it prefers the longer one over the verifier's choice (1 = always)"""
    # ---- reward model loss ------------------------------------------------------------------
    margin: float = 0.0
    """bt: m in -log sigmoid(r+ - r- - m): the score gap asked of every pair"""
    center_rewards_coef: float = 0.0
    """bt: c in + c (r+ + r-)^2, TRL's reward centring (TRL suggests 1e-2); 0 = off"""
    # ---- optimisation ----------------------------------------------------------------------
    total_steps: int = 300
    """optimizer steps"""
    batch_size: int = 64
    """pairs per optimizer step, GLOBAL: over all ranks (each of N torchrun processes takes batch_size / N)"""
    learning_rate: float = 0.0
    """AdamW learning rate, constant; 0 = 1e-3 for bt, 3e-3 for judge (what learns here in 300 steps)"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    # ---- evaluation, checkpoints ----------------------------------------------------------
    eval_every: int = 50
    """steps between held-out checks (`eval_pair_accuracy`, `eval_agreement`); 0 = never"""

    @property
    def model(self) -> str:  # start_run's task-mismatch warning reads --model; here that is the policy
        return self.policy


def validate(args: Args, world_size: int = 1) -> tuple[int, int]:
    """Reject bad values and knob pairs that would silently drop one; return (rank_rows, micro_size):
    each rank takes rank_rows = batch_size / world_size pairs a step, in micro-batches of micro_size."""
    check_at_least(args, 1, "total_steps", "batch_size", "num_pair_prompts", "group_size")
    check_at_least(args, 0, "max_new_tokens", "weight_decay", "margin", "center_rewards_coef")
    args.learning_rate = args.learning_rate or {"bt": 1e-3, "judge": 3e-3}[args.mode]
    check_positive(args, "learning_rate", "temperature")
    for name in ("label_noise", "label_bias_prob"):
        check(0 <= getattr(args, name) <= 1, name, f"must be in [0, 1], got {getattr(args, name)}")
    check(args.label_bias == "longer" or args.label_bias_prob == 1, "label_bias_prob", "needs --label-bias longer")
    check(args.mode == "bt" or args.margin == args.center_rewards_coef == 0, "margin",
          "--margin and --center-rewards-coef shape the bt loss; the judge's loss is next-token loss")
    check(not args.pairs_file or os.path.isfile(args.pairs_file), "pairs_file", f"{args.pairs_file}: no such file")
    check(not args.lora_rank, "lora_rank", "reward_model.py trains every weight (the new score head too); drop it")
    rank_rows = exact_div(args.batch_size, world_size, "batch_size", "nproc_per_node")
    micro_size = min(args.micro_batch_size, rank_rows)
    exact_div(rank_rows, micro_size, "batch_size", "micro_batch_size")
    return rank_rows, micro_size


# ==== The algorithm: the losses and the held-out measures. Pure functions; tests import them ====


def bt_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: float = 0.0,
            center_coef: float = 0.0) -> torch.Tensor:
    """Per pair (b,): -log sigmoid(r+ - r- - m) + c (r+ + r-)^2. The caller sums and divides by the
    pairs of the whole batch. E.g. r+ = r- = 0 -> log 2 = 0.693; r+ = 2, r- = 0, m = 1 -> 0.313."""
    return -F.logsigmoid(r_chosen - r_rejected - margin) + center_coef * (r_chosen + r_rejected) ** 2


def pair_accuracy(s_chosen: torch.Tensor, s_rejected: torch.Tensor) -> float:
    """Share of pairs scored the right way round, a tie counting half: [1, 0] vs [0, 0] -> 0.75."""
    return ((s_chosen > s_rejected).float() + 0.5 * (s_chosen == s_rejected).float()).mean().item()


def auc(scores: torch.Tensor, correct: torch.Tensor) -> float:
    """Area under the ROC curve of scores against 0/1 labels: the chance a random right sample scores
    above a random wrong one (ties half). Threshold-free, so a BT score (no scale) and a judge's P(yes)
    compare. [0.9, 0.2, 0.5] with labels [1, 0, 0] -> 1.0; nan without both kinds."""
    right, wrong = scores[correct > 0.5], scores[correct <= 0.5]
    if len(right) == 0 or len(wrong) == 0:
        return float("nan")
    return pair_accuracy(right[:, None].expand(-1, len(wrong)), wrong[None, :].expand(len(right), -1))


ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
        "seventeen eighteen nineteen").split()
TENS = "- - twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:
    """English words for 0 <= n < 1000: 38 -> 'thirty-eight', 120 -> 'one hundred twenty'."""
    if n >= 100:
        return f"{ONES[n // 100]} hundred" + (f" {number_words(n % 100)}" if n % 100 else "")
    return ONES[n] if n < 20 else TENS[n // 10] + (f"-{ONES[n % 10]}" if n % 10 else "")


def equivalent_forms(answer: str) -> dict[str, str]:
    """A number written in forms the number verifier rejects (common/rewards.py reads the last number, so
    "3.8e1" is 1, and words hold none); it already accepts "38.0", "=38", "38 units", "038".
    >>> equivalent_forms("38")
    {'words': 'thirty-eight', 'scientific': '3.8e1'}
    """
    if not answer.isdigit() or int(answer) >= 1000:
        return {}
    n, exponent = int(answer), len(str(int(answer))) - 1
    return {"words": number_words(n), "scientific": f"{n / 10 ** exponent:g}e{exponent}"}


# ==== Data: the pairs, the judge's verdicts, and the held-out evaluation ====


def build_pairs(args: Args, task, sampler, tokenizer, max_new_tokens: int, eos_ids: list[int]) -> PreferencePairs:
    """The training pairs: y+ right and y- wrong per the verifier (--pairs, or --pairs-file), then the
    labeller's bias and noise; pairs whose two sides are the same text are dropped, with a count."""
    generator = torch.Generator().manual_seed(args.seed)
    if args.pairs_file:
        pairs, source = load_pairs(args.pairs_file), args.pairs_file
    else:
        graded = (sample_graded(sampler, tokenizer, task, "prompts", 0, args.num_pair_prompts, args.group_size,
                                args.temperature, max_new_tokens, args.seed, eos_ids) if args.pairs == "sampled"
                  else demonstration_graded(task, 0, args.num_pair_prompts, args.seed))
        pairs = pairs_from_graded(graded, generator)
        source = f"{len(graded)} {args.pairs} completions ({sum(graded.correct) / len(graded):.2f} right)"
    pairs, dropped = drop_identical(pairs)
    name = "pairs_file" if args.pairs_file else "pairs"
    if dropped:
        print(f"warning: {flag(name)}: dropped {dropped} pairs whose chosen and rejected are the same text")
    check(len(pairs) > 0, name, f"no pair to train on from {source}: every question's completions are all right, "
          "all wrong or identical; sample more (--group-size, --num-pair-prompts) or use another --task")
    pairs, swapped = (prefer_longer(pairs, args.label_bias_prob, generator) if args.label_bias == "longer"
                      else (pairs, [False] * len(pairs)))  # a labeller that likes length (Singhal et al. 2023)
    pairs, flipped = flip_labels(pairs, args.label_noise, generator)
    print(f"pairs: {len(pairs)} from {source}; {sum(swapped)} swapped by --label-bias, {sum(flipped)} by "
          f"--label-noise; the labels agree with the verifier on {pairs.agreement():.3f} of them")
    return pairs


def verdict_rollout(tokenizer, pairs: PreferencePairs, reference: bool, eos_id: int, device) -> Rollout:
    """The judge's training rows: each pair is two verdicts, y+ -> "yes" and y- -> "no" (2B rows)."""
    texts = judge_questions(pairs.questions * 2, pairs.answers * 2, pairs.chosen + pairs.rejected, reference)
    return encode_completions(tokenizer, texts, [VERDICTS[0]] * len(pairs) + [VERDICTS[1]] * len(pairs), None,
                              eos_id, 8, device)


@torch.no_grad()
def evaluate_reward(reward: LearnedReward, task, held_out: Graded, held_out_pairs: PreferencePairs,
                    max_new_tokens: int, eos_id: int, micro_size: int) -> dict:
    """The reward model on the policy's samples of held-out questions, against the verifier: pair accuracy
    and margin on held-out pairs (y+ right, y- wrong), score mean/std and AUC (`agreement`) on single
    samples; a judge also `verdict_accuracy` (P(yes) > 0.5 is the verifier's verdict) and how often it
    says yes to right answers in forms the verifier rejects (`equivalent_yes_rate`)."""
    device = next(reward.model.parameters()).device
    reward.model.eval()  # and back to train at the end: it is called from the training loop
    tokenizer, system = reward.tokenizer, task.system_prompt
    samples = encode_completions(tokenizer, held_out.questions, held_out.completions, system, eos_id, max_new_tokens,
                                 device)
    scores = reward.score(samples, held_out.questions, held_out.answers, micro_size)  # (N,)
    correct = torch.tensor(held_out.correct, device=device)  # (N,)
    chosen, rejected = encode_pairs(tokenizer, held_out_pairs, system, eos_id, max_new_tokens, device)
    s_chosen = reward.score(chosen, held_out_pairs.questions, held_out_pairs.answers, micro_size)  # (P,)
    s_rejected = reward.score(rejected, held_out_pairs.questions, held_out_pairs.answers, micro_size)  # (P,)
    result = {"pair_accuracy": pair_accuracy(s_chosen, s_rejected), "margin": (s_chosen - s_rejected).mean().item(),
              "agreement": auc(scores, correct), "reward_mean": scores.mean().item(), "reward_std": scores.std().item(),
              "sampled_accuracy": correct.mean().item(), "num_pairs": len(held_out_pairs), "num_samples": len(scores)}
    if reward.mode == "judge":
        result["verdict_accuracy"] = ((scores > 0.5).float() == correct).float().mean().item()
        # right answers in forms the rule rejects, and as a control the wrong answer (+1) in the same forms:
        # a judge that knows the forms says yes to the first and no to the second
        for name, shift in (("equivalent", 0), ("equivalent_wrong", 1)):
            forms = [(q, a, kind, text) for q, a in dict(zip(held_out.questions, held_out.answers)).items()
                     if a.isdigit() for kind, text in equivalent_forms(str(int(a) + shift)).items()
                     if VERIFIERS[task.verifier](text, a)[0] == 0]  # only what the rule rejects
            if not forms:
                continue
            questions, answers, kinds, texts = map(list, zip(*forms))
            p_yes = reward.score(encode_completions(tokenizer, questions, texts, system, eos_id, 64, device),
                                 questions, answers, micro_size)  # (F,)
            for kind in sorted(set(kinds)):
                rows = torch.tensor([k == kind for k in kinds], device=device)
                result[f"{name}_yes_rate/{kind}"] = (p_yes[rows] > 0.5).float().mean().item()
            result[f"num_{name}"] = len(forms)
    reward.model.train()
    return result


def main(args: Args):
    # ---- Setup: task, batch arithmetic, run folder, device ----------------------------------
    world, run_dir, dtype = start_run(args, "reward_model", rank_seed=False)  # the same pairs and head on every rank
    rank_rows, micro_size = validate(args, world.size)  # rank_rows: this rank's pairs per step
    task = load_task(args.task)
    max_new_tokens = args.max_new_tokens or task.max_new_tokens

    # ---- Setup: pairs (y+ right, y- wrong, then the labeller's bias and noise), held-out set ----
    sampler, tokenizer = load_model_and_tokenizer(args.policy, world.device, dtype)
    eos_ids = eos_token_ids(sampler, tokenizer)
    pairs_path = os.path.join(run_dir, "pairs.jsonl")
    if args.resume and os.path.exists(pairs_path):  # exactly the pairs the interrupted run trained on
        train_pairs = load_pairs(pairs_path)
    else:
        train_pairs = build_pairs(args, task, sampler, tokenizer, max_new_tokens, eos_ids)
        if world.is_main:
            os.makedirs(run_dir, exist_ok=True)
            save_pairs(pairs_path, train_pairs)
    held_out = sample_graded(sampler, tokenizer, task, "test", 0, args.num_eval_prompts, args.num_eval_samples,
                             args.temperature, max_new_tokens, args.seed, eos_ids)
    held_out_pairs = pairs_from_graded(held_out, torch.Generator().manual_seed(args.seed))  # the verifier's labels

    # ---- Setup: reward model (the trunk + a scalar head, or the policy itself as judge), optimizer ----
    if args.mode == "bt":  # InstructGPT: the SFT model with its unembedding replaced by a scalar head
        model = AutoModelForSequenceClassification.from_pretrained(args.policy, num_labels=1, dtype=dtype)
        model.config.pad_token_id = tokenizer.pad_token_id  # the head reads the last token that is not pad
        torch.nn.init.normal_(model.score.weight, std=1 / math.sqrt(model.config.hidden_size + 1))
        model = model.to(world.device)
        del sampler
    else:
        model = sampler
    model.train()
    policy = wrap_model(model, world, args.fsdp)  # what the update runs: DDP / FSDP2 under torchrun, else the model
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    reward = LearnedReward(model, tokenizer, args.mode, args.reference)  # held-out scoring, as --reward-model scores

    # ---- Setup: resume, logger ----------------------------------------------------------------
    start_step, data_position = 0, 0
    if args.resume:
        start_step, extra = resume_from(run_dir, model, optimizer, learning_rate=args.learning_rate)
        data_position = extra["data_position"]
    logger = RunLogger(run_dir, args, "reward_model", resume_step=start_step if args.resume else None)
    print(f"reward_model --mode {args.mode}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"{len(train_pairs)} training pairs, {len(held_out_pairs)} held-out pairs, {len(held_out)} held-out "
          f"samples, device {world.device}, {world.size} process(es)")

    progress = tqdm(range(start_step, args.total_steps), initial=start_step, total=args.total_steps,
                    desc=f"reward_model {args.mode}", disable=not world.is_main)
    quick = {}
    for step in progress:
        step_start = time.perf_counter()
        # ---- 1. Generate: none; the next batch_size pairs of the (seed, position) stream, rank r's slice ----
        batch = train_pairs[rows_at(len(train_pairs), data_position + world.rank * rank_rows, rank_rows, args.seed)]
        data_position += args.batch_size
        # ---- 2. Reward, 3. Advantage, 4. Score: none, the labels are the signal ------------------
        if args.mode == "bt":
            chosen, rejected = (bt_inputs(tokenizer, side, batch.questions, batch.answers, args.reference)
                                for side in encode_pairs(tokenizer, batch, task.system_prompt, eos_ids[0],
                                                         max_new_tokens, world.device))
            mask, trained = chosen.completion_mask.float(), [chosen, rejected]  # (B, C): the minibatch counts pairs
        else:
            verdicts = verdict_rollout(tokenizer, batch, args.reference, eos_ids[0], world.device)  # 2B: yes, no
            mask, trained = verdicts.completion_mask.float(), [verdicts]  # (2B, C)

        # ---- 5. Update: one optimizer step on the whole batch (1 epoch x 1 minibatch) ------------
        scores = []
        for minibatch in minibatches(policy, mask, 1, 1, 1, micro_size):
            for micro_rows in minibatch:
                if args.mode == "bt":  # y+ and y- in one forward (DDP syncs once per backward)
                    both = Rollout.cat([chosen[micro_rows], rejected[micro_rows]], tokenizer.pad_token_id)
                    r_chosen, r_rejected = bt_score(policy, both).chunk(2)  # (b,) each
                    loss = bt_loss(r_chosen, r_rejected, args.margin, args.center_rewards_coef)  # (b,)
                    loss = loss.sum() / minibatch.num_seqs  # mean over the pairs of the whole batch
                    scores.append(torch.stack([r_chosen, r_rejected]).detach())  # (2, b)
                else:  # judge: SFT on the verdicts, token mean over the whole batch
                    logp, _ = rollout_logprobs(policy, verdicts[micro_rows])  # (b, C)
                    loss = -masked_sum(logp, mask[micro_rows]) / minibatch.num_tokens
                minibatch.backward(loss)
            loss, grad_norm = minibatch.step(optimizer, args.max_grad_norm, step + 1, run_dir)
        # ---- 6. Sync: none, nothing samples during training ----------------------------------------

        # ---- 7. Log (and a held-out check now and then) ---------------------------------------------
        if args.eval_every and (step + 1) % args.eval_every == 0:
            result = evaluate_reward(reward, task, held_out, held_out_pairs, max_new_tokens, eos_ids[0], micro_size)
            quick = {"eval_pair_accuracy": result["pair_accuracy"], "eval_agreement": result["agreement"]}
        step_time = time.perf_counter() - step_start
        metrics = {"loss": loss, "grad_norm": grad_norm, "learning_rate": args.learning_rate,
                   "train_tokens_per_s": int(sum(r.prompt_mask.sum() + r.completion_mask.sum() for r in trained)
                                             / step_time),  # this rank's
                   "step_time": step_time, **quick}
        if scores:  # bt: the training batch's pair accuracy, margin and score spread
            r = torch.cat(scores, dim=1)  # (2, B)
            metrics.update(pair_accuracy=pair_accuracy(r[0], r[1]), margin=(r[0] - r[1]).mean().item(),
                           reward_mean=r.mean().item(), reward_std=r.std().item())
        logger.log(step + 1, metrics)
        quick = {}
        progress.set_postfix(loss=f"{loss:.3f}")
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.total_steps:
            save_checkpoint(run_dir, model, tokenizer, optimizer, None, step + 1, {"data_position": data_position})

    # ---- Finish: checkpoint, final model and its marker, held-out evaluation ------------------
    save_checkpoint(run_dir, model, tokenizer, optimizer, None, args.total_steps, {"data_position": data_position})
    save_final_model(run_dir, model, tokenizer)
    if world.is_main:  # what tells a reward-model folder from a policy folder (common/learned_reward.py)
        with open(os.path.join(run_dir, MARKER), "w") as f:
            json.dump({"mode": args.mode, "reference": args.reference, "task": args.task, "base": args.policy}, f)
    result = {"event": "eval", **evaluate_reward(reward, task, held_out, held_out_pairs, max_new_tokens, eos_ids[0],
                                                 micro_size)}
    logger.log(args.total_steps, result)
    logger.close()
    kind = "AutoModelForSequenceClassification" if args.mode == "bt" else "AutoModelForCausalLM"
    print(f"eval on {result['num_pairs']} held-out pairs and {result['num_samples']} samples: pair_accuracy "
          f"{result['pair_accuracy']:.3f}, agreement (AUC) {result['agreement']:.3f}, margin {result['margin']:.3f}\n"
          f"saved to {run_dir}/ ({kind}.from_pretrained loads it); RL scripts take --reward-model {run_dir}")
    cleanup()
    return result


if __name__ == "__main__":
    main(tyro.cli(Args))
