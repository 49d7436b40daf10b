"""Rollouts: sample n completions per prompt and return them as one `Rollout` batch.

Every RL script calls `generate(...)` and gets the same dataclass back, whatever the
backend. The HF backend (`model.generate`) is here; a vLLM backend plugs into the same
`generate` signature (common/vllm_engine.py) so the scripts never branch on it beyond
choosing one.

The sampler's own per-token logprobs are returned too (`sampler_logprobs`): with vLLM they
differ from the trainer's even at identical weights (different kernels), and TIS/IcePop and
the mismatch metrics need them. With HF they come from the same model and match the
trainer's up to numerics.
"""

from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, LogitsProcessorList


@dataclass
class Rollout:
    """One batch of B = num_prompts * n completions, row i from prompt `prompt_index[i]`."""

    prompt_ids: torch.Tensor  # (B, P) left-padded
    prompt_mask: torch.Tensor  # (B, P) 1 on real prompt tokens
    completion_ids: torch.Tensor  # (B, C) right-padded with pad_token_id
    completion_mask: torch.Tensor  # (B, C) 1 on completion tokens up to and including EOS
    sampler_logprobs: torch.Tensor  # (B, C) log-prob of each token under the sampler (T applied)
    is_eos: torch.Tensor  # (B,) bool: the completion ended with EOS (False = truncated)
    prompt_index: torch.Tensor  # (B,) long: index of the prompt in the batch of prompts
    completions: list[str]  # decoded completion texts, special tokens removed

    @property
    def completion_lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(-1)  # (B,)


class _RecordSampledLogprobs(LogitsProcessor):
    """Records log pi_sampler(y_t) = log_softmax(z_t / T)[y_t] during `generate`, one step of memory.

    A logits processor sees the scores of step t before the token is drawn, and at step t+1
    sees the drawn token in `input_ids`. Keeping only the last step's log-softmax avoids
    `output_scores=True`, which holds (B, V) per step: ~40 GB for 128 x 512 tokens of a 150k
    vocabulary. transformers runs custom processors *before* its temperature/top-p warpers,
    so the temperature is applied here; top-p truncation is not (nor is it by the trainer).
    """

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.pending = None  # (B, V) log-softmax of the last step's scores
        self.logprobs = []  # list of (B,) per generated token

    def collect(self, input_ids: torch.Tensor):
        if self.pending is not None:
            self.logprobs.append(self.pending.gather(-1, input_ids[:, -1:]).squeeze(-1))

    def __call__(self, input_ids, scores):
        self.collect(input_ids)
        self.pending = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores


def completion_mask_from_ids(completion_ids: torch.Tensor, eos_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """1 up to and including the first EOS (or everywhere if none): (B, C) mask, (B,) is_eos."""
    is_eos_token = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))  # (B, C)
    is_eos = is_eos_token.any(-1)  # (B,)
    # index of the first EOS, or C if there is none
    first_eos = torch.where(is_eos, is_eos_token.int().argmax(-1), completion_ids.shape[1])  # (B,)
    positions = torch.arange(completion_ids.shape[1], device=completion_ids.device)  # (C,)
    mask = (positions[None, :] <= first_eos[:, None]).long()  # (B, C)
    return mask, is_eos


@torch.no_grad()
def generate_hf(
    model,
    tokenizer,
    prompts: list[str],
    n: int = 1,
    temperature: float = 1.0,
    max_new_tokens: int = 16,
    top_p: float = 1.0,
    eos_ids: list[int] | None = None,
) -> Rollout:
    """Sample n completions for each prompt with `model.generate`.

    temperature == 0 means greedy. Rows are grouped by prompt: rows i*n .. i*n+n-1 belong to
    prompt i (so a (num_prompts, n) view gives the groups GRPO normalises over).
    """
    device = next(model.parameters()).device
    eos_ids = eos_ids or [tokenizer.eos_token_id]
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    prompt_ids = enc["input_ids"].repeat_interleave(n, dim=0)  # (B, P)
    prompt_mask = enc["attention_mask"].repeat_interleave(n, dim=0)  # (B, P)
    greedy = temperature == 0
    recorder = _RecordSampledLogprobs(1.0 if greedy else temperature)
    was_training = model.training
    model.eval()
    out = model.generate(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        do_sample=not greedy,
        temperature=None if greedy else temperature,
        top_p=None if greedy else top_p,
        repetition_penalty=1.0,  # a hub generation_config (e.g. Qwen's 1.05) must not reshape the distribution
        top_k=None if greedy else 0,  # some transformers versions default to top_k=50; 0 = off: T alone shapes p
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_ids,
        pad_token_id=tokenizer.pad_token_id,
        logits_processor=LogitsProcessorList([recorder]),
    )
    model.train(was_training)
    completion_ids = out[:, prompt_ids.shape[1] :]  # (B, C)
    recorder.collect(out)  # the last token's logprob is still pending
    sampler_logprobs = torch.stack(recorder.logprobs, dim=1)  # (B, C)
    completion_mask, is_eos = completion_mask_from_ids(completion_ids, eos_ids)
    completion_ids = completion_ids.masked_fill(completion_mask == 0, tokenizer.pad_token_id)
    return Rollout(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        sampler_logprobs=sampler_logprobs * completion_mask,
        is_eos=is_eos,
        prompt_index=torch.arange(len(prompts), device=device).repeat_interleave(n),
        completions=tokenizer.batch_decode(completion_ids, skip_special_tokens=True),
    )


def generate(engine, model, tokenizer, prompts, n=1, temperature=1.0, max_new_tokens=16, top_p=1.0, eos_ids=None):
    """The one entry point the scripts call: `engine` is None for HF generate, or a vLLM engine."""
    if engine is None:
        return generate_hf(model, tokenizer, prompts, n, temperature, max_new_tokens, top_p, eos_ids)
    return engine.generate(prompts, n, temperature, max_new_tokens, top_p)


def _pad_to(x: torch.Tensor, width: int, value, left: bool) -> torch.Tensor:
    pad = torch.full((x.shape[0], width - x.shape[1]), value, dtype=x.dtype, device=x.device)
    return torch.cat([pad, x] if left else [x, pad], dim=1)


def concat_rollouts(rollouts: list[Rollout], pad_token_id: int) -> Rollout:
    """Stack several Rollout batches into one (prompts re-padded on the left, completions on
    the right); prompt_index is offset so that groups stay distinct."""
    P = max(r.prompt_ids.shape[1] for r in rollouts)
    C = max(r.completion_ids.shape[1] for r in rollouts)
    offsets, total = [], 0
    for r in rollouts:
        offsets.append(total)
        total += int(r.prompt_index.max()) + 1 if len(r.prompt_index) else 0
    return Rollout(
        prompt_ids=torch.cat([_pad_to(r.prompt_ids, P, pad_token_id, True) for r in rollouts]),
        prompt_mask=torch.cat([_pad_to(r.prompt_mask, P, 0, True) for r in rollouts]),
        completion_ids=torch.cat([_pad_to(r.completion_ids, C, pad_token_id, False) for r in rollouts]),
        completion_mask=torch.cat([_pad_to(r.completion_mask, C, 0, False) for r in rollouts]),
        sampler_logprobs=torch.cat([_pad_to(r.sampler_logprobs, C, 0.0, False) for r in rollouts]),
        is_eos=torch.cat([r.is_eos for r in rollouts]),
        prompt_index=torch.cat([r.prompt_index + o for r, o in zip(rollouts, offsets)]),
        completions=[c for r in rollouts for c in r.completions],
    )


def select_rows(rollout: Rollout, rows: torch.Tensor) -> Rollout:
    """The sub-batch of the given row indices (e.g. the groups that dynamic sampling keeps)."""
    return Rollout(
        prompt_ids=rollout.prompt_ids[rows],
        prompt_mask=rollout.prompt_mask[rows],
        completion_ids=rollout.completion_ids[rows],
        completion_mask=rollout.completion_mask[rows],
        sampler_logprobs=rollout.sampler_logprobs[rows],
        is_eos=rollout.is_eos[rows],
        prompt_index=rollout.prompt_index[rows],
        completions=[rollout.completions[i] for i in rows.tolist()],
    )
