"""Memory of the frozen reference model: a second copy (full fine-tuning) vs the policy's base with its
LoRA adapters off (--lora-rank), measured as the resident memory the reference adds to the process.

    python benchmarks/lora_memory.py                       # Qwen2.5-0.5B shape, random weights, fp32, CPU
    python benchmarks/lora_memory.py --model qwen2-tiny:random

Each case runs in a fresh subprocess: load the policy (and add adapters), read RSS, build the
reference with common.models.frozen_reference, read RSS again.
"""

import argparse
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CASE = """
import json, os, sys, torch
sys.path.insert(0, {repo!r})
from common.models import add_lora, frozen_reference, load_model_and_tokenizer
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
model, _ = load_model_and_tokenizer({model!r}, torch.device("cpu"), torch.float32)
if {rank}:
    model = add_lora(model, {rank}, 32)
before = rss()
ref = frozen_reference(model, {model!r}, torch.device("cpu"), torch.float32)
params = sum(p.numel() * p.element_size() for p in ref.parameters())
print(json.dumps({{"rss_added": rss() - before, "reference_param_bytes": params}}))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-0.5b:random")
    parser.add_argument("--lora-rank", type=int, default=16)
    args = parser.parse_args()
    print(f"model {args.model}, fp32, CPU")
    print("| reference | memory it adds (RSS) | its own parameters |")
    print("|---|---:|---:|")
    for name, rank in (("second copy (full fine-tuning)", 0), (f"adapters off (--lora-rank {args.lora_rank})",
                                                                   args.lora_rank)):
        out = subprocess.run([sys.executable, "-c", CASE.format(repo=REPO, model=args.model, rank=rank)],
                             capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        m = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {name} | {m['rss_added'] / 2**30:.2f} GiB | {m['reference_param_bytes'] / 2**30:.2f} GiB |")


if __name__ == "__main__":
    main()
