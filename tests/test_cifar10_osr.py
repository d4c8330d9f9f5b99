"""``benchmarks/cifar10_osr.py``'s open-set split on fabricated image folders, its aggregation
against hand computations, and ``benchmarks/gpu_check.py --dry-run`` on the CPU.

Every fabricated image says where it came from: red = 20 x its CIFAR-10 class index, blue = 0
for a training image and 200 for a test image, green = its number in the class folder.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks.cifar10_osr import (
    CIFAR10,
    KNOWN,
    cifar_root,
    make_split,
    mnist_rgb,
    summarize,
)
from sdde_serve.data import load_dataset
from sdde_serve.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
N_TRAIN, N_TEST = 3, 2
BLUE = {"train": 0, "test": 200}


def fake_cifar(root: Path) -> Path:
    for part, n in (("train", N_TRAIN), ("test", N_TEST)):
        for c, name in enumerate(CIFAR10):
            folder = root / part / name
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = np.zeros((8, 8, 3), np.uint8)
                pixels[..., 0], pixels[..., 1], pixels[..., 2] = 20 * c, 10 * i, BLUE[part]
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def origin(images: np.ndarray) -> set[tuple[str, str]]:
    """(class, part) of every image, read back from its colours."""
    part = {v: k for k, v in BLUE.items()}
    return {(CIFAR10[int(im[0, 0, 0]) // 20], part[int(im[2, 0, 0])]) for im in images}


def test_split_trains_on_known_train_images_and_keeps_unknowns_apart(tmp_path):
    root = fake_cifar(tmp_path / "cifar")
    split = make_split(root, tmp_path / "work", list(KNOWN), "horse", per_class=2)

    train = np.load(split["train"])
    assert [str(c) for c in train["classes"]] == sorted(KNOWN)
    assert split["train_images"] == len(train["labels"]) == 2 * len(KNOWN)  # the per-class subset
    for im, label in zip(train["images"], train["labels"], strict=True):
        assert origin(im[None]) == {(sorted(KNOWN)[label], "train")}  # labels follow the classes

    val = np.load(split["val_ood"]["horse"])["images"]
    assert origin(val) == {("horse", "train")} and len(val) == N_TRAIN

    assert sorted(split["near"]) == ["cat", "frog", "ship"]
    for name, spec in split["near"].items():
        near = load_dataset(spec).images
        assert origin(near) == {(name, "test")} and len(near) == N_TEST

    test = load_dataset(split["test"])
    assert test.classes == sorted(KNOWN) and len(test) == N_TEST * len(KNOWN)
    assert origin(test.images) == {(c, "test") for c in KNOWN}
    assert split["unknown"] == ["cat", "frog", "horse", "ship"]


def test_a_validation_class_among_the_known_ones_is_refused(tmp_path):
    root = fake_cifar(tmp_path / "cifar")
    with pytest.raises(UserError, match="outside --known"):
        make_split(root, tmp_path / "work", list(KNOWN), "truck", per_class=None)


def test_archives_are_unpacked_into_the_work_dir(tmp_path):
    fake_cifar(tmp_path / "cifar")
    archives = tmp_path / "archives"
    archives.mkdir()
    for part in ("train", "test"):
        with tarfile.open(archives / f"{part}.tar.gz", "w:gz") as tar:
            tar.add(tmp_path / "cifar" / part, arcname=part)
    root = cifar_root(archives, tmp_path / "work")
    assert root == tmp_path / "work" / "cifar10"
    for part, n in (("train", N_TRAIN), ("test", N_TEST)):
        assert sorted(p.name for p in (root / part).iterdir()) == sorted(CIFAR10)
        assert len(list((root / part / "cat").iterdir())) == n
    assert cifar_root(tmp_path / "cifar", tmp_path / "other") == tmp_path / "cifar"


def test_mnist_digits_become_rgb_32x32(tmp_path):
    digits = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    header = bytes([0, 0, 8, 3]) + b"".join(int(d).to_bytes(4, "big") for d in digits.shape)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + digits.tobytes()))
    out = mnist_rgb(str(tmp_path), n=5, seed=0)  # n = all: every digit, in file order
    assert out.shape == (5, 3, 32, 32) and out.dtype == np.uint8
    for d, rgb in zip(digits, out, strict=True):
        grey = np.asarray(Image.fromarray(d).resize((32, 32), Image.Resampling.BILINEAR))
        for channel in rgb:
            np.testing.assert_array_equal(channel, grey)


def fake_result(method: str, seed: int, acc: float, near: float) -> dict:
    """The parts of a ``sdde eval`` metrics.json that the summary reads."""
    score = {"auroc": near, "fpr95": 1.0 - near}
    scores = {s: score for s in ("mal", "msp", "minmax", "knn")}
    cls = {"accuracy": acc, "nll": 1.0, "ece": 0.1}
    first = {**cls, "ood": {"groups": {"near": {"mal": score, "msp": score}}}}
    metrics = {
        "classification": {"before": cls, "after": cls},
        "ood": {"groups": {"near": scores}, "deployed": "knn", "knn": {"k": 5}},
        "members_sweep": {"first": [first]},
        "diversity": {"id": {"disagreement": 0.2, "mutual_information": 0.01}},
        "cams": {"id": 0.5},
    }
    return {"method": method, "seed": seed, "epoch_seconds": [2.0, 4.0], "metrics": metrics}


def test_summary_is_mean_and_sample_std_over_seeds_and_paired_margins():
    runs = {
        "de": [fake_result("de", 0, 0.5, 0.60), fake_result("de", 1, 0.7, 0.70)],
        "sdde": [fake_result("sdde", 0, 0.6, 0.65), fake_result("sdde", 1, 0.8, 0.71)],
    }
    s = summarize(runs)
    assert s["table"]["de"]["accuracy"] == pytest.approx([0.6, np.sqrt(0.02)])
    assert s["table"]["de"]["epoch_s"] == pytest.approx([3.0, 0.0])
    assert s["table"]["sdde"]["near_deployed_auroc"] == pytest.approx([0.68, np.sqrt(0.0018)])
    margin = s["sdde_vs_de"]["sdde_minus_de_near_deployed_auroc"]
    assert margin["per_seed"] == pytest.approx([0.05, 0.01])
    assert margin["mean_std"] == pytest.approx([0.03, np.sqrt(0.0008)])
    assert s["goals"]["sdde_ge_de_near_deployed_auroc"] is True
    assert s["goals"]["de"]["ensemble_accuracy_ge_90"] is False


def test_gpu_check_dry_run_trains_de_and_sdde_on_the_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", out]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["dry_run"] is True and report["cifar"]["ok"] is True
    assert report["cifar"]["config"]["arch"] == "resnet18_32"
    for method in ("de", "sdde"):
        r = report["cifar"][method]
        assert r["steps"] == 1 and r["train_images"] == 18  # 20 images less a 10 % val split
        # one step of 8 images over the run's own clock
        assert r["images_per_s"] * sum(r["epoch_s"]) == pytest.approx(8.0)
