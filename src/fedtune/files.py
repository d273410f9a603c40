"""Atomic writes of files and folders: a reader (another process, a resumed run, a crash
that stops us half-way) sees the old content or the new, never half of it.

Why one module at the bottom of the import graph: metrics, summaries, checkpoints, cached
examples, converted models and KD teachers are all written by processes that may die or
race each other; one tested rule for all of them beats seven hand-written copies.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; what the block writes there replaces `path`
    when the block succeeds, and is removed when it fails."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


@contextmanager
def atomic_folder(target: str | Path, replace: bool = True) -> Iterator[Path]:
    """Yield an empty temporary folder next to `target`; when the block succeeds it becomes
    `target`. `replace=True` swaps out an existing target (checkpoints: the newest wins);
    `replace=False` keeps an existing one (caches: a concurrent writer that finished first
    built the same thing, ours is dropped). A failed block leaves `target` untouched."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".tmp-{target.name}-"))
    try:
        yield tmp
        if replace and target.exists():
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".old-{target.name}-"))
            target.rename(old / target.name)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                tmp.rename(target)
            except OSError:  # `target` appeared meanwhile (replace=False): keep it
                pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
