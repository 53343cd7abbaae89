"""The whole training step as one CUDA graph.

``GraphedStep(step)`` wraps a :class:`afd_fast.step.DualStep` (or anything called as
``step(images, target) -> dict of tensors`` whose work stays on the GPU without host syncs). The
first ``warmup`` calls run eagerly on a side stream: they are real training steps, and they create
what the capture needs to exist already (optimizer moments, cuBLAS/cuDNN workspaces, NCCL
communicators). The next call copies its batch into static buffers and captures one step: the
forward of all networks, transfer layers and discriminators, the fused losses, the three gradient
sets, their averaging across processes, the three optimizer steps and the fp16 loss-scale update
(batch-norm statistics update inside it too). From then on each call copies the batch into the
buffers and replays the graph. Learning rates live in device tensors that the schedules update in
place, so a graph never needs re-capture for them; a batch of another shape or dtype re-captures.
Alternating DML (``--dml-update alternate``) is one graph too: its call is a whole iteration, the K
networks' updates on the K batches concatenated in the static buffers.
"""
from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass

import torch


@dataclass
class _Captured:
    """One captured step: its graph, the static buffers its kernels read the batch from, and the
    outputs its replays write."""

    graph: torch.cuda.CUDAGraph
    images: torch.Tensor
    target: torch.Tensor
    out: dict


class GraphedStep:
    def __init__(self, step, warmup: int = 3):
        self.step = step
        self.warmup = warmup
        self.stream = torch.cuda.Stream()
        self.captured: _Captured | None = None
        self.signature = None
        self.eager_left = warmup
        self.captures = 0  # how many graphs were captured (re-capture only when the batch changes)
        self.disabled = False  # capture failed: eager steps from then on

    def __call__(self, images: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.disabled:
            return self.step(images, target)
        signature = (images.shape, images.dtype, images.stride(), target.shape, target.dtype)
        if signature != self.signature:
            self.signature, self.captured, self.eager_left = signature, None, self.warmup
        if self.captured is None:
            if self.eager_left > 0:
                self.eager_left -= 1
                return self._on_side_stream(images, target)
            try:
                self.captured = self._capture(images, target)
            except RuntimeError as e:  # e.g. an op that syncs with the host; nothing of the step ran
                print(f"afd_fast: CUDA graph capture failed, training continues with eager steps "
                      f"(--no-cuda-graph hides this): {e}", file=sys.stderr)
                self.disabled = True
                return self.step(images, target)
        captured = self.captured
        captured.images.copy_(images, non_blocking=True)
        captured.target.copy_(target, non_blocking=True)
        captured.graph.replay()
        return captured.out

    def _on_side_stream(self, images, target):
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream), warnings.catch_warnings():
            # optimizers built for capture warn when they run uncaptured: these steps are meant to
            warnings.filterwarnings("ignore", message=".*capturable=True.*")
            out = self.step(images, target)
        torch.cuda.current_stream().wait_stream(self.stream)
        return out

    def _capture(self, images, target) -> _Captured:
        static_images = torch.empty_like(images, memory_format=torch.preserve_format)
        static_target = torch.empty_like(target)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        caller_stream, pool = torch.cuda.current_stream(), torch.cuda.graph_pool_handle()
        try:
            # Capturing records kernels without running them: the step happens at the first replay.
            # thread_local: CUDA calls of other threads (DALI, pin-memory) may go on meanwhile.
            with torch.cuda.graph(graph, pool=pool, stream=self.stream, capture_error_mode="thread_local"):
                out = self.step(static_images, static_target)
        except RuntimeError:
            _abandon_capture(caller_stream, pool)
            raise
        self.captures += 1
        return _Captured(graph, static_images, static_target, out)


def _abandon_capture(caller_stream: torch.cuda.Stream, pool) -> None:
    """After a failed capture: the caller's stream back and allocation into the graph's memory pool
    ended. Some torch versions (2.11) leave both behind when ending a capture raises; the pool's
    memory is left to the graph object (released with it, or kept: once per run)."""
    torch.cuda.set_stream(caller_stream)
    try:
        torch._C._cuda_endAllocateToPool(torch.cuda.current_device(), pool)
    except (AttributeError, RuntimeError):  # already ended by torch, or not in this version
        pass
    torch.cuda.synchronize()
