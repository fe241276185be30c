"""The container's health check: exit 0 when this replica is ready, 1 otherwise.

`python3 -m app.healthcheck` (the images have no curl). An argument-free command also avoids
podman's re-splitting of health check arguments that contain spaces.
"""

from __future__ import annotations

import os
import sys
import urllib.request


def main() -> int:
    port = os.environ.get("BIND", "0.0.0.0:8000").rpartition(":")[2] or "8000"
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
            return 0 if response.status == 200 else 1
    except OSError as exc:
        print(f"not ready: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
