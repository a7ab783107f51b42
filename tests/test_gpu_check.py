"""bench/gpu_check.py in CPU mode: every part runs at toy sizes and the report has every part, column and target.

The GPU call is one shot; this runs the same code paths (subprocess workers, the trainer's command line,
the time guards, the wheel install) so that call cannot fail on a typo. The first test runs every part but
gpu_tests, which the second runs after a part its guard kills.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile

import pytest
from conftest import REPO

SCRIPT = os.path.join(REPO, "bench", "gpu_check.py")
PARTS = ["1b", "packed", "7b", "lora7b", "qlora7b", "preference", "longctx", "graph_breaks"]


def _run(*args, timeout=1800):
    result = subprocess.run([sys.executable, SCRIPT, "--cpu", *args], capture_output=True, text=True, timeout=timeout,
                            cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _report(out) -> tuple[dict, str]:
    with open(os.path.join(out, "gpu_check.json")) as f:
        report = json.load(f)
    with open(os.path.join(out, "gpu_check.md")) as f:
        return report, f.read()


@pytest.mark.slow
def test_cpu_mode_reports_every_part_column_and_target(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    printed = _run("--out", str(out), "--workdir", str(work), "--parts", ",".join(PARTS)).stdout
    report, md = _report(out)
    parts = report["parts"]
    assert list(parts) == PARTS and all(p["status"] == "done" for p in parts.values()), parts
    for name in PARTS:
        assert f"## {name} (done" in md

    one_b = parts["1b"]
    assert [r["ok"] for r in one_b["runs"]] == [True, True]
    assert [r["spec"]["trainer"] for r in one_b["runs"]] == ["lowmem", "hf"]
    for column in ("tokens/s", "MFU", "peak GPU alloc / reserved GiB", "vs HF-compile", "x HF-compile"):
        assert column in one_b["table"], column

    packed = parts["packed"]
    flex, hf_padding, hf_flat, sdpa = packed["runs"]
    assert flex["ok"] or flex.get("unavailable"), flex  # FlexAttention has no CPU backward in torch 2.13
    assert hf_padding["ok"] and hf_flat["ok"] and sdpa["ok"]
    assert sdpa["attn"] == "sdpa" and sdpa["real_fraction"] > 0.9  # packed rows are nearly all real tokens
    assert hf_padding["real_fraction"] < hf_flat["real_fraction"] == 1.0
    for column in ("real tokens/s", "real-token share", "vs HF padding", "vs HF padding-free", "x HF ", "x HF-flatten"):
        assert column in packed["table"], column

    run_7b = parts["7b"]["runs"][0]
    assert run_7b["ok"] and run_7b["records"] >= 3, run_7b
    assert run_7b["first_step_s"] > 0 and run_7b["tokens_per_sec"] > 0 and run_7b["host_peak_rss_gib"] > 0
    assert run_7b["command"][1].endswith("train_low_mem.py") and run_7b["command"][2] == "train"
    assert "--gradient_checkpointing=True" in run_7b["command"]
    for column in ("time to first step s", "tokens/s", "peak GPU alloc GiB", "host peak RSS GiB"):
        assert column in parts["7b"]["table"], column

    lora = parts["lora7b"]["runs"]
    assert len(lora) == 1 and lora[0]["ok"] and lora[0]["records"] >= 3 and lora[0]["mb"] == 2, lora
    assert lora[0]["first_step_s"] > 0 and lora[0]["tokens_per_sec"] > 0 and lora[0]["host_peak_rss_gib"] > 0
    assert lora[0]["command"][2] == "train" and "--model_preset=tiny" in lora[0]["command"]
    for flag in ("--lora_r=16", "--lora_alpha=32", "--gradient_checkpointing=True", "--batch_size_per_gpu=2"):
        assert flag in lora[0]["command"], flag
    assert not any(f.startswith(("--max_gpu_memory_gb", "--bf16_weights", "--qlora")) for f in lora[0]["command"])
    for column in ("time to first step s", "tokens/s", "peak GPU alloc GiB", "host peak RSS GiB", "| 7B LoRA | 2 |"):
        assert column in parts["lora7b"]["table"], column

    qlora = parts["qlora7b"]["runs"]
    assert len(qlora) == 1 and qlora[0]["refused"] and qlora[0]["rc"] == 2 and "--qlora=True" in qlora[0]["command"]
    with open(qlora[0]["log"]) as f:  # the trainer's one-line refusal, not a traceback
        lines = [line for line in f.read().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --qlora=True cannot run here: it needs a CUDA GPU"), lines
    assert "| 7B QLoRA | 2 |" in md and "refused on CPU as expected: error: --qlora=True cannot run here" in md

    longctx = parts["longctx"]
    assert [r["ok"] for r in longctx["runs"]] == [True, True], longctx["runs"]
    assert all(r["plan_gib"] and r["plan_longest"] for r in longctx["runs"])  # read from what each run printed
    for column in ("plan GiB", "plan longest", "offload engine"):
        assert column in longctx["table"], column

    preference = parts["preference"]
    cache, model, sft = preference["runs"]
    assert cache["ok"] and model["ok"] and sft["ok"], preference["runs"]
    assert cache["spec"]["cfg"]["reference"] == "cache" and model["spec"]["cfg"]["reference"] == "model"
    assert cache["spec"]["cfg"]["reference_cache_dir"].startswith(str(work / "refcache_"))
    assert cache["spec"]["data"] == model["spec"]["data"] != sft["spec"]["data"]
    assert sft["spec"]["mb"] == 2 * cache["spec"]["mb"] == 2 * model["spec"]["mb"]  # a pair is two rows
    for run in (cache, model, sft):
        assert run["first_step_s"] > 0 and run["step_s"] > 0 and run["tokens_per_sec"] > 0, run
        assert run["host_peak_rss_gib"] > 0
    # a fresh cache, built before step 1: 16 pairs, 2 per forward pass
    assert re.search(r"reference cache \S+: 16 rows, computed in 8 forward passes per process", printed)
    for column in ("DPO, reference cache", "DPO, --reference=model", "SFT, prompt + chosen", "time to first step s",
                   "step time s", "tokens/s", "host peak RSS GiB", "step time vs --reference=model", "x faster"):
        assert column in preference["table"], column

    graph = parts["graph_breaks"]["runs"][0]
    assert graph["ok"], graph
    rows = {r["config"]: r for r in graph["rows"]}
    assert rows["token windows (mask of ones)"]["breaks"] == 0
    chunked = rows["--chunked_cross_entropy"]
    assert chunked["breaks"] == 1 and "chunked_loss.py" in chunked["reasons"][0]
    after_two, after_four = chunked["graphs_over_widths"].split(" -> ")
    assert after_two == after_four  # no recompiling per width

    checks = [t["check"] for p in parts.values() for t in p["targets"]]
    for needle in ("1B tokens/s vs HF-compile", "1B MFU", "HF padding", "HF padding-free", "7B tokens/s",
                   "7B peak GPU memory", "7B host peak RSS", "7B time to first step", "7B LoRA peak GPU memory",
                   "7B LoRA fits at micro-batch 1-2", "7B QLoRA peak GPU memory", "DPO cache peak memory vs SFT",
                   "DPO cache step time vs --reference=model", "graph breaks"):
        assert any(needle in c for c in checks), needle
        assert needle in md


def _probe_wheel(folder) -> str:
    """A minimal pure-Python wheel, so the --wheels install runs for real."""
    path = os.path.join(folder, "gpu_check_probe-0.1-py3-none-any.whl")
    info = "gpu_check_probe-0.1.dist-info"
    files = {"gpu_check_probe.py": "VALUE = 1\n",
             f"{info}/METADATA": "Metadata-Version: 2.1\nName: gpu-check-probe\nVersion: 0.1\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(path, "w") as whl:
        for name, text in files.items():
            whl.writestr(name, text)
    return path


def test_a_part_past_its_guard_is_killed_and_the_rest_still_lands(tmp_path):
    wheels, site, out = tmp_path / "wheels", tmp_path / "site", tmp_path / "out"
    wheels.mkdir()
    _probe_wheel(str(wheels))
    _run("--out", str(out), "--workdir", str(tmp_path / "work"), "--parts", "graph_breaks,gpu_tests",
         "--guard", "graph_breaks=3", "--wheels", str(wheels), "--site", str(site))
    report, md = _report(out)
    assert report["wheels"]["rc"] == 0 and (site / "gpu_check_probe.py").is_file(), report["wheels"]
    graph = report["parts"]["graph_breaks"]
    assert graph["runs"][0]["error"] == "time guard: killed" and graph["wall_s"] < 20
    tests = report["parts"]["gpu_tests"]
    assert tests["runs"][0]["ok"] and "collected" in tests["runs"][0]["summary"], tests
    assert "time guard: killed" in md and "GPU tests" in md
