"""Rollouts: sample n completions per prompt and return them as one `Rollout` batch.

Every RL script talks to an *engine* with two methods, whatever the backend:
    engine.generate(prompts, n, temperature, max_new_tokens, top_p) -> Rollout
    engine.sync_weights(model)            push the trainer's weights into the sampler
`HFEngine` (here) samples with the policy's own `model.generate`, so its sync is a no-op;
`VLLMEngine` (common/vllm_engine.py) is a colocated vLLM engine. `build_engine` picks one,
so the scripts never branch on the backend.

`generate_and_score` is one rollout round of every RL script: sample, then score each
completion with the task's verifier (plus the format term), and return one
`Rollout` (common/rollout_data.py) that carries its rewards. A `Rollout` slices by rows
(`rollout[rows]`), has a length, and concatenates (`Rollout.cat`), so variants such as
DAPO's dynamic sampling are a few visible lines in the script.

The sampler's own per-token logprobs are returned too (`sampler_logprobs`): with vLLM they
differ from the trainer's even at identical weights (different kernels), and TIS/IcePop and
the mismatch metrics need them. With HF they come from the same model and match the
trainer's up to numerics.
"""

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from common import distributed
from common.rewards import score_rows
from common.environment import answer_texts, encode_tool_demonstrations, rollout_with_tools, tool_metrics
from common.rollout_data import Rollout, completion_mask_from_ids
from common.tasks import format_prompt, rows_at
from common.tracking import frac_zero_std_groups


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
        if torch.isnan(scores).any() or torch.isposinf(scores).any():  # -inf is a masked token, not divergence
            raise SystemExit("error: the policy's logits are NaN or inf while sampling: the last update made the "
                             "weights diverge; lower --learning-rate (or --max-grad-norm) and start again, or "
                             "--resume from the last checkpoint")
        self.pending = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores


@torch.no_grad()
def sample_hf(model, tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor, temperature: float,
              max_new_tokens: int, top_p: float, stop_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """`model.generate` from left-padded contexts (B, L): the new tokens (B, C), padded after the first
    stop id, and the sampler's logprob of each (B, C), of the distribution softmax(z / T)."""
    greedy = temperature == 0
    recorder = _RecordSampledLogprobs(1.0 if greedy else temperature)
    was_training = model.training
    model.eval()
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        do_sample=not greedy,
        temperature=None if greedy else temperature,
        top_p=None if greedy else top_p,
        repetition_penalty=1.0,  # a hub generation_config (e.g. Qwen's 1.05) must not reshape the distribution
        top_k=None if greedy else 0,  # some transformers versions default to top_k=50; 0 = off: T alone shapes p
        max_new_tokens=max_new_tokens,
        eos_token_id=stop_ids,
        pad_token_id=tokenizer.pad_token_id,
        logits_processor=LogitsProcessorList([recorder]),
        # FSDP2: every decoding step all-gathers the weights, so a rank whose rows all ended
        # keeps stepping until every rank is done (else the others wait forever)
        synced_gpus=distributed.is_sharded(model) and distributed.world_size() > 1,
    )
    model.train(was_training)
    recorder.collect(out)  # the last token's logprob is still pending
    return out[:, input_ids.shape[1]:], torch.stack(recorder.logprobs, dim=1)  # (B, C), (B, C)


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
    completion_ids, sampler_logprobs = sample_hf(model, tokenizer, prompt_ids, prompt_mask, temperature,
                                                 max_new_tokens, top_p, eos_ids)  # (B, C) each
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
        self.device = next(model.parameters()).device

    def generate(self, prompts, n=1, temperature=1.0, max_new_tokens=16, top_p=1.0) -> Rollout:
        return generate_hf(self.model, self.tokenizer, prompts, n, temperature, max_new_tokens, top_p, self.eos_ids)

    def sample_tokens(self, contexts: list[list[int]], temperature: float, budgets: list[int], top_p: float,
                      stop_ids: list[int]) -> list[tuple[list[int], list[float]]]:
        """One segment per context (token ids, unpadded): its new ids, up to and including the first stop id
        and at most budgets[i] of them, and their logprobs. The multi-turn loop's sampler
        (common/environment.py); one `generate` call samples every row."""
        enc = self.tokenizer.pad({"input_ids": contexts}, padding_side="left", return_tensors="pt").to(self.device)
        new_ids, logprobs = sample_hf(self.model, self.tokenizer, enc["input_ids"], enc["attention_mask"],
                                      temperature, max(budgets), top_p, stop_ids)  # (B, C) each
        is_stop = torch.isin(new_ids, torch.tensor(stop_ids, device=new_ids.device)).tolist()  # (B, C)
        out = []
        for i, budget in enumerate(budgets):
            end = next((t + 1 for t, stop in enumerate(is_stop[i]) if stop), new_ids.shape[1])
            end = min(end, budget)  # a row past its own budget is cut there, as if it had been asked for that many
            out.append((new_ids[i, :end].tolist(), logprobs[i, :end].tolist()))
        return out

    def sync_weights(self, model):
        pass


def build_engine(args, model, tokenizer, eos_ids: list[int], task, max_new_tokens: int, dtype, device,
                 max_num_seqs: int):
    """`--rollout hf` -> HFEngine; `--rollout vllm` -> a colocated VLLMEngine of args.model (args: the
    script's RLRunArgs: --rollout, --vllm-dtype, --vllm-gpu-memory-utilization, --seed).

    vLLM is imported only when asked for, so the HF path never needs it. Its context length is
    the task's longest prompt (train and test) plus the completion budget.
    """
    if args.rollout == "hf":
        return HFEngine(model, tokenizer, eos_ids)
    from common.vllm_engine import VLLMEngine

    questions = [*task.prompts["question"], *task.test["question"]]
    prompts = [format_prompt(tokenizer, q, task.system_prompt) for q in questions]
    longest_prompt = max(map(len, tokenizer(prompts, add_special_tokens=False)["input_ids"]))  # one batched call
    return VLLMEngine(max_model_len=longest_prompt + max_new_tokens, eos_ids=eos_ids,
                      pad_token_id=tokenizer.pad_token_id, tokenizer=tokenizer, model_path=args.model, dtype=dtype,
                      vllm_dtype=args.vllm_dtype, max_num_seqs=max_num_seqs,
                      gpu_memory_utilization=args.vllm_gpu_memory_utilization, seed=args.seed, device=device)


def generate(engine, model, tokenizer, prompts, n=1, temperature=1.0, max_new_tokens=16, top_p=1.0, eos_ids=None,
             environment=None):
    """Sample with `engine`, or with HF generate on `model` when engine is None (evaluation's entry point).
    With an `environment` (a tool task's) every completion is a multi-turn loop (common/environment.py)."""
    if environment is not None:
        engine = engine or HFEngine(model, tokenizer, eos_ids or [tokenizer.eos_token_id])
        return rollout_with_tools(engine, tokenizer, environment, prompts, n, temperature, max_new_tokens, top_p)
    if engine is None:
        return generate_hf(model, tokenizer, prompts, n, temperature, max_new_tokens, top_p, eos_ids)
    return engine.generate(prompts, n, temperature, max_new_tokens, top_p)


def generate_and_score(engine, tokenizer, task, position: int, num_prompts: int, seed: int, group_size: int,
                       temperature: float, max_new_tokens: int, top_p: float = 1.0,
                       format_weight: float = 0.0, reward_model=None) -> Rollout:
    """One rollout round: prompts `position .. position + num_prompts - 1` of the task's shuffled
    prompt stream, group_size completions each, every completion scored.

    R_i = correct + format_weight * format (- call_cost * tool calls in a tool task, --tool-call-cost). The
    stream is a pure function of (seed, position), so a resumed run sees the same prompts. With a
    `reward_model` (common/learned_reward.py, --reward-model) R_i = proxy + format_weight * format, the proxy
    logged as reward_terms["proxy"]; the verifier still runs and reward_terms["correct"] stays its verdict
    (the gold accuracy a proxy can drift from).
    """
    rows = task.prompts[rows_at(len(task.prompts), position, num_prompts, seed)]
    prompts = [format_prompt(tokenizer, q, task.system_prompt) for q in rows["question"]]
    rollout = generate(engine, None, tokenizer, prompts, group_size, temperature, max_new_tokens, top_p,
                       environment=task.environment)  # a tool task: multi-turn, observations in the context
    answers = [rows["answer"][i] for i in rollout.prompt_index.tolist()]
    rewards, terms, reasons = score_rows(task.verifier, answer_texts(task, rollout.completions), answers,
                                         rollout.is_eos.tolist(), format_weight, task.partial_credit)
    device = rollout.completion_ids.device
    rollout.reward_terms = {k: torch.tensor(v, device=device) for k, v in terms.items()}  # (B,) each
    rollout.rewards = torch.tensor(rewards, device=device)  # (B,)
    rollout.reasons = reasons
    if reward_model is not None:  # a learned reward replaces the verifier's grade (Ouyang et al. 2022)
        questions = [rows["question"][i] for i in rollout.prompt_index.tolist()]
        proxy = reward_model.score(rollout, questions, answers)  # (B,)
        rollout.reward_terms["proxy"] = proxy
        rollout.rewards = proxy + format_weight * rollout.reward_terms["format"]  # (B,)
    if task.environment is not None and task.environment.call_cost:  # --tool-call-cost: R_i -= cost * calls
        rollout.reward_terms["call_cost"] = -task.environment.call_cost * rollout.tool_stats["tool_calls"]  # (B,)
        rollout.rewards = rollout.rewards + rollout.reward_terms["call_cost"]
    return rollout


def reward_metrics(rollout: Rollout, G: int) -> dict:
    """The reward side of a step's log, over every row sampled: reward and each of its terms,
    sampled accuracy (pass@1 of the rollouts), zero-std groups, and why completions failed."""
    n = len(rollout)
    return {
        "reward": rollout.rewards.mean().item(),
        **{f"reward/{k}": v.float().mean().item() for k, v in rollout.reward_terms.items()},
        "sampled_accuracy": rollout.reward_terms["correct"].float().mean().item(),  # eval's `accuracy` is greedy
        "frac_zero_std_groups": frac_zero_std_groups(rollout.rewards, G),  # null for G = 1: no groups
        **{f"reasons/{k}": rollout.reasons.count(k) / n for k in sorted(set(rollout.reasons))},
        **tool_metrics(rollout),  # a tool task: turns, calls, errors, observation share, accuracy with/without
    }


def demonstration_rollout(tokenizer, task, position: int, num_prompts: int, seed: int, column: str, eos_id: int,
                          max_new_tokens: int, device, split: str = "prompts") -> Rollout:
    """The demonstrations in `column` ("expert" or "demonstration") of the prompts `generate_and_score`
    samples at `position`, one row per prompt in the same order, as a Rollout scored by the verifier.

    What an SFT+RL mixing script trains on beside the policy's own samples. Completions longer than
    max_new_tokens are cut (and then lose their EOS); sampler_logprobs are 0 (nobody sampled them).
    split="train" reads the stream of every demonstration row instead (several per question: sft.py's data).
    """
    from common.tasks import encode_demonstrations

    data = getattr(task, split)  # task.prompts (one row per question) or task.train
    rows = data[rows_at(len(data), position, num_prompts, seed)]
    prompts = [format_prompt(tokenizer, q, task.system_prompt) for q in rows["question"]]
    if task.environment is None:
        prompt_ids, prompt_mask, completion_ids, completion_mask = (t.to(device) for t in encode_demonstrations(
            tokenizer, prompts, rows[column], eos_id, max_new_tokens))
        policy_mask = None  # every token is the demonstrator's
    else:  # a tool task: the demonstration's observations are the environment's, not the demonstrator's
        prompt_ids, prompt_mask, completion_ids, completion_mask, policy_mask = (t.to(device) for t in
            encode_tool_demonstrations(tokenizer, task.environment, prompts, rows[column], eos_id, max_new_tokens))
    last = completion_ids.gather(1, (completion_mask.sum(-1, keepdim=True) - 1).clamp(min=0)).squeeze(-1)  # (B,)
    is_eos = last == eos_id  # False where the demonstration was cut
    demos = Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                    completion_mask=completion_mask, sampler_logprobs=torch.zeros(completion_ids.shape, device=device),
                    is_eos=is_eos, prompt_index=torch.arange(len(prompts), device=device),
                    completions=tokenizer.batch_decode(completion_ids, skip_special_tokens=True),
                    policy_mask=policy_mask)
    rewards, terms, reasons = score_rows(task.verifier, answer_texts(task, demos.completions), rows["answer"],
                                        is_eos.tolist())
    demos.rewards = torch.tensor(rewards, device=device)  # (B,)
    demos.reward_terms = {k: torch.tensor(v, device=device) for k, v in terms.items()}
    demos.reasons = reasons
    return demos
