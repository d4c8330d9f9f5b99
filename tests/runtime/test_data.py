"""Data specs: one parser, every source kind, clear errors."""

import gzip
import struct

import numpy as np
import pytest
from PIL import Image

from sdde_serve.data import (
    ArrayDataset,
    load_dataset,
    parse_spec,
    to_model_array,
    train_val_split,
)
from sdde_serve.errors import UserError


def write_idx(path, array, gz=False):
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + b"".join(
        struct.pack(">I", d) for d in array.shape
    )
    opener = gzip.open if gz else open
    with opener(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_digits_train_test_split_is_fixed_and_disjoint():
    train, test = load_dataset("digits"), load_dataset("digits@test")
    assert len(train) + len(test) == 1797
    assert train.images.shape[1:] == (1, 8, 8) and train.images.dtype == np.uint8
    assert train.images.max() == 255 and train.classes == [str(i) for i in range(10)]
    again = load_dataset("digits", split="train")
    np.testing.assert_array_equal(train.images, again.images)
    everything = load_dataset("digits@all")
    rows = {r.tobytes() for r in everything.images}
    assert {r.tobytes() for r in test.images} <= rows


@pytest.mark.parametrize("gz", [False, True])
def test_idx_directory(tmp_path, gz):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (5, 28, 28))
    labels = np.array([0, 1, 2, 1, 0])
    suffix = ".gz" if gz else ""
    write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", imgs, gz)
    write_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", labels, gz)
    ds = load_dataset(str(tmp_path), split="test")
    np.testing.assert_array_equal(ds.images[:, 0], imgs)
    np.testing.assert_array_equal(ds.labels, labels)
    with pytest.raises(UserError, match="no 'train' images"):
        load_dataset(str(tmp_path), split="train")


def test_truncated_idx_is_a_clear_error(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((4, 28, 28)))
    data = (tmp_path / "train-images-idx3-ubyte").read_bytes()
    (tmp_path / "train-images-idx3-ubyte").write_bytes(data[:-10])
    with pytest.raises(UserError, match="truncated"):
        load_dataset(str(tmp_path))


def test_npz_nhwc_float_is_converted(tmp_path):
    x = np.random.default_rng(1).random((3, 5, 6, 3)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=np.array([0, 1, 1]))
    ds = load_dataset(str(tmp_path / "d.npz"))
    assert ds.images.shape == (3, 3, 5, 6)
    expected = np.round(x.transpose(0, 3, 1, 2) * 255).astype(np.uint8)
    np.testing.assert_array_equal(ds.images, expected)
    assert ds.classes == ["0", "1"]


def test_image_folders_labelled_and_flat(tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / "lab" / cls).mkdir(parents=True)
        Image.new("RGB", (6, 4), (10, 20, 30)).save(tmp_path / "lab" / cls / "a.png")
    lab = load_dataset(str(tmp_path / "lab"))
    assert lab.classes == ["cat", "dog"] and list(lab.labels) == [0, 1]
    assert lab.images.shape == (2, 3, 4, 6)
    (tmp_path / "flat").mkdir()
    Image.new("L", (4, 4), 7).save(tmp_path / "flat" / "x.png")
    flat = load_dataset(str(tmp_path / "flat"))
    assert flat.labels is None and flat.images.shape == (1, 1, 4, 4) and flat.images.max() == 7


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "empty"),
        ("/no/such/dir", "no such file"),
        ("digits@banana", "unknown split"),
    ],
)
def test_bad_specs_are_one_clear_message(spec, message):
    with pytest.raises(UserError, match=message):
        load_dataset(spec)


def test_non_npz_file_and_empty_folder(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(UserError, match=r"\.npz"):
        parse_spec(str(tmp_path / "a.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images"):
        load_dataset(str(tmp_path / "empty"))


def test_as_model_input_matches_pil_conversion():
    ds = load_dataset("digits@test")
    x = ds.as_model_input(3, 28, 28)
    assert x.shape == (len(ds), 3, 28, 28) and x.dtype == np.float32
    ref = Image.fromarray(ds.images[0, 0]).resize((28, 28), Image.Resampling.BILINEAR)
    np.testing.assert_allclose(x[0, 1], np.asarray(ref, np.float32) / 255.0)
    np.testing.assert_array_equal(x[:, 0], x[:, 2])  # gray -> RGB repeats the channel
    same = ds.as_model_input(1, 8, 8)
    np.testing.assert_allclose(same * 255.0, ds.images.astype(np.float32))


def test_rgb_to_gray_uses_luma():
    img = Image.new("RGB", (2, 2), (255, 0, 0))
    assert to_model_array(img, 1, 2, 2)[0, 0, 0] == pytest.approx(76 / 255.0)  # 0.299 * 255


def test_train_val_split_is_seeded_disjoint_and_complete():
    tr, va = train_val_split(100, 0.1, seed=3)
    _, va2 = train_val_split(100, 0.1, seed=3)
    np.testing.assert_array_equal(va, va2)
    assert len(va) == 10 and set(tr) | set(va) == set(range(100)) and not set(tr) & set(va)
    with pytest.raises(UserError):
        train_val_split(100, 1.5, seed=0)


def test_array_dataset_validates_shapes():
    with pytest.raises(UserError):
        ArrayDataset("x", np.zeros((2, 8, 8), np.uint8))
    ds = ArrayDataset("x", np.zeros((2, 1, 8, 8), np.uint8), np.array([0, 1]))
    assert ds.fingerprint() != ArrayDataset("x", np.ones((2, 1, 8, 8), np.uint8)).fingerprint()


def test_a_folder_or_npz_has_no_splits_and_says_so(tmp_path):
    """``folder@test`` used to mean "all of the folder" without a word."""
    (tmp_path / "flat").mkdir()
    Image.new("L", (4, 4), 7).save(tmp_path / "flat" / "x.png")
    np.savez(tmp_path / "a.npz", images=np.zeros((2, 4, 4), np.uint8))
    kinds = ((tmp_path / "flat", "an image folder"), (tmp_path / "a.npz", r"a \.npz file"))
    for spec, what in kinds:
        with pytest.raises(UserError, match=f"is {what}, which has no splits; drop '@test'"):
            load_dataset(f"{spec}@test")
        assert len(load_dataset(str(spec), split="test")) > 0  # a command's default: fine


def write_run(root, data_spec, n, val):
    """A run directory as training writes one: config.json's data spec, split.json's record."""
    import json

    root.mkdir()
    full = load_dataset(data_spec, split="train")
    (root / "config.json").write_text(json.dumps({"data": {"spec": data_spec}}))
    record = {"n": n, "val_indices": val, "fingerprint": full.fingerprint()}
    (root / "split.json").write_text(json.dumps(record))
    return full


def test_a_run_directory_is_a_spec_for_its_held_out_and_training_parts(tmp_path):
    images = np.arange(5 * 16, dtype=np.uint8).reshape(5, 1, 4, 4)
    np.savez(tmp_path / "d.npz", images=images, labels=np.arange(5) % 2)
    full = write_run(tmp_path / "run", str(tmp_path / "d.npz"), 5, [3, 0])
    val = load_dataset(f"{tmp_path / 'run'}@val")
    train = load_dataset(f"{tmp_path / 'run'}@train")
    assert np.array_equal(val.images, images[[3, 0]]) and list(val.labels) == [1, 0]
    assert np.array_equal(train.images, images[[1, 2, 4]])
    assert val.name == f"{full.name}:val" and train.name == f"{full.name}:train"
    with pytest.raises(UserError, match=r"say which part, .*run@val .*run@train"):
        load_dataset(str(tmp_path / "run"))


def test_a_manifests_held_out_name_says_what_to_pass():
    """Manifests name calibration data ``digits@train:val``: the run's held-out images."""
    with pytest.raises(UserError) as info:
        load_dataset("digits@train:val")
    assert str(info.value) == (
        "data spec 'digits@train:val' names the images a training run held out of "
        "digits@train (its split.json), which only that run can rebuild: pass RUN_DIR@val, "
        "RUN_DIR being the run directory the model was exported from"
    )
