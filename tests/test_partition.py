"""fedtune.partition on a synthetic labelled pool: skew, determinism, errors, reports, plots."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from statistics import mean

import pytest
from datasets import Dataset

from fedtune import config as C, data, partition as P
from fedtune.report import plots as RP
from fedtune.results import partition_report

DOMAINS = ["code", "news", "web", "wiki"]
NAMES = ["world", "sports", "business", "sci/tech"]


@pytest.fixture(scope="module")
def pool() -> Dataset:
    """2000 rows, 4 balanced labels, a `domain` column with 4 values (independent of label)."""
    return Dataset.from_list(
        [
            {"id": i, "text": f"row {i}", "label": i % 4, "domain": DOMAINS[(i * 7 // 3) % 4]}
            for i in range(2000)
        ]
    )


def dcfg(*overrides) -> C.DataConfig:
    return C.load(None, list(overrides)).data


def ids(parts) -> list[list[int]]:
    return [list(p["id"]) for p in parts]


def top_share(parts, column="label") -> float:
    """Mean over clients of the largest label's share: 1/labels when IID, 1 when one label."""
    return mean(max(P.histogram(p, column).values()) / len(p) for p in parts)


def test_partition_column_prefers_partition_by_then_the_label_of_classification_tasks():
    cls = C.load(None, ["task.type=sequence-classification", 'task.label_names=["a","b"]'])
    assert P.partition_column(cls.data, cls.task) == "label"
    assert P.partition_column(dcfg("data.partition_by=domain"), cls.task) == "domain"
    lm = C.load(None, [])
    assert P.partition_column(lm.data, lm.task) is None


def test_iid_partitions_are_disjoint_and_cover_the_pool(pool):
    parts = P.make_partitions(pool, dcfg(), 7, seed=0, column="label")
    flat = [i for p in ids(parts) for i in p]
    assert len(flat) == len(set(flat)) == len(pool)
    assert top_share(parts) < 0.3


def test_dirichlet_small_alpha_is_skewed_and_large_alpha_is_near_uniform(pool):
    def share(alpha):
        cfg = dcfg(
            "data.partitioner=dirichlet", f"data.dirichlet_alpha={alpha}", "data.partition_by=label"
        )
        return mean(
            top_share(P.make_partitions(pool, cfg, 10, seed=s, column="label")) for s in range(3)
        )

    assert share(0.1) > 0.7
    assert share(100) < 0.4
    cfg = dcfg("data.partitioner=dirichlet", "data.dirichlet_alpha=0.1", "data.partition_by=label")
    flat = [i for p in ids(P.make_partitions(pool, cfg, 10, 0, "label")) for i in p]
    assert len(flat) == len(set(flat)) == len(pool)  # skewed, yet still a partition


@pytest.mark.parametrize("kind", ["dirichlet", "shards"])
def test_non_iid_splits_are_deterministic_by_seed(pool, kind):
    cfg = dcfg(f"data.partitioner={kind}", "data.partition_by=label")
    a = ids(P.make_partitions(pool, cfg, 5, seed=3, column="label"))
    b = ids(P.make_partitions(pool, cfg, 5, seed=3, column="label"))
    c = ids(P.make_partitions(pool, cfg, 5, seed=4, column="label"))
    assert a == b
    assert a != c


def test_split_is_identical_in_another_process(pool, tmp_path):
    """Server and every client recompute the split in their own process (own hash seed)."""
    (tmp_path / "pool.json").write_text(json.dumps(pool.to_list()))
    script = f"""
import json
from datasets import Dataset
from fedtune import config as C, partition as P
with open({str(tmp_path / "pool.json")!r}) as f:
    pool = Dataset.from_list(json.load(f))
out = {{}}
for kind in ("dirichlet", "shards"):
    cfg = C.load(None, ["data.partitioner=" + kind, "data.partition_by=label"]).data
    out[kind] = [list(p["id"]) for p in P.make_partitions(pool, cfg, 5, 7, "label")]
print(json.dumps(out))
"""
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    run = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-2000:]
    theirs = json.loads(run.stdout.strip().splitlines()[-1])
    for kind in ("dirichlet", "shards"):
        cfg = dcfg(f"data.partitioner={kind}", "data.partition_by=label")
        assert ids(P.make_partitions(pool, cfg, 5, 7, "label")) == theirs[kind], kind


def test_one_shard_per_client_gives_each_client_one_label(pool):
    cfg = dcfg("data.partitioner=shards", "data.shards_per_client=1", "data.partition_by=label")
    parts = P.make_partitions(pool, cfg, 4, seed=0, column="label")
    assert [len(set(p["label"])) for p in parts] == [1, 1, 1, 1]
    assert sorted(p["label"][0] for p in parts) == [0, 1, 2, 3]
    cfg = dcfg("data.partitioner=shards", "data.shards_per_client=2", "data.partition_by=label")
    assert all(len(set(p["label"])) <= 2 for p in P.make_partitions(pool, cfg, 8, 0, "label"))


def test_natural_gives_one_group_per_client_and_says_when_counts_differ(pool):
    cfg = dcfg("data.partitioner=natural", "data.partition_by=domain")
    parts = P.make_partitions(pool, cfg, 4, seed=0, column="domain")
    assert [sorted(set(p["domain"])) for p in parts] == [[d] for d in DOMAINS]
    assert sum(map(len, parts)) == len(pool)
    with pytest.raises(
        data.DataError,
        match=r"has 4 \('code', 'news', 'web', 'wiki'\) but "
        r"`federation.num_clients` = 3; set num_clients = 4",
    ):
        P.make_partitions(pool, cfg, 3, seed=0, column="domain")


def test_missing_column_names_the_columns_the_data_has(pool):
    cfg = dcfg("data.partitioner=dirichlet", "data.partition_by=topic")
    with pytest.raises(data.DataError, match="'topic'.*its columns are: id, text, label, domain"):
        P.make_partitions(pool, cfg, 3, seed=0, column="topic")
    with pytest.raises(data.DataError, match="needs a column"):
        P.make_partitions(pool, cfg, 3, seed=0, column=None)


def test_an_empty_client_is_an_error_at_start(pool):
    # min_partition_size = 0 lets a very skewed Dirichlet draw leave clients with nothing.
    cfg = dcfg(
        "data.partitioner=dirichlet",
        "data.dirichlet_alpha=0.01",
        "data.min_partition_size=0",
        "data.partition_by=label",
    )
    with pytest.raises(data.DataError, match=r"client \d+ has an empty partition"):
        P.make_partitions(pool, cfg, 50, seed=0, column="label")


def test_unreachable_min_partition_size_is_a_clear_error(pool):
    cfg = dcfg(
        "data.partitioner=dirichlet",
        "data.dirichlet_alpha=0.01",
        "data.min_partition_size=20",
        "data.partition_by=label",
    )
    with pytest.raises(
        data.DataError,
        match=r"alpha=0.01 .* of the 30 clients .*raise "
        r"`data.dirichlet_alpha`",
    ):
        P.make_partitions(pool, cfg, 30, seed=0, column="label")


def test_too_many_shards_for_the_data_is_a_clear_error(pool):
    cfg = dcfg("data.partitioner=shards", "data.shards_per_client=100", "data.partition_by=label")
    with pytest.raises(data.DataError, match="30 clients x 100 shards = 3000 shards"):
        P.make_partitions(pool, cfg, 30, seed=0, column="label")


def test_histogram_uses_label_names_in_label_order(pool):
    part = pool.select(range(0, 2000, 2))  # labels 0 and 2 only
    assert P.histogram(part, "label", NAMES) == {"world": 500, "business": 500}
    assert P.histogram(part, "label") == {"0": 500, "2": 500}
    assert P.histogram(part, "topic") == {} and P.histogram(part, None) == {}


def test_partition_report_and_its_plot(pool, tmp_path):
    cfg = dcfg("data.partitioner=dirichlet", "data.dirichlet_alpha=0.1", "data.partition_by=label")
    parts = P.make_partitions(pool, cfg, 6, seed=0, column="label")
    rep = json.loads(json.dumps(partition_report(parts, "label", NAMES, P.describe(cfg))))
    assert rep["partitioner"] == "dirichlet, alpha=0.1" and rep["column"] == "label"
    assert rep["groups"] == NAMES
    assert [c["num_examples"] for c in rep["clients"]] == [len(p) for p in parts]
    assert all(set(c["histogram"]) <= set(NAMES) for c in rep["clients"])
    assert sum(sum(c["histogram"].values()) for c in rep["clients"]) == len(pool)
    plain = partition_report(parts)
    assert plain["column"] is None and all(c["histogram"] == {} for c in plain["clients"])
    for name, report in (("labelled.png", rep), ("plain.png", plain)):
        path = RP._plot_partitions(report, tmp_path / name)
        assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_plot_folds_many_groups_into_other(tmp_path):
    clients = [
        {
            "client": i,
            "num_examples": 60,
            "histogram": {f"g{j:02d}": 1 + (i * j) % 5 for j in range(15)},
        }
        for i in range(4)
    ]
    path = RP._plot_partitions({"column": "topic", "clients": clients}, tmp_path / "p.png")
    assert path.stat().st_size > 0
