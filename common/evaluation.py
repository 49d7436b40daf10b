"""Evaluation on held-out prompts: greedy accuracy and unbiased pass@k of samples at T = 1.

Every script ends with `evaluate(...)` and logs its result as the final
`{"event": "eval", ...}` record of metrics.jsonl, so runs of different scripts compare.
"""

import math

import torch

from common.rewards import score_completions
from common.rollout import generate
from common.tasks import format_prompt

PASS_AT = (1, 2, 4, 8)


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
) -> dict:
    """Greedy accuracy and pass@k (k in 1, 2, 4, 8 up to num_samples) on the task's test split.

    pass@1 is the mean correctness of T = 1 samples ("sampled accuracy"); `accuracy` is
    greedy. Sampling runs under its own seed inside a forked RNG, so evaluating in the middle
    of training neither changes the training run nor depends on when it happens.
    """
    test = task.test.select(range(min(num_prompts, len(task.test))))
    max_new_tokens = max_new_tokens or task.max_new_tokens
    greedy_correct, pass_k = [], {k: [] for k in PASS_AT if k <= num_samples}
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        torch.manual_seed(seed)
        for start in range(0, len(test), batch_size):
            rows = test.select(range(start, min(start + batch_size, len(test))))
            prompts = [format_prompt(tokenizer, q, task.system_prompt) for q in rows["question"]]
            answers = rows["answer"]

            greedy = generate(engine, model, tokenizer, prompts, 1, 0.0, max_new_tokens, eos_ids=eos_ids)
            _, terms, _ = score_completions(task.verifier, greedy.completions, answers, greedy.is_eos.tolist())
            greedy_correct += terms["correct"]

            sampled = generate(engine, model, tokenizer, prompts, num_samples, 1.0, max_new_tokens, eos_ids=eos_ids)
            sampled_answers = [answers[i] for i in sampled.prompt_index.tolist()]
            _, terms, _ = score_completions(task.verifier, sampled.completions, sampled_answers,
                                            sampled.is_eos.tolist())
            correct_per_prompt = torch.tensor(terms["correct"]).view(len(prompts), num_samples).sum(-1)  # (prompts,)
            for k in pass_k:
                pass_k[k] += [pass_at_k(num_samples, int(c), k) for c in correct_per_prompt]
    result = {"event": "eval", "accuracy": sum(greedy_correct) / len(greedy_correct)}
    result.update({f"pass@{k}": sum(v) / len(v) for k, v in pass_k.items()})
    result["num_prompts"] = len(test)
    result["num_samples"] = num_samples
    return result


@torch.no_grad()
def greedy_accuracy(model, tokenizer, task, num_prompts: int = 64, max_new_tokens: int | None = None,
                    engine=None, eos_ids=None) -> float:
    """Greedy accuracy on the first num_prompts held-out prompts: the cheap in-training check."""
    rows = task.test.select(range(min(num_prompts, len(task.test))))
    prompts = [format_prompt(tokenizer, q, task.system_prompt) for q in rows["question"]]
    greedy = generate(engine, model, tokenizer, prompts, 1, 0.0, max_new_tokens or task.max_new_tokens,
                      eos_ids=eos_ids)
    _, terms, _ = score_completions(task.verifier, greedy.completions, rows["answer"], greedy.is_eos.tolist())
    return sum(terms["correct"]) / len(terms["correct"])
