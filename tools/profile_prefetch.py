#!/usr/bin/env python
"""Expert-switch stall profiler: the same code as `m2r2-moe profile` (see `--help`).

    python tools/profile_prefetch.py --json out/profile.json --trace out/trace.json --plots out/
"""

import sys

from m2r2_moe.cli import main

if __name__ == "__main__":
    sys.exit(main(["profile", *sys.argv[1:]]))
