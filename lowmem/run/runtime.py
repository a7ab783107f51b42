"""Process-level plumbing for the loop: the Accelerator, host-side agreement between processes, signals."""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass

import torch
import torch.distributed as dist

from config import TrainConfig

from .errors import UserError

PRECISIONS = ("auto", "no", "bf16", "fp16")
# Warnings a run can do nothing about, each matched by its text and the module it is attributed to; anything else
# still shows (once per place, Python's default).
LOOP = r"lowmem\.train\.loop"  # the module the scheduler warnings are attributed to
KNOWN_WARNINGS = (
    # torch 2.13 deprecates the collectives DeepSpeed 0.19 calls (deepspeed/comm/torch.py) on every ZeRO-3 step
    (FutureWarning, r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor|_all_gather_base|"
                    r"_reduce_scatter_base)` is deprecated", r"torch\.distributed\.c10d_logger"),
    # DeepSpeed steps its own optimizer (the scheduler is pointed at it), which torch's scheduler cannot see: our
    # order, optimizer.step() then scheduler.step(), is right
    (UserWarning, r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`", LOOP),
    (UserWarning, r"Seems like `optimizer\.step\(\)` has been overridden after learning rate scheduler", LOOP),
)


@dataclass(frozen=True)
class Layout:
    """Where this process stands: its index among the processes, and its sequence-parallel group (N consecutive
    processes that share every sample, each holding 1/N of each sequence). Data positions, batch counts and
    gradient averages count data-parallel ranks, one per group, so checkpoints do not depend on N."""

    rank: int = 0
    world: int = 1
    sequence_parallel: int = 1

    @property
    def data_rank(self) -> int:
        return self.rank // self.sequence_parallel

    @property
    def data_world(self) -> int:
        return self.world // self.sequence_parallel

    @property
    def part(self) -> int:
        """This process's part of each sequence (0 .. sequence_parallel - 1)."""
        return self.rank % self.sequence_parallel

    @property
    def reports(self) -> bool:
        """Whether this process speaks for its group where the group's processes hold the same value (data counts)."""
        return self.part == 0


def quiet_known_warnings() -> None:
    """Filter KNOWN_WARNINGS by message and module (never all warnings of a kind)."""
    import warnings

    for category, message, module in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


def resolve_precision(cfg: TrainConfig) -> str:
    if cfg.mixed_precision not in PRECISIONS:
        raise UserError(f"mixed_precision '{cfg.mixed_precision}' is unknown; choose one of {', '.join(PRECISIONS)}")
    if cfg.bf16_weights:
        return "no"  # the weights themselves are bf16; autocast would add nothing
    if cfg.mixed_precision != "auto":
        if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
            raise UserError("mixed_precision=fp16 needs a CUDA GPU; use bf16 or no on CPU")
        return cfg.mixed_precision
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def build_accelerator(cfg: TrainConfig, parallelism_config=None):
    """The run's Accelerator; `parallelism_config`: accelerate's ParallelismConfig (sequence parallelism)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    trackers = [t for t in cfg.report_to.replace(" ", "").split(",") if t and t != "none"]
    for tracker in trackers:
        if tracker not in ("tensorboard", "wandb"):
            raise UserError(f"report_to '{tracker}' is unknown; use tensorboard, wandb, both comma-separated, or none")
    if "wandb" in trackers:
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise UserError("report_to includes wandb but wandb is not installed; pip install wandb or drop it")
    from .distributed import deepspeed_plugin, launcher_kind

    precision = resolve_precision(cfg)
    plugin = deepspeed_plugin(cfg, precision)  # None unless a deepspeed launch config or --deepspeed/--zero_stage
    on_cpu = not torch.cuda.is_available()
    extra = {}
    if on_cpu and plugin is not None:
        # Accelerate drops a DeepSpeed plugin when cpu=True; without it and without CUDA it finds no backend and
        # every process believes it is rank 0. Name gloo (DeepSpeed's CPU accelerator without oneCCL) explicitly.
        from accelerate.utils import InitProcessGroupKwargs

        extra["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
    if on_cpu and launcher_kind() == "fsdp":
        _fsdp_on_cpu()
    return Accelerator(
        cpu=on_cpu and plugin is None,  # without it, CPU processes under torchrun all believe they are rank 0
        **extra,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=precision,
        log_with=[_tracker(name, cfg) for name in trackers] or None,
        # trackers write to logging_dir/<name>: the parent here, the name in init_trackers
        project_config=ProjectConfiguration(project_dir=cfg.run_dir(), logging_dir=os.path.dirname(cfg.logging_dir())),
        step_scheduler_with_optimizer=False,
        **({"deepspeed_plugin": plugin} if plugin is not None else {}),
        **({"parallelism_config": parallelism_config} if parallelism_config is not None else {}),
    )


def _fsdp_on_cpu() -> None:
    """Let Accelerate's FSDP2 run over gloo on CPU processes (tests, laptops).

    Accelerate only turns an FSDP launch into FSDP for accelerator device types (MULTI_GPU, ...); on CPU
    processes (MULTI_CPU) it silently falls back to plain data parallel. Set up the CPU/gloo process state
    first, then present it as MULTI_GPU so AcceleratorState picks the FSDP plugin; the device stays cpu.
    """
    from accelerate.state import PartialState

    from .compat import present_cpu_processes_as_gpus

    present_cpu_processes_as_gpus(PartialState(cpu=True))


def _tracker(name: str, cfg: TrainConfig):
    """TensorBoard writes to log_dir/run_name; wandb logs to wandb_project under wandb_run_name."""
    if name == "wandb":
        from accelerate.tracking import WandBTracker

        return WandBTracker(cfg.wandb_project, name=cfg.wandb_run_name or cfg.run_name)
    return name


class HostChannel:
    """Agreement between processes on small host-side integers, over a CPU (gloo) group.

    The loop asks once per optimizer step: how many label tokens and micro-batches each process has
    and whether any process was asked to stop. Going through gloo keeps the GPU stream free of syncs.
    """

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.group = dist.new_group(backend="gloo") if world_size > 1 else None

    def gather(self, values: list[int]) -> torch.Tensor:
        """Every process's values, shape (world_size, len(values))."""
        local = torch.tensor([values], dtype=torch.long)
        if self.group is None:
            return local
        out = [torch.zeros_like(local) for _ in range(self.world_size)]
        dist.all_gather(out, local, group=self.group)
        return torch.cat(out)

    def gather_objects(self, value) -> list:
        """Every process's small picklable value (positions, counters), at save and log time only."""
        if self.group is None:
            return [value]
        out = [None] * self.world_size
        dist.all_gather_object(out, value, group=self.group)
        return out

    def on_main(self, is_main: bool, work):
        """Run `work` on the main process and give every process its result, or its UserError to raise."""
        outcome = None
        if is_main:
            try:
                outcome = ("ok", work())
            except UserError as exc:
                outcome = ("error", str(exc))
        if self.group is not None:
            box = [outcome]
            dist.broadcast_object_list(box, src=0, group=self.group)
            outcome = box[0]
        if outcome[0] == "error":
            raise UserError(outcome[1])
        return outcome[1]


class StopSignal:
    """SIGTERM/SIGINT set a flag; the loop finishes the optimizer step, checkpoints and exits."""

    def __init__(self):
        self.requested = False
        self.signal_name = ""
        self.agreed = ""  # set by the loop once the processes agree to stop: what asked for it
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def process_memory_summary() -> str:
    import psutil

    rss = psutil.Process(os.getpid()).memory_info().rss / 2**30
    gpu = f", GPU peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if torch.cuda.is_available() else ""
    return f"host RSS {rss:.2f} GiB{gpu}"
