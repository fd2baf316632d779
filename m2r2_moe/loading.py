"""What `--model` names, loaded: the command line's sub-commands, the tools and the benchmarks share it.

`--model` accepts
- `builtin`: the default built-in model (`tiny-mixtral`), `builtin:NAME`: another one (`builtin_names()`);
- `random`: a small Mixtral with random weights and no tokenizer (fast, for trying the commands);
- a checkpoint folder (`save_pretrained` layout); its tokenizer is loaded when the folder has one.

Every refusal is a `ModelSpecError` whose message says what `--model` accepts.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .builtin import BUILTIN_NAME, builtin_names, load_builtin, resolve_name
from .errors import M2R2Error

logger = logging.getLogger(__name__)

RANDOM_VOCAB = 512  # vocabulary of the `random` model; its prompts are random ids below it
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class ModelSpecError(M2R2Error, ValueError):
    """`--model` names no loadable model: no such folder, no checkpoint in it, or an unknown built-in name."""


def model_choices() -> str:
    """One sentence: what `--model` accepts, with the built-in names of this install."""
    names = ", ".join(builtin_names()) or "none installed"
    return (f"--model takes 'builtin' (= builtin:{BUILTIN_NAME}), 'builtin:NAME' (built-in models: {names}), "
            f"'random' (a small random Mixtral without tokenizer) or a checkpoint folder")


def is_builtin(spec: str) -> bool:
    """Whether `spec` names a built-in model (`builtin` or `builtin:NAME`)."""
    return spec == "builtin" or spec.startswith("builtin:")


def check_model_spec(spec: str) -> None:
    """Refuse, without loading anything, a `--model` value that cannot name a model."""
    if is_builtin(spec):
        try:
            resolve_name(spec)
        except FileNotFoundError:
            name = spec.removeprefix("builtin:")
            raise ModelSpecError(f"no built-in model named {name!r}; {model_choices()}") from None
        return
    if spec == "random":
        return
    folder = Path(spec)
    if not folder.exists():
        hint = f" (did you mean builtin:{spec}?)" if spec in builtin_names() else ""
        raise ModelSpecError(f"{spec!r} is not a folder{hint}; {model_choices()}")
    if not (folder / "config.json").is_file():
        raise ModelSpecError(f"{spec!r} is not a checkpoint folder (no config.json in it); {model_choices()}")


def random_model(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The `random` model: an 8-layer, 8-expert, top-2 Mixtral with seeded random weights, in eval mode."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=RANDOM_VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=8,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
                           num_experts_per_tok=2, max_position_embeddings=512)
    torch.manual_seed(0)
    return MixtralForCausalLM(config).to(dtype).eval()


def load_model(spec: str, dtype: torch.dtype | str = torch.float32):
    """(model, tokenizer or None) for a `--model` value, on CPU in `dtype` (a torch dtype or its name), in eval mode.

    Raises `ModelSpecError` naming what `--model` accepts when `spec` names nothing loadable."""
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    check_model_spec(spec)
    if is_builtin(spec):
        return load_builtin(dtype=dtype, name=resolve_name(spec))
    if spec == "random":
        return random_model(dtype), None
    return _load_checkpoint(Path(spec), dtype)


def _load_checkpoint(folder: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
        has_tokenizer = any((folder / name).is_file() for name in TOKENIZER_FILES)
        tokenizer = AutoTokenizer.from_pretrained(folder) if has_tokenizer else None
    except (OSError, ValueError, KeyError) as e:  # transformers' words for a folder it cannot read
        raise ModelSpecError(f"cannot load the checkpoint in {str(folder)!r}: {' '.join(str(e).split())}") from e
    if tokenizer is None:
        logger.info("%s has no tokenizer files: prompts will be random token ids", folder)
    return model, tokenizer
