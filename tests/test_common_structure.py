"""The shape of common/: its modules import each other without a cycle, and never import a script.

Read from the source with `ast` (imports inside functions included), so a lazy import that
closes a cycle, which Python tolerates at run time, still fails here.
"""

import ast
from pathlib import Path

COMMON = Path(__file__).resolve().parent.parent / "common"
SCRIPTS = {"sft", "grpo", "ppo", "reinforce", "sft_rl_mixed", "dpo", "reward_model"}


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, anywhere in the file, as a dotted name.
    `from common import distributed` -> common.distributed (a module), `from common.tasks import rows_at`
    -> common.tasks, `from .tasks import x` (in common/) -> common.tasks."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = "common" + (f".{node.module}" if node.module else "") if node.level else node.module
            for alias in node.names:  # `from package import module` names a module
                submodule = f"{base}.{alias.name}"
                names.add(submodule if (COMMON / f"{submodule.split('.', 1)[-1]}.py").exists()
                          and base == "common" else base)
    return names


def common_import_graph() -> dict[str, set[str]]:
    """common.X -> the common.Y it imports (the package itself, common/__init__.py, left out)."""
    modules = {f"common.{p.stem}": p for p in COMMON.glob("*.py") if p.stem != "__init__"}
    return {name: {m for m in imported_modules(path) if m in modules and m != name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a path [a, b, ..., a], or None.
    >>> find_cycle({"a": {"b"}, "b": {"a"}})
    ['a', 'b', 'a']"""
    state = {}  # node -> "open" while on the DFS stack, "done" after

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt, stack + [nxt])):
                return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_graph_sees_lazy_and_package_imports():
    """The reader of the graph catches what a cycle would hide in: imports inside functions and
    `from common import module`."""
    graph = common_import_graph()
    assert "common.vllm_engine" in graph["common.rollout"]  # build_engine's lazy import
    assert "common.distributed" in graph["common.rollout"]  # `from common import distributed`


def test_common_has_no_import_cycle():
    cycle = find_cycle(common_import_graph())
    assert cycle is None, "import cycle in common/: " + " -> ".join(cycle)


def test_common_never_imports_a_script():
    for path in sorted(COMMON.glob("*.py")):
        scripts = {m for m in imported_modules(path) if m.split(".")[0] in SCRIPTS}
        assert not scripts, f"common/{path.name} imports the script(s) {sorted(scripts)}: scripts import common/"
