"""Registers, spills and shared memory of every CUDA kernel instantiation, and its occupancy.

Compiles csrc/cuda/ops_cuda.cu to a cubin for one architecture with ptxas's verbose report
(`-Xptxas -v`), using the nvcc flags that `pip install -e .` uses for it, and writes per
instantiation: registers, spill bytes, stack frame, shared memory, and the theoretical occupancy of
its launch configuration (256 threads per block, from the source), to
benchmarks/results/kernels-<arch>.json. The installed extension is not touched: the cubin and
ptxas's log go to build/kernels/.

The flags are not copied here: setup.py is run (for this architecture only) up to torch's ninja
build, which is stopped before it compiles anything, and the nvcc command is read off the
build.ninja that torch wrote. So a flag changed in setup.py or by torch shows up here.

  python benchmarks/kernels.py --arch 9.0 --arch 8.0      (needs nvcc and a CUDA build of torch)
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap

from markdown_table import markdown_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join("csrc", "cuda", "ops_cuda.cu")
BUILD = os.path.join(ROOT, "build", "kernels")
RESULTS = os.path.join(ROOT, "benchmarks", "results")
# Per-SM limits by compute capability (CUDA C Programming Guide, "Compute Capabilities" table):
# registers, threads, blocks, shared memory usable by blocks (bytes), the shared memory the system
# reserves per block, and register allocation granularity per warp.
SM_LIMITS = {
    "8.0": dict(regs=65536, threads=2048, blocks=32, smem=167936, smem_reserved=1024, reg_unit=256),
    "9.0": dict(regs=65536, threads=2048, blocks=32, smem=233472, smem_reserved=1024, reg_unit=256),
}
# The dtypes that training uses: a spill in these fails CI (double is for tests only).
TRAINING_DTYPES = ("float", "c10::Half", "c10::BFloat16")


def _run_setup_to_ninja(arch: str, build_temp: str) -> str:
    """Runs setup.py build_ext for one architecture, stopping torch before it runs ninja; returns
    the path of the build.ninja it wrote."""
    script = textwrap.dedent(f"""
        import runpy, sys
        import torch.utils.cpp_extension as ce
        class Stop(Exception):
            pass
        def stop(*args, **kwargs):
            raise Stop()
        ce._run_ninja_build = stop
        sys.argv = ["setup.py", "-q", "build_ext", "--build-temp", {build_temp!r}, "--build-lib", {build_temp!r}]
        try:
            runpy.run_path("setup.py", run_name="__main__")
        except Stop:
            pass
        else:
            sys.exit("setup.py finished without reaching torch's ninja build")
    """)
    env = dict(os.environ, AFD_FAST_CUDA="1", AFD_FAST_CUDA_ARCHS=arch, TORCH_CUDA_ARCH_LIST=arch)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True)
    ninja = os.path.join(build_temp, "build.ninja")
    if proc.returncode != 0 or not os.path.exists(ninja):
        raise RuntimeError(f"could not read the extension's nvcc flags from setup.py (exit {proc.returncode}):\n"
                           f"{proc.stdout}{proc.stderr}")
    return ninja


def nvcc_command(arch: str, cubin: str) -> list[str]:
    """The extension's nvcc command for SOURCE and one architecture, turned into a cubin-only
    compilation (no host code) with ptxas's verbose report."""
    build_temp = os.path.join(BUILD, f"setup-sm_{arch.replace('.', '')}")
    os.makedirs(build_temp, exist_ok=True)
    variables = {}
    with open(_run_setup_to_ninja(arch, build_temp)) as f:
        for line in f:
            m = re.match(r"^(\w+) = (.*)$", line.rstrip("\n"))
            if m:
                variables[m.group(1)] = m.group(2)
    missing = [v for v in ("nvcc", "cuda_cflags", "cuda_post_cflags") if v not in variables]
    if missing:
        raise RuntimeError(f"torch's build.ninja has no {missing}: torch changed how it writes it")
    # torch's rule: $nvcc $cuda_cflags -c $in -o $out $cuda_post_cflags; -cubin instead of -c
    # compiles the device code alone.
    flags = [a for a in shlex.split(variables["cuda_cflags"]) if a != "-c"]
    return ([variables["nvcc"]] + flags + ["-cubin", SOURCE, "-o", cubin]
            + shlex.split(variables["cuda_post_cflags"]) + ["-Xptxas", "-v"])


def _demangle(names: list[str]) -> list[str]:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if tool is None:
        return names
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return out.splitlines()


def parse_ptxas(log: str) -> list[dict]:
    """One record per entry function of ptxas's verbose report."""
    records, current = [], None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for '(sm_\d+\w*)'", line)
        if m:
            current = {"mangled": m.group(1), "arch": m.group(2)}
            records.append(current)
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current.update(stack_frame=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["registers"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            current["smem"] = int(s.group(1)) if s else 0
            b = re.search(r"used (\d+) barriers", line)
            current["barriers"] = int(b.group(1)) if b else 0
    incomplete = [r["mangled"] for r in records if "registers" not in r or "spill_stores" not in r]
    if incomplete or not records:
        raise RuntimeError(f"ptxas's report could not be read (no entries, or entries without registers/spills: "
                           f"{incomplete[:3]}); was -Xptxas -v passed?")
    for r, name in zip(records, _demangle([r["mangled"] for r in records])):
        m = re.match(r"(?:void )?(?:[\w:]*::)?(?:\(anonymous namespace\)::)?(\w+)<(.*)>\(", name)
        r["kernel"], r["template"] = (m.group(1), [a.strip() for a in _split_args(m.group(2))]) if m else (name, [])
    return records


def _split_args(args: str) -> list[str]:
    depth, parts, start = 0, [], 0
    for i, ch in enumerate(args):
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "," and depth == 0:
            parts.append(args[start:i])
            start = i + 1
    return parts + [args[start:]]


def occupancy(arch: str, registers: int, smem: int, threads: int) -> dict:
    """Theoretical blocks per SM and occupancy (resident warps / maximum warps) of a launch with
    `threads` per block, as the CUDA occupancy calculator computes it."""
    lim = SM_LIMITS[arch]
    warps = math.ceil(threads / 32)
    regs_per_warp = math.ceil(registers * 32 / lim["reg_unit"]) * lim["reg_unit"]
    by_regs = lim["regs"] // (regs_per_warp * warps) if registers else lim["blocks"]
    by_smem = lim["smem"] // (smem + lim["smem_reserved"])
    by_threads = lim["threads"] // threads
    blocks = min(by_regs, by_smem, by_threads, lim["blocks"])
    # the first of the limits that binds, threads before registers on a tie (as the calculator says)
    limiter = min([(by_threads, "threads"), (by_regs, "registers"), (by_smem, "shared memory"),
                   (lim["blocks"], "blocks")], key=lambda x: x[0])[1]
    return {"threads_per_block": threads, "blocks_per_sm": blocks, "limited_by": limiter,
            "occupancy": round(blocks * warps / (lim["threads"] // 32), 3)}


def block_threads() -> int:
    """Threads per block of every launch in SOURCE (kThreads)."""
    with open(os.path.join(ROOT, SOURCE)) as f:
        m = re.search(r"constexpr int kThreads = (\d+);", f.read())
    if not m:
        raise RuntimeError(f"{SOURCE} has no 'constexpr int kThreads = N;': update block_threads()")
    return int(m.group(1))


# (rows M, batch B, classes C) of the logit loss: the CIFAR pair and cyclic trio (C = 100), the
# ImageNet pair (C = 1000), 8 networks, and a language-model-sized row count for contrast.
LAUNCH_CASES = ((2, 128, 100), (3, 128, 100), (8, 128, 100), (2, 256, 1000), (3, 256, 1000), (8, 256, 1000),
                (2, 4096, 32000), (8, 4096, 32000))
SMS = {"8.0": 108, "9.0": 132}  # A100; H100 SXM and H200


def forward_launches(result: dict, arch: str, dtype: str = "c10::BFloat16", size: int = 2) -> list[dict]:
    """Which forward instantiation each LAUNCH_CASES case runs (ops_cuda.cu's dispatch: a warp per
    sample up to 4096 classes, else a block; 16-byte loads when C is a multiple of the pack; 2, 4 or
    8 register rows), how many blocks it launches, and whether they outnumber the SMs, the only
    case where the blocks per SM that registers allow can matter."""
    threads = block_threads()
    rows = []
    for m, b, c in LAUNCH_CASES:
        vec = 16 // size if c % (16 // size) == 0 else 1
        max_rows = 2 if m <= 2 else 4 if m <= 4 else 8
        per_block = threads // 32 if c <= 4096 else 1
        blocks = -(-b // per_block)
        k = next(k for k in result["kernels"] if k["kernel"] == "mutual_distillation_forward_kernel"
                 and k["template"][0] == dtype and k["template"][2:] == [str(vec), str(max_rows)])
        rows.append({"M": m, "B": b, "C": c, "instantiation": k["template"], "registers": k["registers"],
                     "blocks": blocks, "blocks_per_sm": k["blocks_per_sm"], "sms": SMS[arch],
                     "waves": round(blocks / (k["blocks_per_sm"] * SMS[arch]), 2),
                     "occupancy_matters": blocks > SMS[arch]})
    return rows


def nvcc_version() -> str:
    out = subprocess.run(["nvcc", "--version"], capture_output=True, text=True, check=True).stdout
    return re.search(r"release ([\d.]+), V([\d.]+)", out).group(2)


def measure(arch: str) -> dict:
    cc = arch.replace(".", "")
    os.makedirs(BUILD, exist_ok=True)
    cubin = os.path.join(BUILD, f"ops_cuda-sm_{cc}.cubin")
    cmd = nvcc_command(arch, cubin)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    with open(os.path.join(BUILD, f"ptxas-sm_{cc}.log"), "w") as f:
        f.write(shlex.join(cmd) + "\n" + proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"nvcc failed (exit {proc.returncode}):\n{shlex.join(cmd)}\n{proc.stderr[-4000:]}")
    threads = block_threads()
    kernels = []
    for r in parse_ptxas(proc.stdout + proc.stderr):
        if r["arch"] != f"sm_{cc}":
            continue
        kernels.append({
            "kernel": r["kernel"], "template": r["template"], "registers": r["registers"],
            "spill_stores": r["spill_stores"], "spill_loads": r["spill_loads"], "stack_frame": r["stack_frame"],
            "smem": r["smem"], "barriers": r["barriers"], **occupancy(arch, r["registers"], r["smem"], threads)})
    kernels.sort(key=lambda k: (k["kernel"], k["template"]))
    flags = [a for a in cmd[1:] if not a.startswith(("-I", "-isystem")) and a not in (SOURCE, cubin)]
    result = {"arch": f"sm_{cc}", "nvcc": nvcc_version(), "source": SOURCE, "flags": flags,
              "sm_limits": SM_LIMITS[arch], "kernels": kernels}
    result["bf16_forward_launches"] = forward_launches(result, arch)
    return result


def training_spills(result: dict) -> list[dict]:
    """Instantiations for a training dtype that use local memory for spills."""
    return [k for k in result["kernels"]
            if k["template"] and k["template"][0] in TRAINING_DTYPES and (k["spill_stores"] or k["spill_loads"])]


def table(result: dict) -> str:
    return markdown_table(
        ["kernel", "instantiation", "registers", "spill st/ld (bytes)", "stack (bytes)", "smem (bytes)", "blocks/SM",
         "occupancy"],
        [[k["kernel"], f"<{', '.join(k['template'])}>", k["registers"], f"{k['spill_stores']}/{k['spill_loads']}",
          k["stack_frame"], k["smem"], f"{k['blocks_per_sm']} ({k['limited_by']})", f"{k['occupancy']:.0%}"]
         for k in result["kernels"]], "llrrrrrr")


def launch_table(result: dict) -> str:
    return markdown_table(
        ["(M, B, C)", "instantiation", "registers", "blocks", "blocks/SM", "SMs", "waves", "occupancy can matter"],
        [[f"({r['M']}, {r['B']}, {r['C']})", f"<{', '.join(r['instantiation'])}>", r["registers"], r["blocks"],
          r["blocks_per_sm"], r["sms"], r["waves"], "yes" if r["occupancy_matters"] else "no: one block per SM at most"]
         for r in result["bf16_forward_launches"]], "llrrrrrl")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", action="append", choices=sorted(SM_LIMITS), help="compute capability (repeatable); "
                    "default 9.0 and 8.0")
    ap.add_argument("--output-dir", default=RESULTS, help="where kernels-sm_XX.json go (default benchmarks/results)")
    ap.add_argument("--allow-spills", action="store_true", help="exit 0 even when float/half/bfloat16 spill")
    args = ap.parse_args(argv)
    if shutil.which("nvcc") is None:
        print("nvcc is not on the PATH: install the CUDA toolkit to compile the kernels", file=sys.stderr)
        return 2
    failed = False
    archs = args.arch or ["9.0", "8.0"]
    with concurrent.futures.ThreadPoolExecutor(len(archs)) as pool:  # one nvcc per architecture at once
        results = list(pool.map(measure, archs))
    for result in results:
        os.makedirs(args.output_dir, exist_ok=True)
        path = os.path.join(args.output_dir, f"kernels-{result['arch']}.json")
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
        print(f"### {result['arch']} (nvcc {result['nvcc']}) -> {os.path.relpath(path, ROOT)}\n\n{table(result)}\n\n{launch_table(result)}\n")
        for k in training_spills(result):
            failed = True
            print(f"SPILL: {k['kernel']}<{', '.join(k['template'])}> on {result['arch']}: "
                  f"{k['spill_stores']} bytes spill stores, {k['spill_loads']} bytes spill loads", file=sys.stderr)
    return 1 if failed and not args.allow_spills else 0


if __name__ == "__main__":
    sys.exit(main())
