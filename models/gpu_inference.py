"""Inference on a GPU: channels_last activations and the UNet replayed from CUDA graphs or compiled.

An SD UNet step is ~1,000 kernels. At small batches the GPU finishes each faster than Python launches the next, so
the step is launch-bound (batch 1 at 512 px: the GPU idles most of the step); a CUDA graph records the step's
kernels once per input bucket (shapes, dtypes and which inputs are given) and replays them with one launch.
Replays read their inputs from static buffers the call copies into and their output is copied out, so a graph's
result is the eager step's, bit for bit (the same kernels on the same data), and nothing of one call outlives it.

What a graph cannot see is refused rather than replayed wrong: a module hook (a LoRA adapter's low-rank term,
models/lora.py, is one) makes the call run eagerly, as does autograd, a CPU tensor, or a bucket whose capture
failed (logged once). `compile` instead hands the UNet to `torch.compile`, whose guards recompile what changed.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from models.names import GPU_MODES, GpuMode
from models.unet import UNet

if TYPE_CHECKING:
    from torch.cuda import _POOL_HANDLE

log = logging.getLogger(__name__)

#: graphs kept per UNet (least recently used dropped): enough for the (batch, size) buckets a worker meets
MAX_GRAPHS = 16
#: eager runs before a capture (cuBLAS / cuDNN pick and allocate their workspaces on the first calls)
WARMUP_RUNS = 2

UNetForward = Callable[..., Tensor]


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: dict[str, Tensor]
    output: Tensor


def _key(inputs: dict[str, Tensor | None]) -> Hashable:
    return (torch.is_inference_mode_enabled(),
            *((name, None) if t is None else (name, tuple(t.shape), t.dtype, t.stride(), t.device)
              for name, t in inputs.items()))


def _hooked(modules: list[nn.Module]) -> bool:
    """Whether any of the modules has a forward (pre-)hook, which a graph would not run."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


class CudaGraphForward:
    """A UNet's forward, replayed from one CUDA graph per input bucket (see the module docstring). Installed as the
    UNet's `forward` by `optimize_for_gpu_inference`; `eager` is the method it stands for."""

    def __init__(self, unet: UNet, max_graphs: int = MAX_GRAPHS) -> None:
        #: the UNet's modules, listed once: every call checks them for hooks (LoRA's come and go per batch)
        self.modules = list(unet.modules())
        self.eager: UNetForward = unet.forward
        self.max_graphs = max_graphs
        self.graphs: OrderedDict[Hashable, _Graph] = OrderedDict()
        self.failed: set[Hashable] = set()
        #: one memory pool for every graph (made at the first capture): calls run one at a time and copy their
        #: output out, so one graph's temporaries may reuse another's (it holds the largest bucket's activations,
        #: not their sum)
        self.pool: _POOL_HANDLE | None = None
        self.captures = 0
        self.replays = 0

    def __call__(self, x: Tensor, timesteps: Tensor, context: Tensor | None = None,
                 y: Tensor | None = None) -> Tensor:
        inputs = {"x": x, "timesteps": timesteps, "context": context, "y": y}
        if torch.is_grad_enabled() or not x.is_cuda or _hooked(self.modules):
            return self.eager(x, timesteps, context, y)
        key = _key(inputs)
        if key in self.failed:
            return self.eager(x, timesteps, context, y)
        graph = self.graphs.get(key)
        if graph is None:
            graph = self._capture(key, inputs)
            if graph is None:
                return self.eager(x, timesteps, context, y)
        self.graphs.move_to_end(key)
        for name, static in graph.inputs.items():
            source = inputs[name]
            assert source is not None
            static.copy_(source)
        graph.graph.replay()
        self.replays += 1
        return graph.output.clone()

    def _capture(self, key: Hashable, inputs: dict[str, Tensor | None]) -> _Graph | None:
        static = {name: t.clone() for name, t in inputs.items() if t is not None}

        def step() -> Tensor:
            return self.eager(static["x"], static["timesteps"], static.get("context"), static.get("y"))

        try:
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(WARMUP_RUNS):
                    step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                output = step()
        except torch.cuda.OutOfMemoryError:
            raise  # the caller's to handle (the worker splits the batch); the bucket may fit later
        except RuntimeError as exc:  # an op that cannot be captured: this bucket runs eagerly from now on
            log.warning("CUDA graph capture failed for a UNet input bucket; it runs eagerly: %s", exc)
            self.failed.add(key)
            return None
        self.graphs[key] = captured = _Graph(graph, static, output)
        self.captures += 1
        while len(self.graphs) > self.max_graphs:
            self.graphs.popitem(last=False)
        return captured


def optimize_for_gpu_inference(model: nn.Module, mode: GpuMode = "graphs") -> nn.Module:
    """By `mode` (GPU_MODES), in place: the UNets' forward replayed from CUDA graphs (`graphs`) or compiled
    (`compile`), both with channels_last activations, or the model left as it is (`eager`: NCHW, which is faster
    than channels_last without Inductor on an H200, docs/benchmarks.md). Only a model on a CUDA device is changed.
    """
    if mode not in GPU_MODES:
        raise ValueError(f"gpu mode must be one of {GPU_MODES}, got {mode!r}")
    first = next(model.parameters(), None)
    if mode == "eager" or first is None or first.device.type != "cuda":
        return model
    model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    for unet in (m for m in model.modules() if isinstance(m, UNet)):
        if isinstance(unet.forward, CudaGraphForward):
            continue
        if mode == "graphs":
            unet.forward = CudaGraphForward(unet)  # type: ignore[method-assign]
        elif mode == "compile" and getattr(unet, "_compiled_call_impl", None) is None:  # not compiled twice
            unet.compile()
    return model


def graphs_of(unet: nn.Module) -> CudaGraphForward | None:
    """The UNet's CUDA-graph forward, when it has one (for counts: captures, replays)."""
    forward = getattr(unet, "forward", None)
    return forward if isinstance(forward, CudaGraphForward) else None
