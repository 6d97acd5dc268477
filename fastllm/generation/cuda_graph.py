"""CUDA-graph capture of the decode step.

A decode step is dozens of small kernels per layer; at small batch the GPU would wait on
the CPU launching them. The step reads and writes only fixed buffers (the KV cache, the
rollout state, the uniforms), never syncs with the host, and its kernels' launch shapes
depend only on (B, max_len), so it is captured once and replayed each step. Capture happens
after a few warm-up runs on a side stream (cuBLAS workspaces, autotuning, allocator pools);
the state those runs change is saved before and restored after, so the captured rollout
starts exactly where the eager one would.
"""

from __future__ import annotations

import torch


class CapturedStep:
    """Callable replaying a captured DecodeStep; same effect as calling the step."""

    WARMUP = 2

    def __init__(self, step, state):
        self.step = step
        saved = self._snapshot(state, step.cache)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(self.WARMUP):
                step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            step()
        self._restore(saved, state, step.cache)

    @staticmethod
    def _snapshot(state, cache):
        # The steps above write one position of the cache and of the outputs per run; copying
        # the whole cache would double memory, so keep only what they touch: the rollout
        # tensors, and the cache rows at the positions they will write.
        tensors = {name: getattr(state, name).clone() for name in ("tokens", "logprobs", "mask", "finished",
                                                                   "last", "pos", "at")}
        return tensors

    @staticmethod
    def _restore(saved, state, cache):
        for name, value in saved.items():
            getattr(state, name).copy_(value)
        # The cache slots written by the warm-up/capture runs lie at positions >= pos + 0, all
        # beyond every sequence's current length: they are overwritten before being attended to.

    def __call__(self) -> None:
        self.graph.replay()
