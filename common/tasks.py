"""Tasks: prompts, reference answers, demonstrations and a verifier, as `datasets.Dataset`.

Every task yields two splits with the same columns:
    question       str   the user turn
    answer         str   the reference the verifier checks against
    demonstration  str   an expert completion (what SFT imitates); may be wrong on purpose
and names its verifier (see common/rewards.py). Two optional columns, in both splits:
    expert         str   a *correct* demonstration, where `demonstration` is noisy on purpose
                         (what an SFT+RL mixing script injects: `Task.has_expert`)
    slice          str   which part of the task a row belongs to (e.g. "carry" / "no_carry"),
                         so evaluation reports accuracy per slice (`Task.slices`)
The chat template turns `question` into the prompt, so the same task text serves the tiny
char-level model and a Qwen chat model.

Registry: `TASKS[name](seed) -> Task`. One flag (`--task NAME`) picks any of them.

The default task, `add_noisy`, is designed so that RL measurably beats SFT on a CPU (the
survey "rl与sft"'s claim: SFT's ceiling is the teacher; RL can go past it):
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
shows); `add_carry_always_wrong` takes that to the limit (the teacher *always* drops it, so
the SFT model cannot sample the right answer on the carry slice at all: RL alone has no
signal there, and only a clean expert, the `expert` column, can teach it); `add` is the
clean teacher (SFT alone solves it; little headroom for RL). `countdown` has many right
answers per prompt and a problem space too large to memorise (see make_countdown_task).
"""

import itertools
import random
import re
from dataclasses import dataclass
from typing import Callable

import torch
from datasets import Dataset

from common.environment import ToolEnvironment, calc
from common.rollout_data import pad_right


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
    has_expert: bool = False
    """both splits have an `expert` column: a correct demonstration beside the noisy one"""
    slices: tuple[str, ...] = ()
    """the values of the `slice` column both splits have, in report order; () = no slices"""
    partial_credit: bool = False
    """train on the verifier's partial credit (common/rewards.py PARTIAL_CREDIT) instead of 0/1 correctness"""
    environment: ToolEnvironment | None = None
    """a tool task's environment: rollouts are multi-turn (common/environment.py); None = single-turn"""

    def __post_init__(self):
        """Fail at once (one line) when the optional columns do not match what the task claims."""
        for split_name, split in (("train", self.train), ("test", self.test)):
            if self.has_expert and "expert" not in split.column_names:
                raise ValueError(f"task {self.name}: has_expert is set but its {split_name} split has no expert column")
            if self.slices:
                values = set(split.unique("slice")) if "slice" in split.column_names else {"(no slice column)"}
                if not values <= set(self.slices):
                    raise ValueError(f"task {self.name}: {split_name} slices {sorted(values)} are not in {self.slices}")

    @property
    def prompts(self) -> Dataset:
        """The train split with one row per distinct question: what RL samples prompts from.

        (SFT data can hold several demonstrations per question; RL needs each prompt once.)
        The optional `expert` and `slice` columns come along, so an RL script can inject the
        expert's answer for the prompt it sampled, or report its rewards per slice.
        """
        if not hasattr(self, "_prompts"):
            seen, keep = set(), []
            for i, question in enumerate(self.train["question"][:]):  # [:] = one list, not row-wise reads
                if question not in seen:
                    seen.add(question)
                    keep.append(i)
            columns = [c for c in ("question", "answer", "expert", "slice") if c in self.train.column_names]
            self._prompts = self.train.select(keep).select_columns(columns)
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


def has_carry(a: int, b: int) -> bool:
    """The units digits carry (17+25: 7+5 >= 10): the part of addition `drop_carry_teacher` gets wrong."""
    return (a % 10) + (b % 10) >= 10


def drop_carry_teacher(a: int, b: int, p_drop: float, rng: random.Random) -> int:
    """The noisy teacher of `add_carry_noisy`: forgets the carry out of the units digit."""
    if has_carry(a, b) and rng.random() < p_drop:
        return a + b - 10
    return a + b


def make_addition_task(
    name: str,
    teacher: Callable[[int, int, random.Random], int] | None,
    seed: int = 0,
    demos_per_prompt: int = 8,
    num_test: int = 500,
    carry_slices: bool = False,
    wrong_reference_frac: float = 0.0,
) -> Task:
    """2-digit addition; `teacher=None` writes the right answer.

    Every row also holds the right sum as `expert` (the clean demonstration an SFT+RL mixing
    script may inject where the teacher is noisy); `carry_slices` adds a `slice` column
    ("carry" / "no_carry") for the tasks whose teacher fails on carries only.
    `wrong_reference_frac` > 0 corrupts the *reference answer* (what the verifier checks) of
    that fraction of training questions to a + b + 1, an answer the noisy teacher also writes:
    the dirty labels of the survey "rl与sft". The test split stays clean; `expert` keeps the truth.
    """
    train_pairs, test_pairs = _addition_pairs(seed, num_test)
    corrupt = random.Random(seed + 2)
    wrong = {pair for pair in train_pairs if corrupt.random() < wrong_reference_frac}
    rng = random.Random(seed + 1)
    rows = {"question": [], "answer": [], "demonstration": [], "expert": [], "slice": []}
    for a, b in train_pairs:
        for _ in range(demos_per_prompt if teacher else 1):
            rows["question"].append(f"{a}+{b}")
            rows["answer"].append(str(a + b + 1 if (a, b) in wrong else a + b))
            rows["demonstration"].append(str(teacher(a, b, rng) if teacher else a + b))
            rows["expert"].append(str(a + b))
            rows["slice"].append("carry" if has_carry(a, b) else "no_carry")
    test = {
        "question": [f"{a}+{b}" for a, b in test_pairs],
        "answer": [str(a + b) for a, b in test_pairs],
        "demonstration": [str(a + b) for a, b in test_pairs],
        "expert": [str(a + b) for a, b in test_pairs],
        "slice": ["carry" if has_carry(a, b) else "no_carry" for a, b in test_pairs],
    }
    if not carry_slices:
        del rows["slice"], test["slice"]
    return Task(name, Dataset.from_dict(rows), Dataset.from_dict(test), verifier="number", max_new_tokens=6,
                has_expert=True, slices=("carry", "no_carry") if carry_slices else ())


# ---------------------------------------------------------------------------------------
# Countdown: many right answers per prompt (reach the target with each number once)
# ---------------------------------------------------------------------------------------


def random_countdown_problem(
    rng: random.Random, size: int, max_number: int = 20, max_target: int = 99
) -> tuple[list[int], int, str]:
    """Draw numbers, combine them in a random order with random + - *; return (numbers, value, expression).

    Built forwards, so the expression is a right answer by construction and no search is
    needed (a brute-force solver over 4 numbers costs milliseconds a problem; this,
    microseconds, which keeps 40k problems under 2 s). Subtraction keeps the larger operand
    first (no negative steps), a product above max_target becomes + or - (most would
    overshoot every target), and brackets appear only where precedence needs them:
    >>> random_countdown_problem(random.Random(3), 4)
    ([8, 19, 18, 5], 40, '18-5+8+19')
    """
    numbers = [rng.randint(1, max_number) for _ in range(size)]
    items = [(n, str(n), "") for n in numbers]  # (value, expression, its outermost operator)
    while len(items) > 1:
        (x, ex, ox) = items.pop(rng.randrange(len(items)))
        (y, ey, oy) = items.pop(rng.randrange(len(items)))
        op = rng.choice("+-*")
        if op == "*" and x * y > max_target:  # most products of 2-digit numbers would overshoot
            op = rng.choice("+-")
        if op == "+":
            combined = (x + y, f"{ex}+{ey}", "+")
        elif op == "-":
            if x < y:
                (x, ex, ox), (y, ey, oy) = (y, ey, oy), (x, ex, ox)
            combined = (x - y, f"{ex}-({ey})" if oy in ("+", "-") else f"{ex}-{ey}", "-")
        else:
            ex, ey = (f"({e})" if o in ("+", "-") else e for e, o in ((ex, ox), (ey, oy)))
            combined = (x * y, f"{ex}*{ey}", "*")
        items.append(combined)
    return numbers, items[0][0], items[0][1]


def make_countdown_task(
    seed: int = 0, num_train: int = 40_000, num_test: int = 500, frac_three: float = 0.25, max_target: int = 99
) -> Task:
    """Countdown: reach the target using each given number once, with + - * (the verifier also takes /).

    "14 2 9 17->38": "14+9+17-2" and "(17+9)*2-14" are both right (any expression that uses
    exactly these numbers and equals 38 is); "14+9+17" is wrong (2 unused).

    Why it is built this way:
    - 3 or 4 numbers in 1..20, targets 1..max_target: ~90k distinct problems (as a multiset of
      numbers and a target) against the old 1,181 (3 numbers in 1..9, targets to 30). SFT
      runs ~150k demonstrations, so each training problem is seen ~4 times: too few to
      memorise, which a 0.5M model did to the old 4,000 prompts (0.98 sampled accuracy on
      them at the first RL step vs 0.76 held out, and then GRPO had no signal left).
    - Held out means unseen: train and test share no problem, up to the order of the
      numbers (the old split shared 282 of its 300 test problems with train, reordered).
      The test split is the first num_test distinct problems drawn from Random(seed), so
      it depends on the seed only, not on num_train.
    - One demonstration per problem, the random expression it was built from: the teacher
      is right but shows one of many answers, so the SFT model samples several (room for
      pass@k) and a verifier, not a string match, must judge them.
    - The `slice` column ("3_numbers" / "4_numbers") splits evaluation by difficulty.
    """
    rng = random.Random(seed)
    seen, splits = set(), []
    for size in (num_test, num_train):
        rows = {"question": [], "answer": [], "demonstration": [], "slice": []}
        while len(rows["question"]) < size:
            count = 3 if rng.random() < frac_three else 4  # drawn first, so both splits mix alike
            numbers, target, expression = random_countdown_problem(rng, count, max_target=max_target)
            key = (tuple(sorted(numbers)), target)
            while not 1 <= target <= max_target or key in seen:
                numbers, target, expression = random_countdown_problem(rng, count, max_target=max_target)
                key = (tuple(sorted(numbers)), target)
            seen.add(key)
            question = f"{' '.join(map(str, numbers))}->{target}"
            rows["question"].append(question)
            rows["answer"].append(question)  # the verifier re-checks numbers and target
            rows["demonstration"].append(expression)
            rows["slice"].append(f"{len(numbers)}_numbers")
        splits.append(Dataset.from_dict(rows))
    test, train = splits
    return Task("countdown", train, test, verifier="countdown", max_new_tokens=20, slices=("3_numbers", "4_numbers"))


# ---------------------------------------------------------------------------------------
# Countdown written as steps: a reasoning task whose completions have forks and forced tokens
# ---------------------------------------------------------------------------------------


def countdown_steps_solution(rng: random.Random, numbers: list[int], max_product: int = 99,
                             ops: str = "+-*") -> list[str]:
    """One random way to combine all the numbers, as steps "a+b=c (rest)": two available numbers at a time
    (given or earlier results, each used once), an operator among + - *, the result back in the pool,
    and the pool that is left, in order (the given numbers not used yet, then the results). The last
    result is the target. Subtraction keeps the larger operand first and never makes 0; a product above
    max_product becomes + or -.
    >>> countdown_steps_solution(random.Random(3), [8, 19, 18, 5])
    ['19*5=95 (8 18 95)', '95-8=87 (18 87)', '87-18=69']
    """
    pool, steps = list(numbers), []
    while len(pool) > 1:
        x = pool.pop(rng.randrange(len(pool)))
        y = pool.pop(rng.randrange(len(pool)))
        op = rng.choice(ops)
        if op == "*" and x * y > max_product:
            op = rng.choice("+-")
        if op == "-" and x == y:
            op = "+"
        if op == "-" and x < y:
            x, y = y, x
        z = x + y if op == "+" else x - y if op == "-" else x * y
        pool.append(z)
        steps.append(f"{x}{op}{y}={z}" + (f" ({' '.join(map(str, pool))})" if len(pool) > 1 else ""))
    return steps


def make_countdown_steps_task(seed: int = 0, num_train: int = 16_000, num_test: int = 500, sizes=(3,),
                              max_number: int = 25, max_target: int = 99, partial_credit: bool = False,
                              wrong_reference_frac: float = 0.0, ops: str = "+-*", verifier: str = "countdown_steps",
                              min_largest: int = 1, name: str = "countdown_steps") -> Task:
    """Countdown written as steps, the reasoning task of the token-level phenomena (docs/phenomena.md).

    "14 2 9 17->38": "14+9=23 (2 17 23) 23+17=40 (2 40) 40-2=38" is right (each step checks, and so
    does the pool it leaves, every number is used once, the last result is the target);
    "14+9=23 (2 17 23) 23+2=25 (17 25) 25+17=42" is wrong (42).

    Why it is built this way:
    - A few tokens decide and the rest follow: which two numbers to combine and with which
      operator is a fork (many continuations are right); each "=c" is forced by the arithmetic,
      and so is the pool left after the step, "(2 17 23)", which the model writes out as a
      scratchpad (the state a step-by-step solution carries).
      So entropy sits on few tokens, as in the long chains of thought the article's token-level
      lessons are about (forking tokens, covariance, which tokens a loss pushes up or down).
    - The teacher is right but shows one of many paths (a random one), so the SFT model samples
      several: pass@1 is well below pass@k, and RL has headroom a verifier can reward.
    - Three numbers from 1..25 (two steps, ~23 tokens): with four numbers from 1..15 the tiny model
      plans a path to the target too rarely (SFT pass@1 0.11) for 100 GRPO steps to move it (0.11,
      0.16, 0.11 over 3 seeds; a half-three mix: flat at 0.13). `sizes` picks the counts (half each,
      in a `slice` column when there are several): an out-of-distribution test with one more number.
      There are ~21,000 distinct three-number problems: num_train stays below that.
    - Held out means unseen: train and test share no problem (numbers as a multiset, and the
      target); the test split is the first num_test problems drawn from Random(seed), so every
      run, whatever its --seed, is evaluated on the same problems.
    - `partial_credit` (task countdown_steps_partial): the training reward is the fraction of the
      steps that check (the article's "pass rate of the test cases" reward); evaluation still
      counts only fully right completions.
    - `wrong_reference_frac` > 0 (tasks countdown_steps_wrongref5/20): that share of the training
      problems gets a wrong reference target (target + 1; the prompt still shows the true one), the
      dirty labels of "rl与sft"; `expert` keeps the clean demonstration, and the test split is clean.
    - `ops` = "+-" with verifier countdown_steps_nomul (task countdown_steps_nomul): a "don't" nobody
      states. The teacher never multiplies and the prompt does not say so; a product is a violation
      (a completion with "*" is not correct, reason `forbidden`). Shifted tests for what training
      never showed: countdown_steps_4numbers (one more number), countdown_steps_to40 (numbers to 40,
      at least one of them above 25 by `min_largest`: no problem of it is a training problem).
    """
    rng, corrupt = random.Random(seed), random.Random(seed + 2)
    seen, splits = set(), []
    for is_train, count in ((False, num_test), (True, num_train)):
        rows = {"question": [], "answer": [], "demonstration": [], "expert": [], "slice": []}
        for attempt in itertools.count():
            if len(rows["question"]) == count:
                break
            if attempt > 50 * count:  # the problem space ran out: say so instead of looping forever
                raise ValueError(f"task {name}: only {len(seen)} distinct problems found; lower num_train/num_test")
            numbers = [rng.randint(1, max_number) for _ in range(rng.choice(sizes))]
            steps = countdown_steps_solution(rng, numbers, ops=ops)
            target = int(steps[-1].split("=")[1])  # the last step leaves no pool to list
            key = (tuple(sorted(numbers)), target)
            if not 1 <= target <= max_target or key in seen or max(numbers) < min_largest:
                continue
            seen.add(key)
            question = f"{' '.join(map(str, numbers))}->{target}"
            rows["question"].append(question)
            wrong = is_train and corrupt.random() < wrong_reference_frac
            # the verifier re-checks every step against the numbers and the target of the answer
            rows["answer"].append(f"{' '.join(map(str, numbers))}->{target + 1}" if wrong else question)
            rows["demonstration"].append(" ".join(steps))
            rows["expert"].append(" ".join(steps))
            rows["slice"].append(f"{len(numbers)}_numbers")
        if len(sizes) == 1:
            del rows["slice"]
        splits.append(Dataset.from_dict(rows))
    test, train = splits
    return Task(name, train, test, verifier=verifier, max_new_tokens=56, partial_credit=partial_credit,
                slices=tuple(f"{n}_numbers" for n in sizes) if len(sizes) > 1 else (), has_expert=True)


# ---------------------------------------------------------------------------------------
# A tool task: multi-digit products the tiny model cannot compute, a `calc` tool that can
# ---------------------------------------------------------------------------------------


def make_tool_task(seed: int = 0, num_mul: int = 1000, demos_per_question: int = 8, num_test: int = 500,
                   p_call: float = 0.3, max_turns: int = 3) -> Task:
    """`tool_calc`: "37*48+5" (slice `mul`) and "64+7" (slice `add`), with a `calc` tool.

    A demonstration either calls the tool and copies its answer, "[37*48+5]{1781}1781", or answers
    directly. Why it is built this way:
    - On `mul` (a 2-digit product plus a digit) the tiny model cannot do the arithmetic, and the teacher
      cannot either: when it does not call (probability 1 - p_call) it *guesses*, the right leading
      digits with the last two random (wrong by construction). So SFT learns to call about p_call of
      the time and is right about that often; the tool makes every call right, so RL has a clear signal
      to call whenever it can.
    - On `add` (2-digit + 1-digit) the model can add by itself and the teacher does (right without the
      tool), calling it with the same p_call. Here a call buys nothing and costs nothing (the reward has
      no price for a call), so RL has no reason to change the call rate: the control slice.
    - `{1781}` is the environment's text: in a demonstration it is not the demonstrator's (SFT masks it,
      as RL does), and the verifier judges only what follows the last observation (the tool's numbers are
      never the answer).
    - 1,000 of the 72,900 `mul` questions train and all 810 `add` ones, 8 demonstrations each (each calls
      or not on its own draw), so RL's prompts are about half each: a slice RL rarely samples teaches it
      little. The `add` questions are too few to hold out unseen ones, so `add` test questions are seen in
      training: it is the control, not the measure; `mul` test questions are unseen. The test split
      alternates the slices, so its first rows hold both.
    """
    rng = random.Random(seed)
    mul = [(a, b, c) for a in range(10, 100) for b in range(10, 100) for c in range(1, 10)]
    rng.shuffle(mul)
    add = [(a, b) for a in range(10, 100) for b in range(1, 10)]
    rng.shuffle(add)

    def demonstration(question: str, value: int, can_compute: bool) -> str:
        if rng.random() < p_call:
            return f"[{question}]{{{value}}}{value}"
        if can_compute:
            return str(value)
        return str(value // 100 * 100 + rng.choice([d for d in range(100) if d != value % 100]))  # a guess

    train = {"question": [], "answer": [], "demonstration": [], "expert": [], "slice": []}
    for a, b, c in mul[num_test // 2: num_test // 2 + num_mul]:
        for _ in range(demos_per_question):
            q, v = f"{a}*{b}+{c}", a * b + c
            train["question"].append(q), train["answer"].append(str(v)), train["slice"].append("mul")
            train["demonstration"].append(demonstration(q, v, False)), train["expert"].append(f"[{q}]{{{v}}}{v}")
    for a, b in add:
        for _ in range(demos_per_question):
            q, v = f"{a}+{b}", a + b
            train["question"].append(q), train["answer"].append(str(v)), train["slice"].append("add")
            train["demonstration"].append(demonstration(q, v, True)), train["expert"].append(str(v))
    test = {"question": [], "answer": [], "demonstration": [], "expert": [], "slice": []}
    for i in range(num_test):
        if i % 2 == 0:
            a, b, c = mul[i // 2]
            q, v, name, expert = f"{a}*{b}+{c}", a * b + c, "mul", f"[{a}*{b}+{c}]{{{a * b + c}}}{a * b + c}"
        else:
            a, b = add[(i // 2) % len(add)]
            q, v, name, expert = f"{a}+{b}", a + b, "add", str(a + b)
        test["question"].append(q), test["answer"].append(str(v)), test["slice"].append(name)
        test["demonstration"].append(expert), test["expert"].append(expert)
    return Task("tool_calc", Dataset.from_dict(train), Dataset.from_dict(test), verifier="number", max_new_tokens=32,
                has_expert=True, slices=("mul", "add"), environment=ToolEnvironment(tool=calc, max_turns=max_turns))


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
        "add_carry_noisy", lambda a, b, rng: drop_carry_teacher(a, b, 0.8, rng), seed, carry_slices=True
    ),
    # The teacher never carries: the SFT model cannot sample a right carry answer (pass@64 ~ 0
    # there), so RL alone gets no reward on that slice; the `expert` column is the way in.
    "add_carry_always_wrong": lambda seed: make_addition_task(
        "add_carry_always_wrong", lambda a, b, rng: drop_carry_teacher(a, b, 1.0, rng), seed, carry_slices=True
    ),
    # add_noisy with 5% / 20% of the training questions' reference answers wrong (a + b + 1)
    "add_noisy_wrongref5": lambda seed: make_addition_task(
        "add_noisy_wrongref5", lambda a, b, rng: off_by_one_teacher(a, b, 0.4, rng), seed, wrong_reference_frac=0.05
    ),
    "add_noisy_wrongref20": lambda seed: make_addition_task(
        "add_noisy_wrongref20", lambda a, b, rng: off_by_one_teacher(a, b, 0.4, rng), seed, wrong_reference_frac=0.2
    ),
    "add": lambda seed: make_addition_task("add", None, seed),
    "countdown": make_countdown_task,
    "countdown_steps": make_countdown_steps_task,
    "countdown_steps_wrongref5": lambda seed: make_countdown_steps_task(seed, wrong_reference_frac=0.05,
                                                                        name="countdown_steps_wrongref5"),
    "countdown_steps_wrongref20": lambda seed: make_countdown_steps_task(seed, wrong_reference_frac=0.2,
                                                                         name="countdown_steps_wrongref20"),
    "countdown_steps_nomul": lambda seed: make_countdown_steps_task(seed, num_train=8000, ops="+-",  # ~11k exist
                                                                    verifier="countdown_steps_nomul",
                                                                    name="countdown_steps_nomul"),
    "countdown_steps_4numbers": lambda seed: make_countdown_steps_task(seed, num_train=2000, sizes=(4,),
                                                                       name="countdown_steps_4numbers"),
    "countdown_steps_to40": lambda seed: make_countdown_steps_task(seed, num_train=2000, max_number=40, min_largest=26,
                                                                   name="countdown_steps_to40"),
    "countdown_steps_partial": lambda seed: make_countdown_steps_task(seed, partial_credit=True,
                                                                      name="countdown_steps_partial"),
    "tool_calc": make_tool_task,
    "gsm8k": make_gsm8k_task,
}
DEFAULT_TASK = "add_noisy"


def load_task(name: str, seed: int = 0, max_turns: int = 0, call_cost: float = 0.0) -> Task:
    """The task called `name`; an unknown name exits with the list of known ones.
    A tool task's flags: max_turns > 0 (--max-turns) replaces its own turn limit, call_cost (--tool-call-cost) is
    the reward's price per tool call; a task without a tool refuses both."""
    if name not in TASKS:
        raise SystemExit(f"error: --task {name}: unknown task; choose one of {', '.join(TASKS)}.")
    task = TASKS[name](seed)
    for flag, value in (("--max-turns", max_turns), ("--tool-call-cost", call_cost)):
        if value and task.environment is None:
            raise SystemExit(f"error: {flag} {value}: task {name} has no tool, so every completion is one turn; "
                             f"drop {flag} or pick a tool task (tool_calc)")
    if task.environment is not None:
        task.environment.max_turns = max_turns or task.environment.max_turns
        task.environment.call_cost = call_cost
    return task


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
    completion_ids = pad_right(completion_tokens, tokenizer.pad_token_id)  # (B, C)
    completion_mask = pad_right([[1] * len(t) for t in completion_tokens])  # (B, C)
    return enc["input_ids"], enc["attention_mask"], completion_ids, completion_mask
