"""Decoded inputs cached on disk (ftlab/data/cache.py): built once, read back unchanged,
rebuilt when what they depend on changes or the file is damaged, off with an empty
FTLAB_DATA_CACHE."""
import numpy as np
import pytest

from ftlab.data import cache


@pytest.fixture
def builds(tmp_path, monkeypatch):
    monkeypatch.setenv("FTLAB_DATA_CACHE", str(tmp_path / "cache"))
    calls = []

    def build(value=1):
        def make():
            calls.append(value)
            return np.full((3, 4, 4), value, np.uint8)
        return make
    return calls, build


def test_built_once_then_read_back(builds, tmp_path):
    calls, build = builds
    src = tmp_path / "labels.csv"
    src.write_text("a,1\n")
    key = {"labels": cache.file_key(src), "size": 4}
    first = cache.cached("elpv", key, build())
    again = cache.cached("elpv", key, build(2))  # not built: the stored array comes back
    assert calls == [1] and np.array_equal(first, again) and again.dtype == np.uint8
    assert cache.cached("elpv", {**key, "size": 8}, build(3))[0, 0, 0] == 3  # another size
    src.write_text("a,1\nb,0\n")  # the source changed: a new entry
    assert cache.cached("elpv", {**key, "labels": cache.file_key(src)}, build(4))[0, 0, 0] == 4
    assert calls == [1, 3, 4]


def test_damaged_file_is_rebuilt_and_empty_setting_disables(builds, tmp_path, monkeypatch):
    calls, build = builds
    cache.cached("x", {"k": 1}, build())
    (stored,) = (tmp_path / "cache").glob("x-*.npy")
    stored.write_bytes(b"not an array")
    assert cache.cached("x", {"k": 1}, build(5))[0, 0, 0] == 5
    assert cache.cached("x", {"k": 1}, build(6))[0, 0, 0] == 5  # the rebuilt one is kept
    monkeypatch.setenv("FTLAB_DATA_CACHE", "")
    cache.cached("x", {"k": 1}, build(7))
    assert calls == [1, 5, 7]
