"""The package's version: read by ``pyproject.toml`` (``dynamic = ["version"]``), by
``lora_kernels.__version__`` and by the tuning cache (decisions measured on other code are not
reused)."""

__version__ = "0.1.0"
