"""Tests of the benchmark scripts' support code (run by CI as a separate, slow step:
`python -m pytest -q benchmarks/tests`). The scripts are not a package: their folder is put on the import path
here, once, as running a script does; the unit tests' helpers (tests/conftest.py) are reused."""

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
for folder in (ROOT / "benchmarks", ROOT / "tests"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))


@pytest.fixture
def one_thread():
    """One torch thread for the test, as the benchmarks run: a core left free for the copy worker (on a small
    shared CPU, torch's intra-op pool spins against it, 5x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
