"""The benchmarks run (smoke sizes) and write what their README section is built from."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGENETTE = os.environ.get("AFD_FAST_IMAGENETTE", os.path.join(os.path.dirname(ROOT), "shared", "data", "imagenette-mini"))


def _run(script, tmp_path, *args):
    out = tmp_path / f"{script}.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", f"{script}.py"), *args,
                           "--device", "cpu", "--output", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    payload = json.loads(out.read_text())
    assert payload["machine"]["cpu"] and payload["device"] == "cpu"
    return payload, proc.stdout, out


@pytest.mark.slow
def test_step_benchmark_ladder(tmp_path):
    pytest.importorskip("matplotlib")
    payload, stdout, out = _run("step", tmp_path, "--quick", "--data", IMAGENETTE)
    for config in ("imagenet", "cifar"):
        rows = [r for r in payload["results"] if r["config"] == config]
        labels = [r["variant"] for r in rows]
        assert labels[:4] == ["eager fp32, reference losses", "+ AMP bf16", "+ channels-last", "+ fused ops"]
        assert any(label.startswith("vanilla pair") for label in labels)
        assert rows[0]["vs_first"] == 1.0 and rows[0]["settings"]["fused"] is False
        for r in rows:
            assert r["img_per_s"] > 0 and r["ms"] > 0
            assert r["vs_first"] == pytest.approx(r["img_per_s"] / rows[0]["img_per_s"])
        afd_rows = [r for r in rows if r["settings"]["method"] == "afd" and not r["variant"].startswith("end to end")]
        fastest = min(afd_rows, key=lambda r: r["ms"])
        vanilla = next(r for r in rows if r["variant"].startswith("vanilla pair"))
        assert {**vanilla["settings"], "method": "afd"} == fastest["settings"]
        assert rows[0]["afd_over_vanilla"] == pytest.approx(fastest["ms"] / vanilla["ms"])
    if os.path.isdir(IMAGENETTE):
        assert any(r["variant"].startswith("end to end from JPEG") for r in payload["results"])
    assert "vanilla pair step =" in stdout and os.path.getsize(out.with_suffix(".png")) > 10_000


@pytest.mark.slow
def test_data_benchmark(tmp_path):
    payload, stdout, _ = _run("data", tmp_path, "--quick", "--data", IMAGENETTE)
    loaders = [r["loader"] for r in payload["results"]]
    assert loaders[-1] == "CIFAR loader on the cpu" and payload["results"][-1]["vs_torchvision"] is None
    if os.path.isdir(IMAGENETTE):
        assert loaders[0] == "torchvision DataLoader" and payload["results"][0]["vs_torchvision"] == 1.0
        # each loader plain, then with augmentations: ratios to its own plain row
        torch_rows = [r for r in payload["results"] if r["loader"] == "torchvision DataLoader"]
        assert [r["augmentation"] for r in torch_rows] == ["plain", "trivialaugment", "random erasing 0.25",
                                                            "mixup 0.2 / CutMix 1.0 (device)"]
        for r in torch_rows:
            assert r["vs_plain"] == pytest.approx(r["img_per_s"] / torch_rows[0]["img_per_s"])
        assert "vs plain" in stdout
    assert all(r["img_per_s"] > 0 for r in payload["results"])


def test_ops_benchmark(tmp_path):
    payload, stdout, _ = _run("ops", tmp_path, "--quick", "--no-compile", "--iters", "2")
    assert [(r["K"], r["B"], r["C"], r["targets"]) for r in payload["results"]] == [
        (2, 64, 1000, "hard"), (2, 64, 1000, "soft"), (3, 32, 100, "hard"), (3, 32, 100, "soft")]
    assert all(r["speedup_vs_eager_fwd_bwd"] > 0 for r in payload["results"])
    for hard, soft in zip(payload["results"][::2], payload["results"][1::2]):  # soft over hard, same run
        assert soft["fused_soft_over_hard_fwd_bwd"] == pytest.approx(
            soft["timings"]["fused"]["fwd_bwd_ms"] / hard["timings"]["fused"]["fwd_bwd_ms"])
    assert "soft / hard targets" in stdout


def test_gpu_check_script_parses():
    subprocess.run(["bash", "-n", os.path.join(ROOT, "benchmarks", "gpu_check.sh")], check=True)


@pytest.mark.slow
def test_accuracy_benchmark_quick_writes_the_table_and_marks_what_is_not_the_papers_setting(tmp_path):
    pytest.importorskip("matplotlib")
    payload, stdout, out = _run("accuracy", tmp_path, "--quick", "--runs", str(tmp_path / "runs"))
    rows = {(r["label"], tuple(r["archs"])): r for r in payload["rows"]}
    assert {r["method"] for r in payload["rows"]} == {"vanilla", "dml", "one", "afd", "l1kd-offline"}
    for r in payload["rows"]:
        assert len(r["runs"]) == 2 and r["net_mean"]["n"] == 2 and r["seconds"]["mean"] > 0
        assert all(0 <= run["net_mean"] <= 100 and 0 <= run["ensemble"] <= 100 for run in r["runs"])
        assert r["paper"]["tables"]
        # 1 step-capped epoch of the quick recipe on 4 synthetic classes is not the paper's CIFAR-100 run
        assert not r["comparable"] and r["differences"][:2] == [
            "data 4 classes / 64 training images (paper: CIFAR-100, 100 / 50000)", "recipe quick (paper: cifar-paper)"]
    # DML (its default, synchronous form) both ways: its authors' T = 1 and the AFD paper's T = 3, each
    # labelled, each beside the same paper row
    for t in (1, 3):
        dml = rows[(f"dml sync (T={t})", ("resnet32", "resnet32"))]
        assert dml["temperature"] == t and all(run["setting"]["temperature"] == t for run in dml["runs"])
        assert (tmp_path / "runs" / f"dml_T{t}_resnet32+resnet32" / "seed1").is_dir()
    afd_row = rows[("afd", ("resnet32", "resnet32"))]["paper"]
    assert (afd_row["tables"], afd_row["net_mean"], afd_row["ensemble"]) == ([1, 2, 3], 74.03, 75.64)
    offline = rows[("l1kd-offline", ("resnet32", "resnet32"))]
    assert offline["paper"]["nets"] == [71.91, 69.79] and all(run["teacher_seconds"] > 0 for run in offline["runs"])
    # the student alone is the offline row's mean, here and in the paper; its teacher trained from another seed
    assert offline["paper"]["net_mean"] == 71.91 and all(run["net_mean"] == run["nets"][0] for run in offline["runs"])
    assert (tmp_path / "runs" / "vanilla_resnet32" / "seed1000").is_dir()
    table = out.with_suffix(".md").read_text()
    assert "| 3 | one | resnet32, resnet32 |" in table
    assert "| dml sync (T=1) | resnet32, resnet32 |" in table and "| dml sync (T=3) | resnet32, resnet32 |" in table
    assert "72.61" not in table and "74.03" not in table and "| n/c |" in table  # the paper's numbers only alike
    assert "not comparable: data 4 classes / 64 training images" in table
    assert "74.03" not in stdout and "not comparable" in stdout and os.path.getsize(out.with_suffix(".png")) > 10_000


def test_accuracy_rows_are_comparable_only_in_the_papers_setting():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import accuracy

    row = accuracy.Row("afd", ("resnet32", "resnet32"))
    paper = dict(archs=["resnet32", "resnet32"], classes=100, train_images=50_000, recipe="cifar-paper",
                 recipe_changes=[], epochs=300, max_steps=None, pretrained=False, temperature=3.0)
    assert accuracy.paper_differences(row, "CIFAR-100", paper) == []
    assert accuracy.paper_differences(row, "CIFAR-100", {**paper, "recipe_changes": ["epochs 30 (recipe 300)"]}) == [
        "changed from the recipe: epochs 30 (recipe 300)"]
    assert accuracy.paper_differences(row, "CIFAR-100", {**paper, "classes": 10}) == [
        "data 10 classes / 50000 training images (paper: CIFAR-100, 100 / 50000)"]
    assert accuracy.paper_differences(row, "CIFAR-100", {**paper, "temperature": 1.0}) == ["T 1 (paper: 3)"]
    assert accuracy.paper_differences(accuracy.Row("dml", row.archs, 1.0), "CIFAR-100",
                                      {**paper, "temperature": 1.0}) == []  # DML: both readings
    imagenet = {**paper, "archs": ["resnet18", "resnet34"], "classes": 1000, "train_images": 1_281_167,
                "recipe": "imagenet-paper", "epochs": 30}
    six = accuracy.Row("afd", ("resnet18", "resnet34"))
    assert accuracy.paper_differences(six, "ImageNet", {**imagenet, "pretrained": True}) == []
    assert accuracy.paper_differences(six, "ImageNet", imagenet) == ["networks from scratch (paper: pre-trained)"]


def test_accuracy_reports_the_weight_ema_columns_when_the_runs_have_an_ema():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import accuracy

    row = accuracy.Row("vanilla", ("resnet20", "resnet20"))  # no paper row: nothing to compare
    runs = [{"seconds": 1.0, "nets": [60.0 + s, 61.0], "net_mean": 60.5 + s / 2, "ensemble": 62.0, "setting": {}}
            for s in range(2)]
    plain = accuracy.summarize(row, runs)
    assert not any(key in plain for key in accuracy.EMA_COLUMNS)
    assert "EMA" not in accuracy.markdown([plain], "t")
    with_ema = accuracy.summarize(row, [{**r, "ema_net_mean": 63.0 + i, "ema_ensemble": 64.0}
                                        for i, r in enumerate(runs)])
    table = accuracy.markdown([with_ema, plain], "t").splitlines()
    header = [c.strip() for c in table[4].split("|")]
    assert header[10:12] == ["EMA net mean", "EMA ensemble"]
    first, second = ([c.strip() for c in line.split("|")] for line in table[6:8])
    assert first[10:12] == ["63.50 ± 0.71", "64.00 ± 0.00"] and second[10:12] == ["—", "—"]
    assert len(first) == len(second) == len(header)


def test_paper_tables_are_typed_in_consistently():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import paper_tables

    from afd_fast.methods import METHODS
    from afd_fast.models import NETWORKS

    by_key = {}
    for row in paper_tables.ROWS:
        assert row.method in METHODS and all(a in NETWORKS for a in row.archs), row
        assert row.nets == () or len(row.nets) == len(row.archs), row
        by_key.setdefault(row.key, []).append(row)
    for rows in by_key.values():  # a row printed in several tables has the same numbers in each
        assert len({(r.nets, r.mean, r.ensemble) for r in rows}) == 1, rows
    counts = {t: sum(r.table == t for r in paper_tables.ROWS) for t in range(1, 7)}
    assert counts == {1: 10, 2: 9, 3: 28, 4: 21, 5: 16, 6: 3}
    (t4,) = paper_tables.lookup("afd", ("wrn-16-2", "wrn-28-4"))
    assert (t4.table, t4.nets, t4.ensemble) == (4, (76.23, 78.26), 78.28)
    (t5,) = paper_tables.lookup("one", ("resnet56",) * 3)
    assert (t5.table, t5.mean, t5.ensemble) == (5, 76.49, 77.38)


def test_random_batches_are_fixed_device_tensors():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from common import RandomBatches

    source = RandomBatches(5, 24, 7, steps=6, dtype=torch.bfloat16, distinct=2, seed=3)
    batches = list(source)
    assert len(source) == 6 == len(batches)
    images, labels = batches[0]
    assert images.shape == (5, 3, 24, 24) and images.dtype == torch.bfloat16
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert labels.dtype == torch.int64 and 0 <= int(labels.min()) and int(labels.max()) < 7
    assert batches[2][0] is images and not torch.equal(batches[1][0], images)  # reused in turn, no copies
    again = RandomBatches(5, 24, 7, steps=1, dtype=torch.bfloat16, distinct=2, seed=3)
    assert torch.equal(next(iter(again))[0], images)


@pytest.mark.skipif(not os.path.isdir(IMAGENETTE), reason="needs ../shared/data/imagenette-mini")
def test_dml_benchmark_produces_its_table(tmp_path):
    """benchmarks/dml.py --quick: the four rows through the trainer, each with the same updates per
    network; a pair's sync DML and kd-only at T = 1 are one update, the alternating form another."""
    out = tmp_path / "dml.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "dml.py"), "--quick", "--data", IMAGENETTE,
                           "--output", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {r["row"]: r for r in json.loads(out.read_text())["results"]}
    assert list(rows) == ["vanilla", "dml sync T=1 (default)", "dml alternate T=1", "kd-only T=1"]
    assert {r["runs"][0]["updates_per_network"] for r in rows.values()} == {2}
    sync, alternate, kd = (rows[k]["runs"][0]["train_ce"] for k in ("dml sync T=1 (default)", "dml alternate T=1",
                                                                   "kd-only T=1"))
    assert sync == kd and alternate != sync
    assert "| dml alternate T=1 | 0 | 2 |" in proc.stdout  # the Markdown table of benchmarks/README.md
