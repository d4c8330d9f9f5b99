"""Signed prediction ids (sdde_serve/server/tokens.py): what they carry, within the stated
quantisation (checked against float64 numpy), and that no changed byte gets through."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from sdde_serve.server.tokens import FULL_CLASSES, Q_MAX, Q_SCALE, TOP_K, Signer, TokenError

FLOOR = np.exp(-Q_MAX / Q_SCALE)  # -ln p is kept up to 31.9995: p ~ 1.3e-14
SIGNER = Signer(b"0123456789abcdef0123456789abcdef")
NONCES = [bytes([i]) * 8 for i in range(4)]


def probs(n_classes: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(n_classes, 0.3), size=4)
    p[0, :] = 0.0
    p[0, 1] = 1.0  # certain: the other classes at p = 0 are stored as FLOOR
    return p.astype(np.float32)


def test_every_class_within_a_4096th_of_its_nll_up_to_32_classes():
    p = probs(10)
    ids = SIGNER.issue("digits", "12", 1_700_000_000, NONCES, [True, False, True, False], p)
    for i, token in enumerate(ids):
        record = SIGNER.verify(token)
        assert (record.model, record.version, record.issued) == ("digits", "12", 1_700_000_000)
        assert record.nonce == NONCES[i] and record.is_ood == (i % 2 == 0)
        assert record.predicted == int(np.argmax(p[i]))
        want = -np.log(np.maximum(p[i].astype(np.float64), FLOOR))
        assert np.abs(-np.log(record.probs) - want).max() <= 1 / 4096 + 1e-12
    assert len(ids[0]) < 100 and "," not in "".join(ids)  # v2 joins ids with commas


def test_above_32_classes_the_top_k_and_the_mean_of_the_rest():
    n = 100
    p = probs(n, seed=1).astype(np.float64)
    (token, *_) = SIGNER.issue("m", "1", 0, NONCES, [False] * 4, p)
    record = SIGNER.verify(token)
    top = np.argsort(-p[0])[:TOP_K]
    rest = np.setdiff1d(np.arange(n), top)
    assert n > FULL_CLASSES
    assert np.abs(np.log(record.probs[top]) - np.log(np.maximum(p[0, top], FLOOR))).max() \
        <= 1 / 4096 + 1e-12  # fmt: skip
    mean_rest = max((1 - p[0, top].sum()) / (n - TOP_K), FLOOR)
    assert record.probs[rest] == pytest.approx(np.full(len(rest), mean_rest), rel=3e-4)


def test_any_changed_byte_or_another_secret_is_refused():
    (token, *_) = SIGNER.issue("digits", "1", 5, NONCES, [False] * 4, probs(10))
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    for at in range(len(raw)):
        changed = bytearray(raw)
        changed[at] ^= 0x40
        forged = base64.urlsafe_b64encode(bytes(changed)).rstrip(b"=").decode()
        with pytest.raises(TokenError, match="signature mismatch"):
            SIGNER.verify(forged)
    with pytest.raises(TokenError, match="another feedback secret"):
        Signer(b"another secret, also 32 bytes ..").verify(token)
    for bad, why in (("a", "not base64url"), ("!!!!", "too short"), ("abcd", "too short")):
        with pytest.raises(TokenError, match=why):
            SIGNER.verify(bad)
