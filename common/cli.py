"""Argument checks that fail with one line naming the flag and the fix, never a stack trace."""

import re
import sys
from dataclasses import replace
from typing import Literal

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
"""The --dtype of every script: tyro rejects anything else. auto = bf16 on a GPU, fp32 on CPU."""


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def arg_error(name: str, message: str):
    raise SystemExit(f"error: {flag(name)}: {message}")


def check(condition: bool, name: str, message: str):
    if not condition:
        arg_error(name, message)


def exact_div(a: int, b: int, a_name: str, b_name: str) -> int:
    """a // b, failing loudly (naming both flags) when b does not divide a."""
    check(b > 0, b_name, f"must be positive, got {b}")
    check(a % b == 0, a_name, f"{a} is not divisible by {flag(b_name)} {b}; pick a multiple of {b}")
    return a // b


def check_device(device: str):
    """--device is auto, cpu, cuda or cuda:N (N a GPU index)."""
    check(device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", device) is not None, "device",
          f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")


def parse_with_presets(args_class, presets: dict, argv=None):
    """tyro CLI whose defaults are the chosen `--preset`'s: `--preset dapo --eps-high 0.3` keeps 0.3."""
    import tyro

    argv = sys.argv[1:] if argv is None else argv
    preset = "grpo" if "grpo" in presets else next(iter(presets))
    for i, arg in enumerate(argv):
        if arg == "--preset" and i + 1 < len(argv):
            preset = argv[i + 1]
        elif arg.startswith("--preset="):
            preset = arg.split("=", 1)[1]
    if preset not in presets:
        arg_error("preset", f"unknown preset {preset!r}; choose one of {', '.join(presets)}")
    return tyro.cli(args_class, args=argv, default=replace(args_class(), preset=preset, **presets[preset]))
