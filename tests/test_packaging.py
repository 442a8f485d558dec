"""The package as users install it outside this repository: a wheel built from the checkout,
installed into a fresh virtual environment, imports every module from there."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import sysconfig
import venv

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_a_built_wheel_installs_and_imports_in_a_fresh_venv(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
         "-w", str(dist), str(ROOT)],
        check=True, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    (wheel,) = dist.glob("lora_kernels-*.whl")
    env = tmp_path / "env"
    venv.create(env, with_pip=True)
    python = env / "bin" / "python"
    # The wheel alone, no dependencies fetched: torch and the rest come from this environment's
    # site-packages, appended after the fresh one's (a .pth line adds a path, and runs no
    # editable-install finder), so lora_kernels itself can only come from the wheel.
    subprocess.run(
        [str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)],
        check=True, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    ours = sysconfig.get_paths()["purelib"]
    (pathlib.Path(site) / "host_packages.pth").write_text(ours + "\n")
    script = (
        "import importlib, pkgutil, pathlib, lora_kernels\n"
        "root = pathlib.Path(lora_kernels.__file__).parent\n"
        f"assert root.is_relative_to({str(env)!r}), root\n"
        "names = [m.name for m in pkgutil.walk_packages([str(root)], 'lora_kernels.')]\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "print(lora_kernels.__version__, len(names))\n"
    )
    out = subprocess.run(
        [str(python), "-c", script], capture_output=True, text=True, timeout=600,
        cwd=tmp_path,  # not the checkout: its lora_kernels/ must not be importable
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    version, count = out.stdout.split()
    import lora_kernels

    assert version == lora_kernels.__version__
    expected = sum(1 for _ in (ROOT / "lora_kernels").rglob("*.py")) - 1  # not the top __init__
    assert int(count) == expected, (count, expected)
