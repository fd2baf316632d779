"""Train a built-in tiny MoE model on CPU, on a corpus of Python sources every machine has.

The result is a normal Hugging Face checkpoint (bf16 safetensors + tokenizer files) with a model card
(MODEL_CARD.md + card.json + figures), written by default to m2r2_moe/builtin/<preset>/. Presets:

- `tiny-mixtral` (the default): Mixtral, 8 layers x 8 experts, top-2, on the Python standard library;
- `tiny-qwen3-moe`: fine-grained Qwen3-MoE, 12 layers x 32 experts, top-4 (`norm_topk_prob`), on the
  Python sources of the installed torch package.

    python tools/train_tiny_moe.py                            # tiny-mixtral (~30 min on one busy CPU thread)
    python tools/train_tiny_moe.py --preset tiny-qwen3-moe    # tiny-qwen3-moe (~40 min)
    python tools/train_tiny_moe.py --dry-run                  # a few steps into /tmp, to check the pipeline

Any size or corpus flag overrides the preset (`--arch`, `--corpus`, `--layers`, `--experts`, ...).

Corpus and split: m2r2_moe/corpus.py (one split for training, adapters and benchmarks). A file is held out
when the first hex digit of sha256(relative path) is 0 (1/16 of files, independent of content, stable across
machines). The tokenizer (byte-level BPE) is trained on the train split only.

Router balancing loss: the Switch-Transformer loss is computed PER LAYER and averaged over layers.
transformers' `load_balancing_loss_func` concatenates all layers first, which balances expert index
e summed over layers and lets single layers collapse (transformers #28255, #31464).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("RAYON_RS_NUM_CPUS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from m2r2_moe.corpus import corpus_files, get_corpus, is_heldout  # noqa: E402  (one split for everything)
from tiny_moe_card import plot_loss, plot_routing, write_card  # noqa: E402
from tiny_moe_eval import (  # noqa: E402
    RouterTap, byte_unigram_bits, check_sequences, chunk_stream, eval_loss, expert_usage, generate_samples,
    heldout_without, lm_loss, near_duplication, package_texts, routing_mi, routing_on, unigram_nats,
)

BUILTIN_DIR = REPO / "m2r2_moe" / "builtin"
EOS = "<|endoftext|>"
ARCH_CLASSES = {"mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
PRESETS = {
    "tiny-mixtral": {
        "intro": (
            "A `MixtralForCausalLM` trained from scratch on CPU on the Python standard library's source code, so\n"
            "that m2r2_moe has a model with *learned* (input-dependent, per-layer balanced) routing to demo, profile\n"
            "and benchmark expert prediction on. It writes plausible-looking Python, nothing more."),
        "prompts": ["import os\n\n\ndef ", "class Queue:\n    def __init__(self", '"""Utilities for '],
        # Generated English documentation (pydoc topics), not code: the card also reports held-out loss without it.
        "prose_files": ["pydoc_data/topics.py"],
        "compare_packages": [],
    },
    "tiny-qwen3-moe": {
        "arch": "qwen3_moe", "corpus": "torch", "layers": 12, "experts": 32, "top_k": 4, "hidden": 128,
        "intermediate": 64, "heads": 4, "kv_heads": 2, "steps": 1200, "warmup": 100,
        "intro": (
            "A fine-grained `Qwen3MoeForCausalLM` trained from scratch on CPU on the Python sources of the installed\n"
            "torch package: many small experts per layer and top-4 routing with renormalised top-k weights\n"
            "(`norm_topk_prob`), the shape of current MoEs (Qwen3-MoE, DeepSeek, OLMoE), unlike tiny-mixtral's\n"
            "8 large experts. m2r2_moe checks its speed and accuracy targets on both built-in models. It writes\n"
            "plausible-looking PyTorch code, nothing more."),
        "prompts": ["import torch\n\n\ndef ", "class Linear(Module):\n    def __init__(self", '"""Utilities for '],
        "prose_files": ["_torch_docs.py", "_tensor_docs.py", "_storage_docs.py", "_size_docs.py",
                        "sparse/_triton_ops_meta.py"],  # documentation strings, and a generated table of numbers
        "compare_packages": ["torch", "transformers"],
    },
}


# ----------------------------------------------------------------------------------------------
# corpus and split


def read_corpus(root: Path, rels: list[str]) -> tuple[dict[str, str], str]:
    """Texts by relative path, and sha256 over (path, bytes) of the whole corpus in path order."""
    texts, h = {}, hashlib.sha256()
    for rel in rels:
        raw = (root / rel).read_bytes()
        h.update(rel.encode() + b"\0" + raw + b"\0")
        texts[rel] = raw.decode("utf-8", errors="replace")
    return texts, h.hexdigest()


# ----------------------------------------------------------------------------------------------
# tokenizer


def train_tokenizer(train_texts: list[str], vocab_size: int):
    """Byte-level BPE trained on the train split only, wrapped as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(train_texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=EOS,
        model_max_length=2048,
    )


def encode_split(tokenizer, texts: list[str]) -> np.ndarray:
    """One token stream: each file's tokens followed by EOS."""
    eos = tokenizer.convert_tokens_to_ids(EOS)
    out = []
    for enc in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False):
        out.extend(enc.ids)
        out.append(eos)
    return np.asarray(out, dtype=np.int32)


# ----------------------------------------------------------------------------------------------
# model and losses


def build_model(args, tokenizer):
    """A randomly initialised model of `args.arch`, seeded by `args.seed`."""
    eos = tokenizer.convert_tokens_to_ids(EOS)
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        num_experts_per_tok=args.top_k,
        max_position_embeddings=args.max_positions,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
        router_aux_loss_coef=args.aux_coef,
        tie_word_embeddings=False,
    )
    if args.arch == "mixtral":
        from transformers import MixtralConfig, MixtralForCausalLM

        config, cls = MixtralConfig(intermediate_size=args.intermediate, num_local_experts=args.experts, **common), MixtralForCausalLM
    else:
        from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

        # Every layer is sparse; intermediate_size (dense layers only) is set to the active expert width.
        config = Qwen3MoeConfig(
            moe_intermediate_size=args.intermediate, intermediate_size=args.intermediate * args.top_k,
            num_experts=args.experts, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], **common,
        )
        cls = Qwen3MoeForCausalLM
    torch.manual_seed(args.seed)
    return cls(config)


def per_layer_balance_loss(router_logits: list[torch.Tensor], top_k: int) -> torch.Tensor:
    """Switch balancing loss E * sum_e f_e * P_e for each layer separately, averaged over layers.

    router_logits: L tensors [N, E]. f_e: share of the N*k routing choices that went to e (no grad);
    P_e: mean router probability of e. Minimum 1.0 (uniform), maximum E (collapse).
    """
    losses = []
    for logits in router_logits:  # [N, E]
        probs = logits.float().softmax(-1)  # [N, E]
        num_experts = probs.shape[-1]
        chosen = probs.topk(top_k, dim=-1).indices  # [N, k]
        f = F.one_hot(chosen, num_experts).float().mean(dim=(0, 1))  # [E]
        losses.append(num_experts * (f * probs.mean(0)).sum())
    return torch.stack(losses).mean()


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# ----------------------------------------------------------------------------------------------
# training


def sample_batch(stream: np.ndarray, rng: np.random.Generator, batch: int, seq_len: int) -> torch.Tensor:
    starts = rng.integers(0, len(stream) - seq_len, size=batch)
    return torch.from_numpy(np.stack([stream[s : s + seq_len] for s in starts]).astype(np.int64))


def train(model, train_stream, heldout_probe, args) -> list[dict]:
    """AdamW with warmup + cosine decay; returns the loss log (one dict per logged step)."""
    rng = np.random.default_rng(args.seed)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "norm" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95),
    )
    tap = RouterTap(model)
    model.train()
    log, t0, cpu0 = [], time.time(), time.process_time()
    bar = tqdm(range(args.steps), desc="train", dynamic_ncols=True, mininterval=5)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        ids = sample_batch(train_stream, rng, args.batch, args.seq_len)
        logits = model(input_ids=ids, use_cache=False).logits
        loss_lm = lm_loss(logits, ids)
        loss_aux = per_layer_balance_loss(tap.pop(), args.top_k)
        loss = loss_lm + args.aux_coef * loss_aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        entry = {"step": step + 1, "train": loss_lm.item(), "aux": loss_aux.item(), "time": time.time() - t0,
                 "cpu": time.process_time() - cpu0}  # CPU time of this process: wall time grows on a busy machine
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            tap.remove()
            entry["heldout"] = eval_loss(model, heldout_probe, args.batch)
            tap = RouterTap(model)
        log.append(entry)
        bar.set_postfix(lm=f"{entry['train']:.3f}", aux=f"{entry['aux']:.3f}", refresh=False)
    tap.remove()
    return log


# ----------------------------------------------------------------------------------------------
# arguments


def parse_args(argv=None):
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", choices=list(PRESETS), default="tiny-mixtral")
    preset = pre.parse_known_args(argv)[0].preset
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=list(PRESETS), default="tiny-mixtral",
                   help="model to train: sets every default below (flags override it)")
    p.add_argument("--arch", choices=list(ARCH_CLASSES), default="mixtral")
    p.add_argument("--corpus", default="stdlib", help="a corpus of m2r2_moe/corpus.py (stdlib, torch)")
    p.add_argument("--out", type=Path, default=BUILTIN_DIR / preset)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=60)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--aux-coef", type=float, default=0.02)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--intermediate", type=int, default=256, help="of one expert")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--max-positions", type=int, default=2048)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--probe-chunks", type=int, default=12, help="held-out chunks for the curve")
    p.add_argument("--eval-chunks", type=int, default=None, help="held-out chunks for the card (default all)")
    p.add_argument("--check-chunks", type=int, default=6, help="held-out chunks stored in card.json for tests")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-files", type=int, default=None, help="use only the first N files (debugging)")
    p.add_argument("--dry-run", action="store_true", help="a few steps on a few files into /tmp")
    p.add_argument("--analyze-only", action="store_true", help="redo the card from the checkpoint in --out")
    p.set_defaults(**{k.replace("-", "_"): v for k, v in PRESETS[preset].items()
                      if k not in ("intro", "prompts", "prose_files", "compare_packages")})
    args = p.parse_args(argv)
    args.name = preset
    args.card_text = PRESETS[preset]
    if args.dry_run:
        args.out = Path(f"/tmp/{preset}-dry") if args.out == BUILTIN_DIR / preset else args.out
        args.steps, args.eval_every, args.warmup = 6, 3, 2
        args.max_files = args.max_files or 60
        args.eval_chunks, args.probe_chunks = 8, 4
    return args


# ----------------------------------------------------------------------------------------------
# main


def folder_sizes(out: Path, skip: set[str]) -> dict:
    sizes = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file() and p.name not in skip}
    sizes["total"] = sum(sizes.values())
    return sizes


def load_log(log_path: Path, card_path: Path) -> dict:
    """The training log: from train_log.json right after training, else from a finished card.json."""
    if log_path.exists():
        return json.loads(log_path.read_text())
    card = json.loads(card_path.read_text())
    return {"log": card["log"], "train_wall_s": card["training"]["train_wall_s"], "wall_s": card["wall_s"],
            "command": card["command"]}


def load_data(args) -> dict:
    """Corpus texts and split, tokenizer (trained here, or the checkpoint's with --analyze-only), streams."""
    t0 = time.time()
    root, rels = corpus_files(args.corpus)
    rels = rels[: args.max_files] if args.max_files else rels
    texts, corpus_sha = read_corpus(root, rels)
    d = {"root": root, "texts": texts, "sha": corpus_sha,
         "train_files": [r for r in rels if not is_heldout(r)], "held_files": [r for r in rels if is_heldout(r)]}
    d["train_texts"] = [texts[r] for r in d["train_files"]]
    d["held_texts"] = [texts[r] for r in d["held_files"]]
    print(f"corpus {args.corpus}: {len(d['train_files'])} train / {len(d['held_files'])} held-out files, "
          f"sha256 {corpus_sha[:16]}…", flush=True)
    if args.analyze_only:  # the tokenizer the checkpoint was trained with
        from transformers import AutoTokenizer

        d["tokenizer"] = AutoTokenizer.from_pretrained(args.out)
    else:
        d["tokenizer"] = train_tokenizer(d["train_texts"], args.vocab)
    d["train_stream"] = encode_split(d["tokenizer"], d["train_texts"])
    d["held_stream"] = encode_split(d["tokenizer"], d["held_texts"])
    print(f"tokens: {len(d['train_stream']):,} train / {len(d['held_stream']):,} held-out ({time.time() - t0:.0f}s)",
          flush=True)
    d["held_chunks"] = chunk_stream(d["held_stream"], args.seq_len)
    return d


def train_and_save(args, data: dict, log_path: Path, command: str) -> None:
    """Train, save the bf16 checkpoint + tokenizer, and the training log next to them."""
    held_chunks, tokenizer = data["held_chunks"], data["tokenizer"]
    probe = held_chunks[np.linspace(0, len(held_chunks) - 1, args.probe_chunks).round().astype(int)]
    model = build_model(args, tokenizer)
    t_train = time.time()
    log = train(model, data["train_stream"], probe, args)
    train_wall = time.time() - t_train
    args.out.mkdir(parents=True, exist_ok=True)
    model.generation_config.pad_token_id = tokenizer.eos_token_id
    model.to(torch.bfloat16).save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    log_path.write_text(json.dumps({"log": log, "train_wall_s": train_wall, "command": command}))


def corpus_card(args, data: dict) -> dict:
    """The card's corpus section: name, where, version, sha256, split sizes, file lists, near-duplication."""
    corpus = get_corpus(args.corpus)
    train_bytes = sum(len(t.encode()) for t in data["train_texts"])
    held_bytes = sum(len(t.encode()) for t in data["held_texts"])
    provider = "Python" if corpus.name == "stdlib" else corpus.name
    card = {"name": corpus.name, "description": corpus.description, "root": str(data["root"]),
            "provider": provider, "version": corpus.version(), "sha256": data["sha"],
            "split_rule": "held out iff sha256(relative path).hexdigest()[0] == '0'",
            "train": {"files": len(data["train_files"]), "bytes": train_bytes, "tokens": int(len(data["train_stream"]))},
            "heldout": {"files": len(data["held_files"]), "bytes": held_bytes, "tokens": int(len(data["held_stream"]))},
            "files": {"train": data["train_files"], "heldout": data["held_files"]}}
    if corpus.name == "stdlib":  # the keys of the first cards
        card.update(stdlib=str(data["root"]), python=corpus.version())
    compare = args.card_text["compare_packages"]
    if compare:
        import importlib

        card["near_duplication"] = {}
        for name in compare:
            module = importlib.import_module(name)
            texts = (data["texts"] if name == args.corpus else
                     package_texts(Path(module.__file__).parent, {"test", "tests", "testing", "__pycache__"}))
            card["near_duplication"][f"{name} {module.__version__}"] = near_duplication(texts, is_heldout)
    return card


def analyze(args, data: dict, saved: dict) -> dict:
    """Everything the card reports, measured on what ships: the bf16 files, loaded the way users load them."""
    import tokenizers
    import transformers
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.out, dtype=torch.float32)
    tokenizer, train_stream, held_stream = data["tokenizer"], data["train_stream"], data["held_stream"]
    n_params = sum(p.numel() for p in model.parameters())
    eval_chunks = data["held_chunks"] if args.eval_chunks is None else data["held_chunks"][: args.eval_chunks]
    held_nats, choices = routing_on(model, eval_chunks, args.batch)
    usage = expert_usage(choices, args.experts)
    mi = routing_mi(choices, args.experts)
    corpus = corpus_card(args, data)
    tok_per_byte = len(held_stream) / corpus["heldout"]["bytes"]
    uni = unigram_nats(train_stream, held_stream, len(tokenizer))
    log = saved["log"]
    window = min(50, len(log))
    train_nats = float(np.mean([e["train"] for e in log[-window:]]))
    bits = 1 / math.log(2)
    prose = set(args.card_text["prose_files"]) & set(data["held_files"])
    code = None if not prose else heldout_without(
        model, lambda texts: encode_split(tokenizer, texts), train_stream, data["held_files"], data["texts"], prose,
        len(tokenizer), args.seq_len, args.batch, args.eval_chunks)
    plot_loss(log, args.out / "loss_curve.png")
    plot_routing(usage, mi, args.out / "routing.png")
    return {
        "name": args.name,
        "intro": args.card_text["intro"],
        "command": saved["command"],
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                     "transformers": transformers.__version__, "tokenizers": tokenizers.__version__},
        "model": {"arch": args.arch, "class": ARCH_CLASSES[args.arch], "layers": args.layers, "experts": args.experts,
                  "top_k": args.top_k, "hidden": args.hidden, "intermediate": args.intermediate, "heads": args.heads,
                  "kv_heads": args.kv_heads, "vocab": len(tokenizer), "params": n_params,
                  "active_params_per_token": n_params - args.layers * (args.experts - args.top_k) * 3 * args.hidden * args.intermediate},
        "corpus": corpus,
        "training": {"steps": args.steps, "batch": args.batch, "seq_len": args.seq_len, "lr": args.lr,
                     "warmup": args.warmup, "weight_decay": args.weight_decay, "clip": args.clip,
                     "aux_coef": args.aux_coef, "aux_loss": "switch, per layer, averaged", "seed": args.seed,
                     "threads": args.threads, "tokens_seen": args.steps * args.batch * args.seq_len,
                     "train_wall_s": saved["train_wall_s"], "train_cpu_s": log[-1].get("cpu"), "train_loss_window": window,
                     "final_aux": float(np.mean([e["aux"] for e in log[-window:]]))},
        "eval": {"chunks": len(eval_chunks), "tokens": int(eval_chunks[:, 1:].numel()),
                 "heldout_tokens_per_byte": tok_per_byte,
                 "train_nats": train_nats, "train_bpb": train_nats * bits * len(train_stream) / corpus["train"]["bytes"],
                 "heldout_nats": held_nats, "heldout_bits_per_token": held_nats * bits,
                 "heldout_bpb": held_nats * bits * tok_per_byte,
                 "unigram_nats": uni, "unigram_bpb": uni * bits * tok_per_byte,
                 "byte_unigram_bpb": byte_unigram_bits(data["train_texts"], data["held_texts"]), "heldout_code": code},
        "routing": {"usage": usage.tolist(), "max_share": float(usage.max()), "min_share": float(usage.min()),
                    "max_share_per_layer": usage.max(1).tolist(), "min_share_per_layer": usage.min(1).tolist(),
                    "mutual_information": mi},
        "check": check_sequences(model, data["held_chunks"], args.check_chunks),
        "samples": generate_samples(model, tokenizer, args.card_text["prompts"], args.seed),
        "log": log,
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    try:  # the model card's figures need it: say so now, not after the training
        import matplotlib  # noqa: F401
    except ImportError:
        sys.exit("train_tiny_moe: the model card's figures need matplotlib, which is not installed: "
                 "pip install 'm2r2-moe[plot]' (or matplotlib), then run this again")
    t_start = time.time()
    torch.set_num_threads(args.threads)
    data = load_data(args)
    log_path = args.out / "train_log.json"
    command = "python " + " ".join(shlex.quote(a) for a in [str(Path(sys.argv[0]))] + (argv or sys.argv[1:]))
    if not args.analyze_only:
        train_and_save(args, data, log_path, command)
    saved = load_log(log_path, args.out / "card.json")
    card = analyze(args, data, saved)
    elapsed = time.time() - t_start
    # --analyze-only after a crashed card step: training time + this (analysis) run approximates the whole.
    card["wall_s"] = elapsed if not args.analyze_only else saved.get("wall_s") or saved["train_wall_s"] + elapsed
    card["files"] = folder_sizes(args.out, skip={log_path.name})
    write_card(card, args.out)
    card["files"] = folder_sizes(args.out, skip={log_path.name})  # now including the card itself
    write_card(card, args.out)
    log_path.unlink(missing_ok=True)  # card.json holds the log from now on
    usage = np.asarray(card["routing"]["usage"])
    print(f"held-out {card['eval']['heldout_bpb']:.3f} bits/byte (unigram {card['eval']['unigram_bpb']:.3f}); "
          f"expert share per layer max {100 * usage.max():.1f}% / min {100 * usage.min():.2f}%; "
          f"{card['files']['total'] / 1e6:.1f} MB in {args.out}", flush=True)


if __name__ == "__main__":
    main()
