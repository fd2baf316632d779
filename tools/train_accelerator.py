#!/usr/bin/env python
"""Train M2R2 accelerators (linear adapters and nonlinear heads): the same code as `m2r2-moe train-adapters`.

The shipped adapters of the built-in models are made with

    python tools/train_accelerator.py --model builtin:tiny-mixtral --lookahead auto --rank 16 \
        --file-dtype bfloat16 --out m2r2_moe/builtin/tiny-mixtral/adapters.safetensors
    python tools/train_accelerator.py --model builtin:tiny-qwen3-moe --lookahead auto --rank 16 \
        --file-dtype bfloat16 --out m2r2_moe/builtin/tiny-qwen3-moe/adapters.safetensors

(`--lookahead auto`: every distance within the model, at most 8: 7 and 8 layers ahead; the runtime uses the
nearest 4 unless told `lookahead=N`).
"""

import sys

from m2r2_moe.cli import main

if __name__ == "__main__":
    sys.exit(main(["train-adapters", *sys.argv[1:]]))
