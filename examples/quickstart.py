"""Offload the built-in MoE model's experts, generate, look at the expert traffic, put it back.

    python examples/quickstart.py
"""

import torch

import m2r2_moe

model, tokenizer = m2r2_moe.load_builtin(dtype=torch.float32)
inputs = tokenizer("import os\n\ndef list_files(path):\n", return_tensors="pt")

# 16 expert slots for 64 experts; on CPU the host->device link is emulated at 1 GB/s
m2r2_moe.offload(model, device="cpu", cache_experts=16, predictor="m2r2", link_gbps=1.0)
out = model.generate(**inputs, max_new_tokens=40, do_sample=False)
print(tokenizer.decode(out[0, inputs.input_ids.shape[1]:]))
print(m2r2_moe.stats(model))
m2r2_moe.remove_offload(model)
