"""The import graph of src/fedtune runs one way: every module imports only modules below it
in LAYERS, so there is no cycle, and no function-level import hides one. Only the CLI
imports late, to keep `fedtune keys` and bad-input errors fast (no torch before needed), and
the ClientApp, whose per-message process must start without torch when a worker serves it."""

import ast
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "fedtune"

# lowest first: config -> data -> tasks -> model -> train/evaluate -> federation -> apps -> cli
LAYERS = [
    "errors",
    "files",
    "metrics",
    "tracking",
    "nodes",
    "offline_data",
    "assets",
    "config.schema",
    "config.parse",
    "config.sources",
    "config.checks",
    "config",
    "compress",
    "comm",
    "console",
    "partition",
    "data",
    "results",
    "checkpoint",
    "interrupt",
    "tasks",
    "model",
    "scoring",
    "mmlu",
    "losses",
    "train",
    "evaluate",
    "kd",
    "preflight",
    "report.folder",
    "report.plots",
    "report.document",
    "report.card",
    "report.run",
    "report.study",
    "report",
    "aggregation",
    "lora_agg",
    "guard",
    "privacy",
    "rounds",
    "closing",
    "federation",
    "apps",
    "apps.cache",
    "apps.link",
    "apps.handler",
    "apps.client",
    "apps.worker",
    "apps.server",
    "simulation",
    "inprocess",
    "compare",
    "deploy",
    "compose",
    "containers",
    "cli_args",
    "cli",
]
LATE_IMPORTS_ALLOWED = {"cli", "apps.client"}


def modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(p for p in parts if p != "__init__")
        if name:
            out[name] = path
    return out


def imported(node, known) -> list[str]:
    """fedtune modules an import statement names (`from fedtune import a, b` names a, b)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
        names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    else:
        return []
    found = [n.removeprefix("fedtune.") for n in names if n.startswith("fedtune.")]
    return [n for n in found if n in known]


def graph():
    known = modules()
    top, late = {m: set() for m in known}, []
    for name, path in known.items():
        tree = ast.parse(path.read_text())
        nested = {
            id(n)
            for f in ast.walk(tree)
            if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
            for n in ast.walk(f)
        }
        for node in ast.walk(tree):
            for target in imported(node, known):
                if target == name:
                    continue
                (late.append((name, target)) if id(node) in nested else top[name].add(target))
    return known, top, late


def test_every_module_has_a_layer():
    assert sorted(modules()) == sorted(LAYERS)


def test_imports_only_go_down_the_layers():
    _, top, late = graph()
    rank = {m: i for i, m in enumerate(LAYERS)}
    upward = [(m, t) for m, targets in top.items() for t in targets if rank[t] >= rank[m]]
    upward += [(m, t) for m, t in late if rank[t] >= rank[m]]
    assert not upward, f"imports that go up (or sideways) the layers: {sorted(upward)}"


def test_no_function_level_imports_outside_the_cli():
    _, _, late = graph()
    hidden = sorted({(m, t) for m, t in late if m not in LATE_IMPORTS_ALLOWED})
    assert not hidden, f"function-level imports of fedtune modules: {hidden}"


def test_the_checks_can_fail(tmp_path, monkeypatch):
    """A late upward import, written as a new module would write it, is caught."""
    fake = tmp_path / "fedtune"
    for path in SRC.rglob("*.py"):
        dest = fake / path.relative_to(SRC)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(path.read_text())
    (fake / "data.py").write_text(
        (fake / "data.py").read_text() + "\n\ndef f():\n    from fedtune import tasks\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "SRC", fake)
    with pytest.raises(AssertionError, match=r"\('data', 'tasks'\)"):
        test_imports_only_go_down_the_layers()
    with pytest.raises(AssertionError, match=r"\('data', 'tasks'\)"):
        test_no_function_level_imports_outside_the_cli()
