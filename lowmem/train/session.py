"""Everything a run needs before its first step, in an order that never harms an existing run:

1. the config's values, the demo assets when the run uses them, and every input path (all problems at once);
2. the run's lock, and the refusal of a fresh start over an existing run (or its deletion on request);
3. on resume, the checkpoint chosen, verified and its settings compared, before any weight is loaded;
4. tokenizer, model, data (checked before step 1), optimizer, accelerator preparation;
5. the restore (checkpoint/manager.py), with the settings that may change applied and logged.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import socket
from dataclasses import dataclass

import torch

from config import TrainConfig

from ..checkpoint import CheckpointManager, RunParts, fingerprint, plan_resume, weights_format
from ..data.demo import ensure_demo_assets
from ..data.options import Columns, DataOptions, RecordOptions
from ..data.pipeline import TrainData
from ..data.sources import DataInputs, parse_inputs
from ..data.tokenizer import load_tokenizer
from ..fields import PREFERENCE, RECORDS, rules
from ..model.adapters import uses_lora
from ..model.build import apply_training_options, build_model, model_config
from ..data.shards import cut
from ..model import offload, sequence_parallel
from ..model.attention import attention_backend
from ..model.moe import mark_zero3_leaves
from ..run.errors import UserError
from ..run.host_memory import return_freed_tensors_to_the_os
from ..run.runtime import HostChannel, Layout, build_accelerator, quiet_known_warnings
from .autobatch import cuda_probe, largest_fitting, limit_gpu_memory, split_global_batch
from .ema import EMA
from .memory_plan import STATE_BYTES
from .metrics import MetricsWriter, host_rss_bytes
from .objective import TokenLoss
from .optim import allow_optimizer_state_types, build_optimizer, build_scheduler
from .ownership import RunLock, check_log_dir, claim_log_dir, exit_with_launcher, refuse_or_clear_existing
from .reference import ensure_caches, preference_objective
from .state import GlobalTrainState, TrainState
from .summary import start_summary
from .validate import check_config, config_warnings


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
    run_state: GlobalTrainState  # the state of every process together: what checkpoints hold, what logs count
    objective: object  # objective.TokenLoss, or preference.PreferenceLoss for preference pairs
    total_steps: int
    steps_per_epoch: int
    resumed_step: int | None
    is_encoder_decoder: bool
    channel: HostChannel
    lock: RunLock
    micro_batch: object = contextlib.nullcontext  # what each micro-batch's forward and backward run in (offload)
    host_baseline: float = 0.0  # bytes this process held before the model was built (the memory plan's "process")
    layout: Layout = Layout()  # data-parallel rank and world, and this process's part of each sequence
    gradient_factor: float = 1.0  # the loss multiplier before backward that keeps a sequence group's gradient whole

    def cut(self, batch):
        """This process's part of a batch (sequence parallelism), or the batch itself."""
        return cut(batch, self.layout.part, self.layout.sequence_parallel, self.data.pad_id,
                   self.cfg.batch_size_per_gpu)

    def log(self, text: str) -> None:
        """A line above the progress bar, from the main process only."""
        if self.accelerator.is_main_process:
            from tqdm import tqdm

            tqdm.write(text)

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def eval_model(self):
        """The weights evaluation and the export use: the EMA's when there is one."""
        return self.ema.model if self.ema is not None else self.model


def data_options(cfg: TrainConfig) -> DataOptions:
    """The data options of a run, from its config (the data layer never sees the whole config)."""
    return DataOptions(
        max_seq_len=cfg.max_seq_len, seed=cfg.seed, buffer_size=cfg.dataloader_buffer_size,
        columns=Columns(cfg.prompt_column, cfg.response_column, cfg.text_column, cfg.messages_column,
                        cfg.chosen_column, cfg.rejected_column),
        train_on=cfg.train_on, train_on_prompt=cfg.train_on_prompt, strict=cfg.strict,
        records=RecordOptions(cfg.ablation_config, cfg.prompt_style, cfg.max_history_items, cfg.max_samples_per_user,
                              cfg.sample_seed, cfg.resample_each_epoch, cfg.val_ratio, cfg.split_by),
        batch_size=cfg.batch_size_per_gpu, packing=cfg.packing, prefetch_batches=cfg.prefetch_batches,
        trace_samples=cfg.trace_samples)


def check_inputs(cfg: TrainConfig) -> DataInputs:
    """Parse the data arguments once and check every input path; one UserError naming all that are missing."""
    problems: list[str] = []
    inputs = parse_inputs(cfg.train_file, cfg.datasets, cfg.validation_file, cfg.validation_datasets,
                          held_out_split=cfg.val_ratio > 0, problems=problems)
    if cfg.test_file and not os.path.exists(cfg.test_file):
        problems.append(f"--test_file: '{cfg.test_file}' does not exist (empty string: no test answering)")
    tokenizer_dir = cfg.tokenizer_dir or cfg.finetune_from_ckp_file
    if tokenizer_dir and not os.path.isdir(tokenizer_dir):
        problems.append(f"--tokenizer_dir: '{tokenizer_dir}' does not exist (train one with `prepare train_tokenizer`)")
    start = cfg.finetune_from_ckp_file
    if start and not any(os.path.isfile(os.path.join(start, name)) for name in ("config.json", "adapter_config.json")):
        problems.append(f"--finetune_from_ckp_file: '{start}' is not a model or adapter directory (no config.json "
                        "or adapter_config.json)")
    if cfg.deepspeed:
        from ..run.distributed import resolve_path

        if not os.path.isfile(resolve_path(cfg.deepspeed)):
            problems.append(f"--deepspeed: '{cfg.deepspeed}' does not exist")
    if problems:
        raise UserError(f"{len(problems)} input(s) missing: " + "; ".join(problems))
    return inputs


APPLIES_TO = {RECORDS: ("records", "user-modeling records (user_id + target columns)"),
              PREFERENCE: ("preference", "preference pairs (prompt, chosen and rejected columns)")}


def check_flags_apply(cfg: TrainConfig, kinds: set[str]) -> None:
    """A flag set for data this run does not have would do nothing: refuse it rather than ignore it."""
    defaults = TrainConfig()
    for name, meta in rules(type(cfg)).items():
        kind, what = APPLIES_TO.get(meta.get("applies_to"), (None, ""))
        if kind and kind not in kinds and getattr(cfg, name) != getattr(defaults, name):
            raise UserError(f"--{name}={getattr(cfg, name)!r} applies to {what}, but this run's training data is "
                            f"{' and '.join(sorted(kinds))}; drop the flag"
                            + (" (give validation data with --validation_file)" if name == "val_ratio" else ""))


def start_session(cfg: TrainConfig) -> Session:
    check_config(cfg)
    return_freed_tensors_to_the_os()  # before the model and data allocate anything
    quiet_known_warnings()
    made = ensure_demo_assets(cfg.train_file, cfg.tokenizer_dir)  # before the inputs are checked: they are inputs
    inputs = check_inputs(cfg)  # all of them at once, before the launcher's noise and before anything is written
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # save_pretrained's "Writing model shards" bar would tangle with ours
    accelerator = build_accelerator(cfg, sequence_parallel.parallelism_config(
        cfg, int(os.environ.get("WORLD_SIZE", "1")), attention_backend(cfg)))
    channel = HostChannel(accelerator.num_processes)
    lock = RunLock(cfg.run_dir())
    try:
        for what in made:
            accelerator.print(f"created {what}")
        return _start(cfg, inputs, accelerator, channel, lock)
    except BaseException:
        lock.release()
        raise


def _own_the_run(cfg: TrainConfig, lock: RunLock, log):
    lock.acquire(log)
    check_log_dir(cfg)
    if not cfg.is_keep_training:
        refuse_or_clear_existing(cfg, log)
    return os.getpid(), socket.gethostname()


def _start(cfg: TrainConfig, inputs: DataInputs, accelerator, channel: HostChannel, lock: RunLock) -> Session:
    log = accelerator.print
    layout = Layout(accelerator.process_index, accelerator.num_processes, cfg.sequence_parallel_size)
    world = layout.data_world  # what data positions, batches and checkpoints count: one per sequence group
    main_pid, main_host = channel.on_main(accelerator.is_main_process, lambda: _own_the_run(cfg, lock, log))
    exit_with_launcher(main_pid if main_host == socket.gethostname() else None)
    tokenizer_dir = cfg.tokenizer_dir or cfg.finetune_from_ckp_file
    if not tokenizer_dir:
        raise UserError("no tokenizer: set --tokenizer_dir, or --finetune_from_ckp_file to a model dir with one")
    tokenizer = load_tokenizer(tokenizer_dir)
    sequence_parallel.check(cfg, model_config(cfg, tokenizer), attention_backend(cfg), accelerator.num_processes)
    prints = fingerprint(cfg, world, len(tokenizer))
    plan = None
    if cfg.is_keep_training:
        plan = channel.on_main(accelerator.is_main_process, lambda: plan_resume(cfg, prints, log))
        if plan is None:
            log(f"no checkpoint in {cfg.checkpoint_dir()} yet; starting from step 0")
    baseline = host_rss_bytes()
    built = _build(cfg, accelerator, tokenizer)
    objective = TokenLoss(built, bool(built.config.is_encoder_decoder), cfg.router_aux_loss_coef)
    routed = objective.moe is not None
    model = apply_training_options(built, cfg, log, _zero_stage(accelerator) == 3)  # LoRA too (model/adapters.py)
    is_enc_dec = bool(model.config.is_encoder_decoder)
    budget = limit_gpu_memory(cfg.max_gpu_memory_gb)
    if cfg.auto_batch_size:
        cfg = _auto_batch(cfg, accelerator, model, tokenizer, budget)
    data = TrainData(inputs, data_options(cfg), tokenizer, is_enc_dec, layout.data_rank, world,
                     pin_memory=accelerator.device.type == "cuda", log=log)
    check_flags_apply(cfg, data.kinds)
    if layout.sequence_parallel > 1 and data.pairs and not cfg.packing:
        raise UserError("preference pairs under --sequence_parallel_size go in packed rows (a pair's two answers side "
                        "by side, one micro-batch size for Ulysses): add --packing=True")
    data.check_before_training(model.get_input_embeddings().num_embeddings)
    if data.pairs:  # the reference chosen now: a frozen copy is taken of the starting weights
        objective = preference_objective(cfg, model, data, accelerator, tokenizer, _sharded(accelerator))
    steps_per_epoch = math.ceil(data.batches_per_epoch() / cfg.gradient_accumulation_steps)
    total_steps = cfg.max_steps or steps_per_epoch * cfg.epochs
    ema = EMA(model, cfg.ema_decay) if cfg.use_ema else None
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    leaves = mark_zero3_leaves(model) if routed and _zero_stage(accelerator) == 3 else []
    if layout.sequence_parallel > 1:  # prepare() puts Ulysses in the place of the model's attention function
        sequence_parallel.keep_core_attention(model.config._attn_implementation)
    model, optimizer = accelerator.prepare(model, optimizer)
    if accelerator.distributed_type.name == "DEEPSPEED":
        scheduler.optimizer = model.optimizer  # schedule the groups DeepSpeed steps (its CPU Adam when offloading)
    if ema is not None:
        ema.model.to(accelerator.device)
    if getattr(objective, "reference", None) is not None and objective.reference.kind == "cache":
        # before any restore: the weights are still the ones training started from, the reference's
        caches, passes = ensure_caches(data, model, accelerator, channel, objective.reference.settings,
                                       cfg.reference_cache_dir, data.options, tokenizer, log, layout,
                                       lambda batch: cut(batch, layout.part, layout.sequence_parallel, data.pad_id,
                                                         cfg.batch_size_per_gpu))
        data.attach_references(caches)
        objective.reference.forward_passes += passes
    state = TrainState.fresh(world)
    run_state = GlobalTrainState(state, channel, layout.data_rank, world,
                                 {"fingerprint": prints, "config": dataclasses.asdict(cfg)}, log, layout.sequence_parallel)
    parts = RunParts(model, optimizer, scheduler, tokenizer, run_state, ema.model if ema is not None else None)
    checkpoints = CheckpointManager(accelerator, cfg.checkpoint_dir(), cfg.keep_latest_n_ckp, parts,
                                    weights_format(uses_lora(cfg), cfg.merge_lora))
    if plan is not None:
        if cfg.optimizer != "adamw" or cfg.bf16_weights:
            allow_optimizer_state_types()  # torchao's compact states load under weights_only
        path = checkpoints.restore(plan, log)
        log(f"resumed from {path}: step {state.step}, epoch {state.epoch}, "
            f"position {state.data.ranks[layout.data_rank].position}")
    resumed_step = state.step if plan is not None else None
    if accelerator.is_main_process:
        claim_log_dir(cfg)
    accelerator.init_trackers(os.path.basename(cfg.logging_dir()))
    metrics = MetricsWriter(accelerator, cfg.logging_dir(), resumed_step, dataclasses.asdict(cfg))
    moving = offload.choose(cfg)
    session = Session(cfg, accelerator, tokenizer, model, data, optimizer, scheduler, checkpoints, metrics, ema, state,
                      run_state, objective, total_steps, steps_per_epoch, resumed_step, is_enc_dec, channel, lock,
                      offload.micro_batch_context(moving), baseline, layout,
                      sequence_parallel.gradient_factor(layout.sequence_parallel, _zero_stage(accelerator)))
    notes = [f"ZeRO-3 gathers each MoE block ({', '.join(leaves)}) as one leaf"] if leaves else []
    notes += [offload.describe(moving)] if moving != "off" else []
    session.log(start_summary(session, config_warnings(cfg), notes))
    if plan is not None and plan.changed:
        metrics.log({"changed_on_resume": {k: [a, b] for k, (a, b) in plan.changed.items()}}, state.step)
    return session


def _build(cfg: TrainConfig, accelerator, tokenizer):
    """The model as training starts from it, built under the run's seed."""
    from accelerate.utils import set_seed

    set_seed(cfg.seed)
    # initialise on the GPU (seconds, not minutes, for 7B); sharded setups (ZeRO-3, FSDP) build on the host
    on_device = accelerator.device.type == "cuda" and accelerator.distributed_type.name in ("NO", "MULTI_GPU")
    on_device = on_device and not cfg.qlora  # QLoRA: the bf16 base stays on the host, each weight goes over as NF4
    with torch.device(accelerator.device if on_device else "cpu"):
        return build_model(cfg, tokenizer)


def prepare_reference_caches(cfg: TrainConfig) -> dict:
    """`prepare reference`: the reference caches a preference run with these settings uses, computed now by every
    process of the launch (the starting model, before any step); nothing else is written."""
    check_config(cfg)
    return_freed_tensors_to_the_os()
    quiet_known_warnings()
    ensure_demo_assets(cfg.train_file, cfg.tokenizer_dir)
    inputs = check_inputs(cfg)
    accelerator = build_accelerator(cfg)
    if _sharded(accelerator):
        raise UserError("prepare reference runs without DeepSpeed or FSDP (one process, or several plain ones); the "
                        "caches it writes serve sharded training runs alike")
    tokenizer = load_tokenizer(cfg.tokenizer_dir or cfg.finetune_from_ckp_file)
    model = _build(cfg, accelerator, tokenizer).to(accelerator.device)
    log, world = accelerator.print, accelerator.num_processes
    data = TrainData(inputs, data_options(cfg), tokenizer, bool(model.config.is_encoder_decoder),
                     accelerator.process_index, world, pin_memory=False, log=log)
    objective = preference_objective(cfg, model, data, accelerator, tokenizer, False) if data.pairs else None
    if objective is None or not objective.settings.uses_reference:
        raise UserError("prepare reference: nothing to compute; the training data holds no preference pairs or the "
                        f"loss ({cfg.preference_loss}) needs no reference")
    caches, passes = ensure_caches(data, model, accelerator, HostChannel(world), objective.reference.settings,
                                   cfg.reference_cache_dir, data.options, tokenizer, log)
    log(f"reference caches ready ({passes} forward passes on this process): "
        + ", ".join(cache.prefix for cache in caches.values()))
    return caches


def _sharded(accelerator) -> bool:
    return accelerator.distributed_type.name in ("DEEPSPEED", "FSDP")


def _zero_stage(accelerator) -> int:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return int(plugin.zero_stage or 0) if plugin is not None else 0


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
