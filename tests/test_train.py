"""The trainer CLI (afd_fast.train) end to end on small real JPEG folders, on the CPU."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from afd_fast import train
from afd_fast.methods import METHODS, method_spec
from afd_fast.data import BadDataError
from afd_fast.errors import CheckpointError
from afd_fast.data import synthetic_image_folder
from afd_fast.models import build_network
from afd_fast.step import DualStep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return synthetic_image_folder(str(tmp_path_factory.mktemp("data") / "tiny"), num_classes=4,
                                  train_per_class=16, val_per_class=6, size=32)


def _run(tmp_path, data, *extra):
    out = str(tmp_path / "out")
    argv = ["--data", data, "--output", out, "--workers", "0", "--batch-size", "8", "--epochs", "1",
            "--print-every", "1000", *extra]
    return train.main(argv), out


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_end_to_end(tmp_path, tiny_data, method):
    extra = []
    if method_spec(method).frozen_teacher:  # a "pre-trained" teacher: any weights of the right shape
        torch.save(build_network("resnet20", 4).state_dict(), tmp_path / "teacher.pt")
        extra = ["--pretrained", f",{tmp_path / 'teacher.pt'}"]
    summary, out = _run(tmp_path, tiny_data, "--method", method, "--max-steps", "3", *extra)
    assert summary["method"] == method and summary["steps"] == 3
    for key in ("net0_top1", "net1_top1", "ensemble_top1", "ensemble_top5", "net_mean_top1", "best_single_net_top1"):
        assert 0 <= summary[key] <= 100
    trained = ["net0_top1"] if extra else ["net0_top1", "net1_top1"]  # a frozen teacher is not a trained network
    assert summary["net_mean_top1"] == pytest.approx(sum(summary[k] for k in trained) / len(trained))
    assert ("gated_ensemble_top1" in summary) == (method == "one")
    assert (summary["global_batch"], summary["batch_per_process"]) == (8, 8)
    lines = open(os.path.join(out, "metrics.jsonl")).read().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["step"] == 3
    for name in ("summary.json", "last.pt", "best.pt", "curves.png", "network0_resnet20.pt", "network1_resnet20.pt"):
        assert os.path.exists(os.path.join(out, name)), name


def test_exported_network_loads_into_the_plain_model(tmp_path, tiny_data):
    _, out = _run(tmp_path, tiny_data, "--arch", "resnet20,wrn-16-2", "--max-steps", "2")
    plain = build_network("wrn-16-2", 4)
    plain.load_state_dict(torch.load(os.path.join(out, "network1_wrn-16-2.pt"), weights_only=True))


def test_pretrained_weights_are_loaded(tmp_path, tiny_data):
    _, first = _run(tmp_path / "a", tiny_data, "--max-steps", "2")
    files = [os.path.join(first, f"network{i}_resnet20.pt") for i in range(2)]
    # a negligible rate (0 is refused) and no adversarial term: the weights stay the loaded ones to 1e-9,
    # where fresh ones differ by far more (batch-norm buffers still move)
    _, second = _run(tmp_path / "b", tiny_data, "--max-steps", "1", "--method", "vanilla", "--lr", "1e-12",
                     "--pretrained", ",".join(files))
    for i in range(2):
        loaded = torch.load(files[i], weights_only=True)
        after = torch.load(os.path.join(second, f"network{i}_resnet20.pt"), weights_only=True)
        for name in loaded:
            if "running" not in name and "num_batches" not in name:
                torch.testing.assert_close(after[name], loaded[name], rtol=0, atol=1e-9, msg=name)


def test_three_networks_cyclic(tmp_path, tiny_data):
    summary, _ = _run(tmp_path, tiny_data, "--arch", "resnet20,resnet20,resnet20", "--max-steps", "2")
    assert summary["topology"] == "cyclic" and "net2_top1" in summary


@pytest.mark.parametrize("speed", [[], ["--amp", "bf16", "--channels-last"], ["--amp", "fp16", "--batched-backward"]],
                         ids=["float32", "bf16-channels-last", "fp16-loss-scale-batched-backward"])
def test_resume_equals_uninterrupted_training(tmp_path, tiny_data, speed):
    common = ["--arch", "resnet20,resnet20", "--seed", "3", *speed]
    full, _ = _run(tmp_path / "a", tiny_data, *common, "--epochs", "2")
    _run(tmp_path / "b", tiny_data, *common, "--epochs", "1")
    resumed, _ = _run(tmp_path / "b", tiny_data, *common, "--epochs", "2", "--resume")
    for key in ("img_per_s",):
        full.pop(key), resumed.pop(key)
    assert resumed == full
    a = torch.load(tmp_path / "a" / "out" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / "out" / "last.pt", weights_only=True)["model"]
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_alternating_dml_gives_every_network_an_epoch_of_updates_per_epoch(tmp_path, tiny_data, monkeypatch):
    """--dml-update alternate: a step is one iteration, K updates on K consecutive batches; an epoch
    is K passes of the loader (pass p of epoch e: the loader's epoch e*K + p), so steps, the schedule
    and the records count iterations (8 per epoch here, as the loader's 8 batches)."""
    passes, calls = [], []
    build_data = train.build_data

    def recording_data(*args, **kwargs):
        loaders = build_data(*args, **kwargs)
        train_epoch = loaders.train_epoch
        loaders.train_epoch = lambda epoch, start=0, state=None: passes.append((epoch, start)) or train_epoch(
            epoch, start, state)
        return loaders
    call = DualStep.__call__
    monkeypatch.setattr(train, "build_data", recording_data)
    monkeypatch.setattr(DualStep, "__call__", lambda self, x, y: calls.append(len(x)) or call(self, x, y))
    summary, out = _run(tmp_path, tiny_data, "--method", "dml", "--dml-update", "alternate", "--epochs", "2",
                        "--arch", "resnet20,resnet20,resnet20", "--image-size", "16")
    assert passes == [(e, 0) for e in range(6)]
    assert calls == [3 * 8] * 16 and summary["steps"] == 16
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in records] == [8, 16] and all(len(r["train_ce"]) == 3 for r in records)


def test_non_finite_loss_stops_with_a_message(tmp_path, tiny_data):
    with pytest.raises(train.NonFiniteLoss, match=r"non-finite \w+ by step \d+ for network \d \(resnet20\)"):
        _run(tmp_path, tiny_data, "--lr", "1e12", "--max-steps", "20", "--method", "dml", "--print-every", "1")


@pytest.mark.parametrize("argv,message", [
    (["--arch", "resnet19,resnet20"], "unknown network 'resnet19'; known networks"),
    (["--arch", "resnet20"], "distils between networks: give at least 2"),
    (["--method", "afdx"], "invalid choice: 'afdx'"),
    (["--arch", "resnet20,resnet20,resnet20", "--topology", "pair"], "exactly 2 networks"),
    (["--data", "/nonexistent/imagenet"], "is not a folder"),
    (["--pretrained", "/nonexistent.pt,/nonexistent.pt"], "does not exist"),
    (["--sync-bn", "--device", "cpu"], "--sync-bn needs --device cuda"),
    (["--amp", "fp8"], "invalid choice: 'fp8'"),
    (["--hw-decoder-load", "1.5"], "--hw-decoder-load must lie in [0, 1]"),
    (["--prefetch", "0"], "--prefetch must be at least 1"),
    (["--batched-backward", "--sync-bn", "--device", "cpu"], "--sync-bn"),
])
def test_bad_arguments_fail_before_any_work(argv, message, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(argv)
    assert message in capsys.readouterr().err


def test_speed_flags_default_to_off_on_the_cpu(capsys):
    args = train.parse_args(["--device", "cpu", "--cuda-graph"])
    assert (args.amp, args.channels_last, args.cuda_graph) == ("off", False, False)
    assert "--cuda-graph needs --device cuda" in capsys.readouterr().err
    args = train.parse_args(["--device", "cpu", "--amp", "bf16", "--channels-last"])
    assert (args.amp, args.channels_last) == ("bf16", True)


def test_resume_without_checkpoint(tmp_path, tiny_data):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        _run(tmp_path, tiny_data, "--resume")


def test_data_folder_without_splits(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    synthetic = synthetic_image_folder(str(tmp_path / "synthetic"), num_classes=1, train_per_class=1, val_per_class=1)
    shutil.copy(os.path.join(synthetic, "train", "class000", "00000.jpg"), tmp_path / "train" / "a" / "x.jpg")
    with pytest.raises(BadDataError, match=r"val' does not exist"):
        _run(tmp_path, str(tmp_path))


@pytest.mark.parametrize("loader", ["dali", "torch"])
def test_both_loaders_train_and_resume_exactly(tmp_path, tiny_data, loader):
    common = ["--seed", "1", "--loader", loader, "--batch-size", "16"]
    full, _ = _run(tmp_path / "a", tiny_data, *common, "--epochs", "2")
    _run(tmp_path / "b", tiny_data, *common, "--epochs", "1")
    resumed, _ = _run(tmp_path / "b", tiny_data, *common, "--epochs", "2", "--resume")
    full.pop("img_per_s"), resumed.pop("img_per_s")
    assert resumed == full and full["steps"] == 2 * (64 // 16)


@pytest.mark.slow
def test_readme_main_command_default_data(tmp_path):
    """`python -m afd_fast.train` with no --data: synthetic set, trains well above chance (10%)."""
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "afd_fast.train", "--output", str(out), "--workers", "0"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "img/s" in proc.stdout and "ETA" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ensemble_top1"] > 40, summary


IMAGENETTE = os.environ.get("AFD_FAST_IMAGENETTE", os.path.join(os.path.dirname(ROOT), "shared", "data", "imagenette-mini"))


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(IMAGENETTE), reason=f"no imagenette-mini at {IMAGENETTE}")
def test_real_imagenet_jpegs_train_above_chance(tmp_path):
    """Real ImageNet JPEGs (10 classes, chance = 10%): a short AFD run at 32 px learns."""
    summary, _ = _run(tmp_path, IMAGENETTE, "--epochs", "3", "--batch-size", "32", "--image-size", "32",
                      "--lr", "0.05", "--adv-lr", "2e-4", "--workers", "2")
    assert summary["val_images"] == 500
    assert summary["ensemble_top1"] > 20, summary


def test_verify_images_finds_a_corrupt_file_and_skip_leaves_it_out(tmp_path, tiny_data, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    bad = data / "train" / "class001" / "00003.jpg"
    raw = bad.read_bytes()
    bad.write_bytes(raw[:20] + bytes(range(256)) * (len(raw) // 256) + raw[-2:])  # markers intact, data garbage
    with pytest.raises(BadDataError, match=r"00003.jpg': cannot be decoded"):
        _run(tmp_path / "a", str(data), "--verify-images", "--max-steps", "1")
    summary, _ = _run(tmp_path / "b", str(data), "--verify-images", "--skip-bad-files", "--max-steps", "1")
    assert summary["steps"] == 1 and "skipped 1 unreadable or non-image files" in capsys.readouterr().err
