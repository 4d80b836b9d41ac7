"""``python -m benchmarks.client``: the same as ``qwen-edit bench``."""

from __future__ import annotations

import sys

from benchmarks.client.cli import main

if __name__ == "__main__":
    sys.exit(main())
