"""Client partitions through flwr-datasets partitioners, checked up front, and histograms.

Why: the server and every client process recompute the split on their own from the config,
so every partitioner is seeded (identical splits everywhere, no data travels). A split that
cannot work (missing column, impossible Dirichlet draw, a client with no data) fails here,
at start, with the fix in the message, never as a crash in round 3.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections import Counter

from datasets import Dataset

from fedtune import config as C
from fedtune.errors import DataError

BY_COLUMN = ("dirichlet", "shards", "natural")  # the partitioners that need `partition_by`


def partition_column(data_cfg: C.DataConfig, task_cfg: C.TaskConfig) -> str | None:
    """The column splits and histograms use: `data.partition_by`, else a classification
    task's label column, else None (plain text has nothing to count)."""
    if data_cfg.partition_by:
        return data_cfg.partition_by
    if task_cfg.type in C.CLASSIFICATION_TASKS and task_cfg.label_column:
        return task_cfg.label_column
    return None


def describe(data_cfg: C.DataConfig) -> str:
    """The partitioner and its knob, for titles and logs: "dirichlet, alpha=0.1"."""
    kind = data_cfg.partitioner
    if kind == "dirichlet":
        return f"dirichlet, alpha={data_cfg.dirichlet_alpha:g}"
    if kind == "shards":
        return f"shards, {data_cfg.shards_per_client} per client"
    if kind == "fixed-size":
        return f"fixed-size, {data_cfg.samples_per_client} per client"
    return kind


def _preview(values, limit: int = 12) -> str:
    shown = ", ".join(map(repr, values[:limit]))
    return shown + (f", ... ({len(values) - limit} more)" if len(values) > limit else "")


def _sorted(values) -> list:
    try:
        return sorted(values)
    except TypeError:  # mixed types: any fixed order will do
        return sorted(values, key=lambda v: (type(v).__name__, str(v)))


def _check_column(pool: Dataset, cfg: C.DataConfig, n: int, column: str | None) -> None:
    kind = cfg.partitioner
    if not column:
        raise DataError(
            f'`data.partitioner = "{kind}"` needs a column to split by: set '
            "`data.partition_by` (a label, topic or user-id column)"
        )
    if column not in pool.column_names:
        raise DataError(
            f"the {kind} partitioner splits by column {column!r}, which is not in "
            f"the data; its columns are: {', '.join(pool.column_names)} (set "
            "`data.partition_by` or `task.label_column`)"
        )
    values = list(pool[column])
    if missing := sum(v is None for v in values):
        raise DataError(
            f"column {column!r} has {missing} empty values; the {kind} partitioner "
            "needs a value in every row (drop those rows or pick another column)"
        )
    if kind == "natural":
        found = _sorted(set(values))
        if len(found) != n:
            raise DataError(
                f"the natural partitioner gives one client per value of {column!r}"
                f": the data has {len(found)} ({_preview(found)}) but "
                f"`federation.num_clients` = {n}; set num_clients = {len(found)} "
                "or use the dirichlet or shards partitioner"
            )
    if kind == "shards" and n * cfg.shards_per_client > len(pool):
        raise DataError(
            f"{n} clients x {cfg.shards_per_client} shards = "
            f"{n * cfg.shards_per_client} shards but only {len(pool)} samples; "
            "lower `data.shards_per_client` or the number of clients"
        )


def make_partitioner(
    cfg: C.DataConfig, num_clients: int, pool_size: int, seed: int = 0, column: str | None = None
):
    """The flwr-datasets partitioner for `data.partitioner`, seeded by the run's seed."""
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        NaturalIdPartitioner,
        ShardPartitioner,
        SizePartitioner,
    )

    kind = cfg.partitioner
    if kind == "fixed-size":
        need = cfg.samples_per_client * num_clients
        if need > pool_size:
            raise DataError(
                f"{num_clients} clients x {cfg.samples_per_client} samples = {need}"
                f" but only {pool_size} samples remain after the test split"
            )
        return SizePartitioner([cfg.samples_per_client] * num_clients)
    if num_clients > pool_size:
        raise DataError(f"{num_clients} clients but only {pool_size} samples to share")
    if kind == "dirichlet":
        return DirichletPartitioner(
            num_partitions=num_clients,
            partition_by=column,
            alpha=float(cfg.dirichlet_alpha),
            min_partition_size=cfg.min_partition_size,
            self_balancing=False,
            shuffle=True,
            seed=seed,
        )
    if kind == "shards":
        return ShardPartitioner(
            num_partitions=num_clients,
            partition_by=column,
            num_shards_per_partition=int(cfg.shards_per_client),
            shuffle=True,
            seed=seed,
        )
    if kind == "natural":
        return NaturalIdPartitioner(partition_by=column)
    if kind == "iid":
        return IidPartitioner(num_partitions=num_clients)
    raise DataError(f"unknown `data.partitioner` {kind!r}; use one of {', '.join(C.PARTITIONERS)}")


@contextlib.contextmanager
def quiet():
    """No progress bars while loading and partitioning: every client process repeats it,
    and datasets' "Generating train split" / "Flattening the indices" and the natural
    partitioner's tqdm bar would flood the logs. datasets' own error lines too ("Failed to
    load JSON ..."): fedtune reports the problem itself, in one line."""
    from datasets.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
        logging as ds_logging,
    )

    was_disabled, level = are_progress_bars_disabled(), ds_logging.get_verbosity()
    disable_progress_bars()
    ds_logging.set_verbosity(ds_logging.CRITICAL)
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # the plain tqdm bar of natural ids
            yield
    finally:
        ds_logging.set_verbosity(level)
        if not was_disabled:
            enable_progress_bars()


def make_partitions(
    pool: Dataset, data_cfg: C.DataConfig, num_clients: int, seed: int, column: str | None
) -> list[Dataset]:
    """Every client's partition (index views of `pool`), or a DataError saying what to change.

    `column` is what the dirichlet/shards/natural partitioners split by (see
    `partition_column`); iid and fixed-size ignore it."""
    kind = data_cfg.partitioner
    if kind in BY_COLUMN:
        _check_column(pool, data_cfg, num_clients, column)
    part = make_partitioner(data_cfg, num_clients, len(pool), seed, column)
    part.dataset = pool
    with quiet(), warnings.catch_warnings():
        # Dirichlet warns on every redraw that misses min_partition_size; we raise our own
        # error if it gives up, and a redraw that succeeds is not the user's concern.
        warnings.simplefilter("ignore")
        try:
            out = [part.load_partition(i) for i in range(num_clients)]
        except ValueError as e:
            if kind == "dirichlet" and "max number of attempts" in str(e):
                raise DataError(
                    f"Dirichlet alpha={data_cfg.dirichlet_alpha:g} over {column!r} left some "
                    f"of the {num_clients} clients with fewer than `data.min_partition_size` "
                    f"= {data_cfg.min_partition_size} samples in 11 draws ({len(pool)} "
                    "samples to share); raise `data.dirichlet_alpha`, lower "
                    "`data.min_partition_size`, use fewer clients or more data"
                ) from e
            raise DataError(
                f"the {describe(data_cfg)} partitioner cannot split {len(pool)} "
                f"samples for {num_clients} clients: {e}"
            ) from e
    for i, p in enumerate(out):
        if len(p) == 0:
            raise DataError(
                f"client {i} has an empty partition ({describe(data_cfg)}, "
                f"{len(pool)} samples for {num_clients} clients); use fewer "
                "clients, more data, a larger `data.dirichlet_alpha` or "
                "`data.min_partition_size` >= 1"
            )
    return out


def _label(v, names: list) -> str:
    if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < len(names):
        return str(names[v])
    return str(v)


def histogram(part: Dataset, column: str | None, label_names=None) -> dict[str, int]:
    """Examples per value of `column` in one partition: what a non-IID split looks like.

    Integer labels show as their names when `label_names` is given ({"negative": 12,
    "positive": 40}); keys follow the values' order (label index, or alphabetical). Empty
    when there is no such column."""
    if not column or column not in part.column_names:
        return {}
    counts = Counter(part[column])
    names = list(label_names or [])
    return {_label(v, names): counts[v] for v in _sorted(counts)}


def groups(parts: list[Dataset], column: str | None, label_names=None) -> list[str]:
    """Every value of `column` over all partitions, in histogram order: one color per label
    in plots, even for labels some clients lack."""
    if not column:
        return []
    seen = {v for p in parts if column in p.column_names for v in p[column]}
    names = list(label_names or [])
    return list(dict.fromkeys(_label(v, names) for v in _sorted(seen)))
