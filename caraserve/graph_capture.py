"""GraphCapture: decode steps as CUDA graphs captured over the eager forward
(engine.cuda_graphs=capture), as SGLang captures its own: no torch.compile, the same kernels as
an eager step, one graph per (batch bucket, LoRA form) made by `caraserve.graphs.DecodeGraphs`.

A step function captured here must read every input from tensors of fixed address (the bucket's
buffers) and do nothing on the host that depends on the step: a replay re-runs the recorded
kernels only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class GraphCapture:
    def __init__(self, device: torch.device):
        self.device = device
        self._pool = None  # every graph's shared memory pool (made at the first capture)
        self._side: torch.cuda.Stream | None = None  # the stream captures and their warm-ups run on

    def step(self, step: Callable):
        """step as a function of the bucket's ForwardBatch whose first call records the graph
        (`record`) and every call replays it: the logits, in the graph's own output tensor,
        which each replay refills."""
        replay, out = None, None

        def run(fb) -> torch.Tensor:
            nonlocal replay, out
            if replay is None:
                replay, out = self.record(lambda: step(fb))
            replay()
            return out

        return run

    def record(self, fn: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
        """(replay, output) of a CUDA graph of fn(): two eager runs on a side stream first (Triton
        builds its kernels and cuBLAS its workspace: nothing may compile or synchronize while a
        stream captures), then the capture on that stream."""
        if self._pool is None:
            # one side stream for every capture (cuBLAS keeps a workspace per stream) and one
            # memory pool for every graph (a step's logits are read before the next replay)
            self._side = torch.cuda.Stream(self.device)
            self._pool = torch.cuda.graph_pool_handle()
        main = torch.cuda.current_stream(self.device)
        self._side.wait_stream(main)
        with torch.cuda.stream(self._side):
            for _ in range(2):
                fn()
        main.wait_stream(self._side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the adapter copy thread's CUDA calls meanwhile do not void the capture
        with torch.cuda.graph(graph, pool=self._pool, stream=self._side, capture_error_mode="thread_local"):
            out = fn()
        main.wait_stream(self._side)
        return graph.replay, out
