"""geneface_jax.files: complete files or none, never a partial one."""

import numpy as np
import pytest

from geneface_jax import files


def test_atomic_path_renames_on_success(tmp_path):
    target = tmp_path / "sub" / "a.npz"
    with files.atomic_path(target, ".npz") as tmp:
        assert tmp.parent == target.parent and tmp.name.endswith(".npz")
        np.savez(tmp, x=np.arange(3))
        assert not target.exists()
    assert np.load(target)["x"].tolist() == [0, 1, 2]
    assert [p.name for p in target.parent.iterdir()] == ["a.npz"]


def test_atomic_path_keeps_the_old_file_and_no_temporary_on_failure(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with files.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_atomic_dir_replaces_or_leaves_everything_as_it_was(tmp_path):
    target = tmp_path / "data"
    target.mkdir()
    (target / "old.npy").write_bytes(b"1")
    with pytest.raises(KeyboardInterrupt):
        with files.atomic_dir(target) as tmp:
            (tmp / "new.npy").write_bytes(b"2")
            raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    assert [p.name for p in target.iterdir()] == ["old.npy"]
    with files.atomic_dir(target) as tmp:
        (tmp / "new.npy").write_bytes(b"2")
    assert [p.name for p in target.iterdir()] == ["new.npy"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_write_bytes_atomic(tmp_path):
    assert files.write_bytes_atomic(tmp_path / "m.bin", b"abc").read_bytes() == b"abc"
