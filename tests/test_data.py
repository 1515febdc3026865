import numpy as np
import pytest

from ftlab.data import splits
from ftlab.data.batches import ArrayData, batches, order
from ftlab.schema import ConfigError, SplitConfig


def test_stratified_split_is_seeded_disjoint_and_balanced():
    labels = np.repeat(np.arange(4), [100, 50, 30, 20])
    a = splits.split(labels, SplitConfig(seed=3))
    b = splits.split(labels, SplitConfig(seed=3))
    c = splits.split(labels, SplitConfig(seed=4))
    assert all((a[k] == b[k]).all() for k in a)
    assert not (a["train"] == c["train"][: len(a["train"])]).all()
    allidx = np.concatenate(list(a.values()))
    assert len(allidx) == len(set(allidx)) == len(labels)
    for k, frac in (("train", 0.7), ("val", 0.15), ("test", 0.15)):
        counts = np.bincount(labels[a[k]], minlength=4)
        assert np.allclose(counts / counts.sum(), [0.5, 0.25, 0.15, 0.1], atol=0.04)
        assert abs(len(a[k]) / len(labels) - frac) < 0.02


def test_bad_split_fractions_rejected():
    with pytest.raises(ConfigError) as e:
        splits.split(np.zeros(10), SplitConfig(train=0.8, val=0.2, test=0.2))
    assert e.value.key == "dataset.split"


def test_batch_order_is_a_pure_function_and_last_batch_padded():
    assert (order(50, 1, 0, 2) == order(50, 1, 0, 2)).all()
    assert not (order(50, 1, 0, 2) == order(50, 1, 0, 3)).all()
    data = ArrayData({"x": np.arange(10), "label": np.arange(10)})
    out = list(batches(data, 4, np.arange(10)))
    assert [b["weight"].sum() for b in out] == [4, 4, 2]
    resumed = list(batches(data, 4, np.arange(10), start=1))
    assert (resumed[0]["x"] == out[1]["x"]).all()
