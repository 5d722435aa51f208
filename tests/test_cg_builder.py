"""TFDS builder of CG frames: padding and parking, masks, species map, frame and protein splits."""

import json
import pathlib
import shutil

import cg_run
import h5py
import numpy as np
import pytest

from molgen.cg import data, mdcath
from molgen.core.records import as_str


def _cfg(source, **kw):
    return cg_run.data_config(source, **{"force_map": "sum", **kw})  # residue sums: no map to fit


def _second_domain(src, dst, n_res=20):
    """A real derived file: the first n_res residues of villin, as domain 'villinN'."""
    with h5py.File(src, "r") as f:
        text = mdcath._text(f["villin/pdbProteinAtoms"])
        top = mdcath.parse_topology(text, "villin")
        keep = top.atom_residue < n_res
        atoms = [ln for ln in text.splitlines() if ln.startswith("ATOM")]
        new_text = "\n".join(ln for ln, k in zip(atoms, keep, strict=True) if k)
        per_atom = {k: f[f"villin/{k}"][()][keep] for k in ("chain", "element", "resid", "resname", "z")}
        per_atom = {k: (v.astype(str) if v.dtype.kind == "S" else v) for k, v in per_atom.items()}
        mdcath.write_domain(dst, "villinN", new_text, per_atom)
        run = f["villin/320/0"]
        mdcath.write_replica(
            dst, "villinN", 320, 0, run["coords"][()][:, keep], run["forces"][()][:, keep], run["box"][()]
        )
    return dst


@pytest.fixture
def folder(villin_h5, tmp_path):
    d = tmp_path / "src"
    d.mkdir()
    shutil.copyfile(villin_h5, d / "mdcath_dataset_villin.h5")
    _second_domain(villin_h5, str(d / "mdcath_dataset_villinN.h5"))
    return d


def test_frames_padded_parked_and_split(folder, tmp_path):
    b = data.build(_cfg(folder), str(tmp_path / "tfds"))
    rep = data.report(b)
    assert rep["domains"] == ["villin", "villinN"]
    assert sum(rep["frames"].values()) == 3 + 3 + 3  # villin 2 runs x 3 frames, villinN 1 run x 3
    assert json.loads((pathlib.Path(b.data_dir) / "species.json").read_text())[0] == "ALA"
    src = b.as_data_source()
    exs = [src[s][i] for s in data.SPLITS for i in range(len(src[s]))]
    short = [e for e in exs if e["mask"].sum() == 20]
    assert len(short) == 3 and all(e["positions"].shape == (36, 3) for e in exs)
    pad = short[0]["positions"][20:]
    d = np.linalg.norm(pad[:, None] - pad[None], axis=-1) + np.eye(16) * 1e9
    assert d.min() >= data.PARK_SPACING  # parked beads are far from each other...
    assert np.linalg.norm(pad, axis=-1).min() > 1000  # ...and from the protein
    assert np.all(short[0]["forces"][20:] == 0) and np.all(short[0]["species"][20:] == 0)
    keys = {(as_str(e["domain"]), int(e["temperature"]), int(e["frame"])) for e in exs}
    assert len(keys) == 9  # every frame exactly once across the splits


def test_protein_split_holds_out_a_domain(folder, tmp_path):
    b = data.build(_cfg(folder, split="protein", test_domains=("villinN",)), str(tmp_path / "tfds"))
    src = b.as_data_source()
    assert {as_str(src["test"][i]["domain"]) for i in range(len(src["test"]))} == {"villinN"}
    assert all(as_str(src["train"][i]["domain"]) == "villin" for i in range(len(src["train"])))
    with pytest.raises(ValueError, match="nope"):
        data.build(_cfg(folder, split="protein", test_domains=("nope",)), str(tmp_path / "tfds2"))


def test_nan_frames_skipped_and_counted(folder, tmp_path):
    with h5py.File(folder / "mdcath_dataset_villinN.h5", "a") as f:
        x = f["villinN/320/0/forces"][()]
        x[2, 0, 0] = np.nan
        f["villinN/320/0/forces"][...] = x
    with pytest.raises(mdcath.MdcathError, match="mdcath_dataset_villinN.h5: domain villinN, temperature 320 K"):
        data.build(_cfg(folder), str(tmp_path / "tfds"))
    b = data.build(_cfg(folder, on_nan="skip"), str(tmp_path / "tfds"))
    assert data.report(b)["skipped_frames"] == {"villinN/320/0": [2]}
    assert sum(data.report(b)["frames"].values()) == 8
