"""The `fedtune` argument parser: every command, argument and help line, and nothing else.

Why apart from cli.py: the parser is data (tests walk it to check that every argument has
help), and cli.py stays the commands themselves. Importing this costs no torch.
"""

from __future__ import annotations

import argparse

from fedtune import __version__

EXAMPLES = """examples:
  fedtune run recipes/demo.toml                      the offline demo (3 clients, 3 rounds)
  fedtune run recipes/demo.toml --set federation.rounds=5 --set output.dir=runs/five
  fedtune run --resume runs/five                     continue a stopped run
  fedtune validate my.toml                           check a recipe against model and data
  fedtune deploy local recipes/demo.toml --clients 3 the same on Flower's Deployment Engine
  fedtune compare recipes/demo.toml --arms pretrained,fedlora
  fedtune ls                                         run folders: status, rounds, best metric
  fedtune init my.toml                               a recipe with every key and its default
  fedtune init my.toml --from demo-instruct          the same, from recipes/demo-instruct.toml
"""


def add_overrides(parser, helptext: str) -> None:
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=helptext)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedtune",
        description="Federated fine-tuning of language models on Flower and Hugging Face.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of an error (normally one line)"
    )
    parser.add_argument(
        "--verbose", action="store_true", help="also show Flower's lines fedtune filters out"
    )
    parser.add_argument("--version", action="version", version=f"fedtune {__version__}")
    for name, helptext in [
        ("run", "run a recipe on Flower's Simulation Engine"),
        ("validate", "check a recipe (keys, types, ranges, paths) without training"),
    ]:
        p = sub.add_parser(name, help=helptext)
        p.add_argument(
            "recipe",
            nargs="?" if name == "run" else None,
            help="recipe TOML file, e.g. recipes/demo.toml",
        )
        add_overrides(p, "override a recipe value, e.g. --set federation.rounds=2")
        if name == "run":
            p.add_argument(
                "--json", action="store_true", help="print the run's summary.json at the end"
            )
            p.add_argument(
                "--resume",
                metavar="RUN_DIR",
                help="continue a stopped or killed run from its latest checkpoint",
            )
            p.add_argument(
                "--engine",
                choices=["simulation", "inprocess"],
                default="simulation",
                help="simulation: Flower's Simulation Engine "
                "(default); inprocess: clients called in this process, one after "
                "another, no Ray (debugging, non-federated baselines)",
            )
    p = sub.add_parser(
        "deploy",
        help="run a recipe on Flower's Deployment Engine, or write Docker Compose files for it",
    )
    p.add_argument(
        "where",
        choices=["local", "compose"],
        help="local: run RECIPE on a SuperLink + SuperNodes as processes on 127.0.0.1; "
        "compose: write compose.yml (+ compose.tls.yml with --tls) for --clients SuperNodes "
        "in containers (deploy/README.md)",
    )
    p.add_argument("recipe", nargs="?", help="recipe TOML file, e.g. recipes/demo.toml (local)")
    p.add_argument("--clients", type=int, required=True, help="number of SuperNodes")
    p.add_argument(
        "--tls",
        action="store_true",
        help="local: TLS with a generated local CA; compose: also write the TLS + SuperNode "
        "authentication overlay",
    )
    p.add_argument(
        "--network",
        choices=["bridge", "host"],
        default="bridge",
        help="compose: bridge (compose's network, services by name; default) or host (every "
        "container on the host's network, each server on its own port)",
    )
    p.add_argument(
        "--port",
        type=int,
        default=9093,
        help="compose --network host: the SuperLink's port; SuperNode i serves on PORT + i",
    )
    p.add_argument(
        "--gpus", action="store_true", help="compose: clientapps and workers get the host's GPUs"
    )
    p.add_argument(
        "--mount",
        action="append",
        default=[],
        metavar="HOST:CONTAINER[:ro]",
        help="compose: a folder every fedtune container mounts (your recipe, model, data), "
        "e.g. --mount $PWD/work:/work:ro",
    )
    p.add_argument(
        "--data-path",
        default="",
        metavar="PATH",
        help="compose: each client trains on its own data at PATH inside its /data mount "
        "(CLIENTk_DATA=host folder), e.g. /data/train.jsonl; default: its shard of data.source",
    )
    p.add_argument("--out", default="deploy", help="compose: folder to write into (default deploy)")
    p.add_argument("--auth", action="store_true", help="SuperNode authentication (implies TLS)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds before giving up")
    p.add_argument("--json", action="store_true", help="print the run's summary.json at the end")
    p.add_argument(
        "--no-workers",
        action="store_true",
        help="no `fedtune worker` beside each SuperNode: every ClientApp process loads the "
        "model and data itself, each round (Flower's own behaviour)",
    )
    add_overrides(p, "override a recipe value, e.g. --set federation.rounds=2")
    p = sub.add_parser(
        "worker",
        help="keep model and data warm beside a SuperNode: its ClientApps relay train "
        'messages here (node config worker-socket="PATH")',
    )
    p.add_argument("--socket", required=True, help="Unix socket path (at most 100 bytes)")
    p = sub.add_parser(
        "report", help="(re)write report.md/.html and plots of one run, or overlay several runs"
    )
    p.add_argument(
        "runs", nargs="+", metavar="RUN_DIR", help="one run folder, or several to overlay"
    )
    p = sub.add_parser(
        "compare",
        help="run several arms (baselines, strategies, FedKD) "
        "on the same data and seeds; write comparison.json/.md and plots",
    )
    p.add_argument("recipe", help="recipe TOML file whose [compare] table names the arms")
    p.add_argument(
        "--arms",
        action="append",
        help="comma-separated: pretrained, "
        "centralized, local-only, fedavg-full, fedlora, fedkd-lora, or a strategy "
        "(default: the recipe's [compare] arms)",
    )
    p.add_argument("--seeds", type=int, help="seeds per arm (default: [compare] seeds)")
    p.add_argument("--out", help="comparison folder (default: the recipe's output.dir)")
    add_overrides(p, "override a recipe value for every arm, e.g. --set federation.rounds=2")
    p = sub.add_parser(
        "eval",
        help="evaluate a run's final model, or a base model, on "
        "benchmark suites (mmlu) and/or the recipe's test split (task)",
    )
    p.add_argument(
        "target",
        help="a run folder (uses its config.toml and final/), or a "
        "model: hub id, local folder, offline:NAME",
    )
    p.add_argument(
        "--suite",
        action="append",
        required=True,
        help="mmlu and/or task (comma-separated or repeated)",
    )
    p.add_argument(
        "--out", help="where eval/*.json go (default: the run folder, or runs/eval-MODEL)"
    )
    add_overrides(p, "e.g. --set eval.mmlu_source=offline:mmlu-cot")
    sub.add_parser("keys", help="list every recipe key with its default")
    p = sub.add_parser("ls", help="list run folders: status, rounds, best metric, wall time")
    p.add_argument("dir", nargs="?", default="runs", help="where to look (default: runs)")
    p = sub.add_parser("push", help="upload a run's final/ model (and its model card) to the hub")
    p.add_argument("run", metavar="RUN_DIR", help="a finished run folder (it has final/)")
    p.add_argument("repo_id", help="USER/NAME on the Hugging Face hub (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p = sub.add_parser("init", help="write a recipe with every key, its value and its help")
    p.add_argument("file", help="the new recipe file, e.g. my-run.toml")
    p.add_argument(
        "--from",
        dest="source",
        metavar="RECIPE",
        help="start from this recipe's values instead of the defaults: a file, or a name in "
        "./recipes (demo, demo-instruct, opt350m-codeparrot-fedavgm, ...)",
    )
    return parser
