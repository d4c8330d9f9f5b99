"""One onnxruntime session factory (``engine.make_session``) and the composition root's wiring."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sdde_serve.engine import Engine, ModelLoadError, make_session
from sdde_serve.errors import UserError


def test_sessions_from_bytes_and_file_compute_what_the_engine_computes(linear_model) -> None:
    path, _ = linear_model
    engine = Engine(path, intra_op_threads=1)
    x = np.random.default_rng(0).random((5, 1, 8, 8), dtype=np.float32)
    out = engine.run(x)
    for source in (path, path.read_bytes()):
        session = make_session(source, intra_op_threads=1, spin_wait=False)
        assert session.get_providers() == ["CPUExecutionProvider"]
        probs, mal = session.run(["probs", "mal"], {"images": x})
        np.testing.assert_array_equal(probs, out.probs)
        np.testing.assert_array_equal(mal, out.mal)


def test_a_graph_onnxruntime_cannot_load_is_one_user_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"^bad\.onnx: onnxruntime cannot load the graph"):
        make_session(b"not an onnx graph", source="bad.onnx")
    assert issubclass(ModelLoadError, UserError)  # `sdde` prints it as one line, exit 2


def test_the_composition_root_hands_eval_its_cam_provider() -> None:
    from sdde_serve import cli
    from sdde_serve.evaluation import cli as eval_cli

    argv = ["eval", "m.onnx", "--data", "digits", "--out-dir", "out", "--no-plots"]
    args = cli.build_parser("eval").parse_args([*argv, "--cams-from-run", "run"])
    assert args._main.func is eval_cli.main
    assert args._main.keywords == {"cam_provider": cli.PROVIDERS["eval"]["cam_provider"]}
    # called without it (not through `sdde`), --cams-from-run fails clearly, before any work
    with pytest.raises(UserError, match="--cams-from-run needs a CAM provider"):
        eval_cli.main(args)


def test_make_session_is_the_only_place_that_builds_a_session() -> None:
    import ast

    root = Path(__file__).resolve().parents[2]
    builders = []
    for package in ("sdde_serve", "export"):
        for path in sorted((root / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Attribute) and node.attr in (
                    "InferenceSession",
                    "SessionOptions",
                ):
                    builders.append(str(path.relative_to(root)))
    assert builders and set(builders) == {"sdde_serve/engine.py"}, builders
