"""Signed, self-contained prediction ids: what a label needs to judge its prediction, in the id.

A prediction id is ``base64url(record + HMAC-SHA256(secret, record)[:16])``. The record holds
the model name and version, the time issued, a random nonce, the predicted class, the OOD flag
and the calibrated probabilities, so that **any** worker of **any** replica that shares the
secret (``--feedback-secret``) can turn a label into accuracy, NLL, ECE and OOD-flag precision
without having seen the prediction. A changed byte fails the signature.

Probabilities are stored as ``round(-ln p * 2048)`` in 16 bits (p below e**-31.9995, about
1.3e-14, is stored as that floor): -ln p, hence each image's NLL, is off by at most 1/4096
(2.4e-4), and p, hence the confidence the ECE bins use, by at most 0.025 % relative. Up to
``FULL_CLASSES`` classes every class is kept; above, the ``TOP_K`` most probable ones and the
mean probability of the rest, which stands for any class outside the top k (the NLL of such a
label is then an estimate: docs/server.md). The predicted class is stored as given, so
accuracy is exact.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import struct
from dataclasses import dataclass

import numpy as np

FORMAT = 1
FULL_CLASSES = 32  # up to this many classes the whole probability vector is kept
TOP_K = 16  # above it: the k most probable classes and the mean of the rest
Q_SCALE = 2048.0  # -ln p in steps of 1/2048
Q_MAX = 65535  # p >= exp(-65535 / 2048) ~ 1.3e-14
MAC_BYTES = 16
NONCE_BYTES = 8
# sdde-serve before signed ids issued uuid4 hex ids: answered "unknown", not refused
LEGACY_ID = re.compile(r"^[0-9a-f]{32}$")
_HEAD = struct.Struct(">BI8sBHH")  # format, issued, nonce, flags, predicted, n_classes


class TokenError(ValueError):
    """An id that is not a prediction id this deployment issued (the message says why)."""


@dataclass(frozen=True, slots=True)
class PredictionRecord:
    model: str
    version: str
    issued: int  # unix seconds
    nonce: bytes  # the id's identity for duplicate detection
    predicted: int
    is_ood: bool
    probs: np.ndarray  # [n_classes] float64, dequantised (the rest's mean outside the top k)


def quantise(probs: np.ndarray) -> np.ndarray:
    """``round(-ln p * Q_SCALE)`` as uint16, saturating at ``Q_MAX``."""
    neg_log = -np.log(np.clip(np.asarray(probs, np.float64), np.exp(-Q_MAX / Q_SCALE), 1.0))
    return np.minimum(np.rint(neg_log * Q_SCALE), Q_MAX).astype(">u2")


def dequantise(q: np.ndarray) -> np.ndarray:
    return np.exp(-q.astype(np.float64) / Q_SCALE)


def _text(value: str) -> bytes:
    raw = value.encode()
    if len(raw) > 255:
        raise ValueError(f"{value[:40]!r}...: over 255 bytes, too long for a prediction id")
    return bytes([len(raw)]) + raw


def probs_blocks(probs: np.ndarray) -> list[bytes]:
    """Each row's probability block (whole batch quantised at once: ~1 µs per image)."""
    n, classes = probs.shape
    if classes <= FULL_CLASSES:
        q = quantise(probs)
        return [b"\x00" + row.tobytes() for row in q]
    top = np.argsort(-probs, axis=1, kind="stable")[:, :TOP_K]
    top_p = np.take_along_axis(probs.astype(np.float64), top, axis=1)
    rest = np.maximum(1.0 - top_p.sum(axis=1), 0.0) / (classes - TOP_K)
    pairs = np.empty((n, TOP_K, 2), ">u2")
    pairs[:, :, 0], pairs[:, :, 1] = top, quantise(top_p)
    rest_q = quantise(rest)
    return [b"\x01" + pairs[i].tobytes() + rest_q[i : i + 1].tobytes() for i in range(n)]


class Signer:
    """Issues and verifies prediction ids with one secret (shared by every worker and replica)."""

    def __init__(self, secret: bytes) -> None:
        if not secret:
            raise ValueError("empty feedback secret")
        self._key = secret

    def _mac(self, record: bytes) -> bytes:
        return hmac.new(self._key, record, hashlib.sha256).digest()[:MAC_BYTES]

    def issue(
        self,
        model: str,
        version: str,
        issued: float,
        nonces: list[bytes],
        flags: list[bool],
        probs: np.ndarray,
    ) -> list[str]:
        """One id per row of ``probs`` ([N, L] calibrated; the predicted class is the argmax)."""
        probs = np.asarray(probs)
        names = _text(model) + _text(version)
        ids = []
        for nonce, flag, c, block in zip(
            nonces, flags, probs.argmax(axis=1).tolist(), probs_blocks(probs), strict=True
        ):
            head = _HEAD.pack(FORMAT, int(issued), nonce, int(flag), c, probs.shape[1])
            record = head + names + block
            ids.append(base64.urlsafe_b64encode(record + self._mac(record)).rstrip(b"=").decode())
        return ids

    def verify(self, token: str) -> PredictionRecord:
        """The record ``token`` carries; :class:`TokenError` when it was not signed here."""
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (binascii.Error, ValueError):
            raise TokenError("malformed: not base64url") from None
        record, mac = raw[:-MAC_BYTES], raw[-MAC_BYTES:]
        if len(record) < _HEAD.size:
            raise TokenError("malformed: too short")
        if not hmac.compare_digest(mac, self._mac(record)):
            raise TokenError(
                "signature mismatch: altered, or issued by a server with another feedback secret"
            )
        try:
            return _parse(record)
        except (struct.error, IndexError, UnicodeDecodeError, ValueError) as exc:
            raise TokenError(f"malformed record ({exc})") from None  # signed, yet unreadable


def _parse(record: bytes) -> PredictionRecord:
    fmt, issued, nonce, flags, predicted, n = _HEAD.unpack_from(record)
    if fmt != FORMAT:
        raise ValueError(f"unknown format {fmt}")
    at = _HEAD.size
    texts = []
    for _ in range(2):
        size = record[at]
        texts.append(record[at + 1 : at + 1 + size].decode())
        at += 1 + size
    kind, body = record[at], record[at + 1 :]
    if kind == 0:
        probs = dequantise(np.frombuffer(body, ">u2", count=n))
    else:
        pairs = np.frombuffer(body, ">u2", count=2 * TOP_K).reshape(TOP_K, 2)
        rest = np.frombuffer(body, ">u2", count=1, offset=4 * TOP_K)
        probs = np.full(n, dequantise(rest)[0])
        probs[pairs[:, 0]] = dequantise(pairs[:, 1])
    if not 0 <= predicted < n:
        raise ValueError(f"predicted class {predicted} of {n}")
    return PredictionRecord(texts[0], texts[1], issued, nonce, predicted, bool(flags & 1), probs)
