"""Shared helpers of the benchmarks: timing, machine description, result files."""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from typing import Callable

import torch


def machine(device: torch.device) -> dict:
    """What the figures were measured on."""
    info = {
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return info


def machine_name(info: dict) -> str:
    return info.get("gpu") or f"{info['cpu']} ({info['cpu_cores']} cores)"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def median_ms(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    """Median wall time of fn in milliseconds; synchronises the GPU around each call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def epoch_throughput(epochs: Callable[[int], object], consume: Callable[[object], int], device: torch.device,
                     batches: int, warmup: int = 1) -> float:
    """Images/s of ``consume(batch)`` (which returns the batch's image count) over ``batches``
    batches drawn from ``epochs(0)``, ``epochs(1)``, ... Not timed: the first ``warmup`` batches and
    the first batch of every epoch (a pipeline's start-up, once per epoch: negligible for
    ImageNet-sized epochs, large for the small data sets benchmarked here)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    timed = images = processed = epoch = 0
    seconds = 0.0
    while timed < batches:
        start, in_epoch = None, 0
        for batch in epochs(epoch):
            n = consume(batch)
            processed += 1
            in_epoch += 1
            if start is None:
                if processed >= warmup:
                    sync()
                    start = time.perf_counter()
                continue
            timed += 1
            images += n
            if timed == batches:
                break
        if start is not None:
            sync()
            seconds += time.perf_counter() - start
        if in_epoch < 2:
            raise RuntimeError(f"epoch {epoch} gave {in_epoch} batch(es): the benchmark needs at least 2 per epoch "
                               "(a smaller batch size, or more images)")
        epoch += 1
    return images / seconds


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)


def print_table(headers: list[str], rows: list[list]) -> None:
    cells = [[str(c) for c in r] for r in [headers] + rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for n, r in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
        if n == 0:
            print("  ".join("-" * w for w in widths))


class RandomBatches:
    """In-memory synthetic input for timing the training step alone: ``distinct`` random batches
    made once on the device and handed out in turn, ``steps`` per pass (no decode, no copy)."""

    def __init__(self, batch_size: int, image_size: int, num_classes: int, steps: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, channels_last: bool = True,
                 distinct: int = 4, seed: int = 0):
        g = torch.Generator(device=device).manual_seed(seed)
        layout = torch.channels_last if channels_last else torch.contiguous_format
        self.batches = [(torch.randn(batch_size, 3, image_size, image_size, device=device, generator=g)
                         .to(dtype).contiguous(memory_format=layout),
                         torch.randint(0, num_classes, (batch_size,), device=device, generator=g))
                        for _ in range(distinct)]
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for i in range(self.steps):
            yield self.batches[i % len(self.batches)]
