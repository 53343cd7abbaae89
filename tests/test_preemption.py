"""Preemption and restarts with real processes on the CPU (gloo): SIGTERM/SIGUSR1 mid-epoch and an
exact resume for every loader, one process and two under torchrun; kill -9 inside a checkpoint write;
a truncated last.pt and the fallback to previous.pt; a full disk; torchrun --max-restarts with
--resume auto. The signals are real (os.kill); to hit an exact step, the test hook
AFD_FAST_TEST_PAUSE_AT_STEP (tests/_hooks.py) makes that process wait after the step until the signal arrives."""
import errno
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import _hooks
from afd_fast import checkpoint, preemption
from afd_fast.data import build_loaders, synthetic_image_folder
from afd_fast.data.dali import dali_available

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOOKED = [os.path.join(ROOT, "tests", "_hooks.py"), "-m", "afd_fast.train"]  # afd_fast.train with the test hooks
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
needs_dali = pytest.mark.skipif(not dali_available(), reason="nvidia-dali is not installed")


# --- data and runs ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    """64 training images (8 steps of 8 per epoch for one process, 4 for two), 24 for validation."""
    return synthetic_image_folder(str(tmp_path_factory.mktemp("data") / "tiny"), num_classes=4,
                                  train_per_class=16, val_per_class=6, size=32)


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    """CIFAR-10 in the python format: 80 training images (10 steps of 8), 12 test images."""
    folder = tmp_path_factory.mktemp("c10") / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)

    def write(name, obj):
        with open(folder / name, "wb") as f:
            pickle.dump(obj, f)
    for i in range(1, 6):
        write(f"data_batch_{i}", {b"data": rng.integers(0, 256, (16, 3072), dtype=np.uint8),
                                  b"labels": list(rng.integers(0, 10, 16))})
    write("test_batch", {b"data": rng.integers(0, 256, (12, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, 12))})
    write("batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)]})
    return str(folder.parent)


def _argv(data, out, *extra):
    return ["--data", data, "--output", str(out), "--batch-size", "8", "--print-every", "1000", "--seed", "2",
            "--arch", "resnet20,resnet20", *extra]


def _launch(argv, log, env=None, torchrun=None):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *torchrun,
                *HOOKED] if torchrun is not None else [sys.executable, *HOOKED]
    with open(log, "w") as f:
        return subprocess.Popen(launcher + [str(a) for a in argv], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                                env=dict(ENV, **(env or {})))


def _run(argv, log, env=None, torchrun=None, timeout=600):
    proc = _launch(argv, log, env, torchrun)
    proc.wait(timeout=timeout)
    return proc.returncode, open(log).read()


def _wait_for_file(path, proc, log, timeout=300):
    deadline = time.monotonic() + timeout
    while not (os.path.exists(path) and open(path).read().strip()):  # the marker holds the pid
        assert proc.poll() is None, f"the run ended before {path} appeared:\n" + open(log).read()[-4000:]
        assert time.monotonic() < deadline, f"no {path} after {timeout}s"
        time.sleep(0.05)
    return int(open(path).read())


_REFERENCES = {}


def _reference(tmp_path_factory, data, extra, torchrun=None):
    """The uninterrupted run of these arguments (once per module)."""
    key = (data, tuple(extra), tuple(torchrun or ()))
    if key not in _REFERENCES:
        out = tmp_path_factory.mktemp("reference")
        rc, log = _run(_argv(data, out / "out", *extra), out / "log", torchrun=torchrun)
        assert rc == 0, log[-4000:]
        _REFERENCES[key] = out / "out"
    return _REFERENCES[key]


def _assert_same_training(a, b, k=2):
    """Bit-identical exported networks (and weight EMAs) and the same metrics (the speed aside)."""
    exports = sorted(p.name for p in a.glob("network*.pt"))
    assert len(exports) in (k, 2 * k) and exports == sorted(p.name for p in b.glob("network*.pt"))
    for name in exports:
        na, nb = (torch.load(d / name, weights_only=True) for d in (a, b))
        assert na.keys() == nb.keys()
        for key in na:
            assert torch.equal(na[key], nb[key]), f"{name} {key}"

    def records(d):
        return [{k: v for k, v in json.loads(line).items() if k != "img_per_s"}
                for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert records(a) == records(b)


def _interrupt(argv, out, pause_step, sig=signal.SIGTERM, rank=0, torchrun=None):
    """Runs argv, sends sig to the process of the given rank after pause_step, returns (rc, log)."""
    log = out.parent / "interrupted.log"
    proc = _launch(argv, log, env={"AFD_FAST_TEST_PAUSE_AT_STEP": str(pause_step),
                                   "AFD_FAST_TEST_PAUSE_RANK": str(rank)}, torchrun=torchrun)
    try:
        pid = _wait_for_file(out / f".test-paused-step{pause_step}-rank{rank}", proc, log)
        os.kill(pid, sig)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, open(log).read()


# --- one process: a signal at step 4 of an epoch, then --resume --------------------------------------

LOADERS = {  # flags, steps per epoch, epochs, signal
    "torch": (["--loader", "torch", "--workers", "1"], 8, 2, signal.SIGTERM),
    "dali": (["--loader", "dali", "--workers", "2"], 8, 2, signal.SIGTERM),
    # issue 25: DALI's auto_aug policy and random erasing, their draws in the pipeline checkpoint
    "dali-augmented": (["--loader", "dali", "--workers", "2", "--auto-augment", "trivialaugment",
                        "--random-erasing", "0.5"], 8, 2, signal.SIGTERM),
    "cifar": ([], 10, 2, signal.SIGTERM),
    # fp16 on the CPU is slow: one epoch
    "torch-fp16-sigusr1": (["--loader", "torch", "--workers", "0", "--amp", "fp16"], 8, 1, signal.SIGUSR1),
    # issue 24: the weight EMA in the step and its state in the checkpoint, batch-norm recalibration
    # before each evaluation and the export
    "torch-ema-recalibrated": (["--loader", "torch", "--workers", "1", "--model-ema", "0.9", "--model-ema-every", "2",
                                "--bn-recalibrate", "2"], 8, 2, signal.SIGTERM),
    # issue 25: mixup/CutMix drawn on the device inside the step: the checkpointed RNG state resumes its draws
    "torch-mixed": (["--loader", "torch", "--workers", "1", "--mixup", "0.2", "--cutmix", "1.0", "--mix-prob", "0.8"],
                    8, 2, signal.SIGTERM),
}


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(LOADERS))
def test_signal_mid_epoch_then_resume_is_bit_identical(tmp_path, tmp_path_factory, jpegs, cifar, variant):
    extra, spe, epochs, sig = LOADERS[variant]
    if "dali" in variant and not dali_available():
        pytest.skip("nvidia-dali is not installed")
    data = cifar if variant == "cifar" else jpegs
    extra = [*extra, "--epochs", str(epochs)]
    reference = _reference(tmp_path_factory, data, extra)
    out = tmp_path / "out"
    argv = _argv(data, out, *extra)
    at = (epochs - 1) * spe + 4  # step 4 of the last epoch
    rc, log = _interrupt(argv, out, at, sig)
    name = signal.Signals(sig).name
    assert rc == 128 + sig, log[-4000:]
    assert f"{name}: every process stopped after step {at} (epoch {epochs}, batch 4 of {spe})" in log, log[-3000:]
    assert re.search(r"afd_fast: resume with: python -m afd_fast\.train --data .* --resume$", log, re.M), log[-3000:]
    ckpt = checkpoint.load(str(out / "last.pt"))
    assert (ckpt["epoch"], ckpt["batch"], ckpt["step"], ckpt["reason"]) == (epochs - 1, 4, at, "signal")
    assert len(ckpt["history"]) == epochs - 1 and not (out / "summary.json").exists()
    if "fp16" in variant:
        assert "loss_scale" in ckpt["optimizers"]

    rc, log = _run(argv + ["--resume"], tmp_path / "resumed.log")
    assert rc == 0, log[-4000:]
    assert f"resumed from {out / 'last.pt'} (epoch {epochs}, batch 4, step {at})" in log
    if "mixed" in variant:
        assert "mixup 0.2 + CutMix 1, CutMix share 0.5, of 0.8 of the batches" in log
    _assert_same_training(reference, out)
    if "ema" in variant:
        assert "ema" in ckpt and "ema_buffers" in ckpt["ranks"][0]
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert all(r["ema_net_mean_top1"] >= 0 and "ema_ensemble_top5" in r for r in records)
        # the EMA and the recalibration change no trained weight, and the checkpoints keep the training
        # batch-norm statistics: last.pt's model is the one of the same run without them
        plain = _reference(tmp_path_factory, data, [*LOADERS["torch"][0], "--epochs", str(epochs)])
        ours, theirs = (torch.load(d / "last.pt", weights_only=True)["model"] for d in (out, plain))
        assert ours.keys() == theirs.keys() and any("running_mean" in key for key in ours)
        assert all(torch.equal(ours[key], theirs[key]) for key in ours)


@pytest.mark.slow
def test_alternating_dml_stopped_mid_epoch_resumes_bit_identically(tmp_path, tmp_path_factory, cifar):
    """--dml-update alternate: a step is an iteration of 3 updates on 3 batches, an epoch 3 passes of
    the loader (10 steps). Stopped after step 4 (12 batches: the second pass, at its batch 2), the
    run continues bit-identically."""
    extra = ["--method", "dml", "--dml-update", "alternate", "--arch", "resnet20,resnet20,resnet20", "--epochs", "1"]
    reference = _reference(tmp_path_factory, cifar, extra)
    out = tmp_path / "out"
    argv = _argv(cifar, out, *extra)
    rc, log = _interrupt(argv, out, 4)
    assert rc == 128 + signal.SIGTERM, log[-4000:]
    ckpt = checkpoint.load(str(out / "last.pt"))
    assert (ckpt["epoch"], ckpt["batch"], ckpt["step"]) == (0, 4, 4)
    rc, log = _run(argv + ["--resume"], tmp_path / "resumed.log")
    assert rc == 0, log[-4000:]
    _assert_same_training(reference, out, k=3)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 10  # one update per network per step: each network an epoch of 10 batches


@pytest.mark.slow
def test_signal_after_the_last_step_then_resume_still_ends_the_epoch(tmp_path, tmp_path_factory, cifar):
    """A stop agreed after the run's final step: the resumed run evaluates and records that epoch."""
    extra = ["--epochs", "1", "--max-steps", "3"]
    reference = _reference(tmp_path_factory, cifar, extra)
    out = tmp_path / "out"
    argv = _argv(cifar, out, *extra)
    rc, log = _interrupt(argv, out, 3)
    assert rc == 128 + signal.SIGTERM, log[-4000:]
    rc, log = _run(argv + ["--resume"], tmp_path / "resumed.log")
    assert rc == 0, log[-4000:]
    _assert_same_training(reference, out)  # the same epoch record, not an empty history
    assert json.loads((out / "summary.json").read_text())["epochs"] == 1


@pytest.mark.slow
def test_a_blown_up_state_is_never_saved(tmp_path, cifar):
    """Checkpoints every step and a learning rate that diverges: the run stops on the non-finite
    state without writing it, so last.pt and previous.pt keep finite weights."""
    out = tmp_path / "out"
    rc, log = _run(_argv(cifar, out, "--epochs", "1", "--lr", "1e30", "--checkpoint-every", "1"), tmp_path / "log")
    assert rc != 0 and "non-finite" in log and "the checkpoints keep the last finite state" in log, log[-3000:]
    kept = [out / name for name in ("last.pt", "previous.pt") if (out / name).exists()]
    assert kept  # step 1's checkpoint, before the weights blew up
    for path in kept:
        model = checkpoint.load(str(path))["model"]
        assert all(torch.isfinite(t).all() for t in model.values() if t.is_floating_point()), path


def test_a_fresh_start_sets_an_earlier_runs_checkpoints_aside(tmp_path):
    for name in ("last.pt", "previous.pt", "best.pt"):
        (tmp_path / name).write_text(name)
    checkpoint.CheckpointWriter(str(tmp_path)).start_fresh()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt.earlier-run", "last.pt.earlier-run"]
    assert checkpoint.resolve_resume("auto", str(tmp_path)) is None  # --resume auto starts fresh
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint"):
        checkpoint.resolve_resume("", str(tmp_path))


# --- two processes under torchrun ------------------------------------------------------------------

TORCHRUN_EXTRA = ["--loader", "dali", "--workers", "1", "--batch-size", "16", "--epochs", "3",
                  "--signal-check-every", "3"]


def _torchrun_reference(tmp_path_factory, jpegs):
    """The uninterrupted two-process run and its steps per epoch (4: 64 images, 16 per step)."""
    reference = _reference(tmp_path_factory, jpegs, TORCHRUN_EXTRA, torchrun=[])
    return reference, checkpoint.load(str(reference / "last.pt"))["steps_per_epoch"]


@pytest.mark.slow
@needs_dali
def test_sigterm_to_one_torchrun_worker_stops_all_at_the_same_step(tmp_path, tmp_path_factory, jpegs):
    reference, spe = _torchrun_reference(tmp_path_factory, jpegs)
    out = tmp_path / "out"
    argv = _argv(jpegs, out, *TORCHRUN_EXTRA)
    # rank 1 gets SIGTERM after step spe + 1 (epoch 2); rank 0 goes on into the next step and waits for
    # rank 1 there; they agree at the next multiple of --signal-check-every 3
    pause = spe + 1
    stop = -(-pause // 3) * 3
    assert stop // spe == 1 and stop % spe  # inside epoch 2
    rc, log = _interrupt(argv, out, pause, rank=1, torchrun=[])
    assert rc != 0, log[-4000:]
    for rank in range(2):
        assert f"afd_fast: rank {rank}: SIGTERM: stopped after step {stop}" in log, log[-4000:]
    assert f"every process stopped after step {stop} (epoch 2, batch {stop - spe} of {spe})" in log
    assert "resume with: torchrun --standalone --nproc_per_node=2 -m afd_fast.train" in log
    ckpt = checkpoint.load(str(out / "last.pt"))
    assert (ckpt["epoch"], ckpt["batch"], ckpt["step"], ckpt["world_size"]) == (1, stop - spe, stop, 2)
    assert all(isinstance(r["loader"], bytes) for r in ckpt["ranks"])  # each shard's DALI pipeline state

    rc, log = _run(argv + ["--resume"], tmp_path / "resumed.log", torchrun=[])
    assert rc == 0, log[-4000:]
    _assert_same_training(reference, out)


@pytest.mark.slow
@needs_dali
def test_torchrun_max_restarts_recovers_a_killed_worker_with_resume_auto(tmp_path, tmp_path_factory, jpegs):
    reference, spe = _torchrun_reference(tmp_path_factory, jpegs)
    out = tmp_path / "out"
    argv = _argv(jpegs, out, *TORCHRUN_EXTRA, "--checkpoint-every", "2", "--resume", "auto")
    log = tmp_path / "restarts.log"
    kill_after = spe + 3  # epoch 2; the newest checkpoint then is the one of step spe + 2
    proc = _launch(argv, log, env={"AFD_FAST_TEST_PAUSE_AT_STEP": str(kill_after), "AFD_FAST_TEST_PAUSE_RANK": "1"},
                   torchrun=["--max-restarts=1", "--monitor-interval=0.2"])
    try:
        pid = _wait_for_file(out / f".test-paused-step{kill_after}-rank1", proc, log)
        os.kill(pid, signal.SIGKILL)  # a crashed worker: no handler, no checkpoint of its own
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert proc.returncode == 0, text[-6000:]
    assert "--resume auto: no checkpoint" in text  # the first attempt started fresh
    resumed = re.search(rf"resumed from {re.escape(str(out / 'last.pt'))} \(.*step (\d+)\)", text)
    assert resumed and spe < int(resumed.group(1)) < kill_after, text[-6000:]  # the restart, from step spe + 2
    _assert_same_training(reference, out)


# --- durable writes --------------------------------------------------------------------------------

@pytest.mark.slow
def test_kill_9_inside_a_write_then_truncated_last_falls_back_to_previous(tmp_path, tmp_path_factory, jpegs):
    extra = [*LOADERS["torch"][0], "--epochs", "2"]
    reference = _reference(tmp_path_factory, jpegs, extra)
    out = tmp_path / "out"
    argv = _argv(jpegs, out, *extra, "--checkpoint-every", "3")
    # writes: step 3, step 6, end of epoch 1 (step 8): the third one is killed half-way
    log = tmp_path / "killed.log"
    proc = _launch(argv, log, env={"AFD_FAST_TEST_WRITE_FAULT": "3:pause"})
    try:
        pid = _wait_for_file(out / ".test-paused-in-write", proc, log)
        os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert [p for p in os.listdir(out) if ".tmp." in p]  # the interrupted write's partial file
    assert checkpoint.load(str(out / "last.pt"))["step"] == 6  # the whole previous write
    assert checkpoint.load(str(out / "previous.pt"))["step"] == 3

    data = (out / "last.pt").read_bytes()
    (out / "last.pt").write_bytes(data[:len(data) // 2])
    rc, text = _run(argv + ["--resume", out / "last.pt"], tmp_path / "explicit.log")
    assert rc == 1
    assert f"checkpoint '{out / 'last.pt'}' is truncated" in text, text[-3000:]
    assert f"the newest complete checkpoint in '{out}' is previous.pt (epoch 1, batch 3, step 3)" in text
    assert f"--resume {out / 'previous.pt'}" in text and "Traceback" not in text

    rc, text = _run(argv + ["--resume"], tmp_path / "fallback.log")
    assert rc == 0, text[-4000:]
    assert f"resuming from {out / 'previous.pt'} instead; the damaged file is kept as {out / 'last.pt'}.damaged" in text
    assert not [p for p in os.listdir(out) if ".tmp." in p]
    _assert_same_training(reference, out)


@pytest.mark.slow
def test_a_failed_write_stops_the_run_and_keeps_the_previous_checkpoint(tmp_path, jpegs):
    """ENOSPC raised inside the second write (test hook): the run stops with a clear message."""
    out = tmp_path / "out"
    argv = _argv(jpegs, out, "--loader", "torch", "--workers", "0", "--epochs", "2", "--checkpoint-every", "2")
    rc, text = _run(argv, tmp_path / "log", env={"AFD_FAST_TEST_WRITE_FAULT": "2:enospc"})
    assert rc == 1, text[-4000:]
    _assert_full_disk_message(text, out)


def _assert_full_disk_message(text, out):
    assert (f"cannot write checkpoint '{out / 'last.pt'}': [Errno {errno.ENOSPC}] No space left on device (free space "
            f"in '{out}' or give another --output); the run stops and the previous checkpoint '{out / 'last.pt'}' "
            f"(epoch 1, batch 2, step 2) is intact; resume with: python -m afd_fast.train") in text, text[-4000:]
    assert checkpoint.load(str(out / "last.pt"))["step"] == 2
    assert not [p for p in os.listdir(out) if ".tmp." in p] and not (out / "summary.json").exists()


def _can_mount_tmpfs(folder):
    try:
        return subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k none {folder}"],
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.slow
def test_a_really_full_disk(tmp_path, tmp_path_factory, jpegs):
    """A tmpfs that holds one checkpoint and a half (in a user namespace: no root needed)."""
    mount = tmp_path / "mnt"
    mount.mkdir()
    if shutil.which("unshare") is None or not _can_mount_tmpfs(mount):
        pytest.skip("no unprivileged user namespaces with tmpfs mounts here")
    extra = [*LOADERS["torch"][0], "--epochs", "2"]
    size = os.path.getsize(_reference(tmp_path_factory, jpegs, extra) / "last.pt")
    extra += ["--checkpoint-every", "2"]
    out, kept = mount / "out", tmp_path / "kept"
    argv = " ".join(_argv(jpegs, out, *extra))
    script = (f"mount -t tmpfs -o size={size * 3 // 2 // 1024}k none {mount} && "
              f"{sys.executable} -m afd_fast.train {argv} > {tmp_path / 'log'} 2>&1; echo $? > {tmp_path / 'rc'}; "
              f"cp -r {out} {kept}")
    subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=ROOT, env=ENV, timeout=600, check=True)
    text = (tmp_path / "log").read_text()
    assert (tmp_path / "rc").read_text().strip() == "1", text[-4000:]
    assert f"cannot write checkpoint '{out / 'last.pt'}': [Errno {errno.ENOSPC}] No space left on device" in text
    assert "(epoch 1, batch 2, step 2) is intact" in text
    assert checkpoint.load(str(kept / "last.pt"))["step"] == 2
    assert not [p for p in os.listdir(kept) if ".tmp." in p]


# --- the pieces ------------------------------------------------------------------------------------

def _batches(iterable):
    return [(x.clone(), y.clone()) for x, y in iterable]


def _assert_tail(full, resumed, start):
    assert len(resumed) == len(full) - start
    for (a, la), (b, lb) in zip(full[start:], resumed):
        assert torch.equal(a, b) and torch.equal(la, lb)


@pytest.mark.parametrize("backend,workers", [("torch", 0), ("torch", 2), ("cifar", 0), ("dali", 1)])
def test_an_epoch_resumed_at_a_batch_continues_with_the_same_batches(jpegs, cifar, backend, workers):
    if backend == "dali" and not dali_available():
        pytest.skip("nvidia-dali is not installed")
    root = cifar if backend == "cifar" else jpegs
    loaders = build_loaders(root, 32, 8, workers, seed=5, backend="dali" if backend == "dali" else "torch")
    full = _batches(loaders.train_epoch(1))
    assert len(full) == loaders.steps_per_epoch
    _assert_tail(full, _batches(loaders.train_epoch(1, 3)), 3)
    if backend == "dali":  # from the pipeline's own checkpoint (no decoding of the skipped batches)
        it = iter(loaders.train_epoch(1))
        for _ in range(3):
            next(it)
        state = loaders.train_state()
        _assert_tail(full, _batches(loaders.train_epoch(1, 3, state)), 3)
    other = _batches(loaders.train_epoch(2))
    assert not torch.equal(other[0][0], full[0][0])


def test_torch_loaders_leave_the_global_generator_alone(jpegs):
    """A resumed run restores torch's global RNG: the loaders must not draw from it."""
    loaders = build_loaders(jpegs, 32, 8, workers=1, seed=0, backend="torch")
    state = torch.get_rng_state()
    for _ in loaders.train_epoch(0):
        pass
    for _ in loaders.val:
        pass
    assert torch.equal(state, torch.get_rng_state())


def test_durable_write_rotation_and_verified_reads(tmp_path):
    path = str(tmp_path / "last.pt")
    for step in (1, 2, 3):
        checkpoint.write_durably({"model": {}, "step": step, "x": torch.full((4096,), float(step))}, path,
                                 best=step == 2)
    steps = {n: torch.load(tmp_path / n, weights_only=True)["step"] for n in ("last.pt", "previous.pt", "best.pt")}
    assert steps == {"last.pt": 3, "previous.pt": 2, "best.pt": 2} and os.listdir(tmp_path).__len__() == 3
    raw = bytearray((tmp_path / "last.pt").read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # a flipped bit inside the tensor data: torch.load would not notice
    (tmp_path / "last.pt").write_bytes(bytes(raw))
    with pytest.raises(checkpoint.CheckpointError, match=r"last.pt' is corrupt \(record .* fails its CRC check\)"):
        checkpoint.load(path)
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(checkpoint.CheckpointError, match=r"empty.pt' is truncated or not a checkpoint"):
        checkpoint.load(str(tmp_path / "empty.pt"))
    with pytest.raises(checkpoint.CheckpointError, match=r"no checkpoint in .* \(none of last.pt"):
        checkpoint.resolve_resume("", str(tmp_path / "nothing"))
    assert checkpoint.resolve_resume("auto", str(tmp_path / "nothing")) is None  # fresh start


def test_version_1_checkpoints_are_read_and_newer_ones_refused(tmp_path):
    old = {"model": {}, "optimizers": {}, "schedules": {}, "epoch": 2, "step": 20, "best": 50.0, "history": [],
           "rng": [checkpoint.rng_state()], "args": {"batch_size": 8}}
    torch.save(old, tmp_path / "v1.pt")
    ckpt = checkpoint.load(str(tmp_path / "v1.pt"))
    assert (ckpt["version"], ckpt["epoch"], ckpt["batch"], ckpt["world_size"], ckpt["batch_size"]) == (2, 2, 0, 1, 8)
    torch.save({"model": {}, "format": checkpoint.FORMAT, "version": 99}, tmp_path / "v99.pt")
    with pytest.raises(checkpoint.CheckpointError, match="version 99, newer than this afd_fast reads"):
        checkpoint.load(str(tmp_path / "v99.pt"))


def test_checkpoint_writer_reports_a_full_disk(tmp_path, monkeypatch):
    _hooks.fail_checkpoint_write(2, "enospc", monkeypatch.setattr)
    writer = checkpoint.CheckpointWriter(str(tmp_path), "python -m afd_fast.train --resume")
    state = {"model": {}, "epoch": 0, "batch": 1, "step": 1, "x": torch.zeros(100_000)}
    writer.submit(state, wait=True)
    writer.submit(dict(state, batch=2, step=2))
    with pytest.raises(checkpoint.CheckpointWriteError, match=r"No space left on device .*\(epoch 1, batch 1, step 1\) "
                                                              r"is intact; resume with: python -m afd_fast.train"):
        writer.wait()
    assert checkpoint.load(str(tmp_path / "last.pt"))["step"] == 1 and os.listdir(tmp_path) == ["last.pt"]


def test_stop_control_agrees_in_one_process():
    control = preemption.StopControl(0, 1, torch.device("cpu"), check_every=5, checkpoint_every=3,
                                     checkpoint_minutes=1e-9)
    with control:
        decision = control.after_step(1)
        assert decision.save and not decision.stop  # the clock: due at once
        control.saved()
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.01)
        assert control.after_step(2).stop == signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # the handlers are restored


def test_resume_command_replaces_any_resume_flag(monkeypatch):
    for var in ("TORCHELASTIC_RUN_ID", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert (preemption.resume_command(["--data", "/d", "--resume", "auto", "--epochs", "3"])
            == "python -m afd_fast.train --data /d --epochs 3 --resume")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("GROUP_WORLD_SIZE", "2")
    assert preemption.resume_command(["--resume=x.pt", "--arch", "a b"]).startswith(
        "torchrun --nnodes=2 --nproc_per_node=4 (and this job's --rdzv-* options) -m afd_fast.train --arch 'a b' --resume")
