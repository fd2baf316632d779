"""Named corpora and their splits, text specs, and the token stream the command-line tools read.

Invariants:
- every corpus is split by path hash into disjoint train / held-out lists; `builtin:SPLIT` is the stdlib's
  split and `builtin:NAME:SPLIT` the split of built-in model NAME's corpus (from its card);
- a limited token stream samples the whole file list (seeded, deterministic), a full one is every file in
  order; each file's window is contiguous and followed by EOS;
- tokenizing corpus files never emits transformers' "longer than the maximum sequence length" warning.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from m2r2_moe import builtin, corpus

EOS = 99_999  # above every token of the fake files


class DigitsTokenizer:
    """A tokenizer whose tokens are the integers written in the text (so a token names its file and position)."""

    eos_token_id = EOS

    def __call__(self, text, add_special_tokens=True, verbose=True):
        return SimpleNamespace(input_ids=[int(w) for w in text.split()])


def _files(tmp_path: Path, lengths: list[int]) -> list[Path]:
    """File i holds tokens i * 1000 + j, j < lengths[i]."""
    paths = []
    for i, n in enumerate(lengths):
        path = tmp_path / f"f{i:03d}.txt"
        path.write_text(" ".join(str(i * 1000 + j) for j in range(n)))
        paths.append(path)
    return paths


def _segments(stream: torch.Tensor) -> list[list[int]]:
    """The stream cut at EOS (the last segment may be cut by max_tokens)."""
    out, cur = [], []
    for t in stream.tolist():
        if t == EOS:
            out.append(cur)
            cur = []
        else:
            cur.append(t)
    return out + ([cur] if cur else [])


@pytest.mark.parametrize("name", ["stdlib", "torch"])
def test_corpus_splits_are_disjoint_and_complete(name):
    root, rels = corpus.corpus_files(name)
    train = corpus.split_files("train", name)
    held = corpus.split_files("heldout", name)
    assert len(rels) > 100 and len(held) > 5
    assert sorted(train + held) == sorted(root / r for r in rels)
    assert all(corpus.is_heldout(p.relative_to(root).as_posix()) for p in held)
    assert not any(corpus.is_heldout(p.relative_to(root).as_posix()) for p in train)
    assert not any({"test", "tests", "__pycache__"} & set(Path(r).parts[:-1]) for r in rels)


def test_text_specs():
    assert corpus.resolve_text(["builtin:heldout"]) == corpus.split_files("heldout") == \
        corpus.resolve_text(["stdlib:heldout"])
    assert corpus.resolve_text(["torch:train"]) == corpus.split_files("train", "torch")
    with pytest.raises(ValueError, match="split must be 'train' or 'heldout'"):
        corpus.resolve_text(["torch:validation"])
    with pytest.raises(FileNotFoundError, match="torch:heldout"):
        corpus.resolve_text(["nosuchcorpus:heldout"])
    with pytest.raises(ValueError, match="unknown corpus 'nope'.*stdlib, torch"):
        corpus.split_files("train", "nope")


def test_builtin_models_name_their_corpus():
    assert corpus.builtin_corpus() == corpus.builtin_corpus("tiny-mixtral") == "stdlib"
    assert corpus.builtin_corpus("tiny-qwen3-moe") == "torch"
    assert corpus.resolve_text(["builtin:tiny-qwen3-moe:heldout"]) == corpus.split_files("heldout", "torch")
    for name in builtin.builtin_names():
        assert corpus.builtin_corpus(name) in corpus.corpus_names()


def test_full_stream_is_every_file_in_order(tmp_path):
    files = _files(tmp_path, [5, 3, 7])
    stream = corpus.token_stream(DigitsTokenizer(), files)
    assert _segments(stream) == [[i * 1000 + j for j in range(n)] for i, n in enumerate([5, 3, 7])]


def test_limited_stream_samples_all_files_deterministically(tmp_path):
    files = _files(tmp_path, [300] * 40)
    tok = DigitsTokenizer()
    a = corpus.token_stream(tok, files, max_tokens=3000, seed=0)
    assert len(a) == 3000
    assert torch.equal(a, corpus.token_stream(tok, files, max_tokens=3000, seed=0))
    assert not torch.equal(a, corpus.token_stream(tok, files, max_tokens=3000, seed=1))
    used = {seg[0] // 1000 for seg in _segments(a)}
    assert used != set(range(len(used)))  # not the first files of the list
    union = set()
    for seed in range(8):
        union |= {seg[0] // 1000 for seg in _segments(corpus.token_stream(tok, files, 3000, seed=seed))}
    assert len(union) > 30  # the seeds together reach (almost) every file


def test_long_files_give_one_contiguous_window(tmp_path):
    files = _files(tmp_path, [900] * 4)
    stream = corpus.token_stream(DigitsTokenizer(), files, max_tokens=800, seed=3, window=100)
    segments = _segments(stream)
    assert len({seg[0] // 1000 for seg in segments}) == 4  # cap = max(100, 800 / 4) = 200 tokens per file
    for seg in segments:
        assert seg == list(range(seg[0], seg[0] + len(seg)))  # contiguous, from one file
    assert [len(seg) for seg in segments] == [200, 200, 200, 197]  # 4 x (200 + EOS), cut at 800
    assert any(seg[0] % 1000 for seg in segments)  # windows start inside files, not only at their start


def test_windows_too_short_fall_back_to_whole_files(tmp_path):
    files = _files(tmp_path, [3000, 10, 10])
    lengths = {0: 3000, 1: 10, 2: 10}
    stream = corpus.token_stream(DigitsTokenizer(), files, max_tokens=2900, seed=0, window=100)
    assert len(stream) == 2900  # windows of max(100, 2900 / 3) tokens hold ~990; whole files fill the request
    segments = _segments(stream)
    for seg in segments:
        assert seg == list(range(seg[0], seg[0] + len(seg))) and seg[0] % 1000 == 0  # a file from its start
    assert all(len(seg) == lengths[seg[0] // 1000] for seg in segments[:-1])  # whole files


def test_bad_stream_arguments(tmp_path):
    with pytest.raises(ValueError, match="at least one file"):
        corpus.token_stream(DigitsTokenizer(), [])
    with pytest.raises(ValueError, match="max_tokens must be positive"):
        corpus.token_stream(DigitsTokenizer(), _files(tmp_path, [3]), max_tokens=0)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_no_sequence_length_warning(tmp_path):
    from transformers import AutoTokenizer

    path = tmp_path / "long.py"
    path.write_text("def spam(eggs):\n    return eggs + 1\n" * 400)  # ~5k tokens, over model_max_length 2048
    handler = _Records()
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        tokenizer = AutoTokenizer.from_pretrained(builtin.builtin_model_path())
        ids = corpus.token_stream(tokenizer, [path])
        corpus.token_stream(tokenizer, [path], max_tokens=3000)
        assert len(ids) > tokenizer.model_max_length
        assert not any("sequence length is longer" in m for m in handler.messages), handler.messages
        tokenizer(path.read_text())  # the plain call does warn: the check above can fail
        assert any("sequence length is longer" in m for m in handler.messages)
    finally:
        logger.removeHandler(handler)
