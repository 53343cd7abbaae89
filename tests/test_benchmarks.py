"""The benchmarks run (smoke sizes) and write what their README section is built from."""
import json
import os
import subprocess
import sys

import pytest

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
    assert all(r["img_per_s"] > 0 for r in payload["results"])


def test_ops_benchmark(tmp_path):
    payload, stdout, _ = _run("ops", tmp_path, "--quick", "--no-compile", "--iters", "2")
    assert {(r["K"], r["B"], r["C"]) for r in payload["results"]} == {(2, 64, 1000), (3, 32, 100)}
    assert all(r["speedup_vs_eager_fwd_bwd"] > 0 for r in payload["results"])


def test_gpu_check_script_parses():
    subprocess.run(["bash", "-n", os.path.join(ROOT, "benchmarks", "gpu_check.sh")], check=True)
