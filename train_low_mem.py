"""Command-line entry point (Python Fire).

    python train_low_mem.py train [--config=NAME|FILE] [--use_large_config=True] [--is_finetune=True]
                                  [--use_small_config=True] [--is_keep_training=True] [--<field>=<value> ...]
    python train_low_mem.py show_config [same flags]
    python train_low_mem.py plan [same flags]
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

from config import TRAIN_PRESETS, TrainConfig  # noqa: E402
from lowmem.cli import flags as lowmem_cli  # noqa: E402
from lowmem.cli.flags import (  # noqa: E402
    HELP_FLAGS,
    check_no_positionals,
    check_repeated_flags,
    import_deepspeed_quietly,
    import_models_quietly,
    wants_help,
)
from lowmem.run.distributed import asks_for_deepspeed  # noqa: E402
from lowmem.run.errors import UserError  # noqa: E402
from lowmem.train.validate import check_config  # noqa: E402

# the top-level --help: one line per command
COMMANDS = {
    "train": "train a model (pretraining or SFT); every TrainConfig field is a flag",
    "show_config": "print the resolved config as JSON (same flags as train); builds nothing",
    "plan": "the memory plan and the longest --max_seq_len that fits this machine (same flags as train); no training",
    "prepare": "data tools: convert, clean, split, stats, train_tokenizer, tokenize, reference",
    "generate": "answer --prompt, or every prompt of --batch_file, with a trained model",
    "chat": "multi-turn chat with a trained model, on a terminal or over a pipe",
    "evaluate": "loss and perplexity of a model on a file (plus exact match and BLEU-4)",
    "check_checkpoint": "verify a checkpoint (or every checkpoint of a run dir) against its manifest's hashes",
}
CONFIG_COMMANDS = ("train", "show_config", "plan")  # their flags are TrainConfig fields, aliases included (and prepare reference's)
TORCHAO_OPTIMIZERS = ("adamw_8bit", "adamw_4bit")
REFERENCE = "reference"  # `prepare reference` takes the flags of `train`

USAGE = """usage: train_low_mem.py {command} [--config=NAME|FILE.json|FILE.yaml] [selectors] [--<field>=<value> ...]

selectors (the original trainer's): --use_large_config=True (TrainConfigPretrainLarge),
  --is_finetune=True (TrainConfigSFT), --is_finetune=True --use_small_config=True (TrainConfigSFTSmall)
presets for --config: {presets}
aliases: --lr and --learning_rate for --learn_rate, --max_epochs for --epochs; --a-b is --a_b
every field below is a flag (--flag=value and --flag value both work; each flag once):

{fields}"""


def resolve_config(kwargs: dict) -> TrainConfig:
    """The config the flags ask for, its values checked."""
    cfg = lowmem_cli.resolve_config(kwargs)
    check_config(cfg)
    return cfg


def train(**kwargs):
    """Train (pretrain or SFT). Every TrainConfig field is a flag; see --help."""
    if "help" in kwargs or "h" in kwargs:  # Fire called without main() passes --help here
        print(config_help("train"))
        return
    cfg = resolve_config(kwargs)
    from lowmem.model.adapters import check_lora_runtime

    check_lora_runtime(cfg)  # peft missing, or QLoRA without a CUDA GPU: one line before the model libraries load
    if cfg.optimizer not in TORCHAO_OPTIMIZERS and not cfg.bf16_weights:  # a torchao run shows torchao's notices
        import_models_quietly()
    if not asks_for_deepspeed(cfg):  # a DeepSpeed run shows DeepSpeed's
        import_deepspeed_quietly()
    from lowmem.train.loop import train as run

    run(cfg)


def show_config(**kwargs):
    """Print the resolved config as JSON (same flags as train)."""
    if "help" in kwargs or "h" in kwargs:
        print(config_help("show_config"))
        return
    print(json.dumps(dataclasses.asdict(resolve_config(kwargs)), indent=1, ensure_ascii=False))


def plan(**kwargs):
    """Print the memory plan and the longest --max_seq_len that fits (same flags as train), without training."""
    if "help" in kwargs or "h" in kwargs:
        print(config_help("plan"))
        return
    cfg = resolve_config(kwargs)
    import_models_quietly()
    if not asks_for_deepspeed(cfg):
        import_deepspeed_quietly()
    from lowmem.train.plan import plan_report

    print(plan_report(cfg))


def prepare_reference(**kwargs):
    """Compute the reference caches a preference run needs (the same flags as its train command), without training."""
    if "help" in kwargs or "h" in kwargs:
        print(config_help("prepare reference"))
        return
    cfg = resolve_config(kwargs)
    import_models_quietly()  # the reference forward passes use no torchao
    if not asks_for_deepspeed(cfg):
        import_deepspeed_quietly()
    from lowmem.train.session import prepare_reference_caches

    prepare_reference_caches(cfg)


def check_checkpoint(path, **unknown):
    """Verify DIR: one checkpoint, a checkpoints dir or a run dir; exit 2 if any checkpoint fails."""
    from lowmem.cli.flags import reject_unknown_flags

    reject_unknown_flags("check_checkpoint", ["path"], unknown)
    from lowmem.checkpoint import check_checkpoints

    status = check_checkpoints(str(path))
    if status:
        raise SystemExit(status)


def config_help(command: str = "train") -> str:
    from lowmem.cli.docs import flag_help

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
        from lowmem.cli.prepare import prepare_help

        tool = args[0] if args and not args[0].startswith("-") else None
        return config_help("prepare reference") if tool == REFERENCE else prepare_help(tool)
    from lowmem.cli.infer import help_text

    return help_text(command)


def _commands(command: str, tool: str | None = None) -> dict:
    """The Fire component of `command` alone: other commands' modules (and torch) stay unimported."""
    if command == "train":
        return {"train": train}
    if command == "prepare" and tool == REFERENCE:  # its flags are train's
        return {"prepare": {REFERENCE: prepare_reference}}
    if command == "show_config":
        return {"show_config": show_config}
    if command == "plan":
        return {"plan": plan}
    if command == "check_checkpoint":
        return {"check_checkpoint": check_checkpoint}
    if command == "prepare":
        from lowmem.cli.prepare import PrepareCommands

        return {"prepare": PrepareCommands}
    from lowmem.cli import infer as cli_generate

    return {command: getattr(cli_generate, command)}


def _check_command(args: list[str]) -> None:
    """Unknown commands and a `prepare` without its tool are errors before Fire sees them."""
    command = args[0]
    if command not in COMMANDS:
        near = difflib.get_close_matches(command, list(COMMANDS), n=1, cutoff=0.5)
        hint = f"did you mean: {near[0]}? " if near else ""
        raise UserError(f"unknown command '{command}'; {hint}commands: {', '.join(COMMANDS)} (see --help)")
    if command == "prepare" and len(args) > 1:
        from lowmem.cli.prepare import check_tool

        check_tool(args[1])


def run_command_line(args: list[str]) -> int:
    if not args or args[0] in HELP_FLAGS or args[0] == "help":
        print(commands_help())
        return 0
    _check_command(args)
    takes_config = args[0] in CONFIG_COMMANDS or args[:2] == ["prepare", REFERENCE]
    check_repeated_flags(args[1:], aliases=takes_config)
    if takes_config:
        flag_words = args[2:] if args[0] == "prepare" else args[1:]
        check_no_positionals(" ".join(args[:len(args) - len(flag_words)]), flag_words)
    if wants_help(args[1:]) or args == ["prepare"]:
        print(command_help(args[0], args[1:]))
        return 0
    import fire

    fire.Fire(_commands(args[0], args[1] if len(args) > 1 else None), command=list(args), name="train_low_mem.py")
    return 0


def main() -> int:
    try:
        return run_command_line(sys.argv[1:])
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
