"""Multi-turn rollouts: the policy calls a tool, the environment answers, the policy goes on.

Agentic RL is the same loss with one more mask. A rollout becomes a loop:

    context = prompt
    for turn in 1 .. max_turns:
        the policy samples until it writes EOS (an answer), closes a tool call, or runs out of budget
        on a call: the environment parses it, runs the tool, and appends its observation to the context

The completion is then  segment_1 obs_1 segment_2 obs_2 ... segment_k, one right-padded row as in a
single-turn `Rollout`, with one more per-token mask: `policy_mask` is 1 where the *policy* sampled the
token and 0 on the observations. The model reads the observations (they stay in `completion_mask`, the
attention mask of every forward pass), but no loss, ratio, KL, entropy, token count or mismatch metric
sees them: every script takes its loss mask from `policy_mask`. The sampler's logprobs are 0 there.

A segment ends on one *token*: EOS or the call's closing token (`]` in the tiny world; Qwen2.5's
`</tool_call>` is one token too). A stop string could end mid-token, where HF and vLLM cut differently;
a stop token cuts both at the same place, and the ids the policy sampled are kept as they are (the text
is never re-tokenised: decode-then-encode can change the tokens, and then the logprobs the loss uses).

This module is plumbing: no advantage, ratio, clip or KL. An engine (common/rollout.py HFEngine,
common/vllm_engine.py VLLMEngine) provides `sample_tokens(contexts, temperature, budgets, top_p,
stop_ids)`; `rollout_with_tools` runs the loop on it.

The tool of the tiny world is `calc`: a strict parser of integer arithmetic (+ - * and brackets),
never `eval`, with bounds on the input's length, the numbers' size and the output's length.
The tool task that uses it is `tool_calc` (common/tasks.py); docs/tools.md is the write-up.
"""

import re
import string
from dataclasses import dataclass
from typing import Callable

import torch

from common.distributed import any_rank
from common.rollout_data import Rollout, pad_right

END_REASONS = ("answer", "budget", "max_turns", "unclosed_call")
"""Why a multi-turn completion ended: the policy wrote EOS; the token budget ran out; it called the tool
in its last turn (no turn left to read the answer); it ran out of budget inside an open call."""


# ---------------------------------------------------------------------------------------
# The tool: a strict arithmetic parser
# ---------------------------------------------------------------------------------------


class ToolError(ValueError):
    """A call the tool refuses; its message becomes the observation."""


def calc(expression: str, max_chars: int = 32, max_digits: int = 12, max_depth: int = 8) -> str:
    """Evaluate integer arithmetic with + - * and brackets; raise ToolError on anything else.

    A recursive-descent parser over a whitelist of characters, never `eval`: the model's text is
    untrusted input. Bounds: max_chars of input, max_digits per number and per intermediate result
    (so `9999999*9999999*...` cannot build a huge integer), max_depth of nested brackets.
    >>> calc("37*48+5"), calc("-(2+3)*4")
    ('1781', '-20')
    """
    if len(expression) > max_chars:
        raise ToolError("too long")
    tokens = re.findall(r"[0-9]+|[-+*()]|\S", expression)  # ASCII digits only: "²".isdigit() is True
    if not tokens:
        raise ToolError("empty")
    position = 0
    limit = 10**max_digits

    def peek():
        return tokens[position] if position < len(tokens) else None

    def take():
        nonlocal position
        position += 1
        return tokens[position - 1]

    def bounded(value: int) -> int:
        if abs(value) >= limit:
            raise ToolError("too big")
        return value

    def expr(depth):  # expr := term (('+' | '-') term)*
        value = term(depth)
        while peek() in ("+", "-"):
            value = bounded(value + term(depth) if take() == "+" else value - term(depth))
        return value

    def term(depth):  # term := factor ('*' factor)*
        value = factor(depth)
        while peek() == "*":
            take()
            value = bounded(value * factor(depth))
        return value

    def factor(depth):  # factor := '-' factor | number | '(' expr ')'
        token = peek()
        if token == "-":
            take()
            return -factor(depth)
        if token == "(":
            if depth >= max_depth:
                raise ToolError("too deep")
            take()
            value = expr(depth + 1)
            if peek() != ")":
                raise ToolError("syntax")
            take()
            return value
        if token is not None and re.fullmatch(r"[0-9]+", token):
            take()
            if len(token) > max_digits:
                raise ToolError("too big")
            return int(token)
        raise ToolError("syntax")

    value = expr(0)
    if position != len(tokens):
        raise ToolError("syntax")
    return str(value)


# ---------------------------------------------------------------------------------------
# The environment: parse a call, run the tool, write the observation
# ---------------------------------------------------------------------------------------

OBSERVATION_CHARS = set(string.digits + string.ascii_letters + " -.:")  # what a tool result may contain


@dataclass
class ToolEnvironment:
    """One tool behind a text protocol:  [call]{result}.

    The policy writes `call_open` expression `call_close`; the environment appends
    `result_open` result `result_close` (or `result_open`err: why`result_close` when the call is bad).
    A bad call, a tool that raises, a tool that returns garbage: each becomes an error observation,
    never an exception in the rollout.
    """

    tool: Callable[[str], str] = calc
    """the tool: call text -> result text; raises ToolError on a call it refuses"""
    max_turns: int = 3
    """policy segments per completion: the policy may call the tool max_turns - 1 times and still answer"""
    max_calls: int = 2
    """calls the tool answers per completion; later ones get an error observation"""
    max_call_chars: int = 32
    """a longer call is refused without running the tool"""
    max_result_chars: int = 16
    """a longer tool output is refused (an error observation), so an observation is at most ~20 tokens"""
    call_cost: float = 0.0
    """the reward loses this per tool call (--tool-call-cost): a price on calls; 0 = calls are free"""
    call_open: str = "["
    call_close: str = "]"
    result_open: str = "{"
    result_close: str = "}"

    def respond(self, segment: str, calls_so_far: int) -> tuple[str, bool]:
        """The observation for a policy segment that ends with `call_close`: (text, is_error)."""
        if calls_so_far >= self.max_calls:
            return self._observation("err: max calls"), True
        start = segment.rfind(self.call_open)
        if start < 0:
            return self._observation("err: no " + self.call_open), True
        call = segment[start + len(self.call_open): len(segment) - len(self.call_close)]
        if len(call) > self.max_call_chars:
            return self._observation("err: too long"), True
        try:
            result = self.tool(call)
        except ToolError as e:  # the tool's own refusal; its message is bounded and checked like a result
            return self._observation(f"err: {e}" if self._valid(f"err: {e}") else "err: refused"), True
        except Exception:  # a broken tool must not end the run: the policy sees an error, the log counts it
            return self._observation("err: tool failed"), True
        if not self._valid(result):
            return self._observation("err: bad output"), True
        return self._observation(result), False

    def _valid(self, text) -> bool:
        """Short text of plain characters: no delimiter, newline or special token can leak into the context."""
        return isinstance(text, str) and len(text) <= self.max_result_chars and set(text) <= OBSERVATION_CHARS

    def _observation(self, text: str) -> str:
        return self.result_open + text + self.result_close

    def split(self, completion: str) -> list[tuple[str, bool]]:
        """A written completion (a demonstration) as (text, is_policy) segments: observations are the
        `result_open ... result_close` spans that follow a closed call."""
        pattern = re.escape(self.call_close) + "(" + re.escape(self.result_open) + ".*?" + \
            re.escape(self.result_close) + ")"
        segments, start = [], 0
        for match in re.finditer(pattern, completion):
            segments += [(completion[start:match.start(1)], True), (match.group(1), False)]
            start = match.end(1)
        return segments + [(completion[start:], True)]

    def final_answer(self, completion: str) -> str:
        """What the verifier judges: the policy's text after the last observation (the tool's own
        numbers never count as the answer; a completion that ends on an observation has none)."""
        segments = self.split(completion)
        return segments[-1][0] if segments[-1][1] else ""


def answer_texts(task, completions: list[str]) -> list[str]:
    """The texts a task's verifier judges: the completions, or their final answers in a tool task."""
    env = task.environment
    return [env.final_answer(c) for c in completions] if env is not None else list(completions)


def stop_token_id(tokenizer, env: ToolEnvironment) -> int:
    """The id of the call's closing token; one line naming the fix when the tokenizer splits it."""
    ids = tokenizer(env.call_close, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise SystemExit(f"error: --task: the tool call's closing text {env.call_close!r} is {len(ids)} tokens for "
                         f"this tokenizer; a segment must end on one token (exact on HF and vLLM alike): pick a "
                         f"closing text that is a single token (e.g. Qwen2.5's </tool_call>)")
    return ids[0]


# ---------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------


def rollout_with_tools(engine, tokenizer, env: ToolEnvironment, prompts: list[str], n: int, temperature: float,
                       max_new_tokens: int, top_p: float = 1.0) -> Rollout:
    """n multi-turn completions per prompt, laid out as one `Rollout` (rows grouped by prompt).

    max_new_tokens bounds the whole completion, observations included (what must fit in the context).
    Returns the Rollout with `policy_mask` set and `tool_stats` per row: turns, tool_calls, tool_errors,
    and one 0/1 entry per END_REASONS (`ended/<reason>`).
    """
    device = engine.device  # where the trainer wants the Rollout
    eos_ids = list(engine.eos_ids)
    close_id = stop_token_id(tokenizer, env)
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    prompt_ids = enc["input_ids"].repeat_interleave(n, dim=0)  # (B, P) left-padded
    prompt_mask = enc["attention_mask"].repeat_interleave(n, dim=0)  # (B, P)
    B = prompt_ids.shape[0]
    contexts = [ids[m.bool()].tolist() for ids, m in zip(prompt_ids, prompt_mask)]
    tokens = [[] for _ in range(B)]  # completion ids, policy and observation
    from_policy = [[] for _ in range(B)]  # 1 where the policy sampled the token
    logprobs = [[] for _ in range(B)]  # the sampler's logprob, 0 on observations
    turns, calls, errors, ended = [0] * B, [0] * B, [0] * B, ["budget"] * B
    active = list(range(B))
    for turn in range(env.max_turns):
        # Under torchrun with FSDP2 every generate step is collective (an all-gather of the weights), so every rank
        # runs the same turns: a rank whose rows all ended samples one throw-away row while another still samples.
        if not any_rank(bool(active)):
            break
        budgets = [max_new_tokens - len(tokens[i]) for i in active]
        outputs = engine.sample_tokens([contexts[i] + tokens[i] for i in active] or [contexts[0]], temperature,
                                       budgets or [1], top_p, eos_ids + [close_id])
        still_active = []
        for i, (ids, lps) in zip(active, outputs):
            tokens[i] += ids
            from_policy[i] += [1] * len(ids)
            logprobs[i] += lps
            turns[i] += 1
            if ids and ids[-1] in eos_ids:
                ended[i] = "answer"
            elif ids and ids[-1] == close_id:
                if turn == env.max_turns - 1:  # no turn left to read the answer
                    ended[i] = "max_turns"
                    continue
                segment = tokenizer.decode(ids, skip_special_tokens=True)
                text, is_error = env.respond(segment, calls[i])
                calls[i] += 1
                errors[i] += is_error
                observation = tokenizer(text, add_special_tokens=False)["input_ids"][:max_new_tokens - len(tokens[i])]
                tokens[i] += observation
                from_policy[i] += [0] * len(observation)
                logprobs[i] += [0.0] * len(observation)
                if len(tokens[i]) < max_new_tokens:
                    still_active.append(i)
            else:  # the budget ran out mid-segment
                text = tokenizer.decode(ids, skip_special_tokens=True)
                ended[i] = "unclosed_call" if text.rfind(env.call_open) > text.rfind(env.call_close) else "budget"
        active = still_active

    completion_ids = pad_right(tokens, tokenizer.pad_token_id)  # (B, C)
    completion_mask = pad_right([[1] * len(t) for t in tokens])  # (B, C) every token the model reads
    policy_mask = pad_right(from_policy)  # (B, C) the tokens the policy sampled
    sampler_logprobs = pad_right(logprobs, 0.0, torch.float32)  # (B, C)
    stats = {"turns": turns, "tool_calls": calls, "tool_errors": errors,
             **{f"ended/{r}": [float(e == r) for e in ended] for r in END_REASONS}}
    return Rollout(
        prompt_ids=prompt_ids.to(device), prompt_mask=prompt_mask.to(device),
        completion_ids=completion_ids.to(device), completion_mask=completion_mask.to(device),
        sampler_logprobs=(sampler_logprobs * policy_mask).to(device),
        is_eos=torch.tensor([e == "answer" for e in ended], device=device),
        prompt_index=torch.arange(len(prompts), device=device).repeat_interleave(n),
        completions=tokenizer.batch_decode(completion_ids, skip_special_tokens=True),
        policy_mask=policy_mask.to(device),
        tool_stats={k: torch.tensor(v, dtype=torch.float32, device=device) for k, v in stats.items()},
    )


def tool_metrics(rollout: Rollout) -> dict:
    """The tool side of a step's log: turns, calls and errors per completion, why completions ended,
    the share of completion tokens that are observations, and sampled accuracy with vs without a call."""
    if not rollout.tool_stats:
        return {}
    called = rollout.tool_stats["tool_calls"] > 0  # (B,)
    correct = rollout.reward_terms["correct"].float() if "correct" in rollout.reward_terms else None
    accuracy = lambda rows: correct[rows].mean().item() if correct is not None and rows.any() else None
    policy_share = (rollout.policy_mask.sum() / rollout.completion_mask.sum().clamp(min=1)).item()
    return {**{f"tool/{k}": v.mean().item() for k, v in rollout.tool_stats.items()},
            "tool/call_rate": called.float().mean().item(), "tool/observation_token_share": 1 - policy_share,
            "tool/accuracy_with_call": accuracy(called), "tool/accuracy_without_call": accuracy(~called)}


def encode_tool_demonstrations(tokenizer, env: ToolEnvironment, prompts: list[str], completions: list[str],
                               eos_id: int, max_completion_len: int):
    """`encode_demonstrations` for a tool task: each demonstration tokenised segment by segment, as a
    rollout lays it out, so its observations get policy_mask 0 (SFT must not learn to write the tool's
    answers; it learns to call, and to read). Returns prompt_ids, prompt_mask, completion_ids,
    completion_mask, policy_mask."""
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    rows = []
    for completion in completions:
        ids, flags = [], []
        for text, is_policy in env.split(completion):
            piece = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
            ids, flags = ids + piece, flags + [int(is_policy)] * len(piece)
        rows.append(((ids + [eos_id])[:max_completion_len], (flags + [1])[:max_completion_len]))
    completion_ids = pad_right([ids for ids, _ in rows], tokenizer.pad_token_id)  # (B, C)
    completion_mask = pad_right([[1] * len(ids) for ids, _ in rows])  # (B, C)
    policy_mask = pad_right([flags for _, flags in rows])  # (B, C)
    return enc["input_ids"], enc["attention_mask"], completion_ids, completion_mask, policy_mask
