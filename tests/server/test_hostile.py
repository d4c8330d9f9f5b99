"""Hostile requests against a real ``sdde serve`` process: bounded memory, a responsive loop.

Each request of ``benchmarks/hostile_requests.py``'s corpus (32 MB of empty JSON strings, a 77 KB
16-bit PNG of 36 MP, WebP bombs, eight images at the pixel limit, 300 copies of a v2 output, the
largest legitimate requests, ...) is sent once to a fresh server while a liveness probe runs in
its own process. The goal of issue 12 is <= 64 MB peak RSS over the warmed server per request and
liveness within 100 ms; the peak is asserted here, liveness only against multi-second stalls (the
benchmark reports the 100 ms goal; timing asserts would be flaky on shared CI cores).
"""

from __future__ import annotations

import sys

import pytest

from benchmarks.hostile_requests import LIVENESS_GOAL_S, RSS_GOAL_MB, corpus, measure
from tests.server.conftest import ServerProcess

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc needed")


def test_hostile_requests_keep_memory_bounded_and_liveness_answered(tiny_model):
    server = ServerProcess(tiny_model)
    try:
        server.wait_ready()
        rows = measure(server.url, server.proc.pid, "tiny-digits", corpus(28))
    finally:
        assert server.stop() == 0
    for r in rows:  # the numbers, for the log of a failing run
        print(f"{r.name}: {r.status} +{r.peak_over_warm_mb} MB, liveness {r.liveness_max_s} s")
    by_name = {r.name: r for r in rows}
    legit = {"multipart: 256 small PNGs", "v2: JSON input of 256 images, all outputs"}
    legit |= {"v2: binary 256 images", "jpeg: RGB at the pixel limit"}
    legit |= {"png: 16-bit at the pixel limit", "webp: RGBA at the pixel limit"}
    legit |= {"webp: 4 RGBA at the request budget (base64 JSON)"}
    for name, r in by_name.items():
        if name in legit:
            assert r.status == 200, (name, r.reason)
        else:
            assert 400 <= r.status < 500, (name, r.status, r.reason)
        assert r.peak_over_warm_mb <= RSS_GOAL_MB, (name, r.peak_over_warm_mb)
        assert r.liveness_max_s < 10 * LIVENESS_GOAL_S, (name, r.liveness_max_s)
    assert by_name["json: 32 MB list of empty strings"].status == 413
    assert "more than once" in by_name["v2: 300 copies of logits (binary input)"].reason
    assert "exceeds the limit" in by_name["png: 16-bit 6000x6000 (77 KB)"].reason
    assert "per request" in by_name["webp: 8 RGBA at the pixel limit (multipart)"].reason
