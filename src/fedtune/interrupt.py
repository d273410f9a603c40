"""Ctrl-C: stop within seconds, keep every finished round, say how to go on.

Why not let KeyboardInterrupt unwind: Flower's simulation runs the ServerApp in a
non-daemon thread and the clients in a thread pool waiting on Ray actors, so the exception
in the main thread left the process alive at 0% CPU for minutes. Nothing needs unwinding:
metrics.jsonl lines and checkpoints are written atomically as each round finishes. So the
first Ctrl-C prints where the run stands, kills every process this one started (Ray's
workers, a local deployment's SuperLink and SuperNodes) and exits 130; a second one exits
at once.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from fedtune.checkpoint import latest
from fedtune.results import read_metrics

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C


def children_of() -> dict[int, list[int]]:
    """parent pid -> child pids, from /proc (Linux; empty elsewhere)."""
    tree: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid, rest = stat.read_text().split(" ", 1)
            ppid = int(rest.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        tree.setdefault(ppid, []).append(int(pid))
    return tree


def descendants(pid: int) -> list[int]:
    tree, out, todo = children_of(), [], [pid]
    while todo:
        kids = tree.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def gone(pid: int) -> bool:
    """Exited (or a zombie, which nobody may reap in a container)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX"
    except OSError:
        return True


def kill_descendants(wait_s: float = 5.0) -> None:
    """SIGKILL every descendant, deepest first (nobody respawns them), then wait until they
    are gone: a killed process holding GBs takes a moment to free them."""
    pids = list(reversed(descendants(os.getpid())))
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and not all(gone(p) for p in pids):
        time.sleep(0.05)


def where_it_stands(run_dir: str | Path) -> str:
    """'interrupted after round N; resume with: ...' from the run folder's own files."""
    rows = [r for r in read_metrics(run_dir) if r.get("status") != "failed"]
    if not rows:
        return f"interrupted before round 0 finished; nothing to resume in {run_dir}"
    ckpt = latest(run_dir)
    if ckpt is None:
        return (
            f"interrupted after round {rows[-1]['round']}; metrics in {run_dir}; no "
            "checkpoint to resume from (output.save_every = 0)"
        )
    return (
        f"interrupted after round {rows[-1]['round']}; resume with: fedtune run --resume "
        f"{run_dir}" + (f" (from round {ckpt[0]})" if ckpt[0] != rows[-1]["round"] else "")
    )


class StopOnCtrlC:
    """`with StopOnCtrlC(lambda: where_it_stands(dir)):` around a run."""

    def __init__(self, message: Callable[[], str]):
        self.message, self.hit, self.old = message, False, None

    def handler(self, *_) -> None:
        if self.hit:
            os._exit(EXIT_INTERRUPTED)
        self.hit = True
        print("\nfedtune: stopping (Ctrl-C again to exit at once)...", file=sys.stderr, flush=True)
        kill_descendants()
        try:
            text = self.message()
        except Exception as e:  # noqa: BLE001 - the exit must happen whatever the folder holds
            text = f"interrupted ({e})"
        print(f"fedtune: {text}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(EXIT_INTERRUPTED)

    def __enter__(self):
        self.old = signal.signal(signal.SIGINT, self.handler)
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.old)
