"""Accuracy as the paper reports it (§4): top-1 of every network, their mean ("2 Net Avg",
"3 Net Avg"), and the ensemble, the mean of the K softmaxes ("Ens"; ONE's own gated ensemble
besides), all at the end of training; the paper gives each as the mean of 5 runs
(``benchmarks/accuracy.py``)."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist


@torch.no_grad()
def evaluate(model, loader, device: torch.device, amp_dtype: torch.dtype | None = None,
             progress: Callable[[int], None] | None = None) -> dict[str, float]:
    """Top-1/top-5 of every network (``net<k>``), of the ensemble (mean of the softmaxes) and of the
    model's own ensembles (ONE: ``gated_ensemble``), over all processes; ``net_mean_top1/5``: the
    mean over the trained networks (an offline run's frozen teacher is not one). ``progress``: called
    with each batch's image count (this process's) once the batch is scored."""
    model.eval()
    k, trained = len(model.networks), len(model.trained_networks())
    names, correct = None, None
    count = torch.zeros((), dtype=torch.float64, device=device)
    for images, target in loader:
        images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model.predict(images)
        probs = torch.stack([z.float().softmax(-1) for z in logits.values()])
        probs = torch.cat([probs[:k], probs[:k].mean(0, keepdim=True), probs[k:]])
        if correct is None:
            names = list(logits)[:k] + ["ensemble"] + list(logits)[k:]
            correct = torch.zeros(len(names), 2, dtype=torch.float64, device=device)
        top5 = probs.topk(min(5, probs.shape[-1]), -1).indices
        hit = top5 == target[None, :, None]
        correct[:, 0] += hit[..., 0].sum(-1)
        correct[:, 1] += hit.any(-1).sum(-1)
        count += target.numel()
        if progress is not None:
            progress(target.numel())
    if correct is None:  # no validation batch on this process
        names = [f"net{i}" for i in range(k)] + ["ensemble"] + (["gated_ensemble"] if model.gate is not None else [])
        correct = torch.zeros(len(names), 2, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(correct)
        dist.all_reduce(count)
    model.train()
    acc = (100 * correct / count.clamp(min=1)).tolist()
    out = {f"{n}_top{t}": acc[i][j] for i, n in enumerate(names) for j, t in enumerate((1, 5))}
    for t in (1, 5):
        out[f"net_mean_top{t}"] = sum(out[f"net{i}_top{t}"] for i in range(trained)) / trained
    return {**out, "val_images": int(count.item())}


def final_accuracy(history: list[dict], num_networks: int) -> dict:
    """The summary's accuracy: the last epoch's (every network, their mean, the ensembles: what the
    paper reports), and the best single network over all epochs among the first ``num_networks``
    (the trained ones), named as such."""
    last = history[-1] if history else {}
    best = max(((h[f"net{i}_top1"], h["epoch"], i) for h in history for i in range(num_networks)),
               key=lambda b: b[0], default=None)  # the first of equals
    return {**{key: value for key, value in last.items() if "_top" in key},
            "best_single_net_top1": best[0] if best else None,
            "best_single_net": {"net": best[2], "epoch": best[1]} if best else None}
