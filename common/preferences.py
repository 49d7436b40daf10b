"""Preference pairs: (question, y+, y-) built from a task, and the labeller's mistakes made on purpose.

What reward_model.py (Bradley-Terry, judge) and dpo.py train on. A pair says "y+ beats y-" as an
answer to a question; in this project the labeller is the task's verifier (common/rewards.py), so
y+ is a verifier-correct completion and y- a wrong one of the same question:

    graded = sample_graded(model, tokenizer, task, "prompts", 0, 512, 8, ...)   # the policy's samples
    graded = demonstration_graded(task, 0, 512, seed)                          # or the task's teacher
    pairs = pairs_from_graded(graded, generator)        # per question: each right one with a wrong one
    pairs, flipped = prefer_longer(pairs, 1.0, generator)   # a biased labeller (optional)
    pairs, flipped = flip_labels(pairs, 0.2, generator)     # a noisy labeller: exactly 20% swapped
    pairs, dropped = drop_identical(pairs)                  # y+ == y- says nothing: dropped, counted
    chosen, rejected = encode_pairs(tokenizer, pairs, task.system_prompt, eos_id, max_new_tokens, device)
    # two Rollouts of the same prompts, row i of each one side of pair i: rollout_logprobs works on both

Completions are kept as text (re-encoded with EOS by `encode_pairs`), so pairs can be saved
(`save_pairs` / `load_pairs`, one JSON object a line) and read by another script.
`chosen_correct` / `rejected_correct` keep the verifier's verdicts after any relabelling, so a
metric can say how often the (noisy, biased) labels still agree with the verifier.
"""

import json
from dataclasses import dataclass, fields

import torch

from common.rewards import score_rows
from common.rollout import generate_hf
from common.rollout_data import Rollout
from common.tasks import encode_demonstrations, format_prompt, rows_at


@dataclass
class Graded:
    """Single completions with the verifier's verdict: row i answers questions[i], correct[i] in {0, 1}."""

    questions: list[str]
    answers: list[str]  # the reference answer the verifier checked against
    completions: list[str]
    correct: list[float]

    def __len__(self) -> int:
        return len(self.completions)


@dataclass
class PreferencePairs:
    """B pairs: as an answer to questions[i], chosen[i] (y+) is preferred to rejected[i] (y-)."""

    questions: list[str]
    answers: list[str]  # the reference answer of each question
    chosen: list[str]  # y+ text, no EOS
    rejected: list[str]  # y- text, no EOS
    chosen_correct: list[float]  # the verifier's verdict on y+ (1 unless a relabelling swapped the pair)
    rejected_correct: list[float]  # the verifier's verdict on y-

    def __len__(self) -> int:
        return len(self.chosen)

    def __getitem__(self, rows) -> "PreferencePairs":
        """The pairs at `rows` (a slice or a list of indices)."""
        index = list(range(len(self)))[rows] if isinstance(rows, slice) else [int(i) for i in rows]
        return PreferencePairs(**{f.name: [getattr(self, f.name)[i] for i in index] for f in fields(self)})

    def swapped(self, swap: list[bool]) -> "PreferencePairs":
        """The same pairs with y+ and y- exchanged where swap[i] is True."""
        pick = lambda a, b: [y if s else x for x, y, s in zip(getattr(self, a), getattr(self, b), swap, strict=True)]
        return PreferencePairs(self.questions, self.answers, pick("chosen", "rejected"), pick("rejected", "chosen"),
                               pick("chosen_correct", "rejected_correct"), pick("rejected_correct", "chosen_correct"))

    def agreement(self) -> float:
        """Share of pairs whose label the verifier agrees with (chosen right, rejected wrong); 1 before relabelling."""
        return sum(c > r for c, r in zip(self.chosen_correct, self.rejected_correct)) / max(1, len(self))


# ==== Where completions come from: the policy's samples, or the task's demonstrations ====


@torch.no_grad()
def check_single_turn(task):
    """Pairs are single-turn texts: a tool task's completions hold the environment's observations, which a pair
    would train on as the policy's own words (and sample_graded would sample without the tool). One line instead."""
    if task.environment is not None:
        raise SystemExit(f"error: --task {task.name}: a tool task's completions are multi-turn (the tool's "
                         f"observations are not the policy's); preference pairs here are single-turn, so dpo.py and "
                         f"reward_model.py do not take it: train tool use with grpo.py, reinforce.py, ppo.py or "
                         f"sft_rl_mixed.py")


def sample_graded(model, tokenizer, task, split: str, position: int, num_prompts: int, group_size: int,
                  temperature: float, max_new_tokens: int, seed: int, eos_ids: list[int],
                  chunk_prompts: int = 64) -> Graded:
    """group_size samples of `model` for each of num_prompts questions, each graded by the task's verifier.

    split "prompts" (the train questions, once each, in the (seed, position) stream order) or "test"
    (the held-out questions, in their order from `position`). Rows are grouped by question: rows
    i*G .. i*G+G-1 answer question i. Sampling runs in a forked RNG seeded with `seed`, so the same
    call gives the same samples whenever it runs (a resumed run rebuilds its pairs exactly, on CPU).
    """
    check_single_turn(task)
    data = task.prompts if split == "prompts" else task.test
    order = rows_at(len(data), position, num_prompts, seed) if split == "prompts" else \
        list(range(position, min(position + num_prompts, len(data))))
    rows = data[order]
    graded = Graded([], [], [], [])
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        torch.manual_seed(seed)
        for start in range(0, len(order), chunk_prompts):
            questions = rows["question"][start:start + chunk_prompts]
            answers = rows["answer"][start:start + chunk_prompts]
            prompts = [format_prompt(tokenizer, q, task.system_prompt) for q in questions]
            rollout = generate_hf(model, tokenizer, prompts, group_size, temperature, max_new_tokens, eos_ids=eos_ids)
            answers = [a for a in answers for _ in range(group_size)]
            _, terms, _ = score_rows(task.verifier, rollout.completions, answers, rollout.is_eos.tolist())
            graded.questions += [q for q in questions for _ in range(group_size)]
            graded.answers += answers
            graded.completions += rollout.completions
            graded.correct += terms["correct"]
    return graded


def demonstration_graded(task, position: int, num_prompts: int, seed: int) -> Graded:
    """Every demonstration (the `demonstration` column: the task's teacher, noisy in add_noisy) of
    num_prompts train questions of the (seed, position) stream, graded by the verifier.

    add_noisy has 8 demonstrations a question, each off by one with probability 0.4, so most
    questions hold both right and wrong ones; add (a clean teacher) holds no wrong one, hence no pair.
    """
    check_single_turn(task)
    wanted = set(task.prompts[rows_at(len(task.prompts), position, num_prompts, seed)]["question"])
    train = task.train.select_columns(["question", "answer", "demonstration"])[:]  # one dict of lists
    keep = [i for i, q in enumerate(train["question"]) if q in wanted]
    questions, answers = [train["question"][i] for i in keep], [train["answer"][i] for i in keep]
    completions = [train["demonstration"][i] for i in keep]
    _, terms, _ = score_rows(task.verifier, completions, answers, [True] * len(keep))
    return Graded(questions, answers, completions, terms["correct"])


def pairs_from_graded(graded: Graded, generator: torch.Generator) -> PreferencePairs:
    """Per question, each right completion paired with a wrong one: min(right, wrong) pairs, both
    sides shuffled first (so which right meets which wrong is random). A question with only right or
    only wrong completions gives none.

    E.g. one question with completions ["38", "37", "38", "39"], correct [1, 0, 1, 0] -> two pairs,
    ("38", "37") and ("38", "39") in some order.
    """
    by_question: dict[str, tuple[str, list[int], list[int]]] = {}
    for i, (question, answer, right) in enumerate(zip(graded.questions, graded.answers, graded.correct)):
        entry = by_question.setdefault(question, (answer, [], []))
        entry[1 if right else 2].append(i)
    pairs = PreferencePairs([], [], [], [], [], [])
    for question, (answer, right, wrong) in by_question.items():
        right = [right[j] for j in torch.randperm(len(right), generator=generator).tolist()]
        wrong = [wrong[j] for j in torch.randperm(len(wrong), generator=generator).tolist()]
        for i, j in zip(right, wrong):
            pairs.questions.append(question)
            pairs.answers.append(answer)
            pairs.chosen.append(graded.completions[i])
            pairs.rejected.append(graded.completions[j])
            pairs.chosen_correct.append(graded.correct[i])
            pairs.rejected_correct.append(graded.correct[j])
    return pairs


# ==== The labeller's mistakes, on purpose: noise and a length bias ====


def flip_labels(pairs: PreferencePairs, share: float, generator: torch.Generator) -> tuple[PreferencePairs, list[bool]]:
    """Label noise: swap y+ and y- of exactly round(share * B) pairs, chosen at random.

    Exactly, not each with probability `share`: the stated share is the share a run trains on.
    Returns (pairs, swapped per pair). share 0 returns the pairs unchanged.
    """
    flip = [False] * len(pairs)
    for i in torch.randperm(len(pairs), generator=generator)[:round(share * len(pairs))].tolist():
        flip[i] = True
    return pairs.swapped(flip), flip


def prefer_longer(pairs: PreferencePairs, prob: float,
                  generator: torch.Generator) -> tuple[PreferencePairs, list[bool]]:
    """A labeller biased towards length: where y+ and y- differ in length (characters), it prefers the
    longer one with probability `prob` (1 = always), whatever the verifier says; pairs of equal length
    keep their label. Returns (pairs, swapped per pair).

    E.g. ("99", "100") with prob 1 becomes ("100", "99"); ("38", "37") stays.
    """
    draws = torch.rand(len(pairs), generator=generator).tolist()
    swap = [len(r) > len(c) and u < prob for c, r, u in zip(pairs.chosen, pairs.rejected, draws)]
    return pairs.swapped(swap), swap


def drop_identical(pairs: PreferencePairs) -> tuple[PreferencePairs, int]:
    """Pairs whose y+ and y- are the same text teach nothing (BT's loss is log 2 whatever the weights,
    DPO's gradient is 0) and mean the data is broken: drop them. Returns (kept pairs, how many dropped)."""
    keep = [i for i, (c, r) in enumerate(zip(pairs.chosen, pairs.rejected)) if c.strip() != r.strip()]
    return pairs[keep], len(pairs) - len(keep)


# ==== Tensors: two Rollouts of the same prompts, and files ====


def encode_completions(tokenizer, questions: list[str], completions: list[str], system_prompt: str | None,
                       eos_id: int, max_new_tokens: int, device, rewards: list[float] | None = None) -> Rollout:
    """Completions (text) of questions as a Rollout laid out like a sampled one: prompts left-padded,
    completions right-padded and ending in EOS (cut at max_new_tokens, then without it); `rewards`
    (e.g. the verifier's verdicts) ride along. Row i answers questions[i]."""
    prompts = [format_prompt(tokenizer, q, system_prompt) for q in questions]
    prompt_ids, prompt_mask, completion_ids, completion_mask = (t.to(device) for t in encode_demonstrations(
        tokenizer, prompts, completions, eos_id, max_new_tokens))
    last = completion_ids.gather(1, (completion_mask.sum(-1, keepdim=True) - 1).clamp(min=0)).squeeze(-1)  # (B,)
    return Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                   completion_mask=completion_mask, sampler_logprobs=torch.zeros(completion_ids.shape, device=device),
                   is_eos=last == eos_id, prompt_index=torch.arange(len(questions), device=device),
                   completions=list(completions),
                   rewards=None if rewards is None else torch.tensor(rewards, device=device))


def encode_pairs(tokenizer, pairs: PreferencePairs, system_prompt: str | None, eos_id: int, max_new_tokens: int,
                 device) -> tuple[Rollout, Rollout]:
    """(chosen, rejected): two Rollouts of the same prompts (`encode_completions`), row i of each one side
    of pair i; `rewards` holds the verifier's verdicts (chosen_correct, rejected_correct)."""
    return (encode_completions(tokenizer, pairs.questions, pairs.chosen, system_prompt, eos_id, max_new_tokens,
                               device, pairs.chosen_correct),
            encode_completions(tokenizer, pairs.questions, pairs.rejected, system_prompt, eos_id, max_new_tokens,
                               device, pairs.rejected_correct))


def save_pairs(path: str, pairs: PreferencePairs):
    """One JSON object a line: {"question", "answer", "chosen", "rejected", "chosen_correct", "rejected_correct"}."""
    names = [f.name for f in fields(pairs)]
    with open(path, "w") as f:
        for values in zip(*(getattr(pairs, n) for n in names)):
            f.write(json.dumps({n.removesuffix("s") if n in ("questions", "answers") else n: v
                                for n, v in zip(names, values)}) + "\n")


def load_pairs(path: str) -> PreferencePairs:
    """The pairs `save_pairs` wrote."""
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return PreferencePairs(*([r[key] for r in rows] for key in ("question", "answer", "chosen", "rejected",
                                                                 "chosen_correct", "rejected_correct")))

