"""Configuration: model shape presets and training presets, as plain dataclasses.

Every field of `TrainConfig` is a command-line flag of `train_low_mem.py train` (`--field=value`), declared
with `setting(default, meaning, resume rule, allowed range)` (lowmem/fields.py): `--help`, the README's flag
table, the value checks and the resume check read them from here. Training presets are subclasses that
change defaults only; `show_config` prints the resolved values.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal, Optional

from lowmem.fields import (APPLIED, AT_LEAST_0, AT_LEAST_1, DATA, FRACTION, FREE, POSITIVE, PREFERENCE, RECORDS,
                           REFUSED, Range, setting)

PROJECT_ROOT = os.path.dirname(os.path.abspath(__file__))


@dataclass(frozen=True)
class ModelPreset:
    """Shape of a Llama/Qwen2-style decoder (T5 uses half the layers in each stack)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True
    rope_theta: float = 10000.0
    vocab_size: int = 32000  # used only when no tokenizer sets it


MODEL_PRESETS: dict[str, ModelPreset] = {
    "tiny": ModelPreset(128, 384, 4, 4, 2, max_position_embeddings=1024),  # tests and the CPU demo
    "small": ModelPreset(768, 2048, 12, 12, 4),  # ~0.1B with a 32k vocabulary
    "medium": ModelPreset(1024, 2816, 24, 16, 8),  # ~0.35B
    "large": ModelPreset(2048, 8192, 16, 32, 8, tie_word_embeddings=False),  # ~1B
    "3b": ModelPreset(3072, 8192, 28, 24, 8, tie_word_embeddings=False),  # ~3B, Llama-3.2-3B shape
    "7b": ModelPreset(4096, 11008, 32, 32, 32, tie_word_embeddings=False),  # ~6.7B, Llama-2-7B shape
    "8b": ModelPreset(4096, 14336, 32, 32, 8, tie_word_embeddings=False, rope_theta=500000.0),  # Llama-3-8B shape
}


Ablation = Literal["profile_only", "history_only", "context_only", "profile_and_history", "profile_and_context",
                   "history_and_context", "all"]


@dataclass
class TrainConfig:
    """Pretraining defaults; with no flags this is the bundled CPU demo (synthetic Q&A, tiny model)."""

    # --- run and paths ---
    run_name: str = setting("demo", "outputs go to output_dir/run_name; one run of a name at a time", FREE)
    output_dir: str = setting("model_save", "models and checkpoints: output_dir/run_name/{final,checkpoints}", FREE)
    log_dir: str = setting(
        "", "TensorBoard + metrics.jsonl go to log_dir/<name>; empty: logs/, or the run's own dir with --output_dir",
        APPLIED)
    train_file: str = setting(
        "data/demo/train.parquet", "file, dir, glob, comma list, or a mixture a:0.7,b:0.3 (see README)", DATA)
    validation_file: str = setting(
        "data/demo/valid.parquet", "same forms as train_file; empty string: no evaluation", APPLIED)
    datasets: list[dict] = setting([], "training mixture from a --config file: [{path, weight, ...}]", DATA)
    validation_datasets: list[dict] = setting([], "validation sets from a --config file, same form", APPLIED)
    test_file: str = setting("data/demo/test.parquet", "prompt/response rows scored by exact match at the end", APPLIED)
    tokenizer_dir: str = setting(
        "model_save/demo_tokenizer", "local tokenizer; empty: the one in finetune_from_ckp_file", DATA)
    model_file: str = setting("", "where the final model goes; empty: output_dir/run_name/final", APPLIED)
    train_state_dir: str = setting("", "where checkpoints go; empty: output_dir/run_name/checkpoints", FREE)
    finetune_from_ckp_file: str = setting("", "local Hugging Face model directory to start from", REFUSED)
    # --- model ---
    model_type: Literal["llama", "qwen2", "t5"] = setting(
        "llama", "llama | qwen2 | t5 (a local model dir brings its own)", REFUSED)
    model_preset: str = setting("tiny", "one of config.MODEL_PRESETS", REFUSED)
    attn_implementation: Literal["auto", "sdpa", "sdpa_varlen", "flex_attention", "flash_attention_2", "eager"] = setting(
        "auto", "auto: flash-attn 2 if importable, flex_attention for packed rows on CUDA, else sdpa", APPLIED)
    disable_flash_attn: bool = setting(False, "force PyTorch SDPA even where flash-attn 2 is importable", APPLIED)
    dropout: float = setting(0.0, "attention dropout (T5: all dropout)", APPLIED, FRACTION)
    gradient_checkpointing: bool = setting(
        False, "recompute activations in backward: less memory, slower (see README)", APPLIED)
    gradient_checkpointing_mode: Literal["full", "selective"] = setting(
        "full", "full: blocks keep only their input | selective: keep matmul outputs", APPLIED)
    gradient_checkpointing_every: int = setting(
        1, "checkpoint 1 block in N (2: every other block keeps its activations)", APPLIED, AT_LEAST_1)
    gradient_checkpointing_offload: bool = setting(
        False, "what checkpointed blocks keep waits in pinned host memory (GPU; a no-op on CPU)", APPLIED)
    tiled_mlp: bool = setting(
        False, "each MLP runs over its tokens in shards (DeepSpeed TiledMLP): long sequences, dense models", APPLIED)
    torch_compile: bool = setting(False, "compile the model (first steps are slower while it compiles)", APPLIED)
    use_liger_kernel: bool = setting(
        False, "fused linear + cross-entropy etc. from liger-kernel when importable", APPLIED)
    router_aux_loss_coef: Optional[float] = setting(
        None, "MoE models: weight of the router's load-balancing loss (logged as aux_loss); None: the model's own "
        "(0.001 for Qwen3-MoE); 0: off", APPLIED, AT_LEAST_0)
    chunked_cross_entropy: Literal["auto", True, False] = setting(
        "auto", "loss in chunks, never the whole logits; auto: wherever it applies (Llama/Qwen2/Qwen3/Mistral and their "
        "MoE kin; not with liger, T5, or a head ZeRO-3 trains)", APPLIED)
    # --- data ---
    max_seq_len: int = setting(
        128, "tokens per sample (or per packed row); longer prompts lose their start", DATA,
        Range(8, hint="a sample needs room for a prompt, a response and the end token"))
    train_on_prompt: bool = setting(
        False, "prompt/response data: also train on prompt tokens (like --train_on=all)", DATA)
    train_on: Literal["all_assistant", "last_assistant", "all"] = setting(
        "all_assistant", "conversations: which turns carry the loss", DATA)
    prompt_column: str = setting("prompt", "column (or jsonl field) holding the prompt", DATA)
    response_column: str = setting("response", "column holding the response", DATA)
    text_column: str = setting("text", "column holding plain text (pretraining)", DATA)
    messages_column: str = setting(
        "messages", "column holding conversations (OpenAI messages; ShareGPT 'conversations' is found too)", DATA)
    chosen_column: str = setting("chosen", "preference pairs: column holding the better answer", DATA)
    rejected_column: str = setting("rejected", "preference pairs: column holding the worse answer", DATA)
    dataloader_buffer_size: int = setting(10000, "rows shuffled together when streaming parquet", DATA, AT_LEAST_1)
    packing: bool = setting(False, "several samples per row (no attention across them): no padding waste", DATA)
    prefetch_batches: int = setting(8, "batches prepared ahead by a background thread", FREE, AT_LEAST_1)
    strict: bool = setting(False, "bad rows raise an error instead of being skipped and counted", APPLIED)
    trace_samples: bool = setting(False, "log a hash of every trained sample per process (checks data order)", APPLIED)
    # --- user-modeling SFT (train_file of records with user_id and target; see README) ---
    ablation_config: Ablation = setting(
        "all", "which of profile / history / context enter the prompt", DATA, applies_to=RECORDS)
    prompt_style: Literal["simple", "detailed"] = setting(
        "simple", "simple (tagged sections) | detailed (natural language)", DATA, applies_to=RECORDS)
    max_history_items: int = setting(
        20, "newest earlier items of the same user shown as history", DATA, AT_LEAST_0, applies_to=RECORDS)
    max_samples_per_user: Optional[int] = setting(
        None, "at most N samples per user; None: all", DATA, Range(1, hint="or None for no cap"), applies_to=RECORDS)
    sample_seed: int = setting(42, "seed of the per-user choice", DATA, applies_to=RECORDS)
    resample_each_epoch: bool = setting(False, "a fresh seeded per-user choice every epoch", DATA, applies_to=RECORDS)
    val_ratio: float = setting(
        0.0, "share held out for validation when no validation_file is given", DATA, FRACTION, applies_to=RECORDS)
    split_by: Literal["user", "latest_item"] = setting(
        "user", "user (whole users held out) | latest_item (each user's latest item)", DATA, applies_to=RECORDS)
    # --- preference training (pairs of a chosen and a rejected answer; see README) ---
    preference_loss: Literal["dpo", "ipo", "hinge", "simpo", "orpo"] = setting(
        "dpo", "dpo | ipo | hinge (against a reference) | simpo | orpo (without one)", DATA, applies_to=PREFERENCE)
    beta: float = setting(
        0.1, "preference strength: how far the policy may move from the reference (SimPO: reward scale)", DATA,
        POSITIVE, applies_to=PREFERENCE)
    simpo_gamma: float = setting(0.5, "SimPO: the margin the chosen answer must win by", DATA, AT_LEAST_0,
                                 applies_to=PREFERENCE)
    orpo_lambda: float = setting(0.1, "ORPO: weight of the odds-ratio term beside the chosen answer's loss", DATA,
                                 AT_LEAST_0, applies_to=PREFERENCE)
    label_smoothing: float = setting(
        0.0, "DPO/SimPO: the share of pairs assumed mislabelled (conservative DPO)", DATA,
        Range(0, 0.5, high_open=True), applies_to=PREFERENCE)
    preference_sft_weight: float = setting(
        0.0, "weight of an SFT term on the chosen answer (its mean token loss)", DATA, AT_LEAST_0,
        applies_to=PREFERENCE)
    reference: Literal["auto", "cache", "adapters_off", "model"] = setting(
        "auto", "DPO/IPO/hinge reference: auto (cache; LoRA: adapters_off unless a cache is there) | cache (computed "
        "once, beside the data) | adapters_off (LoRA) | model (a frozen copy)", DATA, applies_to=PREFERENCE)
    reference_cache_dir: str = setting(
        "", "where reference caches go; empty: beside each dataset's first file", APPLIED, applies_to=PREFERENCE)
    # --- many GPUs (DeepSpeed ZeRO; see accelerate_configs/) ---
    # (on resume these may name the same layout another way; a checkpoint of another ZeRO layout is refused as it loads)
    deepspeed: str = setting(
        "", 'DeepSpeed JSON config, e.g. accelerate_configs/ds_zero3.json; its "auto" values come from the other flags',
        APPLIED)
    zero_stage: int = setting(
        0, "DeepSpeed ZeRO stage 1-3 without a JSON file; 0: off (or what --deepspeed / the launcher says)", APPLIED,
        Range(0, 3, hint="0: off"))
    offload_optimizer: bool = setting(
        False, "ZeRO: optimizer states in host RAM (DeepSpeed CPU Adam); slower, less GPU memory", APPLIED)
    offload_param: bool = setting(False, "ZeRO-3: the weights in host RAM too", APPLIED)
    sequence_parallel_size: int = setting(
        1, "split each sequence over N processes (DeepSpeed Ulysses, with ZeRO); data parallel = processes / N",
        APPLIED, AT_LEAST_1)
    # --- optimisation ---
    epochs: int = setting(
        2, "passes over the training data when --max_steps is 0 (alias: --max_epochs)", APPLIED, AT_LEAST_1)
    max_steps: int = setting(
        0, "optimizer steps of the run (the data repeats as needed); 0: --epochs decides", APPLIED,
        Range(0, hint="0: --epochs sets the length"))
    batch_size_per_gpu: int = setting(
        32, "samples (packed rows with --packing) per process per micro-batch", APPLIED, AT_LEAST_1)
    gradient_accumulation_steps: int = setting(1, "micro-batches per optimizer step", APPLIED, AT_LEAST_1)
    learn_rate: float = setting(3e-3, "peak learning rate", APPLIED, Range(0, low_open=True, hint="try 3e-4"))
    div_factor: float = setting(
        25.0, "warmup starts at learn_rate / div_factor", APPLIED,
        Range(1, hint="warmup starts at learn_rate / div_factor; 1: no warmup ramp"))
    min_lr_ratio: float = setting(
        0.1, "cosine decays to learn_rate * min_lr_ratio", APPLIED,
        Range(0, 1, hint="the schedule ends at learn_rate * min_lr_ratio"))
    warmup_steps: int = setting(30, "optimizer steps of linear warmup", APPLIED, Range(0, hint="0: no warmup"))
    lr_scheduler: Literal["cosine", "linear", "constant"] = setting("cosine", "cosine | linear | constant", APPLIED)
    auto_batch_size: bool = setting(
        False, "CUDA: largest micro-batch that fits; accumulation keeps the global batch", APPLIED)
    max_gpu_memory_gb: float = setting(
        0.0, "CUDA: run as if the card had this much memory; 0: the whole card", APPLIED,
        Range(0, hint="0: the whole card"))
    optimizer: Literal["adamw", "adamw_8bit", "adamw_4bit", "adafactor"] = setting(
        "adamw", "adamw | adamw_8bit | adamw_4bit (torchao) | adafactor", REFUSED)
    bf16_weights: bool = setting(False, "bf16 master weights with stochastic rounding (needs torchao)", REFUSED)
    weight_decay: float = setting(0.01, "AdamW decay of matrices (not biases and norms)", APPLIED, AT_LEAST_0)
    adam_beta1: float = setting(0.9, "Adam first-moment decay", APPLIED, FRACTION)
    adam_beta2: float = setting(0.95, "Adam second-moment decay", APPLIED, FRACTION)
    adam_eps: float = setting(1e-8, "Adam denominator epsilon", APPLIED, POSITIVE)
    max_grad_norm: float = setting(1.0, "0 disables clipping", APPLIED, Range(0, hint="0 disables clipping"))
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = setting(
        "auto", "auto (bf16 on capable GPUs, else fp32) | no | bf16 | fp16", APPLIED)
    seed: int = setting(
        42, "model init, data order and dropout", DATA, Range(0, 2**32 - 1, hint="the range numpy seeds take"))
    skip_nonfinite: bool = setting(
        True, "skip steps whose gradient norm is inf/nan (no host sync with fused adamw)", APPLIED)
    max_nonfinite_steps: int = setting(5, "stop after this many non-finite steps in a row", APPLIED, AT_LEAST_1)
    use_ema: bool = setting(
        False, "keep an exponential moving average of the weights; used for eval and export", REFUSED)
    ema_decay: float = setting(0.999, "EMA weight of the old average per optimizer step", APPLIED, FRACTION)
    freeze_embeddings: bool = setting(False, "train everything but the token embeddings", REFUSED)
    freeze_encoder: bool = setting(False, "T5: train only the decoder", REFUSED)
    # --- adapters (peft) ---
    lora_r: int = setting(0, "LoRA rank; 0: full fine-tuning", REFUSED, Range(0, hint="0: full fine-tuning"))
    lora_alpha: float = setting(16.0, "LoRA scaling numerator (the update is scaled by alpha / r)", REFUSED, POSITIVE)
    lora_dropout: float = setting(
        0.05, "dropout on the LoRA input (LoRA on fused MoE experts takes none: 0 for such runs)", APPLIED, FRACTION)
    lora_target_modules: list[str] = setting(
        [], "module names to adapt, and `experts` for MoE experts; empty: every linear layer of the decoder blocks "
        "and the experts, never a router", REFUSED)
    lora_modules_to_save: list[str] = setting(
        [], "modules trained in full beside the adapters, e.g. embed_tokens,lm_head", REFUSED)
    lora_train_router: bool = setting(
        False, "MoE models: train the router gate in full beside the adapters (LoRA never adapts it)", REFUSED)
    merge_lora: bool = setting(True, "export merged full weights; False: a peft adapter directory", APPLIED)
    qlora: bool = setting(False, "frozen base in 4-bit NF4 under the LoRA adapters (CUDA, torchao)", REFUSED)
    early_stopping_patience: int = setting(
        0, "stop after this many evaluations without improvement; 0: off", APPLIED, Range(0, hint="0 turns it off"))
    early_stopping_threshold: float = setting(
        0.0, "an improvement must lower eval loss by more than this", APPLIED, AT_LEAST_0)
    # --- cadence, in optimizer steps ---
    logging_steps: int = setting(10, "optimizer steps between metrics records", APPLIED, AT_LEAST_1)
    eval_steps: int = setting(
        100, "optimizer steps between evaluations (each epoch end evaluates too)", APPLIED, AT_LEAST_1)
    save_steps: int = setting(
        500, "optimizer steps between checkpoints (each epoch end saves too)", APPLIED, AT_LEAST_1)
    keep_latest_n_ckp: int = setting(3, "complete checkpoints kept, plus the best by eval loss", APPLIED, AT_LEAST_1)
    eval_max_batches: int = setting(
        0, "cap on validation batches per eval; 0: the whole file", APPLIED,
        Range(0, hint="0: the whole validation file"))
    sample_prompts: list[str] = setting([], "prompts answered at each eval, logged as TensorBoard text", APPLIED)
    test_generation_samples: int = setting(
        200, "test_file rows answered greedily at the end; 0: skip", APPLIED, Range(0, hint="0: skip"))
    # --- monitoring ---
    report_to: str = setting("tensorboard", "tensorboard | wandb | tensorboard,wandb | none", APPLIED)
    wandb_project: str = setting("lowmem", "with report_to=wandb", APPLIED)
    wandb_run_name: str = setting("", "with report_to=wandb; empty: run_name", APPLIED)
    # --- resume ---
    is_keep_training: bool = setting(False, "continue from the newest complete checkpoint of this run", FREE)
    allow_config_change: bool = setting(False, "resume even when the config no longer matches the checkpoint", FREE)
    overwrite_output_dir: bool = setting(
        False, "a fresh run over an existing one deletes the old checkpoints, model and logs", FREE)
    is_finetune: bool = setting(False, "set by the SFT presets; informational", FREE)


    def run_dir(self) -> str:
        return os.path.join(self.output_dir, self.run_name)

    def final_dir(self) -> str:
        return self.model_file or os.path.join(self.run_dir(), "final")

    def checkpoint_dir(self) -> str:
        return self.train_state_dir or os.path.join(self.run_dir(), "checkpoints")

    def logging_dir(self) -> str:
        """Where metrics.jsonl and TensorBoard events go; two runs with different output dirs never share it."""
        name = self.wandb_run_name or self.run_name
        if self.log_dir:
            return os.path.join(self.log_dir, name)
        if os.path.normpath(self.output_dir) == "model_save":
            return os.path.join("logs", name)
        return os.path.join(self.run_dir(), "logs", name)


@dataclass
class TrainConfigPretrainLarge(TrainConfig):
    """Pretraining a ~0.1B model on a 10M-row prompt/response parquet, several GPUs."""

    run_name: str = "pretrain_large"
    train_file: str = "data/pretrain_train_10m.parquet"
    validation_file: str = "data/pretrain_valid_100k.parquet"
    test_file: str = ""
    tokenizer_dir: str = "model_save/my_tokenizer"
    model_preset: str = "small"
    max_seq_len: int = 192
    train_on_prompt: bool = True
    epochs: int = 3
    batch_size_per_gpu: int = 32
    gradient_accumulation_steps: int = 2
    learn_rate: float = 1e-4
    warmup_steps: int = 1024
    logging_steps: int = 100
    eval_steps: int = 5000
    eval_max_batches: int = 200
    save_steps: int = 5000
    test_generation_samples: int = 0


@dataclass
class TrainConfigSFT(TrainConfig):
    """Supervised fine-tuning of a pretrained local model on prompt/response parquet."""

    run_name: str = "sft"
    is_finetune: bool = True
    train_file: str = "data/sft_train.parquet"
    validation_file: str = "data/sft_valid.parquet"
    test_file: str = ""
    tokenizer_dir: str = "model_save/my_tokenizer"
    finetune_from_ckp_file: str = "model_save/pretrain_large/final"
    model_preset: str = "small"
    max_seq_len: int = 512
    epochs: int = 3
    batch_size_per_gpu: int = 16
    gradient_accumulation_steps: int = 4
    learn_rate: float = 5e-5
    warmup_steps: int = 100
    logging_steps: int = 20
    eval_steps: int = 500
    save_steps: int = 1000
    test_generation_samples: int = 0


@dataclass
class TrainConfigSFTSmall(TrainConfigSFT):
    """SFT on a small file (tens of thousands of rows), fits a 12 GB card."""

    run_name: str = "sft_small"
    train_file: str = "data/sft_small_train.parquet"
    validation_file: str = "data/sft_small_valid.parquet"
    max_seq_len: int = 384
    batch_size_per_gpu: int = 8
    gradient_accumulation_steps: int = 4
    learn_rate: float = 1e-5
    eval_steps: int = 200
    save_steps: int = 500


TRAIN_PRESETS: dict[str, type[TrainConfig]] = {
    "default": TrainConfig,
    "pretrain_large": TrainConfigPretrainLarge,
    "sft": TrainConfigSFT,
    "sft_small": TrainConfigSFTSmall,
}
