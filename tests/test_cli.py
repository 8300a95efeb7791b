"""The loompy command line, run through its main() and as an installed script."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

import loompy
from loompy.cli import main

from .conftest import REAL, held_for_writing

CR3_H5 = REAL / "scverse+scanpy/tests/_data/10x_data/3.0.0/filtered_feature_bc_matrix.h5"


def test_demo_builds_and_shows_the_example(tmp_path, capsys):
    out = tmp_path / "demo.loom"
    assert main(["demo", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "507 rows x 1107 columns" in text and "Top-left corner" in text and "CH507-9B2.2" in text
    with h5py.File(out, "r") as f:
        assert f["matrix"].shape == (507, 1107)


def test_info_import_and_validate(tmp_path, capsys):
    out = tmp_path / "cr3.loom"
    assert main(["import", str(CR3_H5), str(out), "--cell-id-prefix", "x_"]) == 0
    with loompy.connect(out, "r") as ds:
        assert ds.ca.CellID[0] == "x_AAACCCAAGGAGAGTA-1"
        total = int(ds.sparse().sum())
    with h5py.File(CR3_H5, "r") as f:
        assert total == int(np.sum(f["matrix/data"][...]))
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Gene: str" in text and "CellID" in text and "int32" in text
    assert main(["validate", str(out)]) == 0
    assert "valid (0 errors" in capsys.readouterr().out
    bad = tmp_path / "bad.loom"
    with h5py.File(bad, "w") as f:
        f["matrix"] = np.zeros((2, 2), dtype=complex)
    assert main(["validate", str(bad)]) == 1
    assert "error:" in capsys.readouterr().out
    assert main(["info", str(tmp_path / "missing.loom")]) == 2
    assert "missing.loom" in capsys.readouterr().err


def test_python_dash_m_runs_the_tool(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "loompy", "--help"], capture_output=True, text=True,
                            cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(Path(loompy.__file__).parents[1])})
    assert result.returncode == 0 and "validate" in result.stdout


def test_validate_without_a_file_is_a_usage_error_not_a_verdict(tmp_path, capsys):
    """Exit 1 says the file breaks the spec; a missing path or a folder said so too, with HDF5's
    text. Now exit 2 with a clear message, as `info` gives."""
    assert main(["validate", str(tmp_path / "missing.loom")]) == 2
    assert "no such Loom file" in capsys.readouterr().err
    assert main(["validate", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_output_cut_short_by_its_reader_ends_quietly(tmp_path):
    """`loompy demo | head -1`: the reader goes away; no BrokenPipeError traceback."""
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(loompy.__file__).parents[1])}
    run = subprocess.run(f"{sys.executable} -m loompy demo -o {tmp_path / 'd.loom'} | head -c 10",
                         shell=True, capture_output=True, text=True, env=env, timeout=300)
    assert "Traceback" not in run.stderr and "BrokenPipe" not in run.stderr


def test_info_reads_a_file_another_process_holds_locked_with_a_warning(tmp_path, capsys):
    """validate read such a file with a warning; info refused it (exit 2)."""
    path = tmp_path / "held.loom"
    loompy.create(path, np.ones((3, 4), np.float32), {"Gene": ["a", "b", "c"]}, {"CellID": list("wxyz")}).close()
    with held_for_writing(path):
        assert main(["info", str(path)]) == 0
        out = capsys.readouterr()
        assert "3 rows x 4 columns" in out.out and "lock cannot be taken" in out.err


def test_validator_reports_a_graph_of_unequal_parts_once(tmp_path):
    path = tmp_path / "g.loom"
    loompy.create(path, np.ones((3, 3), np.float32), {"G": np.arange(3)}, {"C": np.arange(3)}).close()
    with h5py.File(path, "r+") as f:
        g = f["col_graphs"].create_group("knn")
        g["a"], g["b"], g["w"] = np.array([0, 1]), np.array([1, 2]), np.array([1.0])
        g = f["col_graphs"].create_group("named")
        g["a"], g["b"], g["w"] = np.array([0, 1]), np.array([1, 2]), np.array([b"x", b"y"])
    validator = loompy.LoomValidator()
    assert not validator.validate(str(path))
    assert len([e for e in validator.errors if "knn" in e]) == 1, validator.errors
    assert len([e for e in validator.errors if "named" in e]) == 1, validator.errors


def test_info_into_a_code_page_without_the_names_characters_does_not_crash(tmp_path):
    """Windows writes redirected output in its code page (cp1252): `loompy info f.loom > out.txt`
    with Japanese gene names ended in a UnicodeEncodeError traceback. They are escaped now."""
    import subprocess
    import sys

    path = tmp_path / "names.loom"
    loompy.create(path, np.ones((2, 2), np.float32), {"Gene": np.array(["遺伝子", "Actb"])}, {"CellID": ["a", "b"]}
                  ).close()
    result = subprocess.run([sys.executable, "-m", "loompy", "info", str(path)], capture_output=True, cwd=tmp_path,
                            env={**os.environ, "PYTHONIOENCODING": "cp1252",
                                 "PYTHONPATH": str(Path(loompy.__file__).parents[1])})
    assert result.returncode == 0, result.stderr.decode("cp1252", "replace")
    assert b"\\u907a\\u4f1d\\u5b50" in result.stdout and b"Actb" in result.stdout


def test_ctrl_c_during_an_import_ends_with_one_line_and_leaves_no_file(tmp_path, capsys, monkeypatch):
    """Ctrl-C printed the whole traceback of wherever the import was."""
    from loompy import engine

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "write_matrix", interrupted)
    assert main(["import", str(CR3_H5), str(tmp_path / "cr3.loom")]) == 130
    assert capsys.readouterr().err == "loompy import: interrupted\n"
    assert list(tmp_path.iterdir()) == []


def test_info_of_an_empty_file_and_of_compound_attributes_stays_short(tmp_path, capsys):
    empty = tmp_path / "new.loom"
    loompy.new(empty).close()
    assert main(["info", str(empty)]) == 0
    assert "  layers: (none)\n" in capsys.readouterr().out
    path = tmp_path / "c.loom"
    fields = [(f"regulon_{k}(+)", "f8") for k in range(40)]
    with loompy.create(path, np.ones((2, 4), np.float32), {"g": np.arange(2)}, {"c": np.arange(4)}) as ds:
        ds.ca.RegulonsAUC = np.ones(4, dtype=fields)  # (as pySCENIC writes: a field per regulon)
    assert main(["info", str(path)]) == 0
    line = next(t for t in capsys.readouterr().out.splitlines() if "RegulonsAUC" in t)
    assert "RegulonsAUC: compound of 40 fields (regulon_0(+), regulon_1(+), regulon_2(+), ...)  [(1.0, " in line
    assert len(line) < 200 and line.endswith("...]")
