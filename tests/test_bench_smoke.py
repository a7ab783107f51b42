"""The throughput bench runs end to end on CPU in CI size and prints every column."""
from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO


def test_throughput_bench_cpu_tiny(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(REPO, "bench", "throughput.py"), "--device", "cpu",
                             "--preset", "tiny", "--steps", "4", "--workdir", str(tmp_path)],
                            capture_output=True, text=True, timeout=1800, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    for column in ("tokens/s", "MFU", "peak GPU reserved GiB", "vs HF", "vs HF-compile"):
        assert column in out, column
    for trainer in ("lowmem", "HF", "HF-compile"):
        assert trainer in out
    assert "x HF" in out and "x HF-compile" in out
    assert "real tokens" in out or "padding" in out.lower()


def test_checkpointing_bench_cpu_tiny():
    result = subprocess.run([sys.executable, os.path.join(REPO, "bench", "checkpointing.py"), "--preset=tiny",
                             "--seq=64", "--batch=2", "--steps=1", "--vocab=512", "--modes=none,full,selective/2"],
                            capture_output=True, text=True, timeout=1800, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in result.stdout.splitlines() if line.startswith("| ") and "---" not in line}
    assert list(rows) == ["mode", "none", "full", "selective/2"]
    assert rows["none"][1] == "1.00x"
    estimate = {mode: float(cells[3]) for mode, cells in rows.items() if mode != "mode"}
    assert estimate["full"] < estimate["selective/2"] < estimate["none"]  # the plan orders the modes by memory kept
