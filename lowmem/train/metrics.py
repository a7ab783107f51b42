"""What a run reports: metrics.jsonl (one JSON object per logged step) and the Accelerate trackers (TensorBoard,
wandb), throughput and MFU, the progress bar, peak memory, and the per-sample trace."""
from __future__ import annotations

import contextlib
import json
import math
import os
import threading
import time

import psutil
import torch

from ..run.errors import is_disk_full, log_dir_full


def host_rss_bytes() -> float:
    return float(psutil.Process().memory_info().rss)


def host_rss_gb() -> float:
    return host_rss_bytes() / 2**30


def host_peak_rss_gb() -> float:
    """The process's peak resident memory so far (what the memory plan predicts on a CPU)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def gpu_memory_gb() -> dict[str, float]:
    if not torch.cuda.is_available():
        return {}
    return {"gpu_mem_allocated_gb": torch.cuda.memory_allocated() / 2**30,
            "gpu_mem_peak_gb": torch.cuda.max_memory_allocated() / 2**30}


def flops_per_token(model) -> float:
    """Training FLOPs per token: 6 x the non-embedding parameters a token computes with (forward + backward), the
    usual estimate; for a mixture of experts, its active parameters (k of E experts)."""
    from ..model.sizes import parameter_counts, real_numel

    return 6.0 * (parameter_counts(model)[1] - real_numel(model.get_input_embeddings().weight))


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


def _quiet_tracker_threads_on_a_full_disk() -> None:
    """TensorBoard's writer thread re-raises a full disk as a thread traceback; the main thread reports it as one line
    at its next write (MetricsWriter), so the thread's copy is not printed."""
    shown = threading.excepthook
    if getattr(shown, "quiet_full_disk", False):
        return

    def hook(args):
        if not (is_disk_full(args.exc_value) and type(args.thread).__module__.startswith("tensorboard")):
            shown(args)

    hook.quiet_full_disk = True
    threading.excepthook = hook


class MetricsWriter:
    """Writes the same records to metrics.jsonl and to the Accelerate trackers, main process only. A write that fails
    for lack of space (ours, or a tracker's flush however much space was left) is one DiskFull line."""

    def __init__(self, accelerator, log_dir: str, resume_step: int | None, config: dict | None = None):
        self.accelerator, self.log_dir = accelerator, log_dir
        self.path = os.path.join(log_dir, "metrics.jsonl")
        self.enabled = accelerator.is_main_process
        if self.enabled:
            _quiet_tracker_threads_on_a_full_disk()
            with self._disk_full_is_one_line():
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
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k not in ("step", "time")}
        scalars = {k: v for k, v in scalars.items() if not (isinstance(v, float) and math.isnan(v))}
        with self._disk_full_is_one_line():
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record, allow_nan=True) + "\n")
            self.accelerator.log(scalars, step=step)  # TensorBoard flushes here

    def log_text(self, tag: str, text: str, step: int) -> None:
        if not self.enabled:
            return
        for tracker in self.accelerator.trackers:
            writer = getattr(tracker, "writer", None)
            if hasattr(writer, "add_text"):
                with self._disk_full_is_one_line():
                    writer.add_text(tag, text, global_step=step)

    def close(self) -> None:
        """End the trackers (TensorBoard writes what it still holds)."""
        with self._disk_full_is_one_line():
            self.accelerator.end_training()

    @contextlib.contextmanager
    def _disk_full_is_one_line(self):
        try:
            yield
        except OSError as exc:
            raise log_dir_full(self.log_dir, exc) or exc from None


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


# ---------------------------------------------------------------- what the loop reports while it trains

class Progress:
    """The one training bar (ETA, loss, lr, last eval loss) on the main process; log lines go above it."""

    def __init__(self, accelerator, total: int, initial: int):
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=initial, disable=not accelerator.is_main_process, unit="step",
                        dynamic_ncols=True, desc="train")
        self.fields: dict[str, str] = {}

    def update(self) -> None:
        self.bar.update(1)

    def show(self, **fields: str) -> None:
        self.fields.update(fields)
        self.bar.set_postfix(self.fields, refresh=True)

    def close(self) -> None:
        self.bar.close()


def peak_memory_line(step: int) -> str:
    """Peak GPU memory, or peak host RSS on CPU, so far."""
    if torch.cuda.is_available():
        return f"peak GPU memory after step {step}: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
    return f"peak host memory (RSS) after step {step}: {host_peak_rss_gb():.2f} GiB"


class Meter:
    """Throughput and padding over the steps since the last log; the only host sync is at log time."""

    def __init__(self, flop_per_token: float, world: int, devices: int | None = None):
        self.flop_per_token, self.world = flop_per_token, world  # world: data-parallel ranks (one per SP group)
        self.devices = devices or world
        self.reset()

    def reset(self) -> None:
        self.steps, self.samples, self.real, self.total, self.start = 0, 0, 0, 0, time.time()

    def add(self, window: list) -> None:
        self.steps += 1
        self.samples += sum(b.samples for b in window) * self.world
        self.real += sum(b.real_tokens for b in window)
        self.total += sum(b.total_tokens for b in window)

    def record(self, loss: float, grad_norm, lr: float, state) -> dict:
        elapsed = max(time.time() - self.start, 1e-9)
        tokens_per_sec = self.real * self.world / elapsed
        record = {"epoch": state.epoch, "loss": loss, "lr": lr, "grad_norm": float(grad_norm),
                  "tokens_per_sec": tokens_per_sec, "samples_per_sec": self.samples / elapsed,
                  "real_token_fraction": self.real / max(self.total, 1), "tokens_seen": state.tokens_seen,
                  "nonfinite_total": state.nonfinite_total, "host_rss_gb": host_rss_gb(),
                  "host_peak_rss_gb": host_peak_rss_gb(), **gpu_memory_gb()}
        if torch.cuda.is_available():
            record["mfu"] = tokens_per_sec * self.flop_per_token / (peak_flops() * self.devices)
        self.reset()
        return record


class SampleTrace:
    """samples_rank<r>.jsonl: per optimizer step, a hash of each sample this process trained on (--trace_samples)."""

    def __init__(self, log_dir: str, rank: int, resumed_step: int | None):
        path = os.path.join(log_dir, f"samples_rank{rank}.jsonl")
        os.makedirs(log_dir, exist_ok=True)
        if resumed_step is None:
            open(path, "w").close()
        else:
            truncate_jsonl(path, resumed_step)
        self.file = open(path, "a", encoding="utf-8", buffering=1)

    def write(self, step: int, epoch: int, window: list) -> None:
        self.file.write(json.dumps({"step": step, "epoch": epoch,
                                    "samples": [h for b in window for h in b.sample_hashes]}) + "\n")

    def close(self) -> None:
        self.file.close()


class TrainReport:
    """Everything the loop reports while it trains: the step's loss parts since the last log (kept on the device),
    the meter, the progress bar, the first peak-memory line, evaluations, and the sample trace."""

    def __init__(self, accelerator, writer: MetricsWriter, flop_per_token: float, total_steps: int, state,
                 trace: SampleTrace | None, log, data_world: int | None = None):
        self.accelerator, self.writer, self.trace, self.log = accelerator, writer, trace, log
        self.running: dict[str, torch.Tensor] = {}  # name -> summed share of each step's value, on the device
        self.meter = Meter(flop_per_token, data_world or accelerator.num_processes, accelerator.num_processes)
        self.progress = Progress(accelerator, total_steps, state.step)
        self.peak_reported = False

    def accumulate(self, parts: dict, share: float) -> None:
        """A micro-batch's loss parts, each weighted by its share of the step (no host sync)."""
        for name, value in parts.items():
            if name not in self.running:
                self.running[name] = torch.zeros((), device=self.accelerator.device)
            self.running[name] += value.float() / share

    def add(self, state, window: list) -> None:
        """After each optimizer step."""
        self.meter.add(window)
        self.progress.update()
        if self.trace is not None:
            self.trace.write(state.step, state.epoch, window)

    def log_step(self, state, grad_norm, lr: float, counts: dict) -> None:
        steps = max(self.meter.steps, 1)
        names = sorted(self.running)
        summed = self.accelerator.reduce(torch.stack([self.running[n] for n in names]), reduction="sum").tolist() \
            if names else []
        values = {name: value / steps for name, value in zip(names, summed)}
        record = self.meter.record(values.pop("loss", float("nan")), grad_norm, lr, state)
        record.update(values)
        record.update({f"data_{k}": v for k, v in sorted(counts.items())})
        self.writer.log(record, state.step)
        self.progress.show(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
        if not self.peak_reported:  # set against the memory plan printed at the start
            self.peak_reported = True
            self.log(peak_memory_line(state.step))
        for value in self.running.values():
            value.zero_()

    def log_eval(self, state, result: dict) -> None:
        self.writer.log({"epoch": state.epoch, **result}, state.step)
        self.progress.show(eval=f"{result['eval_loss']:.4f}")
        per_set = "".join(f", {k[len('eval_loss/'):]} {v:.4f}" for k, v in result.items() if k.startswith("eval_loss/"))
        self.log(f"step {state.step}: eval_loss {result['eval_loss']:.4f}{per_set}")

    def close(self) -> None:
        self.progress.close()  # before any error line, so it starts on a line of its own
        if self.trace is not None:
            self.trace.close()
