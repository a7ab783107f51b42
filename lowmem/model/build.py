"""Build a model from a preset (random init) or load a local Hugging Face directory; pick attention."""
from __future__ import annotations

import importlib.util
import os

import torch

from config import MODEL_PRESETS, TrainConfig

from ..run.errors import UserError
from . import adapters, chunked_loss, offload, recompute, tiling
from .attention import attention_backend

MODEL_TYPES = ("llama", "qwen2", "t5")


def _hf_config(cfg: TrainConfig, vocab_size: int, special_ids: dict):
    from transformers import LlamaConfig, Qwen2Config, T5Config

    if cfg.model_preset not in MODEL_PRESETS:
        raise UserError(f"model_preset '{cfg.model_preset}' does not exist; choose one of {', '.join(MODEL_PRESETS)}")
    p = MODEL_PRESETS[cfg.model_preset]
    if cfg.model_type == "t5":
        return T5Config(
            vocab_size=vocab_size, d_model=p.hidden_size, d_kv=p.hidden_size // p.num_heads, d_ff=p.intermediate_size,
            num_layers=max(1, p.num_layers // 2), num_decoder_layers=max(1, p.num_layers // 2), num_heads=p.num_heads,
            dropout_rate=cfg.dropout, feed_forward_proj="gated-gelu", tie_word_embeddings=p.tie_word_embeddings,
            decoder_start_token_id=special_ids["pad"], **special_ids_for_config(special_ids),
        )
    config_cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[cfg.model_type]
    return config_cls(
        vocab_size=vocab_size, hidden_size=p.hidden_size, intermediate_size=p.intermediate_size,
        num_hidden_layers=p.num_layers, num_attention_heads=p.num_heads, num_key_value_heads=p.num_kv_heads,
        max_position_embeddings=max(p.max_position_embeddings, cfg.max_seq_len), rope_theta=p.rope_theta,
        tie_word_embeddings=p.tie_word_embeddings, attention_dropout=cfg.dropout,
        **special_ids_for_config(special_ids),
    )


def special_ids_for_config(special_ids: dict) -> dict:
    return {"pad_token_id": special_ids["pad"], "eos_token_id": special_ids["eos"], "bos_token_id": special_ids.get("bos")}


def model_config(cfg: TrainConfig, tokenizer):
    """The Hugging Face config of the model this run trains (a preset's, or a local directory's; an adapter
    directory's base), read without building anything."""
    from transformers import AutoConfig

    source = cfg.finetune_from_ckp_file
    if source:
        folder = adapters.adapter_base_dir(source) if adapters.is_adapter_dir(source) else source
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise UserError(f"finetune_from_ckp_file '{folder}' is not a Hugging Face model directory (no "
                            "config.json); pass a directory written by save_pretrained, e.g. model_save/<run>/final")
        return AutoConfig.from_pretrained(os.path.abspath(folder))
    return _hf_config(cfg, len(tokenizer), {"pad": tokenizer.pad_token_id, "eos": tokenizer.eos_token_id,
                                            "bos": tokenizer.bos_token_id})


def build_model(cfg: TrainConfig, tokenizer):
    """The model the run trains: loaded from finetune_from_ckp_file, else built from the preset."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    attn = attention_backend(cfg)
    adapters.check_lora_runtime(cfg)  # before any weight is loaded: peft missing, or QLoRA on CPU, is one line
    dtype = adapters.base_dtype(cfg)
    if cfg.finetune_from_ckp_file and adapters.is_adapter_dir(cfg.finetune_from_ckp_file):
        # an earlier run's adapters (--merge_lora=False): merged into their base, the model training starts from
        merged = adapters.load_merged(cfg.finetune_from_ckp_file, dtype, len(tokenizer), attn_implementation=attn)
        return merged
    if cfg.finetune_from_ckp_file:
        path = os.path.abspath(cfg.finetune_from_ckp_file)  # peft records it as the adapters' base
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise UserError(f"finetune_from_ckp_file '{path}' is not a Hugging Face model directory (no config.json); "
                            "pass a directory written by save_pretrained, e.g. model_save/<run>/final")
        hf_config = AutoConfig.from_pretrained(path)
        _check_attention_applies(cfg, hf_config.is_encoder_decoder)
        auto = AutoModelForSeq2SeqLM if hf_config.is_encoder_decoder else AutoModelForCausalLM
        kwargs = {} if hf_config.is_encoder_decoder else {"attn_implementation": attn}
        try:
            model = auto.from_pretrained(path, use_safetensors=True, dtype=dtype, **kwargs)
        except OSError as exc:
            raise UserError(f"could not load weights from '{path}': {str(exc).splitlines()[0]} "
                            "(only safetensors weights are loaded)") from None
        if model.get_input_embeddings().num_embeddings < len(tokenizer):
            model.resize_token_embeddings(len(tokenizer))
        return model
    if cfg.model_type not in MODEL_TYPES:
        raise UserError(f"model_type '{cfg.model_type}' is not supported; choose one of {', '.join(MODEL_TYPES)}")
    special_ids = {"pad": tokenizer.pad_token_id, "eos": tokenizer.eos_token_id, "bos": tokenizer.bos_token_id}
    hf_config = _hf_config(cfg, len(tokenizer), special_ids)
    if cfg.model_type == "t5":
        _check_attention_applies(cfg, True)
        return AutoModelForSeq2SeqLM.from_config(hf_config)
    return AutoModelForCausalLM.from_config(hf_config, attn_implementation=attn, dtype=dtype)


def _check_attention_applies(cfg: TrainConfig, is_encoder_decoder: bool) -> None:
    # T5 keeps its own attention (relative position bias); a silently ignored choice would mislead
    if is_encoder_decoder and cfg.attn_implementation != "auto":
        raise UserError(f"--attn_implementation={cfg.attn_implementation} applies to decoder models (Llama/Qwen2); "
                        "T5 uses its own attention: drop the flag")


def apply_training_options(model, cfg: TrainConfig, log=print, zero3: bool = False):
    """Memory and speed options that change how the model runs, not what it computes; then LoRA when asked."""
    if cfg.freeze_embeddings:
        model.get_input_embeddings().requires_grad_(False)
    if cfg.freeze_encoder:
        if not model.config.is_encoder_decoder:
            raise UserError("--freeze_encoder applies to encoder-decoder models (T5); use --freeze_embeddings instead")
        model.get_encoder().requires_grad_(False)
    if cfg.tiled_mlp:
        tiling.tile_mlps(model)  # before LoRA wraps the MLPs' linear layers
    if cfg.gradient_checkpointing:
        moved_by_transformers = offload.choose(cfg) == "transformers"
        recompute.enable(model, cfg.gradient_checkpointing_mode, cfg.gradient_checkpointing_every, moved_by_transformers)
    if chunked_loss.wanted(model.config, cfg, zero3):
        chunked_loss.enable(model)
    if cfg.use_liger_kernel:
        if cfg.torch_compile:
            raise UserError("--use_liger_kernel and --torch_compile do not combine (dynamo cannot trace liger's fused "
                            "cross-entropy); each alone is as fast as the other on an H100 (bench/RESULTS.md): pick one")
        if not torch.cuda.is_available() or importlib.util.find_spec("liger_kernel") is None:
            raise UserError("use_liger_kernel=True needs a CUDA GPU and `pip install liger-kernel`; drop the flag on CPU")
        from ..run.compat import apply_liger_kernels

        apply_liger_kernels(model)
    if cfg.bf16_weights:
        model.to(torch.bfloat16)
    if adapters.uses_lora(cfg):  # after the options that patch the base model, before compile wraps the outermost
        model = adapters.apply_lora(model, cfg, log)
    if cfg.torch_compile:
        model.compile()  # in place: parameter names stay those of the plain model
    return model
