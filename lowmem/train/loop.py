"""The training loop, top to bottom: each optimizer step, then logging, evaluation, saving, stopping.

Set-up and resume live in session.py, checkpoints in checkpoint/, what is reported in metrics.py; this file
is what happens once training runs. `train_step` is the math of one optimizer step, `_after_step` the one
place that decides what to log, evaluate and save, `_finish` the end of a run.
"""
from __future__ import annotations

import dataclasses
import json
import math
from itertools import islice

import torch

from config import TrainConfig

from ..checkpoint import is_export
from ..data.batches import Batch, dummy_batch
from ..model.sequence_parallel import whole_sequences
from ..run.errors import UserError
from ..run.runtime import StopSignal, process_memory_summary
from .metrics import SampleTrace, TrainReport, flops_per_token
from .nonfinite import NonfiniteGuard, TrainingHalted
from .session import Session, start_session


def train(cfg: TrainConfig) -> dict:
    s = start_session(cfg)
    try:
        return _run(s)
    finally:
        s.lock.release()


def _run(s: Session) -> dict:
    cfg, state, world = s.cfg, s.state, s.layout.data_world
    if s.resumed_step is not None and not _more_to_train(cfg, state):
        return _finished_already(s)
    stop = StopSignal()
    trace = SampleTrace(cfg.logging_dir(), s.rank, s.resumed_step) if cfg.trace_samples else None
    report = TrainReport(s.accelerator, s.metrics, flops_per_token(s.accelerator.unwrap_model(s.model)),
                         s.total_steps, state, trace, s.log, world)
    guard = NonfiniteGuard(s.optimizer, cfg.skip_nonfinite, cfg.max_nonfinite_steps, state, cfg.checkpoint_dir(),
                           s.accelerator.device, s.ema is not None, s.log)
    stop_early = False
    s.model.train()
    try:
        for window, global_tokens in _optimizer_steps(s, stop):
            if window is None:  # the epoch's data ran out: the next epoch starts, after an evaluation and a save
                state.next_epoch(world)
                stop_early = _after_step(s, report, guard, epoch_end=True)
            else:
                grad_norm, lr = train_step(s, window, global_tokens, report, guard)
                state.advance(window, world, s.layout.data_rank, s.layout.reports)
                report.add(state, window)
                stop_early = _after_step(s, report, guard, grad_norm, lr)
            if stop_early:
                break
    finally:
        report.close()
        stop.restore()
    if stop.agreed:
        s.checkpoints.save(state.step)
        s.log(f"stopped by {stop.agreed} after step {state.step}; checkpoint written, resume with "
              "--is_keep_training=True")
        s.metrics.close()
        return {"stopped": True, "step": state.step, "epoch": state.epoch}
    return _finish(s, stop_early)


def _optimizer_steps(s: Session, stop: StopSignal):
    """(micro-batches, label tokens over every process) of each optimizer step, agreed between the processes, and
    (None, 0) where an epoch's data runs out; ends when the run's length is reached or a process is asked to stop."""
    cfg, state = s.cfg, s.state
    while _more_to_train(cfg, state):
        steps_before = state.step
        rank = s.layout.data_rank
        mine = state.data.ranks[rank]
        batches = s.data.epoch(state.epoch, state.data.shard(rank), mine.position, mine.skip)
        try:
            while not _at_max_steps(cfg, state):
                window = list(islice(batches, cfg.gradient_accumulation_steps))
                agreed = s.channel.gather([sum(b.loss_units for b in window), len(window), int(stop.requested)])
                if agreed[:, 2].any():
                    stop.agreed = stop.signal_name or "a signal on another process"
                    return
                n_micro = int(agreed[:, 1].max())
                if n_micro == 0:
                    break  # every process has finished the epoch
                window += [dummy_batch(s.data.pad_id)] * (n_micro - len(window))
                yield window, int(agreed[:, 0].sum()) // s.layout.sequence_parallel  # a group's processes share it
        finally:
            batches.close()
        if state.step == steps_before == 0:
            raise UserError(f"the training data gave no batch in epoch {state.epoch}: every row was skipped "
                            f"({_skips(s)}); nothing was exported")
        if _at_max_steps(cfg, state):
            return
        yield None, 0


def train_step(s: Session, window: list[Batch], global_tokens: int, report: TrainReport, guard) -> tuple:
    """Forward/backward each micro-batch, clip, step (unless the gradient is not finite); (grad_norm, lr)."""
    from ..run.compat import set_accumulation_position

    acc, cfg = s.accelerator, s.cfg
    # gradients are averaged over data-parallel ranks (DeepSpeed adds a sequence group's parts up)
    ga, world = cfg.gradient_accumulation_steps, s.layout.data_world
    # the loss is averaged over the step's label tokens on every process, not per micro-batch (objective.py)
    scale = torch.tensor(max(global_tokens, 1) / (ga * world), device=acc.device)
    set_accumulation_position(acc, ga - len(window))  # the window's last micro-batch syncs, even a short one
    for batch in window:
        with acc.accumulate(s.model), s.micro_batch():
            loss, parts = s.objective(s.model, s.cut(batch).on(acc.device, non_blocking=True), scale)
            acc.backward(loss * s.gradient_factor if s.gradient_factor != 1 else loss)
            report.accumulate(parts, ga * world)
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


def _after_step(s: Session, report: TrainReport, guard, grad_norm=None, lr=None, epoch_end: bool = False) -> bool:
    """The one place that decides, after a step or at an epoch's end, what to log, evaluate and save; True: stop."""
    cfg, step = s.cfg, s.state.step
    logging = not epoch_end and step % cfg.logging_steps == 0
    evaluating = bool(s.data.validation) and (epoch_end or step % cfg.eval_steps == 0)
    saving = epoch_end or step % cfg.save_steps == 0
    if logging or evaluating or saving:
        guard.settle(s.metrics)  # a diverged run halts here, before anything is saved
    if logging:
        report.log_step(s.state, grad_norm, lr, s.run_state.counts())
    best = stop_early = False
    if evaluating:
        best, stop_early = _evaluate(s, report)
    if saving or best:
        s.checkpoints.save(step, best=best)
    return stop_early


def _evaluate(s: Session, report: TrainReport | None = None) -> tuple[bool, bool]:
    """Evaluate on the validation data and record it; (a new best, stop early)."""
    result = evaluate(s.eval_model, s.data, s.objective, s.accelerator, s.cfg.eval_max_batches, s.cut)
    if report is not None:
        report.log_eval(s.state, result)
    else:
        s.metrics.log({"epoch": s.state.epoch, **result}, s.state.step)
    if s.cfg.sample_prompts and s.accelerator.is_main_process:
        _log_samples(s)
    return s.state.record_eval(result, s.cfg.early_stopping_threshold, s.cfg.early_stopping_patience)


@torch.no_grad()
def evaluate(model, data, objective, accelerator, max_batches: int, cut=lambda batch: batch) -> dict:
    """The objective's validation values (objective.eval_sums: loss, and the router loss or preference accuracy and
    margin) over each validation dataset; eval_loss overall weighted by the datasets' weights, the rest pooled.
    `cut`: this process's part of a batch under sequence parallelism."""
    was_training = model.training
    model.eval()
    sets, names, sums = data.validation_batches(), [], {}
    for i, (_, _, batches) in enumerate(sets):
        for batch in islice(batches, max_batches or None):
            for name, (total, count) in objective.eval_sums(model, cut(batch).on(accelerator.device)).items():
                if name not in sums:
                    names.append(name)
                    sums[name] = torch.zeros(len(sets), 2, device=accelerator.device, dtype=torch.float64)
                sums[name][i, 0] += total.double()
                sums[name][i, 1] += count
    totals = accelerator.reduce(torch.stack([sums[n] for n in names]), reduction="sum") if names else None
    model.train(was_training)
    if totals is None:
        return {"eval_loss": float("nan")}
    per_set = (totals[0, :, 0] / totals[0, :, 1].clamp(min=1)).tolist()  # names[0] is the loss
    weights = [w for _, w, _ in sets]
    loss = sum(w * l for w, l in zip(weights, per_set)) / sum(weights)
    result = {"eval_loss": loss}
    if objective.perplexity:
        result.update(eval_perplexity=math.exp(min(loss, 50.0)), eval_tokens=int(totals[0, :, 1].sum()))
    if len(sets) > 1:
        result.update({f"eval_loss/{name}": value for (name, _, _), value in zip(sets, per_set)})
    for k, name in enumerate(names[1:], start=1):
        result[f"eval_{name}"] = float(totals[k, :, 0].sum() / totals[k, :, 1].sum().clamp(min=1))
    return result


def _log_samples(s: Session) -> None:
    """Greedy answers to the configured sample prompts, as TensorBoard text and metrics.jsonl records."""
    from ..infer.generate import generate_samples

    prompts = list(s.cfg.sample_prompts)
    with whole_sequences():  # generation runs on this process alone
        answers = generate_samples(s.accelerator.unwrap_model(s.eval_model), s.tokenizer, prompts, max_new_tokens=48)
    s.metrics.log_text("samples", "\n\n".join(f"**{p}**\n\n{a}" for p, a in zip(prompts, answers)), s.state.step)
    s.metrics.log({"samples": dict(zip(prompts, answers))}, s.state.step)


def _finish(s: Session, stopped_early: bool) -> dict:
    """Final evaluation, a last checkpoint, the export, and the held-out answers when configured."""
    cfg, acc, state = s.cfg, s.accelerator, s.state
    last_eval = None
    if stopped_early:
        best = s.checkpoints.load_best()
        s.log(f"early stopping after epoch {state.epoch}: no improvement in {cfg.early_stopping_patience} "
              f"evaluations; exporting the best checkpoint ({best})")
    elif s.data.validation and state.last_eval_step == state.step:
        last_eval = state.last_eval  # the epoch's end just evaluated this step
    elif s.data.validation:
        best, _ = _evaluate(s)
        last_eval = state.last_eval
        s.checkpoints.save(state.step, best=best)
    else:
        s.checkpoints.save(state.step)
    # trained weights only: a frozen 4-bit QLoRA base has no isfinite, and frozen weights cannot diverge
    if not all(torch.isfinite(p).all() for p in acc.unwrap_model(s.eval_model).parameters() if p.requires_grad):
        raise TrainingHalted("the model has non-finite weights; it was not exported. Resume from an earlier "
                             "checkpoint with a lower --learn_rate")
    # the data kinds tell `generate` whether the model learnt the chat template or plain continuation
    exported = {**dataclasses.asdict(cfg), "data_kinds": sorted(s.data.kinds)}
    s.checkpoints.export(s.eval_model, exported, cfg.final_dir())
    summary = {"step": state.step, "epoch": state.epoch, "final_dir": cfg.final_dir(),
               "stopped_early": stopped_early, "best_eval_loss": state.best_eval_loss, **(last_eval or {}),
               **{f"data_{k}": v for k, v in sorted(s.run_state.counts().items())}}
    reference = getattr(s.objective, "reference", None)  # preference runs: how the reference cost
    if reference is not None:
        summary["reference_forward_passes"] = reference.forward_passes
    if cfg.test_file and cfg.test_generation_samples and acc.is_main_process:
        summary.update(_answer_test_questions(s))
    s.log(f"done: {json.dumps(summary)} | {process_memory_summary()}")
    s.metrics.close()
    return summary


def _answer_test_questions(s: Session) -> dict:
    """Exact match and BLEU-4 of greedy answers to the test file's prompts."""
    from ..infer.evaluate import generation_metrics
    from ..infer.generate import GenerationOptions

    with whole_sequences():  # generation runs on this process alone
        scores = generation_metrics(s.accelerator.unwrap_model(s.eval_model), s.tokenizer, s.cfg.test_file,
                                    GenerationOptions(max_new_tokens=64, greedy=True), batch_size=32,
                                    max_examples=s.cfg.test_generation_samples, progress="answering the test questions")
    result = {"test_exact_match": scores["exact_match"], "test_bleu4": scores["bleu4"]}
    s.metrics.log(result, s.state.step)
    return result


def _finished_already(s: Session) -> dict:
    """A resume of a run that trained all its steps: export it if the export is missing, else say so."""
    cfg, state = s.cfg, s.state
    length = f"--max_steps={cfg.max_steps}" if cfg.max_steps else f"--epochs={cfg.epochs}"
    if not is_export(cfg.final_dir()):  # stopped between its last step and the export
        s.log(f"run '{cfg.run_name}' finished training at step {state.step} ({length}) but has no final model: "
              "exporting it now")
        return _finish(s, stopped_early=False)
    s.log(f"run '{cfg.run_name}' already finished: it is at step {state.step}, epoch {state.epoch} ({length}), so "
          "nothing was trained or exported; raise --max_steps (or --epochs) to train further")
    s.metrics.close()
    return {"step": state.step, "epoch": state.epoch, "already_finished": True}


def _skips(s: Session) -> str:
    counts = {k: v for k, v in s.run_state.counts().items() if k.startswith("skipped_")}
    return ", ".join(f"{v} {k[len('skipped_'):]}" for k, v in sorted(counts.items())) or "no rows read"


def _at_max_steps(cfg: TrainConfig, state) -> bool:
    return bool(cfg.max_steps) and state.step >= cfg.max_steps


def _more_to_train(cfg: TrainConfig, state) -> bool:
    """--max_steps sets the run's length (epochs repeat as needed); without it, --epochs does."""
    return state.step < cfg.max_steps if cfg.max_steps else state.epoch < cfg.epochs
