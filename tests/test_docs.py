"""The examples in README.md, every code block of docs/usage.md, docs/qlora.md's and
docs/dora.md's run as written, offline."""

from __future__ import annotations

import importlib.util
import pathlib
import re
import socket
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"```python\n(.*?)```", re.S)
README_BLOCKS = BLOCK.findall((ROOT / "README.md").read_text())


def usage_blocks():
    """``(section slug, block)`` for every python block of docs/usage.md, in order."""
    blocks = []
    for section in (ROOT / "docs" / "usage.md").read_text().split("\n## ")[1:]:
        title = section.split("\n", 1)[0]
        slug = "-".join(re.findall(r"[a-z0-9_]+", title.lower()))
        for i, block in enumerate(BLOCK.findall(section)):
            # (FSDP2's blocks carry its name: `make floor` leaves them out, see the Makefile)
            blocks.append((f"{slug}-{i}" + ("-fsdp2" if "fully_shard(" in block else ""), block))
    return blocks


USAGE_BLOCKS = usage_blocks()


@pytest.fixture(autouse=True)
def peft_as_it_was():
    """A block may call lora_kernels.patch_peft() (the global form): it ends with the block."""
    yield
    if importlib.util.find_spec("peft") is not None:
        import lora_kernels

        lora_kernels.unpatch_peft()


def test_readme_has_examples():
    assert README_BLOCKS


@pytest.mark.parametrize("block", README_BLOCKS)
def test_readme_example_runs(block):
    exec(compile(block, "README.md", "exec"), {})


QLORA_BLOCKS = BLOCK.findall((ROOT / "docs" / "qlora.md").read_text())
DORA_BLOCKS = BLOCK.findall((ROOT / "docs" / "dora.md").read_text())


@pytest.mark.parametrize("block", DORA_BLOCKS)
def test_dora_example_runs(block):
    if "import bitsandbytes" in block:  # (QDoRA's)
        pytest.importorskip("bitsandbytes")
    exec(compile(block, "docs/dora.md", "exec"), {})


@pytest.mark.parametrize("block", QLORA_BLOCKS)
def test_qlora_example_runs(block):
    pytest.importorskip("bitsandbytes")
    exec(compile(block, "docs/qlora.md", "exec"), {})


def test_usage_covers_the_whole_model_api():
    """A block for each section that has one to show (the list fails if one goes missing)."""
    sections = {slug.removesuffix("-fsdp2").rsplit("-", 1)[0] for slug, _ in USAGE_BLOCKS}
    assert sections >= {
        "peft-in-place-patch_peft",
        "inject-into-a-transformers-or-any-model",
        "modules-trained-in-full-modules_to_save",
        "convert-a-peft-model",
        "save-and-load-adapters-in-peft-s-format",
        "merge-and-unload-a-whole-model",
        "training-with-transformers-trainer",
        "mixed-precision-torch-autocast-and-float32-adapters",
        "torch-compile",
        "scaling-out-ddp-fsdp-deepspeed",
    }, sections


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "block",
    [
        pytest.param(b, id=s, marks=[pytest.mark.inductor] if "torch.compile(" in b else [])
        for s, b in USAGE_BLOCKS
    ],
)
def test_usage_example_runs(block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # whatever a block writes lands here
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # The distributed blocks set these only where torchrun has not: a world of one, on a port
    # free now (monkeypatch puts the environment back afterwards).
    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    if "import deepspeed" in block:
        # DeepSpeed picks its accelerator and comm backend once per process: a fresh one.
        pytest.importorskip("deepspeed", reason="deepspeed is not installed (make test does)")
        done = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-4000:]
        return
    exec(compile(block, "docs/usage.md", "exec"), {"__name__": "__docs__"})
