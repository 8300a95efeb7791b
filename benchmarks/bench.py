"""Benchmark this loompy against the reference loompy 3.0.8 on the same seeded data, in the same run.

Each operation runs in a fresh process, alternating between the two implementations; the child
times only the operation (not imports or setup) and reports its peak RSS. Prints a Markdown table of
median seconds, the ratio (reference / ours: above 1 means we are faster) and peak RSS.

    python benchmarks/bench.py                         # 20,000 x 20,000, 7% non-zero (slow)
    python benchmarks/bench.py --genes 5000 --cells 5000 --repeats 3
    python benchmarks/bench.py --genes 2000 --cells 500 --everyday   # small, repeated, everyday calls
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import scipy.sparse as sp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
import reference  # noqa: E402  (tests/reference.py: the reference's own venv)

LIBRARIES = """
import numpy as np, scipy.sparse as sp, loompy
rng = np.random.default_rng(7)
"""

PRELUDE = """
import json, os, sys, threading, time
base, work, extra = sys.argv[1], sys.argv[2], sys.argv[3]
helpers = {}  # pid -> peak RSS (kB) of the processes this one started, sampled every 50 ms
def watch_helpers():
    me, seen = os.getpid(), set()
    while True:
        for task in os.listdir(f"/proc/{me}/task"):
            try:
                for pid in open(f"/proc/{me}/task/{task}/children").read().split():
                    if pid not in seen:  # (the first sight may come before exec: this process's memory)
                        seen.add(pid)
                        continue
                    for line in open(f"/proc/{pid}/status"):
                        if line.startswith("VmHWM"):
                            helpers[pid] = max(helpers.get(pid, 0), int(line.split()[1]))
            except OSError:
                pass
        time.sleep(0.05)
def done(seconds):
    # VmHWM: this process's own peak (ru_maxrss would carry over the parent's across exec); and
    # the largest peak of a process the operation started (the helpers of combine, permute, map and scans)
    hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
    print(json.dumps({"s": seconds, "rss_mb": hwm / 1024, "helpers_mb": max(helpers.values(), default=0) / 1024}))
"""

# operations whose helper processes' memory is sampled (elsewhere no sampling thread runs while timed)
STARTS_HELPERS = {"combine (2 files)", "permute (columns)", "map([np.mean, np.std])", "map over columns",
                  "scan rows", "scan columns"}

# name -> (setup, timed statement, needs a private copy of the base file)
OPERATIONS: dict[str, tuple[str, str, bool]] = {
    "import loompy": ("", "import loompy", False),  # (from nothing: numpy, h5py, scipy and the package)
    "create from scipy.sparse": (
        "d = np.load(extra + '/data.npz', allow_pickle=True); m = sp.csc_matrix((d['data'], d['indices'], "
        "d['indptr']), shape=tuple(d['shape'])); ra = {'Gene': d['genes']}; ca = {'CellID': d['cells']}",
        "r = loompy.create(work, m, ra, ca)\nif r is not None: r.close()", False),
    "connect": ("", "ds = loompy.connect(base, 'r'); ds.close()", False),
    "20 single rows": ("ds = loompy.connect(base, 'r'); ix = rng.choice(ds.shape[0], 20, replace=False)",
                       "for i in ix: ds[int(i), :]", False),
    "20 single columns": ("ds = loompy.connect(base, 'r'); ix = rng.choice(ds.shape[1], 20, replace=False)",
                          "for i in ix: ds[:, int(i)]", False),
    "500 random rows": ("ds = loompy.connect(base, 'r'); ix = np.sort(rng.choice(ds.shape[0], 500, replace=False))",
                        "ds[ix, :]", False),
    "2,000 random columns": (
        "ds = loompy.connect(base, 'r'); ix = np.sort(rng.choice(ds.shape[1], 2000, replace=False))",
        "ds[:, ix]", False),
    "rows by gene-name mask": ("ds = loompy.connect(base, 'r'); names = set(ds.ra.Gene[::97])",
                               "ds[np.array([g in names for g in ds.ra.Gene]), :]", False),
    "scan rows": ("ds = loompy.connect(base, 'r')", "for _ in ds.scan(axis=0, batch_size=512): pass", False),
    "scan columns": ("ds = loompy.connect(base, 'r')", "for _ in ds.scan(axis=1, batch_size=512): pass", False),
    "map([np.mean, np.std])": ("ds = loompy.connect(base, 'r')", "ds.map([np.mean, np.std], axis=0)", False),
    "map over columns": ("ds = loompy.connect(base, 'r')", "ds.map([np.mean, np.std], axis=1)", False),
    "sparse()": ("ds = loompy.connect(base, 'r')", "ds.sparse()", False),
    "ds[:, :]": ("ds = loompy.connect(base, 'r')", "ds[:, :]", False),
    "set_attr": ("ds = loompy.connect(work)", "ds.ca['Score'] = rng.random(ds.shape[1]); ds.close()", True),
    "add_columns (2,000)": (
        "ds = loompy.connect(work); cols = sp.random(ds.shape[0], 2000, density=0.07, format='csc', "
        "random_state=1, dtype=np.float32).toarray(); ca = {'CellID': np.array([f'new{i}' for i in range(2000)])}",
        "ds.add_columns(cols, ca); ds.close()", True),
    "combine (2 files)": ("", "loompy.combine([base, base], work)", False),
    "permute (columns)": ("ds = loompy.connect(work); order = rng.permutation(ds.shape[1])",
                          "ds.permute(order, axis=1); ds.close()", True),
    "anndata.read_loom": ("import anndata", "anndata.read_loom(base, sparse=True)", False),
}


# everyday calls on small files, made many times in a session (--everyday): fixed costs per call show here
KNN = "g = sp.random(ds.shape[1], ds.shape[1], density=10 / ds.shape[1], format='coo', random_state=2)"
EVERYDAY: dict[str, tuple[str, str, bool]] = {
    "graph read x20": (f"ds = loompy.connect(work); {KNN}; ds.col_graphs['knn'] = g",
                       "for _ in range(20): ds.col_graphs['knn']", True),
    "graph write x5": (f"ds = loompy.connect(work); {KNN}", "for k in range(5): ds.col_graphs[f'g{k}'] = g", True),
    "view[:100, :100] x10": ("ds = loompy.connect(base, 'r')", "for _ in range(10): ds.view[:100, :100]", False),
    "add_columns 20 x 10 (with row_attrs)": (
        "ds = loompy.connect(work); ra = {'Gene': ds.ra.Gene}; cols = rng.random((ds.shape[0], 10)).astype('f4')",
        "for i in range(20): ds.add_columns(cols, {'CellID': np.array([f'n{i}_{j}' for j in range(10)])}, "
        "row_attrs=ra)\nds.close()", True),
    "map(lambda) x5": ("ds = loompy.connect(base, 'r')",
                       "for _ in range(5): ds.map([lambda x: float(x.sum())])", False),
    "ra/ca by name x1000": ("ds = loompy.connect(base, 'r')", "for _ in range(500): ds.ra.Gene; ds.ca.CellID", False),
}
OPERATIONS.update(EVERYDAY)


def make_data(folder: Path, genes: int, cells: int, density: float) -> None:
    rng = np.random.default_rng(0)
    m = sp.random(genes, cells, density=density, format="csc", random_state=rng, dtype=np.float32,
                  data_rvs=lambda k: rng.integers(1, 30, size=k))
    np.savez(folder / "data.npz", data=m.data, indices=m.indices, indptr=m.indptr, shape=np.array(m.shape),
             genes=np.array([f"Gene{i}" for i in range(genes)]), cells=np.array([f"Cell{i}" for i in range(cells)]))


def run(python: str, env: dict, op: str, base: Path, work: Path, extra: Path) -> dict | None:
    setup, statement, _ = OPERATIONS[op]
    watch = "\nthreading.Thread(target=watch_helpers, daemon=True).start()" if op in STARTS_HELPERS else ""
    setup = setup if op == "import loompy" else LIBRARIES + setup
    body = PRELUDE + setup + watch + "\nt = time.perf_counter()\n" + statement + "\ndone(time.perf_counter() - t)\n"
    proc = subprocess.run([python, "-c", textwrap.dedent(body), str(base), str(work), str(extra)],
                          capture_output=True, text=True, env=env, cwd="/")
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--genes", type=int, default=20000)
    parser.add_argument("--cells", type=int, default=20000)
    parser.add_argument("--density", type=float, default=0.07)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ops", nargs="*", default=None, help="subset of operations (by name)")
    parser.add_argument("--everyday", action="store_true", help="the everyday calls, not the issue's list")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    if args.ops is None:
        args.ops = list(EVERYDAY) if args.everyday else [op for op in OPERATIONS if op not in EVERYDAY]

    ref_python = str(reference.ensure_reference())
    subprocess.run([ref_python, "-m", "pip", "install", "-q", "anndata"], check=False, env=reference.environment())
    folder = Path(args.workdir or tempfile.mkdtemp(prefix="loompy-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    make_data(folder, args.genes, args.cells, args.density)
    ours_env = {**os.environ, "PYTHONPATH": str(REPO)}
    impls = {"ours": (sys.executable, ours_env), "reference": (ref_python, reference.environment())}
    bases = {}
    for name, (python, env) in impls.items():  # each side reads a file it wrote itself
        bases[name] = folder / f"base-{name}.loom"
        result = run(python, env, "create from scipy.sparse", folder / "unused", bases[name], folder)
        if not result or "error" in result:
            raise SystemExit(f"{name}: could not create the base file: {result}")

    results: dict[str, dict[str, list]] = {op: {"ours": [], "reference": []} for op in args.ops}
    for op in args.ops:
        for _ in range(args.repeats):
            for name, (python, env) in impls.items():
                work = folder / f"work-{name}.loom"
                if work.exists():
                    work.unlink()
                if OPERATIONS[op][2]:
                    shutil.copy(bases[name], work)
                results[op][name].append(run(python, env, op, bases[name], work, folder))
        print(f"done: {op}", file=sys.stderr)

    print(f"\n{args.genes:,} x {args.cells:,}, {args.density:.0%} non-zero float32 counts, "
          f"median of {args.repeats} fresh processes each\n")
    print("| operation | ours (s) | reference (s) | speed-up | ours peak RSS (MB) | reference peak RSS (MB) |")
    print("|---|---:|---:|---:|---:|---:|")
    for op, by_impl in results.items():
        cells = []
        for name in ("ours", "reference"):
            ok = [r for r in by_impl[name] if r and "s" in r]
            cells.append((statistics.median(r["s"] for r in ok), max(r["rss_mb"] for r in ok),
                          max(r.get("helpers_mb", 0) for r in ok)) if ok else None)
        if cells[0] is None or cells[1] is None:
            errors = [r.get("error") for name in by_impl for r in by_impl[name] if r and "error" in r]
            print(f"| {op} | {'-' if cells[0] is None else f'{cells[0][0]:.3f}'} | "
                  f"{'-' if cells[1] is None else f'{cells[1][0]:.3f}'} | n/a ({(errors or ['?'])[0][:60]}) | | |")
            continue
        ratio = cells[1][0] / cells[0][0] if cells[0][0] > 0 else float("inf")
        rss = [f"{c[1]:.0f}" + (f" (helpers: {c[2]:.0f} at most)" if c[2] >= 1 else "") for c in cells]
        digits = 5 if args.everyday else 3  # (everyday calls take milliseconds)
        print(f"| {op} | {cells[0][0]:.{digits}f} | {cells[1][0]:.{digits}f} | {ratio:.1f}x | {rss[0]} | {rss[1]} |")


if __name__ == "__main__":
    main()
