"""Everything a run needs before its first step, in an order that never harms an existing run:

1. the run's lock, and the refusal of a fresh start over an existing run (or its deletion on request);
2. on resume, the checkpoint chosen, verified and its settings compared, before any weight is loaded;
3. tokenizer, model, data (checked before step 1), optimizer, accelerator preparation;
4. the restore, with the settings that may change applied and logged.
"""
from __future__ import annotations

import dataclasses
import math
import os
import socket
from dataclasses import dataclass

import torch

from config import TrainConfig

from .autobatch import cuda_probe, largest_fitting, limit_gpu_memory, split_global_batch
from .checkpoint import (CheckpointManager, ResumePlan, apply_settings, fingerprint, optimizer_hyperparameters,
                         plan_resume)
from .data.pipeline import TrainData
from .data.sources import missing_inputs
from .demo import ensure_demo_assets
from .ema import EMA
from .errors import UserError
from .memory_plan import STATE_BYTES, memory_plan
from .metrics import MetricsWriter
from .model import apply_training_options, build_model, count_parameters
from .optim import allow_optimizer_state_types, build_optimizer, build_scheduler
from .ownership import RunLock, check_log_dir, claim_log_dir, exit_with_launcher, refuse_or_clear_existing
from .runtime import HostChannel, build_accelerator
from .state import RankPosition, TrainState
from .tokenizer import load_tokenizer
from .validate import check_config, config_warnings


# settings the optimizer's param groups hold: a change on resume is written into them
OPTIMIZER_SETTINGS = ("learn_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_eps")


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
    state: TrainState
    total_steps: int
    steps_per_epoch: int
    resumed_step: int | None
    is_encoder_decoder: bool
    channel: HostChannel
    lock: RunLock
    fingerprint: dict
    last_eval: dict | None = None
    last_eval_step: int = -1

    def log(self, text: str) -> None:
        """A line above the progress bar, from the main process only."""
        if self.accelerator.is_main_process:
            from tqdm import tqdm

            tqdm.write(text)

    @property
    def rank(self) -> int:
        return self.accelerator.process_index


def start_session(cfg: TrainConfig) -> Session:
    check_config(cfg)
    missing = missing_inputs(cfg)
    if missing:  # all of them at once, before the launcher's noise and before anything is written
        raise UserError(f"{len(missing)} input(s) missing: " + "; ".join(missing))
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # save_pretrained's "Writing model shards" bar would tangle with ours
    accelerator = build_accelerator(cfg)
    channel = HostChannel(accelerator.num_processes)
    lock = RunLock(cfg.run_dir())
    try:
        return _start(cfg, accelerator, channel, lock)
    except BaseException:
        lock.release()
        raise


def _start(cfg: TrainConfig, accelerator, channel: HostChannel, lock: RunLock) -> Session:
    log, world = accelerator.print, accelerator.num_processes

    def own_the_run():
        lock.acquire(log)
        check_log_dir(cfg)
        if not cfg.is_keep_training:
            refuse_or_clear_existing(cfg, log)
        return os.getpid(), socket.gethostname()

    main_pid, main_host = channel.on_main(accelerator.is_main_process, own_the_run)
    exit_with_launcher(main_pid if main_host == socket.gethostname() else None)
    with accelerator.main_process_first():
        for made in ensure_demo_assets(cfg.train_file, cfg.tokenizer_dir):
            log(f"created {made}")
    tokenizer_dir = cfg.tokenizer_dir or cfg.finetune_from_ckp_file
    if not tokenizer_dir:
        raise UserError("no tokenizer: set --tokenizer_dir, or --finetune_from_ckp_file to a model dir with one")
    tokenizer = load_tokenizer(tokenizer_dir)
    prints = fingerprint(cfg, world, len(tokenizer))
    plan = None
    if cfg.is_keep_training:
        plan = channel.on_main(accelerator.is_main_process, lambda: plan_resume(cfg, prints, log))
        if plan is None:
            log(f"no checkpoint in {cfg.checkpoint_dir()} yet; starting from step 0")
    from accelerate.utils import set_seed

    set_seed(cfg.seed)
    # initialise on the GPU (seconds, not minutes, for 7B); sharded setups (ZeRO-3, FSDP) build on the host
    on_device = accelerator.device.type == "cuda" and accelerator.distributed_type.name in ("NO", "MULTI_GPU")
    on_device = on_device and not cfg.qlora  # QLoRA: the bf16 base stays on the host, each weight goes over as NF4
    with torch.device(accelerator.device if on_device else "cpu"):
        built = build_model(cfg, tokenizer)
    model = apply_training_options(built, cfg, log)  # LoRA too (lowmem/adapters.py)
    is_enc_dec = bool(model.config.is_encoder_decoder)
    data = TrainData(cfg, tokenizer, is_enc_dec, accelerator.process_index, world,
                     pin_memory=accelerator.device.type == "cuda", log=log)
    data.check_before_training(model.get_input_embeddings().num_embeddings)
    budget = limit_gpu_memory(cfg.max_gpu_memory_gb)
    if cfg.auto_batch_size:
        cfg = _auto_batch(cfg, accelerator, model, tokenizer, budget)
        data.cfg = cfg
    steps_per_epoch = math.ceil(data.batches_per_epoch() / cfg.gradient_accumulation_steps)
    total_steps = cfg.max_steps or steps_per_epoch * cfg.epochs
    ema = EMA(model, cfg.ema_decay) if cfg.use_ema else None
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    if accelerator.distributed_type.name == "DEEPSPEED":
        scheduler.optimizer = model.optimizer  # schedule the groups DeepSpeed steps (its CPU Adam when offloading)
    if ema is not None:
        ema.model.to(accelerator.device)
    state = TrainState()
    state.data.world = world
    state.data.ranks = [RankPosition() for _ in range(world)]
    checkpoints = CheckpointManager(accelerator, cfg.checkpoint_dir(), cfg.keep_latest_n_ckp)
    if plan is not None:
        _restore(cfg, plan, accelerator, checkpoints, model, optimizer, scheduler, ema, state)
    resumed_step = state.step if plan is not None else None
    if accelerator.is_main_process:
        claim_log_dir(cfg)
    accelerator.init_trackers(os.path.basename(cfg.logging_dir()))
    metrics = MetricsWriter(accelerator, cfg.logging_dir(), resumed_step, dataclasses.asdict(cfg))
    session = Session(cfg, accelerator, tokenizer, model, data, optimizer, scheduler, checkpoints, metrics, ema, state,
                      total_steps, steps_per_epoch, resumed_step, is_enc_dec, channel, lock, prints)
    session.log(_summary(session))
    if plan is not None and plan.changed:
        session.metrics.log({"changed_on_resume": {k: [a, b] for k, (a, b) in plan.changed.items()}}, state.step)
    return session


def _restore(cfg, plan: ResumePlan, accelerator, checkpoints, model, optimizer, scheduler, ema, state) -> None:
    log = accelerator.print
    if cfg.optimizer != "adamw" or cfg.bf16_weights:
        allow_optimizer_state_types()
    fresh = optimizer_hyperparameters(scheduler.optimizer)
    path, saved = checkpoints.restore(plan, model, optimizer, scheduler, log, ema.model if ema is not None else None)
    if set(plan.changed) & set(OPTIMIZER_SETTINGS):  # untouched otherwise: the restored state is the exact one
        apply_settings(scheduler.optimizer, scheduler, fresh, cfg.learn_rate)
    state.load_state_dict(saved)
    world = accelerator.num_processes
    if state.data.world != world:
        old = saved.get("config", {})
        log(f"elastic resume: {state.data.world} processes x {old.get('batch_size_per_gpu', '?')} x "
            f"{old.get('gradient_accumulation_steps', '?')} accumulation -> {world} x {cfg.batch_size_per_gpu} x "
            f"{cfg.gradient_accumulation_steps}; the epoch continues at the next untrained sample")
        state.data = state.data.reshard(world)
    if plan.changed:
        log("changed on resume: " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in plan.changed.items()))
    rank = state.data.ranks[accelerator.process_index]
    log(f"resumed from {path}: step {state.step}, epoch {state.epoch}, position {rank.position}")


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


def _length(s: Session) -> str:
    """How many optimizer steps will run, and why."""
    cfg = s.cfg
    if cfg.max_steps:
        epochs = cfg.max_steps / max(1, s.steps_per_epoch)
        return (f"{s.total_steps} optimizer steps (--max_steps; ~{s.steps_per_epoch} per epoch, so ~{epochs:.2g} "
                "epochs, the data repeating as needed)")
    return f"{s.total_steps} optimizer steps ({cfg.epochs} epoch{'s' if cfg.epochs != 1 else ''} x ~{s.steps_per_epoch})"


def _summary(s: Session) -> str:
    cfg, acc = s.cfg, s.accelerator
    world, ga = acc.num_processes, cfg.gradient_accumulation_steps
    n_params = count_parameters(acc.unwrap_model(s.model))
    trained = count_parameters(acc.unwrap_model(s.model), trained_only=True)
    unit = "packed rows of" if s.data.packing else "samples, up to"
    return (f"model {cfg.model_type}/{cfg.model_preset}{' from ' + cfg.finetune_from_ckp_file if cfg.finetune_from_ckp_file else ''}: "
            f"{n_params / 1e6:.2f}M parameters ({trained / 1e6:.2f}M trained) | devices: {world} x {acc.device.type} ({_sharding(acc)[0]}) | "
            f"precision: {acc.mixed_precision}{' (bf16 weights)' if cfg.bf16_weights else ''} | effective batch "
            f"{cfg.batch_size_per_gpu} x {world} x {ga} = {cfg.batch_size_per_gpu * world * ga} {unit} "
            f"{cfg.max_seq_len} tokens | {_length(s)} | optimizer {cfg.optimizer} | logs: {cfg.logging_dir()}\n"
            f"{s.data.describe()}\n{_memory_plan(s)}" + "".join(f"\nwarning: {w}" for w in config_warnings(cfg)))


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
