"""The server's domain errors: what went wrong, in the service's words, with no HTTP status.

The repository service and the request-option parsing raise these; ``errors.py`` maps each to
its status in one table (:data:`sdde_serve.server.errors.STATUS`), so no domain code picks a
status code and a caller outside HTTP (the poller, the worker sync) catches them by meaning.
"""

from __future__ import annotations

from sdde_serve.server.batcher import Unavailable


class NotReady(Unavailable):
    """Nothing serves the model yet (loading, or no version of it loads): retry soon."""

    retry_after = 2


class UnknownModel(LookupError):
    """No such model or version, or it is not loaded (unloaded through the API)."""


class Refused(ValueError):
    """A request the service understood but will not carry out (which model? no repository to
    load from; the serving version asked to shadow itself)."""


class LoadFailed(Exception):
    """A version could not be loaded, verified or warmed up (the message says why)."""


class BadParameter(ValueError):
    """A request parameter whose value is outside its type or range."""
