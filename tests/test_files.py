"""Atomic writes: a crash or a racing process never leaves half a file or folder."""

import pytest

from fedtune.files import atomic_folder, atomic_path


def test_atomic_folder_replaces_or_keeps_and_never_leaves_half(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_folder(target) as tmp:
        (tmp / "a").write_text("1")
    with atomic_folder(target) as tmp:  # replace=True: the newest wins
        (tmp / "a").write_text("2")
    assert (target / "a").read_text() == "2"
    with atomic_folder(target, replace=False) as tmp:  # a cache: the first one stays
        (tmp / "a").write_text("3")
    assert (target / "a").read_text() == "2"
    with pytest.raises(RuntimeError), atomic_folder(target) as tmp:
        (tmp / "a").write_text("half")
        raise RuntimeError("killed mid-write")
    assert (target / "a").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary left


def test_atomic_path_removes_its_temporary_on_failure(tmp_path):
    path = tmp_path / "x.pt"
    path.write_text("old")
    with pytest.raises(ValueError), atomic_path(path) as tmp:
        tmp.write_text("new, half")
        raise ValueError
    assert path.read_text() == "old" and sorted(tmp_path.iterdir()) == [path]
