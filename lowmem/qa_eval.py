"""Exact-match accuracy of greedy answers on a prompt/response file (the demo's held-out questions)."""
from __future__ import annotations

import pyarrow.parquet as pq

from .generate import GenerationOptions, generate_batch


def exact_match_on_file(model, tokenizer, path: str, max_rows: int, max_seq_len: int, batch_size: int = 32) -> float:
    """Share of the first max_rows rows whose greedy answer equals the response (stripped)."""
    table = pq.read_table(path, columns=["prompt", "response"]).slice(0, max_rows)
    prompts, answers = table.column("prompt").to_pylist(), table.column("response").to_pylist()
    longest = max(len(tokenizer(a)["input_ids"]) for a in answers)
    options = GenerationOptions(max_new_tokens=longest + 4, greedy=True)
    predictions = generate_batch(model, tokenizer, prompts, options, batch_size=batch_size)
    return sum(p.strip() == a.strip() for p, a in zip(predictions, answers)) / max(len(answers), 1)
