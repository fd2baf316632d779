"""Peak host RSS and time of loading a checkpoint: m2r2_moe.from_pretrained vs load-then-offload.

Writes a synthetic sharded bf16 checkpoint with Mixtral's on-disk names (a scaled-down Mixtral: hidden 512,
8 experts, 8 layers; a few hundred MB) to a temporary folder, then loads it in fresh subprocesses, one
method per process, in interleaved rounds: `m2r2_moe.from_pretrained` (RAM and disk expert store),
`AutoModelForCausalLM.from_pretrained` + `m2r2_moe.offload`, and the plain transformers load. Peak RSS is
the kernel's high-water mark (VmHWM, reset through /proc/self/clear_refs after imports and a warm-up
that imports the modeling code), minus the RSS at that point, as a multiple of the checkpoint's bytes.
The page cache is warmed first, so times compare CPU work, not the disk. Prints a table, appends it to
BENCHMARKS.md, deletes the checkpoint.

    python benchmarks/load_rss.py [--hidden 512] [--intermediate 1024] [--layers 8] [--experts 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import ROOT, append_section, markdown_table  # noqa: E402

SHARD_BYTES = 40 * 10**6

PROBE = r"""
import json, sys, time, psutil, torch
import m2r2_moe
from transformers import AutoConfig, AutoModelForCausalLM
path, method, slots = sys.argv[1], sys.argv[2], int(sys.argv[3])
with torch.device("meta"):  # warm-up: import the modeling code (both paths need it; not the load's memory)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
fmt = method.split()[-1] if method.split()[-1] in ("int8", "int4") else "model"
if fmt != "model":  # the quantizer's import is not the load's memory either
    from m2r2_moe.runtime.compressed import codec
    codec.quant_primitives()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM: from here on it is this load's peak
before = psutil.Process().memory_info().rss
anon_before = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("RssAnon"))
start = time.perf_counter()
if method.startswith("m2r2_moe"):
    store = "disk" if method.endswith("disk") else "ram"
    model = m2r2_moe.from_pretrained(path, device="cpu", cache_experts=slots, expert_store=store, progress=False,
                                     expert_format=fmt)
else:
    model = AutoModelForCausalLM.from_pretrained(path)
    if method == "load+offload":
        m2r2_moe.offload(model, device="cpu", cache_experts=slots)
seconds = time.perf_counter() - start
status = {l.split(":")[0]: int(l.split()[1]) * 1024 for l in open("/proc/self/status")
          if l.startswith(("VmHWM", "RssAnon"))}
print(json.dumps({"seconds": seconds, "peak": status["VmHWM"] - before, "anon": status["RssAnon"] - anon_before,
                  "after": psutil.Process().memory_info().rss - before}))
"""

METHODS = ["m2r2_moe.from_pretrained", "m2r2_moe.from_pretrained disk", "load+offload", "transformers only"]


def write_checkpoint(path: Path, hidden: int, inter: int, layers: int, experts: int, vocab: int = 8000) -> int:
    """A sharded bf16 Mixtral checkpoint of random weights, names as save_pretrained writes them."""
    heads, kv_heads = 8, 2
    head_dim = hidden // heads
    config = dict(model_type="mixtral", architectures=["MixtralForCausalLM"], vocab_size=vocab, hidden_size=hidden,
                  intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv_heads, num_local_experts=experts, num_experts_per_tok=2,
                  max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False, dtype="bfloat16")
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden)}
    for l in range(layers):
        p = f"model.layers.{l}."
        shapes |= {p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
                   p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                   p + "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
                   p + "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
                   p + "block_sparse_moe.gate.weight": (experts, hidden)}
        for e in range(experts):
            q = f"{p}block_sparse_moe.experts.{e}."
            shapes |= {q + "w1.weight": (inter, hidden), q + "w3.weight": (inter, hidden),
                       q + "w2.weight": (hidden, inter)}
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    gen = torch.Generator().manual_seed(0)
    shards, current, size = [], {}, 0
    for name, shape in shapes.items():
        t = torch.randn(shape, generator=gen).mul_(0.02).to(torch.bfloat16)
        if name.endswith("norm.weight"):
            t = torch.ones(shape, dtype=torch.bfloat16)
        current[name], size = t, size + t.numel() * 2
        if size >= SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
    shards += [current] if current else []
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, path / file, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(shard, file)
        total += sum(t.numel() * 2 for t in shard.values())
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))
    return total


def measure(path: Path, method: str, slots: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", PROBE, str(path), method, str(slots)], capture_output=True, text=True,
                         env=env, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"{method} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--slots", type=int, default=8, help="device slots (on CPU: the slot pool is host memory too)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--expert-formats", default="",
                        help="also m2r2_moe.from_pretrained with these compressed formats, e.g. int8,int4")
    parser.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    args = parser.parse_args()
    methods = METHODS + [f"m2r2_moe.from_pretrained {f}" for f in args.expert_formats.split(",") if f]
    if not Path("/proc/self/clear_refs").exists():
        sys.exit("needs Linux (/proc/self/clear_refs and VmHWM)")
    folder = Path(tempfile.mkdtemp(prefix="m2r2_load_rss_"))
    try:
        ckpt = folder / "ckpt"
        nbytes = write_checkpoint(ckpt, args.hidden, args.intermediate, args.layers, args.experts)
        for f in ckpt.iterdir():  # warm the page cache: every method reads from memory, not the disk
            f.read_bytes()
        results = {m: [] for m in methods}
        for _ in range(args.rounds):
            for method in methods:
                results[method].append(measure(ckpt, method, args.slots))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    expert_bytes = 3 * args.hidden * args.intermediate * 2
    pool = args.slots * expert_bytes
    base = statistics.median(r["seconds"] for r in results["transformers only"])
    rows = []
    for method in methods:
        peak = max(r["peak"] for r in results[method])
        secs = statistics.median(r["seconds"] for r in results[method])
        after = statistics.median(r["after"] for r in results[method])
        anon = statistics.median(r["anon"] for r in results[method])
        rows.append([method, f"{peak / 1e6:,.0f}", f"{peak / nbytes:.2f}x", f"{after / 1e6:,.0f}", f"{anon / 1e6:,.0f}",
                     f"{secs:.2f}", f"{secs / base:.2f}"])
    table = markdown_table(["method", "peak RSS growth MB", "x checkpoint", "RSS after MB", "anon RSS after MB",
                            "load s", "time vs transformers"], rows)
    extra = (f"\nSynthetic Mixtral-geometry checkpoint: hidden {args.hidden}, intermediate {args.intermediate}, "
             f"{args.layers} layers x {args.experts} experts, bf16, {nbytes / 1e6:,.0f} MB in "
             f"{SHARD_BYTES // 10**6} MB shards, page cache warm; device cpu with {args.slots} slots "
             f"({pool / 1e6:.0f} MB slot pool, host memory on CPU, included in every offloaded row). Peak = VmHWM "
             f"after imports (max of {args.rounds} rounds), time = median. RSS counts file-backed pages too: "
             "transformers reads the shards through mmap, so part of its RSS is page cache the kernel can "
             "reclaim; 'anon RSS after' is the anonymous (non-reclaimable) part once loaded. Target: "
             "from_pretrained <= 1.15x, vs ~2x for load-then-offload.\n")
    print(table + "\n" + extra)
    if not args.no_record:
        title = "Checkpoint load: peak RSS and time (benchmarks/load_rss.py)"
        print(f"appended to {append_section(title, table + chr(10) + extra)}")


if __name__ == "__main__":
    main()
