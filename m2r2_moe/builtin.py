"""The built-in reference MoE models, shipped as package data in `m2r2_moe/builtin/<name>/`.

Each folder is a normal `save_pretrained` checkpoint (config, bf16 safetensors, tokenizer) with its model
card (MODEL_CARD.md, card.json, figures) and the M2R2 adapters trained for it (`adapters.safetensors`).
`tiny-mixtral` (the default: `demo`, the profiler and the predictor benchmarks) is a tiny Mixtral trained on
the Python standard library; `tiny-qwen3-moe` is a fine-grained Qwen3-MoE (32 experts per layer, top-4) trained
on the Python sources of torch. `tools/train_tiny_moe.py` reproduces both (`--preset NAME`);
`m2r2_moe.corpus.builtin_corpus(NAME)` names the corpus a model was trained on.

The folders are found next to this module's source file (`__file__`), never through
`importlib.resources`: under an editable install that returns a multiplexed path object, not a folder.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

BUILTIN_NAME = "tiny-mixtral"  # the default built-in model
ADAPTERS_FILE = "adapters.safetensors"
_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json")
_ROOT = Path(__file__).resolve().parent / "builtin"


def builtin_names() -> list[str]:
    """Names of the built-in models present in this install, the default first."""
    found = sorted(p.name for p in _ROOT.iterdir() if (p / "config.json").is_file()) if _ROOT.is_dir() else []
    return sorted(found, key=lambda n: n != BUILTIN_NAME)


def resolve_name(name: str | None) -> str:
    """`None`, `"builtin"` → the default; `"builtin:NAME"` or `"NAME"` → NAME (checked to exist)."""
    if name is None or name == "builtin":
        return BUILTIN_NAME
    name = name.removeprefix("builtin:")
    names = builtin_names()
    if name not in names and name != BUILTIN_NAME:
        raise FileNotFoundError(f"no built-in model named {name!r}; the built-in models are: {', '.join(names)}")
    return name


def builtin_model_path(name: str | None = None) -> str:
    """Folder of a built-in checkpoint (default: `tiny-mixtral`), loadable by
    `AutoModelForCausalLM/AutoTokenizer.from_pretrained`.

    Raises FileNotFoundError, naming what is missing, when the package was installed without its data."""
    name = resolve_name(name)
    folder = _ROOT / name
    missing = [file for file in _REQUIRED if not (folder / file).is_file()]
    if missing:
        raise FileNotFoundError(
            f"the built-in model is missing from {folder} ({', '.join(missing)} not found). The package was "
            f"installed without its package data; reinstall m2r2_moe from a wheel or source tree that includes "
            f"m2r2_moe/builtin/{name}/, or regenerate it with the training script in tools/."
        )
    return str(folder)


def builtin_adapters_path(name: str | None = None) -> Path | None:
    """The M2R2 adapters shipped with a built-in model, or None when there are none."""
    path = _ROOT / resolve_name(name) / ADAPTERS_FILE
    return path if path.is_file() else None


def builtin_card(name: str | None = None) -> dict:
    """A built-in model's card.json: corpus, split, losses, per-layer expert usage."""
    return json.loads((Path(builtin_model_path(name)) / "card.json").read_text())


def load_builtin(dtype: torch.dtype = torch.float32, name: str | None = None, **kwargs):
    """(model, tokenizer) of a built-in model (default `tiny-mixtral`), on CPU in `dtype`, in eval mode.

    Extra keyword arguments go to `AutoModelForCausalLM.from_pretrained`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = builtin_model_path(name)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    logger.debug("loaded built-in model %s from %s", resolve_name(name), path)
    return model, tokenizer
