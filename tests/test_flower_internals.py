"""fedtune uses a few private Flower names (to run the Simulation Engine in-process with a
resolved run config). They live in `simulation.py` only, next to the Flower version they
were checked against; this test fails loudly, naming each one, when an upgrade moves them."""

import ast
import importlib
import inspect
import re
from importlib.metadata import version
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "fedtune"
PUBLIC = ("flwr.app", "flwr.serverapp", "flwr.clientapp")  # Flower's Message API


def flwr_imports(path: Path) -> list[tuple[str, str]]:
    """(module, name) of every `from flwr... import name` in a file (`import flwr.x` too;
    not flwr_datasets, a separate package with a public API)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "flwr":
            out += [(node.module, a.name) for a in node.names]
        elif isinstance(node, ast.Import):
            out += [(a.name, "") for a in node.names if a.name.split(".")[0] == "flwr"]
    return out


def is_public(module: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in PUBLIC)


def test_private_flower_imports_live_in_simulation_py_only():
    offenders = [
        f"{path.relative_to(SRC)}: from {mod} import {name}"
        for path in sorted(SRC.rglob("*.py"))
        if path.name != "simulation.py"
        for mod, name in flwr_imports(path)
        if not is_public(mod)
    ]
    assert not offenders, "private Flower imports outside simulation.py:\n" + "\n".join(offenders)


def test_the_private_names_still_exist_in_the_installed_flower():
    private = [(m, n) for m, n in flwr_imports(SRC / "simulation.py") if not is_public(m)]
    assert len(private) >= 5  # the parser found them (guards this test against itself)
    missing = []
    for mod, name in private:
        try:
            getattr(importlib.import_module(mod), name)
        except (ImportError, AttributeError) as err:
            missing.append(f"from {mod} import {name}: {err}")
    assert not missing, (
        f"flwr {version('flwr')} moved private names simulation.py uses; "
        "re-check them there:\n" + "\n".join(missing)
    )


def test_private_run_simulation_still_takes_what_fedtune_passes():
    from flwr.simulation.run_simulation import _run_simulation

    passed = {
        "num_supernodes",
        "exit_event",
        "client_app",
        "server_app",
        "backend_config",
        "server_app_context",
        "app_dir",
        "run",
        "is_app",
    }
    params = set(inspect.signature(_run_simulation).parameters)
    assert passed <= params, f"_run_simulation lost {passed - params} in flwr {version('flwr')}"


def test_simulation_py_names_the_flower_version_it_was_checked_against():
    text = (SRC / "simulation.py").read_text()
    checked = re.search(r"checked against flwr (\d+\.\d+\.\d+)", text)
    assert checked, "simulation.py must say which Flower version its private imports match"
    assert checked.group(1) == version("flwr"), (
        f"flwr is {version('flwr')} but simulation.py's private imports were checked against "
        f"{checked.group(1)}: re-check them, then update that comment"
    )
