"""Everything a run needs before its first step: accelerator, tokenizer, model, data, optimizer, resume."""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

import torch

from config import TrainConfig

from . import recompute
from .autobatch import cuda_probe, largest_fitting, limit_gpu_memory, split_global_batch
from .checkpoint import CheckpointManager
from .data.pipeline import TrainData
from .demo import ensure_demo_assets
from .ema import EMA
from .errors import UserError
from .memory_plan import STATE_BYTES, memory_plan
from .metrics import MetricsWriter
from .model import apply_training_options, build_model, count_parameters
from .optim import allow_optimizer_state_types, build_optimizer, build_scheduler
from .runtime import build_accelerator
from .tokenizer import load_tokenizer

# a resume with any of these changed would not continue the same run
EXACTNESS_FIELDS = ("train_file", "batch_size_per_gpu", "gradient_accumulation_steps", "max_seq_len", "model_type",
                    "model_preset", "seed", "dataloader_buffer_size", "train_on_prompt", "finetune_from_ckp_file",
                    "packing", "ablation_config", "prompt_style", "max_history_items", "max_samples_per_user",
                    "sample_seed", "resample_each_epoch", "val_ratio", "split_by")


@dataclass
class Session:
    cfg: TrainConfig
    accelerator: object
    tokenizer: object
    model: object
    data: TrainData
    optimizer: object
    scheduler: object
    checkpoints: CheckpointManager
    metrics: MetricsWriter
    ema: EMA | None
    state: dict  # step, epoch, data position, counters: everything train_state.json holds
    total_steps: int
    resumed_step: int | None
    is_encoder_decoder: bool
    last_eval: dict | None = None
    last_eval_step: int = -1

    def log(self, text: str) -> None:
        self.accelerator.print(text)


def check_values(cfg: TrainConfig) -> None:
    for name in ("batch_size_per_gpu", "gradient_accumulation_steps", "max_seq_len", "epochs", "logging_steps",
                 "eval_steps", "save_steps", "keep_latest_n_ckp", "dataloader_buffer_size", "max_nonfinite_steps"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name}={getattr(cfg, name)} must be at least 1")
    if cfg.learn_rate <= 0 or cfg.warmup_steps < 0 or cfg.max_steps < 0:
        raise UserError("--learn_rate must be > 0, --warmup_steps and --max_steps >= 0")
    if cfg.early_stopping_patience < 0:
        raise UserError(f"--early_stopping_patience={cfg.early_stopping_patience} must be >= 0 (0 turns it off)")
    recompute.check_options(cfg.gradient_checkpointing, cfg.gradient_checkpointing_mode, cfg.gradient_checkpointing_every)


def start_session(cfg: TrainConfig) -> Session:
    check_values(cfg)
    accelerator = build_accelerator(cfg)
    from accelerate.utils import set_seed

    with accelerator.main_process_first():
        for made in ensure_demo_assets(cfg.train_file, cfg.tokenizer_dir):
            accelerator.print(f"created {made}")
    tokenizer_dir = cfg.tokenizer_dir or cfg.finetune_from_ckp_file
    if not tokenizer_dir:
        raise UserError("no tokenizer: set --tokenizer_dir, or --finetune_from_ckp_file to a model dir with one")
    tokenizer = load_tokenizer(tokenizer_dir)
    set_seed(cfg.seed)
    # initialise on the GPU (seconds, not minutes, for 7B); sharded setups (ZeRO-3, FSDP) build on the host
    on_device = accelerator.device.type == "cuda" and accelerator.distributed_type.name in ("NO", "MULTI_GPU")
    with torch.device(accelerator.device if on_device else "cpu"):
        built = build_model(cfg, tokenizer)
    model = apply_training_options(built, cfg)
    is_enc_dec = bool(model.config.is_encoder_decoder)
    world = accelerator.num_processes
    data = TrainData(cfg, tokenizer, is_enc_dec, accelerator.process_index, world,
                     pin_memory=accelerator.device.type == "cuda", log=accelerator.print)
    data.encoder.trace = cfg.trace_samples
    steps_per_epoch = math.ceil(data.batches_per_epoch() / cfg.gradient_accumulation_steps)
    total_steps = steps_per_epoch * cfg.epochs
    total_steps = min(cfg.max_steps, total_steps) if cfg.max_steps else total_steps
    budget = limit_gpu_memory(cfg.max_gpu_memory_gb)
    if cfg.auto_batch_size:
        cfg = _auto_batch(cfg, accelerator, model, tokenizer, budget)
        data.cfg = cfg
    ema = EMA(model, cfg.ema_decay) if cfg.use_ema else None
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    if accelerator.distributed_type.name == "DEEPSPEED":
        scheduler.optimizer = model.optimizer  # schedule the groups DeepSpeed steps (its CPU Adam when offloading)
    if ema is not None:
        ema.model.to(accelerator.device)
    fingerprint = {name: getattr(cfg, name) for name in EXACTNESS_FIELDS} | {"world_size": world}
    state = {"step": 0, "epoch": 0, "position": 0, "skip": 0, "tokens_seen": 0, "best_eval_loss": None,
             "evals_without_improvement": 0, "nonfinite_steps": 0, "nonfinite_total": 0,
             "fingerprint": fingerprint}
    checkpoints = CheckpointManager(accelerator, cfg.checkpoint_dir(), cfg.keep_latest_n_ckp)
    if cfg.is_keep_training:
        _resume(cfg, accelerator, checkpoints, model, optimizer, scheduler, ema, state)
    resumed_step = state["step"] if cfg.is_keep_training and state["step"] else None
    accelerator.init_trackers(os.path.basename(cfg.logging_dir()), config={k: v for k, v in dataclasses.asdict(cfg).items()
                                                     if isinstance(v, (int, float, str, bool))})
    session = Session(cfg, accelerator, tokenizer, model, data, optimizer, scheduler, checkpoints,
                      MetricsWriter(accelerator, cfg.logging_dir(), resumed_step), ema, state, total_steps,
                      resumed_step, is_enc_dec)
    session.log(_summary(session, steps_per_epoch))
    return session


def _auto_batch(cfg: TrainConfig, accelerator, model, tokenizer, budget: int) -> TrainConfig:
    """Pick the largest micro-batch that fits (the same on every process) and re-split the global batch."""
    if not torch.cuda.is_available():
        raise UserError("--auto_batch_size=True needs a CUDA GPU; set --batch_size_per_gpu yourself on CPU")
    model.to(accelerator.device)
    per_process = cfg.batch_size_per_gpu * cfg.gradient_accumulation_steps
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    state_bytes = int(trained * STATE_BYTES.get(cfg.optimizer, 8) + trained * (2 if cfg.bf16_weights else 4))
    fits = cuda_probe(model, state_bytes, cfg.max_seq_len, len(tokenizer), budget)
    with accelerator.autocast():
        largest = largest_fitting(fits, per_process)
    largest = _min_over_processes(accelerator, largest)
    micro, steps = split_global_batch(per_process, largest)
    accelerator.gradient_accumulation_steps = steps
    accelerator.print(f"auto_batch_size: largest micro-batch that fits is {largest}; using {micro} x {steps} "
                      f"accumulation steps = {per_process} samples per process per optimizer step")
    return dataclasses.replace(cfg, batch_size_per_gpu=micro, gradient_accumulation_steps=steps)


def _min_over_processes(accelerator, value: int) -> int:
    if accelerator.num_processes == 1:
        return value
    import torch.distributed as dist

    tensor = torch.tensor([value], device=accelerator.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())


def _resume(cfg, accelerator, checkpoints, model, optimizer, scheduler, ema, state) -> None:
    if cfg.optimizer != "adamw" or cfg.bf16_weights:
        allow_optimizer_state_types()
    path, saved = checkpoints.restore_latest(model, optimizer, scheduler, accelerator.print,
                                             ema.model if ema is not None else None)
    if path is None:
        accelerator.print(f"no usable checkpoint in {cfg.checkpoint_dir()}; starting from step 0")
        return
    old = saved.get("fingerprint", {})
    changed = {k: (old.get(k), v) for k, v in state["fingerprint"].items() if old.get(k) != v}
    if changed and not cfg.allow_config_change:
        raise UserError(f"resume refused: {', '.join(f'{k} was {a!r}, now {b!r}' for k, (a, b) in changed.items())}; "
                        "pass --allow_config_change=True to continue anyway (the run will not be exact)")
    state.update({k: saved[k] for k in state if k in saved and k != "fingerprint"})
    checkpoints.last_saved_step = state["step"]
    accelerator.print(f"resumed from {path}: step {state['step']}, epoch {state['epoch']}, "
                      f"position {state['position']}")


def _summary(s: Session, steps_per_epoch: int) -> str:
    cfg, acc = s.cfg, s.accelerator
    world, ga = acc.num_processes, cfg.gradient_accumulation_steps
    n_params = count_parameters(acc.unwrap_model(s.model))
    trained = count_parameters(acc.unwrap_model(s.model), trained_only=True)
    unit = "packed rows of" if s.data.packing else "samples, up to"
    return (f"model {cfg.model_type}/{cfg.model_preset}{' from ' + cfg.finetune_from_ckp_file if cfg.finetune_from_ckp_file else ''}: "
            f"{n_params / 1e6:.2f}M parameters ({trained / 1e6:.2f}M trained) | devices: {world} x {acc.device.type} ({_sharding(acc)[0]}) | "
            f"precision: {acc.mixed_precision}{' (bf16 weights)' if cfg.bf16_weights else ''} | effective batch "
            f"{cfg.batch_size_per_gpu} x {world} x {ga} = {cfg.batch_size_per_gpu * world * ga} {unit} "
            f"{cfg.max_seq_len} tokens | {s.total_steps} optimizer steps planned (~{steps_per_epoch}/epoch) | "
            f"optimizer {cfg.optimizer} | logs: {cfg.logging_dir()}\n{_memory_plan(s)}")


def _sharding(acc) -> tuple[str, int, bool]:
    """How the model is spread over the processes: (name, ZeRO-like stage, optimizer offloaded)."""
    plugin = getattr(acc.state, "deepspeed_plugin", None)
    if plugin is not None:
        stage = int(plugin.zero_stage or 0)
        offload = plugin.deepspeed_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device")
        return f"DeepSpeed ZeRO-{stage}", stage, offload not in ("none", None)
    if acc.distributed_type.name == "FSDP":
        return "FSDP", 3, False  # full shard: like ZeRO-3
    return ("data parallel" if acc.num_processes > 1 else "one process"), 0, False


def _memory_plan(s: Session) -> str:
    """The memory plan for this process: ZeRO stage k shards the optimizer states, gradients, weights (k=1..3)."""
    acc = s.accelerator
    _, stage, offload = _sharding(acc)
    return memory_plan(acc.unwrap_model(s.model), s.cfg, str(acc.mixed_precision), acc.num_processes, stage, offload)


def load_best_into(session: Session) -> str | None:
    """Copy the best checkpoint's weights into the model (and EMA); returns its path."""
    best = os.path.join(session.cfg.checkpoint_dir(), "best")
    if not os.path.isdir(best):
        return None
    from safetensors.torch import load_file

    for sub, target in (("model", session.accelerator.unwrap_model(session.model)),
                        ("ema", session.ema.model if session.ema else None)):
        folder = os.path.join(best, sub)
        if target is None or not os.path.isdir(folder):
            continue
        weights = {}
        for name in os.listdir(folder):
            if name.endswith(".safetensors"):
                weights.update(load_file(os.path.join(folder, name)))
        with torch.no_grad():
            target.load_state_dict(weights, strict=False)
    return best
