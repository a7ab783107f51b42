"""The throughput bench runs end to end on CPU in CI size and prints every column."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO


@pytest.mark.slow
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


@pytest.mark.slow
def test_checkpointing_bench_cpu_tiny():
    """Two modes, each in its own process as the bench runs them; the plan's estimate of every mode beside."""
    result = subprocess.run([sys.executable, os.path.join(REPO, "bench", "checkpointing.py"), "--preset=tiny",
                             "--seq=64", "--batch=2", "--steps=1", "--vocab=512", "--modes=none,selective/2"],
                            capture_output=True, text=True, timeout=1800, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in result.stdout.splitlines() if line.startswith("| ") and "---" not in line}
    assert list(rows) == ["mode", "none", "selective/2"]
    assert rows["none"][1] == "1.00x"
    printed = {mode: float(cells[3]) for mode, cells in rows.items() if mode != "mode"}

    from config import TrainConfig
    from lowmem.model.build import _hf_config
    from lowmem.train.memory_plan import activation_bytes

    sys.path.insert(0, os.path.join(REPO, "bench"))
    from checkpointing import MODES

    def estimate(mode):
        fields = {"gradient_checkpointing": MODES[mode] is not None}
        if MODES[mode]:
            fields.update(gradient_checkpointing_mode=MODES[mode][0], gradient_checkpointing_every=MODES[mode][1])
        cfg = TrainConfig(model_preset="tiny", max_seq_len=64, batch_size_per_gpu=2, chunked_cross_entropy=False,
                          **fields)  # the bench ran without --chunked_cross_entropy
        return activation_bytes(_hf_config(cfg, 512, {"pad": 0, "eos": 1, "bos": None}), cfg, "no", 2 * 64) / 2**20

    assert all(printed[mode] == pytest.approx(estimate(mode), abs=0.05) for mode in printed)
    # the plan orders the modes by memory kept
    assert estimate("full") < estimate("full/2") < estimate("selective/2") < estimate("none")
    assert estimate("full") < estimate("selective") < estimate("selective/2")
