"""Triton kernels of collat, importable as collat.kernels: one file per op (kernels, launchers,
autograd Function, then the validated functional front)."""
