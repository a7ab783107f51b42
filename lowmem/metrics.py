"""Metrics: metrics.jsonl (one JSON object per logged step) plus Accelerate trackers (TensorBoard, wandb)."""
from __future__ import annotations

import json
import math
import os
import time

import psutil
import torch


def host_rss_gb() -> float:
    return psutil.Process().memory_info().rss / 2**30


def gpu_memory_gb() -> dict[str, float]:
    if not torch.cuda.is_available():
        return {}
    return {"gpu_mem_allocated_gb": torch.cuda.memory_allocated() / 2**30,
            "gpu_mem_peak_gb": torch.cuda.max_memory_allocated() / 2**30}


def flops_per_token(model) -> float:
    """Training FLOPs per token: 6 x non-embedding parameters (forward + backward), the usual estimate."""
    from .model import count_parameters, real_numel

    return 6.0 * (count_parameters(model) - real_numel(model.get_input_embeddings().weight))


def truncate_jsonl(path: str, last_step: int) -> None:
    """Drop records past `last_step` (written after the checkpoint a resume starts from).

    A line cut short by a kill during its write is dropped too, so a torn log never stops a resume.
    """
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        kept = [line for line in f if (step := _step_of(line)) is not None and step <= last_step]
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(tmp, path)


def _step_of(line: str) -> int | None:
    """The step of one complete jsonl record, or None for a blank, unterminated or unreadable line."""
    if not line.endswith("\n") or not line.strip():
        return None
    try:
        return json.loads(line).get("step", 0)
    except json.JSONDecodeError:
        return None


class MetricsWriter:
    """Writes the same records to metrics.jsonl and to the Accelerate trackers, main process only."""

    def __init__(self, accelerator, log_dir: str, resume_step: int | None, config: dict | None = None):
        self.accelerator = accelerator
        self.path = os.path.join(log_dir, "metrics.jsonl")
        self.enabled = accelerator.is_main_process
        if self.enabled:
            os.makedirs(log_dir, exist_ok=True)
            if resume_step is None:
                open(self.path, "w").close()
            else:
                truncate_jsonl(self.path, resume_step)
            if config is not None and resume_step is None:
                # as text: TensorBoard's add_hparams would open a second, empty run beside this one
                self.log_text("config", "    " + json.dumps(config, indent=1).replace("\n", "\n    "), 0)

    def log(self, record: dict, step: int) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **record}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, allow_nan=True) + "\n")
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k not in ("step", "time")}
        scalars = {k: v for k, v in scalars.items() if not (isinstance(v, float) and math.isnan(v))}
        self.accelerator.log(scalars, step=step)

    def log_text(self, tag: str, text: str, step: int) -> None:
        if not self.enabled:
            return
        for tracker in self.accelerator.trackers:
            writer = getattr(tracker, "writer", None)
            if hasattr(writer, "add_text"):
                writer.add_text(tag, text, global_step=step)


_PEAK_FLOPS: list[float] = []


def peak_flops() -> float:
    """The GPU's bf16 matmul ceiling, measured once (FLOP/s); MFU is reported against it."""
    if not _PEAK_FLOPS:
        n = 8192
        a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):
            a @ b
        torch.cuda.synchronize()
        start, reps = time.perf_counter(), 20
        for _ in range(reps):
            a @ b
        torch.cuda.synchronize()
        _PEAK_FLOPS.append(2 * n**3 * reps / (time.perf_counter() - start))
        del a, b
    return _PEAK_FLOPS[0]
