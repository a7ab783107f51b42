"""One owner per run: a lock in the run's directory, no fresh start over an existing run, logs that belong
to one run, and workers that leave when their launcher dies.

The lock (`<output_dir>/<run_name>/.lock`) names the pid, host and start time of the main process that
holds it. A second run of the same name is refused while that process lives; a lock left by a process
that died (same host, pid gone or reused) is taken over with a message. A lock from another host cannot
be checked from here: the message says which host and how to remove it.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sys
import threading
import time

import psutil

from ..checkpoint.files import list_checkpoints
from ..run.errors import UserError, log_dir_full

LOCK_NAME, OWNER_NAME = ".lock", "owner.json"


def _process_started(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


class RunLock:
    """Held by the main process for the whole run; released on exit (a kill leaves it stale, which is detected)."""

    def __init__(self, run_dir: str):
        self.run_dir, self.path = run_dir, os.path.join(run_dir, LOCK_NAME)
        self.held = False
        self.created: list[str] = []

    def _mine(self) -> dict:
        return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "process_start": _process_started(os.getpid())}

    def acquire(self, log) -> None:
        self.created = [d for d in _missing_parents(self.run_dir)]  # removed again if the run writes nothing
        os.makedirs(self.run_dir, exist_ok=True)
        for _ in range(3):  # a stale lock taken over by two runs at once: one of them retries and sees the other
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale(log)
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self._mine(), f)
            self.held = True
            return
        raise UserError(f"could not take the lock {self.path}; another run of this name is starting")

    def _take_over_if_stale(self, log) -> None:
        try:
            with open(self.path, encoding="utf-8") as f:
                owner = json.load(f)
        except (OSError, ValueError):
            owner = {}
        name = os.path.basename(self.run_dir.rstrip("/"))
        host, pid = owner.get("host", "?"), owner.get("pid")
        if host != socket.gethostname():
            raise UserError(f"run '{name}' is locked by pid {pid} on host {host} (since {owner.get('started', '?')}); "
                            f"if that run is no longer alive, delete {self.path}; or pick another --run_name")
        started = _process_started(pid) if isinstance(pid, int) else None
        alive = started is not None and (owner.get("process_start") is None
                                         or abs(started - owner["process_start"]) < 1.0)
        if alive:
            raise UserError(f"run '{name}' is already running (pid {pid}, since {owner.get('started', '?')}); wait for "
                            "it, stop it, or start this one with another --run_name")
        log(f"taking over the lock of run '{name}' from pid {pid}, which is no longer running")
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        try:
            with open(self.path, encoding="utf-8") as f:
                if json.load(f).get("pid") != os.getpid():
                    return
            os.remove(self.path)
        except (OSError, ValueError):
            return
        for directory in self.created:  # a run refused before it wrote anything leaves no empty directories
            try:
                os.rmdir(directory)
            except OSError:
                break


def _missing_parents(path: str) -> list[str]:
    """path and its parents that do not exist yet, deepest first."""
    missing = []
    path = os.path.abspath(path)
    while path and not os.path.exists(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing


def existing_run(cfg) -> list[str]:
    """What an earlier run of this name left: checkpoints and the final model (empty: nothing)."""
    complete, incomplete = list_checkpoints(cfg.checkpoint_dir())
    found = []
    if complete or incomplete:
        found.append(f"{len(complete)} checkpoint(s) in {cfg.checkpoint_dir()}")
    if os.path.isdir(cfg.final_dir()):
        found.append(f"a final model in {cfg.final_dir()}")
    return found


def refuse_or_clear_existing(cfg, log) -> None:
    """A fresh start over an existing run is refused, unless --overwrite_output_dir=True deletes the old run."""
    found = existing_run(cfg)
    if not found:
        return
    if not cfg.overwrite_output_dir:
        raise UserError(f"run '{cfg.run_name}' already exists ({'; '.join(found)}); continue it with "
                        "--is_keep_training=True, start a new one with another --run_name, or replace it with "
                        "--overwrite_output_dir=True")
    for path in (cfg.checkpoint_dir(), cfg.final_dir(), cfg.logging_dir()):
        if os.path.isdir(path):
            shutil.rmtree(path)
    log(f"--overwrite_output_dir: deleted the earlier run '{cfg.run_name}' ({'; '.join(found)}, and its logs in "
        f"{cfg.logging_dir()})")


def check_log_dir(cfg) -> None:
    """Two runs never share a metrics.jsonl: refuse a log dir that names another run as its writer."""
    path, mine = os.path.join(cfg.logging_dir(), OWNER_NAME), os.path.abspath(cfg.run_dir())
    if not os.path.isfile(path):
        return
    try:
        with open(path, encoding="utf-8") as f:
            owner = json.load(f).get("run_dir")
    except (OSError, ValueError):
        owner = None
    if owner and owner != mine:
        raise UserError(f"log dir '{cfg.logging_dir()}' belongs to the run in {owner}; give this run its own with "
                        "--log_dir, --run_name or --wandb_run_name")


def claim_log_dir(cfg) -> None:
    """Name this run as the log dir's writer; the file appears whole or not at all (a full disk is one line)."""
    check_log_dir(cfg)
    path = os.path.join(cfg.logging_dir(), OWNER_NAME)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        os.makedirs(cfg.logging_dir(), exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"run_dir": os.path.abspath(cfg.run_dir())}, f)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise log_dir_full(cfg.logging_dir(), exc) or exc from None


def exit_with_launcher(main_pid: int | None = None, poll: float = 1.0) -> None:
    """Under a launcher, leave when it dies (or when this host's main process does): no orphan trains on."""
    if "LOCAL_RANK" not in os.environ:
        return  # a plain `python train_low_mem.py` may outlive its shell (nohup) on purpose
    parent = os.getppid()

    def watch():
        while True:
            time.sleep(poll)
            gone = os.getppid() != parent
            if not gone and main_pid and main_pid != os.getpid():
                gone = not psutil.pid_exists(main_pid)
            if gone:
                sys.stderr.write(f"error: the launcher or the main process of this run is gone; process {os.getpid()} "
                                 "stops (resume with --is_keep_training=True)\n")
                sys.stderr.flush()
                os._exit(3)

    threading.Thread(target=watch, name="exit-with-launcher", daemon=True).start()
