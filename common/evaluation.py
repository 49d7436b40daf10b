"""Evaluation on held-out prompts: greedy accuracy and unbiased pass@k of samples at T = 1.

Every script ends with `evaluate(...)` and logs its result as the final
`{"event": "eval", ...}` record of metrics.jsonl, so runs of different scripts compare.
`evaluate(..., num_samples=64, ks=range(1, 65))` gives the whole pass@k curve (does RL only
sharpen what the model can already sample, or does it reach new answers? Yue et al., 2025),
and a task whose test split has a `slice` column gets every number per slice as well.
Under torchrun each rank evaluates every N-th prompt and the ranks pool their per-prompt
results, so every rank returns the same numbers.
"""

import math
from collections.abc import Iterable, Sequence

import torch

from common import distributed
from common.rewards import score_completions
from common.environment import answer_texts
from common.rollout import generate
from common.tasks import format_prompt

def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al., 2021): 1 - C(n - c, k) / C(n, k), n samples, c correct.

    Computed as a product so large n does not overflow:
    C(n-c, k) / C(n, k) = prod_{i = n-c+1}^{n} (1 - k / i).
    """
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def pass_at_k_curve(counts: Sequence[tuple[int, int]], ks: Iterable[int]) -> dict[int, float]:
    """Mean unbiased pass@k over prompts, for each k: {k: pass@k}. counts holds (n, c) per prompt.

    >>> pass_at_k_curve([(4, 1), (4, 0)], ks=[1, 2, 4])  # one prompt right 1 time in 4, one never
    {1: 0.125, 2: 0.25, 4: 0.5}
    """
    if not counts:
        raise ValueError("pass@k of no prompts is undefined")
    return {k: sum(pass_at_k(n, c, k) for n, c in counts) / len(counts) for k in ks}


def powers_of_two(n: int) -> tuple[int, ...]:
    """1, 2, 4, ... up to n: the default ks (n = 8 gives the classic pass@1, 2, 4, 8)."""
    return tuple(2**i for i in range(n.bit_length()))


@torch.no_grad()
def evaluate(
    model,
    tokenizer,
    task,
    num_prompts: int = 200,
    num_samples: int = 8,
    max_new_tokens: int | None = None,
    batch_size: int = 64,
    engine=None,
    eos_ids=None,
    seed: int = 1234,
    ks: Iterable[int] | None = None,
) -> dict:
    """Greedy accuracy and pass@k on the task's test split; k in ks (default 1, 2, 4, ... up to num_samples).

    pass@1 is the mean correctness of T = 1 samples ("sampled accuracy"); `accuracy` is
    greedy. Sampling runs under its own seed inside a forked RNG, so evaluating in the middle
    of training neither changes the training run nor depends on when it happens.
    When the test split has a `slice` column, the result also holds `accuracy/<slice>`,
    `pass@k/<slice>` and `num_prompts/<slice>` for each slice (after the usual keys). A tool task's also
    holds `tool_call_rate`, `pass@1_with_call`, `pass@1_without_call` (and per slice): see tool_call_metrics.
    """
    ks = powers_of_two(num_samples) if ks is None else tuple(ks)
    if not ks or min(ks) < 1 or max(ks) > num_samples:
        raise ValueError(f"ks must lie in 1..num_samples={num_samples}, got {ks}")
    test = task.test.select(range(min(num_prompts, len(task.test))))
    max_new_tokens = max_new_tokens or task.max_new_tokens
    mine = my_share(len(test))  # this rank's prompts (all of them under plain python)
    greedy_correct, counts, called = [], [], []  # per prompt: greedy right, (samples, right), tool calls
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        torch.manual_seed(seed + distributed.rank())
        for start in range(0, len(mine), batch_size):
            rows = test.select(mine[start:start + batch_size])
            prompts = [format_prompt(tokenizer, q, task.system_prompt) for q in rows["question"]]
            answers = rows["answer"]

            greedy = generate(engine, model, tokenizer, prompts, 1, 0.0, max_new_tokens, eos_ids=eos_ids,
                              environment=task.environment)
            _, terms, _ = score_completions(task.verifier, answer_texts(task, greedy.completions), answers,
                                            greedy.is_eos.tolist())
            greedy_correct += terms["correct"]

            sampled = generate(engine, model, tokenizer, prompts, num_samples, 1.0, max_new_tokens, eos_ids=eos_ids,
                               environment=task.environment)
            sampled_answers = [answers[i] for i in sampled.prompt_index.tolist()]
            _, terms, _ = score_completions(task.verifier, answer_texts(task, sampled.completions), sampled_answers,
                                            sampled.is_eos.tolist())
            correct_per_prompt = torch.tensor(terms["correct"]).view(len(prompts), num_samples).sum(-1)  # (prompts,)
            counts += [(num_samples, int(c)) for c in correct_per_prompt]
            if task.environment is not None:  # per prompt: (samples that called, right among them, right others)
                call = (sampled.tool_stats["tool_calls"] > 0).view(len(prompts), -1).cpu()  # (prompts, num_samples)
                right = torch.tensor(terms["correct"]).view(len(prompts), -1).bool()
                called += list(zip(call.sum(-1).tolist(), (call & right).sum(-1).tolist(),
                                   (~call & right).sum(-1).tolist()))
    greedy_correct, counts = pool_shares(len(test), mine, greedy_correct, counts)
    if task.environment is not None:
        (called,) = pool_shares(len(test), mine, called)
    result = {"event": "eval", "accuracy": sum(greedy_correct) / len(greedy_correct)}
    result.update({f"pass@{k}": v for k, v in pass_at_k_curve(counts, ks).items()})
    result["num_prompts"] = len(test)
    result["num_samples"] = num_samples
    if task.environment is not None:
        result.update(tool_call_metrics(called, num_samples))
    if "slice" in test.column_names:
        slice_of = test["slice"][:]
        names = list(getattr(task, "slices", ())) or sorted(set(slice_of))
        for name in names:
            rows = [i for i, s in enumerate(slice_of) if s == name]
            if not rows:
                continue  # a slice absent from the evaluated prompts has no accuracy, not 0
            result[f"accuracy/{name}"] = sum(greedy_correct[i] for i in rows) / len(rows)
            result.update({f"pass@{k}/{name}": v for k, v in pass_at_k_curve([counts[i] for i in rows], ks).items()})
            result[f"num_prompts/{name}"] = len(rows)
            if task.environment is not None:
                result.update({f"{k}/{name}": v for k, v in tool_call_metrics([called[i] for i in rows],
                                                                               num_samples).items()})
    return result


def tool_call_metrics(called: list[tuple[int, int, int]], num_samples: int) -> dict:
    """A tool task's T = 1 samples (pass@1's): the share that called the tool, and pass@1 among the samples that
    called and among those that did not (None where there are none). called: per prompt (samples that called,
    right among them, right among the others)."""
    calls, right_called, right_other = (sum(c[j] for c in called) for j in range(3))
    others = len(called) * num_samples - calls
    return {"tool_call_rate": calls / (len(called) * num_samples),
            "pass@1_with_call": right_called / calls if calls else None,
            "pass@1_without_call": right_other / others if others else None}


@torch.no_grad()
def greedy_accuracy(model, tokenizer, task, num_prompts: int = 64, max_new_tokens: int | None = None,
                    engine=None, eos_ids=None) -> float:
    """Greedy accuracy on the first num_prompts held-out prompts: the cheap in-training check."""
    test = task.test.select(range(min(num_prompts, len(task.test))))
    mine = my_share(len(test))
    rows = test.select(mine)
    prompts = [format_prompt(tokenizer, q, task.system_prompt) for q in rows["question"]]
    greedy = generate(engine, model, tokenizer, prompts, 1, 0.0, max_new_tokens or task.max_new_tokens,
                      eos_ids=eos_ids, environment=task.environment)
    _, terms, _ = score_completions(task.verifier, answer_texts(task, greedy.completions), rows["answer"],
                                    greedy.is_eos.tolist())
    (correct,) = pool_shares(len(test), mine, terms["correct"])
    return sum(correct) / len(correct)


def my_share(num_prompts: int) -> list[int]:
    """This rank's prompt indices: r, r + N, r + 2N, ... Every rank gets the same count (the last
    ranks repeat prompt indices mod num_prompts, dropped when pooling), so under FSDP2 every rank
    runs the same number of generate calls. range(num_prompts) under plain python."""
    n = distributed.world_size()
    padded = -(-num_prompts // n) * n
    return [i % num_prompts for i in range(distributed.rank(), padded, n)]


def pool_shares(num_prompts: int, mine: list[int], *per_prompt: list) -> tuple[list, ...]:
    """Every rank's per-prompt lists -> the lists over all num_prompts prompts, in prompt order."""
    pooled = [dict() for _ in per_prompt]
    for indices, values in distributed.all_gather_object((mine, per_prompt)):
        for out, column in zip(pooled, values):
            for i, v in zip(indices, column):
                out.setdefault(i, v)  # a repeated padding index keeps its first (real) value
    return tuple([out[i] for i in range(num_prompts)] for out in pooled)
