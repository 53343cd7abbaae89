"""Multi-process training with real torchrun processes (gloo on the CPU)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from afd_fast.step import DualStep, gradient_sets
from afd_fast.data import synthetic_image_folder

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _ddp_step import batches, make_model  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _torchrun(*args, timeout=600):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


@pytest.mark.slow
def test_two_processes_equal_one_process_averaging_shard_gradients(tmp_path):
    out = tmp_path / "params.pt"
    _torchrun(os.path.join("tests", "_ddp_step.py"), str(out))
    got = torch.load(out, weights_only=True)

    # One process: each shard's three gradient sets separately (batch norm per shard, as in DDP),
    # averaged, then the same optimizer steps.
    model = make_model()
    step = DualStep(model, adv_lr=1e-3)
    for images, target in batches(3, 4, 2):
        sets = []
        for r in range(2):
            sets.append(gradient_sets(model, model(images[r * 4:(r + 1) * 4], target[r * 4:(r + 1) * 4])))
        for (params, g0), (_, g1), optimizer in zip(sets[0], sets[1], step.optimizers.values()):
            for p, a, b in zip(params, g0, g1):
                p.grad = (a + b) / 2
            optimizer.step()
            for p in params:
                p.grad = None
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name], p.detach(), rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("speed", [[], ["--amp", "fp16", "--channels-last"],
                                   ["--model-ema", "0.9", "--bn-recalibrate", "1", "--norm-weight-decay", "0",
                                    "--mixup", "0.2", "--cutmix", "1.0", "--save-samples", "4"]],
                         ids=["float32", "fp16-channels-last", "ema-recalibrated-mixed"])
def test_cli_under_torchrun(tmp_path, speed):
    data = synthetic_image_folder(str(tmp_path / "data"), num_classes=3, train_per_class=16, val_per_class=5)
    out = tmp_path / "out"
    proc = _torchrun("-m", "afd_fast.train", "--data", data, "--output", str(out), "--workers", "0",
                     "--batch-size", "8", "--epochs", "1", "--max-steps", "2", *speed)
    assert "2 process(es)" in proc.stdout
    assert "global batch 8 (4 per process x 2)" in proc.stdout  # --batch-size is the global batch
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and (summary["global_batch"], summary["batch_per_process"]) == (8, 4)
    assert summary["val_images"] == 15  # every validation image exactly once across the two processes
    if "--model-ema" in speed:  # the EMA evaluated and exported; each process's EMA statistics checkpointed
        assert summary["ema_net_mean_top1"] >= 0 and (out / "network1_resnet20_ema.pt").is_file()
        ranks = torch.load(out / "last.pt", weights_only=True)["ranks"]
        assert len(ranks) == 2 and all("ema_buffers" in r for r in ranks)
    if "--mixup" in speed:  # mixup/CutMix in every process's step; rank 0's sample grid after mixing
        assert "mixup 0.2 + CutMix 1" in proc.stdout and (out / "samples.png").is_file()
