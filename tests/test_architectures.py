"""Chat models of the families users bring (Llama, Qwen2, Qwen3, Mistral), each a tiny random-weight model saved
in a local directory with a tokenizer carrying a template of that family's shape: fine-tuned in full and with
LoRA on conversations ({"messages": ...} jsonl), and the export round-trips through plain transformers."""
from __future__ import annotations

import json
import os
import random

import pytest
import torch
from conftest import LLAMA31, LLAMA_SPECIALS, MISTRAL, QWEN3, QWEN25, family_tokenizer, run_in_process, tiny_config

# family: (transformers config class, template, tokenizer roles and added tokens, tied embeddings, end of turn)
FAMILIES = {
    "llama": ("LlamaConfig", LLAMA31, dict(specials=LLAMA_SPECIALS, bos_token="<|begin_of_text|>",
                                          eos_token="<|end_of_text|>"), False, "<|eot_id|>"),
    "qwen2": ("Qwen2Config", QWEN25, dict(eos_token="<|endoftext|>"), True, "<|im_end|>"),
    "qwen3": ("Qwen3Config", QWEN3, dict(plain=["<think>", "</think>"], eos_token="<|im_end|>"), True, "<|im_end|>"),
    "mistral": ("MistralConfig", MISTRAL, dict(specials=["<s>", "</s>", "[INST]", "[/INST]"], bos_token="<s>",
                                               eos_token="</s>"), False, "</s>"),
}
WORDS = ["cat", "dog", "sun", "moon", "tree", "river", "stone", "猫", "狗", "山", "水", "花"]
NEW_TOKEN = "<|tool|>"  # a special token the fine-tuning tokenizer adds: the embeddings grow by one row


def save_family_model(root, family: str, base_tokenizer: str) -> str:
    """A tiny random-weight model of the family and its tokenizer, saved where --finetune_from_ckp_file finds it."""
    import transformers

    config_name, template, roles, tied, _ = FAMILIES[family]
    tokenizer = family_tokenizer(base_tokenizer, template, **roles)
    ids = {f"{role}_token_id": getattr(tokenizer, f"{role}_token_id") for role in ("bos", "eos", "pad")}
    config = getattr(transformers, config_name)(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, tie_word_embeddings=tied, **ids)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    path = str(root / family)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_conversations(path, n: int = 24, seed: int = 0) -> str:
    """OpenAI-style conversations of one to three exchanges, some with a system message."""
    rng = random.Random(seed)
    text = lambda: " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 5)))  # noqa: E731
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            messages = [{"role": "system", "content": text()}] if i % 3 == 0 else []
            for _ in range(rng.randint(1, 3)):
                messages += [{"role": "user", "content": text()}, {"role": "assistant", "content": text()}]
            f.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
    return str(path)


def grown_tokenizer(model_dir: str, root) -> str:
    """The model's tokenizer plus one new special token, saved on its own (the run's --tokenizer_dir)."""
    from transformers import AddedToken, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.add_tokens([AddedToken(NEW_TOKEN, special=True, normalized=False)], special_tokens=True)
    path = str(root / "grown_tokenizer")
    tokenizer.save_pretrained(path)
    return path


def chat_ids(tokenizer, messages) -> dict:
    # transformers 5 returns a dict (input_ids, attention_mask) when asked for tensors
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("families")
    return {family: save_family_model(root, family, tiny_tokenizer) for family in FAMILIES}, \
        write_conversations(root / "chats.jsonl")


CASES = [(family, mode) for family in FAMILIES for mode in ("full", "lora")]


@pytest.mark.parametrize("family, mode", CASES, ids=[f"{f}-{m}" for f, m in CASES])
def test_fine_tune_a_local_chat_model_and_round_trip_its_export(family_dirs, tmp_path, family, mode, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowmem.infer.generate import GenerationOptions, generate_text, load_for_inference

    dirs, chats = family_dirs
    model_dir, grows = dirs[family], mode == "lora" and family in ("llama", "qwen2")  # untied and tied embeddings
    tokenizer_dir = grown_tokenizer(model_dir, tmp_path) if grows else ""  # "": the model directory's own
    lora = dict(lora_r=4, lora_alpha=8.0) if mode == "lora" else {}
    cfg = tiny_config(tmp_path, tokenizer_dir, {"train_file": chats, "validation_file": ""},
                      finetune_from_ckp_file=model_dir, max_seq_len=128, batch_size_per_gpu=4, max_steps=4,
                      save_steps=4, warmup_steps=1, learn_rate=1e-2, **lora)
    summary = run_in_process(cfg)
    assert summary["step"] == 4
    assert ("train in full too" in capsys.readouterr().out) == grows  # the one-line notice
    final = cfg.final_dir()
    tokenizer = AutoTokenizer.from_pretrained(final)
    model = AutoModelForCausalLM.from_pretrained(final).eval()  # plain transformers, no peft
    assert type(model).__name__ == FAMILIES[family][0].replace("Config", "ForCausalLM")
    assert model.get_input_embeddings().num_embeddings == len(tokenizer) == \
        len(AutoTokenizer.from_pretrained(model_dir)) + grows
    assert tokenizer.chat_template == FAMILIES[family][1]
    end_of_turn = tokenizer.convert_tokens_to_ids(FAMILIES[family][4])
    stops = model.generation_config.eos_token_id
    assert end_of_turn in (stops if isinstance(stops, list) else [stops])
    assert model.generation_config.pad_token_id is not None
    messages = [{"role": "user", "content": "cat dog sun"}]
    inputs = chat_ids(tokenizer, messages)
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():  # the fine-tuning changed what the model computes
        before, after = base(**inputs).logits, model(**inputs).logits[..., :base.config.vocab_size]
    assert (before - after).abs().max() > 1e-3
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=8)
    plain = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    ours = generate_text(*load_for_inference(final), "cat dog sun", GenerationOptions(max_new_tokens=8, greedy=True))
    assert ours == plain
    checkpoint = os.path.join(cfg.checkpoint_dir(), "step_00000004", "model")
    if mode == "full":
        from safetensors.torch import load_file

        saved, exported = load_file(os.path.join(checkpoint, "model.safetensors")), model.state_dict()
        assert all(torch.equal(saved[k], exported[k]) for k in saved)
        return
    from lowmem.model.adapters import load_merged

    with open(os.path.join(checkpoint, "adapter_config.json"), encoding="utf-8") as f:
        adapter = json.load(f)
    assert adapter["base_model_name_or_path"] == os.path.abspath(model_dir)
    from safetensors.torch import load_file

    trained_in_full = {k.rsplit(".", 2)[-2] for k in load_file(os.path.join(checkpoint, "adapter_model.safetensors"))
                       if ".lora_" not in k}
    assert trained_in_full == ({"embed_tokens", "lm_head"} if grows else set())
    with_peft = load_merged(checkpoint, torch.float32, len(tokenizer)).eval()  # peft's own merge, on the base dir
    ids = inputs["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, with_peft(input_ids=ids).logits, rtol=0, atol=1e-5)
