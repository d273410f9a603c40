"""Ctrl-C on a real run: it stops within seconds, kills what it started, keeps every
finished round, says how to resume, exits 130; and the resume finishes the run."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from fedtune.files import atomic_write_json
from fedtune.interrupt import descendants, where_it_stands
from test_simulation_e2e import cli_args, read_rows, tiny_overrides


def fake_run(tmp_path: Path, rounds: list[int], checkpoint: int | None) -> Path:
    lines = [f'{{"round": {r}, "eval_loss": 1.0}}' for r in rounds]
    (tmp_path / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    if checkpoint is not None:
        folder = tmp_path / "checkpoints" / f"round-{checkpoint:04d}"
        folder.mkdir(parents=True)
        (folder / "server_state.pt").write_bytes(b"x")
        atomic_write_json(
            tmp_path / "checkpoints" / "latest.json", {"round": checkpoint, "path": folder.name}
        )
    return tmp_path


@pytest.mark.parametrize(
    "rounds, checkpoint, expected",
    [
        ([0, 1, 2], 2, "interrupted after round 2; resume with: fedtune run --resume {d}"),
        ([0, 1, 2], 1, "interrupted after round 2; resume with: fedtune run --resume {d} "
         "(from round 1)"),
        ([0, 1], None, "interrupted after round 1; metrics in {d}; no checkpoint to resume "
         "from (output.save_every = 0)"),
        ([], None, "interrupted before round 0 finished; nothing to resume in {d}"),
    ],
)  # fmt: skip
def test_the_message_says_where_the_run_stands(tmp_path, rounds, checkpoint, expected):
    d = fake_run(tmp_path, rounds, checkpoint)
    assert where_it_stands(d) == expected.format(d=d)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; nobody may reap it in a container


@pytest.mark.slow
def test_ctrl_c_stops_a_simulation_keeps_its_rounds_and_resume_finishes_it(
    tmp_path, tiny_model_dir, code_jsonl
):
    out = tmp_path / "run"
    sets = ["federation.rounds=6", "output.plots=false", "output.save_every=1"]
    proc = subprocess.Popen(
        cli_args(tiny_overrides(tiny_model_dir, code_jsonl, out, *sets)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # the SIGINT below reaches only this run
    )
    deadline = time.time() + 240
    while len(read_rows(out)) < 2:  # round 1 finished
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.2)
    started = descendants(proc.pid)
    assert started, "the simulation runs Ray processes"
    t0 = time.time()
    os.kill(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    took = time.time() - t0
    assert proc.returncode == 130, err[-3000:]
    assert took < 15, took
    assert "Traceback" not in err, err[-3000:]
    done = read_rows(out)[-1]["round"]
    assert f"interrupted after round {done}; resume with: fedtune run --resume {out}" in err
    left = [p for p in started if alive(p)]
    assert not left, (
        f"processes left running: {[Path(f'/proc/{p}/cmdline').read_bytes()[:200] for p in left]}"
    )
    assert not (out / "summary.json").exists()  # the folder does not look finished

    resumed = subprocess.run(
        cli_args([], recipe=None) + ["--resume", str(out)], capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["round"] for r in read_rows(out)] == list(range(7))
    assert (out / "summary.json").exists()
