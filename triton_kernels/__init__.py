"""Triton kernels and their launchers, installed as `fastllm.triton_kernels`.

Each module holds one op's kernels and a launcher that takes 2-D contiguous tensors; the
argument checks users see, autograd and backend choice live in `fastllm.ops`.
"""
