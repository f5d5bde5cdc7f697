"""What importing each block costs; prints a table (not a test: tests/test_footprint.py holds the limits).

    python benchmarks/imports.py [--runs 5]

For every block module (every module under vembed_blocks/ except package __init__s, demo/ and
recipe_flags.py): the other vembed_blocks modules it loads, the heavy libraries it loads (PIL,
transformers, diffusers, pyarrow, matplotlib, safetensors), and its import time in seconds in a
fresh interpreter that has already imported torch (one forked child per module, so torch is paid
once and each block starts from the same state). Then the median over ``--runs`` fresh interpreters
of ``from vembed_blocks import GradCache, InfoNCE`` after ``import torch``, the torch import timed
separately.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "vembed_blocks")
HEAVY = ("PIL", "transformers", "diffusers", "pyarrow", "matplotlib", "safetensors")

# Imports each module named in argv in a forked child of an interpreter that has torch loaded;
# prints one JSON line per module.
PROBE = """
import importlib, json, os, sys, time
import torch

for name in sys.argv[1:]:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        t = time.perf_counter()
        importlib.import_module(name)
        seconds = time.perf_counter() - t
        mods = sys.modules
        others = [m for m in mods if m.startswith("vembed_blocks.") and m != name and not hasattr(mods[m], "__path__")]
        res = {"module": name, "others": sorted(others), "heavy": [h for h in %r if h in mods], "seconds": seconds}
        with os.fdopen(w, "w") as f:
            f.write(json.dumps(res))
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        print(f.read() or json.dumps({"module": name, "error": "import failed"}), flush=True)
    os.waitpid(pid, 0)
""" % (HEAVY,)

TOP_LEVEL = """
import json, sys, time
t = time.perf_counter()
import torch
t_torch = time.perf_counter() - t
t = time.perf_counter()
from vembed_blocks import GradCache, InfoNCE
t_names = time.perf_counter() - t
print(json.dumps({"torch": t_torch, "names": t_names, "heavy": [h for h in %r if h in sys.modules]}))
""" % (HEAVY,)


def block_modules() -> list[str]:
    names = []
    for folder, _, files in os.walk(PACKAGE):
        for f in files:
            if not f.endswith(".py") or f == "__init__.py":
                continue
            name = os.path.relpath(os.path.join(folder, f[:-3]), ROOT).replace(os.sep, ".")
            if not name.startswith("vembed_blocks.demo.") and name != "vembed_blocks.recipe_flags":
                names.append(name)
    return sorted(names)


def _run(code: str, *args: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT, check=True)
    return out.stdout.splitlines()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5, help="fresh interpreters for the top-level import time")
    args = p.parse_args(argv)
    rows = [json.loads(line) for line in _run(PROBE, *block_modules()) if line.startswith("{")]
    print("## Importing one block (after torch)\n")
    print("| module | other package modules | heavy libraries | import s |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        name = r["module"].removeprefix("vembed_blocks.")
        if "error" in r:
            print(f"| {name} | import failed | | |")
            continue
        others = ", ".join(m.removeprefix("vembed_blocks.") for m in r["others"]) or "-"
        print(f"| {name} | {len(r['others'])}: {others} | {', '.join(r['heavy']) or '-'} | {r['seconds']:.3f} |")
    runs = [json.loads(_run(TOP_LEVEL)[-1]) for _ in range(args.runs)]
    print(f"\n## `from vembed_blocks import GradCache, InfoNCE` ({args.runs} fresh interpreters)\n")
    print(f"- import torch: median {statistics.median(r['torch'] for r in runs):.3f} s")
    print(f"- then the two names: median {statistics.median(r['names'] for r in runs):.3f} s")
    print(f"- heavy libraries loaded: {', '.join(runs[-1]['heavy']) or 'none'}")


if __name__ == "__main__":
    main()
