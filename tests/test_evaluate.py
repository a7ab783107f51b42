"""Perplexity against a plain torch loop, BLEU-4 against hand-computed values, generation metrics, CLI."""
from __future__ import annotations

import json
import math

import pytest
import torch
from test_generate import dirs, llama, t5  # noqa: F401  (module fixtures shared with the generation tests)

from lowmem.cli import infer as cli_generate
from lowmem.data.template import IGNORE_INDEX, encode_example
from lowmem.infer.evaluate import bleu_tokenize, corpus_bleu, evaluate_loss, generation_metrics
from lowmem.infer.generate import GenerationOptions, generate_batch
from lowmem.run.errors import UserError

ROWS = [("the cat", "sat on the mat"), ("a dog ran in the park and " * 6, "猫在山上"),
        ("hello", "world, how are you"), ("What is 1 + 2?", "3"), ("倒序：书 雨 花", "花 雨 书")]
TEXTS = ["the cat sat on the mat", "hello world, how are you " * 8, "猫在山上 狗在水里"]


def write_jsonl(path, rows: list[dict]) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return str(path)


def write_parquet(path, columns: dict) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), str(path), row_group_size=2)
    return str(path)


def plain_perplexity(model, examples: list[tuple[list[int], list[int]]], enc_dec: bool) -> tuple[float, int]:
    """exp(mean token loss), one unpadded example at a time, log-softmax in float64."""
    total, count = 0.0, 0
    with torch.no_grad():
        for input_ids, labels in examples:
            if enc_dec:
                logits = model(input_ids=torch.tensor([input_ids]), labels=torch.tensor([labels])).logits[0]
                targets = torch.tensor(labels)
            else:
                logits = model(input_ids=torch.tensor([input_ids])).logits[0, :-1]
                targets = torch.tensor(labels[1:])
            keep = targets != IGNORE_INDEX
            log_probs = torch.log_softmax(logits.double(), dim=-1)[keep]
            total -= log_probs.gather(1, targets[keep][:, None]).sum().item()
            count += int(keep.sum())
    return math.exp(total / count), count


@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_prompt_response_perplexity_equals_plain_loop(kind, request, tmp_path):
    model, tokenizer = request.getfixturevalue(kind)
    enc_dec = kind == "t5"
    path = write_parquet(tmp_path / "qa.parquet", {"prompt": [p for p, _ in ROWS], "response": [r for _, r in ROWS]})
    result = evaluate_loss(model, tokenizer, path, max_seq_len=40, batch_size=2)
    examples = [encode_example(tokenizer, p, r, 40, is_encoder_decoder=enc_dec) for p, r in ROWS]
    expected, tokens = plain_perplexity(model, [(e.input_ids, e.labels) for e in examples], enc_dec)
    assert result["tokens"] == tokens and result["examples"] == len(ROWS)
    assert result["perplexity"] == pytest.approx(expected, rel=1e-5)
    assert result["loss"] == pytest.approx(math.log(expected), rel=1e-5)
    assert result.get("truncated_prompt") == 1  # the long prompt was cut to fit 40 tokens


def test_text_perplexity_counts_every_token(llama, tmp_path):
    model, tokenizer = llama
    path = write_jsonl(tmp_path / "texts.jsonl", [{"text": t} for t in TEXTS])
    result = evaluate_loss(model, tokenizer, path, max_seq_len=64, batch_size=3)
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in TEXTS]
    expected, tokens = plain_perplexity(model, [(ids[:64], ids[:64]) for ids in encoded], False)
    assert result["tokens"] == tokens == sum(min(len(ids), 64) - 1 for ids in encoded)
    assert result["perplexity"] == pytest.approx(expected, rel=1e-5)


def test_bad_evaluation_inputs(llama, t5, tmp_path):
    model, tokenizer = llama
    with pytest.raises(UserError, match="does not exist"):
        evaluate_loss(model, tokenizer, str(tmp_path / "missing.parquet"), 32, 2)
    wrong = write_jsonl(tmp_path / "wrong.jsonl", [{"question": "hi"}])
    with pytest.raises(UserError, match="prompt\\+response, prompt\\+chosen\\+rejected, or text"):
        evaluate_loss(model, tokenizer, wrong, 32, 2)
    texts = write_jsonl(tmp_path / "texts.jsonl", [{"text": "the cat"}])
    with pytest.raises(UserError, match="T5"):
        evaluate_loss(*t5, texts, 32, 2)
    with pytest.raises(UserError, match="prompt and response"):
        generation_metrics(model, tokenizer, texts)
    with pytest.raises(UserError, match="does not exist"):
        cli_generate.evaluate(str(tmp_path / "no_model"), texts)


def test_bleu_tokenization():
    assert bleu_tokenize("猫dog  狗, ok?") == ["猫", "dog", "狗", ",", "ok?"]
    assert bleu_tokenize("What is 1 + 2?") == ["What", "is", "1", "+", "2?"]


def test_bleu_matches_hand_computed_values():
    ref = "the cat sat on the mat"
    # hypothesis much longer than the reference: BP = 1 and every clipped precision <= 1
    long_hyp = "the cat sat on the mat and the dog sat on the mat too"  # 14 tokens against 6
    long = corpus_bleu([long_hyp], [ref])
    assert long["precisions"] == pytest.approx([6 / 14, 5 / 13, 4 / 12, 3 / 11])
    assert long["brevity_penalty"] == 1.0
    assert long["bleu"] == pytest.approx((6 / 14 * 5 / 13 * 4 / 12 * 3 / 11) ** 0.25)
    assert long["bleu"] <= 1.0
    repeated = corpus_bleu([" ".join([ref] * 20)], [ref])  # the original project's BLEU went above 1 here
    assert 0 < repeated["bleu"] <= 1.0
    # a short hypothesis whose n-grams all match: only the brevity penalty exp(1 - 6/4) applies
    short = corpus_bleu(["the cat sat on"], [ref])
    assert short["precisions"] == [1.0, 1.0, 1.0, 1.0]
    assert short["brevity_penalty"] == pytest.approx(math.exp(1 - 6 / 4))
    assert short["bleu"] == pytest.approx(math.exp(-0.5))
    # corpus level: matches and counts are summed before dividing, lengths summed before BP
    both = corpus_bleu([long_hyp, "the cat sat on"], [ref, ref])
    assert both["bleu"] == pytest.approx((10 / 18 * 8 / 16 * 6 / 14 * 4 / 12) ** 0.25)
    # Chinese is scored per character: 4 of 5 characters, all n-grams matching
    cjk = corpus_bleu(["猫在山上"], ["猫在山上吗"])
    assert cjk["bleu"] == pytest.approx(math.exp(1 - 5 / 4))
    assert corpus_bleu([ref], [ref])["bleu"] == pytest.approx(1.0)
    assert corpus_bleu(["the cat ran"], [ref])["bleu"] == 0.0  # no 4-gram in common, no smoothing
    assert corpus_bleu([""], [ref])["bleu"] == 0.0


def test_generation_metrics_exact_match(llama, tmp_path):
    model, tokenizer = llama
    options = GenerationOptions(max_new_tokens=6, greedy=True)
    prompts = [p for p, _ in ROWS[:4]]
    predictions = generate_batch(model, tokenizer, prompts, options)
    references = [predictions[0], "no", predictions[2], "nope"]  # two rows answered exactly
    path = write_jsonl(tmp_path / "qa.jsonl", [{"prompt": p, "response": r} for p, r in zip(prompts, references)])
    metrics = generation_metrics(model, tokenizer, path, options, batch_size=3)
    assert metrics["examples"] == 4 and metrics["exact_match"] == 0.5
    assert metrics["bleu4"] == pytest.approx(corpus_bleu([p.strip() for p in predictions],
                                                         [r.strip() for r in references])["bleu"])
    assert 0.0 <= metrics["bleu4"] <= 1.0


def test_cli_evaluate_writes_json(dirs, llama, tmp_path, capsys):
    path = write_parquet(tmp_path / "qa.parquet", {"prompt": [p for p, _ in ROWS], "response": [r for _, r in ROWS]})
    cli_generate.evaluate(dirs["llama"], path, max_seq_len=48, batch_size=4, generation_metrics=True,
                          max_new_tokens=4)
    written = json.load(open(tmp_path / "qa.eval.json", encoding="utf-8"))
    direct = evaluate_loss(*llama, path, max_seq_len=48, batch_size=1)
    assert written["perplexity"] == pytest.approx(direct["perplexity"], rel=1e-5)
    assert written["tokens"] == direct["tokens"]
    assert set(written["generation"]) >= {"exact_match", "bleu4", "examples"}
    assert '"perplexity"' in capsys.readouterr().out


def test_token_file_windows(dirs, llama, t5, tmp_path, capsys):
    from lowmem.data.token_file import TokenFile, tokenize_to_bin

    model, tokenizer = llama
    source = write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in TEXTS * 3])
    prefix = str(tmp_path / "tokens")
    tokenize_to_bin(source, prefix, dirs["tokenizer"], num_workers=1)
    ids = []
    for text in TEXTS * 3:  # documents, each followed by eos
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert TokenFile(prefix).tokens.tolist() == ids
    seq = 16
    windows = [ids[i:i + seq] for i in range(0, len(ids), seq) if len(ids[i:i + seq]) >= 2]
    assert len(ids) % seq != 0  # the shorter last window is scored too
    expected, tokens = plain_perplexity(model, [(w, w) for w in windows], False)
    for name in (prefix + ".bin", prefix + ".json", prefix):
        result = evaluate_loss(model, tokenizer, name, max_seq_len=seq, batch_size=4)
        assert result["tokens"] == tokens == sum(len(w) - 1 for w in windows)
        assert result["perplexity"] == pytest.approx(expected, rel=1e-5)
    with pytest.raises(UserError, match="T5"):
        evaluate_loss(*t5, prefix + ".bin", 16, 2)


def write_token_file(prefix: str, ids: list[int], index: dict) -> str:
    """A packed token file written by hand: uint16 ids and an index with the given fields."""
    import numpy as np

    np.asarray(ids, dtype="<u2").tofile(prefix + ".bin")
    with open(prefix + ".json", "w", encoding="utf-8") as f:
        json.dump({"format_version": 1, "dtype": "uint16", "n_tokens": len(ids), "n_documents": 1, "eos_token_id": 1,
                   "complete": True, **index}, f)
    return prefix + ".bin"


def test_token_ids_beyond_the_model_vocabulary_are_refused_before_scoring(dirs, llama, tmp_path):
    model, tokenizer = llama
    vocab = model.get_input_embeddings().num_embeddings
    ids = [5, 6, 7, vocab + 100] * 8  # written with a larger tokenizer
    path = write_token_file(str(tmp_path / "big"), ids, {"vocab_size": vocab + 200, "max_token_id": vocab + 100})
    with pytest.raises(UserError, match=f"was made with a vocabulary of {vocab + 200} entries, but the model has "
                                        f"{vocab}"):
        cli_generate.evaluate(dirs["llama"], path, max_seq_len=8)
    path = write_token_file(str(tmp_path / "small"), ids, {"vocab_size": vocab})  # an index that understates
    with pytest.raises(UserError, match=f"the index says vocab_size {vocab} but the file holds id {vocab + 100}"):
        evaluate_loss(model, tokenizer, path, max_seq_len=8)
    path = write_token_file(str(tmp_path / "lying"), ids, {"vocab_size": vocab, "max_token_id": 7})
    with pytest.raises(UserError, match=f"gives token id {vocab + 100}, but the model's vocabulary has {vocab}"):
        evaluate_loss(model, tokenizer, path, max_seq_len=8)  # a wrong max_token_id is caught before the model
