"""Pieces every `m2r2-moe` sub-command shares: argument types that name the flag they refuse, the checks
made before any work (matplotlib, text files, cache size, adapters), and the help formatter.

A sub-command's module imports this module and `loading`, never `cli` (which imports the sub-commands).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from .config import MIN_LINK_GBPS, OffloadConfig, OffloadConfigError, parse_bytes
from .errors import M2R2Error
from .loading import ModelSpecError, check_model_spec, model_choices

PLOT_INSTALL = 'pip install "m2r2_moe[plot]"'


class UsageError(M2R2Error, ValueError):
    """A command-line value that cannot be used; the message names the flag and the fix."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps descriptions as written and ends an option's help with its default, unless the help already
    states it (options whose default is None say in words what they default to)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or action.required or action.nargs == 0
                or action.default in (None, argparse.SUPPRESS)):
            return text
        return f"{text} (default: %(default)s)"


def _number(cast, low, strict: bool, what: str):
    """An argparse type: `cast(text)`, refused unless > low (strict) or >= low."""
    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not math.isfinite(value) or (value <= low if strict else value < low):
            raise argparse.ArgumentTypeError(f"must be {'greater than' if strict else 'at least'} {low:g}, got {text}")
        return value

    return parse


positive_int = _number(int, 1, False, "a whole number")
nonnegative_int = _number(int, 0, False, "a whole number")
positive_float = _number(float, 0, True, "a number")
nonnegative_float = _number(float, 0, False, "a number")
link_gbps = _number(float, MIN_LINK_GBPS, False, "a number of GB/s")

BUDGET_HELP = "bytes or text like 4GiB, 512MB"


def memory(text: str) -> str:
    """An argparse type: an amount of memory (kept as written: the plan quotes it)."""
    try:
        if parse_bytes(text) > 0:
            return text
    except OffloadConfigError:
        pass
    raise argparse.ArgumentTypeError(f"{text!r} is not an amount of memory; write e.g. 4GiB, 512MB or a number of bytes")


def probability(text: str) -> float:
    """An argparse type: a number in (0, 1]."""
    value = positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be a probability in (0, 1], got {text}")
    return value


def listed(item_type):
    """An argparse type: a comma-separated list, each item parsed by `item_type`."""
    def parse(text: str) -> list:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError("needs at least one comma-separated value")
        return [item_type(t) for t in items]

    return parse


def one_of(choices):
    """An argparse type: one of `choices` (for items of `listed`)."""
    def parse(text: str) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(f"unknown value {text!r}; choose from {', '.join(choices)}")
        return text

    return parse


def checked_by(check, errors):
    """An argparse type that runs `check(text)` and reports its `errors` as argparse's own, keeping the text."""

    def parse(text: str) -> str:
        try:
            check(text)
        except errors as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return text

    return parse


# `--model`: refuses a value that names no model, before anything loads
model_spec = checked_by(check_model_spec, ModelSpecError)


def existing_file(text: str) -> str:
    """An argparse type: a path to an existing file."""
    if not Path(text).is_file():
        folder = " (it is a folder)" if Path(text).is_dir() else ""
        raise argparse.ArgumentTypeError(f"{text!r} is not a file{folder}")
    return text


def add_model_argument(p: argparse.ArgumentParser, default: str = "builtin") -> None:
    p.add_argument("--model", type=model_spec, default=default,
                   help=f"the model: {model_choices().removeprefix('--model takes ')}")


def check_device(device: str | None):
    """The torch.device `--device` resolves to (None: cuda if available, else cpu); refused with the flag's name."""
    try:
        return OffloadConfig(device=device).resolved_device()
    except OffloadConfigError as e:
        raise UsageError(f"--device: {e}") from None


def require_matplotlib(flag: str) -> None:
    """Refuse `flag` (a plot output) before any work when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError(f"{flag} draws with matplotlib, which is not installed: {PLOT_INSTALL}") from None


def text_files(spec: list[str] | None, default: str) -> list[Path]:
    """The files `--text` names (or `default`), refused with the flag's name when there are none."""
    from .corpus import resolve_text

    try:
        return resolve_text(spec or [default])
    except (OSError, ValueError) as e:
        raise UsageError(f"--text: {e} (give files or folders, or builtin:train / builtin:heldout)") from None


def need_tokenizer(tokenizer, model: str) -> None:
    if tokenizer is None:
        raise UsageError(f"--model {model} has no tokenizer and this command reads text: use --model builtin, "
                         f"builtin:NAME or a checkpoint folder with its tokenizer files")


def check_cache_experts(values: list[int], top_k: int, total: int) -> None:
    """Refuse device slot counts the model cannot run with (a layer needs its top-k experts at once)."""
    bad = [v for v in values if v < top_k]
    if bad:
        raise UsageError(f"--cache-experts {bad[0]} is too small for this model: use {top_k}..{total} "
                         f"(top-k {top_k} experts of a layer at once .. all {total} experts)")


def shipped_adapters(model, layers) -> Path | None:
    """The adapters shipped for `model` when it is a built-in model, else None."""
    from .predict import AdapterFileError, default_adapters_path

    try:
        return default_adapters_path(model, layers)
    except AdapterFileError:
        return None


def auto_lookahead(model, layers, adapters: str | None = None, runtime: bool = True) -> int:
    """`--lookahead auto`, from the m2r2 adapters (`adapters`, else the shipped ones): with `runtime`, what the
    runtime's default looks ahead for them (`DEFAULT_LOOKAHEAD`, or their depth when less), so that every
    predictor compared looks as far as m2r2 does; else every distance they were trained for. `DEFAULT_LOOKAHEAD`
    without adapters."""
    from .config import DEFAULT_LOOKAHEAD
    from .predict import AcceleratorAdapters

    path = adapters if adapters is not None else shipped_adapters(model, layers)
    if path is None:
        return DEFAULT_LOOKAHEAD
    depth = min(AcceleratorAdapters.load(path).depth, len(layers) - 1)
    return min(depth, DEFAULT_LOOKAHEAD) if runtime else depth


def check_adapters(model, layers, model_spec_text: str, adapters: str | None, flag: str) -> None:
    """Before any work: m2r2 has adapters for this model (`--adapters`, checked against the model, or the
    shipped ones); `flag` is the option that asked for m2r2."""
    from .predict import AcceleratorAdapters, model_fingerprint

    if adapters is not None:
        AcceleratorAdapters.load(adapters, fingerprint=model_fingerprint(model, layers))
    elif shipped_adapters(model, layers) is None:
        train_on = "PATH" if model_spec_text == "random" else model_spec_text  # `random` has no text to train on
        raise UsageError(f"{flag} m2r2 needs adapters trained for this model: pass --adapters PATH (train them "
                         f"with `m2r2-moe train-adapters --model {train_on} --out adapters.safetensors`)")
