"""Where the test suite's CPU time goes: README command 2's pytest with each test's CPU counted.

    python bench/suite_cpu.py                      # python -m pytest -q -n 2 tests, then the tables
    python bench/suite_cpu.py --top 40 -- -m slow  # more rows; arguments after -- go to pytest
    python bench/suite_cpu.py -- tests/test_cli.py # one file

Prints the suite's user + sys (every process it started and waited for, as `time` counts them) and the
CPU of each file and of the costliest tests: the worker's own time around each test plus that of the
processes it waited for (launches, kills, benches). A process a test kills and never waits for (a
worker orphaned by a killed launcher) is in neither. For issue #20's budget: at most 10 minutes of CPU.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_VAR = "SUITE_CPU_OUT"
_spent: dict[str, float] = {}


def _cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):  # setup, call and teardown of one test
    before = _cpu()
    yield
    _spent[item.nodeid] = _cpu() - before


def pytest_sessionfinish(session):
    folder = os.environ.get(OUT_VAR)
    if folder:
        with open(os.path.join(folder, f"{os.environ.get('PYTEST_XDIST_WORKER', 'main')}.json"), "w") as f:
            json.dump(_spent, f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--top", type=int, default=25, help="tests listed")
    ap.add_argument("pytest_args", nargs="*", help="after --: extra pytest arguments")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        env = {**os.environ, OUT_VAR: folder,
               "PYTHONPATH": os.pathsep.join(p for p in (os.path.dirname(__file__), os.environ.get("PYTHONPATH")) if p)}
        paths = [] if any(a.startswith("tests") for a in args.pytest_args) else ["tests"]
        command = [sys.executable, "-m", "pytest", "-q", "-n", "2", *paths, "-p", "suite_cpu", *args.pytest_args]
        start = time.time()
        code = subprocess.run(command, cwd=REPO, env=env).returncode
        wall = time.time() - start
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        spent = {}
        for path in glob.glob(os.path.join(folder, "*.json")):
            with open(path) as f:
                spent.update(json.load(f))
    print(f"\n`{' '.join(command[1:])}`: exit {code}, {len(spent)} tests, {usage.ru_utime:.1f} s user + "
          f"{usage.ru_stime:.1f} s sys = {usage.ru_utime + usage.ru_stime:.1f} s CPU, {wall:.0f} s wall\n")
    by_file: dict[str, float] = {}
    for test, seconds in spent.items():
        by_file[test.split("::")[0]] = by_file.get(test.split("::")[0], 0.0) + seconds
    print("| file | CPU s |\n| --- | --- |")
    for name, seconds in sorted(by_file.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {seconds:.1f} |")
    print("\n| test | CPU s |\n| --- | --- |")
    for name, seconds in sorted(spent.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"| {name} | {seconds:.1f} |")
    sys.exit(code)


if __name__ == "__main__":
    main()
