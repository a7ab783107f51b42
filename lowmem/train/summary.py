"""The start-up summary: what is trained, on what, for how long, and the memory plan, printed before step 1."""
from __future__ import annotations

from ..model.moe import moe_shape, text_config
from ..model.sizes import count_parameters, parameter_bytes, parameter_counts
from .memory_plan import memory_plan


def sharding(acc) -> tuple[str, int, bool]:
    """How the model is spread over the processes: (name, ZeRO-like stage, optimizer offloaded)."""
    plugin = getattr(acc.state, "deepspeed_plugin", None)
    if plugin is not None:
        stage = int(plugin.zero_stage or 0)
        offload = plugin.deepspeed_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device")
        return f"DeepSpeed ZeRO-{stage}", stage, offload not in ("none", None)
    if acc.distributed_type.name == "FSDP":
        return "FSDP", 3, False  # full shard: like ZeRO-3
    return ("data parallel" if acc.num_processes > 1 else "one process"), 0, False


def run_length(cfg, total_steps: int, steps_per_epoch: int) -> str:
    """How many optimizer steps will run, and why."""
    if cfg.max_steps:
        epochs = cfg.max_steps / max(1, steps_per_epoch)
        return (f"{total_steps} optimizer steps (--max_steps; ~{steps_per_epoch} per epoch, so ~{epochs:.2g} "
                "epochs, the data repeating as needed)")
    return f"{total_steps} optimizer steps ({cfg.epochs} epoch{'s' if cfg.epochs != 1 else ''} x ~{steps_per_epoch})"


def model_line(s) -> str:
    """What is trained: the model's own type and size (active parameters per token for MoE), and where it came from."""
    cfg, model = s.cfg, s.accelerator.unwrap_model(s.model)
    total, active = parameter_counts(model)
    trained = count_parameters(model, trained_only=True)
    config = text_config(model.config)
    if cfg.finetune_from_ckp_file:
        source = f"{config.model_type} from {cfg.finetune_from_ckp_file}"
    else:
        source = f"{config.model_type} built from preset {cfg.model_preset}"
    size = f"{_count(total)} parameters"
    if active != total:
        shape = moe_shape(model.config)
        size += f", {_count(active)} active per token ({shape.top_k} of {shape.num_experts} experts)"
    routing = s.objective.describe()
    return f"model {source}: {size} ({_count(trained)} trained){' | ' + routing if routing else ''}"


def _count(n: float) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _reference_cost(s) -> tuple:
    """(how a preference run's reference is held, its bytes) for the memory plan; (None, 0) for other runs."""
    reference = getattr(s.objective, "reference", None)
    if reference is None:
        return None, 0.0
    held = {"cache": "from the cache", "adapters_off": "adapters off", "model": "a frozen copy", "none": "none"}
    return held[reference.kind], parameter_bytes(reference.copy) if reference.copy is not None else 0.0


def _where(s) -> dict:
    """The device the plan is for, what the process held before the model (on a CPU), and the attention kernel."""
    device = s.accelerator.device.type
    model = s.accelerator.unwrap_model(s.model)
    return {"device": device, "runtime": s.host_baseline if device == "cpu" else 0.0,
            "attention": getattr(model.config, "_attn_implementation", None), "parts": s.layout.sequence_parallel}


def _plan(s, model, stage: int, offload: bool) -> str:
    return memory_plan(model, s.cfg, str(s.accelerator.mixed_precision), s.accelerator.num_processes, stage, offload,
                       *_reference_cost(s), **_where(s))


def start_summary(s, warnings: list[str], notes: list[str] = ()) -> str:
    """The lines the run prints before its first step."""
    cfg, acc = s.cfg, s.accelerator
    world, ga, n = s.layout.data_world, cfg.gradient_accumulation_steps, s.layout.sequence_parallel
    model = acc.unwrap_model(s.model)
    unit = "packed rows of" if s.data.packing else "samples, up to"
    name, stage, offload = sharding(acc)
    split = (f", each sequence split over {n} (Ulysses; {world} data-parallel rank{'s' if world > 1 else ''})"
             if n > 1 else "")
    return (f"{model_line(s)} | devices: {acc.num_processes} x {acc.device.type} ({name}{split}) | "
            f"precision: {acc.mixed_precision}{' (bf16 weights)' if cfg.bf16_weights else ''} | effective batch "
            f"{cfg.batch_size_per_gpu} x {world} x {ga} = {cfg.batch_size_per_gpu * world * ga} {unit} "
            f"{cfg.max_seq_len} tokens | {run_length(cfg, s.total_steps, s.steps_per_epoch)} | optimizer "
            f"{cfg.optimizer} | logs: {cfg.logging_dir()}\n{s.data.describe()}\n"
            f"{_plan(s, model, stage, offload)}"
            + "".join(f"\n{note}" for note in notes) + "".join(f"\nwarning: {w}" for w in warnings))
