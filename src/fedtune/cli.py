"""`fedtune` command line: run | validate | deploy | worker | compare | report | eval | ls |
push | init | keys.

Heavy imports (torch, transformers, flwr) happen only after the recipe validated, so a bad
key fails in about a second.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from fedtune.cli_args import build_parser


def _load(args):
    from fedtune import config as C

    if getattr(args, "resume", None):
        # a run folder's config.toml is a complete recipe; overrides may extend the rounds
        run_dir = Path(args.resume).expanduser()
        if not (run_dir / "config.toml").is_file():
            raise C.ConfigError(
                [
                    f"--resume {run_dir}: not a fedtune run folder (no "
                    "config.toml there); give the folder a run wrote"
                ]
            )
        cfg = C.load(
            run_dir / "config.toml",
            [*args.set, "output.resume=true", f"output.dir={run_dir.absolute()}"],
        )
        from fedtune.checkpoint import check_resumable

        check_resumable(run_dir, cfg)  # no checkpoint, or a changed recipe: stop here
        return cfg
    if not args.recipe:
        raise C.ConfigError(["give a recipe (fedtune run RECIPE.toml) or --resume RUN_DIR"])
    cfg = C.load(args.recipe, args.set)
    out = Path(cfg.output.dir).expanduser()
    return C.updated(cfg, "output", dir=str(out.absolute()))  # every process writes there


def _preflight(cfg, strict: bool = True) -> None:
    """Every check that needs the model's config or the data, before any process starts;
    with HF_HUB_OFFLINE=1 an uncached hub model fails before transformers is imported."""
    from fedtune import config as C

    hub = C.offline_hub_problems(cfg)
    if hub and strict:
        raise C.ConfigError(hub)
    from fedtune.preflight import preflight

    for w in preflight(cfg, strict=strict):
        print(f"fedtune: warning: {w}", file=sys.stderr, flush=True)


def cmd_run(args) -> int:
    cfg = _load(args)
    _preflight(cfg)
    print(
        f"[fedtune] {args.recipe or args.resume}: {cfg.federation.num_clients} clients, "
        f"{cfg.federation.rounds} rounds, {cfg.model.finetune} fine-tuning of "
        f"{cfg.model.name} on {cfg.data.source} -> {cfg.output.dir}",
        flush=True,
    )
    from fedtune.interrupt import StopOnCtrlC, where_it_stands

    with StopOnCtrlC(lambda: where_it_stands(cfg.output.dir)):
        if args.engine == "inprocess":
            from fedtune.inprocess import run_inprocess

            summary = run_inprocess(cfg)
        else:
            from fedtune.simulation import run_simulation

            summary = run_simulation(cfg)
    print_summary(args, cfg, summary)
    return 0


def print_summary(args, cfg, summary: dict) -> None:
    """The end of a run: a short table for people, or with --json the summary for programs."""
    if args.json:
        print(json.dumps(summary | {"run_dir": str(cfg.output.dir)}, indent=2))
        return
    from fedtune.results import summary_text

    print(summary_text(cfg.output.dir, summary))


def cmd_validate(args) -> int:
    cfg = _load(args)
    _preflight(cfg, strict=False)  # a hub that cannot be reached is a warning here
    print(
        f"{args.recipe}: OK (config hash {cfg.hash()}; {cfg.federation.num_clients} "
        f"clients, {cfg.federation.rounds} rounds, strategy {cfg.strategy.name}, "
        f"task {cfg.task.type}, {cfg.model.finetune} on {cfg.model.name})"
    )
    return 0


def cmd_deploy(args) -> int:
    if args.where == "compose":
        return cmd_compose(args)
    if not args.recipe:
        from fedtune.errors import ConfigError

        raise ConfigError(["give a recipe: fedtune deploy local RECIPE.toml --clients N"])
    args.set = [*args.set, f"federation.num_clients={args.clients}"]
    cfg = _load(args)
    _preflight(cfg)
    from fedtune.deploy import deploy_local
    from fedtune.interrupt import StopOnCtrlC, where_it_stands

    with StopOnCtrlC(lambda: where_it_stands(cfg.output.dir)):  # tears every process down
        summary = deploy_local(
            cfg,
            tls=args.tls or args.auth,
            auth=args.auth,
            timeout=args.timeout,
            workers=not args.no_workers,
        )
    print_summary(args, cfg, summary)
    return 0


def cmd_compose(args) -> int:
    from fedtune import compose
    from fedtune.errors import ConfigError

    problems = [] if args.clients >= 1 else [f"--clients {args.clients}: must be 1 or more"]
    problems += [
        f"--mount {m}: give HOST:CONTAINER or HOST:CONTAINER:ro"
        for m in args.mount
        if len(m.split(":")) not in (2, 3) or (m.count(":") == 2 and not m.endswith(":ro"))
    ]
    if args.data_path and not args.data_path.startswith("/data"):
        problems.append(
            f"--data-path {args.data_path}: give a path inside the clients' /data mount "
            "(CLIENTk_DATA on each host), e.g. --data-path /data/train.jsonl"
        )
    if args.recipe:
        problems.append("deploy compose takes no recipe: `flwr run` submits it (deploy/README.md)")
    if problems:
        raise ConfigError(problems)
    layout = compose.Layout(
        args.clients,
        args.network,
        args.port,
        args.gpus,
        tuple(args.mount),
        args.tls,
        args.data_path,
    )
    for path in compose.write(layout, Path(args.out)):
        print(path)
    return 0


def cmd_worker(args) -> int:
    from fedtune.apps.worker import run

    run(args.socket)
    return 0


def cmd_report(args) -> int:
    """One run folder -> its report; a `fedtune compare` folder -> its comparison again;
    several run folders -> one comparison of them."""
    from fedtune import report
    from fedtune.errors import ConfigError

    dirs = [Path(p) for p in args.runs]
    if len(dirs) == 1 and (dirs[0] / "comparison.json").is_file():
        written = report.rewrite_study(dirs[0])
    else:
        missing = [str(d) for d in dirs if not (d / "metrics.jsonl").is_file()]
        if missing:
            raise ConfigError(
                [f"not a fedtune run folder (no metrics.jsonl): {', '.join(missing)}"]
            )
        written = (
            report.write_report(dirs[0])
            if len(dirs) == 1
            else report.write_comparison(dirs, report.comparison_dir(dirs))
        )
    for p in written:
        print(p)
    return 0


def cmd_compare(args) -> int:
    from fedtune import config as C

    sets = list(args.set)
    if args.out:
        sets.append(f"output.dir={Path(args.out).absolute()}")
    cfg = C.load(args.recipe, sets)
    arms = [a for part in (args.arms or []) for a in part.split(",") if a] or cfg.compare.arms
    seeds = args.seeds or cfg.compare.seeds
    problems = [f"unknown arm {a!r}" for a in arms if a not in C.FIXED_ARMS + C.STRATEGIES]
    if not arms:
        problems.append("no arms: give --arms a,b or a [compare] arms list in the recipe")
    if problems:
        raise C.ConfigError(problems + [f"known arms: {', '.join(C.FIXED_ARMS + C.STRATEGIES)}"])
    if "fedkd-lora" in arms and not cfg.kd.teacher_data_pct:
        raise C.ConfigError(
            [
                "arm fedkd-lora needs `kd.teacher_data_pct` > 0 (the public "
                "slice its teacher trains on; every arm's clients then exclude it)"
            ]
        )
    from fedtune.compare import run_compare

    print(
        f"[fedtune] compare {args.recipe}: arms {', '.join(arms)} x {seeds} seed(s) -> "
        f"{Path(cfg.output.dir).absolute()}",
        flush=True,
    )
    from fedtune.interrupt import StopOnCtrlC

    root = Path(cfg.output.dir).absolute()
    with StopOnCtrlC(lambda: f"interrupted; the arms that finished are in {root}"):
        result = run_compare(cfg, arms, seeds)
    print((root / "comparison.md").read_text())
    failed = [a for a, r in result["arms"].items() if r["status"] != "ok"]
    return 1 if failed and len(failed) == len(arms) else 0


def cmd_eval(args) -> int:
    from fedtune.evaluate import evaluate_saved

    suites = [s for part in args.suite for s in part.split(",")]
    bad = [s for s in suites if s not in ("mmlu", "task")]
    if bad:
        from fedtune.config import ConfigError

        raise ConfigError([f"--suite {', '.join(bad)}: known suites are mmlu, task"])
    print(json.dumps(evaluate_saved(args.target, suites, args.set, args.out), indent=2))
    return 0


def cmd_ls(args) -> int:
    from fedtune.results import list_runs

    runs = list_runs(args.dir)
    if not runs:
        print(f"no run folders in {args.dir}")
        return 0
    print(f"{'status':<10} {'rounds':>6} {'best':>22} {'wall':>8}  run")
    for r in runs:
        best = (
            f"{r['best_metric']} {r['best_value']:.4f} @{r['best_round']}"
            if r["best_value"] is not None
            else "-"
        )
        wall = f"{r['wall_seconds']:.0f} s" if r["wall_seconds"] is not None else "-"
        rounds = "-" if r["rounds"] is None else r["rounds"]
        print(f"{r['status']:<10} {rounds:>6} {best:>22} {wall:>8}  {r['run']}")
    return 0


def cmd_init(args) -> int:
    from fedtune.config import ConfigError, describe, load

    target = Path(args.file)
    if target.exists():
        raise ConfigError([f"{target} exists; give a new file name"])
    cfg, origin = None, "its default"
    if args.source:
        source = Path(args.source).expanduser()
        if not source.is_file() and (Path("recipes") / f"{args.source}.toml").is_file():
            source = Path("recipes") / f"{args.source}.toml"
        if not source.is_file():
            known = sorted(p.stem for p in Path("recipes").glob("*.toml"))
            raise ConfigError(
                [
                    f"--from {args.source}: no such recipe file"
                    + (f", nor recipes/{args.source}.toml ({', '.join(known)})" if known else "")
                ]
            )
        cfg, origin = load(str(source)), f"its value in {source}"
    header = (
        f"# A fedtune recipe: every key with {origin} and what it does (`fedtune keys`).\n"
        "# Delete what you keep at its default; run with: fedtune run " + str(target) + "\n"
    )
    target.write_text(header + describe(cfg) + "\n")
    print(f"wrote {target}")
    return 0


def cmd_push(args) -> int:
    from fedtune.errors import ConfigError, RunError

    final = Path(args.run).expanduser() / "final"
    if not (final / "README.md").is_file():
        raise ConfigError([f"{final} holds no final model (a finished run writes it)"])
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ConfigError(["HF_HUB_OFFLINE=1 switches the hub off; unset it to push"])
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    try:
        api.create_repo(args.repo_id, private=args.private, exist_ok=True)
        info = api.upload_folder(
            folder_path=str(final), repo_id=args.repo_id, commit_message=f"fedtune: {args.run}"
        )
    except (HfHubHTTPError, OSError) as err:  # no token, no rights, no network
        raise RunError(f"pushing {final} to {args.repo_id} failed: {err}") from None
    print(getattr(info, "commit_url", None) or f"https://huggingface.co/{args.repo_id}")
    return 0


def cmd_keys(args) -> int:
    from fedtune.config import describe

    print(describe())
    return 0


def main(argv: list[str] | None = None) -> int:
    from fedtune.console import to_terminal

    to_terminal()  # every `fedtune` logger: "[fedtune] ..." lines on stderr, INFO and up
    args = build_parser().parse_args(argv)
    if args.verbose:
        os.environ["FEDTUNE_VERBOSE"] = "1"
    from fedtune.errors import FedtuneError

    try:
        return COMMANDS[args.command](args)
    except BrokenPipeError:  # `fedtune keys | head`: the reader left, nothing to report
        sys.stderr.close()
        return 0
    except FedtuneError as err:  # a problem the user can fix: one line (bugs keep tracebacks)
        if args.debug:
            raise
        print(f"fedtune: {err}", file=sys.stderr)
        return err.exit_code


COMMANDS = {
    "run": cmd_run,
    "validate": cmd_validate,
    "deploy": cmd_deploy,
    "worker": cmd_worker,
    "report": cmd_report,
    "compare": cmd_compare,
    "eval": cmd_eval,
    "keys": cmd_keys,
    "ls": cmd_ls,
    "push": cmd_push,
    "init": cmd_init,
}


if __name__ == "__main__":
    sys.exit(main())
