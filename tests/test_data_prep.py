"""Data preparation helpers: grouped splits, leakage, class balance, augmentation, summary."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.utils.class_weight import compute_class_weight

from ftlab.data.augment import ImageAugment, rotate, token_dropout
from ftlab.data.balance import class_weights, oversample_order
from ftlab.data.grouped import fold_counts, grouped_split
from ftlab.data.leakage import (content_hash, find_leaks, hamming, image_phash, near_pairs,
                                text_key)
from ftlab.data.summary import check_classes_present, data_summary, write_summary
from ftlab.schema import ConfigError


# --- grouped splits ---------------------------------------------------------------------

def _grouped_toy(n_groups=60, seed=0):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 8, n_groups)
    groups = np.repeat(np.arange(n_groups), sizes)
    labels = np.repeat(rng.integers(0, 3, n_groups), sizes)  # label constant within a group
    return labels, groups


def test_grouped_split_keeps_groups_whole_and_is_seeded():
    labels, groups = _grouped_toy()
    a = grouped_split(labels, groups, seed=1)
    allidx = np.concatenate(list(a.values()))
    assert len(allidx) == len(set(allidx)) == len(labels)
    owner = {}
    for name, idx in a.items():
        assert (np.diff(idx) > 0).all()
        for g in np.unique(groups[idx]):
            assert owner.setdefault(g, name) == name, f"group {g} spans splits"
    b, c = grouped_split(labels, groups, seed=1), grouped_split(labels, groups, seed=2)
    assert all((a[k] == b[k]).all() for k in a)
    assert any(len(a[k]) != len(c[k]) or (a[k] != c[k]).any() for k in a)
    assert abs(len(a["train"]) / len(labels) - 0.7) < 0.12
    assert set(labels[a["val"]]) == set(labels[a["test"]]) == {0, 1, 2}


def test_fold_counts_follow_fractions():
    assert fold_counts((0.7, 0.15, 0.15), 20).tolist() == [14, 3, 3]
    assert fold_counts((0.98, 0.01, 0.01), 3).tolist() == [1, 1, 1]
    assert fold_counts((0.7, 0.15, 0.15), 5).sum() == 5


@pytest.mark.parametrize("groups,fracs", [([0, 0, 1, 1], (0.7, 0.15, 0.15)),
                                          ([0, 1, 2, 3], (0.8, 0.2, 0.2))])
def test_grouped_split_impossible_is_a_config_error(groups, fracs):
    with pytest.raises(ConfigError) as e:
        grouped_split(np.zeros(4, int), np.asarray(groups), fracs, seed=0)
    assert e.value.key == "dataset.split" and ";" in str(e.value)


# --- leakage ----------------------------------------------------------------------------

def _smooth_image(rng, size=64):
    """A random blocky RGB image in [0, 1] (natural images are smooth, not white noise)."""
    return np.kron(rng.random((8, 8, 3)), np.ones((size // 8, size // 8, 1)))


def test_content_hash_sees_shape_and_dtype():
    x = np.arange(6, dtype=np.int32)
    assert content_hash(x) == content_hash(x.copy())
    assert content_hash(x) != content_hash(x.reshape(2, 3))
    assert content_hash(x) != content_hash(x.astype(np.int64))
    assert content_hash("abc") == content_hash(b"abc") != content_hash("abd")


def test_text_key_collides_on_trivial_differences_only():
    key = text_key("Hello, World!  It’s here.")
    assert key == text_key("hello world it's here")
    assert key == text_key("ＨＥＬＬＯ,\tworld — it's   HERE")  # full-width letters, dash, tab
    assert text_key("well-known,fact") == text_key("well known, fact")  # punctuation -> space
    assert key != text_key("hello world it is here")


def test_phash_stable_under_small_changes_and_far_for_other_images():
    rng = np.random.default_rng(0)
    img = _smooth_image(rng)
    h = image_phash(img)
    assert h == image_phash((img * 255).round().astype(np.uint8))  # value scale irrelevant
    assert h < 2 ** 64 and image_phash(np.ones((9, 9))) == 0
    assert hamming(h, image_phash(np.clip(img * 0.9 + 0.08, 0, 1))) <= 2
    assert hamming(h, image_phash(_smooth_image(rng))) > 10


def test_near_pairs_misses_nothing_within_max_distance():
    base = 0x0123456789ABCDEF
    spread4 = base ^ (1 << 0 | 1 << 16 | 1 << 32 | 1 << 48)  # one bit in each 16-bit quarter
    spread5 = spread4 ^ (1 << 60)
    assert sorted(near_pairs([base, spread4, spread5], 4)) == [(0, 1, 4), (1, 2, 1)]


def test_find_leaks_catches_planted_duplicates_only(tmp_path):
    rng = np.random.default_rng(1)
    imgs = {s: [_smooth_image(rng) for _ in range(30)] for s in ("train", "val", "test")}
    imgs["val"][3] = imgs["train"][5].copy()  # exact copy
    imgs["test"][7] = np.clip(imgs["train"][9] * 1.05 + rng.normal(0, 0.01, (64, 64, 3)), 0, 1)
    imgs["train"][20] = imgs["train"][0].copy()  # within-split: information only
    ids = {s: [f"{s}/{i}" for i in range(30)] for s in imgs}
    keys = {s: [content_hash(x) for x in v] for s, v in imgs.items()}
    near = {s: [image_phash(x) for x in v] for s, v in imgs.items()}
    rep = find_leaks(keys, ids, near)
    assert not rep.ok
    assert [(r.id_a, r.id_b, r.kind) for r in rep.rows] == [
        ("train/5", "val/3", "exact"), ("train/9", "test/7", "near")]
    assert rep.within_split == {"train": 1, "val": 0, "test": 0}
    assert "2 cross-split" in rep.summary() and "\n" not in rep.summary()
    rep.to_csv(tmp_path / "leaks.csv")
    lines = (tmp_path / "leaks.csv").read_text().splitlines()
    assert lines[0].startswith("split_a,id_a") and len(lines) == 3
    assert find_leaks({"a": ["x", "y"], "b": ["z"]}, {"a": [1, 2], "b": [3]}).ok


# --- class balance ----------------------------------------------------------------------

TOY_LABELS = np.array([0] * 6 + [1] * 3 + [2] * 1)


def test_class_weights_values():
    bal = class_weights(TOY_LABELS, 3, "balanced")
    assert np.allclose(bal, [10 / 18, 10 / 9, 10 / 3])
    assert np.allclose(bal, compute_class_weight("balanced", classes=np.arange(3), y=TOY_LABELS))
    sq = class_weights(TOY_LABELS, 3, "sqrt")
    assert np.isclose(sq[TOY_LABELS].mean(), 1.0)
    assert np.allclose(sq / sq[0], np.sqrt(bal / bal[0]))
    assert (class_weights(TOY_LABELS, 3, "none") == 1).all()


@pytest.mark.parametrize("labels,mode", [(TOY_LABELS, "inverse"), (TOY_LABELS, "balanced")])
def test_class_weights_errors_name_the_key(labels, mode):
    with pytest.raises(ConfigError) as e:
        class_weights(labels, 4 if mode == "balanced" else 3, mode)  # class 3 has no samples
    assert e.value.key == "dataset.class_weights"


def test_oversample_order_balances_and_replays():
    a = oversample_order(TOY_LABELS, 0, 1, 2)
    assert np.bincount(TOY_LABELS[a]).tolist() == [6, 6, 6]
    assert set(a) == set(range(10))  # every original sample is kept
    assert (a == oversample_order(TOY_LABELS, 0, 1, 2)).all()
    assert not (a == oversample_order(TOY_LABELS, 0, 1, 3)).all()


# --- augmentation -----------------------------------------------------------------------

def _asym_batch(n=8, size=9):
    """Images with no mirror or rotation symmetry: an L shape plus a ramp."""
    img = np.zeros((size, size, 2), np.float32)
    img[1:7, 2, 0], img[6, 2:6, 0] = 1.0, 1.0
    img[..., 1] = np.linspace(0, 1, size * size).reshape(size, size)
    return jnp.asarray(np.repeat(img[None], n, 0))


def test_augment_same_key_same_output_and_jittable():
    x, key = _asym_batch(), jax.random.key(0)
    aug = ImageAugment(noise=0.05)
    y = aug(key, x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert np.array_equal(y, aug(key, x))
    assert np.allclose(y, jax.jit(aug)(key, x), atol=1e-5)
    assert not np.allclose(y, aug(jax.random.key(1), x))


def test_augment_identity_at_zero_strength():
    x = _asym_batch()
    off = ImageAugment(rotate_deg=0.0, hflip=False, vflip=False, brightness=0.0, contrast=0.0)
    assert np.array_equal(off(jax.random.key(3), x), x)


@pytest.mark.parametrize("axis,aug", [(2, ImageAugment(0.0, True, False, 0.0, 0.0)),
                                      (1, ImageAugment(0.0, False, True, 0.0, 0.0))])
def test_flips_flip_some_images_and_nothing_else(axis, aug):
    x = _asym_batch(16)
    y = np.asarray(aug(jax.random.key(0), x))
    flipped = [np.array_equal(a, np.flip(np.asarray(x[0]), axis - 1)) for a in y]
    same = [np.array_equal(a, x[0]) for a in y]
    assert all(f or s for f, s in zip(flipped, same)) and any(flipped) and any(same)


def test_rotation_direction_and_change():
    x = _asym_batch(2)
    r = rotate(x, jnp.array([90.0, 0.0]))
    assert np.allclose(r[0], np.rot90(np.asarray(x[0])), atol=1e-5)
    assert np.allclose(r[1], x[1], atol=1e-6)
    y = ImageAugment(20.0, False, False, 0.0, 0.0)(jax.random.key(0), x)
    assert not np.allclose(y, x, atol=1e-3)


def test_token_dropout_touches_only_real_tokens():
    ids = jnp.array([[101, 5, 6, 7, 8, 9, 102, 0, 0]] * 4)
    mask = (ids != 0).astype(jnp.int32)
    key = jax.random.key(0)
    assert np.array_equal(token_dropout(key, ids, mask, 0.0, mask_id=103), ids)
    all_out = token_dropout(key, ids, mask, 1.0, 103, keep_ids=(101, 102))
    assert np.array_equal(all_out[0], [101, 103, 103, 103, 103, 103, 102, 0, 0])
    half = token_dropout(key, ids, mask, 0.5, 103, keep_ids=(101, 102))
    assert np.array_equal(half, token_dropout(key, ids, mask, 0.5, 103, keep_ids=(101, 102)))
    assert 0 < int((half == 103).sum()) < 20


# --- summary ----------------------------------------------------------------------------

def test_data_summary_counts_per_split_and_environment(tmp_path):
    labels = np.array([0, 1, 1, 0, 1, 0])
    env = np.array(["a", "a", "b", "b", "b", "a"])
    parts = {"train": np.array([0, 1, 2, 3]), "val": np.array([4, 5])}
    s = data_summary(labels, ["neg", "pos"], parts, env, "site")
    assert s["splits"]["train"] == {"n": 4, "counts": {"neg": 2, "pos": 2}}
    assert s["splits"]["val"]["counts"] == {"neg": 1, "pos": 1}
    assert s["environment"]["name"] == "site"
    assert s["environment"]["counts"]["train"] == {"a": {"neg": 1, "pos": 1},
                                                   "b": {"neg": 1, "pos": 1}}
    assert s["environment"]["counts"]["val"] == {"a": {"neg": 1, "pos": 0},
                                                 "b": {"neg": 0, "pos": 1}}
    write_summary(tmp_path / "data_summary.json", s)
    assert json.loads((tmp_path / "data_summary.json").read_text()) == s
    assert "environment" not in data_summary(labels, ["neg", "pos"], parts)


def test_missing_class_in_a_split_is_a_config_error():
    labels = np.array([0, 1, 2, 0, 1, 0])
    parts = {"train": np.array([0, 1, 2]), "val": np.array([3, 4]), "test": np.array([5])}
    check_classes_present(labels, ["a", "b", "c"], {"train": parts["train"]})
    with pytest.raises(ConfigError) as e:
        check_classes_present(labels, ["a", "b", "c"], parts)
    assert e.value.key == "dataset.split"
    assert "class 'c' has no samples in split 'val'" in str(e.value)


def test_class_weights_reweight_the_loss_as_specified():
    """Weighted mean cross-entropy (the train step's task loss): each row counts with its
    class's weight, normalised by the total weight like torch's `weight=`."""
    import jax.numpy as jnp
    from ftlab.tasks import Task, task_loss
    logits = jnp.asarray([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    labels = jnp.asarray([0, 1, 1])
    per = -jax.nn.log_softmax(logits)[jnp.arange(3), labels]
    task = Task("t", "classification", "label", ("a", "b"), "xent", class_weights=(1.0, 3.0))
    got, _ = task_loss(task, logits, labels, jnp.ones(3))
    want = (per[0] * 1 + per[1] * 3 + per[2] * 3) / 7
    assert float(got) == pytest.approx(float(want), rel=1e-6)
    plain, _ = task_loss(dataclasses.replace(task, class_weights=None), logits, labels,
                         jnp.ones(3))
    assert float(plain) == pytest.approx(float(per.mean()))


def test_augment_fn_applies_token_dropout_and_image_changes_only_when_set():
    from ftlab.schema import AugmentConfig
    from ftlab.data.augment import augment_fn
    special = {"mask": 103, "keep": (101, 102), "pad": 0}
    assert augment_fn(AugmentConfig(), special) is None
    ids = jnp.asarray([[101, 7, 8, 9, 10, 11, 102, 0]] * 4)
    batch = {"input_ids": ids, "attention_mask": (ids > 0).astype(jnp.int32)}
    out = augment_fn(AugmentConfig(token_dropout=0.5), special)(jax.random.key(0), batch)
    changed = out["input_ids"] != ids
    assert bool(changed.any()) and bool((out["input_ids"][changed] == 103).all())
    assert bool((out["input_ids"][:, [0, 6, 7]] == ids[:, [0, 6, 7]]).all())  # CLS, SEP, pad
    img = jnp.tile(jnp.arange(16, dtype=jnp.uint8).reshape(1, 4, 4, 1), (2, 1, 1, 3)) * 16
    flipped = augment_fn(AugmentConfig(hflip=True), None)(jax.random.key(1), {"image": img})
    assert flipped["image"].shape == img.shape and float(flipped["image"].max()) <= 255.0
