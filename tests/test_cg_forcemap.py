"""Optimised force maps: validity (CA identity, tied constraint groups), the least-squares
solution against an independent solve, and the builder's optimised-map datasets."""

import json
import pathlib

import cg_run
import h5py
import ml_collections
import numpy as np
import pytest

from molgen.cg import data, forcemap, mdcath


def _villin(path):
    """Topology, elements, first coordinates and all frames' all-atom forces of a villin file."""
    runs = list(mdcath.read_runs(path))
    r = runs[0]
    return r.topology, mdcath.atom_elements(r.pdb_text), r.coords[0], np.concatenate([x.forces for x in runs])


def test_constraint_groups_join_each_hydrogen_to_its_heavy_atom(villin_h5):
    top, el, x0, _ = _villin(villin_h5)
    g = forcemap.constraint_groups(el, x0)
    assert set(el) == {"C", "N", "O", "S", "H"}
    assert g.max() + 1 == int((el != "H").sum())  # one group per heavy atom
    h = np.flatnonzero(el == "H")
    assert np.all(top.atom_residue[h] == top.atom_residue[np.flatnonzero(el != "H")[g[h]]])  # same residue
    parent = np.flatnonzero(el != "H")[g[h]]
    assert np.linalg.norm(x0[h] - x0[parent], axis=-1).max() < 1.15  # X-H bonds
    far = x0.copy()
    far[h[0]] += 5.0
    with pytest.raises(mdcath.MdcathError, match=f"villin: hydrogen atom #{h[0]}"):
        forcemap.constraint_groups(el, far, "villin: ")


def test_optimised_map_is_valid_and_solves_the_least_squares_problem(villin_h5):
    top, el, x0, forces = _villin(villin_h5)
    g = forcemap.constraint_groups(el, x0)
    w = forcemap.fit(top, g, forces, window=0, ridge=0.0)
    forcemap.check(w, top, g)
    forcemap.check(forcemap.residue_sum(top), top, g)  # the residue sum is valid too
    # bead 5, own residue only: min |phi_own + A g_free| over the 6 frames x 3 components by lstsq
    phi = forcemap.group_forces(g, forces)
    res = np.zeros(g.max() + 1, np.int64)
    res[g] = top.atom_residue
    own = g[top.ca_index[5]]
    free = [k for k in np.flatnonzero(res == 5) if k != own]
    a = phi[:, free].transpose(0, 2, 1).reshape(-1, len(free))
    sol = -np.linalg.lstsq(a, phi[:, own].reshape(-1), rcond=None)[0]
    np.testing.assert_allclose(w[5, np.flatnonzero(el != "H")[free]], sol, rtol=1e-6, atol=1e-8)
    assert np.all(w[5, top.atom_residue != 5] == 0)
    # never noisier than the residue sum on the fitting frames
    assert forcemap.mean_square(w, forces) <= forcemap.mean_square(forcemap.residue_sum(top), forces)
    bad = w.copy()
    bad[3, top.ca_index[4]] = 0.1
    with pytest.raises(mdcath.MdcathError, match="villin: force map is not valid: CA weights"):
        forcemap.check(bad, top, g, "villin: ")
    bad = w.copy()
    bad[3, np.flatnonzero(el == "H")[0]] += 0.5
    with pytest.raises(mdcath.MdcathError, match="constraint groups differ by 0.5"):
        forcemap.check(bad, top, g)


def test_builder_maps_every_frame_with_the_map_fitted_on_train_frames(cg_source, tmp_path):
    cfg = cg_run.data_config(cg_source, force_map="optimized")
    b = data.build(cfg, str(tmp_path / "tfds"))
    rep = data.report(b)
    fm = rep["force_map"]["domains"]["villin"]
    assert fm["fit_frames"] == rep["frames"]["train"] and fm["validation_frames"] == rep["frames"]["validation"]
    assert fm["mean_square_optimized_fit"] < fm["mean_square_sum_fit"]
    (w,) = data.force_maps(b).values()
    path = str(cg_source / "mdcath_dataset_villin.h5")
    top, el, x0, _ = _villin(path)
    forcemap.check(w, top, forcemap.constraint_groups(el, x0))
    ex = b.as_data_source()["test"][0]
    with h5py.File(path, "r") as f:
        raw = f[f"villin/{int(ex['temperature'])}/{int(ex['replica'])}/forces"][int(ex["frame"])]
    np.testing.assert_allclose(ex["forces"], w @ raw, rtol=1e-4, atol=1e-3)
    sums = data.build(ml_collections.ConfigDict({**cfg.to_dict(), "force_map": "sum"}), str(tmp_path / "tfds"))
    assert sums.data_dir != b.data_dir and data.force_maps(sums) == {}
    assert json.loads((pathlib.Path(sums.data_dir) / "build_report.json").read_text())["force_map"] == "sum"
    with pytest.raises(ValueError, match="data.force_map must be 'sum', 'optimized' or 'stored', got 'best'"):
        data.build(ml_collections.ConfigDict({**cfg.to_dict(), "force_map": "best"}), str(tmp_path / "tfds"))
