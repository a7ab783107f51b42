"""All checkpoint I/O: saving and restoring the train state, the settings check on resume, the best
checkpoint, and the final export.

Layout of `<checkpoint_dir>/step_00000100/`:
  model/            save_pretrained (safetensors) + tokenizer: loadable by plain transformers (LoRA: the adapter
                    directory, adapter_config.json + adapter_model.safetensors, which peft loads on the base)
  ema/              the EMA weights, when EMA is on
  optimizer.pt      optimizer state (tensors and numbers only; loaded with weights_only=True); under FSDP
                    the full state gathered to the main process
  deepspeed/state/  under DeepSpeed instead of optimizer.pt: the engine's files, one ZeRO partition per rank
  scheduler.pt      scheduler state (same)
  rng_<rank>.pt     python, numpy, torch and CUDA RNG states of each process
  train_state.json  step, epoch, every process's data position, counters, the run's settings
  manifest.json     every file's size and content hash; written last, so its presence marks a complete checkpoint
Each checkpoint is written to `.tmp_step_...` and renamed into place when complete.

On resume the newest checkpoint's train_state.json is read and its files verified before anything is
loaded or written: a changed setting that would break the run is refused, settings that may change
(learning rate, schedule, decay, betas, clipping, cadence, length) are applied to the restored
optimizer and scheduler and logged, and a checkpoint that fails verification is passed over for the
previous one. Checkpoints present but none usable is an error, never a silent start from step 0.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field

import torch

from .adapters import ADAPTER_CONFIG, is_peft_model, load_adapter, save_adapter, save_lora_export
from .checkpoint_files import (BEST, PREFIX, TMP_PREFIX, DiskFull, check_free_space, checkpoint_bytes, is_disk_full,
                               list_checkpoints, read_train_state, rng_state, set_rng_state, verify, write_manifest)
from .checkpoint_sharded import check_layout, load_sharded, save_sharded_optimizer, sharded_kind
from .errors import UserError
from .model import real_numel

# changing one of these would not continue the same run: refused unless --allow_config_change=True
DATA_FIELDS = ("train_file", "datasets", "max_seq_len", "seed", "dataloader_buffer_size", "train_on_prompt", "train_on",
               "packing", "prompt_column", "response_column", "text_column", "messages_column", "ablation_config",
               "prompt_style", "max_history_items", "max_samples_per_user", "sample_seed", "resample_each_epoch",
               "val_ratio", "split_by")
# the model and optimizer state could not even be loaded with one of these changed: always refused
SHAPE_FIELDS = ("model_type", "model_preset", "finetune_from_ckp_file", "vocab_size", "optimizer", "bf16_weights",
                "use_ema", "freeze_embeddings", "freeze_encoder", "lora_r", "lora_target_modules",
                "lora_modules_to_save", "qlora")
# these may change on resume: they take effect and are logged
CHANGEABLE_FIELDS = ("learn_rate", "div_factor", "min_lr_ratio", "warmup_steps", "lr_scheduler", "weight_decay",
                     "adam_beta1", "adam_beta2", "adam_eps", "max_grad_norm", "epochs", "max_steps", "logging_steps",
                     "eval_steps", "save_steps", "keep_latest_n_ckp", "eval_max_batches", "early_stopping_patience",
                     "early_stopping_threshold", "ema_decay", "batch_size_per_gpu", "gradient_accumulation_steps")


def fingerprint(cfg, world: int, vocab_size: int) -> dict:
    """What a checkpoint records of the run's settings, to compare on resume."""
    values = {name: getattr(cfg, name) for name in DATA_FIELDS + SHAPE_FIELDS if hasattr(cfg, name)}
    values["vocab_size"] = vocab_size
    values["global_batch"] = cfg.batch_size_per_gpu * world * cfg.gradient_accumulation_steps
    values["world_size"] = world
    return values


@dataclass
class ResumePlan:
    """The checkpoint a resume starts from, what changed, and the older verified ones to fall back to."""

    path: str
    saved: dict
    changed: dict = field(default_factory=dict)  # name -> (old, new) of CHANGEABLE_FIELDS
    resharded: bool = False  # another process count or global batch: the data position is recomputed
    fallbacks: list = field(default_factory=list)


def _differences(old: dict, new: dict, names) -> dict:
    return {k: (old[k], new[k]) for k in names if k in old and k in new and old[k] != new[k]}


def _describe(changes: dict) -> str:
    return ", ".join(f"{k} was {a!r}, now {b!r}" for k, (a, b) in changes.items())


def plan_resume(cfg, new_fingerprint: dict, log) -> ResumePlan | None:
    """Pick and verify the checkpoint to resume from and check the settings, before any weight is loaded.

    None when the run has no checkpoint yet (a resumed job that never saved starts from step 0).
    """
    root = cfg.checkpoint_dir()
    complete, incomplete = list_checkpoints(root)
    if not complete and not incomplete:
        return None
    usable, problems = [], []
    for path in reversed(complete):
        try:
            verify(path)
            usable.append((path, read_train_state(path)))
            break  # older ones are verified only if this one fails to load
        except (OSError, ValueError) as exc:
            problems.append(f"{os.path.basename(path)}: {str(exc).splitlines()[0][:200]}")
            log(f"checkpoint {path} is unusable ({problems[-1].split(': ', 1)[1]}); trying the previous one")
    if not usable:
        listed = problems + [f"{os.path.basename(p)}: incomplete (no manifest)" for p in incomplete]
        raise UserError(f"resume refused: no usable checkpoint in {root} ({'; '.join(listed)}); nothing was loaded or "
                        "changed. Start over with --overwrite_output_dir=True, or restore a checkpoint")
    path, saved = usable[0]
    old = saved.get("fingerprint", {})
    shape = _differences(old, new_fingerprint, SHAPE_FIELDS)
    if shape:
        raise UserError(f"resume refused: {_describe(shape)}; the checkpoints in {root} hold another model or optimizer "
                        "and are kept as they are. Resume with the old settings, or start a new run with another "
                        "--run_name (e.g. --finetune_from_ckp_file=<checkpoint>/model)")
    data = _differences(old, new_fingerprint, DATA_FIELDS + ("global_batch",))
    if data and not cfg.allow_config_change:
        raise UserError(f"resume refused: {_describe(data)}; pass --allow_config_change=True to continue anyway (the run "
                        "will not be exact; a changed batch continues without repeating or skipping a sample)")
    changed = _differences(saved.get("config", {}), vars(cfg), CHANGEABLE_FIELDS)
    resharded = old.get("world_size", new_fingerprint["world_size"]) != new_fingerprint["world_size"]
    return ResumePlan(path, saved, changed, resharded, list(reversed(complete[:complete.index(path)])))


def apply_settings(optimizer, scheduler, fresh_groups: list[dict], learn_rate: float) -> None:
    """After loading saved state: the param groups take this run's hyperparameters, the schedule its peak lr."""
    groups = getattr(optimizer, "param_groups", [])
    for group, fresh in zip(groups, fresh_groups):
        group.update({k: v for k, v in fresh.items() if k not in ("params", "initial_lr", "lr")})
    scheduler.base_lrs = [learn_rate for _ in scheduler.base_lrs]
    for group in groups:
        group["initial_lr"] = learn_rate
    factors = [fn(scheduler.last_epoch) for fn in scheduler.lr_lambdas]
    for group, factor in zip(groups, factors):
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(learn_rate * factor)  # torchao's optimizers keep lr as a tensor and refuse a float
        else:
            group["lr"] = learn_rate * factor
    scheduler._last_lr = [float(group["lr"]) for group in groups]


def optimizer_hyperparameters(optimizer) -> list[dict]:
    """The param groups' settings as built from this run's config (saved before a checkpoint overwrites them)."""
    return [{k: v for k, v in g.items() if k != "params"} for g in getattr(optimizer, "param_groups", [])]


def save_hf_model(acc, model, folder: str) -> None:
    """save_pretrained of the whole model from the main process; every process must call it (it gathers shards)."""
    state_dict = acc.get_state_dict(model)
    if acc.is_main_process and is_peft_model(acc.unwrap_model(model)):
        save_adapter(acc.unwrap_model(model), folder, state_dict)  # LoRA: the trained weights only
    elif acc.is_main_process:
        unwrapped = acc.unwrap_model(model)
        # gathered FSDP/ZeRO weights come back as separate copies of tied ones; from_pretrained re-ties them
        for tied in getattr(unwrapped, "all_tied_weights_keys", None) or {}:
            state_dict.pop(tied, None)
        unwrapped.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)


def _save_ema(ema_model, folder: str) -> None:
    if is_peft_model(ema_model):
        save_adapter(ema_model, folder)  # LoRA: the averaged adapters only; the base is shared
    else:
        ema_model.save_pretrained(folder, safe_serialization=True)


def _load_into(model, folder: str) -> None:
    """Weights saved by save_hf_model / _save_ema into a model (a LoRA model takes its adapter files)."""
    if is_peft_model(model):
        load_adapter(model, folder)
    else:
        model.load_state_dict(_load_weights(folder), strict=False)


def _load_weights(folder: str) -> dict:
    from safetensors.torch import load_file

    weights = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            weights.update(load_file(os.path.join(folder, name)))
    return weights


class CheckpointManager:
    """Saves and restores the train state of every process; the main process owns the directory."""

    def __init__(self, accelerator, root: str, keep_latest: int):
        self.accelerator = accelerator
        self.root = root
        self.keep_latest = max(1, keep_latest)
        self.last_saved_step = -1

    def _needed_bytes(self, model, ema_model) -> int:
        """The newest checkpoint's size (or an estimate from the parameters), with a margin."""
        complete, _ = list_checkpoints(self.root)
        if complete:
            return int(checkpoint_bytes(complete[-1]) * 1.1) + (1 << 20)
        param_bytes = sum(real_numel(p) * p.element_size() for p in model.parameters() if p.requires_grad)
        frozen = sum(real_numel(p) * p.element_size() for p in model.parameters() if not p.requires_grad)
        return param_bytes * (4 if ema_model is None else 5) + frozen + (8 << 20)

    def save(self, step: int, model, optimizer, scheduler, tokenizer, train_state: dict,
             ema_model=None, as_best: bool = False) -> str:
        acc = self.accelerator
        name = f"{PREFIX}{step:08d}"
        final = os.path.join(self.root, name)
        if step == self.last_saved_step:  # e.g. the end of the last epoch is also the end of training
            if as_best and acc.is_main_process:
                self._copy_best(final)
            acc.wait_for_everyone()
            return final
        tmp = os.path.join(self.root, TMP_PREFIX + name[len(PREFIX):])
        try:
            self._write(tmp, model, optimizer, scheduler, tokenizer, train_state, ema_model)
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
            if as_best:
                self._copy_best(final)
            self._rotate()
        acc.wait_for_everyone()
        self.last_saved_step = step
        return final

    def _write(self, tmp, model, optimizer, scheduler, tokenizer, train_state, ema_model) -> None:
        acc = self.accelerator
        if acc.is_main_process:
            check_free_space(self.root, self._needed_bytes(model, ema_model))
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        acc.wait_for_everyone()
        save_hf_model(acc, model, os.path.join(tmp, "model"))
        if acc.is_main_process:
            tokenizer.save_pretrained(os.path.join(tmp, "model"))
            if ema_model is not None:
                _save_ema(ema_model, os.path.join(tmp, "ema"))
            if sharded_kind(acc) is None:
                torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
            torch.save(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
            with open(os.path.join(tmp, "train_state.json"), "w", encoding="utf-8") as f:
                json.dump(train_state, f, indent=1)
        if sharded_kind(acc) is not None:
            save_sharded_optimizer(acc, model, optimizer, tmp)  # a collective: every process takes part
        torch.save(rng_state(), os.path.join(tmp, f"rng_{acc.process_index}.pt"))
        acc.wait_for_everyone()
        if acc.is_main_process:
            write_manifest(tmp)

    def _copy_best(self, source: str) -> None:
        best, tmp = os.path.join(self.root, BEST), os.path.join(self.root, ".tmp_best")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(source, tmp)
        shutil.rmtree(best, ignore_errors=True)
        os.replace(tmp, best)

    def _rotate(self) -> None:
        for old in list_checkpoints(self.root)[0][: -self.keep_latest]:
            shutil.rmtree(old, ignore_errors=True)

    def restore(self, plan: ResumePlan, model, optimizer, scheduler, log, ema_model=None) -> tuple[str, dict]:
        """Load the planned checkpoint; if it fails to load, the previous verified one. Returns (path, train state)."""
        import pickle

        from safetensors import SafetensorError

        candidates = [(plan.path, plan.saved)] + [(p, None) for p in plan.fallbacks]
        failures = []
        for path, saved in candidates:
            try:
                if saved is None:
                    verify(path)
                    saved = read_train_state(path)
                self.load(path, model, optimizer, scheduler, ema_model, reshard=plan.resharded)
                self.last_saved_step = int(saved["step"])
                return path, saved
            except (ValueError, OSError, RuntimeError, KeyError, json.JSONDecodeError, pickle.UnpicklingError,
                    SafetensorError) as exc:
                failures.append(f"{os.path.basename(path)}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                log(f"checkpoint {path} is unusable ({failures[-1].split(': ', 1)[1]}); trying the previous one")
        raise UserError(f"resume refused: no checkpoint in {self.root} could be loaded ({'; '.join(failures)})")

    def load(self, path: str, model, optimizer, scheduler, ema_model=None, reshard: bool = False) -> None:
        """Restore everything saved by `save`; only safetensors and weights_only loads are used."""
        acc = self.accelerator
        check_layout(acc, path)
        if sharded_kind(acc) is not None:
            load_sharded(acc, path, model, optimizer)
            if sharded_kind(acc) == "deepspeed":
                # loading replaced the param-group dicts DeepSpeed steps (its CPU Adam's too); schedule those
                scheduler.optimizer = model.optimizer
        else:
            unwrapped = acc.unwrap_model(model)
            if is_peft_model(unwrapped):
                load_adapter(unwrapped, os.path.join(path, "model"))  # LoRA: the base is rebuilt, not saved
            else:
                weights = _load_weights(os.path.join(path, "model"))
                missing, unexpected = unwrapped.load_state_dict(weights, strict=False)
                tied = set(getattr(unwrapped, "_tied_weights_keys", None) or [])
                if unexpected or [k for k in missing if k not in tied and "lm_head" not in k]:
                    raise ValueError(f"weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
            optimizer.load_state_dict(torch.load(os.path.join(path, "optimizer.pt"), map_location="cpu",
                                                 weights_only=True))
        scheduler.load_state_dict(torch.load(os.path.join(path, "scheduler.pt"), weights_only=True))
        if ema_model is not None:
            _load_into(ema_model, os.path.join(path, "ema"))
        rng_file = os.path.join(path, f"rng_{acc.process_index}.pt")
        if os.path.isfile(rng_file) and not reshard:
            set_rng_state(torch.load(rng_file, weights_only=True))


def load_best_into(accelerator, root: str, model, ema_model=None) -> str | None:
    """Copy the best checkpoint's weights into the model (and EMA); returns its path."""
    best = os.path.join(root, BEST)
    if not os.path.isdir(best):
        return None
    for sub, target in (("model", accelerator.unwrap_model(model)), ("ema", ema_model)):
        folder = os.path.join(best, sub)
        if target is None or not os.path.isdir(folder):
            continue
        with torch.no_grad():
            _load_into(target, folder)
    return best


def has_export(path: str) -> bool:
    """Whether `path` holds a finished export: a model (config.json) or an adapter directory."""
    return any(os.path.isfile(os.path.join(path, name)) for name in ("config.json", ADAPTER_CONFIG))


def export_final(accelerator, model, tokenizer, config: dict, path: str) -> None:
    """save_pretrained (safetensors) + tokenizer + resolved config, written atomically; a full disk keeps the old one."""
    from .template import stop_token_ids

    tmp, old = path.rstrip("/") + ".tmp", path.rstrip("/") + ".old"
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            unwrapped = accelerator.unwrap_model(model)
            check_free_space(os.path.dirname(os.path.abspath(path)),
                             sum(real_numel(p) * p.element_size() for p in unwrapped.parameters()) + (16 << 20),
                             "the final model")
            _set_stop_tokens(unwrapped, tokenizer, stop_token_ids(tokenizer))
        accelerator.wait_for_everyone()
        if is_peft_model(accelerator.unwrap_model(model)):  # merged weights, or the adapter directory
            save_lora_export(accelerator, model, tmp, path, merge=config.get("merge_lora", True))
        else:
            save_hf_model(accelerator, model, tmp)
        if accelerator.is_main_process:
            tokenizer.save_pretrained(tmp)
            with open(os.path.join(tmp, "train_config.json"), "w", encoding="utf-8") as f:
                json.dump(config, f, indent=1)
    except Exception as exc:
        if not is_disk_full(exc):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        raise DiskFull(f"the disk is full: exporting the final model to {path} failed; the checkpoints are intact and "
                       f"{'the previous export is kept' if os.path.isdir(path) else 'nothing was exported'}. Free space "
                       "and resume with --is_keep_training=True to export") from None
    if accelerator.is_main_process:
        shutil.rmtree(old, ignore_errors=True)
        if os.path.isdir(path):
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _set_stop_tokens(model, tokenizer, stops: list[int]) -> None:
    """generation_config/config list every end-of-turn token, so plain `model.generate` stops where we do."""
    if not stops:
        return
    eos = stops[0] if len(stops) == 1 else list(stops)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    model.config.eos_token_id, model.config.pad_token_id = eos, pad
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.eos_token_id, model.generation_config.pad_token_id = eos, pad


def check_checkpoints(path: str) -> int:
    """`train_low_mem.py check_checkpoint DIR`: verify one checkpoint, a checkpoints dir or a run dir; 0 if all pass."""
    path = str(path)
    if os.path.isfile(os.path.join(path, "manifest.json")):
        targets = [path]
    else:
        root = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path
        complete, incomplete = list_checkpoints(root)
        targets = complete + [p for p in [os.path.join(root, BEST)] if os.path.isfile(os.path.join(p, "manifest.json"))]
        for partial in incomplete:
            print(f"INCOMPLETE {partial} (no manifest: a save that did not finish; resume ignores it)")
        if not targets and not incomplete:
            raise UserError(f"'{path}' holds no checkpoint (looked for manifest.json and step_* directories)")
    failed = 0
    for target in targets:
        try:
            verify(target)
            step = read_train_state(target).get("step", "?")
            print(f"OK {target} (step {step}, {checkpoint_bytes(target) / 2**20:.1f} MiB)")
        except (OSError, ValueError) as exc:
            failed += 1
            print(f"FAILED {target}: {str(exc).splitlines()[0]}")
    return 2 if failed else 0
