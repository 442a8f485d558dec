"""Triton kernels and their launchers. Kernels never validate user input (``function.py`` does)
and never import the layer; importing this package imports ``triton``."""
