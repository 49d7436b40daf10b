"""Check, and fix, the links from the docs to lines of code.

The algorithm pages point at code with links of this form, a symbol in backticks after each:

    [grpo.py#L266-L299](../grpo.py#L266-L299) `policy_token_loss`

The link promises that `policy_token_loss` occurs somewhere in lines 266..299 of grpo.py. The
scripts keep changing, so this tool checks every such link in docs/*.md and prints one line per
broken one: the symbol is not in the range, the range runs past the end of the file, the file
does not exist, the link text and the link target disagree, or the link names no symbol.
One stricter rule: when the symbol is a function or class defined in that file and the range
overlaps its definition, the range must start where the definition starts (its first decorator,
else the `def`) and end inside it. Lines added above a function would otherwise leave a stale
range that still happens to contain the name (ending on the `def` line, say).

With --fix it rewrites each broken link to where its symbol is now:
- a function or class (found with `ast` in a .py file): its whole definition, from the `def`
  (or its first decorator) to the last line of its body;
- a module-level assignment (`PRESETS = {...}`): the whole statement;
- anything else (a variable, an argument, a banner such as `5. Update`): the occurrence nearest
  the old range, with the old range's length, centred on that occurrence.
A symbol that occurs nowhere in the file cannot be fixed; it stays in the report.

A range must also hold whole statements (checked with `ast` in a .py file), so that a reader
never sees half a call: its first line is the first line of a statement (a compound header
such as `for ...:` counts, and so does a statement nested in a loop or `with`; for a decorated
function, its first decorator), or a comment or blank line outside any statement (a banner
above one); its last line is the last line of a statement (its `end_lineno`, nested ones
included), or such a comment or blank line. Docstrings are prose: a range may start or end on
any of their lines. A range that starts on a lone `)` or stops before
the end of a multi-line call is reported, and --fix snaps it outward to the innermost
statement that contains the cut line (after moving it to its symbol, if the symbol moved).

Run:  python docs/lines.py          report; exit status 1 if a link is broken
      python docs/lines.py --fix    fix what can be fixed, then report what is left
tests/test_docs.py runs the check, so CI fails when the code drifts away from the docs.
"""

import argparse
import ast
import os
import re
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

DOCS = Path(__file__).resolve().parent

# [path#La-Lb](relative/path#La-Lb) `symbol`; the symbol may follow on the next line (wrapped text)
LINK = re.compile(
    r"\[(?P<text>[^\]\s#]+)#L(?P<a>\d+)(?:-L(?P<b>\d+))?\]"
    r"\((?P<target>[^)\s#]+)#L(?P<ta>\d+)(?:-L(?P<tb>\d+))?\)"
    r"(?:[ \t]*\n?[ \t]*`(?P<symbol>[^`\n]+)`)?"
)


@dataclass
class Link:
    page: Path  # the markdown file
    start: int  # character offsets of the whole match in the page
    end: int
    text: str  # the path shown in the link text, e.g. grpo.py or common/rollout.py
    target: str  # the link target as written, e.g. ../grpo.py
    first: int  # line range of the link target (1-based, inclusive)
    last: int
    text_range: tuple[int, int]  # the range shown in the link text
    symbol: str | None
    line: int  # line of the page the link is on, for the report

    @property
    def root(self) -> Path:  # the repository: pages live in <root>/docs
        return self.page.parent.parent

    @property
    def file(self) -> Path:
        return (self.page.parent / self.target).resolve()

    def where(self) -> str:
        return f"{self.page.relative_to(self.root)}:{self.line}"


def find_links(page: Path) -> list[Link]:
    source = page.read_text()
    links = []
    for match in LINK.finditer(source):
        a, ta = int(match["a"]), int(match["ta"])
        links.append(Link(page, match.start(), match.end(), match["text"], match["target"], ta,
                          int(match["tb"] or ta), (a, int(match["b"] or a)), match["symbol"],
                          source.count("\n", 0, match.start()) + 1))
    return links


def problem(link: Link) -> str | None:
    """Why the link is broken, or None."""
    if link.symbol is None:
        return f"{link.text}#L{link.first}-L{link.last} names no symbol (add one in backticks after the link)"
    if not link.file.is_file():
        return f"{link.target}: no such file"
    if link.file != (link.root / link.text).resolve():
        return f"the link text says {link.text} but the link goes to {link.target}"
    if link.text_range != (link.first, link.last):
        shown = f"{link.text_range[0]}-{link.text_range[1]}"
        return f"the link text says lines {shown}, the target {link.first}-{link.last}"
    lines = link.file.read_text().splitlines()
    if not 1 <= link.first <= link.last <= len(lines):
        return f"{link.text}#L{link.first}-L{link.last}: {link.text} has {len(lines)} lines"
    if not any(link.symbol in line for line in lines[link.first - 1:link.last]):
        return f"`{link.symbol}` is not in {link.text} lines {link.first}-{link.last}"
    overlapping = [(a, b) for a, b in function_spans(link.file, link.symbol) if a <= link.last and link.first <= b]
    if overlapping and not any(link.first == a and link.last <= b for a, b in overlapping):
        a, b = overlapping[0]
        return (f"`{link.symbol}` is defined at {link.text} lines {a}-{b}, but the link covers "
                f"{link.first}-{link.last}")
    return cut(link)


def cut(link: Link) -> str | None:
    """Why the link's range cuts a statement in two (see the module docstring), or None."""
    layout = statements(link.file)
    if layout is None:
        return None
    for line, which, edge in ((link.first, "starts", layout.starts), (link.last, "ends", layout.ends)):
        if line not in edge and line not in layout.free:
            a, b = layout.around(line)
            return (f"{link.text}#L{link.first}-L{link.last} {which} in the middle of the statement at "
                    f"lines {a}-{b} (--fix snaps it to whole statements)")
    return None


def _parse(path: Path) -> ast.Module | None:
    if path.suffix != ".py":
        return None
    try:
        return ast.parse(path.read_text())
    except SyntaxError:
        return None


def function_spans(path: Path, symbol: str) -> list[tuple[int, int]]:
    """Line spans (first decorator or `def`, last line of the body) of the functions and classes
    named `symbol`, at any depth, in a Python file; [] for other files or if it does not parse."""
    tree = _parse(path)
    return [] if tree is None else [
        (min([node.lineno] + [d.lineno for d in node.decorator_list]), node.end_lineno) for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == symbol]


@dataclass
class Statements:
    """Where the statements of a Python file begin and end (1-based line numbers)."""
    starts: set[int]  # first lines of statements (and of decorators)
    ends: set[int]  # last lines of statements
    free: set[int]  # comment and blank lines outside every statement's own lines; docstring lines
    spans: list[tuple[int, int]]  # (first, last) of every statement, its decorators included

    def around(self, line: int) -> tuple[int, int]:
        """The innermost statement whose lines hold `line` (a line in none: the line itself)."""
        holding = [(a, b) for a, b in self.spans if a <= line <= b]
        return min(holding, key=lambda s: s[1] - s[0]) if holding else (line, line)


def statements(path: Path) -> Statements | None:
    """The statement layout of a Python file (None for other files or if it does not parse)."""
    return _statements(str(path), path.read_text()) if path.suffix == ".py" else None


@lru_cache(maxsize=64)
def _statements(_name: str, text: str) -> Statements | None:
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return None
    lines = text.splitlines()
    code = [not (line.strip() == "" or line.strip().startswith("#")) for line in lines]
    starts, ends, spans = set(), set(), []
    own, prose = set(), set()  # lines a statement's own tokens sit on; lines of docstrings
    for node in ast.walk(tree):
        if not isinstance(node, ast.stmt):
            continue
        decorators = getattr(node, "decorator_list", [])
        first = min([node.lineno] + [d.lineno for d in decorators])
        starts.add(first)
        ends.add(node.end_lineno)
        spans.append((first, node.end_lineno))
        for d in decorators:
            starts.add(d.lineno)
            own.update(range(d.lineno, d.end_lineno + 1))
        if isinstance(node, ast.Match):
            body = node.cases[0].pattern.lineno
        else:  # the first line of a compound statement's body; None for a simple statement
            body = node.body[0].lineno if isinstance(getattr(node, "body", None), list) else None
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            prose.update(range(node.lineno, node.end_lineno + 1))  # a docstring: a link may quote any part
        elif body is None:
            own.update(range(node.lineno, node.end_lineno + 1))
        else:  # a compound statement owns its header: up to its last line of code before the body
            header = [i for i in range(node.lineno, body) if code[i - 1]] or [node.lineno]
            own.update(range(node.lineno, max(header) + 1))
    free = {i for i in range(1, len(lines) + 1) if not code[i - 1] and i not in own} | prose
    return Statements(starts, ends, free, spans)


def snap(path: Path, first: int, last: int) -> tuple[int, int]:
    """Widen lines first..last of a Python file to whole statements: a cut first line moves up to
    the start of the innermost statement holding it, a cut last line down to that one's end."""
    layout = statements(path)
    if layout is None:
        return first, last
    if first not in layout.starts and first not in layout.free:
        first = layout.around(first)[0]
    if last not in layout.ends and last not in layout.free:
        last = layout.around(last)[1]
    return first, last


def definition_spans(path: Path, symbol: str) -> list[tuple[int, int]]:
    """`function_spans`, and the spans of the module-level assignments to `symbol`."""
    tree = _parse(path)
    if tree is None:
        return []
    spans = function_spans(path, symbol)
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and t.id == symbol for t in targets):
            spans.append((node.lineno, node.end_lineno))
    return spans


def new_range(link: Link) -> tuple[int, int] | None:
    """Where the link's symbol is now (see the module docstring), or None if it is nowhere."""
    if link.symbol is None or not link.file.is_file():
        return None
    lines = link.file.read_text().splitlines()
    centre = (link.first + link.last) / 2
    spans = definition_spans(link.file, link.symbol)
    if spans:
        return min(spans, key=lambda s: (abs((s[0] + s[1]) / 2 - centre), s[0]))
    hits = [i for i, line in enumerate(lines, 1) if link.symbol in line]
    if not hits:
        return None
    hit = min(hits, key=lambda i: (abs(i - centre), i))
    length = min(max(1, link.last - link.first + 1), len(lines))
    first = min(max(1, hit - (length - 1) // 2), len(lines) - length + 1)
    return first, first + length - 1


def render(link: Link, first: int, last: int) -> str:
    text = os.path.relpath(link.file, link.root).replace(os.sep, "/")
    return f"[{text}#L{first}-L{last}]({link.target}#L{first}-L{last}) `{link.symbol}`"


def pages(docs: Path = DOCS) -> list[Path]:
    return sorted(docs.glob("*.md"))


def check(docs: Path = DOCS) -> list[str]:
    """One line per broken link in docs/*.md: 'page:line: what is wrong'."""
    return [f"{link.where()}: {why}" for page in pages(docs) for link in find_links(page)
            if (why := problem(link)) is not None]


def fix(docs: Path = DOCS) -> list[str]:
    """Rewrite every broken link that can be fixed; return one line per link changed."""
    changed = []
    for page in pages(docs):
        source, edits = page.read_text(), []
        for link in find_links(page):
            why = problem(link)
            if why is None:
                continue
            # a range that only cuts a statement keeps its place; any other broken one moves first
            span = (link.first, link.last) if why == cut(link) else new_range(link)
            if span is None:
                continue
            span = snap(link.file, *span)
            edits.append((link, render(link, *span)))
            changed.append(f"{link.where()}: `{link.symbol}` {link.text}#L{link.first}-L{link.last} -> "
                           f"#L{span[0]}-L{span[1]}")
        for link, replacement in reversed(edits):  # from the end, so earlier offsets stay valid
            source = source[:link.start] + replacement + source[link.end:]
        if edits:
            page.write_text(source)
    return changed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fix", action="store_true",
                        help="rewrite broken links: move each to where its symbol is now, widen it to whole statements")
    args = parser.parse_args(argv)
    if args.fix:
        for line in fix():
            print(f"fixed {line}")
    broken = check()
    for line in broken:
        print(line)
    if not broken:
        print(f"all line links in {os.path.relpath(DOCS)}/*.md name a symbol inside their range of whole statements")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
