"""Shared pieces of the benchmarks: synthetic tokenizer and token file, one training run per subprocess.

Each measured run happens in a fresh Python process (`python bench/benchlib.py '<json spec>'`) so
that peak memory, compile caches in memory and CUDA out-of-memory failures of one run do not leak
into the next. The worker prints one line `BENCH_RESULT <json>` that the drivers parse.

Two trainers are driven on the same model and the same token file:
- "lowmem": `lowmem.train.loop.train(TrainConfig)` (this project's loop),
- "hf": `transformers.Trainer` on a Dataset of the same fixed-length windows.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

VOCAB = 32000
for _key, _value in (("TQDM_DISABLE", "1"), ("TOKENIZERS_PARALLELISM", "false"), ("TRANSFORMERS_VERBOSITY", "error")):
    os.environ.setdefault(_key, _value)  # before transformers/tqdm are imported
RESULT_TAG = "BENCH_RESULT "


# ----------------------------------------------------------------------------------------------
# synthetic assets
# ----------------------------------------------------------------------------------------------
def make_tokenizer(out_dir: str, vocab_size: int = VOCAB) -> str:
    """A word-level tokenizer with exactly `vocab_size` entries (the project's special tokens first).

    The benchmarks feed token ids directly, so only len(tokenizer), pad and eos matter; a BPE
    tokenizer trained to 32k entries would need a large corpus for nothing.
    """
    if os.path.isfile(os.path.join(out_dir, "tokenizer.json")):
        return out_dir
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from lowmem.data.template import END_OF_TEXT, PAD, SPECIAL_TOKENS

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for i in range(len(vocab), vocab_size):
        vocab[f"t{i}"] = i
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=END_OF_TEXT, pad_token=PAD,
                                   unk_token=PAD, additional_special_tokens=SPECIAL_TOKENS[2:])
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(out_dir)
    assert len(fast) == vocab_size, len(fast)
    return out_dir


def make_token_file(prefix: str, n_tokens: int, vocab_size: int = VOCAB, eos_id: int = 1, seed: int = 0,
                    doc_len: int = 4095, tokenizer_dir: str = "") -> str:
    """`<prefix>.bin` + `.json` of a learnable synthetic stream: a random first-order Markov chain.

    Every token has 4 possible successors with probabilities .6/.2/.15/.05, so the best possible
    loss is about 1.06 nats while a fresh model starts near ln(vocab) = 10.4: optimizers can be
    compared by the loss they reach. Documents of `doc_len` tokens are separated by eos.
    """
    import numpy as np

    index_path, bin_path = prefix + ".json", prefix + ".bin"
    if os.path.isfile(index_path):
        with open(index_path) as f:
            index = json.load(f)
        if index.get("n_tokens", 0) >= n_tokens and index.get("vocab_size") == vocab_size and index.get("complete"):
            return bin_path
    rng = np.random.default_rng(seed)
    first = 4  # ids below are the special tokens
    successors = rng.integers(first, vocab_size, size=(vocab_size, 4))
    probs = np.array([0.6, 0.2, 0.15, 0.05])
    n_docs = -(-n_tokens // (doc_len + 1))
    out = np.empty((n_docs, doc_len + 1), dtype=np.uint16)
    state = rng.integers(first, vocab_size, size=n_docs)
    for t in range(doc_len):
        out[:, t] = state
        state = successors[state, rng.choice(4, size=n_docs, p=probs)]
    out[:, doc_len] = eos_id
    flat = out.reshape(-1)
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    flat.tofile(bin_path)
    index = {"format_version": 1, "dtype": "uint16", "n_tokens": int(flat.size), "n_documents": int(n_docs),
             "vocab_size": vocab_size, "eos_token_id": eos_id, "tokenizer_dir": os.path.abspath(tokenizer_dir),
             "source": "synthetic markov chain (bench/benchlib.py)", "complete": True}
    with open(index_path, "w") as f:
        json.dump(index, f, indent=1)
    return bin_path


# ----------------------------------------------------------------------------------------------
# the driver side
# ----------------------------------------------------------------------------------------------
def run_worker(spec: dict, timeout: float, log_path: str | None = None) -> dict:
    """Run one training in a subprocess; returns its result dict (ok / oom / error)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", TQDM_DISABLE="1", TOKENIZERS_PARALLELISM="false",
               TRANSFORMERS_VERBOSITY="error")
    cmd = [sys.executable, os.path.abspath(__file__), json.dumps(spec)]
    start = time.time()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=max(5.0, timeout))
        out, err, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        rc = "timeout"
    if log_path:
        with open(log_path, "a") as f:
            f.write(f"\n===== {json.dumps(spec)}\n--- rc={rc} wall={time.time() - start:.1f}s\n{out}\n--- stderr\n{err[-20000:]}\n")
    for line in reversed(out.splitlines()):
        if line.startswith(RESULT_TAG):
            result = json.loads(line[len(RESULT_TAG):])
            result["wall_s"] = round(time.time() - start, 1)
            return result
    text = (out + "\n" + err)
    oom = "out of memory" in text.lower() or "OutOfMemoryError" in text
    tail = [line for line in err.splitlines() if line.strip()][-3:]
    return {"ok": False, "oom": oom, "error": f"rc={rc}: " + " | ".join(tail)[-600:], "spec": spec,
            "wall_s": round(time.time() - start, 1)}


def fmt(value, spec: str = ".1f", missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def print_table(rows: list[list[str]], header: list[str], out=None) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["| " + " | ".join(str(h).ljust(w) for h, w in zip(header, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    text = "\n".join(lines)
    print(text, file=out or sys.stdout, flush=True)
    return text


# ----------------------------------------------------------------------------------------------
# the worker side
# ----------------------------------------------------------------------------------------------
def _ceiling(device: str) -> float:
    """Matmul ceiling in FLOP/s: bf16 8192^3 on CUDA (lowmem.train.metrics.peak_flops), fp32 1024^3 on CPU."""
    import torch

    if device == "cuda":
        from lowmem.train.metrics import peak_flops

        return peak_flops()
    n, reps = 1024, 5
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - start)


def _train_config(spec: dict, workdir: str):
    from config import TrainConfig

    cuda = spec["device"] == "cuda"
    return TrainConfig(
        run_name=spec["name"], output_dir=workdir, log_dir=workdir, train_file=spec["data"],
        validation_file="", test_file="", tokenizer_dir=spec["tokenizer_dir"], model_preset=spec["preset"],
        max_seq_len=spec["seq"], batch_size_per_gpu=spec["mb"], gradient_accumulation_steps=spec.get("ga", 1),
        epochs=1000, max_steps=spec["warmup"] + spec["steps"], learn_rate=spec.get("lr", 3e-4),
        warmup_steps=min(spec.get("lr_warmup", 10), spec["warmup"] + spec["steps"]), logging_steps=1, eval_steps=10**9, save_steps=10**9,
        report_to="none", test_generation_samples=0, torch_compile=spec.get("compile", False), overwrite_output_dir=True,
        use_liger_kernel=spec.get("liger", False), gradient_checkpointing=spec.get("grad_ckpt", False),
        optimizer=spec.get("optimizer", "adamw"), bf16_weights=spec.get("bf16_weights", False),
        mixed_precision=("bf16" if cuda else "no"), seed=spec.get("seed", 42),
        lora_r=spec.get("lora_r", 0), lora_alpha=spec.get("lora_alpha", 16.0), qlora=spec.get("qlora", False),
        max_gpu_memory_gb=spec.get("max_gpu_memory_gb", 0.0),
    )


def _build_on_device(original, device: str):
    """lowmem.model.build.build_model, but initialising the weights on the GPU (seconds instead of minutes for 7B)."""
    import torch

    def build(cfg, tokenizer):
        if device != "cuda":
            return original(cfg, tokenizer)
        start = time.time()
        with torch.device("cuda"):
            model = original(cfg, tokenizer)
        torch.cuda.synchronize()
        _TIMES["build_s"] = time.time() - start
        return model

    return build


_TIMES: dict = {}


def _compile_decoder_only(original):
    """apply_training_options, but with liger + torch_compile the decoder stack alone is compiled.

    Compiling the whole model traces liger's fused linear + cross-entropy, which fails in dynamo
    (torch 2.11, liger-kernel 0.8.5: addmm(out_dtype=..., out=...) on fake tensors); the lm_head and
    the loss run eagerly as liger's own kernels instead.
    """
    import dataclasses

    def apply(model, cfg, *args, **kwargs):
        if not (cfg.use_liger_kernel and cfg.torch_compile):
            return original(model, cfg, *args, **kwargs)
        model = original(model, dataclasses.replace(cfg, torch_compile=False), *args, **kwargs)
        model.get_decoder().compile() if hasattr(model, "get_decoder") else model.model.compile()
        return model

    return apply


def _peak_after_build(original):
    """apply_training_options, then the GPU peak restarts: the peak reported is training's, not building's
    (a QLoRA base is built in bf16 before it is quantised); the build's peak is kept as build_peak_gib."""
    import torch

    def apply(model, cfg, *args, **kwargs):
        model = original(model, cfg, *args, **kwargs)
        if torch.cuda.is_available():
            _TIMES["build_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()
        return model

    return apply


def _patch(module_names: tuple[str, ...], attr: str, make) -> None:
    """Replace `attr` in every listed module that has it (the trainer's layout moves between modules)."""
    import importlib

    for name in module_names:
        module = importlib.import_module(name)
        if hasattr(module, attr) and not getattr(getattr(module, attr), "_bench_patched", False):
            replacement = make(getattr(module, attr))
            replacement._bench_patched = True
            setattr(module, attr, replacement)


def _worker_lowmem(spec: dict, workdir: str) -> dict:
    import lowmem.train.loop as loop
    import lowmem.train.metrics as metrics

    cfg = _train_config(spec, workdir)
    modules = ("lowmem.train.loop", "lowmem.train.session")
    # benchmarks only: skip the final checkpoint (optimizer state of a 7B model is tens of GB) and export
    from lowmem.checkpoint.manager import CheckpointManager

    CheckpointManager.save = lambda self, *a, **k: None
    CheckpointManager.export = lambda self, *a, **k: None
    # lowmem bug worked around here: torchao optimizers keep lr as a tensor, so the logged "lr" is a
    # Tensor and json.dumps in MetricsWriter.log fails on the first logged step (patch in the report)
    original_log = metrics.MetricsWriter.log
    if not getattr(original_log, "_bench_patched", False):
        def log(self, record, step):
            return original_log(self, {k: (v.item() if hasattr(v, "item") and hasattr(v, "dim") else v)
                                       for k, v in record.items()}, step)
        log._bench_patched = True
        metrics.MetricsWriter.log = log
    if spec.get("build_on_device", True):
        _patch(modules, "build_model", lambda f: _build_on_device(f, spec["device"]))
    if spec.get("liger") and spec.get("compile") and spec.get("decoder_only_compile", True):
        _patch(modules, "apply_training_options", _compile_decoder_only)
    if spec.get("peak_after_build"):
        _patch(modules, "apply_training_options", _peak_after_build)
    t0 = time.time()
    loop.train(cfg)
    records = []
    with open(os.path.join(cfg.logging_dir(), "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            if "loss" in rec:
                records.append(rec)
    times = [r["time"] for r in records]
    return {"losses": [r["loss"] for r in records], "step_times": times, "t0": t0,
            "grad_norms": [r["grad_norm"] for r in records]}


def _worker_hf(spec: dict, workdir: str) -> dict:
    import numpy as np
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from lowmem.data.token_file import TokenFile
    from lowmem.data.tokenizer import load_tokenizer
    from lowmem.model.build import build_model

    cfg = _train_config(spec, workdir)
    tokenizer = load_tokenizer(cfg.tokenizer_dir)
    torch.manual_seed(cfg.seed)
    model = _build_on_device(build_model, spec["device"])(cfg, tokenizer)
    seq = cfg.max_seq_len
    tokens = TokenFile(cfg.train_file).tokens

    class Windows(torch.utils.data.Dataset):
        """The same fixed windows lowmem's TokenWindows slices, with the same keys its batches carry."""

        def __len__(self):
            return len(tokens) // seq

        def __getitem__(self, i):
            ids = torch.from_numpy(np.asarray(tokens[i * seq:(i + 1) * seq], dtype=np.int64))
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    class Timer(TrainerCallback):
        times: list = []

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.times.append(time.time())

    cuda = spec["device"] == "cuda"
    args = TrainingArguments(
        output_dir=os.path.join(workdir, "hf_out"), per_device_train_batch_size=cfg.batch_size_per_gpu,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, max_steps=cfg.max_steps,
        learning_rate=cfg.learn_rate, warmup_steps=cfg.warmup_steps, bf16=cuda, use_cpu=not cuda,
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, seed=cfg.seed,
        torch_compile=spec.get("compile", False), **({"gradient_checkpointing": True} if spec.get("grad_ckpt") else {}), **({"optim": spec["optim"]} if spec.get("optim") else {}),
    )
    timer = Timer()
    trainer = Trainer(model=model, args=args, train_dataset=Windows(), callbacks=[timer])
    trainer.remove_callback(PrinterCallback)
    t0 = time.time()
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"losses": losses, "step_times": timer.times, "t0": t0, "optim_used": str(args.optim)}


def worker(spec: dict) -> dict:
    import resource
    import tempfile

    import torch

    device = spec["device"]
    if device == "cuda" and spec.get("mem_budget_gib"):
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, spec["mem_budget_gib"] * 2**30 / total))
    result = {"ok": False, "oom": False, "spec": spec}
    ceiling = _ceiling(device)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory(prefix="bench_") as workdir:
        try:
            got = (_worker_lowmem if spec["trainer"] == "lowmem" else _worker_hf)(spec, workdir)
            result.update(got, ok=True)
        except Exception as exc:  # reported to the driver, which decides what a failure means
            import traceback

            text = f"{type(exc).__name__}: {exc}"
            result["oom"] = isinstance(exc, torch.OutOfMemoryError) or "out of memory" in text.lower()
            result["error"] = text[:800]
            traceback.print_exc()
    result["ceiling_flops"] = ceiling
    result["build_s"] = _TIMES.get("build_s")
    result["build_peak_gib"] = _TIMES.get("build_peak_gib")
    result["host_peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if device == "cuda":
        result["peak_alloc_gib"] = torch.cuda.max_memory_allocated() / 2**30
        result["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
        result["gpu_total_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
        result["gpu_name"] = torch.cuda.get_device_name(0)
    if result["ok"]:
        _summarise(result, spec)
    return result


def _summarise(result: dict, spec: dict) -> None:
    """tokens/s over the steps after the warm-up, MFU against the measured ceiling."""
    from config import MODEL_PRESETS

    times, w = result["step_times"], spec["warmup"]
    tokens_per_step = spec["mb"] * spec.get("ga", 1) * spec["seq"]
    if len(times) > w and w >= 1:
        measured = len(times) - w
        result["tokens_per_sec"] = tokens_per_step * measured / max(times[-1] - times[w - 1], 1e-9)
    result["warmup_s"] = times[w - 1] - result["t0"] if len(times) >= w and w >= 1 else None
    p = MODEL_PRESETS[spec["preset"]]
    layer = (2 * p.hidden_size * p.hidden_size + 2 * p.hidden_size * (p.hidden_size // p.num_heads) * p.num_kv_heads
             + 3 * p.hidden_size * p.intermediate_size + 2 * p.hidden_size)
    vocab = spec.get("vocab", VOCAB)
    head = 0 if p.tie_word_embeddings else vocab * p.hidden_size
    non_embedding = p.num_layers * layer + p.hidden_size + head  # as lowmem.train.metrics.flops_per_token counts
    result["n_params"] = non_embedding + vocab * p.hidden_size
    result["flops_per_token"] = 6.0 * non_embedding
    if result.get("tokens_per_sec"):
        result["mfu"] = result["tokens_per_sec"] * result["flops_per_token"] / result["ceiling_flops"]
    losses = result.get("losses") or []
    result["final_loss"] = sum(losses[-5:]) / len(losses[-5:]) if losses else None
    for key in ("step_times", "t0"):
        result.pop(key, None)


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    out = worker(spec)
    print(RESULT_TAG + json.dumps(out), flush=True)
