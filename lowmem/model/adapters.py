"""LoRA and QLoRA adapters through peft: the checks, the peft model, its trained weights and the merge math.

With --lora_r > 0 the run trains a peft model: the base is frozen (bf16 when the run computes in bf16, 4-bit
NF4 from torchao with --qlora) and only the adapters, plus --lora_modules_to_save, are trained. How their
weights are written into checkpoints and exports is lowmem/checkpoint/weights.py's job (AdapterWeights).
"""
from __future__ import annotations

import difflib
import importlib.util
import json
import os
import re
import sys
import warnings

import torch

from ..run.errors import UserError

ADAPTER_CONFIG = "adapter_config.json"
BASE_DIR = "base"  # an adapter export of a base built from a preset carries the base here
PEFT_HINT = "pip install 'peft>=0.17,<1' (requirements.txt)"
NF4_BLOCK, NF4_SCALER_BLOCK = 64, 256  # elements per NF4 scale; scales per double-quantised scale (QLoRA's sizes)
_PEFT_PREFIX = "base_model.model."  # what peft puts before the base model's own parameter names


def uses_lora(cfg) -> bool:
    return getattr(cfg, "lora_r", 0) > 0


# ---------------------------------------------------------------- checks, before anything is built

def check_lora_config(cfg) -> None:
    """The adapter fields' rules that read the config alone; a one-line UserError for the first broken one."""
    if not uses_lora(cfg):
        given = [f"--{name}" for name in ("lora_target_modules", "lora_modules_to_save") if getattr(cfg, name)]
        given += ["--qlora=True"] if cfg.qlora else []
        if given:
            verb = "takes" if len(given) == 1 else "take"
            raise UserError(f"{', '.join(given)} {verb} effect only with LoRA: add --lora_r=16 (0 trains every weight)")
        return
    if cfg.bf16_weights:
        raise UserError("--bf16_weights=True does not combine with --lora_r: LoRA keeps the frozen base in bf16 when "
                        "the run computes in bf16 and the trained adapters in fp32; drop --bf16_weights")
    if cfg.freeze_embeddings:
        raise UserError("--freeze_embeddings=True is implied by --lora_r (LoRA freezes every base weight; train the "
                        "embeddings with --lora_modules_to_save=embed_tokens,lm_head); drop --freeze_embeddings")
    if cfg.qlora and cfg.mixed_precision in ("no", "fp16"):
        raise UserError(f"--qlora=True computes in bf16; drop --mixed_precision={cfg.mixed_precision} (or pass bf16)")
    if cfg.qlora and (cfg.deepspeed or cfg.zero_stage):
        raise UserError("--qlora=True keeps a 4-bit base that DeepSpeed cannot shard; train on one GPU (or data "
                        "parallel) without --deepspeed/--zero_stage")


def qlora_problem() -> str | None:
    """Why QLoRA cannot train here, or None."""
    from ..run.distributed import launcher_kind

    if not torch.cuda.is_available():
        return "it needs a CUDA GPU (the 4-bit base computes in bf16 there)"
    if not torch.cuda.is_bf16_supported():
        return "this GPU has no bf16"
    if importlib.util.find_spec("torchao") is None:
        return "its NF4 base comes from torchao, which is not installed (pip install -r requirements-gpu.txt)"
    if launcher_kind():
        return f"a {launcher_kind()} launch shards the weights, which a 4-bit base does not allow"
    return None


def check_lora_runtime(cfg) -> None:
    """What this machine must have for the adapter settings: peft; for QLoRA a CUDA GPU and torchao."""
    check_lora_config(cfg)
    if not uses_lora(cfg):
        return
    if importlib.util.find_spec("peft") is None:
        raise UserError(f"--lora_r={cfg.lora_r} needs peft: {PEFT_HINT}; or train every weight with --lora_r=0")
    problem = qlora_problem() if cfg.qlora else None
    if problem:
        raise UserError(f"--qlora=True cannot run here: {problem}; use --lora_r alone (a bf16 or fp32 base)")


def base_dtype(cfg) -> torch.dtype:
    """The dtype the weights are built or loaded in: bf16 for a LoRA base the run computes on in bf16 (a frozen
    weight needs no fp32 master copy), else fp32."""
    if not uses_lora(cfg):
        return torch.float32
    from ..run.runtime import resolve_precision

    return torch.bfloat16 if cfg.qlora or resolve_precision(cfg) == "bf16" else torch.float32


# ---------------------------------------------------------------- which modules

def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def default_target_modules(model) -> list[str]:
    """Leaf names of every linear layer inside the repeated blocks (attention and MLP projections, never lm_head)."""
    from .recompute import checkpointable_blocks

    names = {_leaf(name) for block in checkpointable_blocks(model) for name, module in block.named_modules()
             if isinstance(module, torch.nn.Linear)}
    if not names:
        raise UserError(f"{type(model).__name__} has no linear layers in repeated blocks to put LoRA on; name them "
                        "with --lora_target_modules")
    return sorted(names)


def embedding_names(model) -> list[str]:
    """Leaf names of the input embedding and the output layer (embed_tokens and lm_head in Llama/Qwen)."""
    wanted = [model.get_input_embeddings(), model.get_output_embeddings()]
    found = [_leaf(name) for target in wanted for name, module in model.named_modules() if module is target]
    return list(dict.fromkeys(found))


def ties_embeddings(model) -> bool:
    output = model.get_output_embeddings()
    return output is not None and output.weight is model.get_input_embeddings().weight


def _check_names(model, names: list[str], flag: str, kinds: tuple) -> None:
    """Every name must be the leaf name of a module of one of `kinds`; else a UserError with the closest ones."""
    present = {_leaf(name) for name, module in model.named_modules() if isinstance(module, kinds)}
    for name in names:
        if name not in present:
            near = difflib.get_close_matches(name, sorted(present), n=3)
            raise UserError(f"--{flag}: {type(model).__name__} has no {' or '.join(k.__name__ for k in kinds)} "
                            f"named '{name}'" + (f"; closest: {', '.join(near)}" if near else
                                                 f"; choose from {', '.join(sorted(present))}"))


def grown_vocabulary(model, cfg) -> bool:
    """Whether the tokenizer brought tokens the loaded base had no embedding row for (build_model added rows)."""
    if not cfg.finetune_from_ckp_file:
        return False
    from transformers import AutoConfig

    start = cfg.finetune_from_ckp_file
    saved = AutoConfig.from_pretrained(adapter_base_dir(start) if is_adapter_dir(start) else start).get_text_config()
    return model.get_input_embeddings().num_embeddings > getattr(saved, "vocab_size", 0)


def modules_to_save(model, cfg, log) -> list[str]:
    """--lora_modules_to_save, plus the embeddings when the vocabulary grew (new rows must be learned), plus the
    other side of tied embeddings (one trained copy serves both, or the export would untie them)."""
    chosen = list(cfg.lora_modules_to_save)
    embeddings = embedding_names(model)
    if grown_vocabulary(model, cfg):
        missing = [name for name in embeddings if name not in chosen]
        if missing:
            log(f"LoRA: the tokenizer has tokens the base model has no trained embedding for, so {', '.join(missing)} "
                "train in full too (as if --lora_modules_to_save listed them)")
            chosen += missing
    if ties_embeddings(model) and any(name in chosen for name in embeddings):
        chosen += [name for name in embeddings if name not in chosen]
    return chosen


# ---------------------------------------------------------------- QLoRA's 4-bit base

def _to_nf4():
    try:
        from torchao.quantization import to_nf4
    except ImportError:  # older torchao keeps it in torchao.dtypes
        from torchao.dtypes import to_nf4
    return to_nf4


def nf4_type():
    try:
        from torchao.quantization import NF4Tensor
    except ImportError:  # older torchao keeps it in torchao.dtypes
        from torchao.dtypes import NF4Tensor
    return NF4Tensor


def quantize_to_nf4(model, device=None) -> int:
    """Replace the weights of the blocks' linear layers by frozen NF4 copies on `device` (default: where each
    weight is), in place; returns how many. A weight whose size is not a multiple of 64 stays as it is."""
    from math import gcd

    from .recompute import checkpointable_blocks

    to_nf4, count = _to_nf4(), 0
    for block in checkpointable_blocks(model):
        for module in block.modules():
            if not isinstance(module, torch.nn.Linear) or module.weight.numel() % NF4_BLOCK:
                continue
            scales = module.weight.numel() // NF4_BLOCK
            weight = module.weight.detach().to(device=device or module.weight.device, dtype=torch.bfloat16)
            # the scales are quantised in groups that must divide their number: 256, or the largest divisor below
            module.weight = torch.nn.Parameter(to_nf4(weight, NF4_BLOCK, gcd(scales, NF4_SCALER_BLOCK)),
                                               requires_grad=False)
            count += 1
    return count


def _dense(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor itself, or an NF4 weight dequantised to its original dtype."""
    if "torchao" in sys.modules and isinstance(tensor, nf4_type()):
        return tensor.get_original_weight()
    return tensor


# ---------------------------------------------------------------- the peft model

ROUTER_GATES = ("gate", "shared_expert_gate")  # MoE routing gates (leaf names): never adapted by LoRA
EXPERTS = "experts"  # what --lora_target_modules names to adapt the fused MoE experts


def lora_targets(model, cfg) -> tuple[list[str], list[str]]:
    """(leaf names of the linear layers to adapt, fused expert parameters to adapt), from --lora_target_modules or,
    when it is empty, every linear layer of the blocks and every expert, never a router gate or lm_head."""
    from .moe import fused_expert_parameters, moe_shape

    experts = sorted({f"{_leaf(module)}.{param}" for module, param, _ in fused_expert_parameters(model)})
    routed = moe_shape(model.config) is not None
    chosen = list(cfg.lora_target_modules)
    if not chosen:
        return [n for n in default_target_modules(model) if not (routed and n in ROUTER_GATES)], experts
    if EXPERTS in chosen and not experts:
        raise UserError(f"--lora_target_modules names {EXPERTS}, but {type(model).__name__} has no fused expert "
                        "weights; name its linear layers instead")
    linear = [name for name in chosen if name != EXPERTS]
    if routed and set(linear) & set(ROUTER_GATES):
        raise UserError("--lora_target_modules names a router gate, which LoRA never adapts (a low-rank change of the "
                        "routing would move every token's experts); train it in full with --lora_train_router=True")
    return linear, experts if EXPERTS in chosen else []


def router_modules(model) -> list[str]:
    """Module-name suffixes of the routing gates, as --lora_train_router trains them in full ('mlp.gate')."""
    found = set()
    for name, module in model.named_modules():
        leaf = _leaf(name)
        if leaf in ROUTER_GATES and "." in name and (leaf != "gate" or "Router" in type(module).__name__
                                                    or isinstance(module, torch.nn.Linear)):
            found.add(".".join(name.split(".")[-2:]))
    return sorted(found)


def apply_lora(model, cfg, log=print):
    """The peft model this run trains: LoRA on the target modules (and MoE experts) of the frozen (QLoRA: NF4) base."""
    from peft import LoraConfig, TaskType, get_peft_model

    from .moe import fused_expert_parameters, moe_shape

    targets, expert_params = lora_targets(model, cfg)
    _check_names(model, targets, "lora_target_modules", (torch.nn.Linear,))
    _check_names(model, list(cfg.lora_modules_to_save), "lora_modules_to_save", (torch.nn.Module,))
    if ties_embeddings(model) and set(targets) & set(embedding_names(model)):
        raise UserError("--lora_target_modules names the output layer, whose weight this model shares with the input "
                        "embedding; train both with --lora_modules_to_save=embed_tokens,lm_head instead")
    saved = modules_to_save(model, cfg, log)
    if cfg.lora_train_router:
        if moe_shape(model.config) is None:
            raise UserError("--lora_train_router=True applies to mixture-of-experts models; this one has no router")
        saved += [name for name in router_modules(model) if name not in saved]
    dropout = cfg.lora_dropout
    if expert_params and dropout:  # peft's LoRA on a parameter has no input to drop out
        log(f"LoRA on the fused experts takes no dropout: --lora_dropout={dropout} is 0 in this run")
        dropout = 0.0
    if cfg.qlora:
        # the base was built on the host: each weight goes to the GPU the run trains on as NF4
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
        log(f"QLoRA: {quantize_to_nf4(model, device)} linear layers of the base hold 4-bit NF4 weights on {device}")
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=dropout, target_modules=targets,
                        target_parameters=expert_params or None, modules_to_save=saved or None,
                        ensure_weight_tying=ties_embeddings(model) and bool(set(saved) & set(embedding_names(model))),
                        task_type=TaskType.SEQ_2_SEQ_LM if encoder_decoder else TaskType.CAUSAL_LM,
                        # a base merged from earlier adapters exists nowhere else: an adapter export saves it too
                        base_model_name_or_path=os.path.abspath(cfg.finetune_from_ckp_file)
                        if cfg.finetune_from_ckp_file and not is_adapter_dir(cfg.finetune_from_ckp_file) else None)
    total = sum(p.numel() for p in model.parameters())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # peft asks the deprecated name
        peft_model = get_peft_model(model, config)
    for param in peft_model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()  # trained copies (modules_to_save) keep fp32 weights, as the adapters do
    if cfg.qlora:  # every process quantised the same weights; DDP must not broadcast or reduce them
        from ..run.compat import ddp_ignore_parameters

        nf4 = nf4_type()
        ddp_ignore_parameters(peft_model, [name for name, p in peft_model.named_parameters() if isinstance(p, nf4)])
    trained = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    on = ",".join(name.removesuffix("_proj") for name in targets)
    if expert_params:
        fused = fused_expert_parameters(model)
        layers = len({module for module, _, _ in fused})
        on += f" + {fused[0][2]} experts x {layers} layers ({', '.join(p.split('.')[-1] for p in expert_params)})"
    extra = f"; trained in full: {', '.join(saved)}" if saved else ""
    log(f"LoRA r={cfg.lora_r} on {on or 'nothing'}{extra}: {trained / max(total, 1):.2%} of the parameters train")
    return peft_model


def is_peft_model(model) -> bool:
    peft = sys.modules.get("peft")  # a peft model exists only once peft is imported
    return peft is not None and isinstance(model, peft.PeftModel)


# ---------------------------------------------------------------- the trained weights (checkpoint/weights.py writes them)

def adapter_weights(model, state_dict: dict | None = None) -> dict:
    """The trained weights under the names peft's files use (the adapter name left out)."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model, state_dict=state_dict, save_embedding_layers=False)


def unshared(weights: dict) -> dict:
    """Each tensor on its own storage and contiguous on the CPU: safetensors stores a shared one (tied copies) once."""
    seen, out = set(), {}
    for name, tensor in weights.items():
        tensor = tensor.detach().cpu().contiguous()
        if tensor.untyped_storage().data_ptr() in seen:
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        out[name] = tensor
    return out


def is_adapter_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(str(path), ADAPTER_CONFIG))


def under_module_names(model, weights: dict) -> dict:
    """Adapter-file weights under the peft model's own state-dict names (its adapter name put back), for
    loaders that take a plain state dict (FSDP's); ValueError for a name the model does not have."""
    names, renamed = set(model.state_dict()), {}
    for key, tensor in weights.items():
        head, leaf = key.rsplit(".", 1)
        target = f"{head}.default.{leaf}" if ".lora_" in key else f"{head}.modules_to_save.default.{leaf}"
        if target not in names:
            raise ValueError(f"the adapter weight {key} has no place in the model (looked for {target})")
        renamed[target] = tensor
    return renamed


# ---------------------------------------------------------------- merging and the export

def lora_merges(model) -> dict[str, tuple[str, float, str]]:
    """Every adapted layer of the peft model by its name: (the base weight's name, alpha / r, layout), where layout
    is "linear" (W += s B A) or, for fused MoE experts, "e o i" / "e i o" (how W's expert dimensions lie)."""
    from peft.tuners.lora import Linear, LoraLayer, ParamWrapper

    from ..run.compat import peft_experts_out_first

    merges = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        scaling = module.scaling["default"]
        if isinstance(module, ParamWrapper):
            layout = "e o i" if peft_experts_out_first(module) else "e i o"
            merges[name] = (f"{_without_base_layers(name)}.{module.parameter_name}", scaling, layout)
        elif isinstance(module, Linear):
            merges[name] = (f"{name}.weight", scaling, "linear")
        else:
            raise UserError(f"merging LoRA on {type(module).__name__} ('{name}') is not supported; put LoRA on "
                            "linear layers and experts only")
    return merges


def _without_base_layers(name: str) -> str:
    """A peft name without its wrappers' `.base_layer` steps (nested when two weights of a module are adapted)."""
    return re.sub(r"(\.base_layer)+(?=\.|$)", "", name)


def base_state_dict(state_dict: dict, merges: dict[str, tuple[str, float, str]] | None = None) -> dict:
    """The base model's own state dict from a LoRA model's: each adapted weight plus its low-rank update when
    `merges` is given (else the adapters are left out), trained modules_to_save copies in place of the originals,
    NF4 weights dequantised."""
    out = {}
    for key, value in state_dict.items():
        if ".lora_" in key or ".original_module." in key:
            continue
        name = _without_base_layers(key.removeprefix(_PEFT_PREFIX)).replace(".modules_to_save.default.", ".")
        out[name] = _dense(value)
    for layer, (weight_name, scaling, layout) in (merges or {}).items():
        a, b = state_dict[f"{layer}.lora_A.default.weight"].float(), state_dict[f"{layer}.lora_B.default.weight"].float()
        name = weight_name.removeprefix(_PEFT_PREFIX)
        weight = out[name]
        if layout == "linear":
            delta = b @ a
        else:  # A is (E*r, in) expert-major, B is (out, r*E) rank-major: expert e's update is B_e @ A_e
            experts = weight.shape[0]
            delta = torch.einsum("ore,eri->e" + layout.split()[1] + layout.split()[2],
                                 b.reshape(b.shape[0], -1, experts), a.reshape(experts, -1, a.shape[-1]))
        out[name] = (weight.float() + scaling * delta).to(weight.dtype)
    return out


# ---------------------------------------------------------------- inference on an adapter directory

def adapter_base_dir(path: str) -> str:
    """The local base model directory named by an adapter directory's adapter_config.json."""
    with open(os.path.join(path, ADAPTER_CONFIG), encoding="utf-8") as f:
        base = json.load(f).get("base_model_name_or_path")
    if not base:
        raise UserError(f"'{path}' holds LoRA adapters over a base built from a preset, which a checkpoint does not "
                        "keep; use the run's final export (model_save/<run>/final)")
    for candidate in (os.path.join(path, base), base, os.path.join(path, BASE_DIR)):
        if os.path.isfile(os.path.join(candidate, "config.json")):
            return candidate
    raise UserError(f"the base model of the adapters in '{path}' is '{base}' (base_model_name_or_path in "
                    f"{ADAPTER_CONFIG}), which is not a local model directory here; put it there or edit that field")


def load_merged(path: str, dtype: torch.dtype, vocab_size: int, **load_options):
    """Base + the adapters of `path`, merged in memory (inference needs no peft layers)."""
    if importlib.util.find_spec("peft") is None:
        raise UserError(f"'{path}' is a LoRA adapter directory, which needs peft to load: {PEFT_HINT}")
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    base_dir = adapter_base_dir(path)
    auto = AutoModelForSeq2SeqLM if AutoConfig.from_pretrained(base_dir).is_encoder_decoder else AutoModelForCausalLM
    base = auto.from_pretrained(base_dir, use_safetensors=True, dtype=dtype, **load_options)
    if base.get_input_embeddings().num_embeddings < vocab_size:
        base.resize_token_embeddings(vocab_size)  # the run added tokens; their rows come with the adapters
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        return PeftModel.from_pretrained(base, path).merge_and_unload()
