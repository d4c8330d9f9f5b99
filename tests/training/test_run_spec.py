"""The calibration data a manifest names (``digits@train:val``) is a spec commands take: the
run directory's ``RUN_DIR@val``, the very images export calibrated on."""

from __future__ import annotations

import numpy as np

from sdde_serve.data import load_dataset
from sdde_serve.engine import Engine
from training.run import load_run


def test_run_dir_at_val_is_the_split_export_calibrated_on(tiny_run, tiny_model) -> None:
    val = load_dataset(f"{tiny_run}@val")
    loaded = load_run(tiny_run)
    assert np.array_equal(val.images, loaded.val.images)
    assert np.array_equal(val.labels, loaded.val.labels)
    assert val.name == Engine(tiny_model).manifest.calibration.data  # what the manifest says
