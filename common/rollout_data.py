"""The `Rollout` batch every script passes around: prompts, completions, their masks and rewards.

Its own module, with no dependency on any sampler, so the HF path (common/rollout.py) and the
vLLM path (common/vllm_engine.py) both build it without importing each other.
`common.rollout` re-exports `Rollout`, as the scripts import it from there.
"""

from dataclasses import dataclass, field, fields

import torch


@dataclass
class Rollout:
    """One batch of B = num_prompts * n completions, row i from prompt `prompt_index[i]`.

    Rows come in groups: rows i*n .. i*n+n-1 are the n samples of one prompt, and every
    slice the scripts take keeps whole groups.
    """

    prompt_ids: torch.Tensor  # (B, P) left-padded
    prompt_mask: torch.Tensor  # (B, P) 1 on real prompt tokens
    completion_ids: torch.Tensor  # (B, C) right-padded with pad_token_id
    completion_mask: torch.Tensor  # (B, C) 1 on completion tokens up to and including EOS (the attention mask)
    sampler_logprobs: torch.Tensor  # (B, C) log-prob of each token under the sampler (T applied)
    is_eos: torch.Tensor  # (B,) bool: the completion ended with EOS (False = truncated)
    prompt_index: torch.Tensor  # (B,) long: which prompt of the batch the row answers
    completions: list[str]  # decoded completion texts, special tokens removed
    # filled in by generate_and_score:
    rewards: torch.Tensor | None = None  # (B,) total reward R_i
    reward_terms: dict[str, torch.Tensor] = field(default_factory=dict)  # each term of R_i, (B,) each
    reasons: list[str] = field(default_factory=list)  # why correctness was what it was (common/rewards.py)
    # multi-turn (common/environment.py): the loss mask, and per-row tool counts
    policy_mask: torch.Tensor | None = None  # (B, C) 1 on tokens the policy sampled; default completion_mask
    tool_stats: dict[str, torch.Tensor] = field(default_factory=dict)  # (B,) each: turns, tool_calls, ...

    def __post_init__(self):
        """Single-turn: every completion token is the policy's. Multi-turn: tool observations are in
        completion_mask (the model reads them) and not in policy_mask (no loss, KL or count sees them)."""
        if self.policy_mask is None:
            self.policy_mask = self.completion_mask

    def __len__(self) -> int:
        return self.completion_ids.shape[0]

    @property
    def completion_lengths(self) -> torch.Tensor:
        return self.policy_mask.sum(-1)  # (B,) the policy's tokens: observations are not its length

    def __getitem__(self, rows) -> "Rollout":
        """The sub-batch of some rows: a slice, a list or a LongTensor of row indices."""
        index = list(range(len(self)))[rows] if isinstance(rows, slice) else torch.as_tensor(rows).tolist()
        tensor_rows = torch.tensor(index, dtype=torch.long, device=self.completion_ids.device)
        return Rollout(
            **{f.name: getattr(self, f.name)[tensor_rows] for f in fields(self) if f.name in _ROW_TENSORS},
            completions=[self.completions[i] for i in index],
            rewards=None if self.rewards is None else self.rewards[tensor_rows],
            reward_terms={k: v[tensor_rows] for k, v in self.reward_terms.items()},
            reasons=[self.reasons[i] for i in index] if self.reasons else [],
            tool_stats={k: v[tensor_rows] for k, v in self.tool_stats.items()},
        )

    @staticmethod
    def cat(rollouts: list["Rollout"], pad_token_id: int) -> "Rollout":
        """Stack rollouts into one: prompts re-padded on the left, completions on the right,
        prompt_index offset so that groups stay distinct."""
        P = max(r.prompt_ids.shape[1] for r in rollouts)
        C = max(r.completion_ids.shape[1] for r in rollouts)
        offsets, total = [], 0
        for r in rollouts:
            offsets.append(total)
            total += int(r.prompt_index.max()) + 1 if len(r) else 0
        scored = all(r.rewards is not None for r in rollouts)
        return Rollout(
            prompt_ids=torch.cat([_pad_to(r.prompt_ids, P, pad_token_id, True) for r in rollouts]),
            prompt_mask=torch.cat([_pad_to(r.prompt_mask, P, 0, True) for r in rollouts]),
            completion_ids=torch.cat([_pad_to(r.completion_ids, C, pad_token_id, False) for r in rollouts]),
            completion_mask=torch.cat([_pad_to(r.completion_mask, C, 0, False) for r in rollouts]),
            sampler_logprobs=torch.cat([_pad_to(r.sampler_logprobs, C, 0.0, False) for r in rollouts]),
            is_eos=torch.cat([r.is_eos for r in rollouts]),
            prompt_index=torch.cat([r.prompt_index + o for r, o in zip(rollouts, offsets)]),
            completions=[c for r in rollouts for c in r.completions],
            rewards=torch.cat([r.rewards for r in rollouts]) if scored else None,
            reward_terms={k: torch.cat([r.reward_terms[k] for r in rollouts]) for k in rollouts[0].reward_terms},
            reasons=[x for r in rollouts for x in r.reasons],
            policy_mask=torch.cat([_pad_to(r.policy_mask, C, 0, False) for r in rollouts]),
            tool_stats={k: torch.cat([r.tool_stats[k] for r in rollouts]) for k in rollouts[0].tool_stats
                        if all(k in r.tool_stats for r in rollouts)},
        )


_ROW_TENSORS = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "sampler_logprobs", "is_eos",
                "prompt_index", "policy_mask")


def completion_mask_from_ids(completion_ids: torch.Tensor, eos_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """1 up to and including the first EOS (or everywhere if none): (B, C) mask, (B,) is_eos."""
    is_eos_token = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))  # (B, C)
    is_eos = is_eos_token.any(-1)  # (B,)
    # index of the first EOS, or C if there is none
    first_eos = torch.where(is_eos, is_eos_token.int().argmax(-1), completion_ids.shape[1])  # (B,)
    positions = torch.arange(completion_ids.shape[1], device=completion_ids.device)  # (C,)
    mask = (positions[None, :] <= first_eos[:, None]).long()  # (B, C)
    return mask, is_eos


def pad_right(rows: list[list], value=0, dtype=torch.long) -> torch.Tensor:
    """Rows of different lengths as one (B, max length) tensor, right-padded with `value` (width >= 1)."""
    out = torch.full((len(rows), max([1, *map(len, rows)])), value, dtype=dtype)
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.tensor(row, dtype=dtype)
    return out


def _pad_to(x: torch.Tensor, width: int, value, left: bool) -> torch.Tensor:
    pad = torch.full((x.shape[0], width - x.shape[1]), value, dtype=x.dtype, device=x.device)
    return torch.cat([pad, x] if left else [x, pad], dim=1)
