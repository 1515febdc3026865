"""A user's own folder / table datasets through config alone, and bad data rejected early."""
import csv
import json

import numpy as np
import pytest
from PIL import Image

from conftest import compose_cfg
from ftlab.data.prepare import load_split
from ftlab.data.user import DataError
from ftlab.schema import ConfigError
from ftlab.train import run

TINY = ("experiment=elpv_tiny", "debug=smoke", "dataset.image_size=16", "logger.mode=disabled")


def pattern(rng, cls: int) -> np.ndarray:
    """Distinct images per sample; class 1 has a bright square so the classes differ."""
    img = (rng.random((8, 8)) * 120).astype(np.uint8)
    img = np.kron(img, np.ones((4, 4), np.uint8))
    if cls:
        img[8:24, 8:24] = 250
    return img


def make_folder(root, n=16, classes=("ok", "scratch")):
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(pattern(rng, c)).save(root / name / f"{i:03d}.png")
    return root


def test_folder_dataset_trains_under_smoke(tmp_path):
    root = make_folder(tmp_path / "parts")
    results = run(compose_cfg(*TINY, "dataset=folder", f"dataset.path={root}"), tmp_path / "run")
    assert "test/accuracy" in results
    manifest = (tmp_path / "run" / "manifest.csv").read_text()
    assert "scratch/000.png" in manifest and "ok/015.png" in manifest


def test_folder_images_come_from_the_cache_until_a_file_changes(tmp_path, monkeypatch):
    """Decoded once (ftlab/data/cache.py); an edited image is decoded again, never stale."""
    from ftlab.data import user
    root = make_folder(tmp_path / "imgs", n=3)
    cfg = compose_cfg(*TINY, "dataset=folder", f"dataset.path={root}").dataset
    first = user.folder(cfg).arrays["image"]
    decoded, real = [], user.read_image
    monkeypatch.setattr(user, "read_image", lambda p, size: decoded.append(p) or real(p, size))
    assert np.array_equal(user.folder(cfg).arrays["image"], first) and not decoded
    Image.fromarray(np.full((32, 32), 7, np.uint8)).save(root / "ok" / "001.png")
    again = user.folder(cfg).arrays["image"]
    assert len(decoded) == 6 and (again[1] == 7).all() and np.array_equal(again[0], first[0])


def test_csv_image_table_trains_with_env_and_group_columns(tmp_path):
    make_folder(tmp_path / "imgs")
    rows = [{"file": f"imgs/{c}/{i:03d}.png", "label": c, "site": ["a", "b"][i % 2],
             "batch": str(i // 2)} for c in ("ok", "scratch") for i in range(16)]
    with open(tmp_path / "data.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    cfg = compose_cfg(*TINY, "dataset=table", f"dataset.path={tmp_path / 'data.csv'}",
                      "dataset.image_column=file", "dataset.env=site", "dataset.group=batch")
    split = load_split(cfg.dataset)
    groups = split.examples.columns["batch"]
    for a in split.parts:
        for b in split.parts:
            if a < b:
                assert not set(groups[split.parts[a]]) & set(groups[split.parts[b]])
    run(cfg, tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "data_summary.json").read_text())
    assert set(summary["environment"]["counts"]["train"]) == {"a", "b"}


def test_planted_duplicate_across_splits_fails_the_run(tmp_path):
    root = make_folder(tmp_path / "parts")
    over = (*TINY, "dataset=folder", f"dataset.path={root}", "dataset.subset=null")
    clean = load_split(compose_cfg(*over).dataset)
    assert clean.leaks.ok
    ids = clean.examples.ids
    train_id, test_id = ids[clean.parts["train"][0]], ids[clean.parts["test"][0]]
    Image.open(root / train_id).save(root / test_id)  # plant: a train image in test
    with pytest.raises(ConfigError) as e:
        run(compose_cfg(*over), tmp_path / "run")
    assert e.value.key == "dataset.duplicates" and "1 exact" in str(e.value)
    leak = (tmp_path / "run" / "leakage.csv").read_text()
    assert train_id in leak and test_id in leak
    assert not (tmp_path / "run" / "ckpt").exists()  # stopped before any training
    grouped = load_split(compose_cfg(*over, "dataset.duplicates=group").dataset)
    assert grouped.leaks.ok


def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.mark.parametrize("case,expect", [
    ("unreadable", "unreadable image"),
    ("unknown_label", "not in dataset.classes"),
    ("nan", "NaN"),
    ("empty_class_split", "has no samples in split"),
])
def test_bad_data_is_one_line_naming_the_problem(tmp_path, case, expect):
    root = make_folder(tmp_path / "imgs", n=12)
    rows = [[f"imgs/{c}/{i:03d}.png", c, "1.0"] for c in ("ok", "scratch") for i in range(12)]
    extra = []
    if case == "unreadable":
        (root / "ok" / "000.png").write_bytes(b"not a png")
    elif case == "unknown_label":
        extra = ["dataset.classes=[ok]"]
    elif case == "nan":
        rows[3][2] = "nan"
    elif case == "empty_class_split":
        rows = [r for r in rows if r[1] == "ok"] + [rows[-1]]  # one 'scratch' sample
    path = write_csv(tmp_path / "t.csv", ["file", "label", "score"], rows)
    cfg = compose_cfg(*TINY, "dataset=table", f"dataset.path={path}",
                      "dataset.image_column=file", "dataset.subset=null", *extra)
    with pytest.raises((DataError, ConfigError)) as e:
        load_split(cfg.dataset)
    assert expect in str(e.value) and "\n" not in str(e.value)


def test_missing_path_is_rejected_before_loading():
    with pytest.raises(ConfigError) as e:
        load_split(compose_cfg("dataset=folder").dataset)
    assert e.value.key == "dataset.path"


def test_mnist_5k_loads_as_images():
    split = load_split(compose_cfg("dataset=mnist_5k").dataset)
    ex = split.examples
    assert len(ex) == 5000 and ex.arrays["image"].shape == (5000, 32, 32, 3)
    assert set(np.unique(ex.labels)) == set(range(10))
