#!/usr/bin/env python
"""Train M2R2 accelerator adapters: the same code as `m2r2-moe train-adapters`.

    python tools/train_accelerator.py --model builtin --text builtin:train --lookahead 4 --rank 16 \
        --out m2r2_moe/builtin/tiny-mixtral/adapters.safetensors
"""

import sys

from m2r2_moe.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-adapters", *sys.argv[1:]]))
