"""Triton kernels, one file per op, each with @triton.jit kernels and a launcher taking torch tensors.

Installed as `lookfast.kernels`. Importing a module here needs triton; set TRITON_INTERPRET=1 before importing to run
the kernels on CPU tensors.
"""
