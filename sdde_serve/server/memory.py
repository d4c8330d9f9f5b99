"""Return freed request memory to the operating system (glibc's allocator).

glibc serves allocations above ``M_MMAP_THRESHOLD`` with ``mmap`` and gives them back on ``free``,
but it *raises* that threshold to the size of every such block freed (up to 32 MB), after which
blocks of that size come from the heap and are kept. A server that decodes an image of a few
megabytes in each of its decode threads thus keeps a few copies of that size per thread arena, and
the resident set grows request after request (measured in ``benchmarks/hostile_requests.py``:
+102 MB after the corpus with the dynamic threshold, +64 MB with a fixed one). Fixing the threshold
keeps image buffers mmapped (returned at once) and the peak at what one request needs.

The same can be set from the environment (``MALLOC_MMAP_THRESHOLD_=131072``,
``MALLOC_ARENA_MAX=2``); this does it for every ``sdde serve`` so no deployment can forget it.
On other C libraries (musl, macOS) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("sdde.server")

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's initial value, now kept fixed
TRIM_THRESHOLD_BYTES = 4 * 1024 * 1024
ARENA_MAX = 2


def bound_allocator() -> bool:
    """Fix glibc's mmap threshold, trim threshold and arena count; False where not glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = all(
        mallopt(param, value) == 1
        for param, value in (
            (M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES),
            (M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
            (M_ARENA_MAX, ARENA_MAX),
        )
    )
    if not ok:
        log.debug("mallopt refused a setting; allocator left as it was")
    return ok
