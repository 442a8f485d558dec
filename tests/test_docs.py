"""The examples in README.md, and docs/usage.md's mixed-precision example, run as written."""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"```python\n(.*?)```", re.S)
README_BLOCKS = BLOCK.findall((ROOT / "README.md").read_text())


def test_readme_has_examples():
    assert README_BLOCKS


@pytest.mark.parametrize("block", README_BLOCKS)
def test_readme_example_runs(block):
    exec(compile(block, "README.md", "exec"), {})


def test_usage_mixed_precision_example_runs():
    text = (ROOT / "docs" / "usage.md").read_text()
    section = text.split("## Mixed precision")[1].split("\n## ")[0]
    (block,) = BLOCK.findall(section)
    exec(compile(block, "docs/usage.md", "exec"), {})
