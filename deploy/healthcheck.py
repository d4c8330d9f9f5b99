"""Container health check: exit 0 when the server's /v2/health/ready answers 200.

Used by the images' HEALTHCHECK (docker, compose). Standard library only, so it works in any
image with Python; the port follows SDDE_PORT like the server does.
"""

import os
import sys
import urllib.error
import urllib.request

port = os.environ.get("SDDE_PORT", "8000")
url = f"http://127.0.0.1:{port}/v2/health/ready"
try:
    with urllib.request.urlopen(url, timeout=2):
        sys.exit(0)  # urlopen raises on every non-2xx status
except (urllib.error.URLError, OSError, ValueError) as exc:
    print(f"not ready: {url}: {exc}", file=sys.stderr)
    sys.exit(1)
