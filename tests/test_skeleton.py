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
SHARED_FUNCTIONS = ("aggregate_loss", "kl_penalty", "masked_whiten")  # identical wherever they appear
LOOP_BANNERS = ("1. Generate", "2. Reward", "3. Advantage", "4. Score", "5. Update", "6. Sync", "7. Log")
ARGS_SECTIONS = ("what to train", "rollout", "reward", "advantage", "policy loss", "optimisation")
# old names of concepts that now have one name everywhere (docs/skeleton.md's names table)
RETIRED_NAMES = {"train_model", "rank_batch", "total_loss", "adv_eps", "max_completion_len", "shared", "batch_size",
                 "lam", "logprobs", "minibatch_rows", "num_seqs", "num_tokens"}
DISTRIBUTED_NAMES = ("world", "all_reduce", "grad_sync", "train_model", "all_gather")


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
    args = re.split(r"class Args\b.*:", _source(script))[1].split("\n\n\n")[0]
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
    functions = _functions(script)
    owners = [s for s in ("grpo.py", *RL_SCRIPTS) if name in _functions(s)]
    if name not in functions:
        pytest.skip(f"{script} has no {name}")
    assert functions[name] == _functions(owners[0])[name], f"{script}.{name} drifted from {owners[0]}"


def _main_tree(script):
    return next(n for n in ast.parse(_source(script)).body if isinstance(n, ast.FunctionDef) and n.name == "main")


def _names_table():
    doc = open(os.path.join(REPO, "docs", "skeleton.md")).read()
    table = doc.split("## Names")[1].split("\n## ")[0]
    rows = [line.split("|")[1] for line in table.splitlines() if line.startswith("| `")]
    return [name.split(".")[-1] for row in rows for name in re.findall(r"`([\w.]+)`", row)]


def test_every_name_in_the_skeleton_table_is_used_by_grpo():
    """docs/skeleton.md's names table names things grpo.py has (a renamed variable fails here)."""
    words = set(re.findall(r"\w+", _source("grpo.py")))
    missing = [name for name in _names_table() if name not in words]
    assert not missing, f"docs/skeleton.md names what grpo.py does not have: {missing}"


@pytest.mark.parametrize("script", ["grpo.py", *RL_SCRIPTS])
def test_no_retired_name_in_main(script):
    """One name per concept: main() of every RL script uses none of the retired names."""
    used = {n.id for n in ast.walk(_main_tree(script)) if isinstance(n, ast.Name)}
    used |= {n.arg for n in ast.walk(_main_tree(script)) if isinstance(n, ast.arg)}
    assert not used & RETIRED_NAMES, f"{script} main() still says {sorted(used & RETIRED_NAMES)}"


@pytest.mark.parametrize("script", ["grpo.py", *RL_SCRIPTS])
def test_no_distributed_name_on_a_loss_line(script):
    """torchrun stays at the edges: a line of main() that computes or backpropagates a loss names no
    collective and no process count (docs/distributed.md)."""
    lines = ast.get_source_segment(_source(script), _main_tree(script)).splitlines()
    loss_lines = [line for line in lines if re.search(r"\b\w*loss\w*\b\s*[+\-*/]?=|\.backward\(", line)]
    assert loss_lines
    offending = [line.strip() for line in loss_lines if any(re.search(rf"\b{d}\b", line) for d in DISTRIBUTED_NAMES)]
    assert not offending, f"{script}: {offending}"


def test_the_banners_skeleton_md_quotes_exist():
    """docs/skeleton.md quotes banners from the scripts; each quote is a banner a script has."""
    doc = open(os.path.join(REPO, "docs", "skeleton.md")).read().replace("\n", " ")
    quotes = re.findall(r"`# ---- ([^`]+)`", doc)
    assert quotes
    scripts = " ".join(_source(s) for s in ("sft.py", "grpo.py", *RL_SCRIPTS))
    for quote in quotes:
        assert re.sub(r"\s+", " ", quote) in re.sub(r"\s+", " ", scripts), quote
