"""Tasks: prompts, reference answers, demonstrations and a verifier, as `datasets.Dataset`.

Every task yields two splits with the same columns:
    question       str   the user turn
    answer         str   the reference the verifier checks against
    demonstration  str   an expert completion (what SFT imitates); may be wrong on purpose
and names its verifier (see common/rewards.py). The chat template turns `question` into the
prompt, so the same task text serves the tiny char-level model and a Qwen chat model.

Registry: `TASKS[name](seed) -> Task`. One flag (`--task NAME`) picks any of them.

The default task, `add_noisy`, is designed so that RL measurably beats SFT on a CPU (the
seed article's claim: SFT's ceiling is the teacher; RL can go past it):
- 2-digit addition, learnable from scratch by a 0.5M-parameter model in minutes;
- the teacher is *noisy*: each demonstration is off by one (+1 or -1, equally likely) with
  probability 0.4, so it is right only ~60% of the time, and each training prompt has
  several independent demonstrations, so the model cannot memorise one label per prompt;
- maximum likelihood makes the model's distribution match the teacher's, so sampled
  pass@1 plateaus near 0.6 however long SFT runs (the teacher's ceiling), while the right
  answer is the *mode* and sits in almost every group of 8 samples (pass@8 ~ 1);
- a verifier rewards exactly what imitation cannot: the right sample among wrong ones.
  GRPO moves sampled accuracy from ~0.6 towards 1 in CPU-minutes.
`add_carry_noisy` is the harder variant (the teacher drops the carry on most carry
problems, so the mode itself is wrong there and RL must find answers the teacher rarely
shows); `add` is the clean teacher (SFT alone solves it; little headroom for RL).
"""

import random
import re
from dataclasses import dataclass
from typing import Callable

import torch
from datasets import Dataset


@dataclass
class Task:
    name: str
    train: Dataset
    test: Dataset
    verifier: str
    """name of the correctness function in common.rewards.VERIFIERS"""
    system_prompt: str | None = None
    max_new_tokens: int = 8
    """a sensible completion budget for this task"""

    @property
    def prompts(self) -> Dataset:
        """The train split with one row per distinct question: what RL samples prompts from.

        (SFT data can hold several demonstrations per question; RL needs each prompt once.)
        """
        if not hasattr(self, "_prompts"):
            seen, keep = set(), []
            for i, question in enumerate(self.train["question"][:]):  # [:] = one list, not row-wise reads
                if question not in seen:
                    seen.add(question)
                    keep.append(i)
            self._prompts = self.train.select(keep).select_columns(["question", "answer"])
        return self._prompts


# ---------------------------------------------------------------------------------------
# Synthetic arithmetic (offline, the default world)
# ---------------------------------------------------------------------------------------


def _addition_pairs(seed: int, num_test: int) -> tuple[list, list]:
    """All 2-digit pairs (a, b), 10 <= a, b <= 99, split into train and held-out test."""
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    random.Random(seed).shuffle(pairs)
    return pairs[num_test:], pairs[:num_test]


def off_by_one_teacher(a: int, b: int, p_wrong: float, rng: random.Random) -> int:
    """The noisy teacher of `add_noisy`: a + b, but +-1 with probability p_wrong."""
    if rng.random() < p_wrong:
        return a + b + rng.choice((-1, 1))
    return a + b


def drop_carry_teacher(a: int, b: int, p_drop: float, rng: random.Random) -> int:
    """The noisy teacher of `add_carry_noisy`: forgets the carry out of the units digit."""
    if (a % 10) + (b % 10) >= 10 and rng.random() < p_drop:
        return a + b - 10
    return a + b


def make_addition_task(
    name: str,
    teacher: Callable[[int, int, random.Random], int] | None,
    seed: int = 0,
    demos_per_prompt: int = 8,
    num_test: int = 500,
) -> Task:
    """2-digit addition; `teacher=None` writes the right answer."""
    train_pairs, test_pairs = _addition_pairs(seed, num_test)
    rng = random.Random(seed + 1)
    rows = {"question": [], "answer": [], "demonstration": []}
    for a, b in train_pairs:
        for _ in range(demos_per_prompt if teacher else 1):
            rows["question"].append(f"{a}+{b}")
            rows["answer"].append(str(a + b))
            rows["demonstration"].append(str(teacher(a, b, rng) if teacher else a + b))
    test = {
        "question": [f"{a}+{b}" for a, b in test_pairs],
        "answer": [str(a + b) for a, b in test_pairs],
        "demonstration": [str(a + b) for a, b in test_pairs],
    }
    return Task(name, Dataset.from_dict(rows), Dataset.from_dict(test), verifier="number", max_new_tokens=6)


# ---------------------------------------------------------------------------------------
# Countdown: many right answers per prompt (reach the target with each number once)
# ---------------------------------------------------------------------------------------


def solve_countdown(numbers: list[int], target: int) -> str | None:
    """One expression using each number exactly once with + - * that equals target, or None."""

    def search(items):  # items: list of (value, expression)
        if len(items) == 1:
            return items[0][1] if items[0][0] == target else None
        for i in range(len(items)):
            for j in range(len(items)):
                if i == j:
                    continue
                (x, ex), (y, ey) = items[i], items[j]
                rest = [items[k] for k in range(len(items)) if k not in (i, j)]
                for value, expr in ((x + y, f"({ex}+{ey})"), (x - y, f"({ex}-{ey})"), (x * y, f"{ex}*{ey}")):
                    found = search(rest + [(value, expr)])
                    if found:
                        return found
        return None

    found = search([(n, str(n)) for n in numbers])
    return found[1:-1] if found and found.startswith("(") and found.endswith(")") else found


def make_countdown_task(seed: int = 0, num_train: int = 4000, num_test: int = 300) -> Task:
    rng = random.Random(seed)
    rows = {"question": [], "answer": [], "demonstration": []}
    while len(rows["question"]) < num_train + num_test:
        numbers = [rng.randint(1, 9) for _ in range(3)]
        target = rng.randint(1, 30)
        solution = solve_countdown(numbers, target)
        if solution is None:
            continue
        rows["question"].append(f"{' '.join(map(str, numbers))}->{target}")
        rows["answer"].append(f"{' '.join(map(str, numbers))}->{target}")  # verifier re-checks
        rows["demonstration"].append(solution)
    full = Dataset.from_dict(rows)
    return Task(
        "countdown",
        full.select(range(num_train)),
        full.select(range(num_train, num_train + num_test)),
        verifier="countdown",
        max_new_tokens=16,
    )


# ---------------------------------------------------------------------------------------
# GSM8K (needs the hub: a user's GPU machine)
# ---------------------------------------------------------------------------------------

GSM8K_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."


def gsm8k_record(record: dict) -> dict:
    """One raw GSM8K row -> our columns.

    GSM8K answers are "reasoning with <<48/2=24>> calculator notes\\n#### 72": the reference
    is the number after ####, the demonstration the reasoning without calculator notes,
    ending in \\boxed{} as the system prompt asks.
    """
    reasoning, _, final = record["answer"].rpartition("####")
    final = final.strip().replace(",", "")
    reasoning = re.sub(r"<<[^>]*>>", "", reasoning).strip()
    return {
        "question": record["question"].strip(),
        "answer": final,
        "demonstration": f"{reasoning}\nThe final answer is \\boxed{{{final}}}.",
    }


def make_gsm8k_task(seed: int = 0) -> Task:
    from datasets import load_dataset

    try:
        raw = load_dataset("openai/gsm8k", "main")
    except Exception as e:  # no network, or no hub cache: say so in one line
        message = f"error: --task gsm8k: could not load openai/gsm8k from the hub ({type(e).__name__})."
        raise SystemExit(message) from None
    keep = ["question", "answer"]
    train = raw["train"].select_columns(keep).map(gsm8k_record)
    test = raw["test"].select_columns(keep).map(gsm8k_record)
    return Task("gsm8k", train, test, verifier="math", system_prompt=GSM8K_SYSTEM_PROMPT, max_new_tokens=512)


TASKS: dict[str, Callable[[int], Task]] = {
    "add_noisy": lambda seed: make_addition_task(
        "add_noisy", lambda a, b, rng: off_by_one_teacher(a, b, 0.4, rng), seed
    ),
    "add_carry_noisy": lambda seed: make_addition_task(
        "add_carry_noisy", lambda a, b, rng: drop_carry_teacher(a, b, 0.8, rng), seed
    ),
    "add": lambda seed: make_addition_task("add", None, seed),
    "countdown": make_countdown_task,
    "gsm8k": make_gsm8k_task,
}
DEFAULT_TASK = "add_noisy"


def load_task(name: str, seed: int = 0) -> Task:
    """The task called `name`; an unknown name exits with the list of known ones."""
    if name not in TASKS:
        raise SystemExit(f"error: --task {name}: unknown task; choose one of {', '.join(TASKS)}.")
    return TASKS[name](seed)


def build_messages(question: str, system_prompt: str | None = None) -> list[dict]:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": question}]


def format_prompt(tokenizer, question: str, system_prompt: str | None = None) -> str:
    """The prompt text the model sees: the chat template with the assistant turn opened."""
    return tokenizer.apply_chat_template(
        build_messages(question, system_prompt), add_generation_prompt=True, tokenize=False
    )


def rows_at(num_rows: int, start: int, count: int, seed: int) -> list[int]:
    """Rows `start .. start + count - 1` of an endless stream of shuffled epochs.

    The data order is a pure function of (seed, position), so a resumed run that restores
    `data_position` sees exactly the rows the uninterrupted run would have seen.
    """
    rows, permutation_epoch, permutation = [], None, None
    for position in range(start, start + count):
        epoch, offset = divmod(position, num_rows)
        if epoch != permutation_epoch:
            generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
            permutation, permutation_epoch = torch.randperm(num_rows, generator=generator), epoch
        rows.append(int(permutation[offset]))
    return rows


def encode_demonstrations(tokenizer, prompts: list[str], completions: list[str], eos_id: int, max_completion_len: int):
    """Tokenize (prompt, expert completion) pairs the way a rollout lays them out.

    Returns prompt_ids, prompt_mask (B, P) left-padded and completion_ids, completion_mask
    (B, C) right-padded, the completion ending in EOS (which the loss counts: the model must
    learn to stop). Completions longer than max_completion_len are cut (and lose the EOS).
    """
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    completion_tokens = [
        (tokenizer(c, add_special_tokens=False)["input_ids"] + [eos_id])[:max_completion_len] for c in completions
    ]
    width = max(len(t) for t in completion_tokens)
    completion_ids = torch.full((len(completions), width), tokenizer.pad_token_id, dtype=torch.long)  # (B, C)
    completion_mask = torch.zeros((len(completions), width), dtype=torch.long)  # (B, C)
    for i, tokens in enumerate(completion_tokens):
        completion_ids[i, : len(tokens)] = torch.tensor(tokens)
        completion_mask[i, : len(tokens)] = 1
    return enc["input_ids"], enc["attention_mask"], completion_ids, completion_mask
