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
    candidate_row,
    candidate_table,
    cifar_root,
    make_split,
    markdown,
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


def fake_result(method: str, seed: int, acc: float, near: float, stuck: tuple = ()) -> dict:
    """The parts of a ``sdde eval`` metrics.json (and of the run) that the summary reads."""
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
    result = {"method": method, "seed": seed, "epoch_seconds": [2.0, 4.0], "metrics": metrics}
    return {**result, "stuck_members_at_end": list(stuck)}


def test_summary_is_mean_and_sample_std_over_seeds_and_paired_margins():
    runs = {
        "de": [fake_result("de", 0, 0.5, 0.60), fake_result("de", 1, 0.7, 0.70)],
        "sdde": [fake_result("sdde", 0, 0.6, 0.65), fake_result("sdde", 1, 0.8, 0.71, (3,))],
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
    # a member left at chance on one seed fails the goal and is counted in the docs' table
    assert s["table"]["sdde"]["stuck_members_at_end"] == [[], [3]]
    assert s["goals"]["de"]["no_member_stuck_at_end"] is True
    assert s["goals"]["sdde"]["no_member_stuck_at_end"] is False
    sdde_row = next(ln for ln in markdown(s["table"]).splitlines() if ln.startswith("| sdde ("))
    assert sdde_row.endswith("| 1 |")


def test_candidate_row_is_auroc_and_fpr95_per_set_and_their_group_means():
    id_scores = np.array([1.0, 2.0, 3.0, 4.0])
    ood = {
        "a": np.array([0.0, 0.5]),  # below every ID score: AUROC 1, none accepted
        "b": np.array([5.0, 6.0]),  # above every ID score: AUROC 0, all accepted
        "c": np.array([2.5, 2.5]),  # above 2 of 4 ID scores: AUROC 0.5, all accepted at 95 %
    }
    row = candidate_row(id_scores, ood, {"near": ["a", "b"], "far": ["c"], "none": []})
    assert row["per_set"]["a"] == {"auroc": 1.0, "fpr95": 0.0}
    assert row["per_set"]["b"] == {"auroc": 0.0, "fpr95": 1.0}
    assert row["per_set"]["c"] == {"auroc": 0.5, "fpr95": 1.0}
    assert row["near_auroc"] == row["near_fpr95"] == 0.5
    assert row["far_auroc"] == 0.5 and row["far_fpr95"] == 1.0
    assert "none_auroc" not in row


def with_candidates(result: dict, pick: str, near_fpr: dict[str, float]) -> dict:
    """``result`` with a candidates table: ``near_fpr`` per candidate, AUROC = 1 - FPR."""
    table = {
        c: {"near_auroc": 1 - f, "near_fpr95": f, "far_auroc": 1.0, "far_fpr95": 0.0}
        for c, f in near_fpr.items()
    }
    return {**result, "candidates": {"auto_pick": pick, "table": table}}


def test_candidate_summary_is_the_mean_over_seeds_and_the_auto_pick_s_gap():
    s0 = {"mal": 0.30, "knn@5": 0.20, "combined": 0.10, "only_s0": 0.0}
    s1 = {"mal": 0.40, "knn@5": 0.22, "combined": 0.12}
    runs = {
        "de": [
            with_candidates(fake_result("de", 0, 0.5, 0.6), "knn@5", s0),
            with_candidates(fake_result("de", 1, 0.7, 0.7), "mal", s1),
        ],
        "sdde": [fake_result("sdde", 0, 0.6, 0.65)],  # a result without the table
    }
    s = summarize(runs)
    c = s["candidates"]["de"]
    assert set(c["candidates"]) == {"mal", "knn@5", "combined"}  # only those of every seed
    assert c["candidates"]["mal"]["near_fpr95"] == pytest.approx([0.35, np.sqrt(0.005)])
    assert c["best_single_near_fpr95"] == "combined"
    # each seed's own pick: knn@5 on seed 0 (0.20), mal on seed 1 (0.40)
    assert c["auto"]["near_fpr95"] == pytest.approx([0.30, np.sqrt(0.02)])
    assert c["auto_picks"] == ["knn@5", "mal"]
    assert c["gap_points"] == pytest.approx(100 * (0.30 - 0.11))
    assert c["goal_within_1_point"] is False
    assert s["goals"]["de"]["auto_near_fpr95_within_1_point_of_best"] is False
    assert "sdde" not in s["candidates"]
    assert "auto_near_fpr95_within_1_point_of_best" not in s["goals"]["sdde"]
    near = {"mal": 0.30, "combined": 0.295}
    close = summarize({"de": [with_candidates(fake_result("de", 0, 0.5, 0.6), "mal", near)]})
    assert close["candidates"]["de"]["gap_points"] == pytest.approx(0.5)
    assert close["candidates"]["de"]["goal_within_1_point"] is True


def test_candidate_table_of_a_finished_run_rebuilds_export_s_candidates(tiny_run, tmp_path):
    """On a trained and exported run: the candidates are the ones export's auto ranked, its pick
    is the manifest's, and a candidate's numbers are the metrics of its reference scores."""
    import torch

    from export import export_run
    from sdde_serve.evaluation.metrics import auroc, fpr_at_tpr
    from training.run import load_run

    rng = np.random.default_rng(0)
    specs = {}
    for name, scale in (("val", 255), ("near", 60), ("far", 255)):
        images = rng.integers(0, scale + 1, (30, 1, 28, 28), dtype=np.uint8)
        np.savez(tmp_path / f"{name}.npz", images=images)
        specs[name] = str(tmp_path / f"{name}.npz")
    model = tmp_path / "m.onnx"
    m = export_run(tiny_run, model, ood_val={"val": specs["val"]}, knn_bank=120, with_cams=False)
    split = {"val_ood": {"val": specs["val"]}, "test": "digits", "near": {"near": specs["near"]}}
    out = candidate_table(tiny_run, model, split, {"far": specs["far"]})

    picked = m.ood.score if m.ood.score != "knn" else f"knn@{m.knn.k}"
    assert out["auto_pick"] == out["recomputed_pick"] == picked
    assert set(out["table"]) == set(m.ood.selection.val_auroc) == set(out["val_auroc"])
    ens = load_run(tiny_run).ensemble.eval()

    def mal(spec: str) -> np.ndarray:
        images = load_dataset(spec, split="test").as_model_input(1, 28, 28)
        with torch.no_grad():
            return ens(torch.from_numpy(images)).double().mean(dim=1).amax(dim=-1).numpy()

    test, near, far = mal("digits"), mal(specs["near"]), mal(specs["far"])
    row = out["table"]["mal"]
    assert row["near_auroc"] == pytest.approx(auroc(test, near))
    assert row["near_fpr95"] == pytest.approx(fpr_at_tpr(test, near))
    assert row["far_auroc"] == pytest.approx(auroc(test, far))
    assert row["far_fpr95"] == pytest.approx(fpr_at_tpr(test, far))


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
