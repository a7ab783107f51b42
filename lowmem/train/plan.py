"""`train_low_mem.py plan`: the memory plan of a run and the longest --max_seq_len that fits, without training.

The model is built on PyTorch's meta device (shapes, no memory, nothing loaded), the run's options applied
(LoRA, checkpointing, tiling, the chunked loss), and the plan is the one `train` prints before its first step,
plus what each option it does not use would raise the longest length to. Under `accelerate launch` it is the
plan of one process of that launch (ZeRO sharding included).
"""
from __future__ import annotations

import dataclasses

import torch

from config import TrainConfig

from ..data.demo import ensure_demo_assets
from ..data.tokenizer import load_tokenizer
from ..model.adapters import base_dtype, uses_lora
from ..model.attention import attention_backend
from ..model.build import apply_training_options, model_config
from ..run.runtime import build_accelerator, resolve_precision
from .memory_plan import fixed_bytes, memory_plan, plan_table, planner
from .metrics import host_rss_bytes
from .summary import sharding
from .validate import check_config


def _meta_model(cfg: TrainConfig, tokenizer):
    """The run's model with its training options, on the meta device: every shape, no weight."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    config = model_config(cfg, tokenizer)
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    kwargs = {} if config.is_encoder_decoder else {"attn_implementation": attention_backend(cfg)}
    kwargs["dtype"] = base_dtype(cfg)  # a LoRA base in bf16, as build_model holds it
    with torch.device("meta"):
        model = auto.from_config(config, **kwargs)
        return apply_training_options(model, cfg, log=lambda _: None)


def plan_report(cfg: TrainConfig) -> str:
    """The memory plan line and the longest-length table of this config on this machine."""
    check_config(cfg)
    ensure_demo_assets(cfg.train_file, cfg.tokenizer_dir)  # the bundled default plans like it trains
    baseline = host_rss_bytes()
    accelerator = build_accelerator(cfg)
    tokenizer = load_tokenizer(cfg.tokenizer_dir or cfg.finetune_from_ckp_file)
    model = _meta_model(cfg, tokenizer)
    device = accelerator.device.type
    name, stage, offload = sharding(accelerator)
    precision = resolve_precision(cfg)
    where = {"device": device, "runtime": baseline if device == "cpu" else 0.0,
             "attention": getattr(model.config, "_attn_implementation", None), "parts": cfg.sequence_parallel_size}
    line = memory_plan(model, cfg, precision, accelerator.num_processes, stage, offload, **where)
    p = planner(model, cfg, precision, accelerator.num_processes, stage, offload, **where)
    with_lora = None
    if not uses_lora(cfg) and p.shape is not None:
        adapted = _meta_model(dataclasses.replace(cfg, lora_r=16), tokenizer)
        with_lora = fixed_bytes(adapted, dataclasses.replace(cfg, lora_r=16), precision, accelerator.num_processes,
                                stage, offload, runtime=where["runtime"])
    head = f"plan for one process of {accelerator.num_processes} on {device} ({name}), precision {precision}"
    return "\n".join([head, line.splitlines()[0], plan_table(p, cfg, model, with_lora, device)])
