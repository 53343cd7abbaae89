"""python -m afd_fast.evaluate: a tiny run trained in-process, scored again from its exported networks
and its checkpoint, and bad input refused."""
import json
import os
import runpy
import shutil
import subprocess
import sys

import pytest
import torch

from afd_fast import evaluate, train
from afd_fast.data import synthetic_image_folder
from afd_fast.errors import CheckpointError, ConfigError
from afd_fast.models import build_network

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = [f"{name}_top{t}" for name in ("net0", "net1", "ensemble", "net_mean") for t in (1, 5)]
DATA_FLAGS = ["--workers", "0", "--loader", "torch"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(data folder, output folder, the last metrics.jsonl record) of 1 epoch of afd on resnet20 pairs
    with a weight EMA, 10 classes (a rate at which the networks and their ensemble score differently)."""
    root = tmp_path_factory.mktemp("evaluate")
    data = synthetic_image_folder(str(root / "data"), num_classes=10, train_per_class=12, val_per_class=5, size=32)
    out = str(root / "out")
    train.main(["--data", data, "--output", out, "--batch-size", "8", "--epochs", "1", "--lr", "0.02",
                "--print-every", "1000", "--model-ema", "0.9", *DATA_FLAGS])
    with open(os.path.join(out, "metrics.jsonl")) as f:
        record = [json.loads(line) for line in f][-1]
    return data, out, record


def _same(results, record, prefix=""):
    for key in KEYS:
        assert results[prefix + key] == pytest.approx(record[prefix + key], abs=1e-9), prefix + key


def test_exported_networks_reproduce_the_trainers_accuracy(run):
    data, out, record = run
    files = [os.path.join(out, f"network{i}_resnet20.pt") for i in range(2)]
    got = evaluate.main([*files, "--data", data, *DATA_FLAGS])
    _same(got["results"], record)
    assert got["images"] == record["val_images"] == 50 and got["image_size"] == 32  # a CIFAR network's default
    assert got["networks"]["net1"] == {"arch": "resnet20", "file": files[1]}
    # the EMA exports form their own group, scored as the trainer scored the EMA
    emas = [os.path.join(out, f"network{i}_resnet20_ema.pt") for i in range(2)]
    both = evaluate.main([*files, *emas, "--data", data, *DATA_FLAGS])
    _same(both["results"], record)
    _same(both["results"], record, prefix="ema_")
    # other names need --arch; --split train scores the training images
    renamed = shutil.copy(files[1], os.path.join(os.path.dirname(data), "student.pt"))
    alone = evaluate.main([renamed, "--arch", "resnet20", "--data", data, "--split", "train", *DATA_FLAGS])
    assert alone["images"] == 120 and alone["split"] == "train"


def test_checkpoint_reproduces_the_trainers_accuracy_with_its_ema(run, tmp_path):
    data, out, record = run
    got = evaluate.main([os.path.join(out, "last.pt"), *DATA_FLAGS])  # data, sizes and batch from the checkpoint
    _same(got["results"], record)
    _same(got["results"], record, prefix="ema_")  # the checkpoint's EMA, as the trainer evaluated it
    assert got["data"] == data and got["batch_size"] == 8
    assert record["ema_net0_top1"] != record["net0_top1"] or record["ema_net1_top1"] != record["net1_top1"]
    # a checkpoint without an EMA: no ema_ keys
    ckpt = torch.load(os.path.join(out, "last.pt"), map_location="cpu", weights_only=True)
    del ckpt["ema"]
    torch.save(ckpt, tmp_path / "plain.pt")
    assert not any(k.startswith("ema_") for k in evaluate.main([str(tmp_path / "plain.pt"), *DATA_FLAGS])["results"])


def test_recalibration_changes_the_scores_not_the_files(run, tmp_path):
    data, out, record = run
    path = os.path.join(out, "last.pt")
    before = open(path, "rb").read()
    first = evaluate.main([path, "--bn-recalibrate", "3", "--output", str(tmp_path / "r.json"), *DATA_FLAGS])
    second = evaluate.main([path, "--bn-recalibrate", "3", *DATA_FLAGS])
    assert first["results"] == second["results"] and first["bn_recalibrate"] == 3
    assert first["results"] != evaluate.main([path, *DATA_FLAGS])["results"]
    assert open(path, "rb").read() == before
    assert json.loads((tmp_path / "r.json").read_text())["results"] == first["results"]


def test_a_checkpoint_trained_at_another_crop_than_it_is_evaluated_at(run, tmp_path):
    """--train-crop-size 24, validation at 32 px: the AFD discriminators are shaped by the 24 px maps,
    and the checkpoint is rebuilt as it was trained (its validation scores reproduced)."""
    data, _, _ = run
    out = str(tmp_path / "out")
    train.main(["--data", data, "--output", out, "--batch-size", "8", "--epochs", "1", "--max-steps", "2",
                "--train-crop-size", "24", "--print-every", "1000", *DATA_FLAGS])
    with open(os.path.join(out, "metrics.jsonl")) as f:
        record = [json.loads(line) for line in f][-1]
    got = evaluate.main([os.path.join(out, "last.pt"), *DATA_FLAGS])
    _same(got["results"], record)
    assert got["image_size"] == 32


def test_bad_input_is_refused_naming_the_file(run, tmp_path):
    data, out, _ = run
    net0 = os.path.join(out, "network0_resnet20.pt")
    missing = str(tmp_path / "nothing.pt")
    with pytest.raises(CheckpointError, match="nothing.pt.*does not exist"):
        evaluate.main([missing, "--data", data])
    text = tmp_path / "last.pt"
    text.write_text("not weights")
    with pytest.raises(CheckpointError, match="last.pt.*not a checkpoint"):
        evaluate.main([str(text), "--data", data])
    with pytest.raises(CheckpointError, match="network0_resnet20.pt.*not an exported network"):
        evaluate.main([str(shutil.copy(os.path.join(out, "last.pt"), tmp_path / "network0_resnet20.pt")), "--data", data])
    few = synthetic_image_folder(str(tmp_path / "four"), num_classes=4, train_per_class=2, val_per_class=1, size=32)
    with pytest.raises(ConfigError, match=r"network0_resnet20.pt.*trained for 10 classes.*has 4"):
        evaluate.main([net0, "--data", few, *DATA_FLAGS])
    with pytest.raises(ConfigError, match=r"last.pt.*trained for 10 classes.*has 4"):
        evaluate.main([os.path.join(out, "last.pt"), "--data", few, *DATA_FLAGS])
    wrong = shutil.copy(net0, tmp_path / "network0_resnet32.pt")
    with pytest.raises(CheckpointError, match="network0_resnet32.pt' does not hold resnet32's weights"):
        evaluate.main([str(wrong), "--data", data, *DATA_FLAGS])
    torch.save(build_network("wrn-16-2", 10).plain_state_dict(), tmp_path / "narrow.pt")  # the same entries, narrower
    with pytest.raises(CheckpointError, match="narrow.pt' does not hold wrn-16-4's weights: .* has shape"):
        evaluate.main([str(tmp_path / "narrow.pt"), "--arch", "wrn-16-4", "--data", data, *DATA_FLAGS])
    with pytest.raises(ConfigError, match="need --data"):
        evaluate.main([net0])


def _as_command(monkeypatch, capsys, *argv) -> tuple[int, str, str]:
    """``python -m afd_fast.evaluate ARGV`` in this process: (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["afd_fast.evaluate", *argv])
    monkeypatch.delitem(sys.modules, "afd_fast.evaluate", raising=False)  # run as a fresh __main__, as -m does
    with pytest.raises(SystemExit) as stopped:
        runpy.run_module("afd_fast.evaluate", run_name="__main__")
    out, err = capsys.readouterr()
    return stopped.value.code, out, err


def test_help_and_errors_on_the_command_line(tmp_path, monkeypatch, capsys):
    status, out, _ = _as_command(monkeypatch, capsys, "--help")
    assert status == 0
    for flag in ("--bn-recalibrate", "--split", "--output", "--amp", "network<k>_<arch>.pt", "last.pt", "torchrun"):
        assert flag in out
    missing = str(tmp_path / "missing.pt")
    status, _, err = _as_command(monkeypatch, capsys, missing)
    assert status == CheckpointError.exit_status
    assert err.strip().splitlines() == [f"afd_fast: {missing!r} does not exist or is not a file"]


def test_command_line_writes_json(run, tmp_path):
    data, out, record = run
    result = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, "-m", "afd_fast.evaluate", os.path.join(out, "last.pt"), "--output",
                           str(result), *DATA_FLAGS], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = json.loads(result.read_text())
    _same(written["results"], record)
    assert written["weights"] == [os.path.join(out, "last.pt")] and written["images"] == 50
    assert "ensemble" in proc.stdout and "img/s" in proc.stderr
