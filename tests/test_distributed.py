"""Many processes and machines: DeepSpeed config filling and conflicts, a simulated two-machine run (torchrun:
tests/test_run_safety.py, elastic resume).

The DeepSpeed ZeRO and FSDP tests at the end run on CPU processes over gloo (deepspeed comes with
requirements-dev.txt) and on GPUs: two sharded processes on CPU or on two GPUs, one process (ZeRO-2 anywhere;
ZeRO-3, FSDP and ZeRO-3 with offload, whose CPU Adam compiles for minutes) on one GPU.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import REPO, cli, cli_here, env_without, flags, read_jsonl, run_in_process, tiny_config

from lowmem.run import distributed
from lowmem.run.errors import UserError

CONFIGS = os.path.join(REPO, "accelerate_configs")
HAS_FIELDS = all(f in {f.name for f in dataclasses.fields(__import__("config").TrainConfig)}
                 for f in distributed.FIELD_DEFAULTS)
needs_fields = pytest.mark.skipif(not HAS_FIELDS,
                                  reason="config.TrainConfig lacks the deepspeed/zero_stage/offload_* fields")
LAUNCH_ENV = ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP", "ACCELERATE_DEEPSPEED_CONFIG_FILE",
              "ACCELERATE_DEEPSPEED_ZERO_STAGE", "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE",
              "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "ACCELERATE_GRADIENT_ACCUMULATION_STEPS",
              "ACCELERATE_GRADIENT_CLIPPING", "ACCELERATE_CONFIG_DS_FIELDS")


def make_cfg(**values):
    """A TrainConfig with the distributed fields set, whether or not config.py declares them yet."""
    from config import TrainConfig

    known = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in values.items() if k in known})
    for k, v in values.items():
        setattr(cfg, k, v)
    return cfg


def ds_json(name: str) -> dict:
    with open(os.path.join(CONFIGS, name), encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture
def clean_env(monkeypatch):
    for name in LAUNCH_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


# --- "auto" filling ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["ds_zero2.json", "ds_zero3.json", "ds_zero3_offload.json"])
@pytest.mark.parametrize("precision", ["bf16", "fp16", "no"])
def test_fill_replaces_every_auto_the_trainer_owns(name, precision):
    cfg = make_cfg(batch_size_per_gpu=6, gradient_accumulation_steps=3, max_grad_norm=0.5)
    filled = distributed.fill_deepspeed_config(ds_json(name), cfg, world_size=4, mixed_precision=precision)
    assert filled["train_micro_batch_size_per_gpu"] == 6  # no DataLoader reaches prepare: it must be explicit
    assert filled["gradient_accumulation_steps"] == 3
    assert filled["train_batch_size"] == 6 * 3 * 4
    assert filled["gradient_clipping"] == 0.5
    assert filled["bf16"]["enabled"] is (precision == "bf16") and filled["fp16"]["enabled"] is (precision == "fp16")
    assert filled["bf16"].get("check_grad_overflow", False) is (precision == "bf16")  # skip_nonfinite's default
    leftover = list(distributed._auto_paths(filled))
    assert set(leftover) <= set(distributed.ACCELERATE_FILLS)  # only the hidden-size ones Accelerate fills itself
    if filled["zero_optimization"]["stage"] == 3:
        assert filled["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert ds_json(name)["gradient_accumulation_steps"] == "auto"  # the input is not modified


def test_fill_accepts_explicit_values_that_agree():
    ds = {**ds_json("ds_zero2.json"), "gradient_accumulation_steps": 2, "train_micro_batch_size_per_gpu": 4,
          "train_batch_size": 16, "gradient_clipping": 1, "bf16": {"enabled": True}}
    cfg = make_cfg(batch_size_per_gpu=4, gradient_accumulation_steps=2, max_grad_norm=1.0)
    filled = distributed.fill_deepspeed_config(ds, cfg, 2, "bf16")
    assert filled["train_batch_size"] == 16 and filled["fp16"]["enabled"] is False


@pytest.mark.parametrize("change, precision, needle", [
    ({"gradient_accumulation_steps": 8}, "bf16", "gradient_accumulation_steps=8 but the training config gives 2"),
    ({"train_micro_batch_size_per_gpu": 16}, "bf16", "--batch_size_per_gpu=4"),
    ({"train_batch_size": 64}, "bf16", "train_batch_size=64"),
    ({"gradient_clipping": 5.0}, "bf16", "--max_grad_norm=1.0"),
    ({"bf16": {"enabled": True}}, "no", "bf16.enabled=true but mixed precision is 'no'"),
    ({"fp16": {"enabled": False}}, "fp16", "fp16.enabled=false"),
    ({"optimizer": {"type": "AdamW"}}, "bf16", "remove 'optimizer'"),
    ({"scheduler": {"type": "WarmupLR"}}, "bf16", "remove 'scheduler'"),
    ({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}, "bf16", "needs ZeRO stage 3"),
    ({"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": False}}, "bf16", "set it to true"),
    ({"zero_optimization": {"stage": 7}}, "bf16", "use 0, 1, 2 or 3"),
    ({"zero_optimization": {"stage": 2}, "wall_clock_breakdown": "auto"}, "bf16", "cannot fill"),
])
def test_fill_rejects_contradictions_in_one_line(change, precision, needle):
    cfg = make_cfg(batch_size_per_gpu=4, gradient_accumulation_steps=2, max_grad_norm=1.0)
    with pytest.raises(UserError) as info:
        distributed.fill_deepspeed_config({**ds_json("ds_zero2.json"), **change}, cfg, 2, precision)
    assert needle in str(info.value) and "\n" not in str(info.value)


# --- where the settings come from, and conflicts ----------------------------------------------------

def test_no_deepspeed_unless_asked(clean_env):
    assert distributed.resolve_deepspeed(make_cfg()) == (None, "")


def test_zero_stage_flag_builds_a_config(clean_env):
    ds, source = distributed.resolve_deepspeed(make_cfg(zero_stage=3, offload_optimizer=True, offload_param=True))
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    assert source == "--zero_stage=3"


def test_deepspeed_flag_with_matching_and_contradicting_stage(clean_env):
    ds, _ = distributed.resolve_deepspeed(make_cfg(deepspeed="accelerate_configs/ds_zero2.json", zero_stage=2,
                                                   offload_optimizer=True))
    assert ds["zero_optimization"]["stage"] == 2 and ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    with pytest.raises(UserError, match="--zero_stage=3 contradicts zero_optimization.stage=2"):
        distributed.resolve_deepspeed(make_cfg(deepspeed="accelerate_configs/ds_zero2.json", zero_stage=3))


@pytest.mark.parametrize("values, needle", [
    ({"zero_stage": 5}, "is not a ZeRO stage"),
    ({"offload_optimizer": True}, "need DeepSpeed ZeRO"),
    ({"deepspeed": "no/such/file.json"}, "does not exist"),
])
def test_bad_flags_without_a_launcher(clean_env, values, needle):
    with pytest.raises(UserError, match=needle):
        distributed.resolve_deepspeed(make_cfg(**values))


def test_deepspeed_launch_config_and_flags_must_agree(clean_env, tmp_path):
    clean_env.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    clean_env.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "accelerate_configs/ds_zero2.json")
    ds, source = distributed.resolve_deepspeed(make_cfg())  # the launcher alone decides
    assert ds["zero_optimization"]["stage"] == 2 and "accelerate config" in source
    assert distributed.resolve_deepspeed(make_cfg(zero_stage=2))[0]["zero_optimization"]["stage"] == 2
    with pytest.raises(UserError, match="asks for DeepSpeed stage 2.*asks for stage 3"):
        distributed.resolve_deepspeed(make_cfg(zero_stage=3))
    with pytest.raises(UserError, match="--offload_"):
        distributed.resolve_deepspeed(make_cfg(offload_optimizer=True))
    same = tmp_path / "same.json"
    shutil.copy(os.path.join(CONFIGS, "ds_zero2.json"), same)
    assert distributed.resolve_deepspeed(make_cfg(deepspeed=str(same)))[0] is not None
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**ds_json("ds_zero2.json"), "wall_clock_breakdown": True}))
    with pytest.raises(UserError, match="differ"):
        distributed.resolve_deepspeed(make_cfg(deepspeed=str(other)))


def test_deepspeed_launch_without_a_json_file(clean_env):
    clean_env.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    clean_env.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    clean_env.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "cpu")
    clean_env.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4")
    ds, _ = distributed.resolve_deepspeed(make_cfg())
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    with pytest.raises(UserError, match="gradient_accumulation_steps=4"):
        distributed.fill_deepspeed_config(ds, make_cfg(gradient_accumulation_steps=1), 1, "bf16")
    assert distributed.resolve_deepspeed(make_cfg(zero_stage=3, offload_optimizer=True))[0] is not None
    with pytest.raises(UserError, match="optimizer on cpu.*optimizer on none"):
        distributed.resolve_deepspeed(make_cfg(deepspeed="accelerate_configs/ds_zero3.json"))


def test_fsdp_launch_refuses_deepspeed_flags(clean_env):
    clean_env.setenv("ACCELERATE_USE_FSDP", "true")
    assert distributed.resolve_deepspeed(make_cfg()) == (None, "")
    for values in ({"zero_stage": 2}, {"deepspeed": "accelerate_configs/ds_zero2.json"}, {"offload_param": True}):
        with pytest.raises(UserError, match="FSDP accelerate config"):
            distributed.resolve_deepspeed(make_cfg(**values))


def test_plugin_needs_deepspeed(clean_env):
    clean_env.setattr(distributed, "deepspeed_available", lambda: False)
    for cfg in (make_cfg(zero_stage=2), make_cfg(deepspeed="accelerate_configs/ds_zero3.json")):
        with pytest.raises(UserError, match=r"pip install deepspeed \(see requirements-gpu.txt\)"):
            distributed.deepspeed_plugin(cfg, "bf16")
    # installed but broken (built for another torch): its import error in one line
    clean_env.setattr(distributed, "deepspeed_available", lambda: True)
    clean_env.setitem(sys.modules, "deepspeed", None)
    with pytest.raises(UserError, match=r"^DeepSpeed was asked for \(--zero_stage=2\) but `import deepspeed` fails "
                                        r"\(ModuleNotFoundError: .*\); reinstall it for this torch: pip install"):
        distributed.deepspeed_plugin(make_cfg(zero_stage=2), "bf16")

@pytest.mark.parametrize("values, stage, needle", [
    ({"bf16_weights": True}, 2, "--bf16_weights"),
    ({"optimizer": "adafactor", "offload_optimizer": True}, 2, "CPU Adam"),
    ({"use_ema": True}, 3, "--use_ema"),
    ({"auto_batch_size": True}, 2, "--auto_batch_size"),
])
def test_training_options_deepspeed_would_break(clean_env, values, stage, needle):
    cfg = make_cfg(zero_stage=stage, **values)
    ds, source = distributed.resolve_deepspeed(cfg)
    with pytest.raises(UserError, match=needle):
        distributed.check_training_options(cfg, ds, source)
    ema_zero2 = make_cfg(zero_stage=2, use_ema=True)
    distributed.check_training_options(ema_zero2, *distributed.resolve_deepspeed(ema_zero2))  # fine with ZeRO-2


def test_checkpoint_of_another_zero_layout_is_refused_not_skipped(tmp_path):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from lowmem.checkpoint.sharded import check_layout

    plain = SimpleNamespace(distributed_type=DistributedType.NO, num_processes=1)
    zero2 = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, num_processes=2,
                            state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=2)))
    check_layout(plain, str(tmp_path))  # an ordinary checkpoint in an ordinary run
    (tmp_path / "deepspeed").mkdir()
    (tmp_path / "deepspeed" / "layout.json").write_text(json.dumps({"zero_stage": 2, "world_size": 2}))
    check_layout(zero2, str(tmp_path))
    with pytest.raises(UserError, match="ZeRO stage 2 on 2 processes, this run has no DeepSpeed"):
        check_layout(plain, str(tmp_path))
    zero2.state.deepspeed_plugin.zero_stage = 3
    with pytest.raises(UserError, match="this run has ZeRO stage 3 on 2 processes"):
        check_layout(zero2, str(tmp_path))


def test_plugin_is_accepted_by_accelerate(clean_env):
    """Accelerate's own DeepSpeedPlugin takes the filled dict, with the launcher's fields env present."""
    clean_env.setattr(distributed, "deepspeed_available", lambda: True)
    clean_env.setattr(torch.cuda, "is_available", lambda: True)
    clean_env.setenv("WORLD_SIZE", "2")
    clean_env.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    clean_env.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "accelerate_configs/ds_zero3.json")
    clean_env.setenv("ACCELERATE_CONFIG_DS_FIELDS", "deepspeed_config_file,zero3_init_flag,mixed_precision")
    plugin = distributed.deepspeed_plugin(make_cfg(batch_size_per_gpu=3, gradient_accumulation_steps=2), "bf16")
    assert plugin.zero_stage == 3 and plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == 3
    assert plugin.deepspeed_config["train_batch_size"] == 12
    # what Accelerate does at prepare time: fill the hidden-size keys; nothing else may be "auto"
    plugin.deepspeed_config_process(must_match=False, **{k: 64 for k in distributed.ACCELERATE_FILLS})
    assert not list(distributed._auto_paths(plugin.deepspeed_config))


# --- the command line ------------------------------------------------------------------------------

@pytest.fixture
def without_deepspeed(tmp_path):
    return env_without(tmp_path, "deepspeed")


def _assert_one_line_error(result, needle):
    assert result.returncode == 2, result.stderr[-2000:]
    assert needle in result.stderr and "Traceback" not in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.startswith("error:")]) == 1


def test_deepspeed_launch_without_deepspeed_is_one_line_error(tmp_path, without_deepspeed):
    env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": "accelerate_configs/ds_zero2.json",
           **without_deepspeed}
    result = cli(["train", f"--output_dir={tmp_path}/ms", f"--log_dir={tmp_path}/logs"], cwd=str(tmp_path), env=env)
    _assert_one_line_error(result, "pip install deepspeed (see requirements-gpu.txt)")


@needs_fields
def test_deepspeed_flag_without_deepspeed_is_one_line_error(tmp_path, without_deepspeed):
    """Where deepspeed cannot be imported (--deepspeed=<json> meets the same check: test_plugin_needs_deepspeed)."""
    result = cli(["train", "--zero_stage=2", f"--output_dir={tmp_path}/ms", f"--log_dir={tmp_path}/logs"],
                 cwd=str(tmp_path), env=without_deepspeed)
    _assert_one_line_error(result, "pip install deepspeed")


def test_start_script_refuses_deepspeed_config_without_deepspeed(without_deepspeed):
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
           **without_deepspeed}
    result = subprocess.run(["bash", os.path.join(REPO, "start_pretrain_large.sh"), "1",
                             "accelerate_configs/deepspeed_zero2.yaml"], stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=1800, env=env)
    assert result.returncode == 1 and "pip install deepspeed" in result.stderr
    assert "start training?" not in result.stdout + result.stderr  # no prompt without a terminal


# --- several processes on CPU ----------------------------------------------------------------------

def _trace(cfg, rank):
    records = read_jsonl(os.path.join(cfg.logging_dir(), f"samples_rank{rank}.jsonl"))
    return [h for rec in records for h in rec["samples"]]


def _two_machines(cfg, extra, port, tmp_path):
    """Both 'machines' of a two-node launch on this host, one process each; returns their results."""
    def launcher(rank):
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", os.path.join(CONFIGS, "cpu.yaml"),
                "--num_machines", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
                "--main_process_port", str(port), "--num_processes", "2"]

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    args = [os.path.join(REPO, "train_low_mem.py"), "train", *flags(cfg, *extra)]
    procs = [subprocess.Popen(launcher(r) + args, cwd=str(tmp_path), env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    try:
        outputs = [p.communicate(timeout=1800)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    return outputs


def _weights(path):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "model.safetensors"))


@pytest.mark.slow
def test_two_machines_match_one_process(tmp_path, tokenizer_dir, qa_files):
    """Two 'machines' x 4 samples export what one process x 8 samples computes (resuming on several processes is
    tested with one machine: tests/test_resume.py, tests/test_run_safety.py)."""
    common = dict(validation_file="", learn_rate=1e-2, warmup_steps=4, lr_scheduler="constant", adam_eps=1e-4,
                  max_grad_norm=0.0, save_steps=4, train_file=qa_files["train_file"], max_steps=4)
    single = tiny_config(tmp_path / "one", tokenizer_dir, {}, batch_size_per_gpu=8, **common)
    run_in_process(single)
    multi = tiny_config(tmp_path / "two", tokenizer_dir, {}, batch_size_per_gpu=4, trace_samples=True, **common)
    outputs = _two_machines(multi, [], distributed.free_port(), tmp_path)
    assert "devices: 2 x cpu" in outputs[0]
    seen = [_trace(multi, r) for r in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 16 and not set(seen[0]) & set(seen[1])
    assert os.path.isfile(os.path.join(multi.checkpoint_dir(), "step_00000004", "manifest.json"))
    ref, got = _weights(single.final_dir()), _weights(multi.final_dir())
    assert ref.keys() == got.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=5e-5)  # 0.5% of a 1e-2 Adam step
    losses = [[r["loss"] for r in read_jsonl(os.path.join(c.logging_dir(), "metrics.jsonl")) if "loss" in r]
              for c in (single, multi)]
    assert len(losses[0]) == len(losses[1]) == 4
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


# --- DeepSpeed ZeRO and FSDP, on a GPU or on CPU processes over gloo (DeepSpeed cases need deepspeed) ------

SHARDED_CASES = {
    # name: (flags of the uninterrupted run, how the interrupted run's first half is launched)
    "zero2": (["--zero_stage=2"], "start_script"),
    "zero3": (["--zero_stage=3"], "accelerate_launch"),
    "zero3_offload": (["--zero_stage=3", "--offload_optimizer=True", "--offload_param=True"], "flag"),
}
# DeepSpeed's CPU Adam (offload) is a C++ op compiled on first use, for minutes on 2 cores: GPU machines only
CUDA_ONLY = pytest.mark.skipif(not torch.cuda.is_available(), reason="CPU Adam compiles for minutes; needs a CUDA GPU")
# one sharded process on CPU adds nothing to the two-process test below, which a one-GPU machine cannot run
ONE_GPU_ONLY = pytest.mark.skipif(not torch.cuda.is_available(), reason="on CPU the two-process test covers it")
TWO_PROCESSES_POSSIBLE = pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < 2,
                                            reason="two sharded processes need two GPUs on a CUDA machine")


def _resume_configs(tmp_path, tokenizer_dir, qa_files):
    """4 steps straight, and the same run stopped after 2 steps (resumed to 4 by the caller)."""
    # fp32 keeps the comparison tight; a warmup over all 4 steps changes the LR every step (independently of
    # max_steps), so a resumed run that stopped applying its schedule would end with other weights
    common = dict(validation_file="", learn_rate=1e-3, warmup_steps=4, lr_scheduler="constant", max_grad_norm=1.0,
                  save_steps=2, mixed_precision="no", batch_size_per_gpu=4, gradient_accumulation_steps=2,
                  train_file=qa_files["train_file"])
    return (tiny_config(tmp_path / "straight", tokenizer_dir, {}, max_steps=4, **common),
            tiny_config(tmp_path / "halves", tokenizer_dir, {}, max_steps=2, **common))


def _assert_resume_matches(straight, halves):
    from transformers import AutoModelForCausalLM

    losses = [[r["loss"] for r in read_jsonl(os.path.join(c.logging_dir(), "metrics.jsonl")) if "loss" in r]
              for c in (straight, halves)]
    assert len(losses[0]) == len(losses[1]) == straight.max_steps and losses[1] == pytest.approx(losses[0], rel=1e-4)
    ref, got = _weights(straight.final_dir()), _weights(halves.final_dir())
    assert ref.keys() == got.keys() and all(t.numel() > 0 for t in got.values())  # gathered, not shard placeholders
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-5)
    model = AutoModelForCausalLM.from_pretrained(halves.final_dir())
    assert torch.isfinite(model(torch.tensor([[1, 2, 3, 4]])).logits).all()


@needs_fields
@pytest.mark.parametrize("name", [pytest.param("zero2"), pytest.param("zero3", marks=ONE_GPU_ONLY),
                                  pytest.param("zero3_offload", marks=CUDA_ONLY)])
@pytest.mark.slow
def test_deepspeed_train_resume_export(tmp_path, tokenizer_dir, qa_files, name):
    """ZeRO on one process: 2 steps + resume + 2 steps end where 4 steps without DeepSpeed do, and the export loads in
    transformers."""
    pytest.importorskip("deepspeed")
    flag_args, first_half = SHARDED_CASES[name]
    json_file = os.path.join(CONFIGS, f"ds_{name}.json")
    straight, halves = _resume_configs(tmp_path, tokenizer_dir, qa_files)
    run_in_process(straight)  # plain AdamW on one process: what ZeRO computes, partitioned

    if first_half == "start_script":
        env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
        result = subprocess.run(["bash", os.path.join(REPO, "start_pretrain_large.sh"), "1",
                                 f"accelerate_configs/deepspeed_{name}.yaml", *flags(halves)], stdin=subprocess.DEVNULL,
                                capture_output=True, text=True, timeout=1800, env=env, cwd=str(tmp_path))
    elif first_half == "accelerate_launch":
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                    os.path.join(CONFIGS, f"deepspeed_{name}.yaml"), "--num_processes", "1",
                    "--main_process_port", str(distributed.free_port())]
        result = cli(["train", *flags(halves)], launcher=launcher, cwd=str(tmp_path), timeout=1800)
    else:
        result = cli(["train", *flags(halves, f"--deepspeed={json_file}")], cwd=str(tmp_path), timeout=1800)
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"(DeepSpeed ZeRO-{flag_args[0][-1]})" in result.stdout + result.stderr
    resumed = dataclasses.replace(halves, max_steps=4, is_keep_training=True)
    result = cli(["train", *flags(resumed, f"--deepspeed={json_file}")], cwd=str(tmp_path), timeout=1800)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "resumed from" in result.stdout + result.stderr
    assert os.path.isdir(os.path.join(halves.checkpoint_dir(), "step_00000004", "deepspeed", "state"))
    assert not os.path.exists(os.path.join(halves.checkpoint_dir(), "step_00000004", "optimizer.pt"))
    _assert_resume_matches(straight, halves)
    # another layout is refused, not skipped: a run without DeepSpeed (one process: checked here, in this process)
    refused = cli_here(["train", *flags(dataclasses.replace(resumed, max_steps=6))], cwd=str(tmp_path))
    assert refused.returncode == 2 and "resume refused" in refused.stderr, refused.stderr[-2000:]
    assert f"ZeRO stage {flag_args[0][-1]} on 1 processes, this run has no DeepSpeed" in refused.stderr


@ONE_GPU_ONLY
def test_fsdp_train_resume_export(tmp_path, tokenizer_dir, qa_files):
    """FSDP2 full shard (accelerate_configs/fsdp.yaml) on one process: exact resume and a loadable export."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", os.path.join(CONFIGS, "fsdp.yaml"),
                "--num_processes", "1", "--main_process_port", str(distributed.free_port())]
    straight, halves = _resume_configs(tmp_path, tokenizer_dir, qa_files)
    for cfg in (straight, halves, dataclasses.replace(halves, max_steps=4, is_keep_training=True)):
        result = cli(["train", *flags(cfg)], launcher=launcher, cwd=str(tmp_path), timeout=1800)
        assert result.returncode == 0, result.stderr[-4000:]
        assert "(FSDP)" in result.stdout + result.stderr  # really sharded, not a silent data-parallel fallback
    assert os.path.isfile(os.path.join(straight.checkpoint_dir(), "step_00000004", "optimizer.pt"))
    _assert_resume_matches(straight, halves)


@pytest.mark.slow
@TWO_PROCESSES_POSSIBLE
@pytest.mark.parametrize("name", ["deepspeed_zero3", "fsdp"])
def test_two_sharded_processes_train_resume_export_a_mixture_of_experts(tmp_path, qa_files, qwen3_moe_dir, name):
    """Two processes, each holding half of every weight of a Qwen3-MoE: 8 steps, a resume and 2 more end where one
    unsharded process does on the same batches, the export gathers whole weights, and the log is quiet."""
    if name.startswith("deepspeed"):
        pytest.importorskip("deepspeed")

    def launch(cfg):
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                    os.path.join(CONFIGS, f"{name}.yaml"), "--num_processes", "2",
                    "--main_process_port", str(distributed.free_port())]
        result = cli(["train", *flags(cfg)], launcher=launcher, cwd=str(tmp_path), timeout=1800)
        assert result.returncode == 0, result.stderr[-4000:]
        output = result.stdout + result.stderr
        assert output.count("FutureWarning") == 0 and "lr_scheduler.step()" not in output, output[-4000:]
        return output

    common = dict(validation_file="", learn_rate=1e-3, warmup_steps=10, lr_scheduler="constant", max_grad_norm=1.0,
                  save_steps=4, mixed_precision="no", gradient_accumulation_steps=2, train_file=qa_files["train_file"],
                  finetune_from_ckp_file=qwen3_moe_dir, router_aux_loss_coef=0.0)
    # one process with twice the micro-batch takes the same samples per step as two processes (test_two_machines)
    straight = tiny_config(tmp_path / "straight", "", {}, batch_size_per_gpu=8, max_steps=10, **common)
    sharded = tiny_config(tmp_path / "sharded", "", {}, batch_size_per_gpu=4, max_steps=8, **common)
    run_in_process(straight)
    first = launch(sharded)
    assert "model qwen3_moe from" in first and "active per token (2 of 8 experts)" in first
    assert "(DeepSpeed ZeRO-3)" in first and "ZeRO-3 gathers each MoE block (Qwen3MoeSparseMoeBlock)" in first \
        if name.startswith("deepspeed") else "(FSDP)" in first
    assert "resumed from" in launch(dataclasses.replace(sharded, max_steps=10, is_keep_training=True))
    _assert_resume_matches(straight, sharded)
