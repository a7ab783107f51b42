"""Command-line entry point (Python Fire).

    python train_low_mem.py train [--config=NAME|FILE] [--use_large_config=True] [--is_finetune=True]
                                  [--use_small_config=True] [--is_keep_training=True] [--<field>=<value> ...]
    python train_low_mem.py show_config [same flags]
    python train_low_mem.py prepare {convert,clean,split,stats,train_tokenizer,tokenize} ...
    python train_low_mem.py {generate,chat,evaluate} --model_dir=...

Every TrainConfig field in config.py is a flag; unknown flags and wrong types are errors.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys

# transformers imports torchao when installed; its missing-CUDA-extension notices are noise on CPU
for _noisy in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_noisy).setLevel(logging.ERROR)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from config import TRAIN_PRESETS, TrainConfig, TrainConfigPretrainLarge, TrainConfigSFT, TrainConfigSFTSmall  # noqa: E402
from lowmem.cli import LAUNCHER_FLAGS, build, closest, describe_fields, load_config_file  # noqa: E402
from lowmem.errors import UserError  # noqa: E402

USAGE = """usage: train_low_mem.py train [--config=NAME|FILE.json|FILE.yaml] [selectors] [--<field>=<value> ...]

selectors (the original trainer's): --use_large_config=True (TrainConfigPretrainLarge),
  --is_finetune=True (TrainConfigSFT), --is_finetune=True --use_small_config=True (TrainConfigSFTSmall)
presets for --config: {presets}
fields (every one is a flag; --flag=value and --flag value both work):
{fields}"""


def resolve_config(kwargs: dict) -> TrainConfig:
    """Pick the preset from --config or the selectors, then apply the config file and the flags."""
    kwargs = {k: v for k, v in kwargs.items() if k not in LAUNCHER_FLAGS}
    config_arg = kwargs.pop("config", None)
    large = build(_Selectors, {"use_large_config": kwargs.pop("use_large_config", False)}).use_large_config
    small = build(_Selectors, {"use_small_config": kwargs.pop("use_small_config", False)}).use_small_config
    finetune = build(_Selectors, {"is_finetune": kwargs.get("is_finetune", False)}).is_finetune
    if large and small:
        raise UserError("--use_large_config and --use_small_config contradict each other; pass one")
    if large and finetune:
        raise UserError("--use_large_config (pretraining) contradicts --is_finetune; for SFT use --is_finetune=True "
                        "alone or with --use_small_config=True")
    if small and not finetune:
        raise UserError("--use_small_config selects the small SFT preset; pass it with --is_finetune=True")
    if config_arg is not None and (large or small):
        raise UserError("--config and --use_large_config/--use_small_config both choose a preset; pass one of them")
    file_values: dict = {}
    if large:
        cls = TrainConfigPretrainLarge
    elif small:
        cls = TrainConfigSFTSmall
    elif finetune:
        cls = TrainConfigSFT
    else:
        cls = TrainConfig
    if config_arg is not None:
        name = str(config_arg)
        if name in TRAIN_PRESETS:
            cls = TRAIN_PRESETS[name]
        elif name.endswith((".json", ".yaml", ".yml")) or os.path.sep in name:
            file_values = load_config_file(name)
            base = file_values.pop("preset", None)
            if base is not None:
                if base not in TRAIN_PRESETS:
                    raise UserError(f"preset '{base}' in {name} does not exist; choose one of {', '.join(TRAIN_PRESETS)}")
                cls = TRAIN_PRESETS[base]
        else:
            raise UserError(f"--config '{name}' is neither a preset nor a .json/.yaml file; presets: "
                            f"{', '.join(TRAIN_PRESETS)} (closest: {closest(name, TRAIN_PRESETS).replace('--', '')})")
    cfg = build(cls, file_values, source=f"'{config_arg}'") if file_values else cls()
    return build(type(cfg), {**dataclasses.asdict(cfg), **kwargs})


@dataclasses.dataclass
class _Selectors:
    use_large_config: bool = False
    use_small_config: bool = False
    is_finetune: bool = False


def _wants_help(kwargs: dict) -> bool:
    return any(k in kwargs for k in ("help", "h")) or any(a in ("--help", "-h") for a in sys.argv[1:])


def train(**kwargs):
    """Train (pretrain or SFT). Every TrainConfig field is a flag; see --help."""
    if _wants_help(kwargs):
        return show_help()
    cfg = resolve_config(kwargs)
    from lowmem.loop import train as run

    run(cfg)


def show_config(**kwargs):
    """Print the resolved config as JSON (same flags as train)."""
    if _wants_help(kwargs):
        return show_help()
    print(json.dumps(dataclasses.asdict(resolve_config(kwargs)), indent=1, ensure_ascii=False))


def show_help():
    print(USAGE.format(presets=", ".join(TRAIN_PRESETS), fields=describe_fields(TrainConfig)))


def _commands() -> dict:
    commands = {"train": train, "show_config": show_config}
    try:
        from lowmem.cli_prepare import PrepareCommands

        commands["prepare"] = PrepareCommands
    except ImportError as exc:
        if exc.name and not exc.name.startswith("lowmem"):
            raise
    try:
        from lowmem import cli_generate

        commands.update(generate=cli_generate.generate, chat=cli_generate.chat, evaluate=cli_generate.evaluate)
    except ImportError as exc:
        if exc.name and not exc.name.startswith("lowmem"):
            raise
    return commands


def main() -> int:
    import fire

    if len(sys.argv) > 2 and sys.argv[1] in ("train", "show_config") and any(a in ("--help", "-h") for a in sys.argv[2:]):
        show_help()  # Fire would print its own help of **kwargs, which lists no fields
        return 0
    try:
        fire.Fire(_commands(), name="train_low_mem.py")
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
