"""Text corpora every machine that runs the package has, split by file: the Python sources of the standard
library (`stdlib`) and of the installed torch package (`torch`).

Each built-in model is trained on the `train` split of its corpus (tiny-mixtral: `stdlib`; tiny-qwen3-moe:
`torch`), and so are its adapters; predictor and profiler figures are measured on the `heldout` split. A file
is held out when the first hex digit of sha256(path relative to the corpus root) is 0 (~1/16 of the files,
independent of content, stable across machines).

Text specs (`resolve_text`, the `--text` options of the command line):

- `stdlib:train`, `stdlib:heldout`, `torch:train`, `torch:heldout`: a split of a named corpus;
- `builtin:train`, `builtin:heldout`: a split of the default built-in model's corpus (`stdlib`);
- `builtin:NAME:train`, `builtin:NAME:heldout`: a split of built-in model NAME's corpus (its card.json);
- anything else: a file, or a folder (every file under it).
"""

from __future__ import annotations

import hashlib
import random
import sys
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}  # of the stdlib corpus
SPLITS = ("train", "heldout")
DEFAULT_CORPUS = "stdlib"  # the corpus of the default built-in model (tiny-mixtral)


@dataclass(frozen=True)
class Corpus:
    """A named corpus: the `*.py` files under `root()`, minus excluded folders and files."""

    name: str
    description: str  # what it is, which files are left out and why (model cards quote it)
    root: Callable[[], Path]
    version: Callable[[], str]  # of what provides the files: they change with it
    excluded_dir: Callable[[str], bool]  # on a folder name
    excluded_file: Callable[[str], bool] = field(default=lambda rel: False)  # on the relative posix path

    def files(self) -> tuple[Path, list[str]]:
        """(root, sorted relative posix paths of the corpus files)."""
        root = self.root()
        rels = []
        for path in root.rglob("*.py"):
            rel = path.relative_to(root)
            if any(self.excluded_dir(p) for p in rel.parts[:-1]):
                continue
            if not self.excluded_file(rel.as_posix()):
                rels.append(rel.as_posix())
        return root, sorted(rels)


def _torch_root() -> Path:
    return Path(torch.__file__).resolve().parent


CORPORA: dict[str, Corpus] = {
    "stdlib": Corpus(
        name="stdlib",
        description=(f"every `*.py` of the Python standard library, excluding directories named "
                     f"{', '.join(sorted(EXCLUDED_DIRS))}, `config-*`, and `_sysconfigdata*` files"),
        root=lambda: Path(sysconfig.get_paths()["stdlib"]),
        version=lambda: sys.version.split()[0],
        excluded_dir=lambda d: d in EXCLUDED_DIRS or d.startswith("config-"),
        excluded_file=lambda rel: rel.rsplit("/", 1)[-1].startswith("_sysconfigdata"),  # build-machine specific
    ),
    "torch": Corpus(
        name="torch",
        description=("every `*.py` of the installed torch package, excluding directories named __pycache__, "
                     "test, testing, tests (tests and test utilities) and the build-specific `version.py`"),
        root=_torch_root,
        version=lambda: torch.__version__,
        excluded_dir=lambda d: d in {"test", "tests", "testing", "__pycache__"},
        excluded_file=lambda rel: rel == "version.py",  # build-specific (CUDA/git version strings)
    ),
}


def corpus_names() -> list[str]:
    """Names of the corpora, e.g. for `NAME:train` text specs."""
    return list(CORPORA)


def get_corpus(name: str) -> Corpus:
    """The corpus called `name`; a ValueError lists the valid names."""
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; the corpora are: {', '.join(CORPORA)}")
    return CORPORA[name]


def corpus_files(name: str = DEFAULT_CORPUS) -> tuple[Path, list[str]]:
    """(root, sorted relative paths) of a named corpus."""
    return get_corpus(name).files()


def stdlib_files() -> tuple[Path, list[str]]:
    """(stdlib root, sorted relative paths of the *.py files used as corpus)."""
    return corpus_files("stdlib")


def is_heldout(rel: str) -> bool:
    """Whether the file at relative path `rel` belongs to the held-out split."""
    return hashlib.sha256(rel.encode()).hexdigest()[0] == "0"


def split_files(split: str, corpus: str = DEFAULT_CORPUS) -> list[Path]:
    """Absolute paths of the `train` or `heldout` split of a corpus (default: the stdlib)."""
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    root, rels = corpus_files(corpus)
    return [root / rel for rel in rels if is_heldout(rel) == (split == "heldout")]


def builtin_corpus(model: str | None = None) -> str:
    """Name of the corpus a built-in model (default: the default one) was trained on, from its card.json."""
    from .builtin import builtin_card

    corpus = builtin_card(model)["corpus"]
    if "name" in corpus:
        return corpus["name"]
    if "stdlib" in corpus:  # cards written before corpora had names: the stdlib was the only one
        return "stdlib"
    raise ValueError(f"the card of built-in model {model!r} does not name its corpus (corpus.name in card.json)")


def _corpus_split(item: str) -> list[Path] | None:
    """The files of a corpus text spec, or None when `item` is not one (then it is a path)."""
    parts = item.split(":")
    if parts[0] == "builtin" and len(parts) in (2, 3):
        corpus = DEFAULT_CORPUS if len(parts) == 2 else builtin_corpus(parts[1])
    elif parts[0] in CORPORA and len(parts) == 2:
        corpus = parts[0]
    else:
        return None
    if parts[-1] not in SPLITS:
        raise ValueError(f"text spec {item!r}: the split must be 'train' or 'heldout', e.g. {parts[0]}:heldout")
    return split_files(parts[-1], corpus)


def resolve_text(spec: list[str]) -> list[Path]:
    """Files named on a command line: corpus splits (see the module docstring), files, or folders."""
    files: list[Path] = []
    for item in spec:
        split = _corpus_split(item)
        if split is not None:
            files.extend(split)
            continue
        path = Path(item)
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file()))
        elif path.is_file():
            files.append(path)
        else:
            specs = ", ".join(f"{c}:heldout" for c in ["builtin", *CORPORA])
            raise FileNotFoundError(f"text file {item} does not exist (corpus splits are written like {specs})")
    if not files:
        raise ValueError(f"no text files in {spec}")
    return files


def encode_file(tokenizer, path: Path) -> list[int]:
    """Token ids of a whole file, without special tokens.

    `verbose=False`: a file is longer than the model's context, and that is expected here (the model is fed
    windows of the stream later), so transformers' "sequence length is longer than the specified maximum"
    warning would only be noise."""
    return list(tokenizer(path.read_text(errors="replace"), add_special_tokens=False, verbose=False).input_ids)


def token_stream(tokenizer, files: list[Path], max_tokens: int | None = None, seed: int = 0,
                 window: int = 2048) -> torch.Tensor:
    """One 1-D stream of token ids [N]; each file's tokens (or a window of them) are followed by EOS.

    Without `max_tokens`: every file whole, in the given order. With it: the files in a random order drawn
    from `seed`, each contributing one contiguous window of at most max(window, max_tokens / len(files))
    tokens at a random offset, cut at `max_tokens` — a short stream samples the whole file list instead of
    its first files. Deterministic for a given seed. When the windows of all files cannot fill `max_tokens`,
    the files are taken whole (in the same order)."""
    if not files:
        raise ValueError("token_stream needs at least one file")
    if max_tokens is not None and max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive or None, got {max_tokens}")
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    if max_tokens is None:
        return torch.tensor([t for path in files for t in encode_file(tokenizer, path) + eos], dtype=torch.long)
    rng = random.Random(seed)
    order = list(files)
    rng.shuffle(order)
    cap = max(window, -(-max_tokens // len(order)))
    out: list[int] = []
    encoded: list[list[int]] = []
    for path in order:
        ids = encode_file(tokenizer, path)
        encoded.append(ids)
        start = rng.randrange(len(ids) - cap + 1) if len(ids) > cap else 0
        out.extend(ids[start : start + cap] + eos)
        if len(out) >= max_tokens:
            return torch.tensor(out[:max_tokens], dtype=torch.long)
    whole = [t for ids in encoded for t in ids + eos]
    return torch.tensor(whole[:max_tokens], dtype=torch.long)
