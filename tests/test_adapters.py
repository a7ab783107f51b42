"""LoRA and QLoRA (lowmem/model/adapters.py) through the real loop on the tiny preset: only the adapters train,
checkpoints hold them alone, SIGKILL + resume is bitwise, the merged export is what the peft model computes,
the adapter export loads with peft and in generate/evaluate; two processes (DDP, ZeRO-3); QLoRA's NF4 base."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import warnings

import pytest
import torch
from conftest import REPO, cli, cli_here, flags, run_in_process, tiny_config, write_qa_parquet
from test_resume import losses, resume, start, wait_for_step

from lowmem.run.errors import UserError

LORA = dict(lora_r=4, lora_alpha=8.0, validation_file="", learn_rate=1e-2, warmup_steps=1, max_steps=6, save_steps=3)
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="QLoRA trains on a CUDA GPU")


def safetensors(path: str) -> dict:
    from safetensors.torch import load_file

    return load_file(path)


def newest_checkpoint(cfg) -> str:
    from lowmem.checkpoint.files import complete_checkpoints

    return complete_checkpoints(cfg.checkpoint_dir())[-1]


def seeded_base(cfg):
    """The base the run started from: the preset built under the run's seed, as the session builds it."""
    from accelerate.utils import set_seed

    from lowmem.data.tokenizer import load_tokenizer
    from lowmem.model.build import build_model

    set_seed(cfg.seed)
    return build_model(cfg, load_tokenizer(cfg.tokenizer_dir)).eval()


def peft_on(base, adapter_dir: str):
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # peft asks the deprecated name
        return PeftModel.from_pretrained(base, adapter_dir).eval()


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory, tokenizer_dir):
    """The same LoRA run exported merged (the default) and as an adapter directory."""
    root = tmp_path_factory.mktemp("lora")
    files = {"train_file": write_qa_parquet(root / "train.parquet", 240, seed=1)}
    runs = {}
    for name, merge in (("merged", True), ("adapter", False)):
        cfg = tiny_config(root / name, tokenizer_dir, files, merge_lora=merge, **LORA)
        run_in_process(cfg)
        runs[name] = cfg
    return runs


def test_only_adapters_train_and_checkpoints_hold_them_alone(lora_runs):
    cfg = lora_runs["merged"]
    checkpoint = os.path.join(newest_checkpoint(cfg), "model")
    assert sorted(n for n in os.listdir(checkpoint) if not n.startswith(("tokenizer", "chat_template"))) == \
        ["adapter_config.json", "adapter_model.safetensors"]
    adapter = safetensors(os.path.join(checkpoint, "adapter_model.safetensors"))
    assert adapter and all(".lora_A." in k or ".lora_B." in k for k in adapter)
    merged = safetensors(os.path.join(cfg.final_dir(), "model.safetensors"))
    from lowmem.checkpoint.files import checkpoint_bytes

    assert checkpoint_bytes(newest_checkpoint(cfg)) < sum(t.numel() * 4 for t in merged.values()) / 2
    base = seeded_base(cfg).state_dict()
    scaling = cfg.lora_alpha / cfg.lora_r
    adapted = 0
    for name, weight in merged.items():
        a = adapter.get(f"base_model.model.{name[:-len('.weight')]}.lora_A.weight")
        if a is None:  # everything LoRA does not adapt is the base, bit for bit
            assert torch.equal(weight, base[name]), name
            continue
        b = adapter[f"base_model.model.{name[:-len('.weight')]}.lora_B.weight"]
        assert b.abs().max() > 0  # B starts at zero: it trained
        torch.testing.assert_close(weight, base[name] + scaling * b @ a, rtol=0, atol=1e-6)
        adapted += 1
    assert adapted == 4 * 7  # every linear layer of the 4 blocks, not lm_head


def test_merged_export_computes_what_the_peft_model_computes(lora_runs):
    from transformers import AutoModelForCausalLM

    cfg = lora_runs["merged"]
    plain = AutoModelForCausalLM.from_pretrained(cfg.final_dir()).eval()
    trained = peft_on(seeded_base(cfg), os.path.join(newest_checkpoint(cfg), "model"))
    ids = torch.randint(0, plain.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits(plain, ids), logits(trained, ids), rtol=0, atol=1e-5)
    assert not any(name.startswith("adapter") for name in os.listdir(cfg.final_dir()))


def test_adapter_export_loads_with_peft_and_in_generate_and_evaluate(lora_runs, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from lowmem.cli import infer as cli_generate
    from lowmem.infer.generate import GenerationOptions, generate_text, load_for_inference

    final, merged = lora_runs["adapter"].final_dir(), lora_runs["merged"].final_dir()
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "train_config.json",
            "base"} <= set(os.listdir(final))
    with open(os.path.join(final, "adapter_config.json"), encoding="utf-8") as f:
        assert json.load(f)["base_model_name_or_path"] == os.path.join(final, "base")
    trained = peft_on(AutoModelForCausalLM.from_pretrained(os.path.join(final, "base")), final)
    plain = AutoModelForCausalLM.from_pretrained(merged).eval()
    ids = torch.randint(0, plain.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(logits(trained, ids), logits(plain, ids), rtol=0, atol=1e-5)
    greedy = GenerationOptions(max_new_tokens=8, greedy=True)
    assert generate_text(*load_for_inference(final), "cat dog", greedy) == \
        generate_text(*load_for_inference(merged), "cat dog", greedy)
    data = write_qa_parquet(tmp_path / "eval.parquet", 16, seed=3)
    results = []
    for model_dir in (final, merged):
        cli_generate.evaluate(model_dir, data, output=str(tmp_path / "eval.json"), batch_size=8)
        with open(tmp_path / "eval.json", encoding="utf-8") as f:
            results.append(json.load(f)["loss"])
    assert results[0] == pytest.approx(results[1], rel=1e-5)
    capsys.readouterr()


def test_changed_lora_settings_are_refused_on_resume(lora_runs):
    cfg = dataclasses.replace(lora_runs["merged"], is_keep_training=True, max_steps=8, lora_r=8)
    with pytest.raises(UserError, match="resume refused: lora_r was 4, now 8"):
        run_in_process(cfg)


@pytest.mark.parametrize("model", ["llama", "qwen3_moe"])
def test_sigkill_then_resume_is_bitwise_with_ema_checkpointing_and_packing(tmp_path, tokenizer_dir, qa_files, model,
                                                                          request):
    """LoRA dropout (llama) or LoRA on the fused experts with the router loss (Qwen3-MoE), EMA of the adapters,
    gradient checkpointing and packed rows: the resumed run is the same run."""
    options = dict(LORA, max_steps=12, save_steps=4, lora_dropout=0.1, use_ema=True, ema_decay=0.9,
                   gradient_checkpointing=True, packing=True, batch_size_per_gpu=4, validation_file="")
    if model != "llama":
        options.update(finetune_from_ckp_file=request.getfixturevalue(f"{model}_dir"))
        tokenizer_dir = ""  # the model directory's own
    reference = tiny_config(tmp_path / "a", tokenizer_dir, qa_files, **options)
    run_in_process(reference)
    killed = tiny_config(tmp_path / "b", tokenizer_dir, qa_files, **options)
    proc = start(killed)
    wait_for_step(killed, proc, 6)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert "resumed from" in resume(killed).stdout
    assert losses(killed) == losses(reference)  # every step, bitwise on CPU
    a = safetensors(os.path.join(reference.final_dir(), "model.safetensors"))
    b = safetensors(os.path.join(killed.final_dir(), "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ema = os.path.join(newest_checkpoint(killed), "ema")
    assert sorted(os.listdir(ema)) == ["adapter_config.json", "adapter_model.safetensors"]  # no second base
    adapters = safetensors(os.path.join(newest_checkpoint(killed), "model", "adapter_model.safetensors"))
    averaged = safetensors(os.path.join(ema, "adapter_model.safetensors"))
    assert adapters.keys() == averaged.keys() and any(not torch.equal(adapters[k], averaged[k]) for k in adapters)
    experts = [k for k in adapters if ".mlp.experts." in k and "lora_B" in k]
    assert (len(experts) == 4) == (model != "llama")  # gate_up_proj and down_proj of two layers
    assert all(adapters[k].abs().max() > 0 for k in experts)  # they trained (B starts at zero)
    assert not [k for k in adapters if ".mlp.gate." in k]  # the router has no adapter


# --- settings that cannot work are one-line errors --------------------------------------------------------------

@pytest.mark.parametrize("values, needle", [
    ({"qlora": True}, "--qlora=True takes effect only with LoRA"),
    ({"lora_modules_to_save": ["lm_head"]}, "takes effect only with LoRA"),
    ({"lora_r": 8, "bf16_weights": True}, "--bf16_weights=True does not combine"),
    ({"lora_r": 8, "freeze_embeddings": True}, "--lora_modules_to_save=embed_tokens,lm_head"),
    ({"lora_r": 8, "qlora": True, "mixed_precision": "no"}, "computes in bf16"),
    ({"lora_r": 8, "qlora": True, "zero_stage": 3}, "DeepSpeed cannot shard"),
])
def test_contradicting_adapter_settings(values, needle):
    from config import TrainConfig
    from lowmem.model.adapters import check_lora_config

    with pytest.raises(UserError, match=needle) as info:
        check_lora_config(TrainConfig(**values))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("values, needle", [
    ({"lora_target_modules": ["q_prj"]}, "no Linear named 'q_prj'; closest: q_proj"),
    ({"lora_target_modules": ["lm_head"]}, "shares with the input embedding"),
    ({"lora_modules_to_save": ["embed"]}, "no Module named 'embed'"),
])
def test_module_names_are_checked_against_the_model(tokenizer_dir, values, needle):
    from config import TrainConfig
    from lowmem.model.adapters import apply_lora

    cfg = TrainConfig(tokenizer_dir=tokenizer_dir, lora_r=4, **values)
    with pytest.raises(UserError, match=needle):
        apply_lora(seeded_base(cfg), cfg)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a CUDA machine QLoRA runs (test_qlora_trains_on_a_gpu)")
def test_qlora_on_cpu_is_a_one_line_error(tmp_path, tokenizer_dir, qa_files):
    cfg = tiny_config(tmp_path, tokenizer_dir, qa_files, lora_r=8, qlora=True, max_steps=2)
    result = cli_here(["train", *flags(cfg)], cwd=str(tmp_path))
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--qlora=True cannot run here: it needs a CUDA GPU" in errors[0]
    assert "Traceback" not in result.stderr and not os.path.exists(cfg.checkpoint_dir())


def test_nf4_base_dequantises_into_the_merged_weights(tokenizer_dir):
    """QLoRA's pieces on CPU: the blocks' linear weights become frozen NF4, LoRA trains on top, the merge
    dequantises them (close to the bf16 originals) and adds the adapters."""
    pytest.importorskip("torchao")
    from peft import LoraConfig, get_peft_model

    from config import TrainConfig
    from lowmem.model.adapters import base_state_dict, default_target_modules, lora_merges, nf4_type, quantize_to_nf4

    cfg = TrainConfig(tokenizer_dir=tokenizer_dir)
    model = seeded_base(cfg)  # fp32 around the NF4 weights: CPU matmuls have no bf16 autocast here
    original = {k: v.clone() for k, v in model.state_dict().items()}
    targets = default_target_modules(model)
    assert quantize_to_nf4(model) == 4 * 7
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # peft asks the deprecated name
        peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    frozen = [p for n, p in peft_model.named_parameters() if isinstance(p, nf4_type())]
    assert len(frozen) == 4 * 7 and not any(p.requires_grad for p in frozen)
    peft_model.train()
    for param in (p for n, p in peft_model.named_parameters() if "lora_B" in n):
        torch.nn.init.normal_(param, std=0.02)  # as if trained: B no longer zero
    ids = torch.randint(0, 100, (2, 16))
    peft_model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in peft_model.named_parameters() if "lora_" in n)
    state = peft_model.state_dict()
    merged = base_state_dict(state, lora_merges(peft_model))
    assert merged.keys() == original.keys()
    for name, weight in merged.items():
        assert not isinstance(weight, nf4_type())
        layer = f"base_model.model.{name[:-len('.weight')]}"
        if f"{layer}.lora_A.default.weight" not in state:
            assert torch.equal(weight, original[name]), name
            continue
        assert weight.dtype == torch.bfloat16  # what NF4 dequantises to
        dense = state[f"{layer}.base_layer.weight"].get_original_weight().float()
        relative = (dense - original[name].float()).norm() / original[name].float().norm()
        assert relative < 0.15  # NF4 keeps a weight to about 10% of its norm
        delta = 2.0 * state[f"{layer}.lora_B.default.weight"] @ state[f"{layer}.lora_A.default.weight"]
        torch.testing.assert_close(weight.float(), dense + delta, rtol=0, atol=2e-2)


@CUDA
def test_qlora_trains_on_a_gpu(tmp_path, tokenizer_dir, qa_files):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(tmp_path, tokenizer_dir, qa_files, **dict(LORA, qlora=True, max_steps=4, save_steps=2))
    run_in_process(cfg)
    steps = losses(cfg)
    assert sorted(steps) == [1, 2, 3, 4] and all(torch.isfinite(torch.tensor(v)) for v in steps.values())
    assert "adapter_model.safetensors" in os.listdir(os.path.join(newest_checkpoint(cfg), "model"))
    exported = safetensors(os.path.join(cfg.final_dir(), "model.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in exported.values())  # the base dequantised to bf16
    model = AutoModelForCausalLM.from_pretrained(cfg.final_dir()).cuda()
    assert torch.isfinite(logits(model, torch.tensor([[1, 2, 3, 4]], device="cuda"))).all()


# --- two processes over gloo -----------------------------------------------------------------------------------

def _launch(config_file: str, cfg, tmp_path) -> str:
    from lowmem.run.distributed import free_port

    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                os.path.join(REPO, "accelerate_configs", config_file), "--num_processes", "2",
                "--main_process_port", str(free_port())]
    result = cli(["train", *flags(cfg)], launcher=launcher, cwd=str(tmp_path), timeout=1800)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout + result.stderr


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < 2, reason="needs two GPUs on CUDA")
@pytest.mark.parametrize("config_file", ["cpu.yaml", "deepspeed_zero3.yaml"])
def test_two_processes_train_and_export(tmp_path, llama_dir, qa_files, config_file):
    """Two processes x 4 samples end where one process x 8 samples does after 4 straight steps, and the merged export
    loads: data parallel in one launch; ZeRO-3, whose adapters are sharded, as 2 steps + resume + 2 (a data-parallel
    resume restores what one process saved: tests/test_resume.py resumes two processes)."""
    if config_file.startswith("deepspeed"):
        pytest.importorskip("deepspeed")
    from transformers import AutoModelForCausalLM

    # no dropout: one process draws other masks than two (the resume's own exactness is tested with dropout above)
    options = dict(LORA, learn_rate=1e-3, warmup_steps=2, lr_scheduler="constant", mixed_precision="no",
                   save_steps=2, train_file=qa_files["train_file"], finetune_from_ckp_file=llama_dir, lora_dropout=0.0)
    straight = tiny_config(tmp_path / "straight", "", {}, **dict(options, max_steps=4, batch_size_per_gpu=8))
    sharded = config_file.startswith("deepspeed")
    halves = tiny_config(tmp_path / "halves", "", {}, **dict(options, max_steps=2 if sharded else 4,
                                                             batch_size_per_gpu=4))
    run_in_process(straight)
    _launch(config_file, halves, tmp_path)
    if sharded:
        assert "resumed from" in _launch(config_file, dataclasses.replace(halves, max_steps=4, is_keep_training=True),
                                         tmp_path)
    assert "adapter_model.safetensors" in os.listdir(os.path.join(newest_checkpoint(halves), "model"))
    ref, got = losses(straight), losses(halves)
    assert sorted(got) == [1, 2, 3, 4] and [got[k] for k in got] == pytest.approx([ref[k] for k in got], rel=1e-5)
    a = safetensors(os.path.join(straight.final_dir(), "model.safetensors"))
    b = safetensors(os.path.join(halves.final_dir(), "model.safetensors"))
    assert a.keys() == b.keys() and all(t.numel() for t in b.values())  # gathered, not ZeRO-3 placeholders
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6)
    model = AutoModelForCausalLM.from_pretrained(halves.final_dir())
    assert torch.isfinite(logits(model, torch.tensor([[1, 2, 3, 4]]))).all()
