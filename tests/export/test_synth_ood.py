"""Synthesized validation OOD data (export/synth_ood.py) and its use by ``--ood-score auto``."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from export import synth_ood
from export.synth_ood import DEFAULT_KINDS, KINDS, gaussian_blur, parse_kinds, synthesize
from sdde_serve.errors import UserError
from sdde_serve.manifest import load_onnx, read_manifest


def images(n: int = 12, seed: int = 0, shape: tuple[int, int, int] = (1, 8, 8)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def test_synthesis_is_seeded_and_each_kind_independent_of_the_others():
    x, y = images(), np.arange(12) % 3
    a = synthesize(x, y, KINDS, per_kind=8, seed=3)
    assert list(a) == list(KINDS) and list(synthesize(x, y, per_kind=2)) == list(DEFAULT_KINDS)
    b = synthesize(x, y, ("mixup", "patch-shuffle"), per_kind=8, seed=3)
    for kind in b:
        np.testing.assert_array_equal(a[kind], b[kind])
    c = synthesize(x, y, KINDS, per_kind=8, seed=4)
    assert all(not np.array_equal(a[k], c[k]) for k in KINDS)
    assert all(v.shape == (8, 1, 8, 8) and v.dtype == np.uint8 for v in a.values())
    assert len(synthesize(x, y, KINDS, per_kind=500)["corrupt"]) == 12  # capped by the source


def test_patch_shuffle_permutes_whole_patches_and_keeps_the_border():
    # 1 x 10 x 10 with GRID 4: 2 x 2 patches cover 8 x 8, rows/columns 8-9 stay
    x = images(3, shape=(1, 10, 10))
    out = synth_ood.patch_shuffle(x, np.zeros(3), np.random.default_rng(0))
    for src, dst in zip(x, out, strict=True):
        np.testing.assert_array_equal(dst[:, 8:, :], src[:, 8:, :])
        np.testing.assert_array_equal(dst[:, :, 8:], src[:, :, 8:])

        def patches(img: np.ndarray) -> list[bytes]:
            return sorted(
                img[:, r : r + 2, c : c + 2].tobytes()
                for r in range(0, 8, 2)
                for c in range(0, 8, 2)
            )

        assert patches(dst) == patches(src)
        assert not np.array_equal(dst, src)


def test_pixel_permute_keeps_each_images_pixels_and_moves_channels_together():
    x = images(4, shape=(3, 6, 6))
    out = synth_ood.pixel_permute(x, np.zeros(4), np.random.default_rng(1))
    for src, dst in zip(x, out, strict=True):
        pix = sorted(map(tuple, src.reshape(3, -1).T))  # RGB triples, not channels apart
        assert sorted(map(tuple, dst.reshape(3, -1).T)) == pix
        assert not np.array_equal(dst, src)


def test_gaussian_blur_matches_a_direct_2d_convolution():
    x = np.random.default_rng(2).random((2, 1, 7, 9))
    sigma = 1.3
    radius = int(np.ceil(3 * sigma))
    g = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel = np.outer(g, g) / np.outer(g, g).sum()
    padded = np.pad(x, ((0, 0), (0, 0), (radius, radius), (radius, radius)), mode="edge")
    ref = np.zeros_like(x)
    for i in range(7):
        for j in range(9):
            window = padded[:, :, i : i + 2 * radius + 1, j : j + 2 * radius + 1]
            ref[:, :, i, j] = (window * kernel).sum(axis=(2, 3))
    np.testing.assert_allclose(gaussian_blur(x, sigma), ref, rtol=1e-12, atol=1e-12)


def test_corrupt_is_the_blur_plus_the_seeded_noise():
    x = images(5, shape=(1, 20, 20))
    out = synth_ood.corrupt(x, np.zeros(5), np.random.default_rng(7))
    blurred = gaussian_blur(x.astype(np.float64), synth_ood.BLUR_FRACTION * 20)
    noise = np.random.default_rng(7).normal(0.0, synth_ood.NOISE_SD, x.shape)
    np.testing.assert_array_equal(out, np.clip(np.rint(blurred + noise), 0, 255).astype(np.uint8))


def test_mixup_averages_images_of_different_classes():
    # images with one distinct value each: the mixture names both parents
    n = 10
    x = (np.arange(n, dtype=np.uint8)[:, None, None, None] * 20).repeat(4, axis=2).repeat(4, 3)
    y = np.arange(n) % 2
    out = synth_ood.mixup(x, y, np.random.default_rng(0))
    for i in range(n):
        v = int(out[i, 0, 0, 0])
        assert (out[i] == v).all()
        partner = v // 10 - i  # v = (20 i + 20 j + 1) // 2 = 10 (i + j)
        assert 0 <= partner < n and y[partner] != y[i], (i, v)


def test_parse_kinds():
    assert parse_kinds("all") == KINDS and parse_kinds("default") == DEFAULT_KINDS
    assert "corrupt" not in DEFAULT_KINDS and set(DEFAULT_KINDS) < set(KINDS)
    assert parse_kinds("none") == ()
    assert parse_kinds("mixup, corrupt,mixup") == ("mixup", "corrupt")
    for bad in ("", "blur", "mixup,blur"):
        with pytest.raises(UserError, match="--synth-ood"):
            parse_kinds(bad)


def test_cli_help_lists_the_kinds():
    from export.cli import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    text = " ".join(parser.format_help().split())
    assert all(k in text for k in KINDS)
    assert parse_kinds(parser.parse_args(["r", "-o", "m.onnx"]).synth_ood) == DEFAULT_KINDS


def test_default_export_chooses_on_synthesized_sets_and_records_them(tiny_model):
    m = read_manifest(load_onnx(tiny_model))
    why = m.ood.selection
    assert why is not None and why.method == "auto" and why.synthesized is not None
    assert why.synthesized.kinds == list(DEFAULT_KINDS) and why.synthesized.seed == synth_ood.SEED
    assert why.synthesized.source == why.id_data == m.calibration.data
    assert why.synthesized.per_kind == min(synth_ood.PER_KIND, m.calibration.n)
    assert sorted(why.ood_val) == sorted(f"synth:{k}" for k in DEFAULT_KINDS)
    assert set(why.val_auroc_per_set[m.ood.score if m.knn is None else f"knn@{m.knn.k}"]) == set(
        why.ood_val
    )
    best = max(why.val_auroc, key=lambda c: why.val_auroc[c])
    assert best == (m.ood.score if m.ood.score != "knn" else f"knn@{m.knn.k}")
    assert "synthesized" in why.reason


def test_synth_ood_none_deploys_the_fixed_default(tiny_run, tmp_path):
    from export import export_run

    m = export_run(tiny_run, tmp_path / "m.onnx", synth_ood=(), with_cams=False)
    assert m.ood.selection is not None and m.ood.selection.method == "default"
    assert m.ood.selection.synthesized is None and m.ood.selection.ood_val == {}
