"""The README stays true: its flag table covers every field, CI runs its test command."""
from __future__ import annotations

import dataclasses
import os
import re

from conftest import REPO

from config import TrainConfig


def readme() -> str:
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        return f.read()


def test_every_flag_is_documented():
    text = readme()
    missing = [f.name for f in dataclasses.fields(TrainConfig) if f"`--{f.name}`" not in text]
    assert not missing, f"README flag table lacks {missing}; regenerate it with python -m lowmem.cli.docs"


def test_ci_runs_exactly_the_readme_test_command():
    command = re.search(r"# 2\. run the tests\n(.+)\n", readme()).group(1)
    test_part = command.split("&& ", 1)[1]  # after activating the virtualenv
    with open(os.path.join(REPO, ".ci", "run"), encoding="utf-8") as f:
        assert test_part in f.read()
