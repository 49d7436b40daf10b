"""Per-token log-probabilities, entropy and masked reductions: the trainer's side of every loss.

Two facts every script relies on:
- The sampler draws from softmax(z / T). The trainer must score that same distribution, so
  logits are divided by the sampling temperature *before* log-softmax (a known peer bug is
  to forget this; the importance ratio is then wrong from the first step).
- With left padding, position ids must come from the attention mask, as `generate` does:
  otherwise a padded prompt shifts every position. For rotary models (Llama, Qwen) that
  changes logprobs only at rounding level; for absolute positions (GPT-2) it is wrong.
"""

import torch
import torch.nn.functional as F

from common.distributed import all_reduce


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean of x over positions where mask is 1 (0 where the mask is empty, never NaN)."""
    return masked_sum(x, mask, dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance over the valid positions."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    return masked_sum((x - mean) ** 2, mask) / (n - 1).clamp(min=1)


def top_tokens(scores: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """(B, C) bool: the k valid positions with the largest scores (ties broken by position)."""
    chosen = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    chosen[scores.masked_fill(~mask.bool(), float("-inf")).flatten().topk(k).indices] = True
    return chosen.view_as(mask) & mask.bool()


def batch_moments(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased variance of x over the valid positions of the *whole* batch: under torchrun
    the sums are all-reduced over ranks, so a whitening never uses one rank's statistics."""
    n = all_reduce(mask.sum())
    mean = all_reduce(masked_sum(x, mask)) / n.clamp(min=1)
    var = all_reduce(masked_sum((x - mean) ** 2, mask)) / (n - 1).clamp(min=1)
    return mean, var


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[index] without materialising the (B, T, V) log-softmax.

    logits (B, T, V), index (B, T) -> (B, T). In fp32 this is gather - logsumexp; in bf16
    logsumexp loses precision, so rows are done one at a time in fp32 instead.
    """
    if logits.dtype in (torch.float32, torch.float64):
        picked = logits.gather(-1, index.unsqueeze(-1)).squeeze(-1)
        return picked - torch.logsumexp(logits, dim=-1)
    rows = [F.log_softmax(row.float(), -1).gather(-1, i.unsqueeze(-1)).squeeze(-1) for row, i in zip(logits, index)]
    return torch.stack(rows)


def entropy_from_logits(logits: torch.Tensor, chunk_size: int = 8) -> torch.Tensor:
    """H = logsumexp(z) - sum_v softmax(z)_v z_v, per position: (B, T, V) -> (B, T).

    Chunked over the batch so a large vocabulary never holds more than one chunk of fp32
    probabilities. Entropy is a diagnostic (and a bonus term): callers detach it when they
    only log it.
    """
    out = []
    for chunk in logits.split(chunk_size, dim=0):
        chunk = chunk.float()
        probs = torch.softmax(chunk, dim=-1)
        out.append(torch.logsumexp(chunk, dim=-1) - (probs * chunk).sum(-1))
    return torch.cat(out, dim=0)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count only real tokens: left padding does not shift them. (B, L) -> (B, L)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def completion_logprobs(
    model,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
    group_size: int = 1,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(y_t | x, y_<t) / T-scaled, for each completion token, and optionally its entropy.

    prompt_ids, prompt_mask (B, P) left-padded; completion_ids, completion_mask (B, C)
    right-padded. Returns logprobs (B, C) and entropy (B, C) or None; values at masked
    positions are meaningless and must be masked by the caller.
    group_size G > 1 says rows come in groups of G that share one prompt (rows i*G .. i*G+G-1):
    each prompt is then run once instead of G times (same values, less work).
    """
    if group_size > 1:
        return _grouped_completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask,
                                            temperature, with_entropy, group_size)
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)  # (B, P + C)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)  # (B, P + C)
    num_completion = completion_ids.shape[1]
    # logits_to_keep: only the C positions that predict completion tokens (+1, dropped below)
    # are projected onto the vocabulary; the prompt's logits are never built.
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        logits_to_keep=num_completion + 1,
        use_cache=False,
    ).logits  # (B, C + 1, V)
    logits = logits[:, :-1, :] / temperature  # position t predicts completion token t: (B, C, V)
    logprobs = selective_log_softmax(logits, completion_ids)  # (B, C)
    entropy = None
    if with_entropy:
        entropy = entropy_from_logits(logits)  # (B, C)
    return logprobs, entropy


def _grouped_completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature,
                                 with_entropy, group_size):
    """completion_logprobs for rows grouped by prompt: the prompt's forward pass runs once per
    group, its KV cache is repeated G times, and only the completion tokens run per row.

    With short completions the prompt is most of every row (13 of ~17 tokens on the tiny
    task), so this does about a third of the work. Gradients flow through the shared cache.
    """
    from transformers import DynamicCache

    B, C = completion_ids.shape
    assert B % group_size == 0, "rows must hold whole groups"
    assert torch.equal(prompt_ids[::group_size].repeat_interleave(group_size, 0), prompt_ids), "rows not grouped"
    unique_ids, unique_mask = prompt_ids[::group_size], prompt_mask[::group_size]  # (B / G, P)
    cache = DynamicCache(config=getattr(model, "module", model).config)  # DDP wraps the HF model
    out = model(input_ids=unique_ids, attention_mask=unique_mask, position_ids=position_ids_from_mask(unique_mask),
                past_key_values=cache, use_cache=True, logits_to_keep=1)
    first_logits = out.logits.repeat_interleave(group_size, dim=0)  # predicts completion token 0: (B, 1, V)
    cache = out.past_key_values
    cache.batch_repeat_interleave(group_size)  # (B / G, ...) -> (B, ...), differentiable
    if C == 1:
        logits = first_logits / temperature  # (B, 1, V)
        return selective_log_softmax(logits, completion_ids), entropy_from_logits(logits) if with_entropy else None
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)  # (B, P + C)
    rest_logits = model(
        input_ids=completion_ids[:, :-1],  # token t predicts token t + 1
        attention_mask=attention_mask[:, :-1],
        position_ids=position_ids_from_mask(attention_mask)[:, prompt_ids.shape[1]:-1],
        past_key_values=cache,
        use_cache=True,
    ).logits  # (B, C - 1, V)
    logits = torch.cat([first_logits, rest_logits], dim=1) / temperature  # (B, C, V)
    logprobs = selective_log_softmax(logits, completion_ids)  # (B, C)
    return logprobs, entropy_from_logits(logits) if with_entropy else None


def rollout_logprobs(model, batch, *, temperature: float = 1.0, with_entropy: bool = False, group_size: int = 1):
    """`completion_logprobs` of a Rollout (or a slice of one): (B, C) logprobs, (B, C) entropy or None.

    group_size G > 1 runs each shared prompt once (the batch must hold whole groups of G).
    """
    return completion_logprobs(model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                               batch.completion_mask, temperature, with_entropy, group_size)


@torch.no_grad()
def score_rollout(model, rollout, micro_size: int, *, temperature: float = 1.0, with_entropy: bool = False,
                  group_size: int = 1):
    """A no-grad scoring pass over the whole rollout in micro-batches of micro_size rows.

    What the RL scripts' "Score" step runs with the rollout-time policy (logp_old) and the
    frozen reference (logp_ref). Returns (B, C) logprobs and (B, C) entropy or None.
    """
    parts = [rollout_logprobs(model, rollout[i:i + micro_size], temperature=temperature, with_entropy=with_entropy,
                              group_size=group_size) for i in range(0, len(rollout), micro_size)]
    logprobs = torch.cat([lp for lp, _ in parts])  # (B, C)
    return logprobs, torch.cat([h for _, h in parts]) if with_entropy else None


def rollout_logits(model, batch, *, temperature: float = 1.0) -> torch.Tensor:
    """The full next-token logits / T at every completion position of a Rollout (slice): (B, C, V).

    Position t predicts completion token t, as in `completion_logprobs`. For losses over the whole
    distribution (on-policy distillation's exact per-position KL); everything else needs only the
    sampled token's logprob (`rollout_logprobs`), which never keeps a (B, C, V) tensor around.
    """
    input_ids = torch.cat([batch.prompt_ids, batch.completion_ids], dim=1)  # (B, P + C)
    attention_mask = torch.cat([batch.prompt_mask, batch.completion_mask], dim=1)  # (B, P + C)
    num_completion = batch.completion_ids.shape[1]
    logits = model(input_ids=input_ids, attention_mask=attention_mask,
                   position_ids=position_ids_from_mask(attention_mask), logits_to_keep=num_completion + 1,
                   use_cache=False).logits  # (B, C + 1, V)
    return logits[:, :-1, :].float() / temperature
