#!/usr/bin/env python3
"""Container health check (Docker HEALTHCHECK): exit 0 when healthy, 1 otherwise. Standard library only.

    healthcheck.py            the API server: GET /health (the process answers) and /ready (models loaded,
                              storage open) on 127.0.0.1:$FR_PORT (default 8000)
    healthcheck.py --triton   Triton: GET /v2/health/ready on 127.0.0.1:$TRITON_HTTP_PORT (default 8000)

Kubernetes uses its own probes instead (liveness /health, readiness /ready; see deploy/k8s).
"""
from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=4) as response:  # noqa: S310 - a fixed local URL
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def main(argv: list[str]) -> int:
    if "--triton" in argv:
        port = os.environ.get("TRITON_HTTP_PORT", "8000")
        paths = ["/v2/health/ready"]
    else:
        port = os.environ.get("FR_PORT", "8000")
        paths = ["/health", "/ready"]
    for path in paths:
        if not ok(f"http://127.0.0.1:{port}{path}"):
            print(f"unhealthy: {path} on port {port}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
