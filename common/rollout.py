"""Rollouts: sample n completions per prompt and return them as one `Rollout` batch.

Every RL script talks to an *engine* with two methods, whatever the backend:
    engine.generate(prompts, n, temperature, max_new_tokens, top_p) -> Rollout
    engine.sync_weights(model)            push the trainer's weights into the sampler
`HFEngine` (here) samples with the policy's own `model.generate`, so its sync is a no-op;
`VLLMEngine` (common/vllm_engine.py) is a colocated vLLM engine. `build_engine` picks one,
so the scripts never branch on the backend.

`generate_and_score` is one rollout round of every RL script: sample, then score each
completion with the task's verifier (plus the format and overlong terms), and return one
`Rollout` that carries its rewards. A `Rollout` slices by rows (`rollout[rows]`), has a
length, and concatenates (`Rollout.cat`), so variants such as DAPO's dynamic sampling are
a few visible lines in the script.

The sampler's own per-token logprobs are returned too (`sampler_logprobs`): with vLLM they
differ from the trainer's even at identical weights (different kernels), and TIS/IcePop and
the mismatch metrics need them. With HF they come from the same model and match the
trainer's up to numerics.
"""

from dataclasses import dataclass, field, fields

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from common import distributed
from common.rewards import overlong_penalty, score_rows
from common.tasks import format_prompt, rows_at


@dataclass
class Rollout:
    """One batch of B = num_prompts * n completions, row i from prompt `prompt_index[i]`.

    Rows come in groups: rows i*n .. i*n+n-1 are the n samples of one prompt, and every
    slice the scripts take keeps whole groups.
    """

    prompt_ids: torch.Tensor  # (B, P) left-padded
    prompt_mask: torch.Tensor  # (B, P) 1 on real prompt tokens
    completion_ids: torch.Tensor  # (B, C) right-padded with pad_token_id
    completion_mask: torch.Tensor  # (B, C) 1 on completion tokens up to and including EOS
    sampler_logprobs: torch.Tensor  # (B, C) log-prob of each token under the sampler (T applied)
    is_eos: torch.Tensor  # (B,) bool: the completion ended with EOS (False = truncated)
    prompt_index: torch.Tensor  # (B,) long: which prompt of the batch the row answers
    completions: list[str]  # decoded completion texts, special tokens removed
    # filled in by generate_and_score:
    rewards: torch.Tensor | None = None  # (B,) total reward R_i
    reward_terms: dict[str, torch.Tensor] = field(default_factory=dict)  # each term of R_i, (B,) each
    reasons: list[str] = field(default_factory=list)  # why correctness was what it was (common/rewards.py)

    def __len__(self) -> int:
        return self.completion_ids.shape[0]

    @property
    def completion_lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(-1)  # (B,)

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
        )


_ROW_TENSORS = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "sampler_logprobs", "is_eos",
                "prompt_index")


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
        # FSDP2: every decoding step all-gathers the weights, so a rank whose rows all ended
        # keeps stepping until every rank is done (else the others wait forever)
        synced_gpus=distributed.is_sharded(model) and distributed.world_size() > 1,
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


class HFEngine:
    """HF `model.generate` behind the engine interface. The policy samples itself, so the
    sampler always has the trainer's current weights and `sync_weights` has nothing to do."""

    def __init__(self, model, tokenizer, eos_ids: list[int]):
        self.model, self.tokenizer, self.eos_ids = model, tokenizer, eos_ids

    def generate(self, prompts, n=1, temperature=1.0, max_new_tokens=16, top_p=1.0) -> Rollout:
        return generate_hf(self.model, self.tokenizer, prompts, n, temperature, max_new_tokens, top_p, self.eos_ids)

    def sync_weights(self, model):
        pass


def build_engine(rollout: str, model, tokenizer, eos_ids: list[int], task=None, max_new_tokens: int = 0,
                 **vllm_kwargs):
    """`--rollout hf` -> HFEngine; `--rollout vllm` -> a colocated VLLMEngine built with vllm_kwargs.

    vLLM is imported only when asked for, so the HF path never needs it. Its context length is
    the task's longest prompt (train and test) plus the completion budget.
    """
    if rollout == "hf":
        return HFEngine(model, tokenizer, eos_ids)
    from common.vllm_engine import VLLMEngine

    questions = [*task.prompts["question"], *task.test["question"]]
    prompts = [format_prompt(tokenizer, q, task.system_prompt) for q in questions]
    longest_prompt = max(map(len, tokenizer(prompts, add_special_tokens=False)["input_ids"]))  # one batched call
    return VLLMEngine(max_model_len=longest_prompt + max_new_tokens, eos_ids=eos_ids,
                      pad_token_id=tokenizer.pad_token_id, tokenizer=tokenizer, **vllm_kwargs)


def generate(engine, model, tokenizer, prompts, n=1, temperature=1.0, max_new_tokens=16, top_p=1.0, eos_ids=None):
    """Sample with `engine`, or with HF generate on `model` when engine is None (evaluation's entry point)."""
    if engine is None:
        return generate_hf(model, tokenizer, prompts, n, temperature, max_new_tokens, top_p, eos_ids)
    return engine.generate(prompts, n, temperature, max_new_tokens, top_p)


def generate_and_score(engine, tokenizer, task, position: int, num_prompts: int, seed: int, n: int,
                       temperature: float, max_new_tokens: int, top_p: float = 1.0, format_weight: float = 0.0,
                       overlong_cache_len: int = 0) -> Rollout:
    """One rollout round: prompts `position .. position + num_prompts - 1` of the task's shuffled
    prompt stream, n completions each, every completion scored.

    R_i = correct + format_weight * format (+ DAPO's overlong penalty when overlong_cache_len > 0).
    The stream is a pure function of (seed, position), so a resumed run sees the same prompts.
    """
    rows = task.prompts[rows_at(len(task.prompts), position, num_prompts, seed)]
    prompts = [format_prompt(tokenizer, q, task.system_prompt) for q in rows["question"]]
    rollout = engine.generate(prompts, n, temperature, max_new_tokens, top_p)
    answers = [rows["answer"][i] for i in rollout.prompt_index.tolist()]
    rewards, terms, reasons = score_rows(task.verifier, rollout.completions, answers, rollout.is_eos.tolist(),
                                         format_weight)
    device = rollout.completion_ids.device
    rollout.reward_terms = {k: torch.tensor(v, device=device) for k, v in terms.items()}  # (B,) each
    rollout.rewards = torch.tensor(rewards, device=device)  # (B,)
    if overlong_cache_len > 0:  # DAPO: soft penalty over the last overlong_cache_len tokens of the budget
        lengths = rollout.completion_lengths.tolist()
        overlong = [overlong_penalty(length, max_new_tokens, overlong_cache_len) for length in lengths]
        rollout.reward_terms["overlong"] = torch.tensor(overlong, device=device)
        rollout.rewards = rollout.rewards + rollout.reward_terms["overlong"]
    rollout.reasons = reasons
    return rollout


def groups_with_signal(rewards: torch.Tensor, G: int) -> torch.Tensor:
    """Row indices of the groups whose rewards are not all equal: the only ones a group-relative
    advantage gives a gradient (DAPO's dynamic sampling keeps these). rewards (B,) -> (rows,).
    A "group" of one has no spread: with G = 1 no row counts (callers log null, not a fraction)."""
    has_signal = rewards.view(-1, G).std(dim=1, correction=0) > 0  # (num_groups,); population std: no NaN at G = 1
    return has_signal.repeat_interleave(G).nonzero().squeeze(-1)


def reward_metrics(rollout: Rollout, G: int) -> dict:
    """The reward side of a step's log, over every row sampled: reward and each of its terms,
    sampled accuracy (pass@1 of the rollouts), zero-std groups, and why completions failed."""
    n = len(rollout)
    return {
        "reward": rollout.rewards.mean().item(),
        **{f"reward/{k}": v.float().mean().item() for k, v in rollout.reward_terms.items()},
        "sampled_accuracy": rollout.reward_terms["correct"].float().mean().item(),  # eval's `accuracy` is greedy
        "frac_zero_std_groups": 1 - len(groups_with_signal(rollout.rewards, G)) / n if G > 1 else None,
        **{f"reasons/{k}": rollout.reasons.count(k) / n for k in sorted(set(rollout.reasons))},
    }


def _pad_to(x: torch.Tensor, width: int, value, left: bool) -> torch.Tensor:
    pad = torch.full((x.shape[0], width - x.shape[1]), value, dtype=x.dtype, device=x.device)
    return torch.cat([pad, x] if left else [x, pad], dim=1)


def demonstration_rollout(tokenizer, task, position: int, num_prompts: int, seed: int, column: str, eos_id: int,
                          max_new_tokens: int, device) -> Rollout:
    """The demonstrations in `column` ("expert" or "demonstration") of the prompts `generate_and_score`
    samples at `position`, one row per prompt in the same order, as a Rollout scored by the verifier.

    What an SFT+RL mixing script trains on beside the policy's own samples. Completions longer than
    max_new_tokens are cut (and then lose their EOS); sampler_logprobs are 0 (nobody sampled them).
    """
    from common.tasks import encode_demonstrations

    rows = task.prompts[rows_at(len(task.prompts), position, num_prompts, seed)]
    prompts = [format_prompt(tokenizer, q, task.system_prompt) for q in rows["question"]]
    prompt_ids, prompt_mask, completion_ids, completion_mask = (t.to(device) for t in encode_demonstrations(
        tokenizer, prompts, rows[column], eos_id, max_new_tokens))
    last = completion_ids.gather(1, (completion_mask.sum(-1, keepdim=True) - 1).clamp(min=0)).squeeze(-1)  # (B,)
    is_eos = last == eos_id  # False where the demonstration was cut
    demos = Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                    completion_mask=completion_mask, sampler_logprobs=torch.zeros(completion_ids.shape, device=device),
                    is_eos=is_eos, prompt_index=torch.arange(len(prompts), device=device),
                    completions=tokenizer.batch_decode(completion_ids, skip_special_tokens=True))
    rewards, terms, reasons = score_rows(task.verifier, demos.completions, rows["answer"], is_eos.tolist())
    demos.rewards = torch.tensor(rewards, device=device)  # (B,)
    demos.reward_terms = {k: torch.tensor(v, device=device) for k, v in terms.items()}
    demos.reasons = reasons
    return demos
