"""Train-state checkpoints: atomic writes, a manifest, rotation, best-by-eval, and safe loading.

Layout of `<checkpoint_dir>/step_00000100/`:
  model/            save_pretrained (safetensors) + tokenizer: loadable by plain transformers
  ema/              the EMA weights, when EMA is on
  optimizer.pt      optimizer state (tensors and numbers only; loaded with weights_only=True); under FSDP
                    the full state gathered to the main process
  deepspeed/state/  under DeepSpeed instead of optimizer.pt: the engine's files, one ZeRO partition per rank
  scheduler.pt      scheduler state (same)
  rng_<rank>.pt     python, numpy, torch and CUDA RNG states of each process
  train_state.json  step, epoch, data position, tokens seen, best metric, counters, config
  manifest.json     every file's size; written last, so its presence marks a complete checkpoint
Each checkpoint is written to `.tmp_step_...` and renamed into place when complete.
"""
from __future__ import annotations

import json
import os
import random
import shutil

import numpy as np
import torch

from .errors import UserError
from .model import real_numel

PREFIX, TMP_PREFIX, BEST = "step_", ".tmp_step_", "best"


def rng_state() -> dict:
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(path: str) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())


def _manifest(path: str) -> dict:
    sizes = {}
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            sizes[os.path.relpath(full, path)] = os.path.getsize(full)
    return sizes


def check_free_space(directory: str, needed_bytes: int) -> None:
    os.makedirs(directory, exist_ok=True)
    free = shutil.disk_usage(directory).free
    if free < needed_bytes:
        raise UserError(f"not enough disk space for a checkpoint in '{directory}': {free / 2**30:.2f} GiB free, "
                        f"about {needed_bytes / 2**30:.2f} GiB needed; free space or set --train_state_dir")


def complete_checkpoints(root: str) -> list[str]:
    """Complete checkpoints (with a manifest), oldest first."""
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if n.startswith(PREFIX))
    return [os.path.join(root, n) for n in names if os.path.isfile(os.path.join(root, n, "manifest.json"))]


def verify(path: str) -> None:
    """Raise ValueError when a file listed in the manifest is missing or has another size."""
    with open(os.path.join(path, "manifest.json"), encoding="utf-8") as f:
        sizes = json.load(f)
    for rel, size in sizes.items():
        full = os.path.join(path, rel)
        if not os.path.isfile(full) or os.path.getsize(full) != size:
            raise ValueError(f"{rel} is missing or truncated")


def save_hf_model(acc, model, folder: str) -> None:
    """save_pretrained of the whole model from the main process; every process must call it (it gathers shards)."""
    state_dict = acc.get_state_dict(model)
    if acc.is_main_process:
        unwrapped = acc.unwrap_model(model)
        # gathered FSDP/ZeRO weights come back as separate copies of tied ones; from_pretrained re-ties them
        for tied in getattr(unwrapped, "all_tied_weights_keys", None) or {}:
            state_dict.pop(tied, None)
        unwrapped.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)


def sharded_kind(accelerator) -> str | None:
    """'deepspeed' or 'fsdp' when optimizer state is sharded across processes, else None."""
    from accelerate.utils import DistributedType

    return {DistributedType.DEEPSPEED: "deepspeed", DistributedType.FSDP: "fsdp"}.get(accelerator.distributed_type)


def _torch_optimizer(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper holds the real one


def save_sharded_optimizer(accelerator, model, optimizer, directory: str) -> None:
    """Sharded optimizer state; every process must call this.

    DeepSpeed: the engine writes its own files into `deepspeed/` (each rank its ZeRO partition of the
    fp32 master weights and Adam moments). FSDP: the full optimizer state is gathered to the main process
    and saved as optimizer.pt, as without sharding.
    """
    if sharded_kind(accelerator) == "deepspeed":
        model.save_checkpoint(os.path.join(directory, "deepspeed"), tag="state", save_latest=False)
        if accelerator.is_main_process:
            with open(os.path.join(directory, "deepspeed", "layout.json"), "w", encoding="utf-8") as f:
                json.dump(_deepspeed_layout(accelerator), f)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    # full_state_dict with cpu_offload gathers onto rank 0 only; other ranks get an empty dict
    state = get_optimizer_state_dict(model, _torch_optimizer(optimizer),
                                     options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if accelerator.is_main_process:
        torch.save(state, os.path.join(directory, "optimizer.pt"))


def _deepspeed_layout(accelerator) -> dict:
    """What a ZeRO checkpoint can only be loaded back into: the same stage on the same number of processes."""
    if sharded_kind(accelerator) != "deepspeed":
        return {}
    return {"zero_stage": accelerator.state.deepspeed_plugin.zero_stage, "world_size": accelerator.num_processes}


def check_layout(accelerator, path: str) -> None:
    """A UserError (not a broken checkpoint to pass over) when `path` was written under another ZeRO layout."""
    layout_file = os.path.join(path, "deepspeed", "layout.json")
    saved = {}
    if os.path.isfile(layout_file):
        with open(layout_file, encoding="utf-8") as f:
            saved = json.load(f)
    elif os.path.isdir(os.path.join(path, "deepspeed")):
        saved = {"zero_stage": "?", "world_size": "?"}
    now = _deepspeed_layout(accelerator)
    if saved != now:
        def describe(layout):
            return f"ZeRO stage {layout['zero_stage']} on {layout['world_size']} processes" if layout else "no DeepSpeed"

        raise UserError(f"resume refused: {path} was written with {describe(saved)}, this run has {describe(now)}; "
                        "launch with the same DeepSpeed settings and process count, or start a new run from its "
                        "model/ with --finetune_from_ckp_file")


def load_sharded(accelerator, path: str, model, optimizer) -> None:
    """Weights and optimizer state saved by `save_sharded_optimizer`; every process must call this.

    DeepSpeed restores the weights from its fp32 master partitions (the engine unpickles its own files,
    so resume only from checkpoints you wrote). FSDP loads model/ and optimizer.pt on the main process
    and broadcasts them into the shards.
    """
    if sharded_kind(accelerator) == "deepspeed":
        loaded, _ = model.load_checkpoint(os.path.join(path, "deepspeed"), tag="state", load_module_strict=False,
                                          load_optimizer_states=True, load_lr_scheduler_states=False)
        if loaded is None:
            raise ValueError("the DeepSpeed state in deepspeed/state is missing")
        return
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    weights, optim_state = {}, {}
    if accelerator.is_main_process:
        model_dir = os.path.join(path, "model")
        for name in sorted(os.listdir(model_dir)):
            if name.endswith(".safetensors"):
                weights.update(load_file(os.path.join(model_dir, name)))
        optim_state = torch.load(os.path.join(path, "optimizer.pt"), map_location="cpu", weights_only=True)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    set_model_state_dict(model, weights, options=options)
    set_optimizer_state_dict(model, _torch_optimizer(optimizer), optim_state, options=options)


class CheckpointManager:
    """Saves and restores the train state of every process; the main process owns the directory."""

    def __init__(self, accelerator, root: str, keep_latest: int):
        self.accelerator = accelerator
        self.root = root
        self.keep_latest = max(1, keep_latest)
        self.last_saved_step = -1

    def save(self, step: int, model, optimizer, scheduler, tokenizer, train_state: dict,
             ema_model=None, as_best: bool = False) -> str:
        acc = self.accelerator
        name = f"{PREFIX}{step:08d}"
        if step == self.last_saved_step:  # e.g. the end of the last epoch is also the end of training
            if as_best and acc.is_main_process:
                self._copy_best(os.path.join(self.root, name))
            acc.wait_for_everyone()
            return os.path.join(self.root, name)
        tmp = os.path.join(self.root, TMP_PREFIX + name[len(PREFIX):])
        final = os.path.join(self.root, name)
        if acc.is_main_process:
            param_bytes = sum(real_numel(p) * p.element_size() for p in model.parameters())
            check_free_space(self.root, param_bytes * (4 if ema_model is None else 5) + (64 << 20))
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        acc.wait_for_everyone()
        save_hf_model(acc, model, os.path.join(tmp, "model"))
        if acc.is_main_process:
            tokenizer.save_pretrained(os.path.join(tmp, "model"))
            if ema_model is not None:
                ema_model.save_pretrained(os.path.join(tmp, "ema"), safe_serialization=True)
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
            _fsync_tree(tmp)
            sizes = _manifest(tmp)
            with open(os.path.join(tmp, "manifest.json"), "w", encoding="utf-8") as f:
                json.dump(sizes, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            if as_best:
                self._copy_best(final)
            self._rotate()
        acc.wait_for_everyone()
        self.last_saved_step = step
        return final

    def _copy_best(self, source: str) -> None:
        best, tmp = os.path.join(self.root, BEST), os.path.join(self.root, ".tmp_best")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(source, tmp)
        shutil.rmtree(best, ignore_errors=True)
        os.replace(tmp, best)

    def _rotate(self) -> None:
        for old in complete_checkpoints(self.root)[: -self.keep_latest]:
            shutil.rmtree(old, ignore_errors=True)

    def restore_latest(self, model, optimizer, scheduler, log, ema_model=None) -> tuple[str | None, dict | None]:
        """Load the newest checkpoint that verifies and loads; broken ones are reported and passed over."""
        import pickle

        for path in reversed(complete_checkpoints(self.root)):
            try:
                verify(path)
                return path, self.load(path, model, optimizer, scheduler, ema_model)
            except (ValueError, OSError, RuntimeError, KeyError, json.JSONDecodeError, pickle.UnpicklingError) as exc:
                log(f"checkpoint {path} is unusable ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                    "trying the previous one")
        return None, None

    def load(self, path: str, model, optimizer, scheduler, ema_model=None) -> dict:
        """Restore everything saved by `save`; only safetensors and weights_only loads are used."""
        from safetensors.torch import load_file

        acc = self.accelerator
        check_layout(acc, path)
        if sharded_kind(acc) is not None:
            load_sharded(acc, path, model, optimizer)
            if sharded_kind(acc) == "deepspeed":
                # loading replaced the param-group dicts DeepSpeed steps (its CPU Adam's too); schedule those
                scheduler.optimizer = model.optimizer
            return self._load_rest(path, scheduler, ema_model)
        weights = {}
        model_dir = os.path.join(path, "model")
        for name in sorted(os.listdir(model_dir)):
            if name.endswith(".safetensors"):
                weights.update(load_file(os.path.join(model_dir, name)))
        unwrapped = acc.unwrap_model(model)
        missing, unexpected = unwrapped.load_state_dict(weights, strict=False)
        tied = set(getattr(unwrapped, "_tied_weights_keys", None) or [])
        if unexpected or [k for k in missing if k not in tied and "lm_head" not in k]:
            raise ValueError(f"weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
        optimizer.load_state_dict(torch.load(os.path.join(path, "optimizer.pt"), map_location="cpu", weights_only=True))
        return self._load_rest(path, scheduler, ema_model)

    def _load_rest(self, path: str, scheduler, ema_model=None) -> dict:
        """Scheduler, EMA, RNG and train state: the same with or without sharded optimizer state."""
        from safetensors.torch import load_file

        acc = self.accelerator
        scheduler.load_state_dict(torch.load(os.path.join(path, "scheduler.pt"), weights_only=True))
        if ema_model is not None:
            ema_weights = {}
            for name in os.listdir(os.path.join(path, "ema")):
                if name.endswith(".safetensors"):
                    ema_weights.update(load_file(os.path.join(path, "ema", name)))
            ema_model.load_state_dict(ema_weights, strict=False)
        rng_file = os.path.join(path, f"rng_{acc.process_index}.pt")
        if os.path.isfile(rng_file):
            set_rng_state(torch.load(rng_file, weights_only=True))
        with open(os.path.join(path, "train_state.json"), encoding="utf-8") as f:
            return json.load(f)
