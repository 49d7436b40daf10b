"""Tool use (common/environment.py and what reads its rollouts), each piece against an independent re-computation.

What this file proves, without a training run:
- `calc` is Python's own integer arithmetic on well-formed + - * ( ) expressions, and refuses everything else
  (syntax, length, size, depth) with ToolError, never another exception (fuzzed);
- `ToolEnvironment.respond` turns a bad call or a broken tool into an error observation, never an exception;
  `split` / `final_answer` cut a demonstration into policy text and observations where a rollout would;
- `rollout_with_tools`, driven by a scripted engine and the real char tokenizer: the observation reaches the
  next turn's context; completion_ids / completion_mask / policy_mask / sampler_logprobs token by token; every
  end reason and tool count; max_new_tokens bounds the whole completion; `tool_metrics` by hand; random
  scripts keep every invariant, and the rollout's policy_mask is the one SFT gives the same text;
- observation tokens get exactly zero gradient and enter no normaliser of grpo.py's three loss aggregations
  (the loss equals the one of the same rows with the observations deleted); PPO's GAE and token rewards and
  REINFORCE++'s returns skip them the same way; GAE on a contiguous mask is bit-identical to a plain loop;
- SFT data of `tool_calc` masks exactly its "{digits}" observations and is graded on its final answer;
- the `tool_calc` task: disjoint mul splits, alternating test slices, the teacher's calls right and its
  non-calling mul guesses wrong, ~p_call of calls, and `load_task(..., max_turns)`;
- `HFEngine.sample_tokens` against `generate_hf` (greedy, left padding, per-row budgets, stop ids).
"""

import random
import re
import string

import pytest
import torch
from datasets import Dataset

from common.environment import (
    END_REASONS,
    ToolEnvironment,
    ToolError,
    answer_texts,
    calc,
    encode_tool_demonstrations,
    rollout_with_tools,
    tool_metrics,
)
from common.minibatch import minibatches
from common.rewards import number_verifier
from common.rollout import HFEngine, demonstration_rollout, generate, generate_and_score, generate_hf, reward_metrics
from common.rollout_data import Rollout
from common.tasks import Task, encode_demonstrations, format_prompt, load_task, rows_at

EOS = "<|im_end|>"  # the char tokenizer's EOS, one token


# ---------------------------------------------------------------------------------------
# 1. calc: a strict parser
# ---------------------------------------------------------------------------------------


def random_expression(rng: random.Random, depth: int = 0) -> str:
    """A well-formed expression of + - *, brackets and unary minus over non-negative integers (no leading 0s)."""
    kind = rng.random()
    if depth >= 4 or kind < 0.3:
        return str(rng.choice([rng.randint(0, 9), rng.randint(10, 99), rng.randint(100, 99999)]))
    if kind < 0.42:
        return "-" + random_expression(rng, depth + 1)
    if kind < 0.55:
        return "(" + random_expression(rng, depth + 1) + ")"
    op = rng.choice(["+", "-", "*"])
    space = rng.choice(["", "", " "])
    return random_expression(rng, depth + 1) + space + op + space + random_expression(rng, depth + 1)


def test_calc_is_python_integer_arithmetic_on_random_expressions():
    rng = random.Random(0)
    checked = 0
    while checked < 300:
        expression = random_expression(rng)
        if len(expression) > 32:
            continue
        value = eval(expression)  # the reference: Python's own arithmetic, on a string generated here
        # every intermediate value is at most the all-positive version of the expression (triangle inequality)
        bound = eval(expression.replace("-", "+"))
        if bound < 10**12:
            assert calc(expression) == str(value), expression
            checked += 1
        elif abs(value) >= 10**12:
            with pytest.raises(ToolError):
                calc(expression)
    assert calc("37*48+5") == "1781" and calc("-(2+3)*4") == "-20" and calc("2*-3*4") == "-24"
    assert calc("--3") == "3" and calc("1--3") == "4" and calc("10-2-3") == "5"  # left-associative minus


@pytest.mark.parametrize("bad", ["1+", "2**3", "(3", "3)", "a", "", " ", "()", "1 2", "+1", "3/4", "2^3", "1,000",
                                 "1.5", "0x10", "(1+2", "1+2)", "--", "*3"])
def test_calc_refuses_syntax_errors(bad):
    with pytest.raises(ToolError):
        calc(bad)


def test_calc_bounds_length_size_and_depth():
    assert calc("1+" * 15 + "11") == "26"  # 32 characters: accepted
    with pytest.raises(ToolError, match="long"):
        calc("1+" * 16 + "1")  # 33: refused though well-formed
    assert calc("999999999999") == "999999999999"  # 10**12 - 1
    assert calc("999999*999999+1") == str(999999 * 999999 + 1)
    for big in ("1000000000000", "9999999*9999999", "999999999999+1", "-999999999999-1", "0000000000001",
                "(999999*999999)*2-1000000"):
        with pytest.raises(ToolError, match="big"):
            calc(big)
    assert calc("(" * 8 + "7" + ")" * 8) == "7"
    assert calc("-(" * 8 + "7" + ")" * 8) == "7"
    with pytest.raises(ToolError, match="deep"):
        calc("(" * 9 + "7" + ")" * 9)


def test_calc_raises_only_tool_error_on_random_garbage():
    rng = random.Random(1)
    near, accepted = "0123456789+-*() ", 0
    for i in range(500):
        alphabet = string.printable if i % 2 else near  # half random printable, half almost-arithmetic
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        try:
            result = calc(text)
        except ToolError:
            continue
        assert isinstance(result, str) and abs(int(result)) < 10**12 and len(text) <= 32, text
        accepted += 1
        if set(text) <= set(near) and not re.search(r"(?<!\d)0\d", text):  # Python reads it the same way
            assert int(result) == eval(text), text
    assert accepted > 0  # some garbage is well-formed: the check above ran


def test_calc_raises_only_tool_error_on_non_ascii_digits():
    for text in ("²", "1+²", "³*4", "①"):
        with pytest.raises(ToolError):
            calc(text)


# ---------------------------------------------------------------------------------------
# 2. ToolEnvironment: respond, split, final_answer
# ---------------------------------------------------------------------------------------


def is_error_observation(observation) -> bool:
    text, is_error = observation
    return (is_error is True and text.startswith("{err: ") and text.endswith("}") and text.count("{") == 1
            and text.count("}") == 1 and "\n" not in text and len(text) <= 40)


def test_respond_good_calls_and_bad_calls():
    env = ToolEnvironment(max_calls=2)
    assert env.respond("[37*48+5]", 0) == ("{1781}", False)
    assert env.respond("so [2*3]", 1) == ("{6}", False)  # text before the call is not part of it
    assert env.respond("[1+[2*3]", 0) == ("{6}", False)  # the last call_open opens the call
    assert is_error_observation(env.respond("37*48]", 0))  # no "[": no call
    assert is_error_observation(env.respond("[1+]", 0))  # the tool refuses the call
    assert env.respond("[1+1]", 2) == ("{err: max calls}", True)  # past max_calls, even for a good call
    assert env.respond("[1+1]", 1) == ("{2}", False)
    assert is_error_observation(env.respond("[" + "1+" * 20 + "1]", 0))  # longer than max_call_chars


def _raises(call):
    raise RuntimeError("boom")


@pytest.mark.parametrize("tool", [_raises, lambda call: None, lambda call: 1781, lambda call: "7" * 10_000,
                                  lambda call: "1}2", lambda call: "1\n2", lambda call: "dé", lambda call: "{3",
                                  lambda call: "7" * 17, lambda call: ["3"]],
                         ids=["raises", "none", "int", "10k_chars", "brace", "newline", "non_ascii", "open_brace",
                              "17_chars", "list"])
def test_respond_turns_a_broken_tool_into_an_error_observation(tool):
    assert is_error_observation(ToolEnvironment(tool=tool).respond("[1+1]", 0))


def test_respond_accepts_a_tool_output_of_exactly_max_result_chars():
    assert ToolEnvironment(tool=lambda call: "7" * 16).respond("[1]", 0) == ("{" + "7" * 16 + "}", False)


def test_respond_bounds_and_sanitises_a_tool_error_message():
    def refuses(call):
        raise ToolError("no}\n" + "x" * 100)

    assert is_error_observation(ToolEnvironment(tool=refuses).respond("[1+1]", 0))


@pytest.mark.parametrize("completion, segments, final", [
    ("[37*48+5]{1781}1781", [("[37*48+5]", True), ("{1781}", False), ("1781", True)], "1781"),
    ("1781", [("1781", True)], "1781"),
    ("[1+2]{3}", [("[1+2]", True), ("{3}", False), ("", True)], ""),
    ("[2*3]{6}[6*7]{42}so 42", [("[2*3]", True), ("{6}", False), ("[6*7]", True), ("{42}", False), ("so 42", True)],
     "so 42"),
    ("[1+]{err: syntax}[1+1]{2}2", [("[1+]", True), ("{err: syntax}", False), ("[1+1]", True), ("{2}", False),
                                    ("2", True)], "2"),
    ("{5}7", [("{5}7", True)], "{5}7"),  # braces that follow no call are the policy's text
])
def test_split_and_final_answer(completion, segments, final):
    env = ToolEnvironment()
    assert env.split(completion) == segments
    assert "".join(text for text, _ in env.split(completion)) == completion
    assert env.final_answer(completion) == final


def test_answer_texts_grades_the_final_answer_not_the_tools_numbers():
    class WithTool:
        environment = ToolEnvironment()

    class WithoutTool:
        environment = None

    completions = ["[1+2]{3}", "[1+2]{3}3", "3"]
    assert answer_texts(WithTool, completions) == ["", "3", "3"]
    assert answer_texts(WithoutTool, completions) == completions
    # the tool's "3" alone is no answer: scored on the whole text it would count as right
    assert number_verifier(answer_texts(WithTool, completions)[0], "3")[0] == 0.0
    assert number_verifier(completions[0], "3")[0] == 1.0


# ---------------------------------------------------------------------------------------
# 3. rollout_with_tools with a scripted engine
# ---------------------------------------------------------------------------------------


class ScriptedEngine:
    """An engine that plays a script: script[prompt] is the list of segments (text, EOS written as EOS) that the
    prompt's row samples, one per turn. A segment is cut after its first stop id and at the row's budget, as
    a real engine cuts it; its logprobs are random numbers, kept in `returned`. Every call is recorded.
    Rows are told apart by the prompt their context starts with, so no prompt may be a prefix of another."""

    def __init__(self, tokenizer, script: dict[str, list[str]], seed: int = 0):
        self.eos_ids, self.device = [tokenizer.eos_token_id], torch.device("cpu")
        self.prompt_ids = {p: tokenizer(p, add_special_tokens=False)["input_ids"] for p in script}
        ids = list(self.prompt_ids.values())
        assert not any(i != j and b[:len(a)] == a for i, a in enumerate(ids) for j, b in enumerate(ids))
        self.segments = {p: [tokenizer(s, add_special_tokens=False)["input_ids"] for s in segs]
                         for p, segs in script.items()}
        self.returned = {p: [] for p in script}  # prompt -> [(ids, logprobs)] per turn
        self.calls = []  # [{"contexts", "budgets", "stop_ids", "prompts"}]
        self.rng = random.Random(seed)

    def sample_tokens(self, contexts, temperature, budgets, top_p, stop_ids):
        prompts = [next(p for p, ids in self.prompt_ids.items() if c[:len(ids)] == ids) for c in contexts]
        self.calls.append({"contexts": [list(c) for c in contexts], "budgets": list(budgets),
                           "stop_ids": list(stop_ids), "prompts": prompts})
        out = []
        for prompt, budget in zip(prompts, budgets):
            turn = len(self.returned[prompt])
            assert turn < len(self.segments[prompt]), f"the loop asked {prompt!r} for a turn it was not scripted"
            ids = self.segments[prompt][turn]
            stop = next((t + 1 for t, x in enumerate(ids) if x in stop_ids), len(ids))
            ids = ids[:min(stop, budget)]
            lps = [-self.rng.uniform(0.05, 3.0) for _ in ids]
            self.returned[prompt].append((ids, lps))
            out.append((ids, lps))
        return out


def run_script(tokenizer, script, env=None, max_new_tokens=40, seed=0):
    engine = ScriptedEngine(tokenizer, script, seed)
    env = env or ToolEnvironment()
    rollout = rollout_with_tools(engine, tokenizer, env, list(script), 1, 1.0, max_new_tokens)
    return rollout, engine


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def layout(tokenizer, pieces):
    """Expected (ids, policy flags) of a completion written as [(text, is_policy), ...]."""
    ids, flags = [], []
    for text, is_policy in pieces:
        piece = ids_of(tokenizer, text)
        ids, flags = ids + piece, flags + [int(is_policy)] * len(piece)
    return ids, flags


def row(rollout, i):
    """Row i's completion ids, policy mask and sampler logprobs, up to its completion_mask."""
    L = int(rollout.completion_mask[i].sum())
    assert rollout.completion_mask[i, :L].eq(1).all() and rollout.completion_mask[i, L:].eq(0).all()
    return (rollout.completion_ids[i, :L].tolist(), rollout.policy_mask[i, :L].tolist(),
            rollout.sampler_logprobs[i, :L])


MAIN_SCRIPT = {
    "a?": ["[12*3]", "36" + EOS],  # a call, then the answer
    "bbbb?": ["[7*]", "[7*6]", "42" + EOS],  # a malformed call, a good one, the answer
    "cc?": ["99" + EOS],  # answers at once
}
MAIN_LAYOUT = {
    "a?": [("[12*3]", 1), ("{36}", 0), ("36" + EOS, 1)],
    "bbbb?": [("[7*]", 1), ("{err: syntax}", 0), ("[7*6]", 1), ("{42}", 0), ("42" + EOS, 1)],
    "cc?": [("99" + EOS, 1)],
}


def test_observation_reaches_the_next_turns_context(tokenizer):
    rollout, engine = run_script(tokenizer, MAIN_SCRIPT, max_new_tokens=40)
    prompt = {p: ids_of(tokenizer, p) for p in MAIN_SCRIPT}
    assert [c["prompts"] for c in engine.calls] == [["a?", "bbbb?", "cc?"], ["a?", "bbbb?"], ["bbbb?"]]
    assert engine.calls[0]["contexts"] == [prompt[p] for p in MAIN_SCRIPT]  # left padding removed
    assert engine.calls[1]["contexts"] == [prompt["a?"] + ids_of(tokenizer, "[12*3]{36}"),
                                           prompt["bbbb?"] + ids_of(tokenizer, "[7*]{err: syntax}")]
    assert engine.calls[2]["contexts"] == [prompt["bbbb?"] + ids_of(tokenizer, "[7*]{err: syntax}[7*6]{42}")]
    assert engine.calls[0]["budgets"] == [40, 40, 40]
    assert engine.calls[1]["budgets"] == [40 - 10, 40 - 17]  # the observations count against the budget
    assert engine.calls[2]["budgets"] == [40 - 26]
    stop_ids = {tokenizer.eos_token_id, ids_of(tokenizer, "]")[0]}
    assert all(set(c["stop_ids"]) == stop_ids for c in engine.calls)


def test_completion_layout_policy_mask_and_sampler_logprobs(tokenizer):
    rollout, engine = run_script(tokenizer, MAIN_SCRIPT, max_new_tokens=40)
    for i, prompt in enumerate(MAIN_SCRIPT):
        ids, flags, logprobs = row(rollout, i)
        assert (ids, flags) == layout(tokenizer, MAIN_LAYOUT[prompt]), prompt
        sampled = torch.tensor([lp for _, lps in engine.returned[prompt] for lp in lps], dtype=torch.float32)
        assert torch.equal(logprobs[torch.tensor(flags, dtype=torch.bool)], sampled)
        assert logprobs[torch.tensor(flags) == 0].eq(0).all()
        assert ids[-1] == tokenizer.eos_token_id and flags[-1] == 1  # EOS is the policy's token
    assert rollout.policy_mask.le(rollout.completion_mask).all()
    assert rollout.sampler_logprobs[rollout.completion_mask == 0].eq(0).all()
    assert rollout.completion_ids[rollout.completion_mask == 0].eq(tokenizer.pad_token_id).all()
    assert rollout.completions == ["[12*3]{36}36", "[7*]{err: syntax}[7*6]{42}42", "99"]
    assert rollout.is_eos.tolist() == [True, True, True]
    assert rollout.prompt_index.tolist() == [0, 1, 2]
    assert rollout.completion_lengths.tolist() == [6 + 3, 4 + 5 + 3, 3]  # policy tokens only, EOS included
    stats = {k: v.tolist() for k, v in rollout.tool_stats.items()}
    assert stats["turns"] == [2, 3, 1] and stats["tool_calls"] == [1, 2, 0] and stats["tool_errors"] == [0, 1, 0]
    assert stats["ended/answer"] == [1, 1, 1]


@pytest.mark.parametrize("name, script, env, max_new_tokens, text, ended, turns, calls, errors", [
    # a policy that calls every turn: the loop stops after max_turns turns, the last call unanswered
    ("tool_loop", ["[1+1]"] * 10, ToolEnvironment(max_turns=4, max_calls=10), 200,
     "[1+1]{2}[1+1]{2}[1+1]{2}[1+1]", "max_turns", 4, 3, 0),
    ("budget", ["1234567890" + EOS], ToolEnvironment(), 6, "123456", "budget", 1, 0, 0),
    ("budget_after_call", ["[1+1]", "123456789"], ToolEnvironment(), 12, "[1+1]{2}1234", "budget", 2, 1, 0),
    ("unclosed_call", ["[12*345]"], ToolEnvironment(), 4, "[12*", "unclosed_call", 1, 0, 0),
    ("unclosed_after_call", ["[1+1]", "5[2*3]"], ToolEnvironment(), 11, "[1+1]{2}5[2", "unclosed_call", 2, 1, 0),
    ("malformed_call", ["[12*]", "0" + EOS], ToolEnvironment(), 40, "[12*]{err: syntax}0", "answer", 2, 1, 1),
    ("max_calls", ["[1+1]", "[2+2]", "4" + EOS], ToolEnvironment(max_calls=1), 40, "[1+1]{2}[2+2]{err: max calls}4",
     "answer", 3, 2, 1),
    ("one_turn_call", ["[1+1]", "2" + EOS], ToolEnvironment(max_turns=1), 40, "[1+1]", "max_turns", 1, 0, 0),
])
def test_end_reasons_and_tool_stats(tokenizer, name, script, env, max_new_tokens, text, ended, turns, calls, errors):
    rollout, engine = run_script(tokenizer, {"a?": script}, env, max_new_tokens)
    assert rollout.completions == [text]
    assert len(engine.calls) == turns  # one engine call per turn of the single row
    stats = {k: v.item() for k, v in rollout.tool_stats.items()}
    assert (stats["turns"], stats["tool_calls"], stats["tool_errors"]) == (turns, calls, errors)
    assert {r: stats[f"ended/{r}"] for r in END_REASONS} == {r: float(r == ended) for r in END_REASONS}
    assert rollout.is_eos.item() == (ended == "answer")
    assert int(rollout.completion_mask.sum()) <= max_new_tokens


def test_max_new_tokens_bounds_the_whole_completion_observations_included(tokenizer):
    script = {"a?": ["[11*11]", "121" + EOS]}
    # 7 policy tokens leave 2: the observation {121} is cut to "{1" and the row ends there
    rollout, engine = run_script(tokenizer, script, max_new_tokens=9)
    ids, flags, _ = row(rollout, 0)
    assert (ids, flags) == layout(tokenizer, [("[11*11]", 1), ("{1", 0)])
    assert len(engine.calls) == 1 and rollout.tool_stats["ended/budget"].item() == 1
    # the observation fills the budget exactly: no further turn (a budget of 0 is never asked for)
    rollout, engine = run_script(tokenizer, script, max_new_tokens=12)
    assert row(rollout, 0)[:2] == layout(tokenizer, [("[11*11]", 1), ("{121}", 0)])
    assert len(engine.calls) == 1 and rollout.tool_stats["ended/budget"].item() == 1
    # one token left after the observation: the second turn gets a budget of 1
    rollout, engine = run_script(tokenizer, script, max_new_tokens=13)
    assert row(rollout, 0)[:2] == layout(tokenizer, [("[11*11]", 1), ("{121}", 0), ("1", 1)])
    assert [c["budgets"] for c in engine.calls] == [[13], [1]]
    assert rollout.tool_stats["ended/budget"].item() == 1 and rollout.tool_stats["turns"].item() == 2


def test_tool_metrics_by_hand(tokenizer):
    rollout, _ = run_script(tokenizer, MAIN_SCRIPT, max_new_tokens=40)
    assert tool_metrics(rollout)["tool/accuracy_with_call"] is None  # no `correct` term yet
    rollout.reward_terms["correct"] = torch.tensor([1.0, 0.0, 1.0])
    metrics = tool_metrics(rollout)
    observation_tokens, all_tokens = 4 + (13 + 4), (6 + 4 + 3) + (4 + 13 + 5 + 4 + 3) + 3
    expected = {"tool/turns": (2 + 3 + 1) / 3, "tool/tool_calls": (1 + 2 + 0) / 3, "tool/tool_errors": 1 / 3,
                "tool/ended/answer": 1.0, "tool/ended/budget": 0.0, "tool/ended/max_turns": 0.0,
                "tool/ended/unclosed_call": 0.0, "tool/call_rate": 2 / 3,
                "tool/observation_token_share": observation_tokens / all_tokens,
                "tool/accuracy_with_call": 0.5, "tool/accuracy_without_call": 1.0}
    assert set(metrics) == set(expected)
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-6), key
    none_called = rollout[[2]]
    assert tool_metrics(none_called)["tool/accuracy_with_call"] is None
    assert tool_metrics(none_called)["tool/accuracy_without_call"] == 1.0
    single_turn = Rollout(prompt_ids=rollout.prompt_ids, prompt_mask=rollout.prompt_mask,
                          completion_ids=rollout.completion_ids, completion_mask=rollout.completion_mask,
                          sampler_logprobs=rollout.sampler_logprobs, is_eos=rollout.is_eos,
                          prompt_index=rollout.prompt_index, completions=rollout.completions)
    assert tool_metrics(single_turn) == {}


def tiny_tool_task(rows: list[tuple[str, str, str]]) -> Task:
    """A tool task of a few (question, answer, demonstration) rows, both splits alike."""
    data = Dataset.from_dict({"question": [q for q, _, _ in rows], "answer": [a for _, a, _ in rows],
                              "demonstration": [d for _, _, d in rows]})
    return Task("tiny_tool", data, data, verifier="number", environment=ToolEnvironment())


def test_generate_and_score_grades_the_final_answer(tokenizer):
    """The whole sampling round of every RL script on a tool task: the verifier sees the text after the last
    observation, so copying nothing after the tool's {3} is no answer, and the tool's numbers never count."""
    task = tiny_tool_task([("1+2", "3", ""), ("2+2", "4", ""), ("5+5", "10", ""), ("7+1", "8", "")])
    script = {"1+2": ["[1+2]", EOS], "2+2": ["[2+2]", "4" + EOS], "5+5": ["10" + EOS], "7+1": ["[7+1]", "9" + EOS]}
    engine = ScriptedEngine(tokenizer, {format_prompt(tokenizer, q): segs for q, segs in script.items()})
    rollout = generate_and_score(engine, tokenizer, task, 0, 4, 0, 1, 1.0, 40)
    questions = [task.prompts["question"][i] for i in rows_at(4, 0, 4, 0)]
    expected = {"1+2": ("[1+2]{3}", 0.0, "no_answer"), "2+2": ("[2+2]{4}4", 1.0, "correct"),
                "5+5": ("10", 1.0, "correct"), "7+1": ("[7+1]{8}9", 0.0, "wrong")}
    assert rollout.completions == [expected[q][0] for q in questions]
    assert rollout.rewards.tolist() == [expected[q][1] for q in questions]
    assert rollout.reasons == [expected[q][2] for q in questions]
    metrics = reward_metrics(rollout, 1)
    assert metrics["tool/call_rate"] == pytest.approx(3 / 4) and metrics["tool/accuracy_without_call"] == 1.0
    assert metrics["tool/accuracy_with_call"] == pytest.approx(1 / 3)


SEGMENT_POOL = ["[12*3]", "[7*]", "[2+2]", "12" + EOS, "[99*99*99", "x[1", "abc", "7" + EOS, "[1+1]", "]",
                EOS, "[99999*99999]", "[" + "1+" * 20 + "1]", "5]"]


def runs_of_zeros(flags):
    """(start, end) of each maximal run of 0s."""
    runs, start = [], None
    for t, f in enumerate(flags + [1]):
        if f == 0 and start is None:
            start = t
        if f == 1 and start is not None:
            runs.append((start, t))
            start = None
    return runs


def test_random_scripts_keep_every_invariant_and_match_sft_masks(tokenizer):
    """200 random scripts: budgets, turns, calls and masks are consistent, every observation is the
    environment's answer to the segment before it, and SFT's encoding of the finished text masks the same tokens."""
    rng = random.Random(3)
    close_id = ids_of(tokenizer, "]")[0]
    for trial in range(200):
        env = ToolEnvironment(max_turns=rng.randint(1, 4), max_calls=rng.randint(1, 3))
        script = {p: [rng.choice(SEGMENT_POOL) for _ in range(env.max_turns)] for p in ("a?", "bb?", "c?", "ddd?")}
        max_new_tokens = rng.randint(3, 40)
        rollout, engine = run_script(tokenizer, script, env, max_new_tokens, seed=trial)
        assert rollout.policy_mask.le(rollout.completion_mask).all()
        assert rollout.sampler_logprobs[rollout.policy_mask == 0].eq(0).all()
        for i, prompt in enumerate(script):
            ids, flags, _ = row(rollout, i)
            stats = {k: v[i].item() for k, v in rollout.tool_stats.items()}
            assert 1 <= len(ids) <= max_new_tokens and flags[0] == 1
            assert sum(stats[f"ended/{r}"] for r in END_REASONS) == 1
            assert stats["turns"] == len(engine.returned[prompt]) <= env.max_turns
            assert stats["tool_errors"] <= stats["tool_calls"] <= stats["turns"]
            assert rollout.is_eos[i].item() == (ids[-1] == tokenizer.eos_token_id) == bool(stats["ended/answer"])
            # the policy's tokens are exactly what the engine returned, in order
            assert [t for t, f in zip(ids, flags) if f] == [t for seg, _ in engine.returned[prompt] for t in seg]
            # each observation follows a closing token and is the environment's answer (maybe cut by the budget)
            runs = runs_of_zeros(flags)
            assert len(runs) <= stats["tool_calls"] and (len(runs) == stats["tool_calls"] or len(ids) == max_new_tokens)
            segments = [seg for seg, _ in engine.returned[prompt]]
            for k, (start, end) in enumerate(runs):
                assert ids[start - 1] == close_id
                expected, _ = env.respond(tokenizer.decode(segments[k]), k)
                observed = tokenizer.decode(ids[start:end])
                assert expected.startswith(observed) and (observed == expected or end == max_new_tokens)
            if stats["ended/answer"]:  # SFT on the same finished text masks the same tokens
                _, _, c_ids, c_mask, p_mask = encode_tool_demonstrations(
                    tokenizer, env, ["a?"], [rollout.completions[i]], tokenizer.eos_token_id, 64)
                assert c_ids[0, :int(c_mask[0].sum())].tolist() == ids
                assert p_mask[0, :int(c_mask[0].sum())].tolist() == flags


# ---------------------------------------------------------------------------------------
# 4. grpo.py's losses: observations get no gradient and enter no normaliser
# ---------------------------------------------------------------------------------------

LOSS_SCRIPT = {
    "a?": ["[12*3]", "36" + EOS],
    "bbbb?": ["[7*]", "[7*6]", "42" + EOS],
    "cc?": ["99" + EOS],
    "d?": ["so [5*5]", "25 it is" + EOS],
}


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_grpo_loss_ignores_observations(tokenizer, mode):
    from grpo import Args, aggregate_loss, policy_token_loss

    max_new_tokens = 40
    rollout, _ = run_script(tokenizer, LOSS_SCRIPT, max_new_tokens=max_new_tokens)
    B, C = rollout.completion_ids.shape
    mask = rollout.policy_mask.float()
    observation = (rollout.completion_mask == 1) & (rollout.policy_mask == 0)
    assert observation.sum() == 4 + 17 + 0 + 4  # the test means something: there are observations
    g = torch.Generator().manual_seed(0)
    logp = (torch.randn(B, C, generator=g) * 0.5 - 1.0).requires_grad_()
    logp_old = logp.detach() + 0.3 * torch.randn(B, C, generator=g)  # some ratios leave the clip range
    advantages = torch.randn(B, 1, generator=g)
    args = Args(loss_agg=mode)

    minibatch = next(minibatches([], mask, 1, 1, 1, B))
    assert minibatch.num_tokens == int(rollout.policy_mask.sum()) and minibatch.num_seqs == B
    token_loss, _, _ = policy_token_loss(logp, logp_old, advantages, mask, args)
    loss = aggregate_loss(token_loss, mask, mode, minibatch.num_seqs, minibatch.num_tokens, max_new_tokens)
    loss.backward()
    assert logp.grad[observation].eq(0).all() and logp.grad[rollout.completion_mask == 0].eq(0).all()

    # the same rows with the observations deleted: every row is contiguous policy tokens
    leaves, row_losses = [], []
    for i in range(B):
        keep = rollout.policy_mask[i].bool()
        leaf = logp.detach()[i, keep].clone().requires_grad_()
        ratio = torch.exp(leaf - logp_old[i, keep])
        a = advantages[i, 0]
        row_losses.append(-torch.minimum(ratio * a, torch.clamp(ratio, 1 - args.eps_low, 1 + args.eps_high) * a))
        leaves.append(leaf)
    n_tokens = sum(len(r) for r in row_losses)
    if mode == "token-mean":
        expected = sum(r.sum() for r in row_losses) / n_tokens
    elif mode == "seq-mean-token-mean":
        expected = sum(r.mean() for r in row_losses) / B
    else:
        expected = sum(r.sum() for r in row_losses) / (B * max_new_tokens)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)
    for i in range(B):
        torch.testing.assert_close(logp.grad[i, rollout.policy_mask[i].bool()], leaves[i].grad, rtol=1e-5, atol=1e-7)
    # with the observations counted (the attention mask as the loss mask) the loss would differ
    wrong = aggregate_loss(token_loss.detach(), rollout.completion_mask.float(), mode, B,
                           int(rollout.completion_mask.sum()), max_new_tokens)
    assert not torch.isclose(wrong, loss.detach(), rtol=1e-4)


def test_rollout_lengths_slicing_and_cat_keep_policy_mask_and_tool_stats(tokenizer):
    rollout, engine = run_script(tokenizer, LOSS_SCRIPT)
    policy_counts = [sum(len(ids) for ids, _ in engine.returned[p]) for p in LOSS_SCRIPT]
    assert rollout.completion_lengths.tolist() == policy_counts
    assert rollout.completion_lengths.tolist() != rollout.completion_mask.sum(-1).tolist()

    for rows in ([2, 0], slice(1, 3), torch.tensor([3, 1])):
        index = list(range(len(rollout)))[rows] if isinstance(rows, slice) else torch.as_tensor(rows).tolist()
        sub = rollout[rows]
        assert torch.equal(sub.policy_mask, rollout.policy_mask[index])
        assert torch.equal(sub.completion_lengths, rollout.completion_lengths[index])
        assert set(sub.tool_stats) == set(rollout.tool_stats)
        for k, v in rollout.tool_stats.items():
            assert torch.equal(sub.tool_stats[k], v[index]), k

    short, _ = run_script(tokenizer, {"e?": ["7" + EOS]})  # a narrower batch: cat pads it
    both = Rollout.cat([short, rollout], tokenizer.pad_token_id)
    C = rollout.completion_ids.shape[1]
    assert both.policy_mask.shape == (1 + len(rollout), C)
    assert torch.equal(both.policy_mask[1:], rollout.policy_mask)
    assert torch.equal(both.policy_mask[0, :short.policy_mask.shape[1]], short.policy_mask[0])
    assert both.policy_mask[0, short.policy_mask.shape[1]:].eq(0).all()
    for k in rollout.tool_stats:
        assert torch.equal(both.tool_stats[k], torch.cat([short.tool_stats[k], rollout.tool_stats[k]])), k
    # a single-turn rollout's policy_mask is its completion_mask, sliced and stacked alike
    single = Rollout(prompt_ids=short.prompt_ids, prompt_mask=short.prompt_mask, completion_ids=short.completion_ids,
                     completion_mask=short.completion_mask, sampler_logprobs=short.sampler_logprobs,
                     is_eos=short.is_eos, prompt_index=short.prompt_index, completions=short.completions)
    mixed = Rollout.cat([single, rollout], tokenizer.pad_token_id)
    assert torch.equal(mixed.policy_mask[0, :single.completion_mask.shape[1]], single.completion_mask[0])
    assert torch.equal(mixed.policy_mask[1:], rollout.policy_mask)
    assert torch.equal(single[[0]].policy_mask, single.completion_mask)


# ---------------------------------------------------------------------------------------
# 5. ppo.py: GAE and token rewards skip the holes
# ---------------------------------------------------------------------------------------


def gae_reference(rewards, values, lengths, gamma, lams):
    """Plain GAE, row by row over its first lengths[i] tokens: delta_t = r_t + gamma V_{t+1} - V_t (V after the
    last token = 0), A_t = delta_t + gamma lambda A_{t+1}; 0 past the end. lams: one lambda per row."""
    out = torch.zeros_like(rewards)
    for i, L in enumerate(lengths):
        running = torch.zeros(())
        for t in reversed(range(L)):
            next_value = values[i, t + 1] if t + 1 < L else 0.0
            delta = rewards[i, t] + gamma * next_value - values[i, t]
            running = delta + gamma * lams[i] * running
            out[i, t] = running
    return out


HOLE_MASKS = torch.tensor([
    [1, 1, 1, 0, 0, 0, 1, 1, 1, 0],  # an observation, more policy tokens, padding
    [1, 0, 1, 0, 0, 1, 1, 1, 1, 1],  # two observations, no padding
    [1, 1, 1, 1, 1, 1, 1, 1, 1, 1],  # no observation
    [1, 1, 1, 0, 0, 0, 0, 0, 0, 0],  # ends in an observation cut by the budget, or padding
    [1, 1, 0, 1, 0, 1, 0, 1, 0, 1],  # alternating
], dtype=torch.float32)


def compress(x, mask):
    """Each row's policy positions moved to the front, in order (the holes deleted), right-padded with 0."""
    out = torch.zeros_like(x)
    for i in range(len(x)):
        kept = x[i][mask[i].bool()]
        out[i, :len(kept)] = kept
    return out


@pytest.mark.parametrize("gamma, gae_lambda", [(1.0, 0.95), (0.99, 0.9), (1.0, 1.0), (0.5, 0.0), (0.9, "per_row")])
def test_gae_with_holes_equals_gae_on_the_compressed_rows(gamma, gae_lambda):
    from ppo import compute_advantages

    g = torch.Generator().manual_seed(1)
    mask = HOLE_MASKS
    rewards, values = torch.randn(mask.shape, generator=g), torch.randn(mask.shape, generator=g)  # garbage on holes
    lam = torch.tensor([0.9, 0.5, 0.99, 0.0, 0.7]) if gae_lambda == "per_row" else gae_lambda
    lams = lam.tolist() if torch.is_tensor(lam) else [lam] * len(mask)
    advantages = compute_advantages(rewards, values, mask, gamma, lam)
    lengths = mask.sum(-1).long().tolist()
    expected = gae_reference(compress(rewards, mask), compress(values, mask), lengths,
                             gamma, [torch.tensor(x) for x in lams])
    torch.testing.assert_close(compress(advantages, mask), expected, rtol=1e-6, atol=1e-6)
    assert advantages[mask == 0].eq(0).all()
    # the holes change the answer (the test can fail): GAE over the raw rows, observations taken as tokens, differs
    raw = gae_reference(rewards, values, [10] * len(mask), gamma, [torch.tensor(x) for x in lams])
    assert not torch.allclose((raw * mask)[:2], advantages[:2], atol=1e-3)


@pytest.mark.parametrize("gamma, gae_lambda", [(1.0, 0.95), (0.99, 0.9), (1.0, 1.0), (0.5, 0.0), (0.97, "per_row")])
def test_gae_on_a_contiguous_mask_is_bit_identical_to_a_plain_loop(gamma, gae_lambda):
    from ppo import compute_advantages

    g = torch.Generator().manual_seed(2)
    lengths = [1, 4, 7, 10, 3, 10]
    mask = (torch.arange(10)[None, :] < torch.tensor(lengths)[:, None]).float()
    rewards, values = torch.randn(mask.shape, generator=g), torch.randn(mask.shape, generator=g)
    lam = torch.rand(len(lengths), generator=g) if gae_lambda == "per_row" else gae_lambda
    lams = list(lam) if torch.is_tensor(lam) else [lam] * len(lengths)
    got = compute_advantages(rewards, values, mask, gamma, lam)
    assert torch.equal(got, gae_reference(rewards, values, lengths, gamma, lams))


def test_token_rewards_put_the_score_on_the_last_policy_token():
    from ppo import compute_token_rewards

    mask = torch.tensor([[1, 1, 0, 0, 1, 1, 0, 0],  # a hole, then padding: mask.sum() - 1 = 3 is in the hole
                         [1, 1, 1, 0, 0, 0, 0, 0],  # padding only
                         [1, 0, 0, 1, 0, 0, 0, 1],  # the last token is the last column
                         [1, 1, 1, 1, 0, 0, 0, 0]], dtype=torch.float32)
    last = [5, 2, 7, 3]
    g = torch.Generator().manual_seed(3)
    kl, scores, beta = torch.randn(mask.shape, generator=g), torch.tensor([2.5, -1.0, 0.75, 3.0]), 0.1
    got = compute_token_rewards(scores, kl, mask, beta)
    expected = torch.zeros_like(kl)
    for i in range(len(mask)):
        for t in range(mask.shape[1]):
            if mask[i, t]:
                expected[i, t] = -beta * kl[i, t] + (scores[i] if t == last[i] else 0.0)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-7)
    assert got[0, 3] == 0  # not at mask.sum() - 1


# ---------------------------------------------------------------------------------------
# 6. reinforce.py: REINFORCE++ returns skip the holes
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.0, 0.05])
def test_reinforce_pp_returns_with_holes_equal_the_compressed_rows(beta):
    from reinforce import reinforce_pp_advantages

    g = torch.Generator().manual_seed(4)
    mask = HOLE_MASKS
    outcome = torch.tensor([1.0, 0.0, 1.0, 0.5, -1.0])
    kl = torch.randn(mask.shape, generator=g)  # garbage on holes
    got = reinforce_pp_advantages(outcome, kl, mask, beta)
    compressed_mask = compress(mask, mask)
    expected = reinforce_pp_advantages(outcome, compress(kl, mask), compressed_mask, beta)
    torch.testing.assert_close(compress(got, mask), expected, rtol=1e-5, atol=1e-6)
    assert got[mask == 0].eq(0).all()
    # and by hand: the return-to-go of the compressed row over the policy tokens, whitened over the batch
    returns = []
    for i in range(len(mask)):
        r = [-beta * x for x in kl[i][mask[i].bool()].tolist()]
        r[-1] += outcome[i].item()
        returns += [sum(r[t:]) for t in range(len(r))]
    returns = torch.tensor(returns, dtype=torch.float64)
    whitened = (returns - returns.mean()) / torch.sqrt(returns.var() + 1e-8)
    torch.testing.assert_close(got[mask.bool()].double(), whitened, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------
# 7. SFT data of a tool task
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tool_task():
    return load_task("tool_calc")


def test_demonstration_rollout_masks_exactly_the_observations(tokenizer, tool_task):
    env = tool_task.environment
    demos = demonstration_rollout(tokenizer, tool_task, 0, 64, 0, "demonstration", tokenizer.eos_token_id, 32, "cpu",
                                  split="train")
    rows = tool_task.train[rows_at(len(tool_task.train), 0, 64, 0)]
    assert demos.is_eos.all()  # no demonstration is longer than 32 tokens
    calling = 0
    for i, text in enumerate(rows["demonstration"]):
        ids, flags, _ = row(demos, i)
        observations = [tokenizer.decode(ids[s:e]) for s, e in runs_of_zeros(flags)]
        assert all(re.fullmatch(r"\{\d+\}", o) for o in observations), observations
        assert observations == re.findall(r"(?<=\])\{\d+\}", text)
        assert all(ids[s - 1] == ids_of(tokenizer, "]")[0] for s, _ in runs_of_zeros(flags))
        policy_text = tokenizer.decode([t for t, f in zip(ids, flags) if f])
        assert policy_text == re.sub(r"(?<=\])\{\d+\}", "", text) + EOS
        calling += bool(observations)
    assert 0 < calling < 64  # both kinds are in the sample
    expected = [number_verifier(env.final_answer(text), answer)[0]
                for text, answer in zip(rows["demonstration"], rows["answer"])]
    assert demos.rewards.tolist() == expected and demos.reward_terms["correct"].tolist() == expected
    assert demos.completions == rows["demonstration"]
    assert demos.sampler_logprobs.eq(0).all()


def test_demonstration_rollout_grades_the_final_answer(tokenizer):
    task = tiny_tool_task([("1+2", "3", "[1+2]{3}"), ("2+2", "4", "[2+2]{4}4"), ("5+5", "10", "10"),
                           ("7+1", "8", "[7+1]{8}9")])
    demos = demonstration_rollout(tokenizer, task, 0, 4, 0, "demonstration", tokenizer.eos_token_id, 32, "cpu",
                                  split="train")
    expected = {"[1+2]{3}": 0.0, "[2+2]{4}4": 1.0, "10": 1.0, "[7+1]{8}9": 0.0}  # "[1+2]{3}" has no answer
    assert demos.rewards.tolist() == [expected[c] for c in demos.completions]
    assert sorted(demos.completions) == sorted(expected)


@pytest.mark.parametrize("max_len", [32, 12, 3])
def test_tool_demonstrations_encode_like_plain_demonstrations(tokenizer, tool_task, max_len):
    rows = tool_task.train[:40]
    prompts = [format_prompt(tokenizer, q) for q in rows["question"]]
    with_tool = encode_tool_demonstrations(tokenizer, tool_task.environment, prompts, rows["demonstration"],
                                           tokenizer.eos_token_id, max_len)
    plain = encode_demonstrations(tokenizer, prompts, rows["demonstration"], tokenizer.eos_token_id, max_len)
    for a, b in zip(with_tool[:4], plain):
        assert torch.equal(a, b)
    policy_mask, completion_mask = with_tool[4], with_tool[3]
    assert policy_mask.le(completion_mask).all()
    if max_len == 32:
        assert (policy_mask < completion_mask).any()  # some rows do have observations


# ---------------------------------------------------------------------------------------
# 8. the tool_calc task
# ---------------------------------------------------------------------------------------


def test_tool_calc_task_splits_and_teacher(tool_task):
    train, test = tool_task.train[:], tool_task.test[:]
    train_mul = {q for q, s in zip(train["question"], train["slice"]) if s == "mul"}
    test_mul = {q for q, s in zip(test["question"], test["slice"]) if s == "mul"}
    assert train_mul and len(test_mul) == len(test["question"]) // 2 and not train_mul & test_mul
    assert {q for q, s in zip(train["question"], train["slice"]) if s == "add"}  # both slices train
    assert test["slice"] == ["mul" if i % 2 == 0 else "add" for i in range(len(test["slice"]))]
    for split in (train, test):
        for q, a in zip(split["question"], split["answer"]):
            assert int(a) == eval(q)  # the reference: Python's arithmetic on the question
    calls = {"mul": [], "add": []}
    for q, a, demo, s in zip(train["question"], train["answer"], train["demonstration"], train["slice"]):
        called = "[" in demo
        calls[s].append(called)
        if called:
            assert demo == f"[{q}]{{{a}}}{a}" and calc(q) == a  # the tool's answer, copied
            assert number_verifier(tool_task.environment.final_answer(demo), a)[0] == 1.0
        elif s == "mul":
            assert int(demo) != int(a) and int(demo) // 100 == int(a) // 100  # a guess: right leading digits only
        else:
            assert demo == a
    everything = calls["mul"] + calls["add"]
    assert abs(sum(everything) / len(everything) - 0.3) < 0.02
    for s in ("mul", "add"):
        assert abs(sum(calls[s]) / len(calls[s]) - 0.3) < 0.03, s
    for q, demo, s in zip(test["question"], test["demonstration"], test["slice"]):
        assert ("[" in demo) == (s == "mul")  # the test split's demonstrations are the expert's


def test_load_task_max_turns(tool_task):
    with pytest.raises(SystemExit) as info:
        load_task("add_noisy", max_turns=2)
    assert str(info.value.code).startswith("error: --max-turns")
    assert tool_task.environment.max_turns == 3
    five = load_task("tool_calc", max_turns=5)
    assert five.environment.max_turns == 5
    assert tool_task.environment.max_turns == 3  # each task has its own environment
    assert load_task("add_noisy").environment is None


# ---------------------------------------------------------------------------------------
# 9. HFEngine.sample_tokens on the tiny model
# ---------------------------------------------------------------------------------------


def test_hf_engine_sample_tokens_matches_generate_hf(tokenizer, tiny_model):
    eos = tokenizer.eos_token_id
    prompts = [format_prompt(tokenizer, q) for q in ("12+7", "3*4+55", "9", "81*2+3=")]
    contexts = [ids_of(tokenizer, p) for p in prompts]
    assert len({len(c) for c in contexts}) == len(contexts)  # different lengths: left padding is exercised
    engine = HFEngine(tiny_model, tokenizer, [eos])
    reference = generate_hf(tiny_model, tokenizer, prompts, 1, 0.0, 12)
    segments = engine.sample_tokens(contexts, 0.0, [12] * len(prompts), 1.0, [eos])
    for i, (ids, lps) in enumerate(segments):
        L = int(reference.completion_mask[i].sum())
        assert ids == reference.completion_ids[i, :L].tolist()
        torch.testing.assert_close(torch.tensor(lps), reference.sampler_logprobs[i, :L], rtol=1e-4, atol=1e-4)
        alone = engine.sample_tokens([contexts[i]], 0.0, [12], 1.0, [eos])[0]
        assert alone[0] == ids  # the same tokens without the other rows' padding
        torch.testing.assert_close(torch.tensor(alone[1]), torch.tensor(lps), rtol=1e-4, atol=1e-4)

    budgets = [2, 12, 5, 1]
    cut = engine.sample_tokens(contexts, 0.0, budgets, 1.0, [eos])
    for (ids, lps), (full, full_lps), budget in zip(cut, segments, budgets):
        assert ids == full[:budget] and len(lps) == len(ids)

    # a stop id ends each row just after its first occurrence, the stop token included
    stop = segments[0][0][3]
    stopped = engine.sample_tokens(contexts, 0.0, [12] * len(prompts), 1.0, [eos, stop])
    for (ids, _), (full, _) in zip(stopped, segments):
        end = next((t + 1 for t, x in enumerate(full) if x in (eos, stop)), len(full))
        assert ids == full[:end]


def test_generate_with_an_environment_runs_the_tool_loop(tokenizer, tiny_model):
    prompts = [format_prompt(tokenizer, q) for q in ("12+7", "3*4+55")]
    env = ToolEnvironment()
    rollout = generate(None, tiny_model, tokenizer, prompts, 2, 0.0, 12, environment=env)
    assert set(rollout.tool_stats) == {"turns", "tool_calls", "tool_errors", *(f"ended/{r}" for r in END_REASONS)}
    assert len(rollout) == 4 and rollout.prompt_index.tolist() == [0, 0, 1, 1]
    engine = HFEngine(tiny_model, tokenizer, [tokenizer.eos_token_id])
    first = engine.sample_tokens([ids_of(tokenizer, p) for p in prompts], 0.0, [12, 12], 1.0,
                                 [tokenizer.eos_token_id, ids_of(tokenizer, "]")[0]])
    for i in range(4):
        ids, flags, _ = row(rollout, i)
        segment = first[i // 2][0]
        assert ids[:len(segment)] == segment and flags[:len(segment)] == [1] * len(segment)
        assert len(ids) <= 12
