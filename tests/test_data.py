import json

import pytest
from transformers import AutoTokenizer

from fedtune import config as C, data, tasks


def cfg_for(source, *overrides):
    return C.load(None, [f"data.source={source}", *overrides])


def test_iid_partitions_are_disjoint_cover_the_pool_and_exclude_the_test_split(code_jsonl):
    cfg = cfg_for(code_jsonl, "data.test_samples=4")
    test, pool = data.split(data.load_source(cfg.data), cfg.data, seed=0)
    parts = data.partitions(pool, cfg.data, num_clients=3)
    ids = [set(p["id"]) for p in parts]
    assert [len(p) for p in parts] == [7, 7, 6]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert set().union(*ids) == set(pool["id"])
    assert not set(test["id"]) & set().union(*ids)
    assert len(test) == 4


def test_fixed_size_partitions_have_exactly_that_many_samples(code_jsonl):
    cfg = cfg_for(
        code_jsonl,
        "data.test_samples=4",
        "data.partitioner=fixed-size",
        "data.samples_per_client=5",
    )
    _, pool = data.split(data.load_source(cfg.data), cfg.data, seed=0)
    parts = data.partitions(pool, cfg.data, num_clients=3)
    assert [len(p) for p in parts] == [5, 5, 5]
    assert len(set().union(*[set(p["id"]) for p in parts])) == 15


def test_fixed_size_asking_for_too_much_is_a_clear_error(code_jsonl):
    cfg = cfg_for(
        code_jsonl,
        "data.test_samples=4",
        "data.partitioner=fixed-size",
        "data.samples_per_client=1000",
    )
    _, pool = data.split(data.load_source(cfg.data), cfg.data, seed=0)
    with pytest.raises(data.DataError, match="3 clients x 1000 samples = 3000"):
        data.partitions(pool, cfg.data, num_clients=3)


def test_split_is_deterministic_by_seed_and_changes_with_it(code_jsonl):
    cfg = cfg_for(code_jsonl, "data.test_samples=4")
    ds = data.load_source(cfg.data)

    def part_and_test(seed):
        c = cfg_for(
            code_jsonl, "data.test_samples=4", "federation.num_clients=3", f"train.seed={seed}"
        )
        test, parts, _ = data.load_data(c, ("text",))
        return parts[2], test

    a, b, c = part_and_test(1), part_and_test(1), part_and_test(2)
    assert a[0]["id"] == b[0]["id"] and a[1]["id"] == b[1]["id"]
    assert a[0]["id"] != c[0]["id"]
    assert len(ds) == 24


def test_more_clients_than_samples_is_an_error_not_an_empty_partition(code_jsonl):
    cfg = cfg_for(code_jsonl, "data.test_samples=4")
    _, pool = data.split(data.load_source(cfg.data), cfg.data, seed=0)
    with pytest.raises(data.DataError, match="30 clients but only 20 samples"):
        data.partitions(pool, cfg.data, num_clients=30)


def test_missing_column_names_the_columns_that_exist(code_jsonl):
    cfg = cfg_for(code_jsonl, "data.text_column=content")
    with pytest.raises(data.DataError, match="its columns are: text, id"):
        data.load_source(cfg.data)


def test_test_split_larger_than_data_is_an_error(code_jsonl):
    cfg = cfg_for(code_jsonl, "data.test_samples=24")
    with pytest.raises(data.DataError, match="test_samples"):
        data.split(data.load_source(cfg.data), cfg.data, seed=0)


def test_local_csv_txt_and_folder_sources(tmp_path):
    (tmp_path / "d.csv").write_text("text,label\nhello world,1\nbye now,0\n")
    (tmp_path / "d.txt").write_text("line one\nline two\nline three\n")
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    (src / "a.py").write_text("print('a')\n")
    (src / "pkg" / "b.py").write_text("print('b')\n")
    (src / "notes.md").write_text("not code\n")
    assert len(data.load_source(cfg_for(tmp_path / "d.csv").data)) == 2
    assert len(data.load_source(cfg_for(tmp_path / "d.txt").data)) == 3
    rows = data.load_source(cfg_for(src).data)
    assert sorted(rows["source"]) == ["a.py", "pkg/b.py"]


def test_offline_stdlib_corpus_is_real_python():
    cfg = C.load(None, ["data.source=offline:python-stdlib"])
    ds = data.load_source(cfg.data)
    assert len(ds) > 300
    assert any(r.startswith("json/") for r in ds["source"])


def test_pack_blocks_joins_documents_with_eos_and_drops_the_remainder(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    from datasets import Dataset

    ds = Dataset.from_list([{"text": "def f(x):\n    return x\n"}, {"text": "import os\n"}])
    ids = (
        tok(ds[0]["text"])["input_ids"]
        + [tok.eos_token_id]
        + tok(ds[1]["text"])["input_ids"]
        + [tok.eos_token_id]
    )
    blocks = tasks.pack_blocks(ds, tok, "text", seq_len=4)
    assert blocks.shape == (len(ids) // 4, 4)
    assert blocks.flatten().tolist() == ids[: blocks.numel()]
    with pytest.raises(data.DataError, match="one block"):
        tasks.pack_blocks(ds, tok, "text", seq_len=10_000)


def test_a_client_gets_the_dirichlet_partition_the_server_reports(tmp_path):
    """Server and clients derive the split independently; they must agree row for row."""
    src = tmp_path / "labelled.jsonl"
    src.write_text(
        "".join(
            json.dumps({"text": f"row {i}", "id": i, "label": i % 3}) + "\n" for i in range(300)
        )
    )
    cfg = cfg_for(
        src,
        "data.test_samples=30",
        "data.partitioner=dirichlet",
        "data.dirichlet_alpha=0.3",
        "data.partition_by=label",
    )
    _, pool = data.split(data.load_source(cfg.data), cfg.data, seed=5)
    server = data.partitions(pool, cfg.data, 4, seed=5, column="label")
    clients = cfg_for(
        src,
        "data.test_samples=30",
        "data.partitioner=dirichlet",
        "data.dirichlet_alpha=0.3",
        "data.partition_by=label",
        "federation.num_clients=4",
        "train.seed=5",
    )
    for pid in range(4):
        part = data.load_data(clients, ("text", "label"))[1][pid]
        assert list(part["id"]) == list(server[pid]["id"])


def test_unreachable_hub_dataset_is_a_clear_error_not_a_traceback(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    cfg = C.load(None, ["data.source=nyu-mll/glue", "data.subset=mrpc"])
    with pytest.raises(
        data.DataError, match="cannot load `data.source` = 'nyu-mll/glue'.*HF_HUB_OFFLINE"
    ):
        data.load_source(cfg.data)


def test_example_cache_follows_a_hub_dataset_revision(tmp_path, monkeypatch, tiny_model_dir):
    """The on-disk example cache of a hub dataset is keyed by the loaded dataset's
    fingerprint: the same revision is read from the cache, a new revision is encoded anew."""
    from datasets import Dataset

    from fedtune import model as M, tasks

    monkeypatch.setenv("FEDTUNE_CACHE", str(tmp_path / "cache"))
    revision = {"text": "alpha beta gamma delta " * 40, "fp": "rev-a"}

    def fake_hub(name, subset=None, split=None):  # what load_dataset returns for a hub id
        ds = Dataset.from_list([{"text": f"{revision['text']} {i}"} for i in range(12)])
        ds._fingerprint = revision["fp"]  # hub datasets: derived from the revision
        return ds

    monkeypatch.setattr(data, "load_dataset", fake_hub)
    encoded = []
    real_encode = tasks.encode
    monkeypatch.setattr(tasks, "encode", lambda *a: encoded.append(1) or real_encode(*a))
    cfg = C.load(
        None,
        [
            f"model.name={tiny_model_dir}",
            "data.source=someorg/corpus",
            "data.test_samples=2",
            "data.seq_len=16",
            "federation.num_clients=2",
        ],
    )
    tok = M.load_tokenizer(cfg.model.name)
    first = tasks.client_examples(cfg, 0, tok)
    assert tasks.client_examples(cfg, 0, tok) == first and len(encoded) == 1  # cache hit
    revision.update(text="one two three four five " * 40, fp="rev-b")  # hub update
    second = tasks.client_examples(cfg, 0, tok)
    assert len(encoded) == 2 and second != first
    assert (
        second[0]["input_ids"]
        == tok(
            "one two three four five" + " one two three four five" * 3, add_special_tokens=False
        )["input_ids"][:16]
    )
