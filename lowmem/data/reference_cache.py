"""Reference log-probabilities stored beside preference data: computed once, read by row at O(1) memory.

Files of a cache with prefix P (one cache per dataset):
  P.json  the header: kind "reference_cache", what the numbers depend on (`fingerprint`: the reference model's
          weights, the tokenizer, the chat template, max_seq_len, the truncation rule, the columns and the data
          files with their sizes and times), the number of rows, and whether every row is computed
  P.bin   16 bytes per row of the dataset's files, in file order: the reference model's summed log-probability
          of the chosen answer and of the rejected one (float64), PENDING until computed, SKIPPED for a row the
          encoder skips
Rows are computed in any order by any number of processes (each writes its own rows in place), so an
interrupted build continues with the rows still PENDING, whatever the process count (and says from which row).
A cache whose fingerprint differs from the run's is refused, naming what differs. A complete cache's header holds
a BLAKE2b hash of every block of BLOCK_ROWS rows, checked before each use (a 10M-pair cache is 160 MB, read in
well under a second): a block that changed on disk, or rows cut off the end of the file, are said in one line and
computed again; nothing unverified reaches training.
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from ..run.errors import UserError

FORMAT_VERSION = 1
RECORD = np.dtype([("chosen", "<f8"), ("rejected", "<f8")])
PENDING = np.frombuffer(b"\xff" * 16, dtype=RECORD)[0]  # NaNs with every bit set: never a computed value
SKIPPED = np.frombuffer(b"\x01\x00\x00\x00\x00\x00\xf8\x7f" * 2, dtype=RECORD)[0]  # another NaN payload
BLOCK_ROWS = 4096  # rows under one hash: 64 KiB


def block_hashes(path: str, n_rows: int) -> list[str]:
    """A BLAKE2b-128 hash of each block of BLOCK_ROWS rows of the first n_rows rows of a cache file."""
    hashes, size = [], BLOCK_ROWS * RECORD.itemsize
    with open(path, "rb") as f:
        for _ in range(0, n_rows, BLOCK_ROWS):
            hashes.append(hashlib.blake2b(f.read(size), digest_size=16).hexdigest())
    return hashes


def _bits(record) -> bytes:
    return np.asarray(record, dtype=RECORD).tobytes()


class ReferenceCache:
    """The cache files of one dataset; `values(row)` reads a row's pair of numbers."""

    def __init__(self, prefix: str):
        self.prefix, self.header_path, self.data_path = prefix, prefix + ".json", prefix + ".bin"
        self._fd: int | None = None

    @staticmethod
    def prefix_for(paths: list[str], name: str, cache_dir: str = "") -> str:
        """Where a dataset's cache lives: beside its first file (or in cache_dir), named after the dataset."""
        return os.path.join(cache_dir or os.path.dirname(os.path.abspath(paths[0])), f"{name}.reference")

    def header(self) -> dict | None:
        try:
            with open(self.header_path, encoding="utf-8") as f:
                header = json.load(f)
        except (OSError, ValueError):
            return None
        return header if isinstance(header, dict) and header.get("kind") == "reference_cache" else None

    def differences(self, fingerprint: dict) -> list[str]:
        """What this cache was computed for that the run does not match ([] for a match; a missing cache differs)."""
        header = self.header()
        if header is None or header.get("format_version") != FORMAT_VERSION:
            return ["no cache of this version"]
        saved = header.get("fingerprint", {})
        return [key for key in fingerprint if saved.get(key) != fingerprint[key]]

    @property
    def complete(self) -> bool:
        header = self.header()
        return bool(header and header.get("complete") and os.path.isfile(self.data_path)
                    and os.path.getsize(self.data_path) == header["n_rows"] * RECORD.itemsize)

    def prepare(self, fingerprint: dict, n_rows: int, remembered: dict | None = None, log=print) -> bool:
        """(main process) Whether this cache is complete and verified for `fingerprint`; otherwise it is made ready to
        compute its PENDING rows: a new file, or the one already there with its unverified rows marked PENDING again.
        `remembered`: more to keep in the header (the weight files' sizes and times, so their hashes are reused)."""
        header = self.header()
        if header and header.get("complete") and self.differences(fingerprint):
            refuse_mismatch(self, fingerprint)
        os.makedirs(os.path.dirname(os.path.abspath(self.prefix)), exist_ok=True)
        if self.differences(fingerprint) or not os.path.isfile(self.data_path):
            if header and not self.differences(fingerprint):
                log(f"reference cache '{self.data_path}' is missing: computing it anew")
            self._new_file(n_rows)
        else:
            self._keep_verified_rows(header, n_rows, log)
            pending = self.pending_rows()
            if header.get("complete") and not len(pending):
                if "block_hashes" not in header:  # written before blocks were hashed
                    self._write_header({**header, "block_rows": BLOCK_ROWS,
                                        "block_hashes": block_hashes(self.data_path, n_rows)})
                return True
            if not header.get("complete"):
                where = f"from row {int(pending[0])}" if len(pending) else "(every row was written; marking it done)"
                log(f"reference cache '{self.data_path}': continuing an interrupted build {where} "
                    f"({n_rows - len(pending)} of {n_rows} rows already computed)")
        self._write_header({"kind": "reference_cache", "format_version": FORMAT_VERSION, "fingerprint": fingerprint,
                            "n_rows": n_rows, "complete": False, **(remembered or {})})
        return False

    def _new_file(self, n_rows: int) -> None:
        with open(self.data_path + ".tmp", "wb") as f:
            block = _bits(PENDING) * 65536
            for first in range(0, n_rows, 65536):
                f.write(block[: min(65536, n_rows - first) * RECORD.itemsize])
        os.replace(self.data_path + ".tmp", self.data_path)

    def _keep_verified_rows(self, header: dict, n_rows: int, log) -> None:
        """Rows cut off the end of the file, and blocks whose bytes differ from the hash written with them, become
        PENDING again (said once each); a file longer than n_rows is cut to it."""
        saved = header.get("block_hashes") if header.get("block_rows") == BLOCK_ROWS else None
        size, expected = os.path.getsize(self.data_path), n_rows * RECORD.itemsize
        present = min(size // RECORD.itemsize, n_rows)
        if saved and present < n_rows:
            present -= present % BLOCK_ROWS  # the rows of a block cut in two cannot be checked against its hash
        if size != expected:
            how = "cut short" if size < expected else "longer than that"
            again = f"computing rows {present}-{n_rows - 1} again" if present < n_rows else "dropping the extra bytes"
            log(f"reference cache '{self.data_path}' holds {size} bytes where its {n_rows} rows take {expected} (the "
                f"file is {how}): {again}")
        if present < n_rows or size != expected:
            with open(self.data_path, "r+b") as f:
                f.truncate(present * RECORD.itemsize)
                f.seek(0, os.SEEK_END)
                f.write(_bits(PENDING) * (n_rows - present))
        if not saved:
            return
        now = block_hashes(self.data_path, n_rows)
        bad = [b for b, (then, found) in enumerate(zip(saved, now)) if then != found and b * BLOCK_ROWS < present]
        if not bad:
            return
        spans = [(b * BLOCK_ROWS, min((b + 1) * BLOCK_ROWS, n_rows)) for b in bad]
        log(f"reference cache '{self.data_path}': rows {', '.join(f'{a}-{z - 1}' for a, z in spans[:4])}"
            f"{' ...' if len(spans) > 4 else ''} differ from the hashes written when they were computed (the file "
            "changed on disk): computing them again")
        fd = os.open(self.data_path, os.O_WRONLY)
        try:
            for first, end in spans:
                os.pwrite(fd, _bits(PENDING) * (end - first), first * RECORD.itemsize)
            os.fsync(fd)
        finally:
            os.close(fd)

    def pending_rows(self) -> np.ndarray:
        """Rows not computed yet, in file order."""
        records = np.fromfile(self.data_path, dtype=RECORD)
        return np.flatnonzero(records.view(np.uint8).reshape(-1, 16).view(np.uint64)[:, 0] ==
                              np.frombuffer(_bits(PENDING)[:8], np.uint64)[0])

    def write(self, rows: list[int], values: list[tuple[float, float] | None]) -> None:
        """Each row's (chosen, rejected) sums, or None for a row the encoder skipped; flushed to the disk."""
        fd = os.open(self.data_path, os.O_WRONLY)
        try:
            for row, value in zip(rows, values):
                record = SKIPPED if value is None else np.array([tuple(value)], dtype=RECORD)[0]
                os.pwrite(fd, _bits(record), int(row) * RECORD.itemsize)
            os.fsync(fd)
        finally:
            os.close(fd)

    def finish(self) -> None:
        """(main process, once every row is written) Mark the cache complete, with the hash of each block of rows."""
        header = self.header()
        header.update(complete=True, block_rows=BLOCK_ROWS, block_hashes=block_hashes(self.data_path, header["n_rows"]))
        self._write_header(header)

    def _write_header(self, header: dict) -> None:
        with open(self.header_path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(header, f, indent=1)
        os.replace(self.header_path + ".tmp", self.header_path)

    def values(self, row: int) -> tuple[float, float] | None:
        """A row's (chosen, rejected) reference sums; None for a skipped row."""
        if self._fd is None:
            self._fd = os.open(self.data_path, os.O_RDONLY)
        raw = os.pread(self._fd, RECORD.itemsize, int(row) * RECORD.itemsize)
        if raw == _bits(SKIPPED) or raw == _bits(PENDING):
            return None
        record = np.frombuffer(raw, dtype=RECORD)[0]
        return float(record["chosen"]), float(record["rejected"])

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass


def refuse_mismatch(cache: ReferenceCache, fingerprint: dict) -> None:
    """A one-line UserError naming what a complete cache was computed with that this run differs in."""
    header = cache.header() or {}
    saved = header.get("fingerprint", {})
    differ = [key for key in fingerprint if saved.get(key) != fingerprint[key]]
    described = "; ".join(f"{key} {_short(saved.get(key))} -> {_short(fingerprint[key])}" for key in differ[:3])
    raise UserError(f"reference cache '{cache.header_path}' was computed for other settings ({described}); its "
                    "numbers would not be this run's reference. Delete it to compute it anew, or put this run's "
                    "elsewhere with --reference_cache_dir")


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:18] + "..." + text[-18:]
