"""The training loop, top to bottom: each optimizer step, then logging, evaluation, saving, stopping.

Set-up and resume live in session.py, checkpoint I/O in checkpoint.py; this file is what happens once
training runs. `train_step` is the math of one optimizer step; `train` is the epochs and the cadence.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import torch
import torch.nn.functional as F

from config import TrainConfig

from .checkpoint import export_final, has_export, load_best_into
from .data.batches import Batch, dummy_batch
from .errors import UserError
from .metrics import flops_per_token, gpu_memory_gb, host_rss_gb
from .nonfinite import NonfiniteGuard, TrainingHalted
from .runtime import StopSignal, process_memory_summary
from .session import Session, start_session
from .state import RankPosition


def train(cfg: TrainConfig) -> dict:
    s = start_session(cfg)
    try:
        return _run(s)
    finally:
        s.lock.release()


def _run(s: Session) -> dict:
    cfg, acc, state, world = s.cfg, s.accelerator, s.state, s.accelerator.num_processes
    if s.resumed_step is not None and not _more_to_train(cfg, state):
        length = f"--max_steps={cfg.max_steps}" if cfg.max_steps else f"--epochs={cfg.epochs}"
        if not has_export(cfg.final_dir()):  # stopped between its last step and the export
            s.log(f"run '{cfg.run_name}' finished training at step {state.step} ({length}) but has no final model: "
                  "exporting it now")
            return _finish(s, stopped_early=False)
        s.log(f"run '{cfg.run_name}' already finished: it is at step {state.step}, epoch {state.epoch} ({length}), so "
              "nothing was trained or exported; raise --max_steps (or --epochs) to train further")
        acc.end_training()
        return {"step": state.step, "epoch": state.epoch, "already_finished": True}
    stop, trace = StopSignal(), _open_trace(cfg, s.rank, s.resumed_step)
    running = torch.zeros((), device=acc.device)  # summed loss since the last log, kept on the device
    meter = Meter(flops_per_token(acc.unwrap_model(s.model)), world)
    guard = NonfiniteGuard(s.optimizer, cfg.skip_nonfinite, cfg.max_nonfinite_steps, state, cfg.checkpoint_dir(),
                           acc.device, s.ema is not None)
    progress = Progress(acc, s.total_steps, state.step)
    stopped_by, stop_early = "", False
    s.model.train()
    try:
        while _more_to_train(cfg, state) and not stopped_by and not stop_early:
            steps_before = state.step
            mine = state.data.ranks[s.rank]
            batches = s.data.epoch(state.epoch, state.data.shard(s.rank), mine.position, mine.skip)
            try:
                while not _at_max_steps(cfg, state):
                    # 1. agree with the other processes on this step's batches, token count and stop requests
                    window = [b for _, b in zip(range(cfg.gradient_accumulation_steps), batches)]
                    agreed = s.channel.gather([sum(b.label_tokens for b in window), len(window), int(stop.requested)])
                    if agreed[:, 2].any():
                        stopped_by = stop.signal_name or "a signal on another process"
                        break
                    n_micro, global_tokens = int(agreed[:, 1].max()), int(agreed[:, 0].sum())
                    if n_micro == 0:
                        break  # every process has finished the epoch
                    window += [dummy_batch(s.data.pad_id)] * (n_micro - len(window))
                    # 2. one optimizer step
                    grad_norm, lr_used = train_step(s, window, global_tokens, running, guard)
                    _advance(state, window, world, trace, s.rank)
                    meter.add(window)
                    progress.update()
                    # 3. log, evaluate, save on their cadences
                    evaluating = bool(s.data.validation) and state.step % cfg.eval_steps == 0
                    if evaluating or state.step % cfg.logging_steps == 0 or state.step % cfg.save_steps == 0:
                        guard.settle(s.metrics)  # a diverged run halts here, before anything is saved
                    if state.step % cfg.logging_steps == 0:
                        _log_step(s, meter, running, grad_norm, lr_used, progress)
                    best = False
                    if evaluating:
                        best, stop_early = _evaluate_and_judge(s, progress)
                    if best or state.step % cfg.save_steps == 0:
                        _save(s, as_best=best)
                    if stop_early:
                        break
            finally:
                batches.close()
            guard.settle(s.metrics)
            if state.step == steps_before and not stopped_by and state.step == 0:
                raise UserError(f"the training data gave no batch in epoch {state.epoch}: every row was skipped "
                                f"({_skips(s)}); nothing was exported")
            if stopped_by or stop_early or _at_max_steps(cfg, state):
                break
            state.data.next_epoch(world)
            best = False
            if s.data.validation:  # every epoch ends with an evaluation (early stopping counts them)
                best, stop_early = _evaluate_and_judge(s, progress)
            _save(s, as_best=best)
    finally:
        progress.close()  # before any error line, so it starts on a line of its own
        stop.restore()
        if trace is not None:
            trace.close()
    if stopped_by:
        _save(s)
        s.log(f"stopped by {stopped_by} after step {state.step}; checkpoint written, resume with --is_keep_training=True")
        acc.end_training()
        return {"stopped": True, "step": state.step, "epoch": state.epoch}
    return _finish(s, stop_early)


def train_step(s: Session, window: list[Batch], global_tokens: int, running: torch.Tensor, guard) -> tuple:
    """Forward/backward each micro-batch, clip, step (unless the gradient is not finite); (grad_norm, lr)."""
    acc, cfg = s.accelerator, s.cfg
    ga, world = cfg.gradient_accumulation_steps, acc.num_processes
    # the loss is averaged over the step's label tokens on every process, not per micro-batch
    scale = torch.tensor(max(global_tokens, 1) / (ga * world), device=acc.device)
    acc.step = ga - len(window)  # the window's last micro-batch syncs, even in a short window
    for batch in window:
        inputs = {k: v.to(acc.device, non_blocking=True) for k, v in batch.tensors.items()}
        with acc.accumulate(s.model):
            loss = loss_sum(s.model, inputs, s.is_encoder_decoder, scale)
            acc.backward(loss)
            running += loss.detach() / (ga * world)
    grad_norm = acc.clip_grad_norm_(s.model.parameters(), cfg.max_grad_norm or float("inf"))
    if grad_norm is None:  # DeepSpeed clipped and stepped inside backward without a norm
        grad_norm = 0.0
    lr_used = float(s.scheduler.get_last_lr()[0])  # torchao keeps lr as a tensor
    if guard.allows_step(grad_norm, s.metrics):  # False only where the host decides
        s.optimizer.step()
        if s.ema is not None:
            s.ema.update()
    s.scheduler.step()
    s.optimizer.zero_grad(set_to_none=True)
    return grad_norm, lr_used


def _finish(s: Session, stopped_early: bool) -> dict:
    """Final evaluation, a last checkpoint, the export, and the held-out answers when configured."""
    cfg, acc, state = s.cfg, s.accelerator, s.state
    last_eval = None
    if stopped_early:
        best = load_best_into(acc, cfg.checkpoint_dir(), s.model, s.ema.model if s.ema else None)
        s.log(f"early stopping after epoch {state.epoch}: no improvement in {cfg.early_stopping_patience} "
              f"evaluations; exporting the best checkpoint ({best})")
    elif s.data.validation and s.last_eval_step == state.step:
        last_eval = s.last_eval  # the epoch's end just evaluated this step
    elif s.data.validation:
        last_eval = evaluate(_eval_model(s), s.data, acc, s.is_encoder_decoder, cfg.eval_max_batches)
        s.metrics.log({"epoch": state.epoch, **last_eval}, state.step)
        _save(s, as_best=_is_new_best(state, last_eval))
    else:
        _save(s)
    final_model = _eval_model(s)
    # trained weights only: a frozen 4-bit QLoRA base has no isfinite, and frozen weights cannot diverge
    if not all(torch.isfinite(p).all() for p in acc.unwrap_model(final_model).parameters() if p.requires_grad):
        raise TrainingHalted("the model has non-finite weights; it was not exported. Resume from an earlier "
                             "checkpoint with a lower --learn_rate")
    # the data kinds tell `generate` whether the model learnt the chat template or plain continuation
    exported = {**dataclasses.asdict(cfg), "data_kinds": sorted({d.kind for d in s.data.datasets})}
    export_final(acc, final_model, s.tokenizer, exported, cfg.final_dir())
    counts = _gathered_counts(s)
    summary = {"step": state.step, "epoch": state.epoch, "final_dir": cfg.final_dir(),
               "stopped_early": stopped_early, "best_eval_loss": state.best_eval_loss, **(last_eval or {}),
               **{f"data_{k}": v for k, v in sorted(counts.items())}}
    if cfg.test_file and cfg.test_generation_samples and acc.is_main_process:
        from .evaluate import generation_metrics
        from .generate import GenerationOptions

        scores = generation_metrics(acc.unwrap_model(final_model), s.tokenizer, cfg.test_file,
                                    GenerationOptions(max_new_tokens=64, greedy=True), batch_size=32,
                                    max_examples=cfg.test_generation_samples, progress="answering the test questions")
        summary.update(test_exact_match=scores["exact_match"], test_bleu4=scores["bleu4"])
        s.metrics.log({"test_exact_match": scores["exact_match"], "test_bleu4": scores["bleu4"]}, state.step)
    s.log(f"done: {json.dumps(summary)} | {process_memory_summary()}")
    acc.end_training()
    return summary


def loss_sum(model, inputs: dict, is_encoder_decoder: bool, scale_items: torch.Tensor) -> torch.Tensor:
    """Summed token loss of a micro-batch divided by `scale_items` (normalisation done by the caller)."""
    if is_encoder_decoder:
        logits = model(**inputs).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), inputs["labels"].flatten(), reduction="sum") / scale_items
    # no KV cache while training: it costs memory and hides packed sequences from the mask builder
    return model(**inputs, use_cache=False, num_items_in_batch=scale_items).loss


@torch.no_grad()
def evaluate(model, data, accelerator, is_encoder_decoder: bool, max_batches: int) -> dict:
    """Validation loss and perplexity of each validation dataset, and overall (weighted by the datasets' weights)."""
    was_training = model.training
    model.eval()
    sets = data.validation_batches()
    totals = torch.zeros(len(sets), 2, device=accelerator.device, dtype=torch.float64)
    one = torch.tensor(1.0, device=accelerator.device)
    for i, (_, _, batches) in enumerate(sets):
        for j, batch in enumerate(batches):
            if max_batches and j >= max_batches:
                break
            inputs = {k: v.to(accelerator.device) for k, v in batch.tensors.items()}
            totals[i, 0] += loss_sum(model, inputs, is_encoder_decoder, one).double()
            totals[i, 1] += batch.label_tokens
    totals = accelerator.reduce(totals, reduction="sum")
    model.train(was_training)
    losses = (totals[:, 0] / totals[:, 1].clamp(min=1)).tolist()
    weights = [w for _, w, _ in sets]
    loss = sum(w * l for w, l in zip(weights, losses)) / sum(weights)
    result = {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)), "eval_tokens": int(totals[:, 1].sum())}
    if len(sets) > 1:
        result.update({f"eval_loss/{name}": l for (name, _, _), l in zip(sets, losses)})
    return result


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


def _log_step(s: Session, meter, running, grad_norm, lr_used, progress: Progress) -> None:
    state = s.state
    record = meter.record(s.accelerator, running, grad_norm, lr_used, state)
    record.update({f"data_{k}": v for k, v in sorted(_gathered_counts(s).items())})
    s.metrics.log(record, state.step)
    progress.show(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
    if not meter.peak_reported:  # set against the memory plan printed at the start
        s.log(meter.peak_report(state.step))
    running.zero_()


def _gathered_counts(s: Session) -> dict:
    """Data counters of the whole run (every process, resumes included): skipped/truncated rows, samples per dataset."""
    return s.state.total_counts(s.channel.gather_objects(dict(s.state.local_counts)))


def _skips(s: Session) -> str:
    counts = {k: v for k, v in _gathered_counts(s).items() if k.startswith("skipped_")}
    return ", ".join(f"{v} {k[len('skipped_'):]}" for k, v in sorted(counts.items())) or "no rows read"


class Meter:
    """Throughput and padding over the steps since the last log; the only host sync is at log time."""

    def __init__(self, flop_per_token: float, world: int):
        self.flop_per_token, self.world = flop_per_token, world
        self.peak_reported = False
        self.reset()

    def peak_report(self, step: int) -> str:
        self.peak_reported = True
        if torch.cuda.is_available():
            return f"peak GPU memory after step {step}: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
        return f"peak host memory (RSS) after step {step}: {peak:.2f} GiB"

    def reset(self) -> None:
        self.steps, self.samples, self.real, self.total, self.start = 0, 0, 0, 0, time.time()

    def add(self, window: list[Batch]) -> None:
        self.steps += 1
        self.samples += sum(b.samples for b in window) * self.world
        self.real += sum(b.real_tokens for b in window)
        self.total += sum(b.total_tokens for b in window)

    def record(self, accelerator, running, grad_norm, lr: float, state) -> dict:
        loss = accelerator.reduce(running.clone(), reduction="sum").item() / self.steps
        elapsed = max(time.time() - self.start, 1e-9)
        tokens_per_sec = self.real * self.world / elapsed
        record = {"epoch": state.epoch, "loss": loss, "lr": lr, "grad_norm": float(grad_norm),
                  "tokens_per_sec": tokens_per_sec, "samples_per_sec": self.samples / elapsed,
                  "real_token_fraction": self.real / max(self.total, 1), "tokens_seen": state.tokens_seen,
                  "nonfinite_total": state.nonfinite_total, "host_rss_gb": host_rss_gb(), **gpu_memory_gb()}
        if torch.cuda.is_available():
            from .metrics import peak_flops

            record["mfu"] = tokens_per_sec * self.flop_per_token / (peak_flops() * self.world)
        self.reset()
        return record


def _advance(state, window: list[Batch], world: int, trace, rank: int) -> None:
    """Count the step and move this process's data position past the batches it trained."""
    state.step += 1
    mine: RankPosition = state.data.ranks[rank]
    for batch in window:
        if batch.position < 0:
            continue  # a dummy batch of a process without data
        if batch.skip:  # mid-chunk of packed rows: remember which samples of the chunk are trained
            if mine.skip == 0 or mine.position != batch.position:
                mine.consumed = []
            mine.consumed += batch.sample_positions
        else:
            mine.consumed = []
        mine.position, mine.skip = batch.position, batch.skip
        state.local_counts.update(batch.counts)
    state.tokens_seen += sum(b.real_tokens for b in window) * world
    if trace is not None:
        trace.write(json.dumps({"step": state.step, "epoch": state.epoch,
                                "samples": [h for b in window for h in b.sample_hashes]}) + "\n")


def _eval_model(s: Session):
    return s.ema.model if s.ema is not None else s.model


def _evaluate_and_judge(s: Session, progress: Progress | None = None) -> tuple[bool, bool]:
    """Evaluate; returns (new best, stop early)."""
    result = evaluate(_eval_model(s), s.data, s.accelerator, s.is_encoder_decoder, s.cfg.eval_max_batches)
    s.metrics.log({"epoch": s.state.epoch, **result}, s.state.step)
    s.last_eval, s.last_eval_step = result, s.state.step
    if progress is not None:
        progress.show(eval=f"{result['eval_loss']:.4f}")
    per_set = "".join(f", {k[len('eval_loss/'):]} {v:.4f}" for k, v in result.items() if k.startswith("eval_loss/"))
    s.log(f"step {s.state.step}: eval_loss {result['eval_loss']:.4f}{per_set}")
    if s.cfg.sample_prompts and s.accelerator.is_main_process:
        _log_samples(s)
    previous = s.state.best_eval_loss
    best = _is_new_best(s.state, result)
    improved = best and (previous is None or previous - result["eval_loss"] > s.cfg.early_stopping_threshold)
    s.state.evals_without_improvement = 0 if improved else s.state.evals_without_improvement + 1
    patience = s.cfg.early_stopping_patience
    return best, bool(patience) and s.state.evals_without_improvement >= patience


def _log_samples(s: Session) -> None:
    """Greedy answers to the configured sample prompts, as TensorBoard text and metrics.jsonl records."""
    from .generate import generate_samples

    model = s.accelerator.unwrap_model(_eval_model(s))
    answers = generate_samples(model, s.tokenizer, list(s.cfg.sample_prompts), max_new_tokens=48)
    text = "\n\n".join(f"**{p}**\n\n{a}" for p, a in zip(s.cfg.sample_prompts, answers))
    s.metrics.log_text("samples", text, s.state.step)
    s.metrics.log({"samples": dict(zip(s.cfg.sample_prompts, answers))}, s.state.step)


def _is_new_best(state, result: dict) -> bool:
    """Record a finite eval loss lower than the best so far; a non-finite one is never best."""
    loss = result["eval_loss"]
    if not math.isfinite(loss) or (state.best_eval_loss is not None and loss >= state.best_eval_loss):
        return False
    state.best_eval_loss = loss
    return True


def _save(s: Session, as_best: bool = False) -> None:
    """Gather every process's data position and counters, then write the checkpoint."""
    state = s.state
    gathered = s.channel.gather_objects((dataclasses.asdict(state.data.ranks[s.rank]), dict(state.local_counts)))
    ranks = [RankPosition(**position) for position, _ in gathered]
    train_state = {**state.state_dict(state.total_counts([c for _, c in gathered]), ranks),
                   "fingerprint": s.fingerprint, "config": dataclasses.asdict(s.cfg)}
    s.checkpoints.save(state.step, s.model, s.optimizer, s.scheduler, s.tokenizer, train_state,
                       ema_model=s.ema.model if s.ema is not None else None, as_best=as_best)


def _at_max_steps(cfg: TrainConfig, state) -> bool:
    return bool(cfg.max_steps) and state.step >= cfg.max_steps


def _more_to_train(cfg: TrainConfig, state) -> bool:
    """--max_steps sets the run's length (epochs repeat as needed); without it, --epochs does."""
    return state.step < cfg.max_steps if cfg.max_steps else state.epoch < cfg.epochs


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
