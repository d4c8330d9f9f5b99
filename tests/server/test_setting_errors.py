"""Bad ``sdde serve`` settings answer in the project's words, one line naming the flag: never
pydantic's ("Value error, ...", "Input should be greater than or equal to 1")."""

from __future__ import annotations

import pytest

from sdde_serve.cli import main as sdde_main


@pytest.mark.parametrize(
    ("flags", "line"),
    [
        (
            ["--shadow", "digits"],
            "error: --shadow 'digits': expected NAME:VERSION, VERSION a number "
            "(e.g. --shadow digits:2)",
        ),
        (
            ["--pin", "digits:latest"],
            "error: --pin 'digits:latest': expected NAME:VERSION, VERSION a number "
            "(e.g. --pin digits:2)",
        ),
        (
            ["--max-batch-size", "0"],
            "error: --max-batch-size (SDDE_MAX_BATCH_SIZE) must be >= 1, got 0",
        ),
        (
            ["--shadow-fraction", "2"],
            "error: --shadow-fraction (SDDE_SHADOW_FRACTION) must be <= 1.0, got 2.0",
        ),
    ],
)
def test_bad_settings_are_one_line_in_the_projects_words(tmp_path, capsys, flags, line) -> None:
    assert sdde_main(["serve", str(tmp_path / "m.onnx"), *flags]) == 2
    assert capsys.readouterr().err.strip() == line
