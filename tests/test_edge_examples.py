"""The two embedding examples run as a user runs them: examples/edge_app.py cold, then warm from the profile its
first run wrote; examples/openai_client.py against a running `m2r2-moe serve`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("openai", reason="examples/openai_client.py needs the openai client: pip install 'm2r2_moe[test]'")
from test_serve import Server  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def _run(script: str, *args: str, cwd: Path) -> str:
    done = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.slow
def test_edge_app_starts_cold_then_warm(tmp_path):
    profile = tmp_path / "profile.json"
    cold = _run("edge_app.py", "--max-new-tokens", "8", "--profile", str(profile), cwd=tmp_path)
    assert "expert slots" in cold and ", cold" in cold and profile.is_file() and "first token after" in cold
    warm = _run("edge_app.py", "--max-new-tokens", "8", "--profile", str(profile), cwd=tmp_path)
    assert f"warm from {profile}" in warm


@pytest.mark.slow
def test_openai_client_example_talks_to_the_server(tmp_path):
    server = Server("--max-tokens", "64")
    try:
        out = _run("openai_client.py", "--url", server.url, "--max-tokens", "12", cwd=tmp_path)
        assert "model: tiny-mixtral" in out and "(12 tokens, finish_reason 'length')" in out and "hit rate" in out
    finally:
        assert server.stop() == 0
