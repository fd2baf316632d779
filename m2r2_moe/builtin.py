"""The built-in reference MoE model: a tiny Mixtral trained on the Python standard library.

It ships as package data in `m2r2_moe/builtin/tiny-mixtral/` (a normal `save_pretrained` folder:
config, bf16 safetensors, tokenizer, MODEL_CARD.md, card.json) and is the default model of
`m2r2-moe demo`, the profiler and the predictor benchmarks. `tools/train_tiny_moe.py` reproduces it.
"""

from __future__ import annotations

import json
import logging
from importlib import resources
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

BUILTIN_NAME = "tiny-mixtral"
_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json")


def _folder() -> Path:
    # importlib.resources gives the installed package's directory (a real directory for wheels and
    # editable installs; zipped installs are not supported because from_pretrained needs a folder).
    return Path(str(resources.files("m2r2_moe"))) / "builtin" / BUILTIN_NAME


def builtin_model_path() -> str:
    """Folder of the built-in checkpoint, loadable by `AutoModelForCausalLM/AutoTokenizer.from_pretrained`.

    Raises FileNotFoundError, naming what is missing, when the package was installed without its data.
    """
    folder = _folder()
    missing = [name for name in _REQUIRED if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"the built-in model is missing from {folder} ({', '.join(missing)} not found). The package was "
            "installed without its package data; reinstall m2r2_moe from a wheel or source tree that includes "
            "m2r2_moe/builtin/tiny-mixtral/, or regenerate it with `python tools/train_tiny_moe.py`."
        )
    return str(folder)


def builtin_card() -> dict:
    """The built-in model's card.json: corpus, split, losses, per-layer expert usage."""
    return json.loads((Path(builtin_model_path()) / "card.json").read_text())


def load_builtin(dtype: torch.dtype = torch.float32, **kwargs):
    """(model, tokenizer) of the built-in model, on CPU in `dtype`, in eval mode.

    Extra keyword arguments go to `AutoModelForCausalLM.from_pretrained`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = builtin_model_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    logger.debug("loaded built-in model %s from %s", BUILTIN_NAME, path)
    return model, tokenizer
