"""Files of a checkpoint: content hashes in a manifest, verification, disk space, RNG states.

manifest.json (written last, so its presence marks a complete checkpoint) lists every file with its
size and a BLAKE2b-128 hash of its bytes, read back after the write and fsync, so what is verified is
what reached the disk, and the parts a complete checkpoint of the run holds (model/, optimizer, scheduler,
train state, every process's RNG state, ema/). `verify` recomputes them: a truncated, bit-flipped or
missing file, a part missing altogether, or a file whose safetensors header does not parse makes the
checkpoint unusable, and resume falls back to the previous one. Checkpoints written before hashes were
recorded are verified by size.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ..run.errors import DiskFull, UserError

MANIFEST, TRAIN_STATE = "manifest.json", "train_state.json"
PREFIX, TMP_PREFIX, BEST = "step_", ".tmp_step_", "best"
HASH = "blake2b-128"
_CHUNK = 8 << 20


def file_hash(path: str) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)  # hashlib releases the GIL on large chunks: files hash in parallel
    return digest.hexdigest()


def _files(path: str) -> list[str]:
    found = []
    for root, _, names in os.walk(path):
        found += [os.path.relpath(os.path.join(root, n), path) for n in names if n != MANIFEST]
    return sorted(found)


def _hash_all(path: str, rels: list[str]) -> dict[str, str]:
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) + 1)) as pool:
        return dict(zip(rels, pool.map(lambda rel: file_hash(os.path.join(path, rel)), rels)))


def write_manifest(path: str, holds: list[str]) -> dict:
    """fsync every file, then record its size and hash; the manifest itself is fsynced last.

    `holds` names what a complete checkpoint of this run has (files, or folders ending in /), so a part
    missing from the disk and from the file list alike is still found missing.
    """
    rels = _files(path)
    for rel in rels:
        with open(os.path.join(path, rel), "rb") as f:
            os.fsync(f.fileno())
    hashes = _hash_all(path, rels)
    manifest = {"hash": HASH, "holds": holds,
                "files": {rel: {"size": os.path.getsize(os.path.join(path, rel)), "hash": hashes[rel]} for rel in rels}}
    with open(os.path.join(path, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    return manifest


def checkpoint_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, rel)) for rel in _files(path))


def verify(path: str, hashes: bool = True) -> None:
    """Raise ValueError naming the first problem: a file missing, resized, changed, or an unreadable header."""
    manifest_path = os.path.join(path, MANIFEST)
    try:
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{MANIFEST} is unreadable ({exc})") from None
    files = manifest.get("files") if isinstance(manifest.get("files"), dict) else \
        {rel: {"size": size} for rel, size in manifest.items()}  # size-only manifests of earlier versions
    holds = manifest.get("holds", [])
    for part in holds:
        if part not in files and not any(rel.startswith(part) for rel in files if part.endswith("/")):
            raise ValueError(f"{part} is missing (a complete checkpoint of this run holds {', '.join(holds)})")
    for rel, entry in files.items():
        full = os.path.join(path, rel)
        if not os.path.isfile(full):
            raise ValueError(f"{rel} is missing")
        if os.path.getsize(full) != entry["size"]:
            raise ValueError(f"{rel} has {os.path.getsize(full)} bytes, the manifest says {entry['size']} (truncated)")
    if hashes:
        wanted = {rel: e["hash"] for rel, e in files.items() if "hash" in e}
        for rel, got in _hash_all(path, sorted(wanted)).items():
            if got != wanted[rel]:
                raise ValueError(f"{rel} does not match its hash in the manifest (the bytes changed on disk)")
    for rel in files:
        if rel.endswith(".safetensors"):
            _check_safetensors_header(os.path.join(path, rel), rel)


def _check_safetensors_header(full: str, rel: str) -> None:
    from safetensors import safe_open

    try:
        with safe_open(full, framework="pt") as f:
            f.keys()
    except Exception as exc:  # safetensors raises its own error type for a bad header
        raise ValueError(f"{rel} has an unreadable safetensors header ({str(exc).splitlines()[0][:120]})") from None


def read_train_state(path: str) -> dict:
    with open(os.path.join(path, TRAIN_STATE), encoding="utf-8") as f:
        return json.load(f)


def list_checkpoints(root: str) -> tuple[list[str], list[str]]:
    """(complete checkpoints oldest first, incomplete ones: a step_ dir without manifest or a .tmp_ dir)."""
    if not os.path.isdir(root):
        return [], []
    names = sorted(os.listdir(root))
    steps = [os.path.join(root, n) for n in names if n.startswith(PREFIX)]
    complete = [p for p in steps if os.path.isfile(os.path.join(p, MANIFEST))]
    incomplete = [p for p in steps if p not in complete] + [os.path.join(root, n) for n in names
                                                            if n.startswith(TMP_PREFIX)]
    return complete, incomplete


def complete_checkpoints(root: str) -> list[str]:
    return list_checkpoints(root)[0]


def human_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def check_free_space(directory: str, needed_bytes: int, what: str = "a checkpoint") -> None:
    os.makedirs(directory, exist_ok=True)
    free = shutil.disk_usage(directory).free
    if free < needed_bytes:
        raise DiskFull(f"not enough disk space for {what} in '{directory}': {human_bytes(free)} free, about "
                       f"{human_bytes(needed_bytes)} needed; free space (or set --train_state_dir elsewhere) and "
                       "resume with --is_keep_training=True")


# ---------------------------------------------------------------- RNG states of one process

def rng_state() -> dict:
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_checkpoints(path: str) -> int:
    """`train_low_mem.py check_checkpoint DIR`: verify one checkpoint, a checkpoints dir or a run dir; 0 if all pass."""
    path = str(path)
    if os.path.isfile(os.path.join(path, MANIFEST)):
        targets = [path]
    else:
        root = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path
        complete, incomplete = list_checkpoints(root)
        targets = complete + [p for p in [os.path.join(root, BEST)] if os.path.isfile(os.path.join(p, MANIFEST))]
        for partial in incomplete:
            print(f"INCOMPLETE {partial} (no manifest: a save that did not finish; resume ignores it)")
        if not targets and not incomplete:
            raise UserError(f"'{path}' holds no checkpoint (looked for manifest.json and step_* directories)")
    failed = 0
    for target in targets:
        try:
            verify(target)
            step = read_train_state(target).get("step", "?")
            print(f"OK {target} (step {step}, {checkpoint_bytes(target) / 2**20:.1f} MiB)")
        except (OSError, ValueError) as exc:
            failed += 1
            print(f"FAILED {target}: {str(exc).splitlines()[0]}")
    return 2 if failed else 0
