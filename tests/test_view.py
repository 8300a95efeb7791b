"""In-memory views: sliced layers, attributes and renumbered graphs, usable like a connection."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

import loompy


@pytest.fixture
def ds(tmp_path):
    rng = np.random.default_rng(2)
    m = rng.integers(0, 10, size=(20, 30)).astype(np.float32)
    edges = sp.coo_matrix((np.arange(1.0, 6.0), ([0, 3, 7, 29, 12], [3, 0, 12, 28, 7])), shape=(30, 30))
    path = tmp_path / "v.loom"
    with loompy.create(path, {"": m, "x": m * 2}, {"Gene": [f"g{i}" for i in range(20)]},
                       {"CellID": [f"c{i}" for i in range(30)]}) as conn:
        conn.col_graphs["knn"] = edges
        conn.row_graphs["net"] = sp.coo_matrix(np.eye(20))
    with loompy.connect(path, "r") as conn:
        yield conn, m, edges


def test_view_slices_everything(ds):
    conn, m, edges = ds
    cols = [12, 3, 7, 0]  # unsorted
    view = conn.view[2:6, cols]
    assert isinstance(view, loompy.LoomView) and view.shape == (4, 4)
    np.testing.assert_array_equal(view[:, :], m[2:6][:, cols])
    np.testing.assert_array_equal(view.layers["x"][:, :], (m * 2)[2:6][:, cols])
    np.testing.assert_array_equal(view["x"][1, ::-1], (m * 2)[3, cols[::-1]])
    assert list(view.ca.CellID) == ["c12", "c3", "c7", "c0"] and list(view.ra.Gene) == ["g2", "g3", "g4", "g5"]
    assert list(view.CellID) == ["c12", "c3", "c7", "c0"]
    # graph: keep edges inside the selection, renumbered to view positions
    expected = edges.toarray()[np.ix_(cols, cols)]
    np.testing.assert_array_equal(view.col_graphs["knn"].toarray(), expected)
    assert view.col_graphs["knn"].nnz == 4  # 29->28 is outside
    np.testing.assert_array_equal(view.row_graphs.net.toarray(), np.eye(4))


def test_view_of_view_and_masks(ds):
    conn, m, _ = ds
    mask = np.arange(30) % 2 == 0
    outer = conn.view[:, mask]
    inner = outer.view[[1, 0], 2:5]
    np.testing.assert_array_equal(inner[:, :], m[[1, 0]][:, mask][:, 2:5])
    assert list(inner.ca.CellID) == ["c4", "c6", "c8"]
    single = conn.view[3, :]
    assert single.shape == (1, 30)
    np.testing.assert_array_equal(single.sparse().toarray(), m[3:4])
    np.testing.assert_array_equal(single.layers[""].as_csr().toarray(), m[3:4])


def test_view_display(ds):
    conn, _, _ = ds
    view = conn.view[:3, :3]
    assert "3 rows x 3 columns" in repr(view)
    page = view._repr_html_()
    assert "c0" in page and "g2" in page and "(3, 3)" in page
    with pytest.raises(KeyError):
        view.layers["nope"]
    with pytest.raises(AttributeError):
        view.Nope


def test_a_view_takes_new_layers_in_memory(ds):
    """loompy 3 lets a view hold layers computed from it (view.layers["norm"] = ...); ours raised
    TypeError. Added and deleted in memory only; the shape must be the view's."""
    conn, _, _ = ds
    view = conn.view[2:8, ::2]
    view.layers["double"] = view[:, :] * 2
    view.layers["sparse"] = sp.csr_matrix(view[:, :])
    np.testing.assert_array_equal(view.layers["double"][:, :], view[:, :] * 2)
    np.testing.assert_array_equal(view.layers.sparse[:, :], view[:, :])
    assert "double" not in conn.layers
    with pytest.raises(loompy.LoomValueError, match=r"view: layer 'bad': shape \(2, 2\)"):
        view.layers["bad"] = np.ones((2, 2))
    del view.layers["double"]
    assert "double" not in view.layers
    view.layers["counts"] = "int16"  # (an empty layer of that dtype, as a connection's layers take it)
    assert view.layers["counts"].dtype == np.int16 and not view.layers["counts"][:, :].any()
    assert view.layers["counts"].shape == view.shape
    view.layers["flags"] = "bool"  # (stored as uint8, as in a file)
    assert view.layers["flags"].dtype == np.uint8
    with pytest.raises(loompy.LoomTypeError, match="view: layer 'bad': 'hello' is not a dtype"):
        view.layers["bad"] = "hello"
    with pytest.raises(loompy.LoomValueError, match="view: layer 'bad': dtype |S3 is not allowed"):
        view.layers["bad"] = "S3"


def test_arrays_made_from_a_view_layer_are_copies_unless_asked_not_to_be(ds):
    conn, m, _ = ds
    view = conn.view[:, :]
    copied = np.array(view.layers[""])
    copied[0, 0] = -1
    assert view[0, 0] == m[0, 0]  # (the view's values were changed through the copy)
    as_float = np.array(view.layers["x"], dtype=np.float64)
    assert as_float.dtype == np.float64 and np.array_equal(as_float, m * 2)
    shared = np.asarray(view.layers[""])  # asarray may share the view's memory, as numpy allows
    np.testing.assert_array_equal(shared, m)


def test_view_layers_give_sparse_forms_as_file_layers_do(ds):
    conn, m, _ = ds
    view = conn.view[:, :]
    for source in (conn, view):
        layer = source.layers["x"]
        picked = layer.sparse([3, 1, 3], [5, 0], dtype=np.float64)
        assert picked.dtype == np.float64
        np.testing.assert_array_equal(picked.toarray(), (m * 2)[np.ix_([3, 1, 3], [5, 0])])
        assert layer.sparse().dtype == np.float32
        np.testing.assert_array_equal(layer.as_csc().toarray(), m * 2)
        np.testing.assert_array_equal(source.sparse([0, 2], None, layer="x").toarray(), (m * 2)[[0, 2]])


def test_a_view_layer_permutes_alone_as_loompy3_memory_layers(ds):
    conn, m, _ = ds
    view = conn.view[:, :]
    order = np.random.default_rng(4).permutation(30)
    view.layers["x"].permute(order, axis=1)
    np.testing.assert_array_equal(view.layers["x"][:, :], (m * 2)[:, order])
    np.testing.assert_array_equal(view[:, :], m)  # (the other layers keep their order)
    view.layers[""].permute(np.arange(20)[::-1], axis=0)
    np.testing.assert_array_equal(view[:, :], m[::-1])
    with pytest.raises(loompy.LoomValueError, match="each of its 30 positions once"):
        view.layers["x"].permute([0, 0, 1], axis=1)


def test_a_view_permutes_its_layers_attributes_and_graphs_in_memory(ds):
    conn, m, edges = ds
    view = conn.view[:, :]
    order = np.random.default_rng(5).permutation(30)
    view.permute(order, axis=1)
    np.testing.assert_array_equal(view[:, :], m[:, order])
    np.testing.assert_array_equal(view.layers["x"][:, :], (m * 2)[:, order])
    assert list(view.ca.CellID) == [f"c{i}" for i in order]
    # an edge between cells i and j now joins the positions where they went
    np.testing.assert_array_equal(view.col_graphs["knn"].toarray(), edges.toarray()[np.ix_(order, order)])
    np.testing.assert_array_equal(view.row_graphs["net"].toarray(), np.eye(20))  # the other axis: untouched
    assert list(view.ra.Gene) == [f"g{i}" for i in range(20)]
    rows = np.arange(20)[::-1]
    view.permute(rows, axis=0)
    np.testing.assert_array_equal(view[:, :], m[rows][:, order])
    assert list(view.ra.Gene) == [f"g{i}" for i in rows]
    np.testing.assert_array_equal(conn[:, :], m)  # the file: untouched
    before = view[:, :].copy()
    for bad in ([0] * 20, np.arange(19), np.arange(20) + 1):
        with pytest.raises(loompy.LoomValueError, match="permutation"):
            view.permute(bad, axis=0)
    with pytest.raises(ValueError, match="axis"):
        view.permute(rows, axis=2)
    np.testing.assert_array_equal(view[:, :], before)  # refused before anything moved
