"""The throughput bench runs end to end on CPU in CI size and prints every column."""
from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO


def test_throughput_bench_cpu_tiny(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(REPO, "bench", "throughput.py"), "--device", "cpu",
                             "--preset", "tiny", "--steps", "4", "--workdir", str(tmp_path)],
                            capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    for column in ("tokens/s", "MFU", "peak GPU reserved GiB", "vs HF", "vs HF-compile"):
        assert column in out, column
    for trainer in ("lowmem", "HF", "HF-compile"):
        assert trainer in out
    assert "x HF" in out and "x HF-compile" in out
    assert "real tokens" in out or "padding" in out.lower()
