"""An app that embeds m2r2_moe in-process: a memory budget in one argument, a warm start, tokens streamed to the
terminal as they come, the runtime's statistics at the end.

    python examples/edge_app.py                                   # the built-in model in a 16 MB device budget
    python examples/edge_app.py --prompt "class Stack:" --gpu-memory 24MB --device cuda

The first run starts cold and writes what it learned (which experts each layer uses, what the prefetcher
calibrated) to --profile when it exits; every later run starts warm from that file: the likeliest experts are
copied into the device slots in the background while the prompt is read.
"""

import argparse
import threading
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, TextIteratorStreamer

import m2r2_moe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-mixtral", help="a built-in model's name")
    parser.add_argument("--prompt", default="import os\n\ndef list_files(path):\n")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--device", default="cpu", help="cpu (an emulated device) or cuda")
    parser.add_argument("--gpu-memory", default="16MB", help="device memory the model may use: weights, KV, slots")
    parser.add_argument("--host-memory", default=None, help="host memory the expert store may use (default: free)")
    parser.add_argument("--profile", default="edge_app_profile.json", help="warm-start file, read and rewritten")
    args = parser.parse_args()

    path = m2r2_moe.builtin_model_path(args.model)
    warm = args.profile if Path(args.profile).is_file() else None
    start = time.perf_counter()
    model = m2r2_moe.from_pretrained(path, device=args.device, dtype=torch.float32, gpu_memory=args.gpu_memory,
                                     host_memory=args.host_memory, context_length=512, predictor="m2r2",
                                     warm_start=warm, progress=False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    print(f"m2r2_moe: {m2r2_moe.memory_plan(model).summary()}")
    print(f"loaded in {time.perf_counter() - start:.2f} s, {'warm from ' + warm if warm else 'cold'}\n")

    inputs = tokenizer(args.prompt, return_tensors="pt").to(args.device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    generation = threading.Thread(target=model.generate, kwargs=dict(
        **inputs, streamer=streamer, max_new_tokens=args.max_new_tokens, do_sample=False,
        pad_token_id=tokenizer.pad_token_id or 0))
    asked, first = time.perf_counter(), None
    generation.start()
    print(args.prompt, end="", flush=True)
    for text in streamer:  # the text of each new token, as generate makes it
        first = first or time.perf_counter()
        print(text, end="", flush=True)
    generation.join()
    done = time.perf_counter()

    stats = m2r2_moe.stats(model)
    print(f"\n\nfirst token after {(first or done) - asked:.3f} s; {stats.tokens} token positions in "
          f"{done - asked:.2f} s")
    print(stats)
    m2r2_moe.save_profile(model, args.profile)
    print(f"profile written to {args.profile}: the next run starts warm")
    m2r2_moe.remove_offload(model)


if __name__ == "__main__":
    main()
