"""The one owner of checkpoint directories: save, verify, rotate, keep the best, restore, export.

Layout of `<checkpoint_dir>/step_00000100/`:
  model/            the model's weights (weights.py: save_pretrained + tokenizer, loadable by plain transformers;
                    LoRA: peft's adapter directory, adapter_config.json + adapter_model.safetensors)
  ema/              the EMA weights, when EMA is on
  optimizer.pt      optimizer state (tensors and numbers only; loaded with weights_only=True); under FSDP
                    the full state gathered to the main process
  deepspeed/state/  under DeepSpeed instead of optimizer.pt: the engine's files, one ZeRO partition per rank
  scheduler.pt      scheduler state (same)
  rng_<rank>.pt     python, numpy, torch and CUDA RNG states of each process
  train_state.json  step, epoch, every process's data position, counters, the run's settings
  manifest.json     every file's size and content hash, and the parts a complete checkpoint holds; written
                    last, so its presence marks a complete checkpoint
Each checkpoint is written to `.tmp_step_...` and renamed into place when complete; `best/` is a copy of
the checkpoint with the lowest evaluation loss.

The manager is given the run's stateful parts once (RunParts) and how the weights are stored (weights.py,
decided once from the run's settings). The loop asks it to `save(step, best=...)`; set-up asks it to
`restore(plan)` after resume.py has chosen and checked the checkpoint. A checkpoint that fails to load is
passed over for the previous verified one; none loading is an error, never a silent start from step 0.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
from dataclasses import dataclass

import torch

from ..run.errors import DiskFull, UserError, is_disk_full
from .files import (
    BEST,
    PREFIX,
    TMP_PREFIX,
    TRAIN_STATE,
    check_free_space,
    checkpoint_bytes,
    list_checkpoints,
    read_train_state,
    rng_state,
    set_rng_state,
    verify,
    write_manifest,
)
from .resume import ResumePlan, apply_settings, optimizer_hyperparameters
from .sharded import check_layout, load_sharded, save_sharded_optimizer, sharded_kind


@dataclass
class RunParts:
    """What a checkpoint holds; each part has its state saved and restored by the manager alone."""

    model: object  # the prepared (possibly wrapped) model
    optimizer: object
    scheduler: object
    tokenizer: object
    train_state: object  # state_dict() / load_state_dict(saved), called on every process
    ema_model: object | None = None


def _real_bytes(params) -> int:
    from ..model.sizes import real_numel

    return sum(real_numel(p) * p.element_size() for p in params)


class CheckpointManager:
    """Saves and restores the run's state on every process; the main process owns the directory."""

    def __init__(self, accelerator, root: str, keep_latest: int, parts: RunParts, weights):
        self.accelerator, self.root, self.keep_latest = accelerator, root, max(1, keep_latest)
        self.parts, self.weights = parts, weights
        self.sharded = sharded_kind(accelerator)
        self.last_saved_step = -1
        # the param groups as this run's config built them, before a restore overwrites them
        self._fresh_groups = optimizer_hyperparameters(parts.scheduler.optimizer)

    # ---------------------------------------------------------------- saving

    def holds(self) -> list[str]:
        """The parts every complete checkpoint of this run has (recorded in its manifest)."""
        parts = ["model/", "scheduler.pt", TRAIN_STATE, "deepspeed/" if self.sharded == "deepspeed" else "optimizer.pt"]
        parts += [f"rng_{rank}.pt" for rank in range(self.accelerator.num_processes)]
        return parts + (["ema/"] if self.parts.ema_model is not None else [])

    def save(self, step: int, best: bool = False) -> str:
        """Write step_<step> (every process calls this); a step saved already is only copied to best/ if best."""
        acc = self.accelerator
        name = f"{PREFIX}{step:08d}"
        final = os.path.join(self.root, name)
        if step == self.last_saved_step:  # e.g. the end of the last epoch is also the end of training
            if best and acc.is_main_process:
                self._copy_best(final)
            acc.wait_for_everyone()
            return final
        train_state = self.parts.train_state.state_dict()  # a collective: every process's position
        tmp = os.path.join(self.root, TMP_PREFIX + name[len(PREFIX):])
        try:
            self._write(tmp, train_state)
        except Exception as exc:
            if not (isinstance(exc, DiskFull) or is_disk_full(exc)):
                raise
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            previous = list_checkpoints(self.root)[0]
            kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
            why = str(exc) if isinstance(exc, DiskFull) else f"the disk is full ({str(exc).splitlines()[0][:120]})"
            raise DiskFull(f"checkpoint {name} was not written: {why.split('; free space')[0]}; {kept}. Free space "
                           "(or set --train_state_dir elsewhere) and resume with --is_keep_training=True") from None
        if acc.is_main_process:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            if best:
                self._copy_best(final)
            self._rotate()
        acc.wait_for_everyone()
        self.last_saved_step = step
        return final

    def _needed_bytes(self) -> int:
        """The newest checkpoint's size (or an estimate from the parameters), with a margin."""
        complete, _ = list_checkpoints(self.root)
        if complete:
            return int(checkpoint_bytes(complete[-1]) * 1.1) + (1 << 20)
        params = list(self.parts.model.parameters())
        trained = _real_bytes(p for p in params if p.requires_grad)
        return trained * (4 if self.parts.ema_model is None else 5) + _real_bytes(
            p for p in params if not p.requires_grad) + (8 << 20)

    def _write(self, tmp: str, train_state: dict) -> None:
        acc, parts = self.accelerator, self.parts
        if acc.is_main_process:
            check_free_space(self.root, self._needed_bytes())
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        acc.wait_for_everyone()
        self.weights.save(acc, parts.model, os.path.join(tmp, "model"))
        if acc.is_main_process:
            parts.tokenizer.save_pretrained(os.path.join(tmp, "model"))
            if parts.ema_model is not None:
                self.weights.save_copy(parts.ema_model, os.path.join(tmp, "ema"))
            if self.sharded is None:
                torch.save(parts.optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
            torch.save(parts.scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
            with open(os.path.join(tmp, TRAIN_STATE), "w", encoding="utf-8") as f:
                json.dump(train_state, f, indent=1)
        if self.sharded is not None:  # a collective: every process takes part
            save_sharded_optimizer(acc, parts.model, parts.optimizer, tmp, self.weights.frozen_base)
        torch.save(rng_state(), os.path.join(tmp, f"rng_{acc.process_index}.pt"))
        acc.wait_for_everyone()
        if acc.is_main_process:
            write_manifest(tmp, self.holds())

    def _copy_best(self, source: str) -> None:
        best, tmp = os.path.join(self.root, BEST), os.path.join(self.root, ".tmp_best")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(source, tmp)
        shutil.rmtree(best, ignore_errors=True)
        os.replace(tmp, best)

    def _rotate(self) -> None:
        for old in list_checkpoints(self.root)[0][: -self.keep_latest]:
            shutil.rmtree(old, ignore_errors=True)

    # ---------------------------------------------------------------- restoring

    def restore(self, plan: ResumePlan, log) -> str:
        """Load the planned checkpoint into every part; if it fails to load, the previous verified one."""
        from safetensors import SafetensorError

        candidates = [(plan.path, plan.saved)] + [(p, None) for p in plan.fallbacks]
        failures = []
        for path, saved in candidates:
            try:
                if saved is None:
                    verify(path)
                    saved = read_train_state(path)
                self._load(path, restore_rng=not plan.resharded)
                break
            except (ValueError, OSError, RuntimeError, KeyError, json.JSONDecodeError, pickle.UnpicklingError,
                    SafetensorError) as exc:
                failures.append(f"{os.path.basename(path)}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                log(f"checkpoint {path} is unusable ({failures[-1].split(': ', 1)[1]}); trying the previous one")
        else:
            raise UserError(f"resume refused: no checkpoint in {self.root} could be loaded ({'; '.join(failures)})")
        if plan.changes_optimizer:  # untouched otherwise: the restored state is the exact one
            apply_settings(self.parts.scheduler.optimizer, self.parts.scheduler, self._fresh_groups, plan.learn_rate)
        self.parts.train_state.load_state_dict(saved)
        self.last_saved_step = int(saved["step"])
        if plan.changed:
            log("changed on resume: " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in plan.changed.items()))
        return path

    def _load(self, path: str, restore_rng: bool) -> None:
        """Everything `save` wrote, from safetensors and weights_only loads only (DeepSpeed reads its own files)."""
        acc, parts = self.accelerator, self.parts
        check_layout(acc, path)
        if self.sharded is not None:
            load_sharded(acc, path, parts.model, parts.optimizer, self.weights)
            if self.sharded == "deepspeed":
                # loading replaced the param-group dicts DeepSpeed steps (its CPU Adam's too); schedule those
                parts.scheduler.optimizer = parts.model.optimizer
        else:
            self.weights.load(acc.unwrap_model(parts.model), os.path.join(path, "model"))
            parts.optimizer.load_state_dict(torch.load(os.path.join(path, "optimizer.pt"), map_location="cpu",
                                                       weights_only=True))
        parts.scheduler.load_state_dict(torch.load(os.path.join(path, "scheduler.pt"), weights_only=True))
        if parts.ema_model is not None:
            self.weights.load(parts.ema_model, os.path.join(path, "ema"), strict=False)
        if restore_rng:  # another process count draws new streams: the old ones belong to other ranks
            set_rng_state(torch.load(os.path.join(path, f"rng_{acc.process_index}.pt"), weights_only=True))

    def load_best(self) -> str | None:
        """Copy the best checkpoint's weights into the model (and EMA); returns its path, None without one."""
        best = os.path.join(self.root, BEST)
        if not os.path.isdir(best):
            return None
        targets = (("model", self.accelerator.unwrap_model(self.parts.model)), ("ema", self.parts.ema_model))
        for sub, target in targets:
            folder = os.path.join(best, sub)
            if target is not None and os.path.isdir(folder):
                with torch.no_grad():
                    self.weights.load(target, folder, strict=False)
        return best

    # ---------------------------------------------------------------- the final model

    def export(self, model, config: dict, path: str) -> None:
        """The weights (merged LoRA, or the adapters), tokenizer and resolved config, written atomically to `path`;
        a full disk keeps the previous export. Every process calls this."""
        from ..data.template import stop_token_ids

        acc, tokenizer = self.accelerator, self.parts.tokenizer
        tmp, old = path.rstrip("/") + ".tmp", path.rstrip("/") + ".old"
        try:
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
                unwrapped = acc.unwrap_model(model)
                check_free_space(os.path.dirname(os.path.abspath(path)),
                                 _real_bytes(unwrapped.parameters()) + (16 << 20), "the final model")
                _set_stop_tokens(unwrapped, tokenizer, stop_token_ids(tokenizer))
            acc.wait_for_everyone()
            self.weights.export(acc, model, tmp, path)
            if acc.is_main_process:
                tokenizer.save_pretrained(tmp)
                with open(os.path.join(tmp, EXPORTED_CONFIG), "w", encoding="utf-8") as f:
                    json.dump(config, f, indent=1)
        except Exception as exc:
            if not is_disk_full(exc):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            raise DiskFull(f"the disk is full: exporting the final model to {path} failed; the checkpoints are intact "
                           f"and {'the previous export is kept' if os.path.isdir(path) else 'nothing was exported'}. "
                           "Free space and resume with --is_keep_training=True to export") from None
        if acc.is_main_process:
            shutil.rmtree(old, ignore_errors=True)
            if os.path.isdir(path):
                os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()


EXPORTED_CONFIG = "train_config.json"


def _set_stop_tokens(model, tokenizer, stops: list[int]) -> None:
    """generation_config/config list every end-of-turn token, so plain `model.generate` stops where we do."""
    if not stops:
        return
    eos = stops[0] if len(stops) == 1 else list(stops)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    model.config.eos_token_id, model.config.pad_token_id = eos, pad
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.eos_token_id, model.generation_config.pad_token_id = eos, pad
