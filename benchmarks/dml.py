"""DML against vanilla on real photographs: a from-scratch ResNet-20 pair trained by the trainer
(``afd_fast.train``) on imagenette-mini at 32 px, every row from the same start (``--seed``) with the
same number of updates per network.

    python benchmarks/dml.py              # 8 epochs, seeds 0 and 1: the table of benchmarks/README.md
    python benchmarks/dml.py --rows "vanilla,dml sync T=1 (default)" --first-seed 2 --output benchmarks/results/dml-seeds2-3.json
                                          # two more starts of the rows to compare
    python benchmarks/dml.py --table benchmarks/results/dml.json benchmarks/results/dml-seeds2-3.json
                                          # the Markdown table of results files, each row over all their seeds
    python benchmarks/dml.py --quick      # 2 steps of tiny batches: checks that the table is produced (CI)

Rows: vanilla; ``--method dml`` (default ``--dml-update sync``: one forward, both networks step on
every batch); ``--method dml --dml-update alternate`` (the DML authors' released code: each
network's update on its own batch, in turn; an epoch is two passes of the data, so each network
gets one epoch of updates per epoch); ``kd-only`` at T = 1 (AFD without the adversary: for a pair
the same update as sync DML, so its numbers must equal that row's). Every row trains with the
cifar-paper recipe's SGD (lr 0.1, momentum 0.9, weight decay 1e-4) and its milestones moved to
``--epochs``, batch 64, on one thread. Figures per row: the final top-1 of the networks' mean
and of their ensemble on the 500 validation images, and the training CE of the first and last
epoch (mean over the networks), each as the mean over the seeds and per seed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import benchmarks.common as common  # noqa: E402
from benchmarks.markdown_table import markdown_table  # noqa: E402
from afd_fast import train  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.join(ROOT, "..", "shared", "data", "imagenette-mini")
# (label, trainer flags)
ROWS = (("vanilla", ["--method", "vanilla"]),
        ("dml sync T=1 (default)", ["--method", "dml"]),
        ("dml alternate T=1", ["--method", "dml", "--dml-update", "alternate"]),
        ("kd-only T=1", ["--method", "kd-only", "--temperature", "1"]))


def run_one(flags: list[str], common_flags: list[str], seed: int, output: str) -> dict:
    """One training run; its final figures and per-epoch curves."""
    summary = train.main([*common_flags, *flags, "--seed", str(seed), "--output", output])
    with open(os.path.join(output, "metrics.jsonl")) as f:
        epochs = [json.loads(line) for line in f]
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    return {"seed": seed, "updates_per_network": summary["steps"], "net_mean_top1": summary["net_mean_top1"],
            "ensemble_top1": summary["ensemble_top1"],
            "train_ce": [mean(e["train_ce"]) for e in epochs], "top1": [e["net_mean_top1"] for e in epochs]}


def table(results: list[dict]) -> str:
    """The Markdown table of benchmarks/README.md: each row over the runs of every result given."""
    runs = {}
    for row in results:
        runs.setdefault(row["row"], []).extend(row["runs"])
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    lines = []
    for label, rs in runs.items():
        top1 = [r["net_mean_top1"] for r in rs]
        lines.append([label, ", ".join(str(r["seed"]) for r in rs), rs[0]["updates_per_network"],
                      f"{mean(top1):.1f}", " / ".join(f"{t:.1f}" for t in top1),
                      f"{mean([r['ensemble_top1'] for r in rs]):.1f}", f"{mean([r['train_ce'][0] for r in rs]):.3f}",
                      f"{mean([r['train_ce'][-1] for r in rs]):.3f}"])
    return markdown_table(["row", "seeds", "updates per network", "top-1 (mean of the 2 networks)", "per seed",
                           "ensemble top-1", "training CE, epoch 1", "training CE, last epoch"], lines,
                          "llrrlrrr")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=DEFAULT_DATA, help="ImageNet-layout folder of real JPEGs")
    p.add_argument("--arch", default="resnet20,resnet20")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--seeds", type=int, default=2, help="starts: N seeds from --first-seed, the same for every row")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--rows", default=None, help="comma-separated row labels (default: all): "
                                                + "; ".join(label for label, _ in ROWS))
    p.add_argument("--quick", action="store_true", help="2 steps of 8 images at 16 px, one seed (CI)")
    p.add_argument("--table", nargs="+", metavar="RESULTS.json", help="print the table of these results and exit")
    p.add_argument("--output", default=None, help="JSON results (default: benchmarks/results/dml.json, none with "
                                                  "--quick)")
    args = p.parse_args(argv)
    if args.table:
        results = []
        for path in args.table:
            with open(path) as f:
                results += json.load(f)["results"]
        print(table(results))
        return {"results": results}
    extra = []
    if args.quick:
        args.epochs, args.batch_size, args.image_size, args.seeds, extra = 1, 8, 16, 1, ["--max-steps", "2"]
    chosen = [r.strip() for r in args.rows.split(",")] if args.rows else [label for label, _ in ROWS]
    unknown = set(chosen) - {label for label, _ in ROWS}
    if unknown:
        p.error(f"unknown rows {sorted(unknown)}")
    torch.set_num_threads(1)
    common_flags = ["--data", args.data, "--arch", args.arch, "--recipe", "cifar-paper", "--epochs", str(args.epochs),
                    "--batch-size", str(args.batch_size), "--image-size", str(args.image_size), "--device", "cpu",
                    "--loader", "torch", "--workers", "0", "--print-every", "1000", *extra]
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for label, flags in (row for row in ROWS if row[0] in chosen):
            start = time.perf_counter()
            runs = [run_one(flags, common_flags, seed, os.path.join(scratch, f"{len(results)}-{seed}"))
                    for seed in range(args.first_seed, args.first_seed + args.seeds)]
            row = {"row": label, "flags": flags, "runs": runs, "seconds": time.perf_counter() - start,
                   **{key: sum(r[key] for r in runs) / len(runs) for key in ("net_mean_top1", "ensemble_top1")},
                   "train_ce_first": sum(r["train_ce"][0] for r in runs) / len(runs),
                   "train_ce_last": sum(r["train_ce"][-1] for r in runs) / len(runs)}
            results.append(row)
            seeds = ", ".join(f"{r['net_mean_top1']:.1f}" for r in runs)
            print(f"{label:24s} top-1 {row['net_mean_top1']:.1f} ({seeds})"
                  f"  ensemble {row['ensemble_top1']:.1f}  train CE {row['train_ce_first']:.3f} -> "
                  f"{row['train_ce_last']:.3f}  updates/network {runs[0]['updates_per_network']}  "
                  f"({row['seconds']:.0f} s)", flush=True)
    payload = {"machine": common.machine(torch.device("cpu")), "threads": torch.get_num_threads(),
               "settings": {k: v for k, v in vars(args).items() if k != "output"}, "trainer_flags": common_flags,
               "results": results}
    print(f"\n{table(results)}")
    output = args.output or (None if args.quick else os.path.join(ROOT, "benchmarks", "results", "dml.json"))
    if output:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        with open(output, "w") as f:
            json.dump(payload, f, indent=1)
    return payload


if __name__ == "__main__":
    main()
