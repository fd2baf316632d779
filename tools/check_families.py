"""Which transformers MoE families does m2r2_moe offload? Walks transformers' causal-LM registry, builds
every MoE config tiny, offloads it (family adapter or the generic path) and checks it.

For each family: logits identical (torch.equal) to the un-offloaded model with `cache_experts = top_k`
(prefill in waves) and with every expert resident; `adapter.route(...)` picks the experts the block
itself runs and its scores rank them first; `remove_offload` restores the state_dict bit for bit.

    python tools/check_families.py                 # table
    python tools/check_families.py --json          # one JSON object per family, in a list
    python tools/check_families.py qwen3_moe olmoe # only these model types
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers.models.auto.configuration_auto import CONFIG_MAPPING  # noqa: E402
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES  # noqa: E402

import m2r2_moe  # noqa: E402
from m2r2_moe.errors import UnsupportedModelError  # noqa: E402
from m2r2_moe.models import find_moe_layers  # noqa: E402

EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
NUM_LAYERS = 4
# Sizes every tiny config gets where the config has the field (hidden 64, 8 experts, top-2).
TINY = dict(
    vocab_size=128, hidden_size=64, intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=32,
    ffn_hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
    num_experts_per_tok=2, moe_top_k=2, n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1,
    kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, qk_head_dim=16,
    pad_token_id=0, bos_token_id=1, eos_token_id=2, sliding_window=64, attention_chunk_size=64,
    num_hidden_layers=NUM_LAYERS, mlp_only_layers=[], decoder_sparse_step=1, moe_layer_freq=1,
)

# What a few families need beyond TINY to build small (their defaults are None or too big to cut).
FAMILY_TINY = {
    "doge": dict(is_moe=True),  # its MoE (product-key experts) is off by default
    "lfm2_moe": dict(layer_types=["full_attention", "conv", "full_attention", "conv"], num_dense_layers=1),
    "qwen4_exp_text": dict(indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=8,
                           indexer_compress_ratio=2),
}


class FamilyTimeout(Exception):
    pass


def moe_model_types(only: list[str] | None = None) -> list[str]:
    """Model types of the causal-LM registry whose default config has routed experts."""
    found = []
    for model_type in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        if only and model_type not in only:
            continue
        try:
            config = CONFIG_MAPPING[model_type]()
        except Exception:  # noqa: BLE001 - a config that cannot be built by default is reported below if asked
            if only:
                found.append(model_type)
            continue
        if getattr(config, "text_config", None) is not None and not only:
            continue  # a multimodal wrapper: its *_text twin is in the registry
        if any(getattr(config, k, None) not in (None, 0) for k in EXPERT_KEYS) or "moe" in model_type:
            found.append(model_type)
    return found


def _has(config, name: str) -> bool:
    try:
        return hasattr(config, name)
    except Exception:  # noqa: BLE001 - per-layer configs raise on global access
        return False


def _cut(per_layer):
    """A per-layer list/pattern cut to NUM_LAYERS, keeping one layer of each kind it had (attention and
    linear attention / mamba / MoE / dense...) so that the tiny model still has every kind."""
    head = list(per_layer[:NUM_LAYERS])
    missing = [kind for kind in dict.fromkeys(per_layer) if kind not in head]
    for i, kind in enumerate(missing[:NUM_LAYERS - 1]):
        head[NUM_LAYERS - 1 - i] = kind
    return "".join(head) if isinstance(per_layer, str) else head


def tiny_config(model_type: str):
    """The family's default config shrunk: the TINY sizes, 8 experts, per-layer lists cut to NUM_LAYERS."""
    cls = CONFIG_MAPPING[model_type]
    default = cls()
    kwargs = {k: v for k, v in TINY.items() if _has(default, k)}
    if "qk_rope_head_dim" in kwargs:  # multi-head latent attention: rotary head_dim is the rope part
        kwargs["head_dim"] = kwargs["qk_rope_head_dim"]
        if "num_attention_heads" in kwargs:
            kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]
    for k in EXPERT_KEYS:
        if getattr(default, k, None) not in (None, 0):
            kwargs[k] = 8
    layers = getattr(default, "num_hidden_layers", None)
    for k, v in default.to_dict().items():
        if k.endswith("_layer_period") and isinstance(v, int):
            kwargs[k] = 2  # Jamba-style "every n-th layer is attention / MoE"
        elif k.endswith("_layer_offset") and isinstance(v, int):
            kwargs[k] = 1
        elif isinstance(v, (list, str)) and layers and len(v) == layers and k not in kwargs:
            kwargs[k] = _cut(v)  # per-layer types / patterns
    kwargs.update(FAMILY_TINY.get(model_type, {}))
    for _ in range(4):  # a family that validates a field against its own rules keeps its default for it
        try:
            return cls(**kwargs)
        except Exception as e:  # noqa: BLE001
            named = [k for k in kwargs if k in str(e) and k not in FAMILY_TINY.get(model_type, {})]
            if not named:
                raise
            for k in named:
                kwargs.pop(k)
    return cls(**kwargs)


def randomize_router_biases(model) -> None:
    """Routers' score-correction biases are zeros at init; random ones make route() checks meaningful."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, t in list(model.named_buffers()) + list(model.named_parameters()):
            if ("correction_bias" in name or "expert_bias" in name) and t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=generator) * 0.2 - 0.1)


def check_family(model_type: str) -> dict:
    row = {"family": model_type, "class": MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type], "adapter": None,
           "experts_class": None, "status": "failed", "detail": "", "route": "-"}
    stage = "config"
    try:
        config = tiny_config(model_type)
        stage = "build"
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
        randomize_router_biases(model)
        row["class"] = type(model).__name__
        stage = "find layers"
        try:
            adapter, layers = find_moe_layers(model)
        except UnsupportedModelError as e:
            row["status"], row["detail"] = "unsupported layout", str(e)
            return row
        row["adapter"], row["experts_class"] = adapter.name, type(layers[0].experts).__name__
        stage = "reference forward"
        ids = torch.randint(3, config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
        snap = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.no_grad():
            ref = model(ids, use_cache=False).logits
        top_k = adapter.top_k(model)
        for cache in (top_k, sum(int(layer.experts.num_experts) for layer in layers)):
            stage = f"offload (cache_experts={cache})"
            m2r2_moe.offload(model, device="cpu", cache_experts=cache)
            try:
                with torch.no_grad():
                    out = model(ids, use_cache=False).logits
                if cache == top_k:
                    stage = "route"
                    row["route"] = check_route(model, adapter, layers, ids)
            finally:
                m2r2_moe.remove_offload(model)
            if not torch.equal(out, ref):
                diff = (out - ref).abs().max().item()
                row["detail"] = f"logits differ at cache_experts={cache}: max |diff| {diff:.3g}"
                return row
        stage = "restore"
        now = model.state_dict()
        if now.keys() != snap.keys() or not all(torch.equal(now[k], snap[k]) for k in snap):
            row["detail"] = "remove_offload did not restore the state_dict"
            return row
        row["status"] = "ok"
        row["detail"] = f"{len(layers)} MoE layers, top-{top_k}"
    except FamilyTimeout:
        row["detail"] = f"timeout at {stage}"
    except Exception as e:  # noqa: BLE001 - the table reports every failure with its stage
        row["detail"] = f"{stage}: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    return row


def check_route(model, adapter, layers, ids) -> str:
    """'ok' when `adapter.route` on each block's input gives the block's own top-k, ranked first by its scores,
    and `MoELayer.norm` is the norm whose output the block gets (what predictors apply to residuals)."""
    try:
        return _check_route(model, adapter, layers, ids) or "ok"
    except Exception as e:  # noqa: BLE001 - reported in the table
        return f"{type(e).__name__}: {str(e).splitlines()[0][:140] if str(e) else ''}"


def _check_route(model, adapter, layers, ids) -> str:
    seen: dict[int, dict] = {i: {} for i in range(len(layers))}
    hooks = []
    for i, layer in enumerate(layers):
        if layer.norm is not None:
            hooks.append(layer.norm.register_forward_hook(lambda m, a, out, i=i: seen[i].__setitem__("normed", out)))
        hooks.append(layer.block.register_forward_pre_hook(
            lambda m, args, kwargs, i=i: seen[i].__setitem__("x", (args[0] if args else next(iter(kwargs.values())))),
            with_kwargs=True))
        hooks.append(layer.experts.register_forward_pre_hook(
            lambda m, args, i=i: seen[i].__setitem__("idx", args[1]) if len(args) > 1 else None))
    try:
        with torch.no_grad():
            model(ids, use_cache=False)
            for i, layer in enumerate(layers):
                if "x" not in seen[i] or "idx" not in seen[i]:
                    return f"layer {i}: block input or expert choice not observed"
                x, chosen = seen[i]["x"], seen[i]["idx"]
                normed = seen[i].get("normed")  # norm None: the block reads the residual (OLMo2-style post-norms)
                if layer.norm is not None and (normed is None or normed.shape != x.shape or not torch.equal(normed, x)):
                    return f"layer {i}: the block's input is not the output of MoELayer.norm"
                scores, picked = adapter.route(layer, x.reshape(-1, x.shape[-1]))
                if not torch.equal(picked.sort(-1).values, chosen.sort(-1).values):
                    return f"layer {i}: route() top-k differs from the block's choice"
                k = chosen.shape[-1]
                top = scores.topk(k, dim=-1).indices.sort(-1).values
                if not torch.equal(top, chosen.sort(-1).values):
                    return f"layer {i}: scores do not rank the chosen experts first"
    finally:
        for h in hooks:
            h.remove()
    return ""


def _alarm(signum, frame):
    raise FamilyTimeout()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("families", nargs="*", help="model types (default: every MoE family in the registry)")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of the table")
    parser.add_argument("--timeout", type=int, default=60, help="seconds per family (default 60)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    logging.disable(logging.WARNING)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    signal.signal(signal.SIGALRM, _alarm)
    rows, start = [], time.perf_counter()
    for model_type in moe_model_types(args.families):
        t0 = time.perf_counter()
        signal.alarm(args.timeout)
        try:
            row = check_family(model_type)
        finally:
            signal.alarm(0)
        row["seconds"] = round(time.perf_counter() - t0, 2)
        rows.append(row)
        if not args.json:
            print(f"{row['family']:<20} {row['class']:<30} {row['status']:<19} route: {row['route'][:60]:<14} "
                  f"{row['detail']}", flush=True)
    if args.json:
        print(json.dumps({"transformers": transformers.__version__, "torch": torch.__version__, "families": rows},
                         indent=1))
    else:
        counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "unsupported layout", "failed")}
        routed = sum(r["status"] == "ok" and r["route"] == "ok" for r in rows)
        print(f"\ntransformers {transformers.__version__}: {len(rows)} MoE families, " +
              ", ".join(f"{n} {s}" for s, n in counts.items()) + f"; route() verified on {routed} of the ok ones"
              f" ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
