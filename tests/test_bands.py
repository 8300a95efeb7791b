"""Re-encoding shifted chunk rows in child processes (engine/bands.py, child.py, processes.py): the same
values as on threads and as numpy, a fallback when children fail, errors for damaged chunks, and
no child left behind."""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import textwrap
import time
import zlib

import h5py
import numpy as np
import pytest
import scipy.sparse as sp

import loompy
from loompy import engine

processes = importlib.import_module("loompy.engine.processes")
bands = importlib.import_module("loompy.engine.bands")


def _source(path, shape=(300, 1000), dtype=np.float32, fill=0, seed=5):
    rng = np.random.default_rng(seed)
    m = ((rng.random(shape) < 0.2) * rng.integers(1, 50, size=shape)).astype(dtype)
    m[:, 128:256] = 0  # two chunk columns never stored: they read as the fill value
    with h5py.File(path, "w") as f:
        d = f.create_dataset("src", shape=shape, dtype=dtype, chunks=(64, 64), compression="gzip",
                             compression_opts=2, fillvalue=fill)
        for r in range(0, shape[0], 64):
            for c in range(0, shape[1], 64):
                block = np.zeros((64, 64), dtype)
                part = m[r:r + 64, c:c + 64]
                block[:part.shape[0], :part.shape[1]] = part
                if part.any():
                    d.id.write_direct_chunk((r, c), zlib.compress(block.tobytes(), 2))
        return d[...]


def _copy(path, offset, total, dst_dtype="f4"):
    with h5py.File(path, "r+") as f:
        if "dst" in f:
            del f["dst"]
        dst = f.create_dataset("dst", shape=(f["src"].shape[0], total), dtype=dst_dtype, chunks=(64, 64),
                               compression="gzip", compression_opts=2, fillvalue=0)
        a, b = engine.copy_columns(f["src"], dst, offset)
        return (a, b), dst[...]


@pytest.mark.parametrize("offset, total, dst_dtype, fill", [
    (40, 1040, "f4", 0),    # reaching the end of dst: its partial last chunk column is the source's alone
    (100, 1500, "f8", 0),   # ending inside a chunk shared with what comes next; another dtype
    (3, 1003, "f4", 5),     # unstored chunks of the source read as its fill value, 5
])
def test_children_encode_what_threads_and_numpy_give(tmp_path, children, monkeypatch, offset, total, dst_dtype,
                                                    fill):
    path = tmp_path / "s.h5"
    expected = _source(path, fill=fill)
    here, encode = [], bands.BandEncoder.encode
    monkeypatch.setattr(bands.BandEncoder, "encode", lambda self, band: here.append(band) or encode(self, band))
    (a, b), got = _copy(path, offset, total, dst_dtype)
    assert len(children) == 2 and all(c.returncode is not None for c in children)  # started, and reaped
    assert here == []  # every band came from them
    first = -(-offset // 64) * 64
    assert (a, b) == (first, total if offset + 1000 == total else (offset + 1000) // 64 * 64)
    np.testing.assert_array_equal(got[:, a:b], expected[:, a - offset:b - offset].astype(dst_dtype))
    assert not got[:, :a].any() and not got[:, b:].any()
    processes.MIN_CHUNKS = 10 ** 12  # the same on threads (the fixture restores it)
    children.clear()
    (a2, b2), threaded = _copy(path, offset, total, dst_dtype)
    assert not children and (a2, b2) == (a, b)
    np.testing.assert_array_equal(threaded, got)


@pytest.mark.parametrize("boot", [
    "import sys; sys.exit(3)",                                   # dies at once
    "import sys; sys.stdout.buffer.write(bytes(32)); sys.stdout.flush()",  # a frame that is no band's
    "import sys; sys.stdout.buffer.write(bytes(20))",          # a frame cut short
])
def test_bands_a_child_cannot_give_are_encoded_here(tmp_path, children, monkeypatch, boot):
    path = tmp_path / "s.h5"
    expected = _source(path)
    monkeypatch.setattr(processes, "_BOOT", boot + "\n# {path} {package} {engine}")
    (a, b), got = _copy(path, 10, 1010)
    assert len(children) == 2
    np.testing.assert_array_equal(got[:, a:b], expected[:, a - 10:b - 10])


def test_a_damaged_chunk_found_by_a_child_names_the_source(tmp_path, children, monkeypatch):
    """The child's report is the error (this process does not read the chunk again itself)."""
    path = tmp_path / "s.h5"
    _source(path)
    with h5py.File(path, "r+") as f:
        f["src"].id.write_direct_chunk((128, 512), b"\x78\x9c not deflate at all")
    here, encode = [], bands.BandEncoder.encode
    monkeypatch.setattr(bands.BandEncoder, "encode", lambda self, part: here.append(part) or encode(self, part))
    with pytest.raises(loompy.LoomFileError, match=r"s\.h5: /src: a stored chunk does not inflate.*damaged"):
        _copy(path, 10, 1010)
    assert len(children) == 2 and all(c.returncode is not None for c in children) and here == []


def test_children_are_ended_when_storing_fails(tmp_path, children, monkeypatch):
    path = tmp_path / "s.h5"
    _source(path)

    def full_disk(self, coords, payloads, empty):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(engine.write.ChunkStore, "__call__", full_disk)
    with pytest.raises(OSError, match="No space"):
        _copy(path, 10, 1010)
    assert len(children) == 2 and all(c.returncode is not None for c in children)


def test_combine_through_children_equals_numpy(tmp_path, children):
    rng = np.random.default_rng(11)
    mats = [((rng.random((200, k)) < 0.3) * rng.integers(1, 9, size=(200, k))).astype(np.float32)
            for k in (100, 333, 70)]
    paths = []
    for i, m in enumerate(mats):
        paths.append(tmp_path / f"in{i}.loom")
        loompy.create(paths[-1], m, {"Gene": [f"g{j}" for j in range(200)]},
                      {"CellID": [f"f{i}c{j}" for j in range(m.shape[1])]}).close()
    loompy.combine(paths, tmp_path / "out.loom")
    assert children  # the second input, at column 100, was re-encoded by children
    with loompy.connect(tmp_path / "out.loom", "r") as ds:
        np.testing.assert_array_equal(ds[:, :], np.hstack(mats))
        assert list(ds.ca.CellID[98:102]) == ["f0c98", "f0c99", "f1c0", "f1c1"]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_children_end_when_their_parent_is_killed(tmp_path):
    """A parent killed while children work (here: stuck storing its first band) leaves no child running."""
    script = textwrap.dedent("""
        import sys, time, importlib, h5py, numpy as np
        processes = importlib.import_module("loompy.engine.processes")
        write = importlib.import_module("loompy.engine.write")
        processes.MIN_CHUNKS = 0
        start = processes.BandJob._start_children
        def spy(job):
            start(job)
            print(*[c.pid for c in job.children], flush=True)
        processes.BandJob._start_children = spy
        write.ChunkStore.__call__ = lambda *args: time.sleep(60)
        with h5py.File(sys.argv[1], "r+") as f:
            dst = f.create_dataset("dst", shape=(f["src"].shape[0], 1010), dtype="f4", chunks=(64, 64),
                                   compression="gzip")
            importlib.import_module("loompy.engine.copying").copy_columns(f["src"], dst, 10)
    """)
    path = tmp_path / "s.h5"
    _source(path, shape=(3000, 1000))
    parent = subprocess.Popen([sys.executable, "-c", script, str(path)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(loompy.__file__))})
    pids = [int(p) for p in parent.stdout.readline().split()]
    assert len(pids) == 2
    time.sleep(1.0)  # the children fill their pipes and queues, then wait
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in pids)


@pytest.mark.parametrize("width, fill", [(1000, 0), (1030, 3)])
def test_reordered_columns_through_children_equal_numpy(tmp_path, children, width, fill):
    """permute's path: every chunk row gathered in the new column order; the padding of the last
    chunk column stays zero; unstored source chunks read as their fill value."""
    path = tmp_path / "s.h5"
    expected = _source(path, shape=(300, width), fill=fill)
    order = np.random.default_rng(12).permutation(width)
    with h5py.File(path, "r+") as f:
        dst = f.create_dataset("dst", shape=(300, width), dtype="f8", chunks=(64, 64), compression="gzip",
                               compression_opts=2, fillvalue=0)
        assert engine.reorder_columns(f["src"], dst, order)
        np.testing.assert_array_equal(dst[...], expected[:, order])
        _, raw = dst.id.read_direct_chunk((256, (width - 1) // 64 * 64))  # the corner chunk, padding included
        corner = np.frombuffer(zlib.decompress(raw), "f8").reshape(64, 64)
        assert not corner[300 - 256:].any() and not corner[:, width % 64 or 64:].any()
    assert len(children) == 2 and all(c.returncode is not None for c in children)


def test_permute_through_children_equals_numpy(tmp_path, children):
    rng = np.random.default_rng(13)
    m = ((rng.random((130, 500)) < 0.3) * rng.integers(1, 9, size=(130, 500))).astype(np.float32)
    path = tmp_path / "p.loom"
    loompy.create(path, m, {"Gene": [f"g{j}" for j in range(130)]}, {"CellID": [f"c{j}" for j in range(500)]}).close()
    order = rng.permutation(500)
    with loompy.connect(path) as ds:
        ds.permute(order, axis=1)
    assert children
    with loompy.connect(path, "r") as ds:
        np.testing.assert_array_equal(ds[:, :], m[:, order])
        assert list(ds.ca.CellID[:3]) == [f"c{j}" for j in order[:3]]


def test_children_refuse_a_file_that_is_not_the_one_listed(tmp_path, children, monkeypatch):
    """Children open the source by name and check it is the file whose chunks were listed; when it
    is not (replaced on disk meanwhile: here, a wrong identity), this process encodes every band."""
    path = tmp_path / "s.h5"
    expected = _source(path)
    begin, encode = processes.BandJob.begin, bands.BandEncoder.encode
    here = []
    monkeypatch.setattr(processes.BandJob, "begin",
                        lambda job, plan, fd, name, file_id: begin(job, plan, fd, name, (0, 0)))
    monkeypatch.setattr(bands.BandEncoder, "encode", lambda self, band: here.append(band) or encode(self, band))
    (a, b), got = _copy(path, 10, 1010)
    assert len(children) == 2 and sorted(here) == list(range(5))  # 300 rows: 5 parts, all done here
    np.testing.assert_array_equal(got[:, a:b], expected[:, a - 10:b - 10])


def test_children_that_end_at_once_leave_the_work_to_threads(tmp_path, children, monkeypatch):
    path = tmp_path / "s.h5"
    expected = _source(path)
    monkeypatch.setattr(processes, "_BOOT", "import sys; sys.exit(3)\n# {path} {package} {engine}")
    start = processes.BandJob._start_children

    def start_and_wait(job):
        start(job)
        for child in job.children:
            child.wait()

    monkeypatch.setattr(processes.BandJob, "_start_children", start_and_wait)
    threaded, run = [], processes.run_in_order
    monkeypatch.setattr(processes, "run_in_order",
                        lambda tasks, *args: threaded.append(len(tasks)) or run(tasks, *args))
    (a, b), got = _copy(path, 10, 1010)
    assert threaded == [5]  # all 5 bands on the threads, not one by one here
    np.testing.assert_array_equal(got[:, a:b], expected[:, a - 10:b - 10])


def test_a_program_that_does_not_ignore_sigpipe_survives_children_that_die(tmp_path):
    """Programs often restore SIGPIPE's default; writing to a dead child's pipe would then kill them."""
    path = tmp_path / "s.h5"
    expected = _source(path)
    script = textwrap.dedent("""
        import importlib, signal, sys, h5py, numpy as np
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        importlib.import_module("loompy.engine.processes").MIN_CHUNKS = 0
        sys.executable = "/bin/false"  # children that end at once
        from loompy import engine
        with h5py.File(sys.argv[1], "r+") as f:
            dst = f.create_dataset("dst", shape=(300, 1010), dtype="f4", chunks=(64, 64), compression="gzip")
            print(engine.copy_columns(f["src"], dst, 10))
    """)
    done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(loompy.__file__))})
    assert done.returncode == 0, done.stderr
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["dst"][:, 64:1010], expected[:, 54:1000])


def test_the_frames_of_children_that_are_done_are_used(tmp_path, children, monkeypatch):
    """A small job's children may have sent everything and exited before their frames are read."""
    path = tmp_path / "s.h5"
    expected = _source(path, shape=(130, 400))
    here, encode, store_all = [], bands.BandEncoder.encode, processes.BandJob.store_all
    monkeypatch.setattr(bands.BandEncoder, "encode", lambda self, band: here.append(band) or encode(self, band))

    def late_store_all(job, store):
        for child in job.children:
            child.wait(timeout=20)  # (their frames fit in the pipes)
        store_all(job, store)

    monkeypatch.setattr(processes.BandJob, "store_all", late_store_all)
    (a, b), got = _copy(path, 10, 410)
    assert len(children) == 2 and here == []
    np.testing.assert_array_equal(got[:, a:b], expected[:, a - 10:b - 10])


def _first_child_then(flag, statement: str) -> str:
    """Boot code that runs ``statement`` in whichever child starts first (it makes ``flag``)."""
    return ("import os\ntry:\n    os.close(os.open(" + repr(str(flag)) + ", os.O_CREAT | os.O_EXCL))\n"
            "except FileExistsError:\n    pass\nelse:\n    " + statement + "\n")


def test_a_child_that_fails_at_start_leaves_its_share_to_the_other(tmp_path, children, monkeypatch):
    """Children take parts as they get to them: the one left does them all."""
    path = tmp_path / "s.h5"
    expected = _source(path, shape=(640, 1000))  # 10 bands
    flag = tmp_path / "first"
    monkeypatch.setattr(processes, "_BOOT", _first_child_then(flag, "import sys; sys.exit(3)") + processes._BOOT)
    here, encode = [], bands.BandEncoder.encode
    monkeypatch.setattr(bands.BandEncoder, "encode", lambda self, part: here.append(part) or encode(self, part))
    (a, b), got = _copy(path, 10, 1010)
    assert flag.exists() and [c.returncode for c in children].count(3) == 1  # one failed, one did it all
    assert here == []
    np.testing.assert_array_equal(got[:, a:b], expected[:, a - 10:b - 10])


def test_the_part_a_child_dies_on_is_done_here(tmp_path, children, monkeypatch):
    path = tmp_path / "s.h5"
    expected = _source(path, shape=(640, 1000))  # 10 bands
    dying = ("from loompy.engine import bands\nencode = bands.BandEncoder.encode\n"  # (after its frames are out)
             "bands.BandEncoder.encode = lambda self, part: (time.sleep(0.5), os._exit(5)) if part == 3 "
             "else encode(self, part)\n")
    boot = processes._BOOT.replace("from loompy.engine.child import child_main\n",
                                   "import os, time\n" + dying + "from loompy.engine.child import child_main\n")
    assert boot != processes._BOOT
    monkeypatch.setattr(processes, "_BOOT", boot)
    here, encode = [], bands.BandEncoder.encode
    monkeypatch.setattr(bands.BandEncoder, "encode", lambda self, part: here.append(part) or encode(self, part))
    (a, b), got = _copy(path, 10, 1010)
    assert here == [3] and 5 in [c.returncode for c in children]
    np.testing.assert_array_equal(got[:, a:b], expected[:, a - 10:b - 10])


@pytest.mark.parametrize("piece", [1, 3, 16])
def test_wide_bands_are_encoded_in_parts(tmp_path, children, monkeypatch, piece):
    """combine's bands go in parts of at most ``piece_tiles`` tiles (memory independent of the width),
    in children and on threads alike; the last part of each band is the narrower one."""
    path = tmp_path / "s.h5"
    expected = _source(path, shape=(200, 1000))
    monkeypatch.setattr(bands, "PIECE_TILES", piece)
    plans, begin = [], processes.BandJob.begin
    monkeypatch.setattr(processes.BandJob, "begin",
                        lambda job, plan, *args: plans.append(plan) or begin(job, plan, *args))
    for min_chunks in (0, 10 ** 12):  # children, then threads
        monkeypatch.setattr(processes, "MIN_CHUNKS", min_chunks)
        (a, b), got = _copy(path, 40, 1040)
        np.testing.assert_array_equal(got[:, a:b], expected[:, a - 40:b - 40])
        assert not got[:, :a].any()
    assert [(p.piece, p.parts) for p in plans] == [(piece, 4 * -(-16 // piece))] * 2  # 4 bands of 16 tiles
    assert children


def test_a_child_that_sends_nothing_is_not_waited_for_forever(tmp_path, children, monkeypatch):
    path = tmp_path / "s.h5"
    expected = _source(path)
    monkeypatch.setattr(processes, "_BOOT", "import time; time.sleep(30)\n# {path} {package} {engine}")
    monkeypatch.setattr(processes, "PATIENCE", 0.5)
    began = time.monotonic()
    (a, b), got = _copy(path, 10, 1010)
    assert time.monotonic() - began < 10 and len(children) == 2
    assert all(c.returncode is not None for c in children)  # ended, not left sleeping
    np.testing.assert_array_equal(got[:, a:b], expected[:, a - 10:b - 10])


@pytest.mark.parametrize("executable", ["/usr/local/bin/uwsgi", "", "/opt/app/bin/myapp"])
def test_no_children_where_sys_executable_is_not_a_python(monkeypatch, executable):
    monkeypatch.setattr(sys, "executable", executable)
    assert not processes._can_start_children()
    monkeypatch.setattr(sys, "executable", "/usr/bin/python3.11")
    assert processes._can_start_children() == (os.name == "posix" and processes._cores() > 1)


def test_permutes_of_very_wide_matrices_go_a_strip_at_a_time(tmp_path, children, monkeypatch):
    """A chunk row wider than the engine's strip is never held whole, four times over, in a child."""
    path = tmp_path / "s.h5"
    expected = _source(path, shape=(130, 700))
    copying = importlib.import_module("loompy.engine.copying")
    monkeypatch.setattr(copying, "STRIP_BYTES", 64 * 600 * 4)  # less than a chunk row of 700 float32 columns
    order = np.random.default_rng(3).permutation(700)
    with h5py.File(path, "r+") as f:
        dst = f.create_dataset("dst", shape=(130, 700), dtype="f4", chunks=(64, 64), compression="gzip")
        assert not engine.reorder_columns(f["src"], dst, order) and not children
        monkeypatch.setattr(copying, "STRIP_BYTES", 64 * 700 * 4)
        assert engine.reorder_columns(f["src"], dst, order) and children
        np.testing.assert_array_equal(dst[...], expected[:, order])


def test_children_are_heard_on_descriptors_past_1023(tmp_path, children, monkeypatch):
    """select() cannot wait on such descriptors; with them in use, the children's parts still arrive."""
    path = tmp_path / "s.h5"
    expected = _source(path)
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip("cannot open 1,100 descriptors here")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        here, encode = [], bands.BandEncoder.encode
        monkeypatch.setattr(bands.BandEncoder, "encode", lambda self, part: here.append(part) or encode(self, part))
        (a, b), got = _copy(path, 10, 1010)
        assert here == [] and len(children) == 2
        np.testing.assert_array_equal(got[:, a:b], expected[:, a - 10:b - 10])
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_each_layers_children_are_ended_before_the_next_layer(tmp_path, children, monkeypatch):
    """combine lets go of a layer's helpers (and their descriptors) once that layer is written."""
    rng = np.random.default_rng(14)
    paths = []
    for i, k in enumerate((100, 90)):
        m = rng.poisson(0.5, size=(130, k)).astype(np.float32)
        paths.append(tmp_path / f"in{i}.loom")
        loompy.create(paths[-1], {"": m, "x": m * 2, "y": m * 3}, {"Gene": [f"g{j}" for j in range(130)]},
                      {"CellID": [f"f{i}c{j}" for j in range(k)]}).close()
    combine_module = importlib.import_module("loompy.combine")
    start, alive_before = combine_module._start_second, []

    def spy(*args):
        alive_before.append(sum(c.returncode is None for c in children))
        return start(*args)

    monkeypatch.setattr(combine_module, "_start_second", spy)
    loompy.combine(paths, tmp_path / "out.loom")
    assert alive_before == [0, 0, 0] and len(children) == 6  # three layers, two helpers each
    with loompy.connect(tmp_path / "out.loom", "r") as ds:
        np.testing.assert_array_equal(ds["y"][:, :], ds[:, :] * 3)


def test_children_start_numpy_with_one_blas_thread(tmp_path, children, monkeypatch):
    """A BLAS thread pool (never used there) spins for 0.1 s of CPU in each child as numpy loads."""
    path = tmp_path / "s.h5"
    _source(path)
    envs, popen = [], subprocess.Popen
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "8")
    monkeypatch.setattr(processes.subprocess, "Popen", lambda *a, **k: envs.append(k["env"]) or popen(*a, **k))
    _copy(path, 10, 1010)
    assert len(envs) == 2 and all(e["OPENBLAS_NUM_THREADS"] == e["OMP_NUM_THREADS"] == "1" for e in envs)
    assert all(e["PATH"] == os.environ["PATH"] for e in envs)


def test_a_child_still_starting_up_is_not_waited_for_once_every_part_is_stored(tmp_path, children, monkeypatch):
    path = tmp_path / "s.h5"
    expected = _source(path)
    monkeypatch.setattr(processes, "_BOOT", _first_child_then(tmp_path / "first", "import time; time.sleep(30)")
                        + processes._BOOT)
    here, encode = [], bands.BandEncoder.encode
    monkeypatch.setattr(bands.BandEncoder, "encode", lambda self, part: here.append(part) or encode(self, part))
    began = time.monotonic()
    (a, b), got = _copy(path, 10, 1010)
    assert time.monotonic() - began < 15 and here == [] and all(c.returncode is not None for c in children)
    np.testing.assert_array_equal(got[:, a:b], expected[:, a - 10:b - 10])


def test_no_children_where_the_temporary_folder_has_no_locks(tmp_path, children, monkeypatch):
    """Children take parts under a lock on a temporary file; some network file systems have none."""
    path = tmp_path / "s.h5"
    expected = _source(path)

    def no_locks(fd):
        raise OSError(37, "No locks available")

    monkeypatch.setattr(processes, "check_locks", no_locks)
    (a, b), got = _copy(path, 10, 1010)
    assert not children
    np.testing.assert_array_equal(got[:, a:b], expected[:, a - 10:b - 10])


def test_claims_are_unique_across_processes(tmp_path):
    """Three processes claiming at once from one shared counter get every number exactly once."""
    shared = os.open(tmp_path / "counter", os.O_RDWR | os.O_CREAT)
    os.write(shared, importlib.import_module("loompy.engine.child").COUNTER.pack(0))
    script = textwrap.dedent("""
        import sys
        from loompy.engine.child import claim
        print(" ".join(str(claim(int(sys.argv[1]))) for _ in range(400)))
    """)
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(loompy.__file__))}
    workers = [subprocess.Popen([sys.executable, "-c", script, str(shared)], pass_fds=(shared,), env=env,
                                stdout=subprocess.PIPE, text=True) for _ in range(3)]
    got = [int(v) for w in workers for v in w.communicate(timeout=60)[0].split()]
    os.close(shared)
    assert sorted(got) == list(range(1200))


@pytest.mark.parametrize("level", [None, 1, 2, 3, 4, 9])
def test_compressor_gives_what_compress_gives(level):
    raw = np.random.default_rng(level or 0).integers(0, 3, size=(64, 64)).astype(np.float32)
    deflate = importlib.import_module("loompy.engine.codecs").compressor(level)
    stored = bytes(deflate(memoryview(raw).cast("B")))
    assert stored == bytes(importlib.import_module("loompy.engine.codecs").compress(raw, level))
    assert (zlib.decompress(stored) if level is not None else stored) == raw.tobytes()


def test_a_frame_whose_tiles_do_not_fit_its_part_is_refused():
    """A child's frame must name each tile of its part once, with lengths that are not negative:
    anything else is a failed child (its part is encoded here), never stored."""
    grid = np.zeros((1, 10), np.int64)
    plan = bands.BandPlan(chunks=(64, 64), rows=64, source_dtype="<f4", target_dtype="<f4", compressed=True,
                          level=2, source_fill=0, target_fill=0, source_start=0, width=640, offset=grid,
                          size=grid, mask=grid, piece_tiles=4)
    assert plan.part(1) == (0, 4, 8)

    def reader(numbers, blob=b"abcdef"):
        data = [np.array(numbers, np.int64).tobytes(), blob]
        return lambda n: data.pop(0)[:n]

    stored, payloads, empty = plan.read_frame(1, 2, 2, reader([5, 7, 2, 4, 4, 6]))
    assert (stored, [bytes(p) for p in payloads], empty) == ([5, 7], [b"ab", b"cdef"], [4, 6])
    for numbers in ([5, 9, 2, 4, 4, 6], [5, 5, 2, 4, 4, 6], [5, 7, -2, 8, 4, 6]):  # outside, twice, negative
        with pytest.raises(ValueError, match="part 1"):
            plan.read_frame(1, 2, 2, reader(numbers))


@pytest.mark.parametrize("how", ["dense", "sparse", "permute"])
def test_edge_chunks_are_padded_with_the_fill_value_as_hdf5_pads_them(tmp_path, children, how):
    """The engine padded partial edge chunks with zeros; HDF5 pads with the fill value, and a
    dataset grown later (by h5py) shows the padding: 0 where h5py's own writes give the fill."""
    path = tmp_path / "f.loom"
    values = np.arange(130 * 70, dtype=np.float32).reshape(130, 70) + 1
    with h5py.File(path, "w") as f:
        f.create_dataset("matrix", data=np.zeros((130, 70), np.float32), chunks=(64, 64), maxshape=(None, None),
                         fillvalue=3.0, compression="gzip")
        for group in ("layers", "row_attrs", "col_attrs", "row_graphs", "col_graphs", "attrs"):
            f.create_group(group)
        f["attrs/LOOM_SPEC_VERSION"] = "3.0.0"
    with loompy.connect(path) as ds:
        if how == "permute":
            ds[:, :] = values
            with h5py.File(path, "r+") as f:  # (h5py's own padding first, then the permute's)
                f["matrix"][...] = values
            ds.permute(np.arange(70)[::-1], axis=1)
            values = values[:, ::-1]
        else:
            ds[:, :] = sp.csr_matrix(values) if how == "sparse" else values
    with h5py.File(path, "r+") as f:
        f["matrix"].resize((192, 192))
        grown = f["matrix"][...]
    np.testing.assert_array_equal(grown[:130, :70], values)
    assert (grown[130:] == 3.0).all() and (grown[:, 70:] == 3.0).all()
