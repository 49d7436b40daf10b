"""The docs point at the code; these tests fail when the code moves away from them.

- Every `[X.py#La-Lb](../X.py#La-Lb) `symbol`` link in docs/*.md names a symbol that occurs in
  lines a..b of X.py, a link to a function or class starts at its definition, and the range holds
  whole statements: it neither starts on a lone `)` nor stops inside a multi-line call
  (`python docs/lines.py --fix` moves broken links to where the symbol is now and widens them to
  whole statements).
- Every relative link in docs/*.md and README.md leads to a file or folder that exists.
- Every ```python excerpt that follows a line link is still, line for line, in the linked file.
"""

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def _load_lines_tool():
    spec = importlib.util.spec_from_file_location("docs_lines", DOCS / "lines.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


lines = _load_lines_tool()

FENCE = re.compile(r"^```.*?^```[ \t]*$", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
MARKDOWN_LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def test_every_line_link_names_a_symbol_inside_its_range():
    broken = lines.check(DOCS)
    assert not broken, ("line links that no longer match the code (run `python docs/lines.py --fix`, "
                        "then check the result):\n" + "\n".join(broken))


@pytest.mark.parametrize("page", sorted(DOCS.glob("*.md")) + [ROOT / "README.md"], ids=lambda p: p.name)
def test_every_relative_link_exists(page):
    text = INLINE_CODE.sub("", FENCE.sub("", page.read_text()))  # code is not links
    missing = []
    for target in MARKDOWN_LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):  # http:, mailto:, an anchor
            continue
        path = target.split("#", 1)[0]
        if not (page.parent / path).exists():
            missing.append(target)
    assert not missing, f"{page.name} links to missing files: {missing}"


def test_code_excerpts_are_still_in_the_linked_file():
    """A ```python block after a line link is a copy of code: each of its lines, in order, must still
    be consecutive lines of the file the nearest link above it points to (indentation aside)."""
    stale = []
    for page in sorted(DOCS.glob("*.md")):
        text, links = page.read_text(), lines.find_links(page)
        for block in re.finditer(r"^```python\n(.*?)^```", text, re.S | re.M):
            before = [link for link in links if link.end <= block.start()]
            if not before:
                continue
            excerpt = [line.strip() for line in block[1].splitlines() if line.strip()]
            source = [line.strip() for line in before[-1].file.read_text().splitlines()]
            if not any(source[i:i + len(excerpt)] == excerpt for i in range(len(source))):
                stale.append(f"{page.name}:{text.count(chr(10), 0, block.start()) + 1} "
                             f"(from {before[-1].text}): {excerpt[0][:60]}")
    assert not stale, "code excerpts that no longer match the code:\n" + "\n".join(stale)


def _fake_repo(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "algo.py").write_text(
        "import torch\n"                        # 1
        "\n"                                    # 2
        "\n"                                    # 3
        "def loss(x):\n"                        # 4
        "    y = -x\n"                          # 5
        "    return y.mean()\n"                 # 6
        "\n"                                    # 7
        "\n"                                    # 8
        "def main():\n"                         # 9
        "    # ---- 5. Update ----\n"           # 10
        "    value = loss(torch.ones(2))\n"     # 11
        "    return value\n"                    # 12
    )
    page = tmp_path / "docs" / "page.md"
    page.write_text("The loss: [algo.py#L4-L6](../algo.py#L4-L6) `loss`, the update\n"
                    "[algo.py#L10-L11](../algo.py#L10-L11) `5. Update`.\n")
    return page


def test_the_checker_accepts_good_links_and_reports_broken_ones(tmp_path):
    page = _fake_repo(tmp_path)
    assert lines.check(tmp_path / "docs") == []
    page.write_text(page.read_text() + "Wrong: [algo.py#L1-L2](../algo.py#L1-L2) `loss`; "
                    "past the end: [algo.py#L11-L40](../algo.py#L11-L40) `value`; "
                    "no symbol: [algo.py#L4-L6](../algo.py#L4-L6); "
                    "text and target disagree: [algo.py#L4-L6](../algo.py#L5-L6) `loss`; "
                    "a stale range that ends on the def: [algo.py#L1-L4](../algo.py#L1-L4) `loss`.\n")
    report = lines.check(tmp_path / "docs")
    assert len(report) == 5, report
    assert "`loss` is not in algo.py lines 1-2" in report[0]
    assert "algo.py has 12 lines" in report[1]
    assert "names no symbol" in report[2]
    assert "the link text says lines 4-6" in report[3]
    assert "`loss` is defined at algo.py lines 4-6, but the link covers 1-4" in report[4]


def test_fix_moves_links_to_where_their_symbols_went(tmp_path):
    page = _fake_repo(tmp_path)
    source = (tmp_path / "algo.py").read_text().splitlines(keepends=True)
    # someone adds three lines above `loss` and two inside it
    source = (source[:2] + ["A = 1\n", "B = 2\n", "\n"] + source[2:5]
              + ["    y = y * 2\n", "    y = y + 0\n"] + source[5:])
    (tmp_path / "algo.py").write_text("".join(source))
    assert len(lines.check(tmp_path / "docs")) == 2
    assert len(lines.fix(tmp_path / "docs")) == 2
    assert lines.check(tmp_path / "docs") == []
    fixed = page.read_text()
    assert "[algo.py#L7-L11](../algo.py#L7-L11) `loss`" in fixed  # a def: its whole body, found with ast
    assert "[algo.py#L15-L16](../algo.py#L15-L16) `5. Update`" in fixed  # a banner: same span, on the line


STEP = (
    '"""A step.\n'                           # 1
    "\n"                                     # 2
    'The loss is summed over rows.\n'        # 3
    '"""\n'                                  # 4
    "\n"                                     # 5
    "\n"                                     # 6
    "def step(batch, compute):\n"            # 7
    "    total = 0.0\n"                      # 8
    "    for row in batch:\n"                # 9
    "        # ---- 5. Update ----\n"        # 10
    "        loss = compute(\n"              # 11
    "            row,\n"                     # 12
    "            scale=2,\n"                 # 13
    "        )\n"                            # 14
    "        total += loss\n"                # 15
    "    return total\n"                     # 16
)
WHOLE = ("[step.py#L3-L3](../step.py#L3-L3) `summed` (a docstring is prose: any of its lines), "
         "[step.py#L9-L15](../step.py#L9-L15) `for row` (a loop, header to body), "
         "[step.py#L10-L14](../step.py#L10-L14) `5. Update` (a banner, then a statement nested in the loop), "
         "[step.py#L11-L15](../step.py#L11-L15) `total += loss` (statements inside the loop), "
         "[step.py#L7-L16](../step.py#L7-L16) `step`.\n")


def test_the_checker_reports_a_range_that_cuts_a_statement(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "step.py").write_text(STEP)
    page = tmp_path / "docs" / "page.md"
    page.write_text(WHOLE)
    assert lines.check(tmp_path / "docs") == []
    page.write_text(WHOLE + "Starts on a lone `)`: [step.py#L14-L15](../step.py#L14-L15) `total`; "
                    "stops inside the call: [step.py#L11-L12](../step.py#L11-L12) `compute(`; "
                    "the loop's header without its body: [step.py#L9-L9](../step.py#L9-L9) `for row`.\n")
    report = lines.check(tmp_path / "docs")
    assert len(report) == 3, report
    assert "step.py#L14-L15 starts in the middle of the statement at lines 11-14" in report[0]
    assert "step.py#L11-L12 ends in the middle of the statement at lines 11-14" in report[1]
    assert "step.py#L9-L9 ends in the middle of the statement at lines 9-15" in report[2]


def test_fix_widens_a_cut_range_to_whole_statements(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "step.py").write_text(STEP)
    page = tmp_path / "docs" / "page.md"
    page.write_text(WHOLE + "[step.py#L14-L15](../step.py#L14-L15) `total`, "
                    "[step.py#L11-L12](../step.py#L11-L12) `compute(`, "
                    "[step.py#L9-L9](../step.py#L9-L9) `for row`, "
                    "[step.py#L1-L2](../step.py#L1-L2) `scale=2`.\n")
    assert len(lines.check(tmp_path / "docs")) == 4
    assert len(lines.fix(tmp_path / "docs")) == 4
    assert lines.check(tmp_path / "docs") == []
    fixed = page.read_text()
    assert fixed.startswith(WHOLE)  # whole ranges stay as they were
    assert "[step.py#L11-L15](../step.py#L11-L15) `total`" in fixed  # up to the start of the call
    assert "[step.py#L11-L14](../step.py#L11-L14) `compute(`" in fixed  # down to its closing `)`
    assert "[step.py#L9-L15](../step.py#L9-L15) `for row`" in fixed  # the header takes its body
    # a symbol that moved: centred on its line (13-14), then widened to the call it sits in
    assert "[step.py#L11-L14](../step.py#L11-L14) `scale=2`" in fixed


ALGORITHM_PAGES = ["sft", "grpo", "reinforce", "ppo", "sft_rl_mixed"]
IMAGE = re.compile(r"!\[[^\]\n]*\]\(([^)\s]+)\)")


@pytest.mark.parametrize("script", ALGORITHM_PAGES)
def test_each_algorithm_page_shows_its_learning_curve(script):
    """docs/<script>.md embeds figures/curve_<script>.png, which exists (`python benchmarks/experiments.py figures`)."""
    page = DOCS / f"{script}.md"
    images = IMAGE.findall(INLINE_CODE.sub("", FENCE.sub("", page.read_text())))
    assert f"figures/curve_{script}.png" in images, f"{page.name} embeds no figures/curve_{script}.png: {images}"
    assert all((page.parent / image).is_file() for image in images if image.startswith("figures/")), images
