"""How a model's weights go into a checkpoint or an export, and come back: decided once per run.

FullWeights: `save_pretrained` of every weight (safetensors), a directory plain transformers loads.
AdapterWeights (LoRA/QLoRA): only the trained weights, in peft's adapter format (adapter_config.json +
adapter_model.safetensors, which `PeftModel.from_pretrained` loads on the base); the frozen base is rebuilt
from its source on resume. Its export is the adapters merged into the base weights (a plain transformers
directory), or with merge=False the adapter directory (plus the base in base/ when the base was built from
a preset, as nothing else holds it). Merging works on a state dict, never in place: it serves the EMA
copy (which shares the frozen base) and sharded runs (whose state dict is gathered) alike.
"""
from __future__ import annotations

import copy
import os
import warnings

from ..model import adapters

ADAPTER_CONFIG, ADAPTER_WEIGHTS = adapters.ADAPTER_CONFIG, "adapter_model.safetensors"
BASE_DIR = adapters.BASE_DIR


def read_safetensors(folder: str) -> dict:
    """Every tensor of the folder's .safetensors files."""
    from safetensors.torch import load_file

    weights = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            weights.update(load_file(os.path.join(folder, name)))
    return weights


def _save_base(base, folder: str, weights: dict, hub_layout: bool = True) -> None:
    """save_pretrained of a base model class with these weights; tied copies are left to from_pretrained.

    hub_layout: the weights as the model's published checkpoints name them (transformers 5 writes fused MoE experts
    back as one weight per expert), what exports need; checkpoints keep the model's own names and shapes, which
    load back with load_state_dict as they are and with from_pretrained alike.
    """
    for tied in getattr(base, "all_tied_weights_keys", None) or {}:
        weights.pop(tied, None)  # gathered FSDP/ZeRO weights come back as separate copies of tied ones
    base.save_pretrained(folder, state_dict=weights, safe_serialization=True, save_original_format=hub_layout)


class FullWeights:
    """Every weight of the model, as save_pretrained writes them."""

    frozen_base = False  # nothing is rebuilt from elsewhere on resume

    def save(self, accelerator, model, folder: str, hub_layout: bool = False) -> None:
        """Every process calls this (the state dict of a sharded model is gathered); the main process writes."""
        state_dict = accelerator.get_state_dict(model)
        if accelerator.is_main_process:
            _save_base(accelerator.unwrap_model(model), folder, state_dict, hub_layout)

    def save_copy(self, model, folder: str) -> None:
        """An unsharded copy (the EMA), from the main process."""
        model.save_pretrained(folder, safe_serialization=True, save_original_format=False)

    def load(self, model, folder: str, strict: bool = True) -> None:
        weights = read_safetensors(folder)
        missing, unexpected = model.load_state_dict(weights, strict=False)
        tied = set(getattr(model, "_tied_weights_keys", None) or [])
        if strict and (unexpected or [k for k in missing if k not in tied and "lm_head" not in k]):
            raise ValueError(f"weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")

    def sharded_names(self, model, weights: dict) -> dict:
        return weights

    def export(self, accelerator, model, folder: str, final_path: str) -> None:
        self.save(accelerator, model, folder, hub_layout=True)


class AdapterWeights:
    """The trained weights of a peft model (adapters and modules_to_save) in peft's adapter format."""

    frozen_base = True  # the base is rebuilt from its source on resume, never saved in a checkpoint

    def __init__(self, merge_on_export: bool = True):
        self.merge_on_export = merge_on_export

    def _write(self, model, folder: str, state_dict: dict | None = None, base_path: str | None = "") -> None:
        """adapter_config.json + adapter_model.safetensors; base_path "" keeps the base named when LoRA was applied."""
        from safetensors.torch import save_file

        os.makedirs(folder, exist_ok=True)
        save_file(adapters.unshared(adapters.adapter_weights(model, state_dict)), os.path.join(folder, ADAPTER_WEIGHTS),
                  metadata={"format": "pt"})
        config = copy.deepcopy(model.peft_config["default"])
        if base_path != "":
            config.base_model_name_or_path = base_path
        config.inference_mode = True
        config.save_pretrained(folder)

    def save(self, accelerator, model, folder: str) -> None:
        state_dict = accelerator.get_state_dict(model)
        if accelerator.is_main_process:
            self._write(accelerator.unwrap_model(model), folder, state_dict)

    def save_copy(self, model, folder: str) -> None:
        self._write(model, folder)  # the EMA's averaged adapters; the base is shared

    def load(self, model, folder: str, strict: bool = True) -> None:
        """The adapter weights of `folder` into the peft model; ValueError when they do not belong to it."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        weights = load_file(os.path.join(folder, ADAPTER_WEIGHTS))
        expected = set(adapters.adapter_weights(model))
        if set(weights) != expected:
            missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
            raise ValueError(f"the adapter weights in {folder} do not match the model (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # peft warns about the frozen base weights a file of adapters leaves out
            set_peft_model_state_dict(model, weights)

    def sharded_names(self, model, weights: dict) -> dict:
        """Adapter-file names as the peft model's own state-dict names, for FSDP's loader."""
        return adapters.under_module_names(model, weights)

    def export(self, accelerator, model, folder: str, final_path: str) -> None:
        """Merged weights (a plain transformers directory; bf16 for QLoRA), or the adapter directory."""
        state_dict = accelerator.get_state_dict(model)
        if not accelerator.is_main_process:
            return
        peft_model = accelerator.unwrap_model(model)
        base = peft_model.get_base_model()
        if self.merge_on_export:
            _save_base(base, folder, adapters.base_state_dict(state_dict, adapters.lora_merges(peft_model)))
            return
        base_path = ""
        if not peft_model.peft_config["default"].base_model_name_or_path:
            _save_base(base, os.path.join(folder, BASE_DIR), adapters.base_state_dict(state_dict))
            base_path = os.path.abspath(os.path.join(final_path, BASE_DIR))
        self._write(peft_model, folder, state_dict, base_path)


def weights_format(uses_adapters: bool, merge_on_export: bool = True):
    return AdapterWeights(merge_on_export) if uses_adapters else FullWeights()


def is_export(path: str) -> bool:
    """Whether `path` holds a finished export: a model (config.json) or an adapter directory."""
    return any(os.path.isfile(os.path.join(path, name)) for name in ("config.json", ADAPTER_CONFIG))
