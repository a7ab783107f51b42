"""One GPU call that measures what the open issues ask, each part under its own time guard.

    python3 bench/gpu_check.py --out $OUT --wheels wheels     # one CUDA GPU, at most --budget (470) s
    python3 bench/gpu_check.py --cpu --out /tmp/gpu_check      # tiny shapes on CPU; tests/test_gpu_check.py runs it

Parts, in order of value (--parts picks and orders them; --guard PART=SECONDS changes a guard):
  1b            large preset (~1B), seq 2048: this trainer at its best settings (whole-model torch.compile,
                fused AdamW, bf16 autocast) against the HF Trainer with torch_compile=True, both at micro-batch
                18, falling back to 12 on out-of-memory
  packed        medium preset (~0.35B), samples of 20..2000 tokens, rows of 2048: real tokens/s of this trainer's
                --packing with FlexAttention (document mask) and with SDPA (dense block-diagonal mask), against
                the HF Trainer with DataCollatorForLanguageModeling (pad to longest) and DataCollatorWithFlattening
                (padding-free, one row; the attention the trainer's auto rule picks for packed rows)
  7b            `python train_low_mem.py train` (the trainer's own path) on the 7b preset, seq 2048, micro-batch 8,
                adamw_8bit, bf16 weights, gradient checkpointing: time to the first step, host peak RSS, tokens/s
                and peak GPU memory, read from the run's metrics.jsonl; the process is killed after a few steps
  lora7b        the same command line with LoRA r=16 on every linear layer of the blocks over a bf16 base, gradient
                checkpointing, micro-batch 2 (1 on out-of-memory) and --max_gpu_memory_gb=20
  qlora7b       lora7b with --qlora=True (a 4-bit NF4 base). The bf16 base is built and quantised on the host, so
                its 60 s guard may be tight. On CPU the trainer refuses QLoRA in one line: the row says so
  preference    medium preset, documents (prompt + answer) of 40..~1200 tokens: DPO with the reference cache (built
                before step 1, so it counts in the time to the first step) against DPO with --reference=model (a
                frozen copy), and SFT on prompt + chosen at the same rows per micro-batch: time to the first step,
                step time, tokens/s and peak memory (GPU; host RSS on CPU)
  longctx       an 8B Llama shape (preset 8b), one sequence of 32k tokens a step: LoRA r=16 over a bf16 base, and full
                fine-tuning with 8-bit states, bf16 weights and checkpoint offload (DeepSpeed's engine, and transformers'
                with deepspeed hidden); tokens/s, peak GPU memory, and the memory plan's peak and longest length
                (targets on 80 GB: LoRA >= 500K, full >= 128K, read from the plan the run printed); SP=2 (LoRA, ZeRO-3)
                when the machine has 2 GPUs
  gpu_tests     python -m pytest -q tests -k "gpu and not gpu_check" (the tests that skip on CPU)
  graph_breaks  torch._dynamo.explain of the training forward (the call lowmem/train/objective.py makes) with and without the
                chunked loss, checkpointing and packed position ids (FlexAttention on CUDA); graphs built over
                several widths. Each config's row lands as it is done, so a guard that runs out keeps the rows so far

Every trainer run is a fresh subprocess (`--worker <json>`, or the command line) whose timeout is what is left of its
part's guard, so an out-of-memory or a hang loses one row, not the call. DIR/gpu_check.json and DIR/gpu_check.md are
rewritten after every part; DIR/gpu_check_runs.log holds each subprocess's output, DIR/gpu_check_<run>.log each
command-line run's (7b, lora7b_mb2, qlora7b_mb2, ...).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import glob
import json
import os
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402
from benchlib import REPO, RESULT_TAG, fmt  # noqa: E402

PARTS = ("1b", "packed", "7b", "lora7b", "qlora7b", "preference", "longctx", "gpu_tests", "graph_breaks")
# seconds; the parts before gpu_tests add up to the default --budget, the last two take whatever is left of it
# (graph_breaks is also measured on CPU). qlora7b quantises a 7B base built on the host: 60 s may be tight
GUARDS = {"1b": 145, "packed": 100, "7b": 60, "lora7b": 50, "qlora7b": 55, "preference": 60, "longctx": 180,
          "gpu_tests": 470, "graph_breaks": 470}  # 650 s in all: pick parts (--parts) to fit one call
CPU_GUARDS = {"1b": 120, "packed": 120, "7b": 90, "lora7b": 90, "qlora7b": 60, "preference": 120, "longctx": 90,
              "gpu_tests": 60, "graph_breaks": 90}  # a loaded 2-core CPU
TARGETS = {"1b_vs_hf_compile": 1.1, "1b_mfu": 0.55, "packed_vs_hf": 1.5, "packed_vs_flatten": 1.0,
           "7b_tokens_per_sec": 9000, "7b_gpu_gib": 45, "7b_rss_gib": 32, "7b_first_step_s": 60,
           "lora7b_gpu_gib": 20, "qlora7b_gpu_gib": 12, "dpo_cache_vs_model": 1.25, "dpo_cache_vs_sft_memory": 1.10,
           "longctx_lora_tokens": 500_000, "longctx_full_tokens": 128_000}
GPU_TEST_FILTER = "gpu and not gpu_check"  # -k also matches module names: this file's own test is CPU-sized


@dataclasses.dataclass
class Shapes:
    """Sizes of every part; CPU mode is the same script at toy sizes."""

    preset_1b: str = "large"
    mbs_1b: tuple = (18, 12)
    seq: int = 2048
    vocab: int = benchlib.VOCAB
    warmup: int = 2
    steps: int = 6
    preset_packed: str = "medium"
    rows: int = 8
    lengths: tuple = (20, 2000)
    samples: int = 2000
    preset_7b: str = "7b"
    mb_7b: int = 8
    records_7b: int = 6
    preset_graph: str = "tiny"  # dynamo tracing is host-bound and grows with the layers; 4 layers show every break
    optim_7b: tuple = ("--optimizer=adamw_8bit", "--bf16_weights=True")
    mbs_lora: tuple = (2, 1)
    lora_gpu_gb: float = 20.0  # --max_gpu_memory_gb of the LoRA runs (the flag refuses to run on CPU)
    preset_pref: str = "medium"
    pairs: int = 256
    mb_pref: int = 4  # pairs per micro-batch: 2 x 4 rows
    preset_long: str = "8b"
    seq_long: int = 32768
    optim_long: tuple = ("--optimizer=adamw_8bit", "--bf16_weights=True")
    min_run_s: float = 20.0


CPU_SHAPES = Shapes(preset_1b="tiny", mbs_1b=(2, 1), seq=64, vocab=2048, warmup=1, steps=2, preset_packed="tiny",
                    rows=2, lengths=(8, 60), samples=300, preset_7b="tiny", mb_7b=2, records_7b=3, min_run_s=2.0,
                    lora_gpu_gb=0.0, preset_pref="tiny", pairs=16, mb_pref=2, preset_long="tiny", seq_long=256,
                    optim_long=("--optimizer=adamw",),
                    # torchao compiles its 8-bit step on first use: 40 s on a 2-core CPU, so CPU mode checks the rest
                    optim_7b=("--optimizer=adamw", "--bf16_weights=False"))


# ----------------------------------------------------------------------------------------------
# running things under a guard
# ----------------------------------------------------------------------------------------------
def spawn(cmd: list[str], timeout: float, log_path: str) -> dict:
    """Run a command in its own process group; on timeout the whole group is killed."""
    print(f"    $ {' '.join(cmd)[:400]}", flush=True)
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, env=_child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=max(1.0, timeout))
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        timed_out = True
    wall = time.time() - start
    with open(log_path, "a") as f:
        f.write(f"\n===== {' '.join(cmd)}\n--- rc={proc.returncode} timed_out={timed_out} wall={wall:.1f}s\n"
                f"{out[-20000:]}\n--- stderr\n{err[-20000:]}\n")
    return {"rc": proc.returncode, "out": out, "err": err, "timed_out": timed_out, "wall_s": round(wall, 1)}


def _child_env() -> dict:
    return dict(os.environ, PYTHONUNBUFFERED="1", TQDM_DISABLE="1", TOKENIZERS_PARALLELISM="false",
                TRANSFORMERS_VERBOSITY="error")


def run_spec(check, spec: dict, deadline: float) -> dict:
    """One worker run (a training or the graph-break count) in a subprocess, or in-process with --in_process."""
    left = deadline - time.time()
    if left < check.shapes.min_run_s:
        return {"ok": False, "skipped": True, "error": f"time guard: {left:.0f}s left", "spec": spec}
    print(f"[{check.elapsed():5.0f}s] {spec['name']}", flush=True)
    if check.args.in_process and spec["kind"] == "train":
        return _in_process(spec)
    done = spawn([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)], left, check.log_path)
    for line in reversed(done["out"].splitlines()):
        if line.startswith(RESULT_TAG):
            return dict(json.loads(line[len(RESULT_TAG):]), wall_s=done["wall_s"])
    text = done["out"] + done["err"]
    tail = " | ".join([line for line in done["err"].splitlines() if line.strip()][-3:])[-500:]
    return {"ok": False, "spec": spec, "wall_s": done["wall_s"], "timed_out": done["timed_out"],
            "oom": "out of memory" in text.lower() or "OutOfMemoryError" in text,
            "error": "time guard: killed" if done["timed_out"] else f"rc={done['rc']}: {tail}"}


def _in_process(spec: dict) -> dict:
    from accelerate.state import AcceleratorState, GradientState

    started = time.time()
    _reset_peak_rss()
    try:
        return dict(worker(spec), wall_s=round(time.time() - started, 1), host_peak_rss_gib=_peak_rss_gib(os.getpid()))
    finally:  # the next run builds its own Accelerator
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def _reset_peak_rss() -> None:
    """Restart this process's RSS high-water mark (Linux), so each in-process run reports its own peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # elsewhere the peak is the process's so far, as before
        pass


def status(result: dict) -> str:
    if result.get("ok"):
        return "ok"
    if result.get("skipped"):
        return "skipped (" + result.get("error", "") + ")"
    if result.get("refused"):
        return "refused on CPU as expected: " + result.get("error", "").split("first step: ")[-1][:160]
    if result.get("oom"):
        return "OOM"
    if result.get("unavailable"):  # the UserError's reason, without its advice
        return "unavailable: " + result["error"].split("cannot train here: ")[-1].split("; use")[0][:160]
    return "failed: " + result.get("error", "")[:200]


# ----------------------------------------------------------------------------------------------
# part 1: 1B, this trainer at its best against HF Trainer compiled
# ----------------------------------------------------------------------------------------------
def _train_spec(check, name: str, preset: str, mb: int, data: str, **extra) -> dict:
    s = check.shapes
    spec = {"kind": "train", "name": name, "preset": preset, "seq": s.seq, "mb": mb, "warmup": s.warmup,
            "steps": s.steps, "device": check.device, "data": data, "tokenizer_dir": check.tokenizer,
            "vocab": s.vocab, "lr": 3e-4, "lr_warmup": 0, **extra}  # LR warmup must not exceed the few steps
    if check.device == "cpu" and spec.get("compile"):
        spec.update(compile=False, compile_off_on_cpu=True)  # a cold compile takes minutes on a small CPU
    return spec


def _largest_fitting(check, name: str, deadline: float, **extra) -> dict:
    """The first micro-batch of mbs_1b that trains; out-of-memory moves to the next."""
    result = {}
    for mb in check.shapes.mbs_1b:
        result = run_spec(check, _train_spec(check, f"{name}_mb{mb}", check.shapes.preset_1b, mb, check.windows,
                                             **extra), deadline)
        if not result.get("oom"):
            break
    return result


def part_1b(check, deadline: float) -> dict:
    best = {"trainer": "lowmem", "compile": True, "liger": False, **json.loads(check.args.lowmem_best or "{}")}
    runs = {"lowmem-best": _largest_fitting(check, "lowmem-best", deadline, **best),
            "HF-compile": _largest_fitting(check, "hf-compile", deadline, trainer="hf", compile=True,
                                           optim="adamw_torch_fused")}
    base = _tps(runs["HF-compile"])
    header = ["trainer", "settings", "micro-batch", "tokens/s", "MFU", "peak GPU alloc / reserved GiB",
              "host peak RSS GiB", "warm-up s", "vs HF-compile", "status"]
    rows = []
    for label, r in runs.items():
        spec, tps = r.get("spec", {}), _tps(r)
        rows.append([label, _settings(spec), str(spec.get("mb", "-")), fmt(tps, ",.0f"), _pct(r.get("mfu")),
                     _gib_pair(r), fmt(r.get("host_peak_rss_gib"), ".1f"), fmt(r.get("warmup_s"), ".0f"),
                     _ratio(tps, base, "HF-compile"), status(r)])
    lowmem, tps = runs["lowmem-best"], _tps(runs["lowmem-best"])
    checks = [_target("1B tokens/s vs HF-compile", _ratio(tps, base, "HF-compile"), ">= 1.10x HF-compile",
                      tps / base if tps and base else None, TARGETS["1b_vs_hf_compile"]),
              _target("1B MFU (this trainer)", _pct(lowmem.get("mfu")), ">= 55%", lowmem.get("mfu"), TARGETS["1b_mfu"])]
    return {"runs": list(runs.values()), "table": md_table(header, rows), "targets": checks}


def _settings(spec: dict) -> str:
    parts = ["torch.compile" if spec.get("compile") else "eager"] + (["(compile off on cpu)"] if spec.get(
        "compile_off_on_cpu") else [])
    parts += [f"{k}={v}" for k, v in spec.get("cfg", {}).items()]
    if spec.get("optim"):
        parts.append(spec["optim"])
    return " ".join(parts)


# ----------------------------------------------------------------------------------------------
# part 2: packed SFT on variable-length samples
# ----------------------------------------------------------------------------------------------
def synthetic_samples(n: int, lengths: tuple, vocab: int, seed: int = 0) -> list:
    """n token sequences with lengths uniform in lengths (both ends included); ids 4.. are ordinary tokens."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.integers(4, vocab, size=int(k)) for k in rng.integers(lengths[0], lengths[1] + 1, size=n)]


def write_sample_parquet(path: str, shapes: Shapes) -> str:
    """The samples as a `text` column of the word-level tokens t<id>: the trainer's encoder gives back the ids + eos."""
    if os.path.isfile(path):
        return path
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [" ".join(f"t{i}" for i in ids) for ids in synthetic_samples(shapes.samples, shapes.lengths, shapes.vocab)]
    pq.write_table(pa.table({"text": texts}), path + ".tmp", row_group_size=500)
    os.replace(path + ".tmp", path)
    return path


FLEX, SDPA = {"attn_implementation": "flex_attention"}, {"attn_implementation": "sdpa"}
PACKED_RUNS = [  # (label, spec fields); the first four are the comparison, the last one runs if time is left
    ("lowmem --packing, FlexAttention", {"trainer": "lowmem", "cfg": {"packing": True, **FLEX}}),
    ("HF, DataCollatorForLanguageModeling (pad to longest)", {"trainer": "hf", "collator": "padding"}),
    # packing=True only steers the auto attention choice to the one the trainer makes for packed rows
    ("HF, DataCollatorWithFlattening (padding-free)", {"trainer": "hf", "collator": "flattening",
                                                      "cfg": {"packing": True}}),
    ("lowmem --packing, SDPA dense mask", {"trainer": "lowmem", "cfg": {"packing": True, **SDPA}}),
    ("HF, DataCollatorWithFlattening, SDPA", {"trainer": "hf", "collator": "flattening", "cfg": SDPA}),
]


def part_packed(check, deadline: float) -> dict:
    s = check.shapes
    data = write_sample_parquet(os.path.join(check.workdir, f"samples_{s.samples}_{s.lengths[0]}_{s.lengths[1]}_"
                                                            f"v{s.vocab}.parquet"), s)
    results = []
    for label, fields in PACKED_RUNS[:4] if check.device == "cpu" else PACKED_RUNS:  # CPU: the comparison only
        # a padded HF batch of `rows` samples spans about as many positions as `rows` packed rows;
        # a flattened one gets twice the samples, about the real tokens of `rows` packed rows
        mb = s.rows * (2 if fields.get("collator") == "flattening" else 1)
        spec = _train_spec(check, "packed_" + label.split(",")[0].split(" ")[0].lower() + f"_{len(results)}",
                           s.preset_packed, mb, data, lengths=list(s.lengths), samples=s.samples, **fields)
        spec["cfg"] = {"max_seq_len": s.seq, **spec.get("cfg", {})}
        results.append((label, run_spec(check, spec, deadline)))
    by_label = dict(results)
    hf = _tps(by_label[PACKED_RUNS[1][0]])
    flat = _tps(by_label[PACKED_RUNS[2][0]])
    header = ["run", "attention", "batch", "real tokens/s", "real-token share", "MFU", "peak GPU alloc / reserved GiB",
              "vs HF padding", "vs HF padding-free", "status"]
    rows = [[label, r.get("attn", "-"), f"{r.get('spec', {}).get('mb', '-')} {_unit(r.get('spec', {}))}",
             fmt(_tps(r), ",.0f"), _pct(r.get("real_fraction")), _pct(r.get("mfu")), _gib_pair(r),
             _ratio(_tps(r), hf, "HF"), _ratio(_tps(r), flat, "HF-flatten"), status(r)] for label, r in results]
    flex = _tps(by_label[PACKED_RUNS[0][0]])
    checks = [_target("packed, FlexAttention vs HF padding", _ratio(flex, hf, "HF"), ">= 1.50x HF",
                      flex / hf if flex and hf else None, TARGETS["packed_vs_hf"]),
              _target("packed, FlexAttention vs HF padding-free", _ratio(flex, flat, "HF-flatten"),
                      ">= 1.00x HF-flatten", flex / flat if flex and flat else None, TARGETS["packed_vs_flatten"])]
    return {"runs": [r for _, r in results], "table": md_table(header, rows), "targets": checks}


def _unit(spec: dict) -> str:
    if spec.get("trainer") == "lowmem":
        return f"rows of {spec.get('seq')}"
    return "samples in 1 row" if spec.get("collator") == "flattening" else "samples"


def _tps(result: dict):
    return result.get("tokens_per_sec") if result.get("ok") else None


# ----------------------------------------------------------------------------------------------
# part 3: 7B through the trainer's own command line
# ----------------------------------------------------------------------------------------------
def part_7b(check, deadline: float) -> dict:
    s = check.shapes
    result = trainer_run(check, "7b", [f"--model_preset={s.preset_7b}", f"--batch_size_per_gpu={s.mb_7b}", *s.optim_7b,
                                       "--gradient_checkpointing=True"], deadline)
    header = ["preset", "micro-batch", "time to first step s", "tokens/s", "MFU", "peak GPU alloc GiB (metrics)",
              "peak GPU used GiB (nvidia-smi)", "host peak RSS GiB", "steps read", "status"]
    row = [s.preset_7b, str(s.mb_7b), *_run_columns(result), status(result)]
    gpu = _max(result.get("gpu_peak_gib"), result.get("gpu_used_gib"))
    tps = result.get("tokens_per_sec")
    checks = [_target("7B tokens/s", fmt(tps, ",.0f"), ">= 9,000", tps, TARGETS["7b_tokens_per_sec"]),
              _target("7B peak GPU memory GiB", fmt(gpu, ".1f"), "< 45", gpu, TARGETS["7b_gpu_gib"], below=True),
              _target("7B host peak RSS GiB", fmt(result.get("host_peak_rss_gib"), ".1f"), "< 32",
                      result.get("host_peak_rss_gib"), TARGETS["7b_rss_gib"], below=True),
              _target("7B time to first step s", fmt(result.get("first_step_s"), ".0f"), "<= 60",
                      result.get("first_step_s"), TARGETS["7b_first_step_s"], below=True)]
    return {"runs": [result], "table": md_table(header, [row]), "targets": checks}


def trainer_run(check, name: str, flags: list[str], deadline: float, seq: int = 0, launcher: list[str] = (),
                env: dict | None = None) -> dict:
    """`python train_low_mem.py train` on the bench's token file, killed once records_7b steps are logged."""
    from config import TrainConfig

    s, run_name = check.shapes, f"gpu_check_{name}"
    run_dir = os.path.join(check.workdir, f"run_{name}_{time.time_ns()}")
    metrics = os.path.join(TrainConfig(run_name=run_name, output_dir=run_dir).logging_dir(), "metrics.jsonl")
    cmd = [*(launcher or [sys.executable]), os.path.join(REPO, "train_low_mem.py"), "train", *flags,
           f"--max_seq_len={seq or s.seq}",
           f"--train_file={check.windows}", f"--tokenizer_dir={check.tokenizer}", "--validation_file=",
           "--test_file=", "--max_steps=1000", "--warmup_steps=10", "--learn_rate=1e-4", "--logging_steps=1",
           "--eval_steps=100000", "--save_steps=100000", "--report_to=none", f"--output_dir={run_dir}",
           f"--run_name={run_name}", "--test_generation_samples=0", "--overwrite_output_dir=True"]
    left = deadline - time.time()
    if left < s.min_run_s:
        return {"ok": False, "skipped": True, "error": f"time guard: {left:.0f}s left", "command": cmd}
    print(f"[{check.elapsed():5.0f}s] {name}: the trainer's own command line", flush=True)
    log = os.path.join(check.args.out, f"gpu_check_{name}.log")
    return dict(watch_training(cmd, metrics, s.records_7b, left, log, env), command=cmd, log=log)


def _run_columns(result: dict) -> list[str]:
    """The columns of a command-line run, from time to first step to the steps read."""
    return [fmt(result.get("first_step_s"), ".0f"), fmt(result.get("tokens_per_sec"), ",.0f"), _pct(result.get("mfu")),
            fmt(result.get("gpu_peak_gib"), ".1f"), fmt(result.get("gpu_used_gib"), ".1f"),
            fmt(result.get("host_peak_rss_gib"), ".1f"), str(result.get("records", 0))]


def watch_training(cmd: list[str], metrics_path: str, records: int, timeout: float, log_path: str,
                   env: dict | None = None) -> dict:
    """Start a training, poll its metrics.jsonl, host RSS high-water mark and GPU use; kill it after `records` steps."""
    print(f"    $ {' '.join(cmd)}", flush=True)
    start = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env or _child_env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        rss, gpu_used, steps = 0.0, None, []
        while proc.poll() is None and time.time() - start < timeout and len(steps) < records:
            time.sleep(0.5)
            rss = max(rss, _peak_rss_gib(proc.pid))
            gpu_used = _max(gpu_used, _gpu_used_gib(proc.pid))
            steps = _step_records(metrics_path)
        finished = proc.poll()
        if finished is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the numbers are in; the export of a 7B model is not measured
            proc.wait()
    result = {"records": len(steps), "host_peak_rss_gib": rss or None, "gpu_used_gib": gpu_used, "rc": finished,
              "wall_s": round(time.time() - start, 1)}
    if steps:
        result.update(ok=True, first_step_s=steps[0]["time"] - start,
                      gpu_peak_gib=max(r.get("gpu_mem_peak_gb", 0.0) for r in steps) or None,
                      mfu=steps[-1].get("mfu"))
        if len(steps) > 1:
            result["tokens_per_sec"] = ((steps[-1]["tokens_seen"] - steps[0]["tokens_seen"])
                                        / max(steps[-1]["time"] - steps[0]["time"], 1e-9))
    else:
        why = "time guard: no step logged" if finished is None else f"rc={finished} before the first step"
        last = _last_line(log_path)
        result.update(ok=False, error=f"{why}: {last}", oom="out of memory" in last.lower())
    return result


def _last_line(path: str) -> str:
    with open(path, errors="replace") as f:
        lines = [line.strip() for line in f.read().replace("\r", "\n").splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no output)"


def _peak_rss_gib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def _gpu_used_gib(pid: int):
    """GPU memory nvidia-smi reports for the process (allocator cache and CUDA context included)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in out.splitlines():
        fields = [x.strip() for x in line.split(",")]
        if len(fields) == 2 and fields[0] == str(pid) and fields[1].isdigit():
            return int(fields[1]) / 1024
    return None


def _step_records(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        lines = f.read().splitlines()
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:  # the line being written
            continue
        if "loss" in record and "tokens_seen" in record:
            records.append(record)
    return records


def _max(a, b):
    return b if a is None else (a if b is None else max(a, b))


# ----------------------------------------------------------------------------------------------
# parts 4 and 5: 7B LoRA and QLoRA through the trainer's own command line
# ----------------------------------------------------------------------------------------------
def part_lora7b(check, deadline: float) -> dict:
    return _adapter_part(check, deadline, qlora=False)


def part_qlora7b(check, deadline: float) -> dict:
    return _adapter_part(check, deadline, qlora=True)


def _adapter_part(check, deadline: float, qlora: bool) -> dict:
    """LoRA r=16 on every linear layer of the blocks, bf16 base (the run computes in bf16 on the GPU), checkpointing;
    the first micro-batch of mbs_lora that fits under --max_gpu_memory_gb."""
    s, name, label = check.shapes, "qlora7b" if qlora else "lora7b", "7B QLoRA" if qlora else "7B LoRA"
    flags = [f"--model_preset={s.preset_7b}", "--lora_r=16", "--lora_alpha=32", "--gradient_checkpointing=True"]
    flags += [f"--max_gpu_memory_gb={s.lora_gpu_gb:g}"] if check.device == "cuda" else []
    flags += ["--qlora=True"] if qlora else []
    runs = []
    for mb in s.mbs_lora:
        result = dict(trainer_run(check, f"{name}_mb{mb}", [*flags, f"--batch_size_per_gpu={mb}"], deadline), mb=mb)
        if qlora and check.device == "cpu":
            result["refused"] = _refused_on_cpu(result)
        runs.append(result)
        if not result.get("oom"):
            break
    header = ["run", "micro-batch", "time to first step s", "tokens/s", "MFU", "peak GPU alloc GiB (metrics)",
              "peak GPU used GiB (nvidia-smi)", "host peak RSS GiB", "steps read", "status"]
    rows = [[label, str(r["mb"]), *_run_columns(r), status(r)] for r in runs]
    last = runs[-1]
    gpu = _max(last.get("gpu_peak_gib"), last.get("gpu_used_gib")) if last.get("ok") else None
    bound = TARGETS[f"{name}_gpu_gib"]
    checks = [_target(f"{label} peak GPU memory GiB", fmt(gpu, ".1f"), f"< {bound}", gpu, bound, below=True)]
    if not qlora:
        fits = f"micro-batch {last['mb']}" if last.get("ok") else status(last)
        cap = f" (--max_gpu_memory_gb={s.lora_gpu_gb:g})" if check.device == "cuda" else ""
        checks.append({"check": f"{label} fits at micro-batch 1-2{cap}",
                       "measured": fits, "target": "micro-batch 1 or 2",
                       "met": "yes" if last.get("ok") else "-" if last.get("skipped") else "no"})
    return {"runs": runs, "table": md_table(header, rows), "targets": checks}


def _refused_on_cpu(result: dict) -> bool:
    """On CPU the trainer refuses --qlora=True in one line (exit 2, no traceback): what CPU mode expects."""
    if result.get("rc") != 2 or not os.path.isfile(result.get("log", "")):
        return False
    with open(result["log"], errors="replace") as f:
        text = f.read()
    return "Traceback" not in text and "--qlora=True cannot run here: it needs a CUDA GPU" in text


# ----------------------------------------------------------------------------------------------
# part 6: DPO with the reference cache, with a frozen reference model, and SFT on the same rows
# ----------------------------------------------------------------------------------------------
def write_pair_files(folder: str, shapes: Shapes) -> tuple[str, str]:
    """Preference pairs {prompt, chosen, rejected} of the tokenizer's words t<id>, and the same prompts with the chosen
    answer as SFT rows {prompt, response}; a document (prompt + answer) stays under seq."""
    s = shapes
    prefix = os.path.join(folder, f"pairs_{s.pairs}_{s.lengths[0]}_{s.seq}_v{s.vocab}")
    pairs, sft = prefix + ".jsonl", prefix + "_sft.jsonl"
    if os.path.isfile(pairs) and os.path.isfile(sft):
        return pairs, sft

    def words(ids):
        return " ".join(f"t{i}" for i in ids)

    prompts, chosen, rejected = (synthetic_samples(s.pairs, (s.lengths[0], s.seq // k), s.vocab, seed)
                                 for seed, k in ((1, 4), (2, 3), (3, 3)))
    rows = [{"prompt": words(p), "chosen": words(c), "rejected": words(r)}
            for p, c, r in zip(prompts, chosen, rejected)]
    for path, lines in ((sft, [{"prompt": r["prompt"], "response": r["chosen"]} for r in rows]), (pairs, rows)):
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(line) + "\n" for line in lines)
        os.replace(path + ".tmp", path)
    return pairs, sft


def part_preference(check, deadline: float) -> dict:
    s = check.shapes
    pairs, sft = write_pair_files(check.workdir, s)
    cache_dir = os.path.join(check.workdir, f"refcache_{time.time_ns()}")  # never a stale cache: its build is measured
    plan = [("DPO, reference cache", pairs, s.mb_pref, {"reference": "cache", "reference_cache_dir": cache_dir}),
            ("DPO, --reference=model (a frozen copy)", pairs, s.mb_pref, {"reference": "model"}),
            # the rows a DPO micro-batch holds: each pair is two, prompt + chosen and prompt + rejected
            ("SFT, prompt + chosen", sft, 2 * s.mb_pref, {})]
    results = []
    for i, (label, data, mb, fields) in enumerate(plan):
        cfg = {"preference_loss": "dpo", **fields} if data == pairs else {}
        spec = _train_spec(check, f"preference_{i}", s.preset_pref, mb, data, trainer="lowmem", cfg=cfg)
        results.append((label, run_spec(check, spec, deadline)))
    (_, cache), (_, model), (_, plain) = results
    header = ["run", "micro-batch", "time to first step s", "step time s", "tokens/s", "peak GPU alloc / reserved GiB",
              "host peak RSS GiB", "step time vs --reference=model", "status"]
    rows = [[label, f"{mb} pairs ({2 * mb} rows)" if data == pairs else f"{mb} rows", fmt(r.get("first_step_s"), ".1f"),
             fmt(r.get("step_s"), ".3f"), fmt(_tps(r), ",.0f"), _gib_pair(r), fmt(r.get("host_peak_rss_gib"), ".2f"),
             _ratio(_step_s(model), _step_s(r), "faster"), status(r)]
            for (label, r), (_, data, mb, _) in zip(results, plan)]
    memory = "peak GPU alloc" if check.device == "cuda" else "host peak RSS"
    mem_ratio = _peak_memory(cache) / _peak_memory(plain) if _peak_memory(cache) and _peak_memory(plain) else None
    speedup = _step_s(model) / _step_s(cache) if _step_s(model) and _step_s(cache) else None
    checks = [_target(f"DPO cache peak memory vs SFT ({memory})", fmt(mem_ratio, ".2f") + "x SFT" if mem_ratio else "-",
                      "within 10% of SFT (< 1.10x)", mem_ratio, TARGETS["dpo_cache_vs_sft_memory"], below=True),
              _target("DPO cache step time vs --reference=model", _ratio(_step_s(model), _step_s(cache), "faster"),
                      ">= 1.25x faster", speedup, TARGETS["dpo_cache_vs_model"])]
    note = (f"\n\n{s.pairs} pairs; the cache run computes the reference cache (one forward pass per micro-batch of "
            "pairs) before its first step, so it is in that run's time to first step, not in its step time.")
    return {"runs": [r for _, r in results], "table": md_table(header, rows) + note, "targets": checks}


def _step_s(result: dict):
    return result.get("step_s") if result.get("ok") else None


def _peak_memory(result: dict):
    """Peak GPU memory on CUDA, else the host's peak RSS (CPU mode)."""
    if not result.get("ok"):
        return None
    return result.get("peak_alloc_gib") if result.get("spec", {}).get("device") == "cuda" else result.get(
        "host_peak_rss_gib")


# ----------------------------------------------------------------------------------------------
# part 7: graph breaks of the training forward under torch.compile
# ----------------------------------------------------------------------------------------------
PLAIN = {"chunked_cross_entropy": False}  # the model's own loss, so a row shows its own option's breaks alone
GRAPH_CONFIGS = [  # (name, TrainConfig fields, packed position ids, count graphs over several widths)
    ("token windows (mask of ones)", PLAIN, False, False),
    ("--chunked_cross_entropy", {"chunked_cross_entropy": True}, False, True),
    ("--packing", {"packing": True, **PLAIN}, True, True),
    ("--gradient_checkpointing (full)", {"gradient_checkpointing": True, **PLAIN}, False, False),
    ("--gradient_checkpointing selective", {"gradient_checkpointing": True, "gradient_checkpointing_mode": "selective",
                                            **PLAIN}, False, False),
    ("--packing --attn_implementation=sdpa", {"packing": True, "attn_implementation": "sdpa", **PLAIN}, True, True),
    ("--packing --chunked_cross_entropy --gradient_checkpointing",
     {"packing": True, "chunked_cross_entropy": True, "gradient_checkpointing": True}, True, True),
]
WIDTH_STEPS = (0, 5, 11, 17)  # widths seq - k: padded and packed batches change width from step to step


def part_graph_breaks(check, deadline: float) -> dict:
    spec = {"kind": "graph_breaks", "name": "graph_breaks", "device": check.device,
            "preset": check.args.graph_preset or check.shapes.preset_graph,
            "tokenizer_dir": check.tokenizer, "seq": min(check.shapes.seq, 256),
            "configs": check.args.graph_configs or (2 if check.device == "cpu" else len(GRAPH_CONFIGS))}
    result = run_spec(check, spec, deadline)
    header = ["forward (training, loss included)", "attention", "graphs", "graph breaks", "break reasons",
              "graphs after 2 widths -> 4 widths"]
    rows = [[r["config"], r["attention"], str(r["graphs"]), str(r["breaks"]), "; ".join(r["reasons"]) or "-",
             str(r.get("graphs_over_widths", "-"))] for r in result.get("rows", [])]
    total = sum(r["breaks"] for r in result.get("rows", [])) if result.get("ok") else None
    done = len(rows) if result.get("complete", True) else f"{len(rows)} (time guard)"
    checks = [{"check": f"graph breaks in the training forward ({done} configs)", "measured": fmt(total, "d"),
               "target": "report", "met": "-"}]
    return {"runs": [result], "table": md_table(header, rows) if rows else status(result), "targets": checks}


def graph_break_worker(spec: dict) -> dict:
    import torch
    from accelerate import Accelerator

    from config import TrainConfig
    from lowmem.data.tokenizer import load_tokenizer
    from lowmem.model.attention import attention_backend

    cuda = spec["device"] == "cuda"
    tokenizer = load_tokenizer(spec["tokenizer_dir"])
    accelerator = Accelerator(mixed_precision="bf16" if cuda else "no", cpu=not cuda)  # as the trainer wraps forward
    rows = []
    for name, fields, packed, widths in GRAPH_CONFIGS[:spec["configs"]]:
        cfg = TrainConfig(model_preset=spec["preset"], max_seq_len=spec["seq"], tokenizer_dir=spec["tokenizer_dir"],
                          **fields)
        try:
            attn = attention_backend(cfg)
        except Exception as exc:  # a UserError: this config cannot run on this machine
            rows.append({"config": name, "attention": f"n/a ({exc})", "graphs": "-", "breaks": 0, "reasons": []})
            continue
        if name.endswith("=sdpa") and attention_backend(dataclasses.replace(cfg, attn_implementation="auto")) == "sdpa":
            continue  # the same as --packing here
        row = {"config": name, "attention": attn, "graphs": "-", "breaks": 0, "reasons": []}
        try:
            model = _training_model(cfg, tokenizer, accelerator)
            row.update(_explain(model, spec["seq"], packed, accelerator.device))
            if widths:
                row["graphs_over_widths"] = _graphs_over_widths(model, spec["seq"], packed, accelerator.device)
        except Exception as exc:  # one config that dynamo cannot trace is a finding, not the end of the part
            row["reasons"].append(f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        rows.append(row)
        print(RESULT_TAG + json.dumps({"ok": True, "rows": rows, "complete": False}), flush=True)  # kept on a timeout
    return {"ok": True, "rows": rows, "complete": True, "torch": torch.__version__}


def _training_model(cfg, tokenizer, accelerator):
    import torch

    from lowmem.model.build import apply_training_options, build_model

    torch.manual_seed(0)
    with torch.device(accelerator.device):
        model = apply_training_options(build_model(cfg, tokenizer), cfg)
    model = accelerator.prepare(model)
    model.train()
    return model


def _inputs(seq: int, packed: bool, device, vocab: int = 256) -> dict:
    import torch

    ids = torch.randint(4, vocab, (2, seq), device=device)
    inputs = {"input_ids": ids, "labels": ids.clone()}
    if packed:  # three samples per row, position ids restarting as collate_packed writes them
        cut = [seq // 3, seq // 2, seq - seq // 3 - seq // 2]
        inputs["position_ids"] = torch.cat([torch.arange(n, device=device) for n in cut]).repeat(2, 1)
    else:
        inputs["attention_mask"] = torch.ones_like(ids)
    return inputs


def _loss_fn():
    """The forward the trainer's token loss makes (lowmem/train/objective.py TokenLoss on a decoder)."""
    return lambda model, inputs, enc_dec, scale: model(**inputs, use_cache=False, num_items_in_batch=scale).loss


def _explain(model, seq: int, packed: bool, device) -> dict:
    import torch

    torch._dynamo.reset()
    explained = torch._dynamo.explain(_loss_fn())(model, _inputs(seq, packed, device), False,
                                                  torch.tensor(float(seq), device=device))
    reasons = []
    for item in explained.break_reasons:
        frame = item.user_stack[-1] if item.user_stack else None
        where = f" at {_short_path(frame.filename)}:{frame.lineno}" if frame else ""
        reasons.append(item.reason.splitlines()[0][:160] + where)
    return {"graphs": explained.graph_count, "breaks": explained.graph_break_count, "reasons": reasons}


def _graphs_over_widths(model, seq: int, packed: bool, device) -> str:
    """Graphs dynamo builds for the forward after 2 and after 4 widths; equal counts: no recompiling per width.

    Shape guards are dynamo's, so the eager backend counts the recompilations inductor would do, in seconds.
    """
    import torch
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(_loss_fn(), backend="eager")
    counts = []
    for k in WIDTH_STEPS:
        compiled(model, _inputs(seq - k, packed, device), False, torch.tensor(float(seq - k), device=device))
        counts.append(int(counters["stats"]["unique_graphs"]))
    return f"{counts[1]} -> {counts[-1]}"


def _short_path(path: str) -> str:
    if path.startswith(REPO):
        return os.path.relpath(path, REPO)
    return path.split("site-packages/")[-1]


# ----------------------------------------------------------------------------------------------
# part 7: long sequences on one GPU (and two, when there are two)
# ----------------------------------------------------------------------------------------------
def _without_deepspeed(folder: str) -> dict:
    """An environment in which `import deepspeed` fails: the trainer falls back to transformers' offload engine."""
    stub = os.path.join(folder, "no_deepspeed", "deepspeed")
    os.makedirs(stub, exist_ok=True)
    with open(os.path.join(stub, "__init__.py"), "w") as f:
        f.write("raise ImportError('hidden by gpu_check: transformers offload engine')\n")
    env = _child_env()
    env["PYTHONPATH"] = os.path.dirname(stub) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _plan_from_log(result: dict) -> dict:
    """The memory plan's peak and longest length, as the run printed them before its first step."""
    import re

    if not os.path.isfile(result.get("log", "")):
        return {}
    with open(result["log"], errors="replace") as f:
        text = f.read()
    peak = re.search(r"= ~([0-9.]+) GiB per process", text)
    longest = re.search(r"longest --max_seq_len that fits [^:]*: (\d+)", text)
    engine = "deepspeed" if "(DeepSpeed, side stream)" in text else "transformers" if "save_on_cpu" in text else None
    return {"plan_gib": float(peak.group(1)) if peak else None, "plan_longest": int(longest.group(1)) if longest
            else None, "offload_engine": engine}


def part_longctx(check, deadline: float) -> dict:
    s = check.shapes
    common = [f"--model_preset={s.preset_long}", "--gradient_checkpointing=True", "--batch_size_per_gpu=1",
              "--gradient_accumulation_steps=1"]
    lora = ["--lora_r=16", "--lora_alpha=32"]
    full = [*s.optim_long, "--gradient_checkpointing_offload=True"]
    runs = [("LoRA r=16", "longctx_lora", lora, None, TARGETS["longctx_lora_tokens"]),
            ("full, 8-bit states, offload", "longctx_full", full, None, TARGETS["longctx_full_tokens"])]
    if check.device == "cuda":  # the other offload engine on the same run
        runs.append(("full, offload by transformers", "longctx_full_hf", full, _without_deepspeed(check.workdir), None))
    rows, checks, results = [], [], []
    for label, name, flags, env, target in runs:
        result = dict(trainer_run(check, name, [*common, *flags], deadline, seq=s.seq_long, env=env), label=label)
        result.update(_plan_from_log(result))
        results.append(result)
        rows.append([label, str(s.seq_long), fmt(result.get("tokens_per_sec"), ",.0f"),
                     fmt(result.get("gpu_peak_gib"), ".1f"), fmt(result.get("host_peak_rss_gib"), ".1f"),
                     fmt(result.get("plan_gib"), ".1f"), fmt(result.get("plan_longest"), ",d"),
                     result.get("offload_engine") or "-", status(result)])
        if target:
            longest = result.get("plan_longest")
            checks.append(_target(f"{label}: longest length on this GPU (the plan's)", fmt(longest, ",d"),
                                  f">= {target:,}", longest if check.device == "cuda" else None, target))
    import torch

    if check.device == "cuda" and torch.cuda.device_count() >= 2:
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                    os.path.join(REPO, "accelerate_configs", "deepspeed_zero3.yaml"), "--num_processes", "2"]
        result = dict(trainer_run(check, "longctx_sp2", [*common, *lora, "--sequence_parallel_size=2"], deadline,
                                  seq=2 * s.seq_long, launcher=launcher), label="LoRA r=16, SP=2, ZeRO-3")
        result.update(_plan_from_log(result))
        results.append(result)
        rows.append([result["label"], str(2 * s.seq_long), fmt(result.get("tokens_per_sec"), ",.0f"),
                     fmt(result.get("gpu_peak_gib"), ".1f"), fmt(result.get("host_peak_rss_gib"), ".1f"),
                     fmt(result.get("plan_gib"), ".1f"), fmt(result.get("plan_longest"), ",d"), "-", status(result)])
    header = ["run", "tokens", "tokens/s", "peak GPU alloc GiB", "host peak RSS GiB", "plan GiB", "plan longest",
              "offload engine", "status"]
    return {"runs": results, "table": md_table(header, rows), "targets": checks}


# ----------------------------------------------------------------------------------------------
# part 8: the GPU tests
# ----------------------------------------------------------------------------------------------
def part_gpu_tests(check, deadline: float) -> dict:
    cpu = check.device == "cpu"  # CPU mode checks the command and the selection, on one file, and runs nothing
    cmd = [sys.executable, "-m", "pytest", "-q", "tests/test_attention.py" if cpu else "tests", "-k", GPU_TEST_FILTER,
           "-p", "no:cacheprovider", "-rs"] + (["--collect-only"] if cpu else [])
    left = deadline - time.time()
    if left < check.shapes.min_run_s:
        done = {"rc": None, "out": "", "err": "", "timed_out": False, "skipped": True}
    else:
        print(f"[{check.elapsed():5.0f}s] gpu_tests", flush=True)
        done = spawn(cmd, left, check.log_path)
    lines = [line for line in done["out"].splitlines() if line.strip()]
    summary = lines[-1] if lines else ""
    ok = done["rc"] in (0, 5) and not done["timed_out"]
    state = ("skipped (time guard)" if done.get("skipped") else "time guard: killed" if done["timed_out"]
             else "ok" if ok else f"failed (rc={done['rc']})")
    failures = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    table = md_table(["command", "result", "status"], [[" ".join(["python", *cmd[1:]]), summary[:200], state]])
    if failures:
        table += "\n\n" + "\n".join(f"- {line[:300]}" for line in failures[:20])
    checks = [{"check": "GPU tests", "measured": summary[:120] or "-", "target": "all pass",
               "met": "-" if check.device == "cpu" or done.get("skipped") else ("yes" if ok else "no")}]
    return {"runs": [{"ok": ok, "command": cmd, "summary": summary, "rc": done["rc"], "failures": failures}],
            "table": table, "targets": checks}


# ----------------------------------------------------------------------------------------------
# the worker side of a training run: benchlib's worker plus real-token counting and HF collators
# ----------------------------------------------------------------------------------------------
def worker(spec: dict) -> dict:
    if spec["kind"] == "graph_breaks":
        return graph_break_worker(spec)
    _install_bench_hooks()
    result = benchlib.worker(spec)
    if result.get("real_tokens_per_sec"):  # packed runs: count real tokens, not positions
        result["tokens_per_sec"] = result["real_tokens_per_sec"]
        result["mfu"] = result["tokens_per_sec"] * result["flops_per_token"] / result["ceiling_flops"]
    if not result.get("ok") and "cannot train here" in result.get("error", ""):
        result["unavailable"] = True
    return result


_HOOKED: dict = {}


def _install_bench_hooks() -> None:
    """benchlib builds the run's TrainConfig and calls one worker per trainer; extend both for these specs."""
    if _HOOKED:
        return
    _HOOKED.update(config=benchlib._train_config, lowmem=benchlib._worker_lowmem, hf=benchlib._worker_hf)

    def train_config(spec, workdir):  # spec["cfg"]: TrainConfig fields beyond what benchlib sets
        return dataclasses.replace(_HOOKED["config"](spec, workdir), **spec.get("cfg", {}))

    def worker_lowmem(spec, workdir):
        from lowmem.model.attention import attention_backend

        got = _HOOKED["lowmem"](spec, workdir)
        times, w = got["step_times"], spec["warmup"]
        got["first_step_s"] = times[0] - got["t0"] if times else None  # data, model and a reference cache built
        got["step_s"] = (times[-1] - times[w - 1]) / (len(times) - w) if len(times) > w else None
        cfg = benchlib._train_config(spec, workdir)
        got["attn"] = attention_backend(cfg)
        got.update(_real_tokens(_step_records(os.path.join(cfg.logging_dir(), "metrics.jsonl")), spec["warmup"]))
        return got

    def worker_hf(spec, workdir):
        return _worker_hf_samples(spec, workdir) if spec.get("collator") else _HOOKED["hf"](spec, workdir)

    benchlib._train_config, benchlib._worker_lowmem, benchlib._worker_hf = train_config, worker_lowmem, worker_hf


def _real_tokens(records: list[dict], warmup: int) -> dict:
    """Real tokens/s and share over the logged steps after the warm-up (the trainer logs every step here)."""
    if len(records) <= warmup:
        return {}
    first, last = records[warmup - 1], records[-1]
    seconds = max(last["time"] - first["time"], 1e-9)
    return {"real_tokens_per_sec": (last["tokens_seen"] - first["tokens_seen"]) / seconds,
            "real_fraction": sum(r.get("real_token_fraction", 0.0) for r in records[warmup:]) / (len(records) - warmup)}


class CountingCollator:
    """Wraps an HF collator and records real and total positions of each batch, in the order it builds them."""

    def __init__(self, inner):
        self.inner, self.real, self.total = inner, [], []

    def __call__(self, features):
        batch = self.inner(features)
        mask = batch.get("attention_mask")
        self.real.append(int(mask.sum()) if mask is not None else batch["input_ids"].numel())
        self.total.append(batch["input_ids"].numel())
        return batch


def _worker_hf_samples(spec: dict, workdir: str) -> dict:
    """HF Trainer on the same variable-length samples, with a padding or a flattening collator."""
    import torch
    from transformers import (
        DataCollatorForLanguageModeling,
        DataCollatorWithFlattening,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )
    from transformers.trainer_callback import PrinterCallback

    from lowmem.data.tokenizer import load_tokenizer
    from lowmem.model.build import build_model

    cfg = benchlib._train_config(spec, workdir)
    tokenizer = load_tokenizer(cfg.tokenizer_dir)
    torch.manual_seed(cfg.seed)
    model = benchlib._build_on_device(build_model, spec["device"])(cfg, tokenizer)
    eos = tokenizer.eos_token_id
    samples = [{"input_ids": ids.tolist() + [eos]}
               for ids in synthetic_samples(spec["samples"], tuple(spec["lengths"]), spec["vocab"])]
    inner = (DataCollatorWithFlattening() if spec["collator"] == "flattening"
             else DataCollatorForLanguageModeling(tokenizer, mlm=False))
    collator = CountingCollator(inner)
    times: list = []

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.time())

    cuda = spec["device"] == "cuda"
    args = TrainingArguments(output_dir=os.path.join(workdir, "hf_out"), per_device_train_batch_size=spec["mb"],
                             max_steps=cfg.max_steps, learning_rate=cfg.learn_rate, warmup_steps=cfg.warmup_steps,
                             bf16=cuda, use_cpu=not cuda, logging_steps=1, save_strategy="no", report_to="none",
                             disable_tqdm=True, seed=cfg.seed, remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, train_dataset=samples, data_collator=collator, callbacks=[Timer()])
    trainer.remove_callback(PrinterCallback)
    t0 = time.time()
    trainer.train()
    w, n = spec["warmup"], len(times)
    real, total = sum(collator.real[w:n]), sum(collator.total[w:n])  # batch i is built i-th, whatever is prefetched
    return {"losses": [h["loss"] for h in trainer.state.log_history if "loss" in h], "step_times": times, "t0": t0,
            "attn": model.config._attn_implementation, "real_fraction": real / max(total, 1),
            "real_tokens_per_sec": real / max(times[-1] - times[w - 1], 1e-9) if n > w else None}


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------
def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c).replace("|", "/") for c in row) + " |" for row in rows])


def _ratio(value, base, name: str) -> str:
    return f"{value / base:.2f}x {name}" if value and base else "-"


def _pct(value) -> str:
    return f"{value * 100:.1f}%" if value is not None else "-"


def _gib_pair(result: dict) -> str:
    if result.get("peak_alloc_gib") is None:
        return "n/a (cpu)" if result.get("spec", {}).get("device") == "cpu" else "-"
    return f"{result['peak_alloc_gib']:.1f} / {result['peak_reserved_gib']:.1f}"


def _target(check: str, measured: str, target: str, value, bound: float, below: bool = False) -> dict:
    met = "-" if value is None else ("yes" if (value < bound if below else value >= bound) else "no")
    return {"check": check, "measured": measured, "target": target, "met": met}


class Check:
    """The call's state: settings, shared assets, the time budget and the report written after every part."""

    def __init__(self, args):
        self.args, self.start = args, time.time()
        self.device = "cpu" if args.cpu else "cuda"
        self.shapes = CPU_SHAPES if args.cpu else Shapes()
        os.makedirs(args.out, exist_ok=True)
        self.workdir = args.workdir or os.path.join("/tmp", "gpu_check_" + self.device)
        os.makedirs(self.workdir, exist_ok=True)
        self.log_path = os.path.join(args.out, "gpu_check_runs.log")
        given = {k: float(v) for k, v in (g.split("=") for g in args.guard)}
        self.guards = dict(CPU_GUARDS if args.cpu else GUARDS, **given)
        self.report = {"date": str(datetime.date.today()), "command": " ".join([sys.argv[0], *sys.argv[1:]]),
                       "device": self.device, "budget_s": args.budget, "guards": self.guards, "parts": {}}
        self.tokenizer = self.windows = ""

    def elapsed(self) -> float:
        return time.time() - self.start

    def prepare_assets(self) -> None:
        s = self.shapes
        self.tokenizer = benchlib.make_tokenizer(os.path.join(self.workdir, f"tokenizer{s.vocab}"), s.vocab)
        n_tokens = max(max(s.mbs_1b) * (s.warmup + s.steps + 4) * s.seq, s.mb_7b * 40 * s.seq, 200_000)
        self.windows = benchlib.make_token_file(os.path.join(self.workdir, f"markov_v{s.vocab}_{n_tokens}"), n_tokens,
                                                s.vocab, tokenizer_dir=self.tokenizer)

    def run_part(self, name: str, fn) -> None:
        left = self.args.budget - self.elapsed()
        limit = min(self.guards[name], left)
        started = time.time()
        print(f"\n[{self.elapsed():5.0f}s] part {name} (guard {limit:.0f}s)", flush=True)
        if limit < self.shapes.min_run_s:
            part = {"status": f"skipped: {left:.0f}s of the budget left", "table": "skipped", "targets": []}
        else:
            try:
                part = dict(fn(self, started + limit), status="done")
            except Exception as exc:  # a broken part must not cost the others
                import traceback

                traceback.print_exc()
                part = {"status": f"failed: {type(exc).__name__}: {exc}"[:400], "table": "failed", "targets": []}
        part["wall_s"] = round(time.time() - started, 1)
        self.report["parts"][name] = part
        print(part["table"], flush=True)
        self.save()

    def save(self) -> None:
        self.report["elapsed_s"] = round(self.elapsed(), 1)
        with open(os.path.join(self.args.out, "gpu_check.json"), "w") as f:
            json.dump(self.report, f, indent=1, default=str)
        with open(os.path.join(self.args.out, "gpu_check.md"), "w") as f:
            f.write(markdown(self.report))


def markdown(report: dict) -> str:
    env = report.get("environment", {})
    lines = [f"# gpu_check {report['date']}", "", f"Command: `{report['command']}`", "",
             "Machine: " + ", ".join(f"{k} {v}" for k, v in env.items()), "",
             f"Elapsed {report.get('elapsed_s')} s of a {report['budget_s']} s budget.", ""]
    lines += ["## Targets", "", targets_table(report), ""]
    for name, part in report["parts"].items():
        lines += [f"## {name} ({part['status']}, {part.get('wall_s')} s)", "", part["table"], ""]
    return "\n".join(lines) + "\n"


def targets_table(report: dict) -> str:
    targets = [t for part in report["parts"].values() for t in part.get("targets", [])]
    cpu = report["device"] == "cpu"  # toy shapes: the targets are for the GPU
    return md_table(["check", "measured", "target", "met"],
                    [[t["check"], t["measured"], t["target"], "n/a (cpu)" if cpu else t["met"]] for t in targets])


def install_wheels(folder: str, site: str) -> dict:
    """pip-install the given wheels (no index, no dependencies) into `site`, put on the path of every part."""
    wheels = sorted(glob.glob(os.path.join(folder, "*.whl")))
    if not wheels:
        return {"wheels": [], "note": f"no .whl in {folder}"}
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-compile", "--no-cache-dir",
           "--upgrade", "--target", site, *wheels]
    print("$ " + " ".join(cmd), flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (site, os.environ.get("PYTHONPATH", "")) if p)
    sys.path.insert(0, site)
    return {"wheels": [os.path.basename(w) for w in wheels], "rc": done.returncode, "stderr": done.stderr[-2000:]}


def environment(device: str) -> dict:
    """Versions and the GPU, without creating a CUDA context in this (long-lived) process."""
    from importlib import metadata

    env = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "accelerate", "torchao", "liger-kernel", "flash-attn", "triton"):
        try:
            env[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            env[name] = "absent"
    if device == "cuda":
        try:
            query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
            env["gpu"] = subprocess.run(query, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            env["gpu"] = "nvidia-smi not found"
    env["cpus"] = os.cpu_count()
    return env


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="folder for gpu_check.json, gpu_check.md and gpu_check_runs.log")
    ap.add_argument("--cpu", action="store_true", help="tiny shapes on CPU (seconds); what the test suite runs")
    ap.add_argument("--wheels", default="", help="folder of .whl files pip-installed (no deps, no index) first")
    ap.add_argument("--site", default="/tmp/gpu_check_site", help="where --wheels are installed")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, in running order: {', '.join(PARTS)}")
    ap.add_argument("--budget", type=float, default=470.0, help="seconds for the whole call; parts past it are skipped")
    ap.add_argument("--guard", action="append", default=[], help="PART=SECONDS, the most a part may take")
    ap.add_argument("--lowmem_best", default="", help='1b part: JSON of bench spec fields, e.g. {"cfg": '
                                                       '{"chunked_cross_entropy": true}}')
    ap.add_argument("--graph_configs", type=int, default=0, help="graph_breaks: first N configs (default all; CPU 2)")
    ap.add_argument("--graph_preset", default="", help="graph_breaks: model preset (default tiny)")
    ap.add_argument("--workdir", default="", help="synthetic tokenizer and data (default /tmp/gpu_check_<device>)")
    ap.add_argument("--in_process", action="store_true", help="trainer runs in this process (default with --cpu)")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not args.worker and not args.out:
        ap.error("--out DIR is required")
    args.in_process = args.in_process or args.cpu
    args.parts = [p for p in args.parts.split(",") if p]
    for part in args.parts + [g.split("=")[0] for g in args.guard]:
        if part not in PARTS:
            ap.error(f"unknown part {part}; choose from {', '.join(PARTS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(RESULT_TAG + json.dumps(worker(json.loads(args.worker)), default=str), flush=True)
        return 0
    check = Check(args)
    if args.wheels:
        check.report["wheels"] = install_wheels(args.wheels, args.site)
    check.report["environment"] = environment(check.device)
    check.save()
    print(f"gpu_check | {check.report['date']} | {check.device} | " +
          " | ".join(f"{k} {v}" for k, v in check.report["environment"].items()), flush=True)
    check.prepare_assets()
    functions = {"1b": part_1b, "packed": part_packed, "7b": part_7b, "lora7b": part_lora7b, "qlora7b": part_qlora7b,
                 "preference": part_preference, "longctx": part_longctx, "graph_breaks": part_graph_breaks,
                 "gpu_tests": part_gpu_tests}
    for name in args.parts:
        check.run_part(name, functions[name])
    print("\n" + targets_table(check.report), flush=True)
    print(f"wrote {os.path.join(args.out, 'gpu_check.md')} and gpu_check.json in {check.elapsed():.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
