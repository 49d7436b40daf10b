"""The RL scripts share grpo.py's skeleton: the same banners in the same order, the same Args
section headers, and the functions duplicated on purpose stay byte-identical.

`diff grpo.py X.py` should show the algorithm and nothing else; these checks keep the parts
that are not the algorithm from drifting apart.
"""

import ast
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RL_SCRIPTS = [s for s in ("reinforce.py", "ppo.py", "sft_rl_mixed.py") if os.path.exists(os.path.join(REPO, s))]
SHARED_FUNCTIONS = ("aggregate_loss", "kl_penalty")  # identical wherever they appear
LOOP_BANNERS = ("1. Generate", "2. Reward", "3. Advantage", "4. Score", "5. Update", "6. Sync", "7. Log")
ARGS_SECTIONS = ("what to train", "rollout", "reward", "advantage", "policy loss", "optimisation",
                 "evaluation, checkpoints, logging")


def _source(script):
    with open(os.path.join(REPO, script)) as f:
        return f.read()


def _functions(script):
    source = _source(script)
    return {node.name: ast.get_source_segment(source, node) for node in ast.parse(source).body
            if isinstance(node, ast.FunctionDef)}


def _banners(script):
    return [m.group(1).strip() for m in re.finditer(r"# ---- (.+?)(?: -{3,})?\n", _source(script))]


def _args_sections(script):
    args = _source(script).split("class Args:")[1].split("\n\n\n")[0]
    return [m.group(1).strip() for m in re.finditer(r"# ---- (.+?) -{3,}", args)]


def test_grpo_has_the_skeleton_it_documents():
    banners = " | ".join(_banners("grpo.py"))
    for banner in LOOP_BANNERS:
        assert banner in banners, banner
    assert tuple(_args_sections("grpo.py")) == ARGS_SECTIONS
    for name in ("compute_advantages", "policy_token_loss", "aggregate_loss", "kl_penalty", "validate", "main"):
        assert name in _functions("grpo.py"), name
    with open(os.path.join(REPO, "docs", "skeleton.md")) as f:
        doc = f.read()
    for banner in LOOP_BANNERS:
        assert banner in doc, banner


@pytest.mark.parametrize("script", RL_SCRIPTS)
def test_rl_script_follows_the_skeleton(script):
    banners = " | ".join(_banners(script))
    positions = [banners.find(b) for b in LOOP_BANNERS]
    assert all(p >= 0 for p in positions), (script, banners)
    assert positions == sorted(positions), f"{script}: loop banners out of order"
    assert tuple(_args_sections(script)) == ARGS_SECTIONS
    functions = _functions(script)
    for name in ("compute_advantages", "policy_token_loss", "aggregate_loss", "kl_penalty", "validate", "main"):
        assert name in functions, f"{script} lacks {name}"


@pytest.mark.parametrize("script", RL_SCRIPTS)
@pytest.mark.parametrize("name", SHARED_FUNCTIONS)
def test_duplicated_functions_are_identical(script, name):
    assert _functions(script)[name] == _functions("grpo.py")[name], f"{script}.{name} drifted from grpo.py"
