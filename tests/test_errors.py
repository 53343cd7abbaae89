"""One error type: library calls raise AfdFastError subclasses (an ``except Exception`` catches them);
the command lines turn them into one line and an exit status, without a traceback."""
import os
import signal
import subprocess
import sys
import time

import pytest

from afd_fast import checkpoint, errors, train
from afd_fast.data import BadDataError, build_loaders, synthetic_image_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return synthetic_image_folder(str(tmp_path_factory.mktemp("data") / "tiny"), num_classes=4,
                                  train_per_class=16, val_per_class=6, size=32)


def test_library_calls_raise_afd_fast_errors_that_except_exception_catches(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    caught = []
    for call in (lambda: checkpoint.load(str(tmp_path / "bad.pt")),
                 lambda: checkpoint.resolve_resume("", str(tmp_path)),
                 lambda: build_loaders(str(tmp_path / "missing"), 32, 8, 0, 0)):
        try:
            call()
        except Exception as e:  # noqa: BLE001: what a library user writes
            caught.append(e)
    assert [type(e) for e in caught] == [checkpoint.CheckpointError, checkpoint.CheckpointError, BadDataError]
    assert all(isinstance(e, errors.AfdFastError) for e in caught)


def test_train_main_raises_the_checkpoint_error(tmp_path, tiny_data):
    argv = ["--data", tiny_data, "--output", str(tmp_path / "out"), "--workers", "0", "--resume"]
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint in"):
        train.main(argv)


def _cli(*argv):
    return subprocess.run([sys.executable, "-m", "afd_fast.train", *argv], capture_output=True, text=True, cwd=ROOT,
                          env=ENV, timeout=300)


def test_the_cli_prints_one_line_and_exits_with_the_errors_status(tmp_path, tiny_data):
    (tmp_path / "empty").mkdir()
    out = _cli("--data", str(tmp_path / "empty"), "--output", str(tmp_path / "a"), "--device", "cpu")
    assert out.returncode == errors.BadDataError.exit_status == 1, out.stderr
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("afd_fast: ") and "does not exist" in out.stderr

    out = _cli("--data", tiny_data, "--output", str(tmp_path / "b"), "--device", "cpu", "--workers", "0", "--resume")
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip().splitlines()[-1] == (f"afd_fast: --resume: no checkpoint in '{tmp_path / 'b'}' "
                                                   "(none of last.pt, previous.pt, best.pt exists)")


@pytest.mark.slow
def test_sigterm_to_the_accuracy_benchmark_says_reuse_continues_it(tmp_path):
    """A real SIGTERM in the middle of the benchmark's first training run (tests/_hooks.py pauses it
    after step 1): one line that names the checkpointed run and --reuse, no traceback; --reuse then
    resumes that run."""
    runs = tmp_path / "runs"
    cmd = [sys.executable, os.path.join(ROOT, "tests", "_hooks.py"), os.path.join(ROOT, "benchmarks", "accuracy.py"),
           "--quick", "--rows", "vanilla:resnet20,resnet20", "--seeds", "1", "--device", "cpu", "--runs", str(runs),
           "--output", str(tmp_path / "accuracy.json")]
    marker = tmp_path / ".test-paused-step1-rank0"
    env = dict(ENV, AFD_FAST_TEST_PAUSE_AT_STEP="1", AFD_FAST_TEST_MARKERS=str(tmp_path))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    try:
        deadline = time.monotonic() + 300
        while not (marker.exists() and marker.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    run = runs / "vanilla_resnet20+resnet20" / "seed0"
    assert proc.returncode == 128 + signal.SIGTERM, stdout + stderr
    assert "Traceback" not in stdout + stderr
    assert stderr.strip().splitlines()[-1] == (f"afd_fast: SIGTERM: the run in {run} stopped and was checkpointed; "
                                               "the same command with --reuse continues it")
    assert checkpoint.load(str(run / "last.pt"))["step"] == 1

    done = subprocess.run(cmd + ["--reuse"], capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"resumed from {run / 'last.pt'}" in (run / "train.log").read_text()
    assert (tmp_path / "accuracy.json").exists()
