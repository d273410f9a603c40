"""Per-round time in deployment (with and without `fedtune worker`s, and in Docker
containers) vs simulation vs a plain local loop, with a breakdown.

    python bench/deploy_overhead.py                 # demo recipe, 2 rounds
    python bench/deploy_overhead.py --rounds 3 --set train.local_steps=4
    python bench/deploy_overhead.py --docker        # + containers (root, a Docker daemon;
                                                    #   builds fedtune:local first)

Flower 1.41's deployment runtime starts a fresh ClientApp process for every message, so
without workers each client pays process start + imports, model load and data preparation
every round; with a worker beside each SuperNode (the `fedtune deploy local` default) the
per-message process only relays to it. Not a test: the numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from round_overhead import ROOT, flower_run, plain_loop  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(ROOT / "recipes/demo.toml"))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument(
        "--workers-only", action="store_true", help="skip the deployment without workers"
    )
    parser.add_argument(
        "--docker", action="store_true", help="also in containers (deploy/README.md layout)"
    )
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from fedtune import config as C
    from fedtune.deploy import deploy_local
    from fedtune.results import read_metrics

    overrides = [
        f"federation.rounds={args.rounds}",
        "output.plots=false",
        "output.save_every=0",
        *args.set,
    ]
    deps = {}
    with tempfile.TemporaryDirectory() as tmp:
        _, _, sim_rows = flower_run(args.recipe, overrides, Path(tmp) / "sim")
        for name, workers in (("workers", True), ("no workers", False))[
            : 1 if args.workers_only else 2
        ]:
            out = Path(tmp) / name.replace(" ", "-")
            cfg = C.load(args.recipe, [*overrides, f"output.dir={out}"])
            deploy_local(cfg, workers=workers)  # progress is logged; nothing configures logging
            deps[name] = read_metrics(out)
        if args.docker and (rows := in_containers(args.recipe, overrides, Path(tmp) / "docker")):
            deps["containers"] = rows
    setup, loop_s, _ = plain_loop(C.load(args.recipe, overrides))

    n = cfg.federation.num_clients
    print(f"recipe {args.recipe}, {n} clients, {overrides}; {cpu_name()}")
    print(f"{os.cpu_count()} cores; seconds per round")
    print(
        "| round | deployment, workers | deployment, no workers | containers, workers "
        "| simulation | plain loop |"
    )
    print("|---|---|---|---|---|---|")
    none = [None] * len(sim_rows)  # a column not run (--workers-only, no --docker)
    columns = [deps.get(k, none)[1:] for k in ("workers", "no workers", "containers")]
    for *ds, s in zip(*columns, sim_rows[1:], strict=True):
        sim = s["round_seconds"]
        cells = [
            f"{d['round_seconds']:.1f} ({d['round_seconds'] / sim:.2f}x)" if d else "-" for d in ds
        ]
        print(f"| {s['round']} | {' | '.join(cells)} | {sim:.1f} | {loop_s / args.rounds:.1f} |")
    print(f"plain loop setup (model load + data, once): {setup:.1f} s")
    print("breakdown per round (slowest client for each part; a round's clients run at once):")
    for s in sim_rows[1:]:
        rest = s["round_seconds"] - s["client_train_seconds_sum"] - s["eval_seconds"]
        print(
            f"  simulation, round {s['round']}: training {s['client_train_seconds_sum']:.1f}"
            f" (clients in turn, summed) | server eval {s['eval_seconds']:.1f}"
            f" | setup, transfer, aggregation, waiting {rest:.1f}"
        )
    for name, rows in deps.items():
        for d in rows[1:]:
            rest = (
                d["round_seconds"]
                - d["client_process_age_seconds_max"]
                - d["client_setup_seconds_max"]
                - d["client_train_seconds_max"]
                - d["eval_seconds"]
            )
            print(
                f"  {name}, round {d['round']}: ClientApp spawn+imports "
                f"{d['client_process_age_seconds_max']:.1f}"
                f" | model load {d['client_model_load_seconds_max']:.1f}"
                f" | data {d['client_data_seconds_max']:.1f}"
                f" | training {d['client_train_seconds_max']:.1f}"
                f" | server eval {d['eval_seconds']:.1f}"
                f" | transfer, aggregation, waiting {rest:.1f}"
                f" | {(d['bytes_down'] + d['bytes_up']) / 2**20:.1f} MiB moved"
                f" | warm workers {d['client_workers']}, fallbacks {d['client_worker_fallbacks']}"
            )


def in_containers(recipe: str, overrides: list[str], work: Path) -> list[dict]:
    """The recipe on `fedtune deploy compose` containers of this machine (host network, TLS,
    a worker beside each SuperNode), as tests/test_docker.py runs them; its metrics rows."""
    from fedtune import config as C
    from fedtune.containers import ComposeDeployment, docker_problem
    from fedtune.deploy import fit_threads, free_port
    from fedtune.results import read_metrics

    problem = docker_problem()
    if problem:
        print(f"containers: skipped ({problem})")
        return []
    image = "fedtune:local"
    subprocess.run(["bash", str(ROOT / "deploy/build-local-image.sh"), image], check=True)
    work.mkdir(parents=True)
    for folder in (work.parent, work):  # the containers' uid 49999 writes the run folder
        folder.chmod(0o777)
    out = work / "run"
    cfg = fit_threads(C.load(recipe, [*overrides, f"output.dir={out}"]))
    n = cfg.federation.num_clients
    certs = ["bash", str(ROOT / "deploy/certs.sh"), "-o", str(work / "certs"), "-n", str(n)]
    subprocess.run(certs, check=True, capture_output=True)
    with ComposeDeployment(work, work / "certs", n, image, free_port()) as dep:
        info = dep.wait(dep.conn.submit(cfg), out, 3600)
    if info.get("status") != "finished:completed":
        raise SystemExit(f"containers: the run ended {info}")
    return read_metrics(out)


def cpu_name() -> str:
    for line in (
        Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    ):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return ""


if __name__ == "__main__":
    main()
