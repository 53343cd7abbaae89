"""The step that ``GraphedStep`` captures in one CUDA graph is capturable: proven on the CPU as far as
the CPU allows.

``afd_fast.graph.GraphedStep`` runs ``DualStep.__call__`` eagerly for ``warmup`` calls, captures
the next call and from then on replays it. A replay runs the same kernels, on the same memory
addresses, with the same host-side (Python) scalar arguments as the captured call; nothing runs on
the host in between. So the step is capturable if, after the warm-up:

1. it never waits for the device (no value read on the host: ``.item()``, ``float``/``bool``/``int``
   of a tensor, ``.tolist()``, ``.cpu()``, ``.numpy()``; no op whose output shape depends on the
   data: ``nonzero``, ``masked_select``, ``unique``, boolean-mask indexing, ...; no copy to another
   device and no ``torch.tensor(...)`` host-to-device copy; no tensor created without a device,
   which on a GPU run would be a host tensor);
2. every step issues the same ops with the same shapes, dtypes, strides and the same Python
   numbers (a graph freezes the captured step's numbers: a learning rate, a step count or a loss
   scale passed as a Python number would be stale from the first replay on);
3. it allocates no new persistent state: parameters, batch-norm statistics, optimizer moments and
   step counts, learning-rate tensors, the loss scale and the static input buffers keep their
   storage, and these are the only tensors it reads that it did not create itself. Tensors it
   creates are the graph's own (its memory pool) and are new each eager call, which proves nothing;
   a call must never read a tensor that the previous call created (state re-created each step: the
   graph would keep reading the captured call's copy).

The warm-up calls are not checked: GraphedStep runs them eagerly, and they create state (Adam's
moments) that later calls read.

``CaptureChecker`` checks these under a ``TorchDispatchMode`` (every aten op the step issues,
forward, backward, all-reduce and optimizer) and a ``TorchFunctionMode`` (host reads that dispatch
no aten op on the CPU: ``.cpu()``, ``.numpy()``, ``.tolist()``, and factory calls without a device),
and fails with the op and the source line that issued it (the afd_fast/ and tests/ frames).

The ``DualStep`` is built as ``afd_fast.train`` builds it for ``--cuda-graph``: ``AFDModel`` of the
networks, channels-last, the compiled fused losses, torch's fused SGD/Adam with learning rates in
device tensors (``fused=True`` is the CUDA default; on the CPU it must be asked for) and
``capturable=True`` (torch takes it on the CPU too; the fused optimizers run the same Python path
with or without it, only CUDA's capture health check reads it), ``LossScale`` for fp16 with fp16
input batches, the trainer's all-reduce of the gradient sets (one-process gloo group) and its
``MultiStepLR`` schedules.

What only a GPU can show (``tests/test_graph_cuda.py``, ``benchmarks/gpu_check.sh``):

* the CUDA kernels behind the ops: the CPU run sees each aten/afd_fast op as one call and cannot see
  inside it. torch's fused CPU optimizers read the learning-rate tensor on the host inside the
  kernel, the CUDA ones on the device; ``afd_fast``'s CPU loss kernel checks targets on the host,
  the CUDA one does not (``test_cuda_kernels_launch_on_the_current_stream_without_host_sync`` reads
  its source);
* host-device placement: on the CPU every tensor is a host tensor, so a copy between host and
  device that the code spells ``.to(device)`` with a CPU device is invisible here (``.cpu()``,
  ``.numpy()``, ``.tolist()`` and device-less factories are caught);
* ``capturable=True`` checks of torch's optimizers (CUDA only), cuDNN/cuBLAS workspaces and
  algorithm selection, the graph's memory pool, side-stream warm-up, NCCL all-reduce in the graph,
  and that replaying gives the eager step's numbers.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import linecache
import os
import re
import sys

import pytest
import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import afd_fast
from afd_fast import ops, train
from afd_fast.methods import METHODS, method_spec
from afd_fast.mixing import Mixing
from afd_fast.model import AFDModel
from afd_fast.step import DualStep, LossScale
from afd_fast.graph import GraphedStep
from afd_fast.schedule import LearningRates, Schedule
from afd_fast.models import build_network
from afd_fast.models.cifar import CifarResNet, WideResNet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(afd_fast.__file__)))
USER_DIRS = tuple(os.path.dirname(os.path.abspath(f)) + os.sep for f in (afd_fast.__file__, __file__))
WARMUP = inspect.signature(GraphedStep).parameters["warmup"].default  # eager calls before the capture
CHECKED = 3  # the captured call and two more that replays stand for


class CaptureHazard(AssertionError):
    pass


# --- where an op came from --------------------------------------------------------------------------

def _user_frames(stop) -> tuple[tuple[str, int, str], ...]:
    """(file, line, function) of the afd_fast/ and tests/ frames inside the checked step, innermost
    first; walking stops at the checker's own ``run`` frame (its caller is not part of the step)."""
    frames, f = [], sys._getframe(2)
    while f is not None and f.f_code is not stop:
        name = f.f_code.co_filename
        if name.startswith(USER_DIRS) and f.f_code not in _CHECKER_CODE:
            frames.append((name, f.f_lineno, f.f_code.co_name))
        f = f.f_back
    return tuple(frames)


def _where(frames) -> str:
    if not frames:
        return "  (no afd_fast/ or tests/ frame: inside torch, called by the step)"
    lines = []
    for n, (name, line, func) in enumerate(frames[:6]):
        code = linecache.getline(name, line).strip()
        lines.append(f"  {'at' if n == 0 else 'called from'} {os.path.relpath(name, REPO)}:{line} in {func}: {code}")
    return "\n".join(lines)


def _storage(t: torch.Tensor):
    """The address of a tensor's storage (views share it); None for empty or storage-less tensors."""
    try:
        return t.untyped_storage().data_ptr() if t.numel() else None
    except (RuntimeError, NotImplementedError):
        return None


@dataclasses.dataclass
class Op:
    name: str
    args: tuple  # per argument: tensor metadata (+ storage when external) or the Python value
    frames: tuple
    node: str | None  # the autograd node whose backward issued it

    def where(self, why: str = "") -> str:
        suffix = f" (in the backward of {self.node})" if self.node else ""
        return f"{self.name}{suffix}{' ' + why if why else ''}\n{_where(self.frames)}"


# --- the two modes ------------------------------------------------------------------------------------

# ops that read device data on the host, or whose output shape depends on the data (a host sync on
# CUDA to size the output); the tags cover nonzero, masked_select, unique*, bincount, repeat_interleave
SYNCING_OPS = {"aten._local_scalar_dense", "aten.item", "aten.is_nonzero", "aten.equal", "aten.allclose",
               "aten.nonzero", "aten.masked_select", "aten.unique", "aten._unique", "aten._unique2",
               "aten.unique_dim", "aten.unique_consecutive", "aten.bincount"}
MASK_INDEXING = {"aten.index", "aten.index_put", "aten.index_put_", "aten._index_put_impl_"}
HOST_COPY = "a copy of Python data to the device (torch.tensor/as_tensor: a host-to-device copy in the graph)"


class _DeviceOps(TorchDispatchMode):
    """Records every aten op of one step; fails on those a CUDA graph cannot hold."""

    def __init__(self, stop, earlier: set):
        super().__init__()
        self.stop, self.earlier = stop, earlier
        self.trace: list[Op] = []
        self.created: set = set()  # storages this call created

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket)
        node = torch._C._current_autograd_node()
        frames = _user_frames(self.stop)
        leaves = pytree.tree_leaves((args, kwargs))
        self._check(func, name, args, kwargs, Op(str(func), (), frames, node and node.name()))
        inputs, desc = set(), []
        for a in leaves:
            if isinstance(a, torch.Tensor):
                ptr = _storage(a)
                inputs.add(ptr)
                # storages read from outside the step are part of the trace: they must not change
                outside = ptr is not None and ptr not in self.created
                if outside and ptr in self.earlier:
                    raise CaptureHazard(
                        f"{func} reads a tensor that the previous step created: state re-created each step "
                        f"(a graph would keep reading the captured step's copy)\n{_where(frames)}")
                desc.append(("tensor", tuple(a.shape), a.stride(), a.dtype, a.device.type, ptr if outside else "own"))
            elif isinstance(a, (bool, int, float, complex)):
                desc.append(("number", repr(a)))  # a graph freezes it
            elif a is None or isinstance(a, (str, torch.dtype, torch.device, torch.memory_format, torch.layout)):
                desc.append(("const", repr(a)))
            else:
                desc.append(("object", type(a).__name__))
        out = func(*args, **kwargs)
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and _storage(t) not in inputs:  # new memory (not an in-place result)
                self.created.add(_storage(t))
        self.trace.append(Op(str(func), (tuple(kwargs), *desc), frames, node and node.name()))
        return out

    def _check(self, func, name, args, kwargs, op):
        why = None
        if name in SYNCING_OPS or torch.Tag.data_dependent_output in func.tags:
            why = "reads a tensor's value on the host (.item(), float(t), bool(t), int(t), t.tolist(): a host sync)"
        elif name in MASK_INDEXING and any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                                           for i in pytree.tree_leaves(args[1:2])):
            why = "indexes with a boolean mask: the output size depends on the data (nonzero, a host sync)"
        elif torch.Tag.dynamic_output_shape in func.tags and name not in MASK_INDEXING:
            why = "has a data-dependent output shape (a host sync to size it)"
        elif name in ("aten.lift_fresh", "aten.lift_fresh_copy"):
            why = HOST_COPY
        elif name == "aten._to_copy" and kwargs.get("device") not in (None, args[0].device):
            why = f"copies a tensor from {args[0].device} to {kwargs['device']}"
        elif name == "aten.copy_" and isinstance(args[1], torch.Tensor) and args[1].device != args[0].device:
            why = f"copies a tensor from {args[1].device} to {args[0].device}"
        elif name in ("aten._pin_memory", "aten.is_pinned"):
            why = "works with pinned host memory"
        elif kwargs.get("pin_memory"):
            why = "allocates pinned host memory"
        if why:
            raise CaptureHazard(op.where(why))


FACTORIES = {torch.zeros, torch.ones, torch.empty, torch.full, torch.arange, torch.rand, torch.randn,
             torch.randint, torch.eye, torch.linspace, torch.logspace, torch.scalar_tensor, torch.empty_strided,
             torch.tensor, torch.as_tensor}
HOST_READS = {"cpu": "copies to the host (.cpu())", "numpy": "reads on the host (.numpy())",
              "tolist": "reads on the host (.tolist())", "__array__": "reads on the host (numpy conversion)",
              "pin_memory": "copies to pinned host memory"}


class _HostReads(TorchFunctionMode):
    """What dispatches no aten op on the CPU but would touch the host on a GPU."""

    def __init__(self, stop):
        super().__init__()
        self.stop = stop

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        why = HOST_READS.get(name)
        if name in ("to", "cuda") and args and isinstance(args[0], torch.Tensor):
            target = kwargs.get("device") or next((a.device if isinstance(a, torch.Tensor) else a for a in args[1:]
                                                   if isinstance(a, (str, torch.device, torch.Tensor))), None)
            target = "cuda" if name == "cuda" else target
            if target is not None and torch.device(target) != args[0].device:
                why = f"copies a tensor from {args[0].device} to {target}"
        caller = sys._getframe(1).f_code.co_filename
        if func in FACTORIES and kwargs.get("device") is None and caller.startswith(USER_DIRS):
            why = (f"creates a tensor without a device (torch.{name}): a host tensor on a GPU run "
                   f"(frozen scalar or a host-device copy in the graph)")
        if why:
            owner = "torch" if func in FACTORIES else "Tensor"
            raise CaptureHazard(f"{owner}.{name} {why}\n{_where(_user_frames(self.stop))}")
        return func(*args, **kwargs)


class CaptureChecker:
    """Runs steps under both modes and compares what they issue."""

    def __init__(self):
        self.traces: list[list[Op]] = []
        self.created: set = set()

    def run(self, step, *args):
        """One checked call; it must not read what the previous checked call created."""
        device_ops = _DeviceOps(CaptureChecker.run.__code__, self.created)
        with device_ops, _HostReads(CaptureChecker.run.__code__):
            out = step(*args)
        self.created = device_ops.created
        self.traces.append(device_ops.trace)
        return out

    def outside_storages(self, trace: list[Op]) -> set:
        return {a[5] for op in trace for a in op.args[1:] if a[0] == "tensor" and a[5] != "own"}

    def assert_replayable(self):
        """Every checked step issued what the first (the captured one) did."""
        first = self.traces[0]
        for n, trace in enumerate(self.traces[1:], 1):
            for i, (a, b) in enumerate(zip(first, trace)):
                if (a.name, a.args, a.frames) != (b.name, b.args, b.frames):
                    diff = [(x, y) for x, y in zip(a.args, b.args) if x != y]
                    what = ("different Python numbers: a graph freezes the captured step's"
                            if any(x[0] == "number" for x, _ in diff) else
                            "a different op, shape, memory or source line: a graph replays the captured step's")
                    changed = ", ".join(f"{x[-1]} -> {y[-1]}" for x, y in diff)
                    raise CaptureHazard(f"op {i} of the captured step and of step +{n} differ ({what}"
                                        f"{': ' + changed if a.name == b.name else ''})\n"
                                        f"captured: {a.where()}\n    arguments {a.args}\n"
                                        f"step +{n}: {b.where()}\n    arguments {b.args}")
            if len(trace) != len(first):
                extra = (trace if len(trace) > len(first) else first)[min(len(trace), len(first))]
                raise CaptureHazard(f"the captured step issued {len(first)} ops, step +{n} {len(trace)}; "
                                    f"first unmatched: {extra.where()}")


_CHECKER_CODE = {f.__code__ for cls in (_DeviceOps, _HostReads, CaptureChecker)
                 for f in vars(cls).values() if inspect.isfunction(f)} | {_user_frames.__code__, _where.__code__}


# --- the trainer's step, tiny --------------------------------------------------------------------------

NETWORKS = {"resnet8": lambda: CifarResNet(8, 10),  # 64 channels
            "wrn10-1": lambda: WideResNet(10, 1, 10),  # 64 channels
            "wrn10-2": lambda: WideResNet(10, 2, 10),  # 128 channels: transfer layers
            # networks of the libraries, split by rule (576 vs 512 channels; timm's 288 vs 512, their 1x1
            # maps at 8 px beside resnet8's 64x2x2: transfer layers that pool). In bf16 they get 32 px
            # (LIBRARY_BF16_SIZE): at 8 px their strided convolutions see 1x1 maps, where torch's bf16
            # CPU convolution computes garbage weight gradients on AMX/avx512_bf16 CPUs (tests/test_upstream_bugs.py)
            "mobilenet_v3_small": lambda: build_network("mobilenet_v3_small", 10),
            "resnet18": lambda: build_network("resnet18", 10),
            "timm:mobilenetv3_small_050": lambda: build_network("timm:mobilenetv3_small_050", 10),
            "timm:resnet10t": lambda: build_network("timm:resnet10t", 10)}
SIZE, BATCH = 8, 4
LIBRARY_BF16_SIZE = 32  # the smallest power of two at which ResNet-18's and MobileNet v3's maps stay >= 2x2 before a stride


@dataclasses.dataclass(frozen=True)
class Case:
    method: str = "afd"
    topology: str = "pair"
    archs: tuple = ("resnet8", "wrn10-2")
    amp: str = "off"
    batched: bool = False
    channels_last: bool = True
    all_reduce: bool = False
    sizes: tuple | None = None  # each network's own image size (--network-image-sizes)
    dml_update: str = "sync"  # alternate: one call updates each network on its share of the batch, in turn
    size: int = SIZE  # the batch's image size (--image-size)
    ema: bool = False  # the weight EMA (every 2nd step) and no weight decay on norms and biases (issue 24)
    mix: bool = False  # mixup and CutMix of each batch on the device, soft targets through the losses (issue 25)

    def __str__(self):
        return (f"{self.method}-{self.topology}-{'+'.join(self.archs)}-amp_{self.amp}"
                f"{'-sizes_' + 'x'.join(map(str, self.sizes)) if self.sizes else ''}"
                f"{f'-{self.size}px' if self.size != SIZE else ''}"
                f"{'-batched' if self.batched else ''}{'-contiguous' if not self.channels_last else ''}"
                f"{'-allreduce' if self.all_reduce else ''}{'-alternate' if self.dml_update == 'alternate' else ''}"
                f"{'-ema' if self.ema else ''}{'-mix' if self.mix else ''}")


AMPS = ("off", "bf16", "fp16")
# the methods that take any networks (ONE shares layers: identical networks, tests/test_paper_baselines.py)
ANY_NETWORKS = [m for m in METHODS if not method_spec(m).shared_low_layers]
CASES = (
    [Case(method=m, amp=a) for m in ANY_NETWORKS for a in AMPS]  # pair, channels differ
    + [Case(method=m, amp=a, batched=True) for m in ("afd", "adv-only") for a in AMPS]
    + [Case(method=m, topology="cyclic", archs=("resnet8", "wrn10-2", "wrn10-1")) for m in ANY_NETWORKS]
    + [Case(topology="cyclic", archs=("resnet8", "wrn10-2", "wrn10-1"), amp=a, batched=True) for a in ("bf16", "fp16")]
    + [Case(topology="cyclic")]
    # equal channel counts: no transfer layers (identity)
    + [Case(method=m, archs=("resnet8", "resnet8"), channels_last=False) for m in ("afd", "adv-only", "l1", "l1kd")]
    + [Case(archs=("resnet8", "wrn10-1", "resnet8"), topology="cyclic", amp="fp16", batched=True, channels_last=False)]
    + [Case(amp="fp16", batched=True, all_reduce=True)]
    # your own networks (issue 14): a heterogeneous torchvision pair, a timm pair, both with resnet8
    + [Case(archs=("mobilenet_v3_small", "resnet18"), amp="bf16", size=LIBRARY_BF16_SIZE),
       Case(archs=("timm:mobilenetv3_small_050", "timm:resnet10t", "resnet8"), topology="cyclic", amp="fp16")]
    # each network at its own image size: the resize is in the captured step
    + [Case(sizes=(SIZE, SIZE // 2), amp="fp16"), Case(method="dml", sizes=(SIZE // 2, SIZE), amp="bf16")]
    # DML's alternating form: the whole iteration (a pair: two halves of the batch) in one graph
    + [Case(method="dml", dml_update="alternate", amp=a) for a in AMPS]
    + [Case(method="dml", dml_update="alternate", sizes=(SIZE // 2, SIZE), amp="fp16")]
    # the weight EMA inside the step, every method (ONE: identical networks), and decay groups
    + [Case(method=m, amp=a, ema=True) for m in ANY_NETWORKS for a in ("bf16", "fp16")]
    + [Case(method="one", archs=("resnet8", "resnet8"), amp=a, ema=True) for a in ("bf16", "fp16")]
    + [Case(method="dml", dml_update="alternate", amp="bf16", ema=True)]
    # mixup/CutMix (λ, the choices, the box and the permutation drawn on the device) and soft targets:
    # AFD, ONE's gated-ensemble CE, alternating DML (each network's batch mixed on its turn), networks
    # at their own sizes (one mixed batch, resized per network), with the EMA and all-reduce
    + [Case(amp=a, mix=True) for a in ("bf16", "fp16")]
    + [Case(method="one", archs=("resnet8", "resnet8"), amp=a, mix=True) for a in ("bf16", "fp16")]
    + [Case(method="dml", dml_update="alternate", amp=a, mix=True) for a in ("bf16", "fp16")]
    + [Case(sizes=(SIZE, SIZE // 2), amp="fp16", batched=True, mix=True),
       Case(method="kd", topology="cyclic", archs=("resnet8", "wrn10-2", "wrn10-1"), amp="bf16", ema=True, mix=True),
       Case(amp="fp16", all_reduce=True, mix=True)]
)


def build_step(case: Case, seed: int = 0, network=None, cls=DualStep, fused_losses=True):
    """The DualStep as afd_fast.train builds it for a CUDA-graph run, on the CPU (``network``,
    ``cls``, ``fused_losses``: the deliberate hazards of the tests that the checker must catch)."""
    torch.manual_seed(seed)
    networks = [(network or NETWORKS[a])() if i == 0 else NETWORKS[a]() for i, a in enumerate(case.archs)]
    model = AFDModel(networks, case.method, case.topology, case.sizes or case.size, 3.0, fused_losses=fused_losses).to("cpu")
    fmt = torch.channels_last if case.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    step = cls(model, lr=0.05, weight_decay=1e-4, adv_lr=1e-3,
               average_gradients=train.average_across_processes if case.all_reduce else None,
               amp=case.amp, fused=True, capturable=True, batched_backward=case.batched, dml_update=case.dml_update,
               mixing=Mixing(mixup=0.2, cutmix=1.0, prob=0.8) if case.mix else None,
               **(dict(model_ema=0.9, model_ema_every=2, norm_weight_decay=0.0, bias_weight_decay=0.0) if case.ema else {}))
    # GraphedStep's static input buffers; the trainer's loaders give fp16 batches with amp fp16
    images = torch.empty(BATCH, 3, case.size, case.size, dtype=torch.float16 if case.amp == "fp16" else torch.float32)
    images = images.contiguous(memory_format=fmt)
    target = torch.empty(BATCH, dtype=torch.long)
    return step, images, target


def batches(n, seed=1, size=SIZE):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(BATCH, 3, size, size, generator=g), torch.randint(0, 10, (BATCH,), generator=g))
            for _ in range(n)]


def persistent_state(step: DualStep, images, target) -> dict:
    """Everything a captured step reads or writes that lives across steps -> (tensor object, storage)."""
    state = {"input:images": images, "input:target": target}
    state.update({f"param:{n}": p for n, p in step.model.named_parameters()})
    state.update({f"buffer:{n}": b for n, b in step.model.named_buffers()})
    for name, opt in step.optimizers.items():
        for g, group in enumerate(opt.param_groups):
            state[f"lr:{name}:{g}"] = group["lr"]
        index = {id(p): i for i, p in enumerate(p for group in opt.param_groups for p in group["params"])}
        for p, values in opt.state.items():
            state.update({f"{name}:{index[id(p)]}:{k}": v for k, v in values.items() if isinstance(v, torch.Tensor)})
    if step.loss_scale is not None:
        state.update({"loss_scale:scale": step.loss_scale.scale, "loss_scale:growth": step.loss_scale.growth_tracker})
    if step.ema is not None:
        state.update(step.ema.persistent_tensors())
    return {k: (v, v.untyped_storage().data_ptr()) for k, v in state.items()}


def run_checked(step, images, target, checker: CaptureChecker, between=None, warmup: int = WARMUP):
    """GraphedStep's call pattern: ``warmup`` eager calls, then the captured call and calls that its
    replays stand for, the batch copied into static buffers each time. The warm-up calls are not
    checked: they run eagerly, and may create state (optimizer moments) that later calls read.
    Returns the persistent state at the capture."""
    for n, (x, y) in enumerate(batches(warmup + CHECKED, size=images.shape[-1])):
        images.copy_(x)
        target.copy_(y)
        if n < warmup:
            step(images, target)
            continue
        if n == warmup:
            before = persistent_state(step, images, target)
        if between is not None:
            between(n - warmup)
        out = checker.run(step, images, target)
        assert isinstance(out, dict) and all(isinstance(v, torch.Tensor) for v in pytree.tree_leaves(out))
        assert all(torch.isfinite(out[k]).all() for k in ("ce", "logit")), out
    return before


# --- 1 and 3: every method, topology, amp mode, batched backward ----------------------------------------

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def one_process_group(tmp_path_factory):
    """A gloo group of one process, so that the trainer's all-reduce of the gradient sets runs."""
    store = dist.FileStore(str(tmp_path_factory.mktemp("gloo") / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("case", CASES, ids=str)
def test_step_is_capturable(case, request):
    """The trainer's step, after GraphedStep's warm-up: no host sync, the same ops and Python numbers
    each call (also across an fp16 overflow, which the fused optimizers skip on the device), and it
    allocates no new persistent state.

    What "allocates nothing new" means here: a replay writes the same addresses as the captured call.
    Its temporaries and outputs live in the graph's memory pool (GraphedStep returns its static
    outputs; the trainer copies what it keeps out of them each step), so fresh eager outputs prove
    nothing either way. What must keep its storage is the state that outlives a call: parameters,
    batch-norm statistics, optimizer moments and step counts, learning-rate tensors, the loss scale
    and the static input buffers; the step must keep no gradient (DualStep takes the gradient sets
    with autograd.grad and drops ``.grad`` after each optimizer step), and every tensor it reads that
    it did not create must be one of those."""
    if case.all_reduce:
        request.getfixturevalue("one_process_group")
    step, images, target = build_step(case)
    checker = CaptureChecker()
    scale = step.loss_scale.scale if step.loss_scale is not None else None
    kept = {}

    def between(n):  # fp16: the middle checked step overflows; the graph must skip it on the device
        if scale is None:
            return
        if n == 1:
            kept.update(params=copy.deepcopy(list(step.model.parameters())))
        if n == 2:
            kept.update(scale=float(scale), same=all(torch.equal(p, q) for p, q in
                                                     zip(step.model.parameters(), kept["params"])))
        scale.fill_(2.0 ** 40 if n == 1 else 2.0 ** 10)  # in place, as a replay needs

    before = run_checked(step, images, target, checker, between)
    checker.assert_replayable()

    names = {op.name for op in checker.traces[0]}
    assert "afd_fast.mutual_distillation_forward.default" in names  # the compiled fused losses
    if case.ema:  # the EMA's update in the step; the decay groups: weights, and norms and biases at 0
        assert "aten._foreach_mul_.Tensor" in names and int(step.ema.steps) == WARMUP + CHECKED
        assert [g["weight_decay"] for g in step.optimizers["logit"].param_groups] == [1e-4, 0.0]
    if case.mix:  # λ, the permutation and the box drawn on the device, inside the step
        assert {"aten._standard_gamma.default", "aten.index_select.default"} <= names, names
        assert any(name.startswith("aten.rand.") for name in names), names
        fused = [op for op in checker.traces[0] if op.name == "afd_fast.mutual_distillation_forward.default"]
        assert all(op.args[-1][0] == "tensor" and op.args[-2][0] == "tensor" for op in fused)  # target_b, lam
    assert "aten._fused_sgd_.tensor_lr" in names  # the learning rate read from its tensor
    if step.model.spec.adversarial:
        assert {"afd_fast.lsgan_forward.default", "aten._fused_adam_.tensor_lr"} <= names
    if case.all_reduce:
        assert any(name.startswith("c10d.allreduce_") for name in names)
    if scale is not None:
        assert "aten._amp_update_scale_.default" in names
        # the overflow step was skipped, scale halved (alternating DML: at each of its K updates)
        assert kept["scale"] == 2.0 ** 40 / 2 ** step.batches_per_call and kept["same"]

    # 3: persistent state kept its storage and no new state appeared; no gradient outlives the step
    after = persistent_state(step, images, target)
    assert after.keys() == before.keys()
    moved = [k for k in before if after[k][0] is not before[k][0] or after[k][1] != before[k][1]]
    assert not moved, f"persistent state re-allocated after the warm-up: {moved}"
    assert all(p.grad is None for p in step.model.parameters())
    # everything the step reads from outside itself is that persistent state
    known = {ptr for _, ptr in after.values()}
    for trace in checker.traces:
        strangers = checker.outside_storages(trace) - known
        assert not strangers, [op.where() for op in trace
                               if any(a[0] == "tensor" and a[5] in strangers for a in op.args[1:])]


@pytest.mark.parametrize("case", [Case(amp="fp16", batched=True), Case(method="kd", topology="cyclic",
                                  archs=("resnet8", "wrn10-2", "wrn10-1"), amp="bf16")], ids=str)
def test_one_warm_up_call_is_enough(case):
    """GraphedStep(step, warmup=1) (as tests/test_graph_cuda.py uses it) captures the second call: it
    already issues what every later call does."""
    checker = CaptureChecker()
    run_checked(*build_step(case), checker, warmup=1)
    checker.assert_replayable()


def test_without_warm_up_the_captured_call_would_create_state():
    """The first call creates Adam's moments and step counts: captured, they would live in the graph's
    pool and the next call reads them. The checker tells it apart from a warmed-up step."""
    message = _caught(*build_step(Case()), warmup=0)
    assert "previous step created" in message and "optimizer.step()" in message, message


# --- 2: schedules change learning rates in place ------------------------------------------------------

SCHEDULES = {  # each optimizer's schedule; 10 steps per epoch
    "step": Schedule(0.05, "step", milestones=(3,), epochs=4),
    "cosine": Schedule(0.05, "cosine", epochs=4),
    "warmup": Schedule(0.05, "cosine", warmup_epochs=1, epochs=4),
}


@pytest.mark.parametrize("kind", SCHEDULES)
def test_schedules_change_learning_rates_in_place(kind):
    """The trainer's LearningRates before every step, as afd_fast.train applies them: the rates of a
    fused step live in device tensors, filled in place, so a replay of the captured step reads the
    new values and the captured work is the same whatever the rate."""
    step, images, target = build_step(Case(amp="fp16"))
    rates = LearningRates(step.optimizers, {name: SCHEDULES[kind] for name in step.optimizers}, steps_per_epoch=10)
    tensors = {name: opt.param_groups[0]["lr"] for name, opt in step.optimizers.items()}
    ptrs = {name: t.data_ptr() for name, t in tensors.items()}
    seen = []

    def between(n):
        # the global step each checked call stands for: "step" crosses its milestone (epoch 3 = step 30)
        # between the captured call and the first replay; warm-up and cosine change the rate every step
        applied = rates.apply(29 + n if kind == "step" else n)
        seen.append({name: float(t) for name, t in tensors.items()})
        for name in tensors:
            assert seen[-1][name] == pytest.approx(applied[name], rel=1e-6), name

    checker = CaptureChecker()
    run_checked(step, images, target, checker, between)
    checker.assert_replayable()  # the same ops and Python numbers before and after each rate change
    for name, opt in step.optimizers.items():
        rate = opt.param_groups[0]["lr"]
        assert rate is tensors[name] and rate.data_ptr() == ptrs[name], name
        values = [r[name] for r in seen]
        assert all(a != b for a, b in zip(values, values[1:])) if kind != "step" else values[1] == pytest.approx(
            values[0] * 0.1, rel=1e-6), (name, values)
        # each optimizer kernel takes the rate's storage as an argument: a replay reads the new value
        for trace in checker.traces:
            kernels = [op for op in trace if op.name.startswith(("aten._fused_sgd_", "aten._fused_adam_"))
                       and any(a[0] == "tensor" and a[5] == ptrs[name] for a in op.args[1:])]
            assert kernels, f"no optimizer kernel reads the {name} learning rate from its tensor"


def test_a_rate_replaced_by_a_python_number_is_caught():
    step, images, target = build_step(Case())

    def between(n):
        if n == 1:  # what a schedule must not do: the captured kernel keeps the old rate
            step.optimizers["logit"].param_groups[0]["lr"] = 0.005  # hazard:float-rate

    with pytest.raises(CaptureHazard) as error:
        checker = CaptureChecker()
        run_checked(step, images, target, checker, between)
        checker.assert_replayable()
    message = str(error.value)
    assert "aten._fused_sgd_.tensor_lr" in message and "aten._fused_sgd_.default" in message, message
    assert "afd_fast/step.py" in message and "optimizer.step()" in message, message


# --- 5: the checker fails on what a CUDA graph cannot hold --------------------------------------------

def _line(marker: str) -> str:
    """'tests/test_capture_safety.py:<line>' of the line holding ``# <marker>``."""
    with open(__file__) as f:
        for number, line in enumerate(f, 1):
            if line.rstrip().endswith(f"# {marker}"):
                return f"{os.path.relpath(__file__, REPO)}:{number}"
    raise LookupError(marker)


def _caught(step, images, target, warmup: int = WARMUP) -> str:
    checker = CaptureChecker()
    with pytest.raises(CaptureHazard) as error:
        run_checked(step, images, target, checker, warmup=warmup)
        checker.assert_replayable()
    return str(error.value)


class ItemStep(DualStep):
    def __call__(self, images, target):
        losses = super().__call__(images, target)
        self.last_loss = losses["logit"].item()  # hazard:item
        return losses


def test_an_item_in_the_step_is_caught():
    message = _caught(*build_step(Case(), cls=ItemStep))
    assert "aten._local_scalar_dense" in message and _line("hazard:item") in message, message
    assert ".item()" in message  # the source line is quoted


# In a network's forward: each line a host sync, a host copy or a host tensor on a GPU run.
HAZARDS = {
    "bool": (lambda x: x * 2 if x.sum() > 0 else x,  # hazard:bool
             "aten._local_scalar_dense"),
    "float": (lambda x: x * float(x.mean()),  # hazard:float
              "aten._local_scalar_dense"),
    "tolist": (lambda x: x + x.mean().tolist(),  # hazard:tolist
               "Tensor.tolist"),
    "cpu": (lambda x: x + x.mean().cpu(),  # hazard:cpu
            "Tensor.cpu"),
    "numpy": (lambda x: x + float(x.detach().mean().numpy()),  # hazard:numpy
              "Tensor.numpy"),
    "mask": (lambda x: x + x[x > 0].sum(),  # hazard:mask
             "aten.index.Tensor"),
    "nonzero": (lambda x: x + torch.nonzero(x).sum(),  # hazard:nonzero
                "aten.nonzero"),
    "unique": (lambda x: x + torch.unique(x).sum(),  # hazard:unique
               "aten._unique2"),
    "tensor": (lambda x: x * torch.tensor(2.0, device=x.device),  # hazard:tensor
               "aten.lift_fresh"),
    "no-device": (lambda x: x + torch.ones(x.shape[1], 1, 1),  # hazard:no-device
                  "torch.ones"),
}


class HazardNet(CifarResNet):
    def __init__(self, hazard):
        super().__init__(8, 10)
        self.hazard = hazard

    def features(self, x):
        return super().features(self.hazard(x))


@pytest.mark.parametrize("kind", HAZARDS)
def test_a_host_sync_in_the_forward_is_caught(kind):
    hazard, op = HAZARDS[kind]
    message = _caught(*build_step(Case(), network=lambda: HazardNet(hazard)))
    assert op in message and _line(f"hazard:{kind}") in message, message
    assert "afd_fast/step.py" in message  # and the step's call chain down to it


def test_the_plain_pytorch_losses_are_caught():
    """train.py refuses --cuda-graph without the compiled ops: the reference reads the peer weights on
    the host (``if w != 0``)."""
    message = _caught(*build_step(Case(), fused_losses=False))
    assert "aten._local_scalar_dense" in message and "afd_fast/reference.py" in message, message
    assert "if w != 0" in message


@pytest.mark.parametrize("kind", ["factory", "scalar", "branch"])
def test_a_python_number_that_changes_each_step_is_caught(monkeypatch, kind):
    calls = iter(range(100))
    fused = ops.mutual_distillation_loss

    def loss_with_a_counter(*args, **kwargs):
        loss, ce, kl = fused(*args, **kwargs)
        n = next(calls)
        if kind == "factory":
            loss = loss * torch.full((), 1.0 / (n + 1), device=loss.device)  # hazard:factory
        elif kind == "scalar":
            loss = loss * (1.0 / (n + 1))  # hazard:scalar
        elif n % 2:
            loss = loss + 0.0  # hazard:branch
        return loss, ce, kl

    monkeypatch.setattr(ops, "mutual_distillation_loss", loss_with_a_counter)
    message = _caught(*build_step(Case()))
    assert _line(f"hazard:{kind}") in message, message
    expected = {"factory": "aten.full.default", "scalar": "aten.mul.Tensor", "branch": "aten.add.Tensor"}[kind]
    assert expected in message, message
    if kind != "branch":
        assert "different Python numbers" in message


class RecreatingLossScale(LossScale):
    def update(self, found_infs):
        super().update(found_infs)
        self.scale = self.scale.clone()  # hazard:recreated


def test_state_recreated_each_step_is_caught():
    step, images, target = build_step(Case(amp="fp16"))
    step.loss_scale = RecreatingLossScale(step.device)
    message = _caught(step, images, target)
    assert "previous step created" in message and "afd_fast/step.py" in message, message


# --- 4: the CUDA kernels, read -----------------------------------------------------------------------

def test_cuda_kernels_launch_on_the_current_stream_without_host_sync():
    """The CPU cannot run the CUDA kernels: read their source instead. A launch on the legacy default
    stream, a synchronising copy or a host read would break the capture."""
    path = os.path.join(REPO, "csrc", "cuda", "ops_cuda.cu")
    if not os.path.exists(path):
        pytest.skip("no CUDA source in this checkout")
    source = re.sub(r"//[^\n]*|/\*.*?\*/", "", open(path).read(), flags=re.S)
    launches = re.findall(r"<<<(.*?)>>>", source, flags=re.S)
    assert launches
    streams = set(re.findall(r"(\w+)\s*=\s*at::cuda::getCurrentCUDAStream\(\)", source))
    for config in launches:
        parts = [p.strip() for p in config.split(",")]
        assert len(parts) == 4 and (parts[3] in streams or parts[3] == "at::cuda::getCurrentCUDAStream()"), config
    for call in ("cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaMemcpy(", "cudaMalloc", "cudaFree",
                 ".item(", ".item<", ".cpu()", "kCPU", "cudaMemset("):
        assert call not in source, call
