"""`m2r2-moe serve`: an offloaded model behind a small OpenAI-compatible HTTP server.

    m2r2-moe serve                                    # the built-in model on 127.0.0.1:8000
    m2r2-moe serve --model CHECKPOINT --device cuda --gpu-memory 4GiB --warm-start profile.json --port 8080

POST /v1/completions (stream: true for server-sent events), GET /health, /v1/models, /stats. One generation at a
time, at most --max-queue requests waiting (429 beyond). SIGTERM or Ctrl-C: stops accepting, cancels what runs,
writes --save-profile, gives the model's memory back and exits 0.
"""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path

from ..cli_common import (BUDGET_HELP, UsageError, add_model_argument, check_device, existing_file, link_gbps, memory,
                          nonnegative_int, positive_int)
from ..config import MIN_LINK_GBPS


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve a model (the built-in one by default) over an OpenAI-compatible HTTP API",
                       description=__doc__)
    add_model_argument(p)
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available, else cpu)")
    p.add_argument("--cache-experts", type=positive_int, default=None,
                   help="device expert slots (default: half of the experts, or what --gpu-memory holds)")
    p.add_argument("--gpu-memory", type=memory, default=None,
                   help=f"device memory the runtime may use ({BUDGET_HELP}); slots are derived from it")
    p.add_argument("--host-memory", type=memory, default=None,
                   help=f"host memory the expert store may use ({BUDGET_HELP}); decides pinning and the disk tier")
    p.add_argument("--unified-memory", choices=["auto", "yes", "no"], default="auto",
                   help="whether the GPU shares the host's memory (auto: ask the device)")
    p.add_argument("--context-length", type=nonnegative_int, default=4096,
                   help="tokens of KV cache reserved when sizing from --gpu-memory")
    p.add_argument("--predictor", default="auto", choices=["auto", "none", "history", "gate", "m2r2"],
                   help="what drives prefetching (auto: m2r2 when --adapters is given or the model ships adapters)")
    p.add_argument("--adapters", type=existing_file, default=None, help="adapters file for --predictor m2r2")
    p.add_argument("--warm-start", type=existing_file, default=None,
                   help="a profile (m2r2_moe.save_profile, or --save-profile of an earlier run) to start warm from")
    p.add_argument("--save-profile", default=None, help="write this run's profile here on shutdown (default: none)")
    p.add_argument("--link-gbps", type=link_gbps, default=None,
                   help=f"CPU only: emulate a host-to-device link of this many GB/s (at least {MIN_LINK_GBPS:g}; "
                        "default: none)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights' dtype")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=nonnegative_int, default=8000, help="port to listen on (0: any free one)")
    p.add_argument("--max-queue", type=nonnegative_int, default=8, help="requests that may wait for the model")
    p.add_argument("--max-tokens", type=positive_int, default=512, help="the most max_tokens a request may ask for")
    p.set_defaults(func=run)


def check(args: argparse.Namespace) -> tuple[Path, str]:
    """(checkpoint folder, served name), refusing before any work what cannot be served."""
    from ..builtin import builtin_model_path, resolve_name
    from ..loading import TOKENIZER_FILES, is_builtin

    check_device(args.device)
    if args.model == "random":
        raise UsageError("--model random has no tokenizer to serve text with: use --model builtin, builtin:NAME or a "
                         "checkpoint folder with its tokenizer files")
    builtin = is_builtin(args.model)
    path = Path(builtin_model_path(resolve_name(args.model)) if builtin else args.model)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise UsageError(f"--model {args.model} has no tokenizer files to serve text with")
    if (args.gpu_memory is not None or args.host_memory is not None) and args.cache_experts is not None:
        raise UsageError("--cache-experts and --gpu-memory/--host-memory both size the device slots: give one")
    return path, resolve_name(args.model) if builtin else path.name


def load(args: argparse.Namespace, path: Path, name: str):
    """(model offloaded, tokenizer) for the command line's options; nothing is served yet."""
    import m2r2_moe
    from transformers import AutoTokenizer

    from ..builtin import builtin_adapters_path
    from ..loading import is_builtin

    predictor = args.predictor
    if predictor == "auto":
        shipped = is_builtin(args.model) and builtin_adapters_path(name) is not None
        predictor = "m2r2" if args.adapters or shipped else "none"
    budgets = args.gpu_memory is not None or args.host_memory is not None
    model = m2r2_moe.from_pretrained(
        path, device=args.device, cache_experts="auto" if budgets else args.cache_experts, dtype=args.dtype,
        predictor=predictor, adapters=args.adapters, context_length=args.context_length, progress=False,
        gpu_memory=args.gpu_memory, host_memory=args.host_memory, warm_start=args.warm_start,
        unified_memory={"auto": None, "yes": True, "no": False}[args.unified_memory],
        link_gbps=args.link_gbps if check_device(args.device).type == "cpu" else None)
    return model, AutoTokenizer.from_pretrained(path)


def run(args: argparse.Namespace) -> int:
    """Load, serve until SIGTERM / SIGINT, shut down cleanly."""
    import m2r2_moe

    from ..attach import warm_of
    from .server import CompletionServer
    from .worker import ModelWorker

    path, name = check(args)
    try:
        server = CompletionServer((args.host, args.port), name, args.max_tokens)
    except OSError as e:
        raise UsageError(f"--host/--port: cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    try:
        model, tokenizer = load(args, path, name)
    except BaseException:
        server.server_close()
        raise
    offloader = m2r2_moe.get_offloader(model)
    plan = m2r2_moe.memory_plan(model)
    line = plan.summary() if plan is not None else f"{offloader.num_slots} expert slots on {offloader.device}"
    info = lambda: {"runtime": offloader.stats.copy().as_dict(), "slots": offloader.num_slots,  # noqa: E731
                    "memory_plan": line, "warm_start": warm_of(model).info()}
    worker = ModelWorker(model, tokenizer, args.max_queue)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    context = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    thread = threading.Thread(target=server.serve, args=(worker, context, info), name="m2r2-serve-http")
    thread.start()
    host, port = server.server_address[:2]
    print(f"m2r2-moe serve: {name}: {line}", flush=True)
    print(f"m2r2-moe serve: listening on http://{host}:{port} (POST /v1/completions; Ctrl-C to stop)", flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        requests = _shutdown(server, thread, worker, model, args.save_profile)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    # ours (m2r2-*), and any non-daemon thread that would keep the process alive; libraries' daemons do not count
    left = [t.name for t in threading.enumerate()
            if t is not threading.main_thread() and (t.name.startswith("m2r2") or not t.daemon)]
    released = not getattr(offloader.store, "buffers", None)
    print(f"m2r2-moe serve: stopped after {requests} requests; threads left: {', '.join(left) or 'none'}; expert "
          f"store {'released' if released else 'NOT released'}", flush=True)
    return 0 if not left and released else 1


def _shutdown(server, thread, worker, model, profile_path) -> int:
    """Stop accepting, cancel the running and waiting jobs, end every connection, write the profile, give the
    model's memory back. Returns how many requests were served."""
    import m2r2_moe

    server.shutdown()
    thread.join()
    worker.close()
    server.close_connections()
    server.server_close()  # joins every handler thread
    requests = server.stats()["server"]["requests"]
    try:
        if profile_path is not None:
            m2r2_moe.save_profile(model, profile_path)
            print(f"m2r2-moe serve: profile written to {profile_path}", flush=True)
    finally:
        m2r2_moe.remove_offload(model)  # the copy engine's thread, the store's (pinned) memory, the slots
    return requests
