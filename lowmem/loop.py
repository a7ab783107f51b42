"""The training loop, top to bottom: set up, resume, train with accumulation, log, evaluate, save, export."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import torch
import torch.nn.functional as F

from config import TrainConfig

from .checkpoint import CheckpointManager
from .data.batches import Batch, dummy_batch
from .data.pipeline import TrainData
from .demo import ensure_demo_assets
from .errors import UserError


class TrainingHalted(UserError):
    """The run cannot go on (e.g. the loss diverged); nothing was saved after the last good checkpoint."""
from .metrics import MetricsWriter, flops_per_token, gpu_memory_gb, host_rss_gb
from .model import apply_training_options, build_model, count_parameters
from .optim import allow_optimizer_state_types, build_optimizer, build_scheduler
from .runtime import HostChannel, StopSignal, build_accelerator, process_memory_summary
from .tokenizer import load_tokenizer

# a resume with any of these changed would not continue the same run
EXACTNESS_FIELDS = ("train_file", "batch_size_per_gpu", "gradient_accumulation_steps", "max_seq_len", "model_type",
                    "model_preset", "seed", "dataloader_buffer_size", "train_on_prompt", "finetune_from_ckp_file")


def check_values(cfg: TrainConfig) -> None:
    for name in ("batch_size_per_gpu", "gradient_accumulation_steps", "max_seq_len", "epochs", "logging_steps",
                 "eval_steps", "save_steps", "keep_latest_n_ckp", "dataloader_buffer_size"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name}={getattr(cfg, name)} must be at least 1")
    if cfg.learn_rate <= 0 or cfg.warmup_steps < 0 or cfg.max_steps < 0:
        raise UserError("--learn_rate must be > 0, --warmup_steps and --max_steps >= 0")


def loss_sum(model, inputs: dict, is_encoder_decoder: bool, scale_items: torch.Tensor) -> torch.Tensor:
    """Summed token loss of a micro-batch divided by `scale_items` (normalisation done by the caller)."""
    if is_encoder_decoder:
        logits = model(**inputs).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), inputs["labels"].flatten(), reduction="sum") / scale_items
    return model(**inputs, num_items_in_batch=scale_items).loss


@torch.no_grad()
def evaluate(model, data: TrainData, accelerator, is_encoder_decoder: bool, max_batches: int) -> dict:
    """Validation loss and perplexity over the whole validation file (or its first max_batches)."""
    model.eval()
    total = torch.zeros(2, device=accelerator.device, dtype=torch.float64)
    for i, batch in enumerate(data.validation_batches()):
        if max_batches and i >= max_batches:
            break
        inputs = {k: v.to(accelerator.device) for k, v in batch.tensors.items()}
        total[0] += loss_sum(model, inputs, is_encoder_decoder, torch.tensor(1.0, device=accelerator.device)).double()
        total[1] += batch.label_tokens
    total = accelerator.reduce(total, reduction="sum")
    model.train()
    loss = (total[0] / total[1].clamp(min=1)).item()
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)), "eval_tokens": int(total[1].item())}


def export_final(accelerator, model, tokenizer, cfg: TrainConfig, path: str) -> None:
    """save_pretrained (safetensors) + tokenizer + resolved config, written atomically."""
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        import shutil

        tmp = path.rstrip("/") + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        accelerator.unwrap_model(model).save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, "train_config.json"), "w", encoding="utf-8") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=1)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    accelerator.wait_for_everyone()


def train(cfg: TrainConfig) -> dict:
    check_values(cfg)
    accelerator = build_accelerator(cfg)
    log = accelerator.print
    from accelerate.utils import set_seed

    with accelerator.main_process_first():
        for made in ensure_demo_assets(cfg.train_file, cfg.tokenizer_dir):
            log(f"created {made}")
    tokenizer = load_tokenizer(cfg.tokenizer_dir)
    set_seed(cfg.seed)
    model = apply_training_options(build_model(cfg, tokenizer), cfg)
    is_enc_dec = bool(model.config.is_encoder_decoder)
    world, rank = accelerator.num_processes, accelerator.process_index
    data = TrainData(cfg, tokenizer, is_enc_dec, rank, world, pin_memory=accelerator.device.type == "cuda")
    data.encoder.trace = cfg.trace_samples
    ga = cfg.gradient_accumulation_steps
    steps_per_epoch = math.ceil(data.batches_per_epoch() / ga)
    total_steps = steps_per_epoch * cfg.epochs if not cfg.max_steps else min(cfg.max_steps, steps_per_epoch * cfg.epochs)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    checkpoints = CheckpointManager(accelerator, cfg.checkpoint_dir(), cfg.keep_latest_n_ckp)
    fingerprint = {name: getattr(cfg, name) for name in EXACTNESS_FIELDS} | {"world_size": world}
    state = {"step": 0, "epoch": 0, "position": 0, "tokens_seen": 0, "best_eval_loss": None,
             "nonfinite_steps": 0, "nonfinite_total": 0, "fingerprint": fingerprint}

    if cfg.is_keep_training:
        if cfg.optimizer != "adamw" or cfg.bf16_weights:
            allow_optimizer_state_types()
        path, saved = checkpoints.restore_latest(model, optimizer, scheduler, log)
        if path is None:
            log(f"no usable checkpoint in {cfg.checkpoint_dir()}; starting from step 0")
        else:
            changed = {k: (saved["fingerprint"].get(k), v) for k, v in fingerprint.items() if saved["fingerprint"].get(k) != v}
            if changed and not cfg.allow_config_change:
                raise UserError(f"resume refused: {', '.join(f'{k} was {a!r}, now {b!r}' for k, (a, b) in changed.items())}; "
                                "pass --allow_config_change=True to continue anyway (the run will not be exact)")
            state.update({k: saved[k] for k in state if k in saved and k != "fingerprint"})
            log(f"resumed from {path}: step {state['step']}, epoch {state['epoch']}, position {state['position']}")
    resumed_step = state["step"] if cfg.is_keep_training and state["step"] else None

    accelerator.init_trackers(cfg.run_name, config={k: v for k, v in dataclasses.asdict(cfg).items()
                                                     if isinstance(v, (int, float, str, bool))})
    metrics = MetricsWriter(accelerator, cfg.logging_dir(), resumed_step)
    n_params = count_parameters(accelerator.unwrap_model(model))
    tokens_per_step = cfg.batch_size_per_gpu * world * ga * cfg.max_seq_len
    log(f"model {cfg.model_type}/{cfg.model_preset}: {n_params / 1e6:.2f}M parameters | devices: {world} x "
        f"{accelerator.device.type} | precision: {accelerator.mixed_precision} | effective batch "
        f"{cfg.batch_size_per_gpu} x {world} x {ga} = {cfg.batch_size_per_gpu * world * ga} samples, up to "
        f"{tokens_per_step} tokens/step | {total_steps} optimizer steps planned ({steps_per_epoch}/epoch)")

    flop_per_token = flops_per_token(accelerator.unwrap_model(model))
    channel, stop = HostChannel(world), StopSignal()
    trace = _open_trace(cfg, rank, resumed_step)
    running = torch.zeros((), device=accelerator.device)
    interval = {"steps": 0, "tokens": 0, "samples": 0, "real": 0, "total": 0, "start": time.time()}
    last_eval, stopped_by = None, ""
    model.train()
    try:
        progress = _progress(accelerator, total_steps, state["step"])
        while state["epoch"] < cfg.epochs and not (cfg.max_steps and state["step"] >= cfg.max_steps):
            batches = data.epoch(state["epoch"], state["position"])
            try:
                while not (cfg.max_steps and state["step"] >= cfg.max_steps):
                    window = [b for _, b in zip(range(ga), batches)]
                    agreed = channel.gather([sum(b.label_tokens for b in window), len(window), int(stop.requested)])
                    if agreed[:, 2].any():
                        stopped_by = stop.signal_name or "a signal on another process"
                        break
                    n_micro, global_tokens = int(agreed[:, 1].max()), int(agreed[:, 0].sum())
                    if n_micro == 0:
                        break
                    window += [dummy_batch(data.pad_id)] * (n_micro - len(window))
                    scale = torch.tensor(max(global_tokens, 1) / (ga * world), device=accelerator.device)
                    accelerator.step = ga - n_micro  # the window's last micro-batch syncs, even a short one
                    for batch in window:
                        inputs = {k: v.to(accelerator.device, non_blocking=True) for k, v in batch.tensors.items()}
                        with accelerator.accumulate(model):
                            loss = loss_sum(model, inputs, is_enc_dec, scale)
                            accelerator.backward(loss)
                            running += loss.detach() / (ga * world)
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or float("inf"))
                    lr_used = scheduler.get_last_lr()[0]
                    if cfg.skip_nonfinite and not math.isfinite(float(grad_norm)):  # the step's one host sync
                        state["nonfinite_steps"] += 1
                        state["nonfinite_total"] = state.get("nonfinite_total", 0) + 1
                        metrics.log({"nonfinite_steps": state["nonfinite_steps"], "grad_norm": float(grad_norm)},
                                    state["step"] + 1)
                        if state["nonfinite_steps"] >= cfg.max_nonfinite_steps:
                            raise TrainingHalted(
                                f"{state['nonfinite_steps']} optimizer steps in a row had a non-finite loss or "
                                f"gradient (last at step {state['step'] + 1}); stopped without saving. The last good "
                                f"checkpoint in {cfg.checkpoint_dir()} is intact: lower --learn_rate or check the data")
                    else:
                        state["nonfinite_steps"] = 0
                        optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    state["step"] += 1
                    state["position"] = max((b.position for b in window if b.position >= 0), default=state["position"])
                    state["tokens_seen"] += sum(b.real_tokens for b in window) * world
                    _add(interval, window, world)
                    if trace is not None:
                        trace.write(json.dumps({"step": state["step"], "epoch": state["epoch"],
                                                "samples": [h for b in window for h in b.sample_hashes]}) + "\n")
                    progress.update(1)

                    if state["step"] % cfg.logging_steps == 0:
                        record = _log_record(accelerator, running, grad_norm, lr_used, interval, flop_per_token, state)
                        metrics.log(record, state["step"])
                        progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
                        running.zero_()
                        interval.update(steps=0, tokens=0, samples=0, real=0, total=0, start=time.time())
                    best = False
                    if data.validation is not None and state["step"] % cfg.eval_steps == 0:
                        last_eval = evaluate(model, data, accelerator, is_enc_dec, cfg.eval_max_batches)
                        metrics.log({"epoch": state["epoch"], **last_eval}, state["step"])
                        best = _is_new_best(state, last_eval)
                    if best or state["step"] % cfg.save_steps == 0:
                        _save(checkpoints, state, model, optimizer, scheduler, tokenizer, as_best=best)
                    if stop.requested:
                        continue  # agreed on at the top of the next window
            finally:
                batches.close()
            if stopped_by:
                break
            if not (cfg.max_steps and state["step"] >= cfg.max_steps):
                state["epoch"] += 1
                state["position"] = 0
                _save(checkpoints, state, model, optimizer, scheduler, tokenizer)
        progress.close()
    finally:
        stop.restore()
        if trace is not None:
            trace.close()

    if stopped_by:
        _save(checkpoints, state, model, optimizer, scheduler, tokenizer)
        log(f"stopped by {stopped_by} after step {state['step']}; checkpoint written, resume with --is_keep_training=True")
        accelerator.end_training()
        return {"stopped": True, **state}
    if data.validation is not None:
        last_eval = evaluate(model, data, accelerator, is_enc_dec, cfg.eval_max_batches)
        metrics.log({"epoch": state["epoch"], **last_eval}, state["step"])
    _save(checkpoints, state, model, optimizer, scheduler, tokenizer, as_best=bool(last_eval) and _is_new_best(state, last_eval))
    if not all(torch.isfinite(p).all() for p in accelerator.unwrap_model(model).parameters()):
        raise TrainingHalted("the model has non-finite weights; it was not exported. Resume from an earlier "
                             "checkpoint with a lower --learn_rate")
    export_final(accelerator, model, tokenizer, cfg, cfg.final_dir())
    summary = {"step": state["step"], "final_dir": cfg.final_dir(), **(last_eval or {})}
    if cfg.test_file and cfg.test_generation_samples and accelerator.is_main_process:
        from .qa_eval import exact_match_on_file

        summary["test_exact_match"] = exact_match_on_file(accelerator.unwrap_model(model), tokenizer, cfg.test_file,
                                                          cfg.test_generation_samples, cfg.max_seq_len)
        metrics.log({"test_exact_match": summary["test_exact_match"]}, state["step"])
    log(f"done: {json.dumps(summary)} | {process_memory_summary()}")
    accelerator.end_training()
    return summary


def _is_new_best(state: dict, result: dict) -> bool:
    """Record a finite eval loss lower than the best so far; a non-finite one is never best."""
    loss = result["eval_loss"]
    if not math.isfinite(loss) or (state["best_eval_loss"] is not None and loss >= state["best_eval_loss"]):
        return False
    state["best_eval_loss"] = loss
    return True


def _save(checkpoints, state, model, optimizer, scheduler, tokenizer, as_best: bool = False) -> None:
    checkpoints.save(state["step"], model, optimizer, scheduler, tokenizer, dict(state), as_best=as_best)


def _add(interval: dict, window: list[Batch], world: int) -> None:
    interval["steps"] += 1
    interval["samples"] += sum(b.samples for b in window) * world
    interval["real"] += sum(b.real_tokens for b in window)
    interval["total"] += sum(b.total_tokens for b in window)


def _log_record(accelerator, running, grad_norm, lr, interval, flop_per_token, state) -> dict:
    """The logged step's record; the only place the loop waits for the device."""
    loss = accelerator.reduce(running.clone(), reduction="sum").item() / interval["steps"]
    elapsed = max(time.time() - interval["start"], 1e-9)
    real_tokens = interval["real"] * accelerator.num_processes
    tokens_per_sec = real_tokens / elapsed
    record = {"epoch": state["epoch"], "loss": loss, "lr": lr,
              "grad_norm": float(grad_norm), "tokens_per_sec": tokens_per_sec,
              "samples_per_sec": interval["samples"] / elapsed,
              "real_token_fraction": interval["real"] / max(interval["total"], 1),
              "tokens_seen": state["tokens_seen"], "host_rss_gb": host_rss_gb(), **gpu_memory_gb()}
    if torch.cuda.is_available():
        from .metrics import peak_flops

        record["mfu"] = tokens_per_sec * flop_per_token / (peak_flops() * accelerator.num_processes)
    return record


def _open_trace(cfg: TrainConfig, rank: int, resumed_step):
    """samples_rank<r>.jsonl: per optimizer step, a hash of each sample this process trained on."""
    if not cfg.trace_samples:
        return None
    from .metrics import truncate_jsonl

    path = os.path.join(cfg.logging_dir(), f"samples_rank{rank}.jsonl")
    os.makedirs(cfg.logging_dir(), exist_ok=True)
    if resumed_step is None:
        open(path, "w").close()
    else:
        truncate_jsonl(path, resumed_step)
    return open(path, "a", encoding="utf-8", buffering=1)


def _progress(accelerator, total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not accelerator.is_main_process, unit="step", dynamic_ncols=True)
