"""Size of each algorithm script: total lines and the lines of main(), against the readability targets.

    python benchmarks/count_lines.py            # every top-level script
    python benchmarks/count_lines.py grpo.py

Targets (issue "grpo.py becomes the template"): grpo.py <= 600 lines, its main() <= 170. A file
a newcomer reads top to bottom in about 20 minutes. Counted with `ast`, so main() is the
function's full span, its docstring and comments included.
"""

import ast
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["sft.py", "grpo.py", "reinforce.py", "ppo.py", "sft_rl_mixed.py"]
TARGETS = {"grpo.py": (600, 170)}


def measure(path: str) -> tuple[int, int]:
    with open(path) as f:
        source = f.read()
    main = next((node for node in ast.parse(source).body if isinstance(node, ast.FunctionDef) and node.name == "main"),
                None)
    return len(source.splitlines()), (main.end_lineno - main.lineno + 1) if main else 0


def main():
    names = sys.argv[1:] or [s for s in SCRIPTS if os.path.exists(os.path.join(ROOT, s))]
    print(f"{'script':<18}{'lines':>7}{'main()':>8}  target")
    failed = False
    for name in names:
        lines, main_lines = measure(os.path.join(ROOT, name))
        target = TARGETS.get(name)
        ok = target is None or (lines <= target[0] and main_lines <= target[1])
        failed |= not ok
        note = f"<= {target[0]} / <= {target[1]}: {'ok' if ok else 'OVER'}" if target else ""
        print(f"{name:<18}{lines:>7}{main_lines:>8}  {note}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
