"""Baselines (tf-idf, pixels, linear probe on backbone features) and inference-cost helpers."""
import math

import jax
import numpy as np
import pytest
from flax import nnx

from ftlab import baselines, latency
from ftlab.data.batches import ArrayData
from ftlab.models import bert, efficientnet
from ftlab.step import make_eval_step

WORDS = {0: "apple banana cherry grape", 1: "engine piston gearbox clutch",
         2: "violin cello oboe flute"}
NOISE = "the a of and to is it".split()


def texts(rng, labels):
    """Each class draws from its own vocabulary, plus words every class shares."""
    return [" ".join(rng.choice(WORDS[y].split(), 3).tolist() + rng.choice(NOISE, 4).tolist())
            for y in labels]


def split_labels(rng, n, classes):
    return [rng.integers(0, classes, n) for _ in range(3)]


def test_tfidf_separates_vocabularies_and_keeps_absent_class_column():
    rng = np.random.default_rng(0)
    tr, va, te = split_labels(rng, 60, 3)
    probs, info = baselines.tfidf_logreg(texts(rng, tr), tr, texts(rng, va), va,
                                         texts(rng, te), num_classes=4)
    assert probs.shape == (60, 4)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)
    assert np.all(probs[:, 3] < 1e-6)  # class 3 never seen in train
    assert (probs.argmax(1) == te).mean() > 0.9
    assert info["C"] in baselines.TEXT_C_GRID and info["min_df"] == 2


def test_pixels_separate_dark_from_bright_rgb_and_grey():
    rng = np.random.default_rng(0)

    def images(labels, shape):
        base = np.where(labels == 1, 170, 60).reshape(-1, *[1] * len(shape))
        return np.clip(base + rng.normal(0, 40, (len(labels), *shape)), 0, 255).astype(np.uint8)

    for shape in [(20, 24, 3), (20, 24)]:
        tr, va, te = split_labels(rng, 40, 2)
        probs, info = baselines.pixel_logreg(images(tr, shape), tr, images(va, shape), va,
                                             images(te, shape), num_classes=2, size=8)
        assert probs.shape == (40, 2) and (probs.argmax(1) == te).mean() > 0.9
        assert baselines.pixels(images(te, shape), 8).max() <= 1.0


def test_linear_probe_picks_c_from_grid_and_is_deterministic():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 3, (3, 5))

    def blobs(n):
        y = rng.integers(0, 3, n)
        return centres[y] + rng.normal(0, 1, (n, 5)), y

    (trx, tr), (vax, va), (tex, te) = blobs(90), blobs(60), blobs(60)
    probs, info = baselines.linear_probe(trx, tr, vax, va, tex, num_classes=3, seed=0)
    again, info2 = baselines.linear_probe(trx, tr, vax, va, tex, num_classes=3, seed=0)
    assert info["C"] in baselines.C_GRID and set(info["val_macro_f1_by_C"]) == set(baselines.C_GRID)
    assert (probs.argmax(1) == te).mean() > 0.6  # chance is 1/3
    np.testing.assert_array_equal(probs, again)
    assert info == info2


def numpy_init(build):
    """The model `build` makes, with numpy random values: eager init compiles one XLA
    program per parameter shape (seconds on 2 cores); these tests only need some weights."""
    rng = np.random.default_rng(0)
    graphdef, params, rest = nnx.split(nnx.eval_shape(build), nnx.Param, ...)
    fill = lambda draw: lambda x: draw(x.shape).astype(x.dtype)
    params = jax.tree.map(fill(lambda s: rng.normal(0, 0.2, s)), params)
    rest = jax.tree.map(fill(lambda s: rng.uniform(0.5, 1.5, s)), rest)  # BatchNorm var > 0
    return nnx.merge(graphdef, params, rest)


def tiny_bert():
    return numpy_init(lambda: bert.BertClassifier(bert.VARIANTS["tiny"], 3, rngs=nnx.Rngs(0)))


def tiny_lite():
    size = efficientnet.VARIANTS["tiny"]
    return numpy_init(lambda: efficientnet.EfficientNetLite(size, 3, rngs=nnx.Rngs(0)))


def bert_rows(n=5, t=12):
    rng = np.random.default_rng(1)
    mask = (np.arange(t)[None] < rng.integers(3, t + 1, (n, 1))).astype(np.int32)
    return {"input_ids": rng.integers(0, 64, (n, t)).astype(np.int32), "attention_mask": mask,
            "label": rng.integers(0, 3, n).astype(np.int32)}


@pytest.mark.parametrize("kind", ["bert", "efficientnet"])
def test_features_match_one_full_batch_despite_padding(kind):
    if kind == "bert":
        model, rows, dim = tiny_bert(), bert_rows(), bert.VARIANTS["tiny"].hidden
    else:
        model = tiny_lite()
        rng = np.random.default_rng(2)
        rows = {"image": rng.integers(0, 256, (5, 32, 32, 3), np.uint8),
                "label": np.zeros(5, np.int32)}
        dim = efficientnet.VARIANTS["tiny"].top
    feats = baselines.features(model, ArrayData(rows), batch_size=2)  # 3 batches, 1 padded row
    graphdef, state = nnx.split(model)
    whole = make_eval_step(graphdef, 0, len(model.stage_prefixes()) - 1)(state, rows)  # 5 at once
    assert feats.shape == (5, dim) and feats.dtype == np.float32
    np.testing.assert_allclose(feats, np.asarray(whole), rtol=1e-5, atol=1e-5)


def test_measure_reports_each_batch_size():
    model = tiny_bert()
    graphdef, state = nnx.split(model)
    out = latency.measure(make_eval_step(graphdef), state, bert_rows(3), batch_sizes=(1, 4),
                          iters=3, warmup=1)
    assert {"1", "4", "device"} <= set(out)
    for b in ("1", "4"):
        assert 0 < out[b]["p50_ms"] <= out[b]["p95_ms"] and out[b]["throughput"] > 0
    assert out["device"].startswith(jax.devices()[0].platform)


def test_param_count_and_disk_bytes(tmp_path):
    model = tiny_lite()
    params = nnx.state(model, nnx.Param)
    expected = sum(math.prod(v.shape) for _, v in nnx.to_flat_state(params))
    assert latency.param_count(nnx.state(model)) == expected  # batch statistics excluded
    assert latency.param_count(model) == latency.param_count(params) == expected
    assert latency.param_count({"w": np.zeros((2, 3)), "b": [np.zeros(4)]}) == 10
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.bin").write_bytes(b"x" * 100)
    (tmp_path / "sub" / "b.bin").write_bytes(b"y" * 23)
    assert latency.disk_bytes(tmp_path) == 123
    assert latency.disk_bytes(tmp_path / "a.bin") == 100
