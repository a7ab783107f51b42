"""The command line: choices, value checks, repeated and unknown flags, help, and quiet third-party imports.

Most tests call `train_low_mem.main()` in this process with a patched sys.argv; one subprocess per
kind of error checks what a user really sees (exit code, one `error:` line, no traceback).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import typing

import pytest
from conftest import cli, flags, tiny_config

import train_low_mem
from config import TRAIN_PRESETS, TrainConfig
from lowmem.cli.flags import check_repeated_flags, convert, quiet_loggers
from lowmem.run.errors import UserError
from lowmem.train.validate import check_config


def run_main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `train_low_mem.py args...` run in this process."""
    monkeypatch.setattr(sys, "argv", ["train_low_mem.py", *args])
    code = train_low_mem.main()
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ---------------------------------------------------------------- Literal choices and list[dict] fields

def test_a_choice_outside_a_literal_names_the_choices_and_the_closest(monkeypatch, capsys):
    code, out, err = run_main(monkeypatch, capsys, "show_config", "--optimizer=adamx")
    assert code == 2 and out == ""
    assert one_error_line(err) == ("error: --optimizer expects one of adamw, adamw_8bit, adamw_4bit, adafactor; "
                                   "got 'adamx' (closest: adamw)")
    code, out, err = run_main(monkeypatch, capsys, "show_config", "--lr_scheduler", "cosin", "--mixed_precision=no",
                              "--attn_implementation=sdpa")
    assert code == 2 and "--lr_scheduler expects one of cosine, linear, constant; got 'cosin' (closest: cosine)" in err


def test_convert_takes_literal_choices_and_refuses_the_rest():
    choice = typing.Literal["user", "latest_item"]
    assert convert("split_by", "latest_item", choice) == "latest_item"
    with pytest.raises(UserError, match=r"^--split_by expects one of user, latest_item; got 5$"):
        convert("split_by", 5, choice)
    assert convert("x", "2", typing.Literal[1, 2]) == 2  # Fire may hand a number as text or text as a number
    assert convert("train_file", ("a", "b"), str) == "a,b"  # Fire splits `--train_file=a,b` into a tuple


def test_dataset_lists_come_from_json_flags_or_config_files(monkeypatch, capsys, tmp_path):
    mixture = [{"path": "a.parquet", "weight": 0.7}, {"path": "b.parquet", "weight": 0.3}]
    code, out, err = run_main(monkeypatch, capsys, "show_config", f"--datasets={json.dumps(mixture)}")
    assert code == 0, err
    assert json.loads(out)["datasets"] == mixture
    config_file = tmp_path / "mix.json"
    config_file.write_text(json.dumps({"validation_datasets": mixture[:1]}), encoding="utf-8")
    code, out, err = run_main(monkeypatch, capsys, "show_config", f"--config={config_file}")
    assert code == 0 and json.loads(out)["validation_datasets"] == mixture[:1], err
    for bad, needle in (("[1, 2]", "--datasets expects a list of mappings such as"),
                        ("{not json", "--datasets is not valid JSON"),
                        ("a.parquet", "--datasets is not valid JSON")):
        code, _, err = run_main(monkeypatch, capsys, "show_config", f"--datasets={bad}")
        assert code == 2 and needle in one_error_line(err)
    config_file.write_text(json.dumps({"datasets": "a.parquet"}), encoding="utf-8")
    code, _, err = run_main(monkeypatch, capsys, "show_config", f"--config={config_file}")
    assert code == 2 and "--datasets is not valid JSON" in one_error_line(err)


# ---------------------------------------------------------------- values checked once, early

@pytest.mark.parametrize("values, message", [
    ({"max_grad_norm": -1.0}, "--max_grad_norm=-1.0 must be at least 0 (0 disables clipping)"),
    ({"min_lr_ratio": 1.5}, "--min_lr_ratio=1.5 must be in [0, 1]"),
    ({"weight_decay": -0.1}, "--weight_decay=-0.1 must be at least 0"),
    ({"dropout": 1.0}, "--dropout=1.0 must be in [0, 1)"),
    ({"adam_beta1": -0.1}, "--adam_beta1=-0.1 must be in [0, 1)"),
    ({"adam_beta2": 1.0}, "--adam_beta2=1.0 must be in [0, 1)"),
    ({"adam_eps": 0.0}, "--adam_eps=0.0 must be greater than 0"),
    ({"learn_rate": 0.0}, "--learn_rate=0.0 must be greater than 0"),
    ({"learn_rate": math.nan}, "--learn_rate=nan must be a finite number greater than 0"),
    ({"learn_rate": math.inf}, "--learn_rate=inf must be a finite number greater than 0"),
    ({"div_factor": 0.5}, "--div_factor=0.5 must be at least 1"),
    ({"ema_decay": 1.0}, "--ema_decay=1.0 must be in [0, 1)"),
    ({"warmup_steps": -1}, "--warmup_steps=-1 must be at least 0"),
    ({"max_steps": -1}, "--max_steps=-1 must be at least 0"),
    ({"eval_max_batches": -1}, "--eval_max_batches=-1 must be at least 0"),
    ({"test_generation_samples": -1}, "--test_generation_samples=-1 must be at least 0"),
    ({"max_gpu_memory_gb": -2.0}, "--max_gpu_memory_gb=-2.0 must be at least 0"),
    ({"early_stopping_patience": -1}, "--early_stopping_patience=-1 must be at least 0 (0 turns it off)"),
    ({"early_stopping_threshold": -0.1}, "--early_stopping_threshold=-0.1 must be at least 0"),
    ({"zero_stage": 4}, "--zero_stage=4 must be in [0, 3] (0: off)"),
    ({"lora_r": -1}, "--lora_r=-1 must be at least 0"),
    ({"lora_alpha": 0.0}, "--lora_alpha=0.0 must be greater than 0"),
    ({"lora_dropout": 1.0}, "--lora_dropout=1.0 must be in [0, 1)"),
    ({"max_seq_len": 4}, "--max_seq_len=4 must be at least 8"),
    ({"val_ratio": 1.0}, "--val_ratio=1.0 must be in [0, 1)"),
    ({"max_samples_per_user": 0}, "--max_samples_per_user=0 must be at least 1"),
    ({"batch_size_per_gpu": 0}, "--batch_size_per_gpu=0 must be at least 1"),
    ({"seed": -1}, "--seed=-1 must be in [0, 4294967295]"),
    ({"model_preset": "huge"}, "model_preset 'huge' does not exist"),
    ({"report_to": "tensorbord"}, "report_to 'tensorbord' is unknown"),
    ({"optimizer": "adamx"}, "--optimizer expects one of adamw, adamw_8bit, adamw_4bit, adafactor; got 'adamx'"),
    ({"gradient_checkpointing_mode": "selective"}, "take effect only with --gradient_checkpointing=True"),
    ({"gradient_checkpointing": True, "gradient_checkpointing_every": 0},
     "--gradient_checkpointing_every=0 must be at least 1"),
    ({"chunked_cross_entropy": True, "use_liger_kernel": True}, "both replace the loss"),
    ({"freeze_encoder": True}, "--freeze_encoder applies to encoder-decoder models (T5)"),
])
def test_check_config_refuses_each_bad_value_in_one_line(values, message):
    with pytest.raises(UserError) as err:
        check_config(TrainConfig(**values))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_every_preset_and_the_edges_of_each_range_pass():
    for cls in TRAIN_PRESETS.values():
        check_config(cls())
    check_config(TrainConfig(max_grad_norm=0.0, min_lr_ratio=1.0, dropout=0.0, div_factor=1.0, max_steps=30,
                             warmup_steps=30, max_samples_per_user=None, max_seq_len=8, seed=2**32 - 1))
    check_config(TrainConfig(max_steps=0, warmup_steps=10_000))  # no step cap: the warmup rule has nothing to compare


def test_warmup_beyond_max_steps_is_flagged_with_a_smaller_warmup():
    from lowmem.train.validate import config_warnings

    check_config(TrainConfig(max_steps=50, warmup_steps=100))  # legal: a resume may continue the schedule
    assert "--warmup_steps=5 (or any value up to 50)" in config_warnings(TrainConfig(max_steps=50, warmup_steps=100))[0]
    assert config_warnings(TrainConfig(max_steps=50, warmup_steps=50)) == []


def test_show_config_and_train_refuse_bad_values_before_building_anything(monkeypatch, capsys, tmp_path):
    code, out, err = run_main(monkeypatch, capsys, "show_config", "--max_grad_norm=-1")
    assert code == 2 and out == "" and "--max_grad_norm=-1.0 must be at least 0" in one_error_line(err)
    code, out, err = run_main(monkeypatch, capsys, "train", f"--output_dir={tmp_path}/ms", f"--log_dir={tmp_path}/logs",
                              "--max_steps=10", "--dropout=1.5", "--train_file=missing.parquet")
    assert code == 2 and "--dropout=1.5 must be in [0, 1)" in one_error_line(err)
    assert not (tmp_path / "ms").exists() and not (tmp_path / "logs").exists()


# ---------------------------------------------------------------- a flag given twice

@pytest.mark.parametrize("args, message", [
    (["train", "--learn_rate=1e-3", "--learn_rate=1e-4"],
     "--learn_rate is given twice (--learn_rate=1e-3, --learn_rate=1e-4); pass it once"),
    (["show_config", "--lr", "1e-3", "--learning_rate=1e-4"],
     "--learn_rate is given twice (--lr 1e-3, --learning_rate=1e-4); pass it once"),
    (["train", "--max_epochs=2", "--epochs", "3", "--epochs=4"],
     "--epochs is given 3 times (--max_epochs=2, --epochs 3, --epochs=4); pass it once"),
    (["show_config", "--batch-size-per-gpu=2", "--batch_size_per_gpu", "3"], "--batch_size_per_gpu is given twice"),
    (["generate", "missing_model", "--top_p=0.5", "--top_p", "0.9"], "--top_p is given twice"),
    (["chat", "missing_model", "--greedy", "--greedy=False"], "--greedy is given twice (--greedy, --greedy=False)"),
    (["evaluate", "--model_dir=a", "--model_dir=b", "--file=x"], "--model_dir is given twice"),
    (["prepare", "convert", "--input=a.csv", "--output=o.parquet", "--input", "b.csv"], "--input is given twice"),
])
def test_a_flag_given_twice_is_an_error_for_every_command(monkeypatch, capsys, args, message):
    code, out, err = run_main(monkeypatch, capsys, *args)
    assert code == 2 and out == ""
    assert message in one_error_line(err)


def test_repeated_flag_check_reads_only_flags():
    check_repeated_flags(["--a=1", "--b", "2", "value", "--c"])
    check_repeated_flags(["--seed", "-1", "--", "--verbose", "--verbose"])  # after `--` the words are Fire's own
    check_repeated_flags(["--lr=1", "--lr_scheduler=cosine"])
    check_repeated_flags(["--lr=1", "--learn_rate=2"], aliases=False)  # other commands have no aliases
    with pytest.raises(UserError, match="--learn_rate is given twice"):
        check_repeated_flags(["--lr=1", "--learn-rate=2"])


# ---------------------------------------------------------------- help and commands

def test_no_arguments_and_help_list_the_commands_without_fire(monkeypatch, capsys):
    import fire.core

    def no_pager(*args, **kwargs):
        raise AssertionError("Fire's help (and its pager) was used")

    monkeypatch.setattr(fire.core, "Display", no_pager)
    for args in ([], ["--help"], ["-h"]):
        code, out, err = run_main(monkeypatch, capsys, *args)
        assert code == 0 and err == ""
        for command in train_low_mem.COMMANDS:
            assert f"\n  {command} " in out
    code, out, _ = run_main(monkeypatch, capsys, "prepare")
    assert code == 0 and "train_tokenizer" in out and "tokens with --tokenizer_dir" in out


def test_train_help_shows_type_default_and_meaning_by_section(monkeypatch, capsys):
    for command in ("train", "show_config"):
        code, out, _ = run_main(monkeypatch, capsys, command, "--learn_rate=1", "--help")
        assert code == 0
        assert "\noptimisation:\n" in out and "\nrun and paths:\n" in out
        assert "--optimizer" in out and "adamw|adamw_8bit|adamw_4bit|adafactor, default: 'adamw'" in out
        assert "--learn_rate" in out and "float, default: 0.003 (greater than 0; on resume: applied, logged)\n" \
            "      peak learning rate" in out
        assert f"usage: train_low_mem.py {command}" in out
    for field in dataclasses.fields(TrainConfig):
        assert f"--{field.name} " in out


def test_prepare_tool_help_and_unknown_tools_and_commands(monkeypatch, capsys):
    code, out, _ = run_main(monkeypatch, capsys, "prepare", "split", "--help")
    assert code == 0 and "--group_column" in out and "keep all rows with the same value" in out
    code, _, err = run_main(monkeypatch, capsys, "prepare", "splt", "--input=x")
    assert code == 2 and "unknown prepare tool 'splt'; did you mean: split?" in one_error_line(err)
    code, _, err = run_main(monkeypatch, capsys, "trian", "--lr=1")
    assert code == 2 and "unknown command 'trian'; did you mean: train?" in one_error_line(err)


# ---------------------------------------------------------------- what a user sees, in a real process

@pytest.mark.parametrize("args, needle", [
    (["show_config", "--mixed_precision=bf32"], "--mixed_precision expects one of auto, no, bf16, fp16; got 'bf32'"),
    (["show_config", "--adam_beta1=1.5"], "--adam_beta1=1.5 must be in [0, 1)"),
    (["show_config", "--learn_rate=1e-3", "--lr=1e-4"], "--learn_rate is given twice"),
    (["generate", "missing_model", "--promt=hi"], "unknown flag --promt for `generate`; did you mean: --prompt"),
    (["show_config", "--zzz=1"], "unknown flag --zzz; see --help for the list"),
    (["show_config", "--config=smal"], "presets: default, pretrain_large, sft, sft_small; did you mean: sft_small"),
])
def test_each_kind_of_flag_error_exits_2_with_one_line(tmp_path, args, needle):
    result = cli(args, cwd=str(tmp_path))
    assert result.returncode == 2 and result.stdout == ""
    assert needle in one_error_line(result.stderr)


# ---------------------------------------------------------------- third-party notices

def test_quiet_loggers_hide_warnings_of_the_package_only_while_active(caplog):
    package, child, ours = logging.getLogger("noisy_pkg"), logging.getLogger("noisy_pkg.sub"), logging.getLogger("ours")
    with caplog.at_level(logging.INFO), quiet_loggers(["noisy_pkg"]):
        package.warning("hidden")
        child.warning("hidden too")
        package.error("a real error")
        ours.warning("our own message")
    package.warning("shown after")
    messages = [record.getMessage() for record in caplog.records]
    assert messages == ["a real error", "our own message", "shown after"]
    assert not package.filters and package.level == logging.NOTSET


def test_a_word_that_is_no_flag_is_refused_before_any_work(monkeypatch, capsys, tmp_path):
    code, out, err = run_main(monkeypatch, capsys, "train", f"--output_dir={tmp_path}", "--max_steps=2",
                              "extra_positional")
    assert code == 2 and "'extra_positional' is not one" in one_error_line(err)
    assert not os.listdir(tmp_path)  # nothing was built or written
    code, out, _ = run_main(monkeypatch, capsys, "show_config", "--learn_rate", "-1e-3")
    assert code == 2  # a negative number is the value of the flag before it, not a stray word


def test_records_only_flags_on_other_data_are_refused():
    from lowmem.train.session import check_flags_apply

    for flag, value in (("val_ratio", 0.2), ("max_samples_per_user", 1)):
        with pytest.raises(UserError, match=rf"^--{flag}={value} applies to user-modeling records .* this run's "
                                            r"training data is prompt_response"):
            check_flags_apply(TrainConfig(**{flag: value}), {"prompt_response"})
    check_flags_apply(TrainConfig(val_ratio=0.2), {"records"})
    check_flags_apply(TrainConfig(), {"prompt_response"})
