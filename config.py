"""Configuration: model shape presets and training presets, as plain dataclasses.

Every field of `TrainConfig` is a command-line flag of `train_low_mem.py train` (`--field=value`).
Training presets are subclasses that change defaults only; `show_config` prints the resolved values.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal, Optional

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
}


@dataclass
class TrainConfig:
    """Pretraining defaults; with no flags this is the bundled CPU demo (synthetic Q&A, tiny model)."""

    # --- run and paths ---
    run_name: str = "demo"  # outputs go to output_dir/run_name; one run of a name at a time
    output_dir: str = "model_save"  # models and checkpoints: output_dir/run_name/{final,checkpoints}
    log_dir: str = ""  # TensorBoard + metrics.jsonl go to log_dir/<name>; empty: logs/, or the run's own dir with --output_dir
    train_file: str = "data/demo/train.parquet"  # file, dir, glob, comma list, or a mixture a:0.7,b:0.3 (see README)
    validation_file: str = "data/demo/valid.parquet"  # same forms as train_file; empty string: no evaluation
    datasets: list[dict] = field(default_factory=list)  # training mixture from a --config file: [{path, weight, ...}]
    validation_datasets: list[dict] = field(default_factory=list)  # validation sets from a --config file, same form
    test_file: str = "data/demo/test.parquet"  # prompt/response rows scored by exact match at the end
    tokenizer_dir: str = "model_save/demo_tokenizer"  # local tokenizer; empty: the one in finetune_from_ckp_file
    model_file: str = ""  # where the final model goes; empty: output_dir/run_name/final
    train_state_dir: str = ""  # where checkpoints go; empty: output_dir/run_name/checkpoints
    finetune_from_ckp_file: str = ""  # local Hugging Face model directory to start from
    # --- model ---
    model_type: Literal["llama", "qwen2", "t5"] = "llama"  # llama | qwen2 | t5 (a local model dir brings its own)
    model_preset: str = "tiny"  # one of config.MODEL_PRESETS
    attn_implementation: Literal["auto", "sdpa", "flex_attention", "flash_attention_2", "eager"] = "auto"  # auto: flash-attn 2 if importable, flex_attention for packed rows on CUDA, else sdpa
    disable_flash_attn: bool = False  # force PyTorch SDPA even where flash-attn 2 is importable
    dropout: float = 0.0  # attention dropout (T5: all dropout)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, slower (see README)
    gradient_checkpointing_mode: Literal["full", "selective"] = "full"  # full: blocks keep only their input | selective: keep matmul outputs
    gradient_checkpointing_every: int = 1  # checkpoint 1 block in N (2: every other block keeps its activations)
    torch_compile: bool = False  # compile the model (first steps are slower while it compiles)
    use_liger_kernel: bool = False  # fused linear + cross-entropy etc. from liger-kernel when importable
    chunked_cross_entropy: bool = False  # loss in chunks, never the whole logits (Llama/Qwen2; any device)
    # --- data ---
    max_seq_len: int = 128  # tokens per sample (or per packed row); longer prompts lose their start
    train_on_prompt: bool = False  # prompt/response data: also train on prompt tokens (like --train_on=all)
    train_on: Literal["all_assistant", "last_assistant", "all"] = "all_assistant"  # conversations: which turns carry the loss
    prompt_column: str = "prompt"  # column (or jsonl field) holding the prompt
    response_column: str = "response"  # column holding the response
    text_column: str = "text"  # column holding plain text (pretraining)
    messages_column: str = "messages"  # column holding conversations (OpenAI messages; ShareGPT 'conversations' is found too)
    dataloader_buffer_size: int = 10000  # rows shuffled together when streaming parquet
    packing: bool = False  # several samples per row (no attention across them): no padding waste
    prefetch_batches: int = 8  # batches prepared ahead by a background thread
    strict: bool = False  # bad rows raise an error instead of being skipped and counted
    trace_samples: bool = False  # log a hash of every trained sample per process (checks data order)
    # --- user-modeling SFT (train_file of records with user_id and target; see README) ---
    ablation_config: Literal["profile_only", "history_only", "context_only", "profile_and_history",
                             "profile_and_context", "history_and_context", "all"] = "all"  # which of profile / history / context enter the prompt
    prompt_style: Literal["simple", "detailed"] = "simple"  # simple (tagged sections) | detailed (natural language)
    max_history_items: int = 20  # newest earlier items of the same user shown as history
    max_samples_per_user: Optional[int] = None  # at most N samples per user; None: all
    sample_seed: int = 42  # seed of the per-user choice
    resample_each_epoch: bool = False  # a fresh seeded per-user choice every epoch
    val_ratio: float = 0.0  # share held out for validation when no validation_file is given
    split_by: Literal["user", "latest_item"] = "user"  # user (whole users held out) | latest_item (each user's latest item)
    # --- many GPUs (DeepSpeed ZeRO; see accelerate_configs/) ---
    deepspeed: str = ""  # DeepSpeed JSON config, e.g. accelerate_configs/ds_zero3.json; its "auto" values come from the other flags
    zero_stage: int = 0  # DeepSpeed ZeRO stage 1-3 without a JSON file; 0: off (or what --deepspeed / the launcher says)
    offload_optimizer: bool = False  # ZeRO: optimizer states in host RAM (DeepSpeed CPU Adam); slower, less GPU memory
    offload_param: bool = False  # ZeRO-3: the weights in host RAM too
    # --- optimisation ---
    epochs: int = 2  # passes over the training data when --max_steps is 0 (alias: --max_epochs)
    max_steps: int = 0  # optimizer steps of the run (the data repeats as needed); 0: --epochs decides
    batch_size_per_gpu: int = 32  # samples (packed rows with --packing) per process per micro-batch
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    learn_rate: float = 3e-3  # peak learning rate
    div_factor: float = 25.0  # warmup starts at learn_rate / div_factor
    min_lr_ratio: float = 0.1  # cosine decays to learn_rate * min_lr_ratio
    warmup_steps: int = 30  # optimizer steps of linear warmup
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"  # cosine | linear | constant
    auto_batch_size: bool = False  # CUDA: largest micro-batch that fits; accumulation keeps the global batch
    max_gpu_memory_gb: float = 0.0  # CUDA: run as if the card had this much memory; 0: the whole card
    optimizer: Literal["adamw", "adamw_8bit", "adamw_4bit", "adafactor"] = "adamw"  # adamw | adamw_8bit | adamw_4bit (torchao) | adafactor
    bf16_weights: bool = False  # bf16 master weights with stochastic rounding (needs torchao)
    weight_decay: float = 0.01  # AdamW decay of matrices (not biases and norms)
    adam_beta1: float = 0.9  # Adam first-moment decay
    adam_beta2: float = 0.95  # Adam second-moment decay
    adam_eps: float = 1e-8  # Adam denominator epsilon
    max_grad_norm: float = 1.0  # 0 disables clipping
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"  # auto (bf16 on capable GPUs, else fp32) | no | bf16 | fp16
    seed: int = 42  # model init, data order and dropout
    skip_nonfinite: bool = True  # skip steps whose gradient norm is inf/nan (no host sync with fused adamw)
    max_nonfinite_steps: int = 5  # stop after this many non-finite steps in a row
    use_ema: bool = False  # keep an exponential moving average of the weights; used for eval and export
    ema_decay: float = 0.999  # EMA weight of the old average per optimizer step
    freeze_embeddings: bool = False  # train everything but the token embeddings
    freeze_encoder: bool = False  # T5: train only the decoder
    # --- adapters (peft) ---
    lora_r: int = 0  # LoRA rank; 0: full fine-tuning
    lora_alpha: float = 16.0  # LoRA scaling numerator (the update is scaled by alpha / r)
    lora_dropout: float = 0.05  # dropout on the LoRA input
    lora_target_modules: list[str] = field(default_factory=list)  # module names to adapt; empty: every linear layer of the decoder blocks
    lora_modules_to_save: list[str] = field(default_factory=list)  # modules trained in full beside the adapters, e.g. embed_tokens,lm_head
    merge_lora: bool = True  # export merged full weights; False: a peft adapter directory
    qlora: bool = False  # frozen base in 4-bit NF4 under the LoRA adapters (CUDA with bitsandbytes)
    early_stopping_patience: int = 0  # stop after this many evaluations without improvement; 0: off
    early_stopping_threshold: float = 0.0  # an improvement must lower eval loss by more than this
    # --- cadence, in optimizer steps ---
    logging_steps: int = 10  # optimizer steps between metrics records
    eval_steps: int = 100  # optimizer steps between evaluations (each epoch end evaluates too)
    save_steps: int = 500  # optimizer steps between checkpoints (each epoch end saves too)
    keep_latest_n_ckp: int = 3  # complete checkpoints kept, plus the best by eval loss
    eval_max_batches: int = 0  # cap on validation batches per eval; 0: the whole file
    sample_prompts: list[str] = field(default_factory=list)  # prompts answered at each eval, logged as TensorBoard text
    test_generation_samples: int = 200  # test_file rows answered greedily at the end; 0: skip
    # --- monitoring ---
    report_to: str = "tensorboard"  # tensorboard | wandb | tensorboard,wandb | none
    wandb_project: str = "lowmem"  # with report_to=wandb
    wandb_run_name: str = ""  # with report_to=wandb; empty: run_name
    # --- resume ---
    is_keep_training: bool = False  # continue from the newest complete checkpoint of this run
    allow_config_change: bool = False  # resume even when the config no longer matches the checkpoint
    overwrite_output_dir: bool = False  # a fresh run over an existing one deletes the old checkpoints, model and logs
    is_finetune: bool = False  # set by the SFT presets; informational

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
