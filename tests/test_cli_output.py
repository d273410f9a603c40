"""The end of a run, for people: a table of rounds, the best round, totals, paths."""

import json
from pathlib import Path

import pytest

from fedtune.results import summary_text

ROOT = Path(__file__).resolve().parents[1]


def write_rows(folder, rows):
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_the_table_names_the_best_round_and_the_totals(tmp_path):
    rows = [{"round": 0, "eval_loss": 2.5}]
    rows += [
        {"round": 1, "eval_loss": 2.25, "train_loss": 2.4, "round_seconds": 30.0,
         "bytes_down": 1_000_000, "bytes_up": 500_000},
        {"round": 2, "eval_loss": 2.375, "train_loss": 2.2, "round_seconds": 28.25,
         "bytes_down": 1_000_000, "bytes_up": 500_000},
    ]  # fmt: skip
    write_rows(tmp_path, rows)
    (tmp_path / "report.html").write_text("<html>")
    summary = {
        "best_metric": "eval_loss",
        "best_round": 1,
        "best_value": 2.25,
        "initial": rows[0],
        "rounds_completed": 2,
        "total_wall_seconds": 1234.4,
        "total_bytes_down": 2_000_000,
        "total_bytes_up": 1_000_000,
        "final_model": str(tmp_path / "final"),
    }
    assert summary_text(tmp_path, summary).splitlines() == [
        "round     eval_loss  train_loss   seconds   MB moved",
        "    0        2.5000           -         -       0.00",
        "    1        2.2500      2.4000      30.0       1.50",
        "    2        2.3750      2.2000      28.2       1.50",
        "best round 1: eval_loss 2.2500 (round 0: 2.5000)",
        "2 rounds in 1,234 s; 3.00 MB communicated (all clients, both directions)",
        f"final model: {tmp_path / 'final'}",
        f"report:      {tmp_path / 'report.html'}",
        f"metrics:     {tmp_path / 'metrics.jsonl'}",
    ]


def test_a_long_run_shows_its_first_and_last_rounds(tmp_path):
    rows = [{"round": r, "eval_accuracy": r / 100} for r in range(30)]
    write_rows(tmp_path, rows)
    summary = {"best_metric": "eval_accuracy", "best_round": 29, "best_value": 0.29,
               "initial": rows[0], "rounds_completed": 29}  # fmt: skip
    table = summary_text(tmp_path, summary, max_rows=8).splitlines()[1:9]
    assert [line.split()[0] for line in table] == ["0", "1", "2", "...", "26", "27", "28", "29"]


def test_init_writes_a_recipe_of_the_defaults_that_loads(tmp_path):
    from fedtune.cli import main
    from fedtune.config import load

    target = tmp_path / "mine.toml"
    assert main(["init", str(target)]) == 0
    assert load(str(target)) == load(None)  # every key, at its default, parses back
    assert main(["init", str(target)]) == 2  # never overwrites


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").glob("*.toml")), ids=lambda p: p.stem)
def test_init_from_a_recipe_writes_every_key_with_that_recipes_values(tmp_path, recipe):
    """`init --from`: the new file loads to the very config of the recipe it came from, and
    says which defaults the recipe changed."""
    from fedtune.cli import main
    from fedtune.config import describe, load

    target = tmp_path / "mine.toml"
    assert main(["init", str(target), "--from", str(recipe)]) == 0
    assert load(str(target)) == load(str(recipe))
    text = target.read_text()
    assert f"its value in {recipe}" in text
    keys = [ln.split(" = ")[0] for ln in describe().splitlines() if ln.startswith("  ")]
    assert [ln.split(" = ")[0] for ln in text.splitlines() if ln.startswith("  ")] == keys
    changed = [ln for ln in text.splitlines() if "(default " in ln]
    assert changed and all(ln.split(" = ")[0].strip() for ln in changed)


def test_init_from_a_name_in_recipes_and_an_unknown_name(tmp_path, monkeypatch, capsys):
    from fedtune.cli import main
    from fedtune.config import load

    monkeypatch.chdir(ROOT)
    target = tmp_path / "instruct.toml"
    assert main(["init", str(target), "--from", "demo-instruct"]) == 0
    assert load(str(target)) == load("recipes/demo-instruct.toml")
    assert main(["init", str(tmp_path / "x.toml"), "--from", "demo-instrcut"]) == 2
    err = capsys.readouterr().err
    assert "no such recipe file, nor recipes/demo-instrcut.toml" in err and "demo-instruct" in err
    assert not (tmp_path / "x.toml").exists()


def test_ls_lists_finished_and_incomplete_runs(tmp_path, capsys):
    from fedtune.cli import main

    done, half = tmp_path / "done", tmp_path / "nested" / "half"
    for folder, rounds in ((done, 3), (half, 1)):
        folder.mkdir(parents=True)
        write_rows(folder, [{"round": r, "eval_loss": 3.0 - r / 4} for r in range(rounds + 1)])
    (done / "summary.json").write_text(
        json.dumps({"best_metric": "eval_loss", "best_value": 2.25, "best_round": 3,
                    "total_wall_seconds": 95.4})
    )  # fmt: skip
    (tmp_path / "link").symlink_to(done)  # listed once
    assert main(["ls", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = sorted(line.split() for line in lines[1:])
    assert rows == [
        ["finished", "3", "eval_loss", "2.2500", "@3", "95", "s", str(done)],
        ["incomplete", "1", "-", "-", str(half)],
    ]


def test_progress_shows_elapsed_and_an_eta_from_the_rounds_so_far():
    from fedtune.rounds import clock, eta_text

    assert [clock(s) for s in (9.4, 59.6, 192, 3725)] == ["9s", "1m00s", "3m12s", "1h02m"]
    assert eta_text(60, 2, 3) == "elapsed 1m00s, ETA 1m30s"  # 30 s a round, 3 to go
    assert eta_text(5, 0, 3) == "elapsed 5s"  # round 0: no round timed yet


def test_flower_lines_fedtune_reports_itself_are_filtered_and_never_coloured_in_a_pipe():
    import os
    import subprocess
    import sys

    code = (
        "import logging; from flwr.common.logger import log; "
        "from fedtune.console import quiet_flower; quiet_flower(); "
        "log(logging.WARNING, 'fraction_evaluate is set to 0.0. Federated evaluation off'); "
        "log(logging.WARNING, 'Manually terminating ClientAppActor'); "
        "log(logging.INFO, 'a line that stays')"
    )

    def stderr(**env):
        run = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=os.environ | env
        )
        return run.stderr.splitlines()

    assert stderr() == ["INFO :      a line that stays"]  # no ANSI codes into a pipe
    assert len(stderr(FEDTUNE_VERBOSE="1")) == 3  # --verbose keeps them


def test_push_uploads_final_and_refuses_offline(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    from fedtune.cli import main

    final = tmp_path / "run" / "final"
    final.mkdir(parents=True)
    (final / "README.md").write_text("card")
    calls = []

    class FakeApi:  # what fedtune asks of huggingface_hub; the hub itself is not reachable here
        def create_repo(self, repo_id, private, exist_ok):
            calls.append(("create", repo_id, private, exist_ok))

        def upload_folder(self, folder_path, repo_id, commit_message):
            calls.append(("upload", folder_path, repo_id))
            return type("Info", (), {"commit_url": f"https://hub/{repo_id}/commit/1"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["push", str(tmp_path / "run"), "me/model"]) == 2
    assert "HF_HUB_OFFLINE=1" in capsys.readouterr().err and not calls
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert main(["push", str(tmp_path / "run"), "me/model", "--private"]) == 0
    assert calls == [("create", "me/model", True, True), ("upload", str(final), "me/model")]
    assert capsys.readouterr().out.strip() == "https://hub/me/model/commit/1"
    assert main(["push", str(tmp_path / "nothing"), "me/model"]) == 2  # no final/ there


def test_the_model_card_names_the_hub_base_the_run_and_how_to_load_it():
    from fedtune.config import load
    from fedtune.report.card import model_card

    cfg = load(None, ["federation.num_clients=4", "strategy.name=fedprox"], check_paths=False)
    summary = {
        "best_metric": "eval_loss",
        "best_round": 3,
        "rounds_completed": 3,
        "initial": {"eval_loss": 2.73474},
        "final": {"eval_loss": 2.61418},
    }
    card = model_card(cfg, summary, "runs/x/final", local="/cache/models/SmolLM2")
    assert card.startswith("---\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\n")
    assert "| clients | 4, iid partitions, fraction 1.0 |" in card
    assert "| strategy | fedprox |" in card
    assert "| eval_loss, round 0 -> final | 2.7347 -> 2.6142 |" in card
    assert 'AutoPeftModelForCausalLM.from_pretrained("runs/x/final")' in card
    offline = 'AutoModelForCausalLM.from_pretrained("/cache/models/SmolLM2"), "runs/x/final")'
    assert f"PeftModel.from_pretrained({offline}" in card


def test_every_argument_of_every_command_says_what_it_does():
    import argparse

    from fedtune.cli import COMMANDS
    from fedtune.cli_args import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert sorted(sub.choices) == sorted(COMMANDS)  # every command has a handler
    silent = [
        (name, a.dest)
        for name, p in [("fedtune", parser), *sub.choices.items()]
        for a in p._actions
        if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)) and not a.help
    ]
    assert not silent, silent
    assert "examples:" in parser.format_help() and "`" not in parser.format_help()
