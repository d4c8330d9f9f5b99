"""``--ray`` on a local Ray instance writes the rows of the local mode."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdde_serve.batch.writers import read_rows

from .conftest import score, write_bad_files

ray = pytest.importorskip("ray")
# Ray Data's own DataContext trips its deprecation warnings; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},  # workers import sdde_serve
    )
    yield
    ray.shutdown()


def test_ray_mode_gives_the_local_rows(
    tmp_path: Path, linear_model, images, local_ray, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, _ = linear_model
    bad = write_bad_files(tmp_path / "images" / "bad")
    listing = tmp_path / "list.txt"  # the directory named unreadable.png is listed, so read
    listing.write_text("\n".join([*map(str, images), *map(str, bad.values())]) + "\n")
    # relative paths too: Ray workers run in another working directory
    monkeypatch.chdir(tmp_path)
    local, distributed = tmp_path / "local.parquet", tmp_path / "ray.parquet"
    args = [
        model,
        listing,
        "images/a",
        "--probs",
        "--top-k",
        "2",
        "--batch-size",
        "8",
        "--concurrency",
        "1",
    ]
    assert score(*args, "-o", local) == 1
    assert score(*args, "-o", distributed, "--ray") == 1
    assert list(read_rows(distributed)) == list(read_rows(local))
    assert list(read_rows(tmp_path / "ray.errors.parquet")) == list(
        read_rows(tmp_path / "local.errors.parquet")
    )
    assert len(list(read_rows(tmp_path / "ray.errors.parquet"))) == len(bad)
    assert next(read_rows(distributed), {}).get("path") == str(images[0])
    assert any(r["path"].startswith("images/a/") for r in read_rows(distributed))
