"""Shared by the benchmarks: machine description and appending a dated section to BENCHMARKS.md."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, {gpu}; Python {platform.python_version()}, torch {torch.__version__}, "
            f"torch threads {torch.get_num_threads()}")


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def append_section(title: str, body: str, path: Path | None = None) -> Path:
    """Append `## title` with the command line, machine and date to BENCHMARKS.md."""
    path = path or ROOT / "BENCHMARKS.md"
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = "" if path.exists() else "# Benchmarks\n\nEach section is appended by the script named in it.\n"
    with path.open("a") as f:
        f.write(f"{header}\n## {title}\n\n- command: `{command}`\n- machine: {machine()}\n- date: {stamp}\n\n{body}\n")
    return path


def publish(title: str, table: str, extra: str, record: bool = True) -> None:
    """Print a benchmark's table and notes; unless `record` is false, append them to BENCHMARKS.md as `title`."""
    print(table + "\n" + extra)
    if record:
        print(f"appended to {append_section(title, table + chr(10) + extra)}")
