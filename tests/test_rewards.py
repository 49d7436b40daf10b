"""common/rewards.py: hand-checked cases, then fuzzing for "never raises, always in range"."""

import math
import re
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.rewards import (
    check_countdown_steps,
    countdown_steps_fraction,
    countdown_steps_verifier,
    REASONS,
    VERIFIERS,
    countdown_verifier,
    extract_answer,
    format_reward,
    math_verifier,
    number_verifier,
    parse_number,
    score_completions,
    score_rows,
)

# ---------------------------------------------------------------------------------------
# parse_number / extract_answer
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1,234", 1234.0),
        ("96%", 96.0),
        ("$4.50", 4.5),
        ("3/4", 0.75),
        ("\\frac{3}{4}", 0.75),
        ("\\dfrac{3}{4}", 0.75),
        ("-7", -7.0),
        (".5", 0.5),
        ("  42 ", 42.0),
        ("12 dollars", 12.0),
        ("abc", None),
        ("", None),
        ("1/0", None),
        ("1.2.3", None),
        ("4" * 500, None),  # 500 digits: noise, not an answer (and float() of it would overflow)
    ],
)
def test_parse_number(text, expected):
    got = parse_number(text)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected, rel=1e-12)


def test_parse_number_judges_the_whole_text_not_a_prefix():
    # "18 <spaces> abc" is not a number whatever the amount of whitespace; cutting the text to
    # 200 characters *before* parsing drops the "abc" and turns it into 18.
    assert parse_number("18 abc") is None
    assert parse_number("18" + " " * 250 + "abc") is None
    assert number_verifier("\\boxed{18" + " " * 250 + "abc}", "18") != (1.0, "correct")


def test_parse_number_rejects_non_strings():
    assert parse_number(None) is None
    assert parse_number(12) is None


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so the answer is \\boxed{\\frac{3}{4}}.", "\\frac{3}{4}"),  # nested braces
        ("\\boxed{1} no, \\boxed{{2}+{3}} final", "{2}+{3}"),  # the last box, nested braces
        ("We get 48/2 = 24 cookies.\n#### 72", "72"),
        ("first 3, then 5 and finally -12.5 apples", "-12.5"),  # the last number
        ("no numbers here", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


# ---------------------------------------------------------------------------------------
# number_verifier / math_verifier
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "completion, answer, expected",
    [
        ("57", "57", (1.0, "correct")),
        ("56", "57", (0.0, "wrong")),
        ("I think 12 + 45 = 57", "57", (1.0, "correct")),
        ("0.75", "3/4", (1.0, "correct")),
        ("", "57", (0.0, "no_answer")),
        ("   \n", "57", (0.0, "no_answer")),
        ("no digits", "57", (0.0, "no_answer")),
        ("\\boxed{x+1}", "57", (0.0, "malformed")),
    ],
)
def test_number_verifier(completion, answer, expected):
    assert number_verifier(completion, answer) == expected


@pytest.mark.parametrize(
    "completion, answer, expected",
    [
        ("Natalia sold 48/2 = 24 clips in May, 48 + 24 = 72 in total, so she has \\boxed{18}.", "18", (1.0, "correct")),
        ("She pays 3 * 6 = 18, so she has \\boxed{17}.", "18", (0.0, "wrong")),
        ("The answer is 1,234 dollars", "1234", (1.0, "correct")),
        ("He earns $4.50 an hour.\n#### 4.5", "4.5", (1.0, "correct")),
        ("The fraction is \\boxed{\\frac{3}{4}}", "0.75", (1.0, "correct")),
        ("I don't know.", "18", (0.0, "no_answer")),
    ],
)
def test_math_verifier_gsm8k_style(completion, answer, expected):
    assert math_verifier(completion, answer) == expected


# ---------------------------------------------------------------------------------------
# countdown_verifier
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "completion, answer, expected",
    [
        ("3*(4+5)", "3 4 5->27", (1.0, "correct")),
        ("(5+4)*3\nbecause 9*3 = 27", "3 4 5->27", (1.0, "correct")),  # only the first line counts
        ("8/(4-2)", "2 4 8->4", (1.0, "correct")),
        ("3+4+5", "3 4 5->27", (0.0, "wrong")),  # right numbers, wrong value
        ("3*9", "3 4 5->27", (0.0, "wrong")),  # wrong number set
        ("3*(4+5)+4", "3 4 5->31", (0.0, "wrong")),  # uses 4 twice
        ("3*4", "3 4 5->12", (0.0, "wrong")),  # leaves out 5
        ("__import__('os')", "3 4 5->27", (0.0, "malformed")),  # not arithmetic
        ("print(3+4+5)", "3 4 5->12", (0.0, "malformed")),
        ("4/(3-3)", "3 3 4->4", (0.0, "malformed")),  # division by zero
        ("3+4+", "3 4->7", (0.0, "malformed")),  # syntax error
        ("", "3 4 5->27", (0.0, "no_answer")),
        ("3*(4+5)", "not an answer", (0.0, "malformed")),  # broken reference does not crash
    ],
)
def test_countdown_verifier(completion, answer, expected):
    assert countdown_verifier(completion, answer) == expected


def test_countdown_verifier_judges_the_whole_line_not_a_prefix():
    # The full line is 1+2+3+99 = 105: it uses a number that was not given and misses the target.
    # Cutting the line to 100 characters before checking it hides the "+ 99" and pays 1.0.
    line = "1+2+3" + " " * 95 + "+ 99"
    assert countdown_verifier("1+2+3 + 99", "1 2 3->6") == (0.0, "wrong")
    assert countdown_verifier(line, "1 2 3->6") != (1.0, "correct")


@pytest.mark.parametrize("completion, answer", [("9**9**9", "9 9 9->81"), ("2**10**10**10", "2 10 10 10->4")])
def test_countdown_verifier_rejects_exponents_quickly(completion, answer):
    start = time.perf_counter()
    assert countdown_verifier(completion, answer) == (0.0, "malformed")
    assert time.perf_counter() - start < 0.5


# ---------------------------------------------------------------------------------------
# DAPO's overlong shaping (eq. 13, grpo.overlong_shaping) at its boundary points
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "length, expected",
    # L_max = 100, L_cache = 20: free up to 80, linear from 0 to -1 over (80, 100], -1 beyond.
    [(0, 0.0), (80, 0.0), (81, -1 / 20), (90, -0.5), (99, -19 / 20), (100, -1.0), (101, -1.0), (1000, -1.0)],
)
def test_overlong_shaping(length, expected):
    from types import SimpleNamespace

    import torch

    from grpo import overlong_shaping

    rollout = SimpleNamespace(completion_lengths=torch.tensor([length]), rewards=torch.tensor([1.0]), reward_terms={})
    shaped = overlong_shaping(rollout, max_new_tokens=100, cache_len=20)
    assert shaped.reward_terms["overlong"].item() == pytest.approx(expected, abs=1e-6)
    assert shaped.rewards.item() == pytest.approx(1.0 + expected, abs=1e-6)


# ---------------------------------------------------------------------------------------
# score_completions
# ---------------------------------------------------------------------------------------


def test_score_completions_adds_format_and_counts_reasons():
    completions = ["\\boxed{57}", "57", "\\boxed{56}", "hmm", "\\boxed{x}"]
    answers = ["57"] * 5
    eos = [True, False, True, True, True]
    rewards, terms, reasons = score_completions("number", completions, answers, eos, format_weight=0.25)
    # correct: 1, 1, 0, 0, 0; format (EOS and an answer was extracted): 1, 0, 1, 0, 1
    assert terms["correct"] == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert terms["format"] == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert rewards == pytest.approx([1.25, 1.0, 0.25, 0.0, 0.25])
    assert dict(reasons) == {"correct": 2, "wrong": 1, "no_answer": 1, "malformed": 1}

    rewards0, _, _ = score_completions("number", completions, answers, eos)  # default weight 0
    assert rewards0 == [1.0, 1.0, 0.0, 0.0, 0.0]


# ---------------------------------------------------------------------------------------
# fuzzing: every verifier takes any text and neither raises nor leaves [0, 1]
# ---------------------------------------------------------------------------------------

FRAGMENTS = [
    "\\boxed{",
    "\\boxed{}",
    "{",
    "}",
    "####",
    "</think>",
    "<think>",
    "\\frac{",
    "\\dfrac{3}{4}",
    "->",
    "0",
    "7",
    "42",
    "1,234",
    "-",
    ".",
    ",",
    "/",
    "%",
    "$",
    "\\$",
    "+",
    "*",
    "**",
    "(",
    ")",
    " ",
    "\n",
    "1/0",
    "9**9**9",
    "__import__('os')",
    "1e309",
    "nan",
    "inf",
    "dollars",
    "\\!",
    "é",
    "٣",
    "３",
    "𝟗",
    "½",
    "²",
    "\x00",
    "\u202e",
    "∞",
    "😀",
    "9" * 120,
]
fragment = st.sampled_from(FRAGMENTS) | st.text(max_size=8)
mixed = st.lists(fragment, max_size=40).map("".join)
long_text = st.tuples(mixed, st.integers(1, 5000)).map(lambda t: (t[0] * t[1])[:20_000])
texts = st.text() | mixed | long_text
answers = (
    texts
    | st.integers(-(10**6), 10**6).map(str)
    | st.lists(st.integers(1, 9), min_size=1, max_size=4).map(lambda ns: " ".join(map(str, ns)) + "->24")
)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def check_verdict(verdict):
    score, reason = verdict
    assert isinstance(score, float) and 0.0 <= score <= 1.0 and not math.isnan(score)
    assert reason in REASONS


@pytest.mark.parametrize("name", sorted(VERIFIERS))
@FUZZ
@given(completion=texts, answer=answers)
def test_verifiers_never_raise_on_any_text(name, completion, answer):
    check_verdict(VERIFIERS[name](completion, answer))


@pytest.mark.parametrize("name", sorted(VERIFIERS))
def test_verifiers_take_a_missing_completion(name):
    answer = "3 4 5->27" if name.startswith("countdown") else "27"
    assert VERIFIERS[name](None, answer) == (0.0, "no_answer")


@pytest.mark.parametrize("name", sorted(VERIFIERS))
@FUZZ
@given(completion=st.text())
def test_verifiers_never_raise_on_plain_text_with_a_valid_answer(name, completion):
    answer = "3 4 5->27" if name.startswith("countdown") else "27"
    check_verdict(VERIFIERS[name](completion, answer))


@pytest.mark.parametrize("name", sorted(VERIFIERS))
@FUZZ
@given(data=st.lists(st.tuples(texts, answers, st.booleans()), max_size=5), weight=st.floats(0, 1))
def test_score_completions_never_raises(name, data, weight):
    completions, answers_, eos = (list(c) for c in zip(*data)) if data else ([], [], [])
    rewards, terms, reasons = score_completions(name, completions, answers_, eos, format_weight=weight)
    assert len(rewards) == len(terms["correct"]) == len(terms["format"]) == len(completions)
    assert sum(reasons.values()) == len(completions) and set(reasons) <= set(REASONS)
    for r, c, f in zip(rewards, terms["correct"], terms["format"]):
        assert 0.0 <= c <= 1.0 and f in (0.0, 1.0)
        assert r == pytest.approx(c + weight * f)


def countdown_case(parts):
    """A completion built from numbers and operators, and an answer naming exactly its numbers, so
    that the fuzzed text gets past the number-set check into parsing and evaluation."""
    expression = "".join(parts)
    numbers = re.findall(r"\d+", expression)
    return expression, " ".join(numbers or ["1"]) + "->24"


arithmetic = st.lists(
    st.sampled_from(["(", ")", "+", "-", "*", "/", "**", " ", "0", "00"]) | st.integers(0, 10**12).map(str),
    min_size=1,
    max_size=60,
).map(countdown_case)


@FUZZ
@given(case=arithmetic)
def test_countdown_verifier_never_raises_on_arithmetic_lookalikes(case):
    completion, answer = case
    start = time.perf_counter()
    check_verdict(countdown_verifier(completion, answer))
    assert time.perf_counter() - start < 0.5


# ---------------------------------------------------------------------------------------
# format_reward
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "completion, eos, expected",
    [
        ("so \\boxed{17}", True, 1.0),
        ("the answer is 17", True, 1.0),
        ("so \\boxed{17}", False, 0.0),  # truncated: did not stop by itself
        ("no answer here", True, 0.0),
        # An empty box or an empty "####" commits to nothing: the verifier calls them malformed,
        # and giving them format credit would pay the policy for a bare "\boxed{}".
        ("so \\boxed{}", True, 0.0),
        ("reasoning\n####", True, 0.0),
        ("reasoning\n#### \n", True, 0.0),
    ],
)
def test_format_reward(completion, eos, expected):
    assert format_reward(completion, eos) == expected


# ---- countdown_steps: every step checked, partial credit ---------------------------------------

@pytest.mark.parametrize("completion, expected", [
    ("14+9=23 23+17=40 40-2=38", "correct"),
    ("17-2=15 14+9=23 23+15=38", "correct"),       # another path: one of many right answers
    ("14+9=23 23+17=40 40+2=42", "wrong"),         # every step checks, the target does not
    ("14+9=23 23+17=41 41-3=38", "wrong"),         # wrong arithmetic, then a number never given
    ("14+14=28 28+9=37 37+1=38", "wrong"),         # 14 used twice, 17 and 2 never
    ("14+9=23 23+17=40", "wrong"),                 # 2 unused
    ("14+9=23 23+17=40 40-2=38 38+0=38", "wrong"),  # a step too many (0 was never given)
    ("14+9=23 (2 17 23) 23+17=40 (2 40) 40-2=38", "correct"),  # the pool each step leaves, as the teacher writes
    ("14+9=23 (2 23 17) 23+17=40 (40 2) 40-2=38", "correct"),  # in any order
    ("14+9=23 (2 17 24) 23+17=40 (2 40) 40-2=38", "wrong"),    # a pool that is not what is left
    ("14 + 9 = 23", "malformed"),
    ("", "no_answer"),
])
def test_countdown_steps_verifier_checks_every_step(completion, expected):
    score, reason = countdown_steps_verifier(completion, "14 2 9 17->38")
    assert reason == expected and score == float(expected == "correct")


def test_countdown_steps_partial_credit_is_the_pass_rate_of_steps_and_target():
    answer = "14 2 9 17->38"
    assert countdown_steps_fraction("14+9=23 23+17=40 40-2=38", answer) == 1.0
    assert countdown_steps_fraction("14+9=23 23+17=40 40+2=42", answer) == 3 / 4  # 3 steps check, target missed
    assert countdown_steps_fraction("14+9=23 23+17=41 41-2=39", answer) == 1 / 4  # only the first step checks
    assert countdown_steps_fraction("nonsense", answer) == 0.0
    # a wrong completion never earns full credit, however many steps check
    assert countdown_steps_fraction("14+9=23 23+17=40 40-2=38 1+1=2", answer) < 1


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="0123456789+-*= \n/()x", max_size=80), st.text(max_size=20))
def test_countdown_steps_never_raises(completion, answer):
    score, reason = countdown_steps_verifier(completion, answer)
    assert 0 <= score <= 1 and reason in REASONS
    assert 0 <= countdown_steps_fraction(completion, answer) <= 1
    checked, steps, _ = check_countdown_steps(completion, answer)
    assert 0 <= checked <= steps


def test_partial_credit_replaces_correctness_in_the_reward_only():
    completions, answers = ["14+9=23 23+17=40 40+2=42", "14+9=23 23+17=40 40-2=38"], ["14 2 9 17->38"] * 2
    rewards, terms, _ = score_rows("countdown_steps", completions, answers, [True, True], partial_credit=True)
    assert rewards == [0.75, 1.0] and terms["correct"] == [0.0, 1.0] and terms["partial"] == [0.75, 1.0]
    rewards, terms, _ = score_rows("countdown_steps", completions, answers, [True, True])
    assert rewards == [0.0, 1.0] and "partial" not in terms


def test_countdown_steps_nomul_counts_a_product_as_a_violation_not_as_right():
    from common.rewards import countdown_steps_nomul_verifier

    assert countdown_steps_nomul_verifier("9+3=12 (2 12) 12+2=14", "9 3 2->14") == (1.0, "correct")
    assert countdown_steps_nomul_verifier("9*3=27 (2 27) 27+2=29", "9 3 2->29") == (0.0, "forbidden")  # right, but *
    assert countdown_steps_nomul_verifier("9*3=27 (2 27) 27+2=30", "9 3 2->29") == (0.0, "wrong")  # wrong anyway
    assert countdown_steps_nomul_verifier(None, "9 3 2->29")[0] == 0.0
