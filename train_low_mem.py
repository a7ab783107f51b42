"""Command-line entry point (Python Fire).

    python train_low_mem.py train [--config=NAME|FILE] [--use_large_config=True] [--is_finetune=True]
                                  [--use_small_config=True] [--is_keep_training=True] [--<field>=<value> ...]
    python train_low_mem.py show_config [same flags]
    python train_low_mem.py prepare {convert,clean,split,stats,train_tokenizer,tokenize} ...
    python train_low_mem.py {generate,chat,evaluate} --model_dir=...

Every TrainConfig field in config.py is a flag; unknown flags, wrong types, values out of range and a
flag given twice are errors, reported before anything is built. `--help` is ours, never Fire's pager.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from config import TRAIN_PRESETS, TrainConfig, TrainConfigPretrainLarge, TrainConfigSFT, TrainConfigSFTSmall  # noqa: E402
from lowmem.cli import (HELP_FLAGS, LAUNCHER_FLAGS, build, check_no_positionals, check_repeated_flags,  # noqa: E402
                        closest, import_deepspeed_quietly, import_models_quietly, load_config_file, wants_help)
from lowmem.distributed import asks_for_deepspeed  # noqa: E402
from lowmem.errors import UserError  # noqa: E402
from lowmem.validate import check_config  # noqa: E402

# the top-level --help: one line per command
COMMANDS = {
    "train": "train a model (pretraining or SFT); every TrainConfig field is a flag",
    "show_config": "print the resolved config as JSON (same flags as train); builds nothing",
    "prepare": "data tools: convert, clean, split, stats, train_tokenizer, tokenize",
    "generate": "answer --prompt, or every prompt of --batch_file, with a trained model",
    "chat": "multi-turn chat with a trained model, on a terminal or over a pipe",
    "evaluate": "loss and perplexity of a model on a file (plus exact match and BLEU-4)",
    "check_checkpoint": "verify a checkpoint (or every checkpoint of a run dir) against its manifest's hashes",
}
CONFIG_COMMANDS = ("train", "show_config")  # their flags are TrainConfig fields, aliases included
TORCHAO_OPTIMIZERS = ("adamw_8bit", "adamw_4bit")

USAGE = """usage: train_low_mem.py {command} [--config=NAME|FILE.json|FILE.yaml] [selectors] [--<field>=<value> ...]

selectors (the original trainer's): --use_large_config=True (TrainConfigPretrainLarge),
  --is_finetune=True (TrainConfigSFT), --is_finetune=True --use_small_config=True (TrainConfigSFTSmall)
presets for --config: {presets}
aliases: --lr and --learning_rate for --learn_rate, --max_epochs for --epochs; --a-b is --a_b
every field below is a flag (--flag=value and --flag value both work; each flag once):

{fields}"""


def resolve_config(kwargs: dict) -> TrainConfig:
    """Pick the preset from --config or the selectors, apply the config file and the flags, check the values."""
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
                            f"{', '.join(TRAIN_PRESETS)}; {closest(name, TRAIN_PRESETS, prefix='')}")
    cfg = build(cls, file_values, source=f"'{config_arg}'") if file_values else cls()
    cfg = build(type(cfg), {**dataclasses.asdict(cfg), **kwargs})
    check_config(cfg)
    return cfg


@dataclasses.dataclass
class _Selectors:
    use_large_config: bool = False
    use_small_config: bool = False
    is_finetune: bool = False


def train(**kwargs):
    """Train (pretrain or SFT). Every TrainConfig field is a flag; see --help."""
    if "help" in kwargs or "h" in kwargs:  # Fire called without main() passes --help here
        print(config_help("train"))
        return
    cfg = resolve_config(kwargs)
    if cfg.optimizer not in TORCHAO_OPTIMIZERS and not cfg.bf16_weights:  # a torchao run shows torchao's notices
        import_models_quietly()
    if not asks_for_deepspeed(cfg):  # a DeepSpeed run shows DeepSpeed's
        import_deepspeed_quietly()
    from lowmem.loop import train as run

    run(cfg)


def show_config(**kwargs):
    """Print the resolved config as JSON (same flags as train)."""
    if "help" in kwargs or "h" in kwargs:
        print(config_help("show_config"))
        return
    print(json.dumps(dataclasses.asdict(resolve_config(kwargs)), indent=1, ensure_ascii=False))


def check_checkpoint(path, **unknown):
    """Verify DIR: one checkpoint, a checkpoints dir or a run dir; exit 2 if any checkpoint fails."""
    from lowmem.cli import reject_unknown_flags

    reject_unknown_flags("check_checkpoint", ["path"], unknown)
    from lowmem.checkpoint import check_checkpoints

    status = check_checkpoints(str(path))
    if status:
        raise SystemExit(status)


def config_help(command: str = "train") -> str:
    from lowmem.docs import flag_help

    return USAGE.format(command=command, presets=", ".join(TRAIN_PRESETS), fields=flag_help(TrainConfig))


def commands_help() -> str:
    lines = ["usage: train_low_mem.py COMMAND [--flag=value ...]", "", "commands:"]
    lines += [f"  {name:<12} {meaning}" for name, meaning in COMMANDS.items()]
    lines += ["", "`train_low_mem.py COMMAND --help` lists the flags of a command."]
    return "\n".join(lines)


def command_help(command: str, args: list[str]) -> str:
    """The --help text of one command (args: the words after the command)."""
    if command in CONFIG_COMMANDS:
        return config_help(command)
    if command == "check_checkpoint":
        return ("usage: train_low_mem.py check_checkpoint DIR\n  DIR: a checkpoint (step_XXXXXXXX), a checkpoints dir or a "
                "run dir; prints OK or FAILED per checkpoint, exits 2 if one fails")
    if command == "prepare":
        from lowmem.cli_prepare import prepare_help

        tool = args[0] if args and not args[0].startswith("-") else None
        return prepare_help(tool)
    from lowmem.cli_generate import help_text

    return help_text(command)


def _commands(command: str) -> dict:
    """The Fire component of `command` alone: other commands' modules (and torch) stay unimported."""
    if command == "train":
        return {"train": train}
    if command == "show_config":
        return {"show_config": show_config}
    if command == "check_checkpoint":
        return {"check_checkpoint": check_checkpoint}
    if command == "prepare":
        from lowmem.cli_prepare import PrepareCommands

        return {"prepare": PrepareCommands}
    from lowmem import cli_generate

    return {command: getattr(cli_generate, command)}


def _check_command(args: list[str]) -> None:
    """Unknown commands and a `prepare` without its tool are errors before Fire sees them."""
    command = args[0]
    if command not in COMMANDS:
        near = difflib.get_close_matches(command, list(COMMANDS), n=1, cutoff=0.5)
        hint = f"did you mean: {near[0]}? " if near else ""
        raise UserError(f"unknown command '{command}'; {hint}commands: {', '.join(COMMANDS)} (see --help)")
    if command == "prepare" and len(args) > 1:
        from lowmem.cli_prepare import check_tool

        check_tool(args[1])


def run_command_line(args: list[str]) -> int:
    if not args or args[0] in HELP_FLAGS or args[0] == "help":
        print(commands_help())
        return 0
    _check_command(args)
    check_repeated_flags(args[1:], aliases=args[0] in CONFIG_COMMANDS)
    if args[0] in CONFIG_COMMANDS:
        check_no_positionals(args[0], args[1:])
    if wants_help(args[1:]) or args == ["prepare"]:
        print(command_help(args[0], args[1:]))
        return 0
    import fire

    fire.Fire(_commands(args[0]), command=list(args), name="train_low_mem.py")
    return 0


def main() -> int:
    try:
        return run_command_line(sys.argv[1:])
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
