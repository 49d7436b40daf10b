"""Rollout throughput: HF `generate` vs vLLM, the same prompts, model and sampling settings.

Prints a markdown table of generated tokens per second (median of --repeats runs) for both
backends through the one entry point the scripts use (`common.rollout.generate`), their
ratio, and the time of one weight sync (trainer -> engine). Models are randomly initialised,
so they rarely emit EOS and completions run to (nearly) full length; tokens are counted
from each backend's completion mask, so early stops are not counted as work.

    python benchmarks/rollout_throughput.py                                   # tiny model, CPU
    python benchmarks/rollout_throughput.py --config qwen2.5-0.5b --device cuda
"""

import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Literal

import torch
import tyro
from transformers import AutoModelForCausalLM, Qwen2Config

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere
from common.models import build_char_tokenizer, build_tiny_model, eos_token_ids, pick_dtype
from common.rollout import generate
from common.tasks import format_prompt
from common.vllm_engine import VLLMEngine


@dataclass
class Args:
    config: Literal["tiny", "qwen2.5-0.5b"] = "tiny"
    """model shape: the project's tiny Llama, or Qwen2.5-0.5B's shape (random weights, for GPUs)"""
    device: Literal["cpu", "cuda"] = "cpu"
    """where both backends run"""
    dtype: str = "auto"
    """auto (bf16 on GPU, fp32 on CPU), float32 or bfloat16"""
    num_prompts: int = 64
    """prompts per rollout batch"""
    n: int = 8
    """completions per prompt"""
    max_new_tokens: int = 32
    """completion budget"""
    repeats: int = 3
    """timed runs per backend; the median is reported"""
    gpu_memory_utilization: float = 0.5
    """vLLM's share of GPU memory (the HF model sits beside it)"""


def build_model(config: str, tokenizer):
    """The tiny Llama, or a random model of Qwen2.5-0.5B's shape over the char tokenizer's ids."""
    if config == "tiny":
        return build_tiny_model(tokenizer, seed=0)
    qwen = Qwen2Config(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                       intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True,
                       max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(qwen)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), platform.machine())
    return f"{model} ({len(os.sched_getaffinity(0))} cores usable)"


def timed(fn, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main(args: Args):
    device = torch.device(args.device)
    dtype = pick_dtype(args.dtype, device)
    tokenizer = build_char_tokenizer()
    model = build_model(args.config, tokenizer).to(device, dtype).eval()
    eos_ids = eos_token_ids(model, tokenizer)
    path = tempfile.mkdtemp(prefix="rollout_bench_")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    engine = VLLMEngine(path, dtype, max_model_len=256, gpu_memory_utilization=args.gpu_memory_utilization,
                        seed=0, eos_ids=eos_ids, pad_token_id=tokenizer.pad_token_id, tokenizer=tokenizer,
                        device=device)
    prompts = [format_prompt(tokenizer, f"{10 + i % 90}+{10 + (7 * i) % 90}") for i in range(args.num_prompts)]

    rows = {}
    for name, backend in (("HF generate", None), ("vLLM", engine)):
        def run(prompts=prompts, backend=backend):
            return generate(backend, model, tokenizer, prompts, args.n, 1.0, args.max_new_tokens, eos_ids=eos_ids)

        run(prompts[:4])  # warm-up
        tokens, seconds = [], []
        for _ in range(args.repeats):
            rollout, dt = timed(run, device)
            tokens.append(int(rollout.completion_mask.sum()))
            seconds.append(dt)
        rows[name] = (statistics.median(tokens), statistics.median(seconds))

    syncs = [timed(lambda: engine.sync_weights(model), device)[1] for _ in range(3)]

    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"\ndevice: {device_name(device)}; model: {args.config} ({params:.1f}M params, {dtype}); "
          f"{args.num_prompts} prompts x n={args.n} x {args.max_new_tokens} new tokens, T=1, "
          f"median of {args.repeats}\n")
    print("| backend | tokens generated | seconds | tokens/s |")
    print("|---|---:|---:|---:|")
    for name, (tokens, seconds) in rows.items():
        print(f"| {name} | {tokens} | {seconds:.2f} | {tokens / seconds:,.0f} |")
    (hf_tok, hf_s), (vl_tok, vl_s) = rows["HF generate"], rows["vLLM"]
    print(f"\nvLLM / HF throughput: {(vl_tok / vl_s) / (hf_tok / hf_s):.1f}x")
    print(f"weight sync (sync_weights: reload_weights + reset_prefix_cache): median {statistics.median(syncs):.3f} s "
          f"(first {syncs[0]:.3f} s)")


if __name__ == "__main__":
    main(tyro.cli(Args))
