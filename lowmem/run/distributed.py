"""Many GPUs and many machines: DeepSpeed ZeRO configs filled from the training config, launcher checks.

Where the DeepSpeed settings come from, in this order:
  1. an `accelerate launch --config_file accelerate_configs/deepspeed_*.yaml` launch (the launcher sets
     ACCELERATE_USE_DEEPSPEED=true and either ACCELERATE_DEEPSPEED_CONFIG_FILE or the ZeRO settings);
  2. the flags `--deepspeed=FILE.json` and/or `--zero_stage=N` (`--offload_optimizer`, `--offload_param`).
When both are given they must agree. Every "auto" value is then replaced by the training config's value,
and an explicit value that contradicts it is a UserError, so DeepSpeed never trains with other settings
than the ones the loop, the logs and the checkpoints assume.

The loop passes no DataLoader to `accelerator.prepare`, so Accelerate cannot infer the micro-batch size:
`train_micro_batch_size_per_gpu` is always written here, from `--batch_size_per_gpu`.
"""
from __future__ import annotations

import copy
import json
import os
import socket

from .errors import UserError

# the fields this module reads; until config.py has them, their defaults apply
FIELD_DEFAULTS = {"deepspeed": "", "zero_stage": 0, "offload_optimizer": False, "offload_param": False}
# "auto" values that Accelerate fills itself from the model's hidden size at prepare time
ACCELERATE_FILLS = ("zero_optimization.reduce_bucket_size", "zero_optimization.stage3_prefetch_bucket_size",
                    "zero_optimization.stage3_param_persistence_threshold")
INSTALL_HINT = "pip install deepspeed (see requirements-gpu.txt)"


def settings(cfg) -> dict:
    """The distributed fields of `cfg`, with defaults for fields config.py does not have yet."""
    return {name: getattr(cfg, name, default) for name, default in FIELD_DEFAULTS.items()}


def _env_true(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("true", "1", "yes")


def launcher_kind() -> str:
    """'deepspeed' or 'fsdp' when an accelerate config of that kind launched this process, else ''."""
    if _env_true("ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed"
    if _env_true("ACCELERATE_USE_FSDP"):
        return "fsdp"
    return ""


def resolve_path(path: str) -> str:
    """`path` as given, else relative to the project root (so configs work from any directory)."""
    if os.path.isfile(path):
        return path
    from config import PROJECT_ROOT

    candidate = os.path.join(PROJECT_ROOT, path)
    return candidate if os.path.isfile(candidate) else path


def load_deepspeed_json(path: str, what: str = "--deepspeed") -> dict:
    resolved = resolve_path(path)
    if not os.path.isfile(resolved):
        raise UserError(f"DeepSpeed config '{path}' ({what}) does not exist; pass a JSON file such as "
                        "accelerate_configs/ds_zero2.json")
    try:
        with open(resolved, encoding="utf-8") as f:
            values = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"DeepSpeed config '{path}' is not valid JSON ({str(exc).splitlines()[0]}); "
                        "fix the file") from None
    if not isinstance(values, dict):
        raise UserError(f"DeepSpeed config '{path}' must hold a JSON object; see accelerate_configs/ds_zero2.json")
    return values


def base_deepspeed_config(stage: int, offload_optimizer: bool = False, offload_param: bool = False) -> dict:
    """A complete ZeRO config for `--zero_stage=N` without a JSON file (the same as ds_zero<N>.json)."""
    zero: dict = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": "auto"}
    if stage == 3:
        zero.update({"stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": "auto",
                     "stage3_gather_16bit_weights_on_model_save": True})
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto", "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
            "zero_optimization": zero, "steps_per_print": 2**31 - 1, "wall_clock_breakdown": False}


def _stage(ds: dict, source: str) -> int | str | None:
    stage = ds.get("zero_optimization", {}).get("stage")
    if stage is None or stage == "auto":
        return stage
    if not isinstance(stage, int) or isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise UserError(f"{source} sets zero_optimization.stage={stage!r}; use 0, 1, 2 or 3")
    return stage


def _offload_device(ds: dict, part: str) -> str:
    return str((ds.get("zero_optimization", {}).get(f"offload_{part}") or {}).get("device", "none")).lower()


def summary(ds: dict) -> str:
    """What decides the memory layout: the ZeRO stage and where optimizer states and parameters live."""
    return (f"stage {ds.get('zero_optimization', {}).get('stage')}, optimizer on "
            f"{_offload_device(ds, 'optimizer')}, parameters on {_offload_device(ds, 'param')}")


def _apply_flags(ds: dict, flags: dict, source: str) -> dict:
    """Put --zero_stage/--offload_* into `ds`; a flag that contradicts an explicit JSON value is an error."""
    ds = copy.deepcopy(ds)
    zero = ds.setdefault("zero_optimization", {})
    stage = _stage(ds, source)
    if flags["zero_stage"]:
        if isinstance(stage, int) and stage != flags["zero_stage"]:
            raise UserError(f"--zero_stage={flags['zero_stage']} contradicts zero_optimization.stage={stage} in "
                            f"{source}; drop one of them")
        zero["stage"] = flags["zero_stage"]
    elif stage in (None, "auto"):
        raise UserError(f"{source} has no zero_optimization.stage; write 0, 1, 2 or 3 there or pass --zero_stage")
    for part in ("optimizer", "param"):
        if flags[f"offload_{part}"]:
            section = zero.get(f"offload_{part}") or {}
            if "device" in section and str(section["device"]).lower() == "none":
                raise UserError(f"--offload_{part}=True contradicts zero_optimization.offload_{part}.device=none in "
                                f"{source}; drop the flag or set the device to cpu")
            zero[f"offload_{part}"] = {"device": "cpu", "pin_memory": True, **section}
            if str(zero[f"offload_{part}"]["device"]).lower() == "none":
                zero[f"offload_{part}"]["device"] = "cpu"
    return ds


def _from_launcher() -> tuple[dict, str]:
    """The DeepSpeed settings `accelerate launch` passed in the environment, as a config dict."""
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if path and path.lower() != "none":
        source = f"'{path}' (from the accelerate config)"
        return load_deepspeed_json(path, "deepspeed_config_file of the accelerate config"), source
    stage = int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))  # Accelerate's own default
    ds = base_deepspeed_config(stage)
    zero = ds["zero_optimization"]
    for part, name in (("optimizer", "OPTIMIZER"), ("param", "PARAM")):
        device = os.environ.get(f"ACCELERATE_DEEPSPEED_OFFLOAD_{name}_DEVICE", "none").lower()
        if device != "none":
            zero[f"offload_{part}"] = {"device": device, "pin_memory": True}
            nvme = os.environ.get(f"ACCELERATE_DEEPSPEED_OFFLOAD_{name}_NVME_PATH", "none")
            if device == "nvme" and nvme.lower() != "none":
                zero[f"offload_{part}"]["nvme_path"] = nvme
    if "ACCELERATE_GRADIENT_ACCUMULATION_STEPS" in os.environ:
        value = os.environ["ACCELERATE_GRADIENT_ACCUMULATION_STEPS"]
        ds["gradient_accumulation_steps"] = int(value) if value.isdigit() else value
    if "ACCELERATE_GRADIENT_CLIPPING" in os.environ:
        value = os.environ["ACCELERATE_GRADIENT_CLIPPING"]
        ds["gradient_clipping"] = value if value == "auto" else float(value)
    if stage == 3 and "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL" in os.environ:
        zero["stage3_gather_16bit_weights_on_model_save"] = _env_true("ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL")
    return ds, "the accelerate config's deepspeed_config"


def asks_for_deepspeed(cfg) -> bool:
    """True when a DeepSpeed launch config or --deepspeed/--zero_stage asks for DeepSpeed (reads no files)."""
    flags = settings(cfg)
    return launcher_kind() == "deepspeed" or bool(flags["deepspeed"]) or flags["zero_stage"] > 0


def resolve_deepspeed(cfg) -> tuple[dict | None, str]:
    """The (unfilled) DeepSpeed config this run asks for and where it came from; (None, '') when none."""
    flags = settings(cfg)
    if flags["zero_stage"] not in (0, 1, 2, 3):
        raise UserError(f"--zero_stage={flags['zero_stage']} is not a ZeRO stage; use 1, 2 or 3 (0: off)")
    by_flags = bool(flags["deepspeed"]) or flags["zero_stage"] > 0
    launched = launcher_kind()
    if launched == "fsdp" and (by_flags or flags["offload_optimizer"] or flags["offload_param"]):
        raise UserError("launched with an FSDP accelerate config but --deepspeed/--zero_stage/--offload_* ask for "
                        "DeepSpeed; drop those flags or launch with accelerate_configs/deepspeed_zero*.yaml")
    if launched != "deepspeed" and not by_flags:
        if flags["offload_optimizer"] or flags["offload_param"]:
            raise UserError("--offload_optimizer/--offload_param need DeepSpeed ZeRO; add --zero_stage=3 (or 2 for the "
                            "optimizer alone) or --deepspeed=accelerate_configs/ds_zero3_offload.json")
        return None, ""
    if flags["deepspeed"]:
        source = f"'{flags['deepspeed']}'"
        wanted = _apply_flags(load_deepspeed_json(flags["deepspeed"]), flags, source)
    elif by_flags:
        source = f"--zero_stage={flags['zero_stage']}"
        wanted = _apply_flags(base_deepspeed_config(flags["zero_stage"]), flags, source)
    if launched != "deepspeed":
        return wanted, source
    from_launch, launch_source = _from_launcher()
    _stage(from_launch, launch_source)
    if not by_flags:
        with_flags = _apply_flags(from_launch, flags, launch_source)
        if summary(with_flags) != summary(from_launch):
            raise UserError(f"the accelerate config asks for DeepSpeed {summary(from_launch)} but --offload_* ask "
                            f"for {summary(with_flags)}; drop the --offload_* flags or launch with a matching config")
        return with_flags, launch_source
    if summary(wanted) != summary(from_launch):
        raise UserError(f"the accelerate config asks for DeepSpeed {summary(from_launch)} but {source} asks for "
                        f"{summary(wanted)}; drop --deepspeed/--zero_stage/--offload_* or launch with a matching "
                        "config")
    launch_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    both_files = flags["deepspeed"] and launch_file.lower() != "none"
    if both_files and wanted != _apply_flags(from_launch, flags, launch_source):
        raise UserError(f"--deepspeed={flags['deepspeed']} and the accelerate config's deepspeed_config_file "
                        f"'{launch_file}' differ; pass one of them")
    return wanted, source


def _is_auto(value) -> bool:
    return isinstance(value, str) and value.strip().lower() == "auto"


def _same(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(float(a) - float(b)) <= 1e-9 * max(1.0, abs(float(b)))
    return a == b


def _auto_paths(node, prefix: str = ""):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _auto_paths(value, f"{prefix}{key}.")
        elif _is_auto(value):
            yield prefix + key


def fill_deepspeed_config(ds_dict: dict, cfg, world_size: int, mixed_precision: str,
                          source: str = "the DeepSpeed config") -> dict:
    """A copy of `ds_dict` with every "auto" the trainer owns filled from `cfg`; contradictions are UserErrors.

    `mixed_precision` is the resolved precision (no | bf16 | fp16), `world_size` the number of processes.
    """
    ds = copy.deepcopy(ds_dict)
    micro, accum = cfg.batch_size_per_gpu, cfg.gradient_accumulation_steps
    expected = {
        "train_micro_batch_size_per_gpu": (micro, f"--batch_size_per_gpu={micro}"),
        "gradient_accumulation_steps": (accum, f"--gradient_accumulation_steps={accum}"),
        "train_batch_size": (micro * accum * world_size, f"--batch_size_per_gpu={micro} x "
                             f"--gradient_accumulation_steps={accum} x {world_size} processes"),
        "gradient_clipping": (float(cfg.max_grad_norm), f"--max_grad_norm={cfg.max_grad_norm}"),
    }
    for key, (value, origin) in expected.items():
        given = ds.get(key, "auto")
        if _is_auto(given):
            ds[key] = value
        elif not _same(given, value):
            raise UserError(f"{source} sets {key}={given} but the training config gives {value} ({origin}); "
                            f"set it to \"auto\" in {source} or change the flag")
    for dtype in ("bf16", "fp16"):
        section = ds.setdefault(dtype, {})
        if not isinstance(section, dict):
            raise UserError(f"{source}: '{dtype}' must be an object like {{\"enabled\": \"auto\"}}")
        want = mixed_precision == dtype
        given = section.get("enabled", "auto")
        if _is_auto(given):
            section["enabled"] = want
        elif bool(given) != want:
            raise UserError(f"{source} sets {dtype}.enabled={str(given).lower()} but mixed precision is "
                            f"'{mixed_precision}'; set it to \"auto\" or pass --mixed_precision="
                            f"{dtype if given else 'no'}")
    if ds["bf16"]["enabled"] and "check_grad_overflow" not in ds["bf16"]:
        # DeepSpeed steps inside backward: in bf16 it skips a non-finite step itself when told to
        ds["bf16"]["check_grad_overflow"] = bool(getattr(cfg, "skip_nonfinite", True))
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise UserError(f"{source} has a '{section}' section but the trainer builds its own (--optimizer, "
                            f"--learn_rate, --lr_scheduler); remove '{section}' from {source}")
    zero = ds.get("zero_optimization")
    if not isinstance(zero, dict):
        raise UserError(f"{source} has no zero_optimization section; add {{\"stage\": 2}} or see "
                        "accelerate_configs/ds_zero2.json")
    stage = _stage(ds, source)
    if stage in (None, "auto"):
        raise UserError(f"{source} has no zero_optimization.stage; write 0, 1, 2 or 3 there or pass --zero_stage")
    if _offload_device(ds, "param") != "none" and stage != 3:
        raise UserError(f"{source}: offloading parameters needs ZeRO stage 3, not {stage}; use --zero_stage=3")
    if _offload_device(ds, "optimizer") != "none" and stage < 1:
        raise UserError(f"{source}: offloading the optimizer needs ZeRO stage 1-3; use --zero_stage=2 or 3")
    if stage == 3:
        gather = zero.get("stage3_gather_16bit_weights_on_model_save", "auto")
        if _is_auto(gather):
            zero["stage3_gather_16bit_weights_on_model_save"] = True  # checkpoints and export gather the weights
        elif gather is not True:
            raise UserError(f"{source} sets stage3_gather_16bit_weights_on_model_save=false, but checkpoints and the "
                            "exported model need the gathered weights; set it to true")
    unfilled = [p for p in _auto_paths(ds) if p not in ACCELERATE_FILLS]
    if unfilled:
        raise UserError(f"{source} has \"auto\" for {', '.join(unfilled)}, which the trainer cannot fill; "
                        "write a value there")
    ds.setdefault("steps_per_print", 2**31 - 1)  # our own logging reports progress
    return ds


def check_training_options(cfg, ds: dict, source: str) -> None:
    """Options of the trainer that DeepSpeed would silently change or break."""
    if getattr(cfg, "bf16_weights", False):
        raise UserError("--bf16_weights=True keeps bf16 master weights itself; DeepSpeed manages precision "
                        f"({source}): drop one of them")
    if getattr(cfg, "use_ema", False) and ds.get("zero_optimization", {}).get("stage") == 3:
        raise UserError(f"--use_ema copies the full weights, which ZeRO-3 shards ({source}); drop --use_ema or use "
                        "ZeRO stage 2")
    trains_head = not getattr(cfg, "lora_r", 0) or {"lm_head", "embed_tokens"} & set(cfg.lora_modules_to_save)
    if getattr(cfg, "chunked_cross_entropy", False) is True and ds.get("zero_optimization", {}).get("stage") == 3 \
            and trains_head:
        raise UserError(f"--chunked_cross_entropy=True computes the output weight's gradient outside the layer "
                        f"ZeRO-3 gathers it for ({source}); drop the flag (auto leaves it off when the head trains "
                        "under ZeRO-3), train with LoRA, or use ZeRO stage 2")
    if getattr(cfg, "auto_batch_size", False):
        raise UserError(f"--auto_batch_size probes the unsharded model on one GPU, which says nothing under DeepSpeed "
                        f"({source}); set --batch_size_per_gpu yourself")
    if _offload_device(ds, "optimizer") != "none" and getattr(cfg, "optimizer", "adamw") != "adamw":
        raise UserError(f"an offloaded optimizer runs DeepSpeed's CPU Adam, not --optimizer={cfg.optimizer}; "
                        "use --optimizer=adamw or keep the optimizer on the GPU")


def deepspeed_available() -> bool:
    from accelerate.utils import is_deepspeed_available

    return is_deepspeed_available()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single_process_env() -> None:
    """DeepSpeed needs a process group even for one process; give it the env torchrun would."""
    if "LOCAL_RANK" in os.environ or "WORLD_SIZE" in os.environ:
        return
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"})
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def _cpu_deepspeed() -> None:
    """DeepSpeed on CPU processes (its CPU accelerator, gloo): tests and laptops.

    DeepSpeed would JIT-compile its shared-memory allreduce (g++, about a minute on 2 cores, and a crash
    where no compiler is installed) the first time it starts on CPU; gloo alone does the job here.
    """
    from .compat import disable_deepspeed_shm_allreduce

    disable_deepspeed_shm_allreduce()


def _import_deepspeed(source: str) -> None:
    """A deepspeed built for another torch or CUDA fails on import: one line here, not a traceback in accelerate."""
    try:
        import deepspeed  # noqa: F401
    except Exception as exc:  # ImportError, or whatever its op builders raise
        reason = (str(exc).strip().splitlines() or [""])[-1][:200]
        raise UserError(f"DeepSpeed was asked for ({source}) but `import deepspeed` fails ({type(exc).__name__}: "
                        f"{reason}); reinstall it for this torch: {INSTALL_HINT}") from None


def deepspeed_plugin(cfg, mixed_precision: str, world_size: int | None = None):
    """An `accelerate.utils.DeepSpeedPlugin` for this run, or None when DeepSpeed is not asked for."""
    ds, source = resolve_deepspeed(cfg)
    if ds is None:
        return None
    if not deepspeed_available():
        raise UserError(f"DeepSpeed was asked for ({source}) but is not installed; {INSTALL_HINT}, or drop "
                        "--deepspeed/--zero_stage and the deepspeed accelerate config")
    import torch

    cpu = not torch.cuda.is_available()
    if cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed is imported
    _import_deepspeed(source)
    if cpu:
        _cpu_deepspeed()
    check_training_options(cfg, ds, source)
    world = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
    # every process, sequence-parallel ones included: ZeRO-3's zero.Init checks it before the groups exist (with
    # sequence parallelism Accelerate's prepare() then counts the data-parallel ranks only)
    filled = fill_deepspeed_config(ds, cfg, world, mixed_precision, source)
    _single_process_env()
    # the launcher's DeepSpeed fields are already in `filled`; Accelerate refuses them beside a config dict
    os.environ.pop("ACCELERATE_CONFIG_DS_FIELDS", None)
    from accelerate.utils import DeepSpeedPlugin

    return DeepSpeedPlugin(hf_ds_config=filled)

