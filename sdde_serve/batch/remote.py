"""``--url``: score against a running ``sdde serve`` (or another KServe v2 / Triton server).

The client decodes images with the same :func:`sdde_serve.preprocess.decode_image` and sends float32
``[B, C, H, W]`` tensors to ``POST /v2/models/{name}/infer``. When the server lists the
``binary_tensor_data`` extension (``GET /v2``; sdde serve and Triton do) tensors travel as raw
little-endian bytes after the JSON header (the binary tensor extension: 4 bytes per value instead
of ~10 characters of JSON, and no JSON parsing of pixels on the server); otherwise as plain v2
JSON. Both are exact for float32. The HTTP client is the standard library's ``http.client`` with
one kept-alive connection (no extra dependency; tritonclient is not needed).

The server returns the model's ``logits``, ``probs``, ``mal`` and ``msp``; the rows are then made
by the same :func:`sdde_serve.scoring.make_predictions` as local jobs, with the manifest of the
local model file, so a ``--url`` job writes exactly the rows a local job writes. The client checks
that the server's model has the same name, version, temperature and OOD rule as that file.

``SDDE_API_KEY`` in the environment is sent as ``Authorization: Bearer ...``.
"""

from __future__ import annotations

import http.client
import json
import os
import time
from urllib.parse import urlsplit

import numpy as np

from sdde_serve import scores
from sdde_serve.engine import REQUIRED_OUTPUTS, EngineOutput
from sdde_serve.errors import UserError
from sdde_serve.manifest import Manifest

# statuses worth retrying: the server is starting, overloaded (queue full) or restarting
RETRY_STATUSES = (429, 502, 503, 504)


class RemoteBackend:
    """A :class:`~sdde_serve.batch.pipeline.Backend` that calls ``{url}/v2/models/{name}/infer``."""

    def __init__(
        self,
        url: str,
        manifest: Manifest,
        *,
        model_name: str | None = None,
        timeout: float = 60.0,
        retries: int = 5,
    ) -> None:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UserError(f"--url must look like http://host:port, got {url!r}")
        self.manifest = manifest
        self.name = model_name or manifest.name
        self._scheme, self._host, self._port = parts.scheme, parts.hostname, parts.port
        self._prefix = parts.path.rstrip("/")
        self.timeout, self.retries = timeout, retries
        self._conn: http.client.HTTPConnection | None = None
        self.url = f"{parts.scheme}://{parts.netloc}{self._prefix}"
        self.providers = [f"remote:{self.url}"]
        self._check_ready()
        self.binary = self._check_model()

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            https = self._scheme == "https"
            cls = http.client.HTTPSConnection if https else http.client.HTTPConnection
            self._conn = cls(self._host, self._port, timeout=self.timeout)
        return self._conn

    def _request(
        self, method: str, path: str, body: bytes | None = None, headers: dict | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        headers = dict(headers or {})
        if os.environ.get("SDDE_API_KEY"):
            headers["Authorization"] = f"Bearer {os.environ['SDDE_API_KEY']}"
        delay = 0.2
        for attempt in range(self.retries + 1):
            try:
                conn = self._connection()
                conn.request(method, self._prefix + path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
            except (OSError, http.client.HTTPException) as exc:
                self.close()  # a broken kept-alive connection: reconnect
                if attempt == self.retries:
                    raise UserError(f"cannot reach the server at {self.url}: {exc}") from None
            else:
                if resp.status not in RETRY_STATUSES or attempt == self.retries:
                    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
        raise AssertionError("unreachable")

    def _check_ready(self) -> None:
        status, _, body = self._request("GET", f"/v2/models/{self.name}/ready")
        if status != 200:
            raise UserError(
                f"model {self.name!r} is not ready at {self.url} (HTTP {status}: "
                f"{body[:200].decode(errors='replace')})"
            )

    def _check_model(self) -> bool:
        """Same model as the local manifest? Returns whether the server takes binary tensors."""
        status, _, body = self._request("GET", f"/v2/models/{self.name}")
        if status != 200:
            raise UserError(f"cannot read model metadata from {self.url} (HTTP {status})")
        meta = json.loads(body)
        m, params = self.manifest, meta.get("parameters") or {}
        expected = {
            "ood_score": m.ood.score,
            "ood_threshold": m.ood.threshold,
            "temperature": m.temperature,
        }
        differ = [k for k, v in expected.items() if k in params and params[k] != v]
        if m.version not in meta.get("versions", [m.version]):
            differ.append("version")
        if differ:
            raise UserError(
                f"the server's {self.name!r} differs from {m.name} v{m.version} in the model "
                f"file ({', '.join(differ)}): score with the file the server serves"
            )
        status, _, body = self._request("GET", "/v2")
        return status == 200 and "binary_tensor_data" in json.loads(body).get("extensions", [])

    def run(self, images: np.ndarray) -> EngineOutput:
        images = np.ascontiguousarray(images, dtype="<f4")
        tensor: dict = {"name": "images", "shape": list(images.shape), "datatype": "FP32"}
        if self.binary:
            raw = images.tobytes()
            tensor["parameters"] = {"binary_data_size": len(raw)}
        else:
            tensor["data"] = images.ravel().tolist()
        # a score beyond the required outputs is fetched when it is the deployed one (minmax:
        # recomputed from the logits, as for older graphs)
        deployed = self.manifest.ood.score
        extra = deployed not in REQUIRED_OUTPUTS and not scores.get(deployed).recompute_from_logits
        names = [*REQUIRED_OUTPUTS, *([deployed] if extra else [])]
        request = {
            "inputs": [tensor],
            "outputs": [{"name": n, "parameters": {"binary_data": self.binary}} for n in names],
        }
        head = json.dumps(request).encode()
        if self.binary:
            body = head + raw
            headers = {
                "Content-Type": "application/octet-stream",
                HEADER_LENGTH: str(len(head)),
            }
        else:
            body, headers = head, {"Content-Type": "application/json"}
        status, resp_headers, data = self._request(
            "POST", f"/v2/models/{self.name}/infer", body, headers
        )
        if status != 200:
            # the job cannot go on without its scorer: this fails the job (exit 2, resumable)
            raise RuntimeError(
                f"server answered HTTP {status} for a batch of {len(images)}: "
                f"{data[:300].decode(errors='replace')}"
            )
        arrays = _parse_outputs(data, resp_headers, names)
        return EngineOutput.from_outputs(arrays)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


HEADER_LENGTH = "Inference-Header-Content-Length"


def _parse_outputs(data: bytes, headers: dict[str, str], names: list[str]) -> dict[str, np.ndarray]:
    """The ``names`` outputs of a v2 response, JSON ``data`` or binary."""
    n = int(headers.get(HEADER_LENGTH.lower(), len(data)))
    head, binary = json.loads(data[:n]), memoryview(data)[n:]
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for o in head["outputs"]:
        size = (o.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            arr = np.frombuffer(binary[offset : offset + size], dtype="<f4")
            offset += size
        else:
            arr = np.asarray(o["data"], dtype=np.float32)
        arrays[o["name"]] = arr.astype(np.float32).reshape(o["shape"])
    missing = [k for k in names if k not in arrays]
    if missing:
        raise RuntimeError(f"server response lacks outputs {missing}")
    return arrays
