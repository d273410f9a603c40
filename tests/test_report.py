"""fedtune.report on synthetic run folders: plots, reports, comparison, CLI body."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest

from fedtune import cli, report as R

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CONFIG = """# resolved config, hash 0123456789ab
[model]
name = "tiny"
finetune = "lora"

[strategy]
name = "fedavg"

[federation]
num_clients = 3
rounds = 5
"""
EVAL_LOSSES = [3.0, 2.6, 2.31, 2.4, 2.35, 2.38]  # best is round 2, not the last one


def make_run(
    root,
    name,
    losses=EVAL_LOSSES,
    *,
    task=False,
    partitions=False,
    summary=True,
    model="tiny",
    null_train=(),
    command=None,
):
    """A run folder as fedtune writes it, with plausible numbers that differ per round."""
    d = root / name
    d.mkdir(parents=True)
    rows = [
        {
            "round": 0,
            "eval_loss": losses[0],
            "eval_ppl": math.exp(losses[0]),
            "eval_seconds": 5.0,
            "server_peak_rss_mb": 1700.0,
        }
    ]
    for r, loss in enumerate(losses[1:], start=1):
        rows.append(
            {
                "round": r,
                "lr": 1e-3 / r,
                "eval_loss": loss,
                "eval_ppl": math.exp(loss),
                "eval_seconds": 5.0 + r / 10,
                "train_loss": None if r in null_train else loss - 0.2,
                "clients_sampled": 3,
                "clients_ok": 3 - (r in null_train),
                "clients_failed": int(r in null_train),
                "train_samples": 96,
                "train_tokens": 12288,
                "samples_per_s": 4.0 + r,
                "tokens_per_s": 500.0 + 10 * r,
                "client_train_seconds_max": 20.0 - r,
                "client_train_seconds_sum": 50.0,
                "client_setup_seconds_max": 1.0,
                "client_model_loads": 3,
                "bytes_down": 11202240 + 1000 * r,
                "bytes_up": 5601120 + 7 * r,
                "train_phase_seconds": 40.0 - r,
                "round_seconds": 45.0 - r,
                "server_peak_rss_mb": 1750.0 + r,
                "client_peak_rss_mb": 2600.0 + r,
            }
        )
        if task:
            rows[-1]["eval_accuracy"] = 0.5 + r / 20
    if task:
        rows[0]["eval_accuracy"] = 0.5
    if partitions:  # per-client numbers as round_row writes them
        for r in rows[1:]:
            r["clients"] = [
                {"partition": i, "train_loss": r["eval_loss"] + i / 10, "examples": 30 + i,
                 "steps": 4, "train_seconds": 6.0 + i, "bytes_up": 1867040}
                for i in range(3)
            ]  # fmt: skip
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "config.toml").write_text(CONFIG)
    if partitions:
        hist = [{"a": 30, "b": 5}, {"a": 10, "b": 40}, {"a": 1, "b": 1}]
        (d / "partitions.json").write_text(
            json.dumps(
                {
                    "clients": [
                        {"client": i, "num_examples": sum(h.values()), "histogram": h}
                        for i, h in enumerate(hist)
                    ]
                }
            )
        )
    if summary:
        best = min(rows, key=lambda r: r["eval_loss"])
        manifest = {
            "python": "3.11.7",
            "packages": {"torch": "2.13.0", "flwr": "1.41.0"},
            "seed": 0,
            "git_commit": "abc123",
        }
        (d / "summary.json").write_text(
            json.dumps(
                {
                    "rounds_completed": len(rows) - 1,
                    "best_round": best["round"],
                    "best_eval_loss": best["eval_loss"],
                    "initial": rows[0],
                    "final": rows[-1],
                    "total_wall_seconds": 250.5,
                    "model": model,
                    "finetune": "lora",
                    "strategy": "fedavg",
                    "trainable_parameters": 921600,
                    "client_failures": 0,
                    "fedtune_version": "0.1.0",
                    "config_hash": "0123456789ab",
                    "manifest": manifest,
                    **({"command": command} if command else {}),
                }
            )
        )
    return d, rows


def md_table(md: str, heading: str) -> list[list[str]]:
    """The markdown table under `## heading`, header included, cells unescaped."""
    part = md.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    lines = [ln for ln in part.splitlines() if ln.startswith("|")]
    split = [re.split(r"(?<!\\)\|", ln)[1:-1] for ln in lines]
    return [[c.strip().replace("\\|", "|") for c in row] for row in split[:1] + split[2:]]


def assert_png(path, min_kb=5):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > min_kb * 1024, (path, len(data))


def test_import_does_not_load_matplotlib():
    code = "import sys, fedtune.report; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_write_plots_full_run(tmp_path):
    d, _ = make_run(tmp_path, "run", task=True, partitions=True)
    paths = R.write_plots(d)
    assert [p.name for p in paths] == [
        "loss.png",
        "task_metrics.png",
        "time.png",
        "communication.png",
        "memory.png",
        "clients.png",
        "partitions.png",
    ]
    for p in paths:
        assert p.parent == d / "plots"
        assert_png(p)
        svg = p.with_suffix(".svg").read_text()  # a vector copy beside each PNG, for papers
        assert svg.startswith("<?xml") and "<svg" in svg
        # the subtitle names the run: model, data, task, strategy, clients, seed
        assert "tiny · fedavg · 3 clients" in svg, p
    with_svg = [p.name for p in paths] + [p.with_suffix(".svg").name for p in paths]
    assert sorted(x.name for x in (d / "plots").iterdir()) == sorted(with_svg)
    width = int.from_bytes(paths[0].read_bytes()[16:20], "big")  # IHDR
    assert width == 8 * 200  # 8-inch figures at 200 dpi


def test_optional_plots_only_when_data(tmp_path):
    d, _ = make_run(tmp_path, "run")
    (d / "plots").mkdir()
    (d / "plots" / "partitions.png").write_bytes(b"stale, from an earlier run here")
    names = {p.name for p in R.write_plots(d)}
    assert names == {"loss.png", "time.png", "communication.png", "memory.png"}
    svgs = {n.replace(".png", ".svg") for n in names}
    assert {p.name for p in (d / "plots").iterdir()} == names | svgs


@pytest.mark.parametrize(
    "lines",
    [
        [],  # run just started
        [{"round": 0, "eval_loss": 3.0, "eval_ppl": 20.1}],  # round 0 only
        [{"round": 0}, {"round": 1, "train_loss": None, "eval_loss": float("nan")}],
        [
            {"round": 0, "eval_loss": 3.0},
            {"round": 1, "train_loss": None, "eval_loss": 2.9, "bytes_down": 10, "bytes_up": None},
        ],
    ],
)
def test_write_plots_never_raises_on_partial_data(tmp_path, lines):
    d = tmp_path / "run"
    d.mkdir()
    text = "".join(json.dumps(r) + "\n" for r in lines) + '{"round": 2, "eval_lo'  # torn line
    (d / "metrics.jsonl").write_text(text)
    paths = R.write_plots(d)
    assert {p.name for p in paths} >= {"loss.png", "time.png", "communication.png", "memory.png"}
    for p in paths:
        assert_png(p, min_kb=1)
    md, html = R.write_report(d)
    assert "in progress" in md.read_text()
    assert html.read_text().count("data:image/png;base64,") == len(paths)


def test_report_per_round_table_matches_metrics(tmp_path):
    d, rows = make_run(tmp_path, "run", task=True, null_train=(3,))
    md, _ = R.write_report(d)
    table = md_table(md.read_text(), "Per round")
    head, body = table[0], table[1:]
    assert len(body) == len(rows)
    col = {h: i for i, h in enumerate(head)}
    assert "eval_accuracy" in col
    best = min(rows, key=lambda r: r["eval_loss"])["round"]
    for cells, row in zip(body, rows):
        marked = f"**{row['round']}** (best)" if row["round"] == best else str(row["round"])
        assert cells[col["round"]] == marked  # the best round stands out
        assert cells[col["eval_loss"]] == f"{row['eval_loss']:.4f}"
        if row["round"] == 0:
            assert cells[col["MiB down"]] == cells[col["train_loss"]] == ""
            continue
        assert cells[col["MiB down"]] == f"{row['bytes_down'] / 2**20:.2f}"
        assert cells[col["MiB up"]] == f"{row['bytes_up'] / 2**20:.2f}"
        assert cells[col["clients ok/sampled"]] == f"{row['clients_ok']}/3"
        assert float(cells[col["eval_accuracy"]]) == pytest.approx(row["eval_accuracy"])
        expected = "" if row["train_loss"] is None else f"{row['train_loss']:.4f}"
        assert cells[col["train_loss"]] == expected


def test_report_totals_best_round_and_environment(tmp_path):
    d, rows = make_run(tmp_path, "run", command="fedtune run recipes/demo.toml --set a=1")
    md, html = R.write_report(d)
    totals = dict(md_table(md.read_text(), "Summary")[1:])
    best = min(rows, key=lambda r: r["eval_loss"])
    assert best["round"] == 2 and totals["best round (by eval_loss)"] == "2"
    page = html.read_text()
    assert page.count("<tr class='best'>") == 1
    assert page.split("<tr class='best'>")[1].startswith("<td>2</td>")
    assert totals["best eval_loss"] == f"{best['eval_loss']:.4f}"
    mib_down = sum(r.get("bytes_down", 0) for r in rows) / 2**20
    mib_up = sum(r.get("bytes_up", 0) for r in rows) / 2**20
    assert totals["MiB down / up / total"] == (
        f"{mib_down:.2f} / {mib_up:.2f} / {mib_down + mib_up:.2f}"
    )
    assert totals["tokens/s (mean over rounds)"] == "530.0"  # mean of 510..550
    assert totals["rounds completed"] == "5" and totals["status"] == "finished"
    text = md.read_text()
    assert "fedtune run recipes/demo.toml --set a=1" in text
    assert "```toml\n# resolved config, hash 0123456789ab\n[model]" in text
    env = dict(md_table(text, "Environment")[1:])
    assert env["packages.torch"] == "2.13.0" and env["git_commit"] == "abc123"
    assert "fedtune run: tiny · lora · fedavg" in html.read_text()


def test_html_is_self_contained_and_escaped(tmp_path):
    evil = '<script>alert("x")</script>'
    d, _ = make_run(
        tmp_path,
        "run",
        task=True,
        partitions=True,
        model=evil,
        command="fedtune run r.toml && echo '<b>'",
    )
    md, html = R.write_report(d)
    page = html.read_text()
    assert page.count("data:image/png;base64,") == 7
    assert "<script" not in page and "&lt;script&gt;" in page
    assert "&lt;b&gt;" in page and "&amp;&amp;" in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", page)
    assert "<link" not in page and "@import" not in page
    parts = md_table(md.read_text(), "Partitions")
    assert parts[1:] == [
        ["0", "35", "a: 30, b: 5"],
        ["1", "50", "a: 10, b: 40"],
        ["2", "2", "a: 1, b: 1"],
    ]


def test_report_without_summary_gathers_environment(tmp_path):
    d, _ = make_run(tmp_path, "run", losses=[3.0, 2.8], summary=False)
    md, _ = R.write_report(d)
    text = md.read_text()
    assert "fedtune run: tiny · lora · fedavg" in text  # identity from config.toml
    env = dict(md_table(text, "Environment")[1:])
    assert env["python"] == sys.version.split()[0]
    assert {"torch", "transformers", "peft", "flwr", "cuda", "cpu_count"} <= env.keys()
    assert "so far" in dict(md_table(text, "Summary")[1:])["wall time"]


def test_comparison_lists_every_run(tmp_path):
    a, _ = make_run(tmp_path, "a", model="m|x")
    b, _ = make_run(tmp_path, "b", losses=[3.0, 2.0, 1.9])
    c, _ = make_run(tmp_path / "other", "a", losses=[3.0], summary=False)  # same name as a
    md, html = R.write_comparison([a, b, c], tmp_path / "cmp")
    table = md_table(md.read_text(), "Runs")
    assert table[0][:6] == ["run", "model", "strategy", "rounds", "best round", "best eval loss"]
    rows = {r[0]: r for r in table[1:]}
    assert set(rows) == {f"{tmp_path.name}/a", "b", "other/a"}
    assert all(len(r) == len(table[0]) for r in table)
    assert rows[f"{tmp_path.name}/a"][1] == "m|x (lora)"
    assert rows["b"][3:7] == ["2", "2", "1.9000", "1.9000"]
    assert rows["other/a"][3] == "0" and rows["other/a"][7] == "in progress"
    for name in ("compare_eval_loss.png", "compare_train_loss.png"):
        assert_png(tmp_path / "cmp" / "plots" / name)
    assert html.read_text().count("data:image/png;base64,") == 2


def test_fedtune_report_writes_one_report_or_a_comparison(tmp_path, capsys):
    a, _ = make_run(tmp_path, "a")
    b, _ = make_run(tmp_path, "b")
    assert cli.main(["report", str(a)]) == 0
    assert capsys.readouterr().out.split() == [str(a / "report.md"), str(a / "report.html")]
    assert cli.main(["report", str(a), str(b)]) == 0
    out_dir = tmp_path / "compare-a-vs-b"
    assert capsys.readouterr().out.split() == [
        str(out_dir / "report.md"),
        str(out_dir / "report.html"),
    ]
    empty = tmp_path / "not-a-run"
    empty.mkdir()
    assert cli.main(["report", str(a), str(empty)]) == 2
    err = capsys.readouterr().err
    assert str(empty) in err and "metrics.jsonl" in err and len(err.strip().splitlines()) == 1


def test_load_rows_sorted_last_wins_torn_line_skipped(tmp_path):
    lines = [
        {"round": 0, "eval_loss": 3.0},
        {"round": 2, "eval_loss": 2.0},
        {"round": 1, "eval_loss": 9.0},
        {"round": 1.0, "eval_loss": 2.5},
    ]
    text = "".join(json.dumps(r) + "\n" for r in lines) + "\n[1, 2]\n" + '{"round": 3, "ev'
    (tmp_path / "metrics.jsonl").write_text(text)
    rows = R.load_rows(tmp_path)
    assert [(r["round"], r["eval_loss"]) for r in rows] == [(0, 3.0), (1, 2.5), (2, 2.0)]
    assert R.best_row(rows)["round"] == 2
