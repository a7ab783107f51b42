"""Offline evaluation of a trained model: token loss / perplexity on a file, and generation metrics.

Loss files: parquet or jsonl with `prompt`/`response` (loss on response tokens only, encoded exactly as
SFT training encodes them) or with `text` (loss on every token), or a packed token file
`<prefix>.bin` + `<prefix>.json` cut into non-overlapping windows of max_seq_len. Files are read in
a streaming way, so memory does not grow with their size.

Perplexity is exp(summed token loss / number of predicted tokens) over the whole file, not a mean of
per-batch perplexities.

BLEU-4 here is corpus-level BLEU (Papineni et al. 2002) with one reference per example and no
smoothing: for n = 1..4 the clipped n-gram matches and the hypothesis n-gram counts are summed over
the whole corpus, p_n = matches_n / count_n, the score is BP * exp(mean_n log p_n) with the brevity
penalty BP = 1 if c > r else exp(1 - r / c) (c, r: total hypothesis and reference lengths). Text is
tokenized by whitespace, except that every CJK character (Chinese, Japanese kana, Korean syllables,
full-width punctuation) is a token of its own. Every p_n <= 1 and BP <= 1, so the score is in [0, 1].
"""
from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ..data.template import IGNORE_INDEX
from ..run.errors import UserError

CJK = "\u3000-\u303f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef"
BLEU_TOKEN = re.compile(f"[{CJK}]|[^\\s{CJK}]+")


# ---------------------------------------------------------------- reading files

def token_file_path(path: str) -> str | None:
    """The .bin of a packed token file named by its .bin, its .json or its prefix; None for other files."""
    if path.endswith(".bin"):
        return path
    if path.endswith(".json") and os.path.isfile(path[: -len(".json")] + ".bin"):
        return path[: -len(".json")] + ".bin"
    if not os.path.splitext(path)[1] and os.path.isfile(path + ".bin"):
        return path + ".bin"
    return None


def open_file(path: str, max_seq_len: int = 512, tokenizer=None, is_encoder_decoder: bool = False):
    """One data file (or dir, glob, list) through the data registry, in file order: a sources.Dataset."""
    from ..data.options import DataOptions
    from ..data.sources import open_dataset, parse_data_arg

    specs = parse_data_arg(path, "file")
    if len(specs) != 1:
        raise UserError(f"'{path}' names a weighted mixture; evaluate one dataset at a time")
    return open_dataset(specs[0], DataOptions(max_seq_len=max_seq_len), tokenizer, is_encoder_decoder, shuffle=False,
                        flag="file", log=lambda _: None)


def iter_rows(path: str, columns: Iterable[str] | None = None, tokenizer=None) -> Iterator[dict]:
    """Rows of a data file as dicts with canonical keys (prompt, response, text, messages, ...), in file order."""
    dataset = open_file(path, tokenizer=tokenizer)
    if dataset.kind in ("tokens", "sft_cache"):
        raise UserError(f"'{path}' is a {dataset.kind.replace('_', ' ')} file; pass a parquet or jsonl file")
    if columns is not None and not set(columns) & _KIND_KEYS[dataset.kind]:
        raise UserError(f"'{path}' holds {dataset.kind.replace('_', '/')} data; this needs {' and '.join(columns)} "
                        "columns (name them with --prompt_column/--response_column)")
    for index in range(dataset.source.num_samples):
        row = dataset.source.sample(0, index)
        if "_skip" not in row:
            yield row


_KIND_KEYS = {"prompt_response": {"prompt", "response"}, "records": {"prompt", "response"}, "prompts": {"prompt"},
             "text": {"text"},
              "messages": {"messages"}, "sharegpt": {"conversations"}}


# ---------------------------------------------------------------- loss and perplexity

def _samples(dataset, max_seq_len: int) -> Iterator[dict]:
    """The samples of an opened dataset in file order."""
    if dataset.kind == "tokens":  # every token is scored: windows in file order, the shorter last one too
        for file in dataset.source.files:
            tokens = file.tokens
            for start in range(0, len(tokens), max_seq_len):
                window = np.asarray(tokens[start:start + max_seq_len], dtype=np.int64)
                if len(window) >= 2:  # a window of one token predicts nothing
                    yield {"input_ids": window}
        return
    for index in range(dataset.source.num_samples):
        yield dataset.source.sample(0, index)


def summed_loss(model, tensors: dict, is_encoder_decoder: bool) -> torch.Tensor:
    """Sum of the token cross-entropies of a padded batch (labels IGNORE_INDEX where nothing counts)."""
    labels = tensors["labels"]
    if is_encoder_decoder:
        logits = model(input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"], labels=labels).logits
        target = labels
    else:
        logits = model(input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"]).logits[:, :-1]
        target = labels[:, 1:]
    return F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def evaluate_loss(model, tokenizer, file: str, max_seq_len: int, batch_size: int = 8,
                  max_examples: int | None = None) -> dict:
    """{"loss", "perplexity", "tokens", "examples", ...} of the model on a data file."""
    from ..data.batches import collate
    from ..data.encoding import SampleEncoder, Skipped
    from .generate import eval_mode, is_encoder_decoder

    if max_seq_len < 2 or batch_size < 1:
        raise UserError(f"--max_seq_len={max_seq_len} must be >= 2 and --batch_size={batch_size} >= 1")
    enc_dec = is_encoder_decoder(model)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoder = SampleEncoder(tokenizer, max_seq_len, is_encoder_decoder=enc_dec, source=file)
    skipped: Counter = Counter()
    total, tokens, examples = 0.0, 0, 0

    def run(pending: list) -> None:
        nonlocal total, tokens
        batch = collate(pending, pad_id, enc_dec, position=0)
        largest = max(int(batch.tensors[k].max()) for k in ("input_ids", "labels"))
        if largest >= vocab_size:  # the embedding would fail with an IndexError deep inside the model
            raise UserError(f"'{file}' gives token id {largest}, but the model's vocabulary has {vocab_size} entries; "
                            "evaluate with the tokenizer the model was trained with")
        tensors = {k: v.to(device) for k, v in batch.tensors.items()}
        total += float(summed_loss(model, tensors, enc_dec).double())
        tokens += batch.loss_units

    if enc_dec and token_file_path(file) is not None:
        raise UserError(f"'{file}' is a packed token file, which only decoder models read; evaluate T5 on a "
                        "prompt/response file")
    vocab_size = model.get_input_embeddings().num_embeddings
    dataset = open_file(file, max_seq_len, tokenizer, enc_dec)
    if hasattr(dataset.source, "check_ids"):  # token files: refused before scoring, as training refuses them
        dataset.source.check_ids(vocab_size)
    pending: list = []
    with eval_mode(model), torch.no_grad():
        for position, sample in enumerate(_samples(dataset, max_seq_len)):
            if max_examples and position >= max_examples:
                break
            if "_skip" in sample:
                skipped[f"skipped_{sample['_skip']}"] += 1
                continue
            encoded = encoder.encode_many([sample], [position])[0]
            if isinstance(encoded, Skipped):
                skipped[f"skipped_{encoded.reason}"] += 1
                continue
            skipped.update(encoded.notes)
            examples += 1
            pending.append(encoded)
            if len(pending) == batch_size:
                run(pending)
                pending = []
        if pending:
            run(pending)
    if tokens == 0:
        raise UserError(f"'{file}' gave no tokens to score (empty, or every row skipped: {dict(skipped)}); "
                        "check the file and --max_seq_len")
    loss = total / tokens
    return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else float("inf"), "tokens": tokens,
            "examples": examples, "file": file, "max_seq_len": max_seq_len, **dict(skipped)}


# ---------------------------------------------------------------- BLEU and exact match

def bleu_tokenize(text: str) -> list[str]:
    """Whitespace-separated words, with each CJK character a token of its own."""
    return BLEU_TOKEN.findall(text)


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def corpus_bleu(hypotheses: list[str], references: list[str], max_n: int = 4) -> dict:
    """Corpus-level BLEU-max_n, one reference per hypothesis (see the module docstring)."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    matches, counts = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for hypothesis, reference in zip(hypotheses, references):
        hyp, ref = bleu_tokenize(hypothesis), bleu_tokenize(reference)
        hyp_len, ref_len = hyp_len + len(hyp), ref_len + len(ref)
        for n in range(1, max_n + 1):
            hyp_grams, ref_grams = _ngrams(hyp, n), _ngrams(ref, n)
            matches[n - 1] += sum(min(count, ref_grams[gram]) for gram, count in hyp_grams.items())
            counts[n - 1] += sum(hyp_grams.values())
    precisions = [m / c if c else 0.0 for m, c in zip(matches, counts)]
    if hyp_len == 0:
        brevity = 0.0
    else:
        brevity = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    score = brevity * math.exp(sum(math.log(p) for p in precisions) / max_n) if min(precisions) > 0 else 0.0
    return {"bleu": score, "precisions": precisions, "brevity_penalty": brevity,
            "hypothesis_length": hyp_len, "reference_length": ref_len}


def generation_metrics(model, tokenizer, file: str, options=None, batch_size: int = 8,
                       max_examples: int | None = None, n_samples: int = 5, progress: str | None = None) -> dict:
    """Exact-match rate and corpus BLEU-4 of generated answers against a prompt/response file.

    `progress`: a description shows a progress bar over the prompts (the end-of-run test answering).
    """
    from .generate import GenerationOptions, iter_generate

    options = options or GenerationOptions(greedy=True)
    prompts, references = [], []
    for row in iter_rows(file, ("prompt", "response"), tokenizer):
        if max_examples and len(prompts) >= max_examples:
            break
        if isinstance(row.get("prompt"), str) and isinstance(row.get("response"), str):
            prompts.append(row["prompt"])
            references.append(row["response"])
    if not prompts:
        raise UserError(f"'{file}' has no prompt/response rows to generate from")
    from tqdm import tqdm

    with tqdm(total=len(prompts), desc=progress, unit="prompt", disable=progress is None, dynamic_ncols=True) as bar:
        predictions = list(iter_generate(model, tokenizer, prompts, options, batch_size, on_batch=bar.update))
    exact = sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / len(prompts)
    bleu = corpus_bleu([p.strip() for p in predictions], [r.strip() for r in references])
    samples = [{"prompt": p, "reference": r, "prediction": h}
               for p, r, h in list(zip(prompts, references, predictions))[:n_samples]]
    return {"examples": len(prompts), "exact_match": exact, "bleu4": bleu["bleu"], "bleu_details": bleu,
            "samples": samples}


def write_json(result: dict, path: str) -> None:
    """Write results atomically (a temp file renamed into place)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)
