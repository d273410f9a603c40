"""No block of six or more lines is written twice in src/ (what pylint's duplicate-code
check looks for, in a fraction of its time): one helper per small job, not copies.

Lines are compared stripped of indentation, ignoring blank lines, comments and imports, so
a copy that was re-indented or re-commented is still found."""

import ast
import re
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "fedtune"
WINDOW = 6
TRIVIAL = re.compile(r"^([)\]}]+[,:]?|else:|try:|finally:|return|pass|\"\"\"|continue|break)$")


def code_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, stripped text) of the lines that count: not blank, not a comment, not
    part of an import statement or a docstring (as pylint's duplicate-code check)."""
    text = path.read_text()
    skip = set()
    for node in ast.walk(ast.parse(text)):
        docstring = (
            isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        )
        if isinstance(node, (ast.Import, ast.ImportFrom)) or docstring:
            skip.update(range(node.lineno, node.end_lineno + 1))
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if s and not s.startswith("#") and number not in skip:
            out.append((number, s))
    return out


def duplicate_blocks(files) -> list[str]:
    seen = defaultdict(list)
    for path in files:
        lines = code_lines(path)
        for i in range(len(lines) - WINDOW + 1):
            window = tuple(s for _, s in lines[i : i + WINDOW])
            if sum(not TRIVIAL.match(s) for s in window) >= WINDOW - 1:
                seen[window].append(f"{path.relative_to(SRC)}:{lines[i][0]}")
    return [
        " = ".join(places) + "\n    " + "\n    ".join(window)
        for window, places in seen.items()
        if len(places) > 1
    ]


def test_the_detector_finds_a_reindented_copy(tmp_path):
    block = "\n".join(f"x{i} = compute({i}, y)" for i in range(7))
    (tmp_path / "a.py").write_text(f"def f():\n{block}\n".replace("\nx", "\n    x"))
    (tmp_path / "b.py").write_text(f"# a copy\n{block}\n")
    global SRC
    old, SRC = SRC, tmp_path
    try:
        found = duplicate_blocks(sorted(tmp_path.glob("*.py")))
    finally:
        SRC = old
    assert found and "a.py:2 = b.py:2" in found[0]


def test_no_block_of_six_lines_is_repeated_in_src():
    found = duplicate_blocks(sorted(SRC.rglob("*.py")))
    assert not found, f"{len(found)} repeated blocks:\n" + "\n".join(found)
