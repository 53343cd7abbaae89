"""Top-1 accuracy of the paper's rows over several seeds, beside the paper's numbers.

    python benchmarks/accuracy.py --quick                    # tiny CPU runs: checks that the table is produced
    python benchmarks/accuracy.py --preset cifar100-table3 --data /data/cifar-100-python
                                                             # Table 3's ResNet-32 row: vanilla, DML, ONE, AFD,
                                                             # 5 seeds x 300 epochs (cifar-paper recipe)
    python benchmarks/accuracy.py --rows "afd:wrn-16-2,wrn-28-2;l1kd-offline:wrn-16-2,wrn-28-2" --data ... --seeds 3

A row is a ``--method``, its ``--arch`` list and, for DML, the temperature; each (row, seed) is one run of afd_fast.train (in
this process; ``torchrun`` with ``--nproc-per-node`` > 1) in its own folder under ``--runs``, its log
``train.log`` beside it.
``l1kd-offline`` rows first train their teacher (the last network, vanilla, same recipe and seed).
For every row: per-network top-1, their mean and the ensemble's (ONE: its gated ensemble, as the
paper's "Ens" for ONE) at the end of training, mean ± std over the seeds, next to the paper's
numbers for the same row (``benchmarks/paper_tables.py``, with their table numbers) where the runs
match the paper's setting (data set by its classes and size, recipe and its epochs unchanged, the
networks; ImageNet: pre-trained), else marked not comparable with what differs; and the time each
run took. Writes JSON, a Markdown table (.md) and a bar chart (.png) with the same stem.

DML rows run ``--method dml`` in its default form (``--dml-update sync``: one forward, every network
steps on every batch), labelled "dml sync". The paper says "T = 3 for every experiment", DML's own
paper uses plain softmaxes: the CIFAR presets run DML both ways, rows "dml sync (T=1)" and
"dml sync (T=3)", so the reader sees which reading matches the paper's DML numbers.

Presets: cifar100-table1 ... cifar100-table5 (every row of that table; cifar100-table3 is the
ResNet-32 row alone, cifar100-table3-all every architecture), imagenet-table6 (torchvision's pre-trained
ResNet-18/34, ``--pretrained torchvision`` unless --train-args gives --pretrained; its vanilla row
evaluates them as they are, without training, which is what the paper's vanilla numbers are).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import paper_tables  # noqa: E402

from afd_fast import run_dir, train  # noqa: E402
from afd_fast.errors import AfdFastError, TrainingInterrupted, exit_with, signal_name  # noqa: E402
from afd_fast.methods import METHODS, architecture_problem, method_spec  # noqa: E402
from afd_fast.plotting import pyplot  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
EMA_COLUMNS = ("ema_net_mean", "ema_ensemble")  # reported when the runs have a weight EMA (--model-ema)
ROOT = os.path.dirname(HERE)


@dataclass(frozen=True)
class Row:
    """A row of a table: a method, its networks and the KD temperature (None: the method's default)."""

    method: str
    archs: tuple[str, ...]
    temperature: float | None = None

    @property
    def label(self) -> str:
        name = "dml sync" if self.method == "dml" else self.method  # DML's default --dml-update
        return name if self.temperature is None else f"{name} (T={self.temperature:g})"

    @property
    def folder(self) -> str:
        t = "" if self.temperature is None else f"_T{self.temperature:g}"
        return f"{self.method}{t}_{'+'.join(self.archs)}"


def _table_rows(table: int) -> list[Row]:
    seen = []
    for r in paper_tables.ROWS:
        if r.table == table and Row(*r.key) not in seen:
            seen.append(Row(*r.key))
    return seen


def _dml_both_ways(rows: list[Row]) -> list[Row]:
    """DML at T = 1 (its authors') and T = 3 (the AFD paper's "every experiment")."""
    return [x for r in rows for x in ((Row(r.method, r.archs, 1.0), Row(r.method, r.archs, 3.0))
                                      if r.method == "dml" and r.temperature is None else (r,))]


PRESETS = {  # name: (rows, recipe)
    "cifar100-table3": (_dml_both_ways([Row(m, ("resnet32",) * 2) for m in ("vanilla", "dml", "one", "afd")]),
                        "cifar-paper"),
    **{f"cifar100-table{t}": (_dml_both_ways(_table_rows(t)), "cifar-paper") for t in (1, 2, 4, 5)},
    "cifar100-table3-all": (_dml_both_ways(_table_rows(3)), "cifar-paper"),
    "imagenet-table6": (_table_rows(6), "imagenet-paper"),
}
# the paper's settings by data set: what a run must match for its number to stand beside the paper's
PAPER_SETTINGS = {
    "CIFAR-100": dict(classes=100, train_images=50_000, recipe="cifar-paper", pretrained=False),
    "ImageNet": dict(classes=1000, train_images=1_281_167, recipe="imagenet-paper", pretrained=True),
}
# --quick: Table 3's ResNet-32 row and Table 1's offline row (its teacher run included) on a tiny
# synthetic set; it checks the machinery, not an accuracy
TEACHER_SEED_OFFSET = 1000  # offline rows: the teacher of seed s trains with seed s + this
QUICK_ROWS = PRESETS["cifar100-table3"][0] + [Row("l1kd-offline", ("resnet32", "resnet32"))]
QUICK_TRAIN_ARGS = ["--recipe", "quick", "--epochs", "1", "--max-steps", "2", "--batch-size", "8", "--loader", "torch",
                    "--workers", "0", "--print-every", "1000"]


def parse_rows(text: str) -> list[Row]:
    """'method:arch,arch;method:arch,arch' -> [Row(method, (arch, arch)), ...]"""
    rows = []
    for item in filter(None, (part.strip() for part in text.split(";"))):
        method, _, archs = item.partition(":")
        if method not in METHODS or not archs:
            raise SystemExit(f"--rows: {item!r} is not 'method:arch,arch' with a method of {', '.join(METHODS)}")
        rows.append(Row(method, tuple(a.strip().lower() for a in archs.split(","))))
    return rows


class Runner:
    """Runs (or with --reuse, finds) the training runs of the benchmark."""

    def __init__(self, args, train_args: list[str]):
        self.args, self.train_args = args, train_args

    def train_argv(self, row: Row, seed: int, out: str, extra=()) -> list[str]:
        temperature = [] if row.temperature is None else ["--temperature", f"{row.temperature:g}"]
        return ["--method", row.method, "--arch", ",".join(row.archs), *temperature, "--seed", str(seed), "--output",
                out, "--device", self.args.device, *self.train_args, *extra] + (["--resume", "auto"] if self.args.reuse
                                                                                else [])

    def train(self, row: Row, seed: int, extra=()) -> tuple[dict, float]:
        """(summary.json of the run, seconds it took). One process: in this one (no interpreter
        start-up in the time); several: torchrun."""
        out = os.path.join(self.args.runs, row.folder, f"seed{seed}")
        summary_path = os.path.join(out, "summary.json")
        if self.args.reuse and os.path.isfile(summary_path):
            with open(summary_path) as f:
                summary = json.load(f)
            return summary, summary.get("benchmark_seconds", float("nan"))
        os.makedirs(out, exist_ok=True)
        argv = self.train_argv(row, seed, out, extra)
        n = self.args.nproc_per_node
        print(f"  {'torchrun --nproc_per_node=%d ' % n if n > 1 else ''}python -m afd_fast.train {shlex.join(argv)}",
              flush=True)
        log_path = os.path.join(out, "train.log")
        start = time.perf_counter()
        try:
            if n > 1:
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                       "-m", "afd_fast.train", *argv]
                with open(log_path, "w") as log:
                    failed = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT).returncode
                if failed - 128 in (signal.SIGTERM, signal.SIGUSR1):
                    raise TrainingInterrupted(failed - 128)
            else:
                as_they_are = self.args.preset == "imagenet-table6" and row.method == "vanilla" and not self.args.quick
                failed = _train_in_process(argv, log_path, evaluate_as_they_are if as_they_are else None)
        except TrainingInterrupted as e:
            raise TrainingInterrupted(e.signum, f"{signal_name(e.signum)}: the run in {out} stopped and was "
                                      "checkpointed; the same command with --reuse continues it") from None
        seconds = time.perf_counter() - start
        if failed:
            with open(log_path) as log:
                tail = log.read()[-3000:]
            raise SystemExit(f"training failed ({failed}): python -m afd_fast.train {shlex.join(argv)}\n{tail}")
        with open(summary_path) as f:
            summary = json.load(f)
        summary["benchmark_seconds"] = seconds
        with open(summary_path, "w") as f:
            json.dump(summary, f, indent=2)
        return summary, seconds

    def run_row(self, row: Row) -> list[dict]:
        method, archs, runs = row.method, row.archs, []
        for seed in range(self.args.seeds):
            extra, teacher_seconds = [], None
            if method_spec(method).frozen_teacher:  # the paper's offline teacher: the last network, trained alone
                # from another seed: with the student's, a same-architecture teacher starts from the student's
                # very weights and sees the same batches, which makes the alignment unfairly easy
                teacher_seed = seed + TEACHER_SEED_OFFSET
                teacher, teacher_seconds = self.train(Row("vanilla", archs[-1:]), teacher_seed)
                path = os.path.join(self.args.runs, f"vanilla_{archs[-1]}", f"seed{teacher_seed}",
                                    f"network0_{archs[-1]}.pt")
                extra = ["--pretrained", "," * (len(archs) - 1) + path]
            summary, seconds = self.train(row, seed, extra)
            k = len(archs)
            ensemble_key = "gated_ensemble_top1" if method == "one" else "ensemble_top1"
            runs.append({"seed": seed, "seconds": seconds, "teacher_seconds": teacher_seconds,
                         "nets": [summary[f"net{i}_top1"] for i in range(k)], "net_mean": summary["net_mean_top1"],
                         "ensemble": summary[ensemble_key], "mean_softmax_ensemble": summary["ensemble_top1"],
                         "epochs": summary["epochs"], "steps": summary["steps"],
                         "global_batch": summary.get("global_batch"),
                         "setting": {k: summary.get(k) for k in SETTING_KEYS},
                         # with --model-ema in --train-args: the EMA's mean and ensemble (ONE: gated) too
                         **({"ema_net_mean": summary["ema_net_mean_top1"], "ema_ensemble": summary["ema_" + ensemble_key]}
                            if "ema_net_mean_top1" in summary else {})})
        return runs


def evaluate_as_they_are(argv: list[str]) -> dict:
    """The networks as --pretrained gives them, evaluated without a training step, summary.json as a
    run writes it: Table 6's vanilla row (the paper's vanilla numbers are the pre-trained ResNets)."""
    from afd_fast import metrics
    from afd_fast.config import parse as parse_config

    config = parse_config(argv)
    device = torch.device(config.device)
    loaders = train.build_data(config, 0, 1, device)
    model, step, _, _ = train.build_training(config, loaders.num_classes, 1, device, loaders.steps_per_epoch)
    val = metrics.evaluate(model, loaders.val, device, step.amp_dtype)
    os.makedirs(config.output, exist_ok=True)
    return run_dir.write_outputs(config, {"": model}, [{"epoch": 0, "step": 0, "img_per_s": 0.0, **val}], loaders)


def _train_in_process(argv: list[str], log_path: str, run=None):
    """afd_fast.train.main(argv) (or ``run(argv)``) with its output in log_path; what went wrong, or None."""
    with open(log_path, "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            (run or train.main)(argv)
        except TrainingInterrupted:
            raise  # stopped on a signal after checkpointing: not a failure of the run
        except (Exception, SystemExit) as e:  # noqa: BLE001: reported with the run's log
            traceback.print_exc(file=log)
            return f"{type(e).__name__}: {e}"
        finally:
            gc.collect()  # the run's networks, graphs and loaders go before the next run
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return None


def mean_std(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    return {"mean": statistics.fmean(values) if values else None,
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


SETTING_KEYS = ("archs", "classes", "train_images", "recipe", "recipe_changes", "epochs", "max_steps", "pretrained",
                "temperature")


def paper_differences(row: Row, dataset: str, setting: dict) -> list[str]:
    """What keeps a run from the paper's setting for this row (empty: comparable). ``setting``: the
    run's summary.json fields SETTING_KEYS."""
    paper, out = PAPER_SETTINGS[dataset], []
    if setting.get("classes") is None:
        return ["the run does not record its setting (a summary.json of an earlier afd_fast)"]
    if (setting["classes"], setting["train_images"]) != (paper["classes"], paper["train_images"]):
        out.append(f"data {setting['classes']} classes / {setting['train_images']} training images (paper: {dataset}, "
                   f"{paper['classes']} / {paper['train_images']})")
    if tuple(setting["archs"]) != tuple(row.archs):
        out.append(f"networks {', '.join(setting['archs'])} (paper: {', '.join(row.archs)})")
    if setting["recipe"] != paper["recipe"]:
        out.append(f"recipe {setting['recipe']} (paper: {paper['recipe']})")
    if setting["recipe_changes"]:
        out.append(f"changed from the recipe: {', '.join(setting['recipe_changes'])}")
    if setting["max_steps"] is not None:
        out.append(f"cut short by --max-steps {setting['max_steps']} ({setting['epochs']} epochs trained)")
    if setting["pretrained"] != paper["pretrained"]:
        out.append("networks from scratch (paper: pre-trained)" if paper["pretrained"] else
                   "pre-trained networks (paper: from scratch)")
    if row.method != "dml" and setting["temperature"] != 3.0:  # DML rows: both readings are labelled
        out.append(f"T {setting['temperature']:g} (paper: 3)")
    return out


def summarize(row: Row, runs: list[dict]) -> dict:
    method, archs = row.method, row.archs
    paper = paper_tables.lookup(method, archs)
    first = paper[0] if paper else None
    paper_mean, derived = first.paper_mean() if first else (None, False)
    differences = [] if first is None else list(dict.fromkeys(
        d for r in runs for d in paper_differences(row, first.dataset, r["setting"])))
    return {"method": method, "label": row.label, "temperature": row.temperature, "archs": list(archs), "runs": runs,
            "nets": [mean_std([r["nets"][i] for r in runs]) for i in range(len(archs))],
            "net_mean": mean_std([r["net_mean"] for r in runs]), "ensemble": mean_std([r["ensemble"] for r in runs]),
            "seconds": mean_std([r["seconds"] for r in runs]),
            **{key: mean_std([r[key] for r in runs]) for key in EMA_COLUMNS if all(key in r for r in runs)},
            "comparable": first is not None and not differences, "differences": differences,
            "paper": None if first is None else {
                "tables": [r.table for r in paper], "dataset": first.dataset, "nets": list(first.nets),
                "net_mean": paper_mean, "net_mean_derived": derived, "ensemble": first.ensemble}}


def _shown_paper(r: dict) -> dict:
    """The paper's numbers to print beside the row: only where the runs match the paper's setting."""
    return (r["paper"] or {}) if r["comparable"] else {}


def _versus(r: dict) -> str:
    if r["paper"] is None:
        return "no paper row"
    return "same setting" if r["comparable"] else "not comparable: " + "; ".join(r["differences"])


def _fmt(stat: dict) -> str:
    return "—" if stat["mean"] is None else f"{stat['mean']:.2f} ± {stat['std']:.2f}"


def _paper(value, derived=False, comparable=True) -> str:
    if not comparable:
        return "n/c"
    return "—" if value is None else f"{value:.2f}{'*' if derived else ''}"


def _ema_cells(r: dict) -> list[str]:
    """The weight EMA's net mean and ensemble (runs with --model-ema)."""
    return [_fmt(r[key]) if key in r else "—" for key in EMA_COLUMNS]


def markdown(rows: list[dict], title: str) -> str:
    ema = any(key in r for r in rows for key in EMA_COLUMNS)
    lines = [f"# {title}", "",
             "Top-1 (%) at the end of training, mean ± std over the seeds; *paper*: the AFD paper's number for the "
             "same row (its table in the first column; CIFAR-100 numbers are means of 5 runs), shown only where the "
             "runs match the paper's setting (n/c: not comparable, the last column says why). Ensemble: mean of the "
             "softmaxes (ONE: its gated ensemble, as in the paper).", "",
             "| table | method | networks | per network | paper | net mean | paper | ensemble | paper | "
             + ("EMA net mean | EMA ensemble | " if ema else "") + "runs | s/run | vs paper |",
             "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | " + ("---: | ---: | " if ema else "")
             + "---: | ---: | --- |"]
    for r in rows:
        p, ok = r["paper"] or {}, r["comparable"]
        nets = " / ".join(_fmt(s) for s in r["nets"])
        paper_nets = " / ".join(_paper(v, comparable=ok) for v in p.get("nets", [])) or "—"
        tables = ", ".join(str(t) for t in p.get("tables", [])) or "—"
        lines.append(f"| {tables} | {r['label']} | {', '.join(r['archs'])} | {nets} | {paper_nets} | "
                     f"{_fmt(r['net_mean'])} | {_paper(p.get('net_mean'), p.get('net_mean_derived'), ok)} | "
                     f"{_fmt(r['ensemble'])} | {_paper(p.get('ensemble'), comparable=ok)} | "
                     + ("".join(f"{cell} | " for cell in _ema_cells(r)) if ema else "") + f"{r['net_mean']['n']} | "
                     f"{r['seconds']['mean']:.0f} | {_versus(r)} |")
    lines += ["", "\\* mean of the paper's per-network numbers (the table prints those, not their mean)."]
    return "\n".join(lines) + "\n"


def draw(rows: list[dict], title: str, path: str) -> None:
    plt = pyplot("accuracy chart")
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(max(6, 1.5 * len(rows) + 2), 4.5))
    width = 0.38
    for i, r in enumerate(rows):
        p = _shown_paper(r)
        for offset, key, paper_value, color in ((-width / 2, "net_mean", p.get("net_mean"), "tab:blue"),
                                                (width / 2, "ensemble", p.get("ensemble"), "tab:orange")):
            stat = r[key]
            if stat["mean"] is not None:
                ax.bar(i + offset, stat["mean"], width, yerr=stat["std"], color=color, capsize=3,
                       label=("net mean" if key == "net_mean" else "ensemble") if i == 0 else None)
            if paper_value is not None:
                ax.plot(i + offset, paper_value, "kD", markersize=6, label="paper" if i == 0 and key == "net_mean" else None)
    ax.set_xticks(range(len(rows)), [f"{r['label']}\n{'+'.join(r['archs'])}" for r in rows], fontsize=8)
    ax.set(ylabel="top-1 (%)", title=title)
    means = [v for r in rows for v in (r["net_mean"]["mean"], r["ensemble"]["mean"],
                                       _shown_paper(r).get("net_mean"), _shown_paper(r).get("ensemble"))
             if v is not None]
    if means:
        ax.set_ylim(max(0, min(means) - 10), min(100, max(means) + 5))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), help="the rows (and recipe) of a paper table")
    parser.add_argument("--rows", help="'method:arch,arch;method:arch,arch' (instead of, or added to, --preset)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny CPU runs on a synthetic set (CI: checks that the table is produced, not an accuracy)")
    parser.add_argument("--seeds", type=int, default=None, help="runs per row, seeds 0..N-1 (default 5, the "
                                                                "paper's; 2 with --quick)")
    parser.add_argument("--data", default=None, help="the data set (CIFAR-100 for the cifar100 presets)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--nproc-per-node", type=int, default=1, help="processes per run (torchrun); the recipe's "
                                                                      "batch stays the global batch")
    parser.add_argument("--train-args", default="", help="more afd_fast.train flags for every run (e.g. '--epochs 200')")
    parser.add_argument("--runs", default=None, help="folder of the training runs (default runs/accuracy/<name>)")
    parser.add_argument("--reuse", action="store_true", help="keep finished runs (their summary.json) and resume "
                                                             "interrupted ones: a long benchmark continues where it stopped")
    parser.add_argument("--output", default=None, help="JSON path (default benchmarks/results/accuracy-<name>-<device>.json)")
    args = parser.parse_args(argv)

    rows, recipe = list(PRESETS[args.preset][0]) if args.preset else [], PRESETS[args.preset][1] if args.preset else None
    if args.rows:
        rows += parse_rows(args.rows)
    name = args.preset or ("quick" if args.quick else "rows")
    if args.quick and not rows:
        rows = QUICK_ROWS
    if not rows:
        parser.error("give --preset, --rows or --quick")
    for row in rows:
        problem = architecture_problem(row.method, list(row.archs))
        if problem:
            parser.error(f"row {row.method}:{','.join(row.archs)}: {problem}")
    args.seeds = args.seeds or (2 if args.quick else 5)
    train_args = []
    if args.quick:
        from afd_fast.data import synthetic_image_folder

        data = args.data or synthetic_image_folder(os.path.join(args.runs or os.path.join(ROOT, "runs", "accuracy", name),
                                                                "data"), num_classes=4, train_per_class=16,
                                                   val_per_class=4, size=32)
        train_args += ["--data", data, *QUICK_TRAIN_ARGS]
    elif args.data is None:
        parser.error("--data is needed (the CIFAR-100 folder for the cifar100 presets, ImageNet for imagenet-table6)")
    else:
        train_args += ["--data", args.data] + (["--recipe", recipe] if recipe else [])
    if args.preset == "imagenet-table6" and "--pretrained" not in args.train_args:
        train_args += ["--pretrained", "torchvision"]  # the paper fine-tunes torchvision's ImageNet ResNets
    train_args += shlex.split(args.train_args)
    args.runs = args.runs or os.path.join(ROOT, "runs", "accuracy", name)

    device = torch.device(args.device)
    info = common.machine(device)
    print(f"afd_fast accuracy benchmark ({name}): {len(rows)} rows x {args.seeds} seeds on "
          f"{common.machine_name(info)}, runs in {args.runs}", flush=True)
    runner = Runner(args, train_args)
    results = []
    for row in rows:
        results.append(summarize(row, runner.run_row(row)))

    table, ema = [], any(key in r for r in results for key in EMA_COLUMNS)
    for r in results:
        p, ok = r["paper"] or {}, r["comparable"]
        table.append([",".join(str(t) for t in p.get("tables", [])) or "-", r["label"], "+".join(r["archs"]),
                      " / ".join(_fmt(s) for s in r["nets"]), _fmt(r["net_mean"]),
                      _paper(p.get("net_mean"), p.get("net_mean_derived"), ok), _fmt(r["ensemble"]),
                      _paper(p.get("ensemble"), comparable=ok), *(_ema_cells(r) if ema else []),
                      f"{r['seconds']['mean']:.0f}"])
    common.print_table(["table", "method", "networks", "per network", "net mean", "paper", "ensemble", "paper",
                        *(["EMA net mean", "EMA ensemble"] if ema else []), "s/run"], table)
    for r in results:
        if r["paper"] is not None and not r["comparable"]:
            print(f"{r['label']} {'+'.join(r['archs'])}: {_versus(r)}")

    out = args.output or os.path.join(HERE, "results", f"accuracy-{name}-{device.type}.json")
    title = f"afd_fast accuracy ({name}, {args.seeds} seeds) on {common.machine_name(info)}"
    payload = {"benchmark": "accuracy", "preset": name, "device": device.type, "machine": info, "seeds": args.seeds,
               "train_args": train_args, "nproc_per_node": args.nproc_per_node, "rows": results}
    common.write_json(out, payload)
    stem = os.path.splitext(out)[0]
    with open(stem + ".md", "w") as f:
        f.write(markdown(results, title))
    draw(results, title, stem + ".png")
    print(f"wrote {out}, {stem}.md and {stem}.png")
    return payload


if __name__ == "__main__":
    try:
        main()
    except AfdFastError as e:
        exit_with(e)
