"""Data: load a source, hold out the server's test split, partition the rest.

Why this order: the server test split is cut first from a seeded shuffle, so no client ever
sees it, whatever the partitioner; clients then split the remainder with flwr-datasets
partitioners, the same way Flower users do. Every process (server, each client) recomputes
the split deterministically from the config, so no raw data ever travels.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from datasets import Dataset, concatenate_datasets, load_dataset

from fedtune import __version__, assets, partition
from fedtune.config import DATA_SUFFIXES, DataConfig, check_data_file, looks_local
from fedtune.errors import DataError, HubDataError

FILE_KINDS = {
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".txt": "text",
}


def load_source(cfg: DataConfig, required: tuple[str, ...] | None = None) -> Dataset:
    """Read rows from a hub id, a local file, a folder of files, or a packaged corpus.

    `required` names the columns the task reads (default: `data.text_column`); a missing one
    is an error naming the columns the source has."""
    src = cfg.source
    if assets.is_offline(src):
        ds = Dataset.from_list(assets.load_offline_texts(src))
    elif looks_local(src, DATA_SUFFIXES):
        path = Path(src).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.glob(cfg.file_glob) if p.is_file())
            if not files:
                raise DataError(f"no files match `data.file_glob` {cfg.file_glob!r} in {path}")
            rows = [
                {
                    cfg.text_column: f.read_text(encoding="utf-8", errors="replace"),
                    "source": str(f.relative_to(path)),
                }
                for f in files
            ]
            ds = Dataset.from_list(rows)
        else:
            ds = _load_file(path)
    else:
        try:
            ds = load_dataset(src, cfg.subset or None, split=cfg.split)
        except (ConnectionError, FileNotFoundError, ValueError) as err:
            hint = (
                " (HF_HUB_OFFLINE=1 is set: hub datasets only work from the local cache;"
                " use a local file or folder, or offline:NAME)"
                if os.environ.get("HF_HUB_OFFLINE") == "1"
                else ""
            )
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise HubDataError(
                f"cannot load `data.source` = {src!r} (subset {cfg.subset!r}, "
                f"split {cfg.split!r}) from the hub: {first}{hint}"
            ) from None
    for col in (cfg.text_column,) if required is None else required:
        if col not in ds.column_names:
            raise DataError(
                f"column {col!r} is not in {src!r}; its columns are: "
                f"{', '.join(ds.column_names)} (set the column names in [task] "
                "or `data.text_column`)"
            )
    return ds


def _load_file(path: Path) -> Dataset:
    """A local data file as a Dataset; an unreadable one is a DataError naming the problem
    (empty, not UTF-8, the first malformed JSON line), not a pyarrow traceback."""
    if not path.exists() or path.suffix not in FILE_KINDS:
        raise DataError(
            f"data source {str(path)!r} does not exist or is not one of "
            f"{', '.join(FILE_KINDS)} or a folder"
        )
    if path.stat().st_size == 0:
        raise DataError(f"data file {path} is empty: no rows to train on")
    try:
        with partition.quiet():
            return load_dataset(FILE_KINDS[path.suffix], data_files=str(path), split="train")
    except Exception as err:  # noqa: BLE001 - datasets/pyarrow raise many kinds; say which line
        raise DataError(
            check_data_file(path, limit=None)
            or f"cannot read {path}: {type(err).__name__}: "
            f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        ) from None


def source_stamp(cfg: DataConfig) -> str | None:
    """What identifies the content of a local or packaged source without reading it all
    (file sizes and times); None for hub datasets, which the caller identifies by the
    loaded dataset's `_fingerprint` instead."""
    src = cfg.source
    if assets.is_offline(src):
        return f"{src}:{__version__}:{assets.offline_stamp(src)}"
    if not looks_local(src, DATA_SUFFIXES):
        return None
    path = Path(src).expanduser()
    if not path.exists():
        return "missing"
    files = sorted(p for p in path.glob(cfg.file_glob) if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for f in files:
        st = f.stat()
        digest.update(f"{f}:{st.st_mtime_ns}:{st.st_size}\n".encode())
    return digest.hexdigest()[:24]


def split(ds: Dataset, cfg: DataConfig, seed: int) -> tuple[Dataset, Dataset]:
    """Seeded shuffle, optional cap, then (server test split, pool the clients share)."""
    ds = ds.shuffle(seed=seed)
    if cfg.max_samples:
        ds = ds.select(range(min(cfg.max_samples, len(ds))))
    if len(ds) <= cfg.test_samples:
        raise DataError(
            f"{len(ds)} samples cannot give `data.test_samples` = "
            f"{cfg.test_samples} to the server and still leave some for clients"
        )
    test = ds.select(range(cfg.test_samples))
    pool = ds.select(range(cfg.test_samples, len(ds)))
    return test, pool


def partitions(
    pool: Dataset, cfg: DataConfig, num_clients: int, seed: int = 0, column: str | None = None
) -> list[Dataset]:
    """All client partitions (cheap: flwr-datasets returns index views).

    `seed` and `column` must be the same in every process (the run's seed and
    `partition.partition_column`), or server and clients disagree on the split."""
    return partition.make_partitions(pool, cfg, num_clients, seed, column)


def load_data(cfg, columns: tuple[str, ...], with_public: bool = False):
    """(server test split, client partitions, partition column[, public slice]): what every
    process derives identically from the config; a missing column (of `columns`, the ones
    the task reads) or an empty partition fails here.

    The pool left after the test split loses its first `kd.teacher_data_pct` (the public
    slice a KD teacher trains on) before partitioning. `data.merge_partitions` gives one
    client the union of chosen partitions of a `data.split_clients`-way split: the
    centralized and local-only baselines see exactly the data federated clients see.
    """
    d = cfg.data
    column = partition.partition_column(d, cfg.task)
    ds = load_source(d, columns)  # the partition column is checked
    # by the partitioner, whose error names `data.partition_by`
    test, pool = split(ds, d, cfg.train.seed)
    public = None
    if cfg.kd.teacher_data_pct:
        n_public = round(len(pool) * cfg.kd.teacher_data_pct)
        if not 0 < n_public < len(pool):
            raise DataError(
                f"`kd.teacher_data_pct` = {cfg.kd.teacher_data_pct} of "
                f"{len(pool)} samples leaves no public or no private data"
            )
        public, pool = pool.select(range(n_public)), pool.select(range(n_public, len(pool)))
    if d.merge_partitions:
        every = partitions(pool, d, d.split_clients, cfg.train.seed, column)
        parts = [concatenate_datasets([every[i] for i in d.merge_partitions])]
    else:
        parts = partitions(pool, d, cfg.federation.num_clients, cfg.train.seed, column)
    return (test, parts, column, public) if with_public else (test, parts, column)
