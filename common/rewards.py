"""Verifiable rewards. Every function here takes model output and never raises.

A verifier returns `(score, reason)`: score in [0, 1], reason one of REASONS, so a run can
log *why* completions got nothing (no answer at all vs. a wrong one vs. malformed text).
Format and length terms are separate functions with separate weights, logged separately
(docs/spec.md §6).

Answer equivalence is the hard part: "1,234" == "1234", "96%" == "96", "$4.50" == "4.5",
"3/4" == "0.75". Numbers are normalised and compared with a relative tolerance; for math,
`math-verify` is used when it is installed (it knows LaTeX, pi, sets, ...).
"""

import ast
import math
import re
from collections import Counter

REASONS = ("correct", "wrong", "no_answer", "malformed", "forbidden")
MAX_TEXT = 10_000  # longer model output is cut before parsing: regexes stay linear and fast
MAX_DIGITS = 100  # a "number" with more digits than this is not an answer, it is noise

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+(?:\.\d+)?)?|-?\.\d+")


def parse_number(text: str) -> float | None:
    """Parse one number, forgiving the ways people write them; None if it is not one.

    >>> parse_number("1,234"), parse_number("96%"), parse_number("$4.50"), parse_number("3/4")
    (1234.0, 96.0, 4.5, 0.75)
    """
    if not isinstance(text, str) or len(text) > 200:  # judge the whole text, never a prefix
        return None
    s = text.strip()
    s = re.sub(r"^\\?\$|\\?%$|%$|\s*(dollars?|cents?|units?)$", "", s).strip()
    s = s.replace("\\!", "").replace("{,}", "").replace(",", "").replace(" ", "")
    frac = re.fullmatch(r"\\[dt]?frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}", s)
    if frac:
        s = f"{frac.group(1)}/{frac.group(2)}"
    if len(s) > MAX_DIGITS or not re.fullmatch(r"-?(\d+(\.\d*)?|\.\d+)(/-?(\d+(\.\d*)?|\.\d+))?", s):
        return None
    try:
        if "/" in s:
            num, den = s.split("/")
            return float(num) / float(den) if float(den) != 0 else None
        value = float(s)
    except (ValueError, OverflowError, ZeroDivisionError):
        return None
    return value if math.isfinite(value) else None


def numbers_equal(a: float, b: float, rel_tol: float = 1e-6) -> bool:
    return math.isclose(a, b, rel_tol=rel_tol, abs_tol=1e-9)


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} with balanced braces; None if absent or unbalanced."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed{") - 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None


def extract_answer(text: str) -> str | None:
    """The final answer a completion commits to: \\boxed{}, else after '####', else the last number."""
    text = text[-MAX_TEXT:]
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    if "####" in text:
        return text.rsplit("####", 1)[1].strip().split("\n")[0]
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def number_verifier(completion: str, answer: str) -> tuple[float, str]:
    """The completion's final number equals the reference number (the arithmetic tasks)."""
    if not isinstance(completion, str) or not completion.strip():
        return 0.0, "no_answer"
    found = extract_answer(completion)
    if found is None:
        return 0.0, "no_answer"
    value, ref = parse_number(found), parse_number(answer)
    if value is None or ref is None:
        return 0.0, "malformed"
    return (1.0, "correct") if numbers_equal(value, ref) else (0.0, "wrong")


def math_verifier(completion: str, answer: str) -> tuple[float, str]:
    """GSM8K/MATH: numeric comparison first; math-verify (if installed) for symbolic answers."""
    score, reason = number_verifier(completion, answer)
    if reason != "malformed":
        return score, reason
    try:
        from math_verify import parse, verify  # optional dependency

        return (1.0, "correct") if verify(parse(answer), parse(completion[-MAX_TEXT:])) else (0.0, "wrong")
    except Exception:  # not installed, or it choked on the text: the numeric verdict stands
        return score, reason


def _evaluate_arithmetic(node):
    """Evaluate an AST of integers and + - * / only; anything else raises ValueError."""
    if isinstance(node, ast.Expression):
        return _evaluate_arithmetic(node.body)
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)):
        left, right = _evaluate_arithmetic(node.left), _evaluate_arithmetic(node.right)
        if isinstance(node.op, ast.Add):
            return left + right
        if isinstance(node.op, ast.Sub):
            return left - right
        if isinstance(node.op, ast.Mult):
            return left * right
        if right == 0:
            raise ValueError("division by zero")
        return left / right
    raise ValueError(f"not allowed: {type(node).__name__}")


def countdown_verifier(completion: str, answer: str) -> tuple[float, str]:
    """The completion is an expression using each given number exactly once that hits the target.

    `answer` is "a b c->target". Only digits, + - * / ( ) and spaces are allowed.
    """
    try:
        numbers_text, target_text = answer.split("->")
        numbers, target = sorted(int(n) for n in numbers_text.split()), int(target_text)
    except ValueError:
        return 0.0, "malformed"  # a broken reference is not the model's fault, but must not crash
    if not isinstance(completion, str):
        return 0.0, "no_answer"
    expression = completion.strip().split("\n")[0]
    if not expression:
        return 0.0, "no_answer"
    if len(expression) > 100:  # judged whole or not at all: a cut line could hide extra terms
        return 0.0, "malformed"
    if not re.fullmatch(r"[\d+\-*/() ]+", expression):
        return 0.0, "malformed"
    if sorted(int(n) for n in re.findall(r"\d+", expression)) != numbers:
        return 0.0, "wrong"
    try:
        value = _evaluate_arithmetic(ast.parse(expression, mode="eval"))
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return 0.0, "malformed"
    return (1.0, "correct") if abs(value - target) < 1e-9 else (0.0, "wrong")


_STEP = re.compile(r" *(\d{1,6})([+\-*])(\d{1,6})=(-?\d{1,12})(?: \((-?\d{1,12}(?: -?\d{1,12}){0,9})\))?")


def check_countdown_steps(completion: str, answer: str) -> tuple[int, int, str]:
    """Walk the steps "a+b=c (pool left)" of a completion against "n1 n2 ...->target".

    Returns (steps that check, steps: the more of taken and needed = len(numbers) - 1, reason). A step
    checks when both operands are available (given numbers or earlier results, each used once), the
    arithmetic is right and the pool it lists (optional; none after the last step) is what is left, in
    any order; its result then becomes available. Correct: every step checks, all numbers are used and
    the last result is the target.
    >>> check_countdown_steps("14+9=23 (2 17 23) 23+17=40 (2 40) 40-2=38", "14 2 9 17->38")
    (3, 3, 'correct')
    >>> check_countdown_steps("14+9=23 (2 17 23) 23+17=41 (2 41) 41-2=39", "14 2 9 17->38")
    (1, 3, 'wrong')
    """
    try:
        numbers_text, target_text = answer.split("->")
        pool, target = [int(n) for n in numbers_text.split()], int(target_text)
    except ValueError:
        return 0, 1, "malformed"  # a broken reference is not the model's fault, but must not crash
    needed = max(1, len(pool) - 1)
    if not isinstance(completion, str) or not completion.strip():
        return 0, needed, "no_answer"
    line = completion.strip().split("\n")[0]
    if len(line) > 400:  # judged whole or not at all
        return 0, needed, "malformed"
    steps, position = [], 0
    while position < len(line):
        match = _STEP.match(line, position)
        if match is None or len(steps) > 4 * needed:
            return 0, needed, "malformed"
        steps.append(match)
        position = match.end()
    checked, all_ok = 0, True
    for match in steps:
        a, op, b, c = int(match[1]), match[2], int(match[3]), int(match[4])
        value = a + b if op == "+" else a - b if op == "-" else a * b
        left = list(pool)
        available = a in left and (left.remove(a) or b in left)
        if available and value == c:
            left.remove(b)
            left.append(c)
            listed = match[5] is None or sorted(int(n) for n in match[5].split()) == sorted(left)
            if listed:
                pool = left
                checked += 1
                continue
        all_ok = False
    right = all_ok and pool == [target] and len(steps) == needed
    return checked, max(needed, len(steps)), "correct" if right else "wrong"


def countdown_steps_verifier(completion: str, answer: str) -> tuple[float, str]:
    """1 if every step checks, every number is used once and the last result is the target."""
    _, _, reason = check_countdown_steps(completion, answer)
    return (1.0, reason) if reason == "correct" else (0.0, reason)


def countdown_steps_nomul_verifier(completion: str, answer: str) -> tuple[float, str]:
    """countdown_steps with a rule the prompt never states: no product. A right chain that multiplies is `forbidden`."""
    score, reason = countdown_steps_verifier(completion, answer)
    if isinstance(completion, str) and "*" in completion.strip().split("\n")[0]:
        return 0.0, "forbidden" if reason == "correct" else reason
    return score, reason


def countdown_steps_fraction(completion: str, answer: str) -> float:
    """Partial credit, like the pass rate of a program's test cases: each step is a test case, and
    reaching the target with every number is one more. (checks + right) / (steps + 1); 1 only if right.
    >>> countdown_steps_fraction("14+9=23 23+17=40 40+2=42", "14 2 9 17->38")  # every step checks, 42 is not 38
    0.75
    """
    checked, steps, reason = check_countdown_steps(completion, answer)
    return (checked + (reason == "correct")) / (steps + 1)


VERIFIERS = {"number": number_verifier, "math": math_verifier, "countdown": countdown_verifier,
             "countdown_steps": countdown_steps_verifier, "countdown_steps_nomul": countdown_steps_nomul_verifier}
PARTIAL_CREDIT = {"countdown_steps": countdown_steps_fraction}
"""Verifiers that can also grade a completion in part (a task with partial_credit trains on it)."""


def format_reward(completion: str, ended_with_eos: bool) -> float:
    """1 if the completion stopped by itself (EOS) and committed to an answer, else 0."""
    if not isinstance(completion, str):
        return 0.0
    answer = extract_answer(completion)
    return float(ended_with_eos and answer is not None and answer.strip() != "")


def score_rows(
    verifier: str, completions: list[str], answers: list[str], ended_with_eos: list[bool], format_weight: float = 0.0,
    partial_credit: bool = False,
) -> tuple[list[float], dict[str, list[float]], list[str]]:
    """Total reward per completion = correctness + format_weight * format; with partial_credit the
    verifier's partial grade (PARTIAL_CREDIT, logged as `partial`) replaces the 0/1 correctness.

    Returns (rewards, terms, reasons), one entry per completion: `terms` holds each term, to
    log separately (`correct` is always the 0/1 verdict); `reasons` says why correctness was what
    it was (one of REASONS).
    """
    verify = VERIFIERS[verifier]
    correct, formatted, reasons = [], [], []
    for completion, answer, eos in zip(completions, answers, ended_with_eos, strict=True):
        score, reason = verify(completion, answer)
        correct.append(score)
        reasons.append(reason)
        formatted.append(format_reward(completion, eos))
    terms = {"correct": correct, "format": formatted}
    if partial_credit:
        terms["partial"] = [PARTIAL_CREDIT[verifier](c, a) for c, a in zip(completions, answers)]
    graded = terms["partial"] if partial_credit else correct
    rewards = [c + format_weight * f for c, f in zip(graded, formatted)]
    return rewards, terms, reasons


def score_completions(
    verifier: str, completions: list[str], answers: list[str], ended_with_eos: list[bool], format_weight: float = 0.0
) -> tuple[list[float], dict[str, list[float]], Counter]:
    """`score_rows` with the reasons counted: (rewards, terms, Counter of reasons)."""
    rewards, terms, reasons = score_rows(verifier, completions, answers, ended_with_eos, format_weight)
    return rewards, terms, Counter(reasons)
