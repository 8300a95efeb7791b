"""The ``loompy`` command: demo, info, validate, import.

Built on the public API only, so every command does what the same Python call does.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

import loompy

EXAMPLE = Path(__file__).parent / "data" / "pbmc_cr3"


def _describe(values: np.ndarray) -> str:
    names = values.dtype.names
    if values.dtype == object:
        kind = "str"
    elif names is None:
        kind = str(values.dtype)
    else:  # (pySCENIC's regulons: a field each, hundreds of them)
        kind = f"compound of {len(names)} fields ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
    shape = "" if values.ndim == 1 else f" shape {values.shape}"
    preview = ", ".join(str(v) for v in values[:3].tolist()) + (", ..." if len(values) > 3 else "")
    return f"{kind}{shape}  [{preview if len(preview) <= 80 else preview[:77] + '...'}]"


def summary(ds: loompy.LoomConnection) -> str:
    """A plain-text summary of an open file: shape, layers, attributes, graphs, global attributes."""
    n, m = ds.shape
    lines = [f"{ds.filename}", f"  spec {ds.version}, {n} rows x {m} columns"]
    lines.append("  layers: " + (", ".join(f"{name or '(main)'} {ds.layers[name].dtype}" for name in ds.layers.keys())
                                 or "(none)"))
    for label, manager in (("row attributes", ds.ra), ("column attributes", ds.ca)):
        lines.append(f"  {label}:")
        lines += [f"    {name}: {_describe(manager[name])}" for name in manager.keys()] or ["    (none)"]
    for label, graphs in (("row graphs", ds.row_graphs), ("column graphs", ds.col_graphs)):
        if graphs.keys():
            lines.append(f"  {label}: " + ", ".join(f"{g} ({graphs[g].nnz} edges)" for g in graphs.keys()))
    lines.append("  global attributes: " + ", ".join(ds.attrs.keys()))
    return "\n".join(lines)


def corner(ds: loompy.LoomConnection, size: int = 8) -> str:
    """The top-left corner of the main matrix, labelled with gene names and cell ids where present."""
    rows, cols = min(size, ds.shape[0]), min(size, ds.shape[1])
    block = ds[:rows, :cols]
    genes = ds.ra.Gene[:rows] if "Gene" in ds.ra else np.arange(rows)
    cells = ds.ca.CellID[:cols] if "CellID" in ds.ca else np.arange(cols)
    width = max(len(str(g)) for g in genes) if rows else 0
    header = " " * width + " " + " ".join(f"{str(c)[-8:]:>8}" for c in cells)
    body = [f"{str(g):>{width}} " + " ".join(f"{v:>8}" for v in row.tolist()) for g, row in zip(genes, block)]
    return "\n".join([header, *body])


def _demo(args: argparse.Namespace) -> int:
    out = Path(args.output) if args.output else Path(tempfile.mkdtemp(prefix="loompy-demo-")) / "pbmc_cr3.loom"
    path = loompy.create_from_cellranger(EXAMPLE, loom_file=out, cell_id_prefix="")
    with loompy.connect(path, "r") as ds:
        print(f"Built {path} from the 10x Genomics example shipped with loompy ({EXAMPLE.name}).\n")
        print(summary(ds))
        nnz = ds.sparse().nnz
        print(f"  non-zero entries: {nnz} ({100 * nnz / max(1, ds.shape[0] * ds.shape[1]):.2f}%)")
        print("\nTop-left corner of the matrix:")
        print(corner(ds))
    return 0


def _info(args: argparse.Namespace) -> int:
    try:
        ds = loompy.connect(args.file, "r")
    except loompy.LoomLockError:  # a writer elsewhere holds it: still worth a look, as validate gives one
        ds = loompy.connect(args.file, "r", locking=False)
        print(f"warning: {args.file}: the file's lock cannot be taken (another process holds it, or the file "
              "system has no locks); read without it (what a writer is writing may show half done)", file=sys.stderr)
    with ds:
        print(summary(ds))
    return 0


def _validate(args: argparse.Namespace) -> int:
    if not os.path.exists(args.file):  # (exit 1 says the file breaks the spec: there is no file)
        raise loompy.LoomFileNotFoundError(errno.ENOENT, "no such Loom file", args.file)
    if os.path.isdir(args.file):
        raise loompy.LoomFileError(f"{args.file}: is a folder, not a Loom file")
    validator = loompy.LoomValidator()
    ok = validator.validate(args.file, strictness=args.strictness)
    for line in validator.summary:
        print(f"  {line}")
    for line in validator.warnings:
        print(f"warning: {line}")
    for line in validator.errors:
        print(f"error: {line}")
    print(f"{args.file}: {'valid' if ok else 'INVALID'} ({len(validator.errors)} errors, "
          f"{len(validator.warnings)} warnings)")
    return 0 if ok else 1


def _import(args: argparse.Namespace) -> int:
    path = loompy.create_from_cellranger(args.source, loom_file=args.output, genome=args.genome,
                                         cell_id_prefix=args.cell_id_prefix)
    print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``loompy`` command and its subcommands."""
    parser = argparse.ArgumentParser(prog="loompy", description="Work with Loom files.")
    parser.add_argument("--version", action="version", version=f"loompy {loompy.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="build a .loom from the example 10x dataset and show it")
    p.add_argument("-o", "--output", help="where to write the .loom (default: a new temporary folder, "
                                                "kept for you to open)")
    p.set_defaults(run=_demo)
    p = sub.add_parser("info", help="summarise a .loom file")
    p.add_argument("file")
    p.set_defaults(run=_info)
    p = sub.add_parser("validate", help="check a .loom file against the spec (exit 1 on errors)")
    p.add_argument("file")
    p.add_argument("--strictness", choices=["speconly", "conventions"], default="speconly",
                   help="conventions: also the Linnarsson lab's attribute conventions, as loompy 3 checks them "
                        "(CellID, ClusterID, Gene and Accession required)")
    p.set_defaults(run=_validate)
    p = sub.add_parser("import", help="build a .loom from 10x Genomics output (folder or .h5)")
    p.add_argument("source", help="a Cell Ranger sample folder, its outs/ folder, a matrix folder "
                                  "(Matrix Market) or a Cell Ranger .h5 file")
    p.add_argument("output", help="the .loom file to write (replaced if it exists)")
    p.add_argument("--genome", help="the genome whose features to import, when the output holds several")
    p.add_argument("--cell-id-prefix", default="", help="text put before each barcode in CellID (default: "
                                                         "none, the bare barcodes)")
    p.set_defaults(run=_import)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line on ``argv`` (None: the process's); the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    streams = [s for s in (sys.stdout, sys.stderr) if hasattr(s, "reconfigure")]
    before = [s.errors for s in streams]
    for stream in streams:  # (names a code page lacks, as Windows' redirected output has, escaped)
        stream.reconfigure(errors="backslashreplace")
    try:
        return args.run(args)
    except loompy.LoomError as exc:
        print(f"loompy {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: a new file is written whole or not at all, so no traceback is needed
        print(f"loompy {args.command}: interrupted", file=sys.stderr)
        return 130  # (what shells report for a command ended by SIGINT)
    except BrokenPipeError:  # the reader went away (``loompy demo | head``): no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (Python flushes stdout at exit)
        return 1
    finally:
        for stream, errors in zip(streams, before):
            with contextlib.suppress(ValueError, OSError):  # (a stream closed meanwhile)
                stream.reconfigure(errors=errors)


if __name__ == "__main__":
    sys.exit(main())
