"""Interfaces of real complexes: reading (gemmi), ligand fragments, interface selection and
cropping, the split by entry, and every kind of bad input named in build_report.json."""

import collections
import gzip
import json
import shutil

import ml_collections
import numpy as np
import pytest
from scipy.spatial.distance import cdist

from molgen.atomica import data as ad
from molgen.chem import complexes as cx
from tests.conftest import ROOT as REPO

PLIP = REPO / "third_party/data/complexes/plip_pdb"
BM5 = REPO / "third_party/data/complexes/bm5_bound"


def _lines(name):
    return gzip.open(PLIP / name, "rt").read().splitlines()


def test_read_entry_blocks_and_fragments():
    mols = cx.read(str(PLIP / "1xdn.pdb.gz"))  # one protein chain, ATP, Mg2+
    assert list(mols["protein"]) == ["A"] and len(mols["ion"]) == 1 and len(mols["ligand"]) == 1
    assert cx.block_name(mols["ion"][0].blocks[0].type) == "Mg"
    atp = mols["ligand"][0]
    names = [cx.block_name(b.type) for b in atp.blocks]
    assert "c1ncc2ncnc2n1" in names  # the adenine ring is one fragment
    assert sum(len(b.elements) for b in atp.blocks) == 31  # every heavy atom in exactly one block
    assert len(atp.bonds) == 33  # ATP's heavy-atom graph: 31 atoms, 3 rings
    prot = mols["protein"]["A"]
    assert all(cx.AA_START <= b.type < cx.NT_START or b.type == cx.UNK for b in prot.blocks)


def test_bm5_files_with_junk_in_the_element_columns_read():
    # 1ACB keeps a serial number in columns 77-80; the element then comes from the atom name
    mols = cx.read(str(BM5 / "1ACB_r_b-matched.pdb.gz"))
    els = np.concatenate([b.elements for m in mols["protein"].values() for b in m.blocks])
    assert set(np.unique(els)) <= {6, 7, 8, 16}


def test_interface_selection_and_crop_match_brute_force():
    mols = cx.read(str(PLIP / "1xdn.pdb.gz"))
    prot, atp = mols["protein"]["A"], mols["ligand"][0]
    ex = ad.interface_item(prot, atp, 8.0, 256, "1xdn")
    xa, xl = prot.x, atp.x
    want = [i for i, b in enumerate(prot.blocks) if cdist(b.x, xl).min() < 8.0]
    assert (ex["block_segment"] == 0).sum() == len(want)
    assert (ex["block_segment"] == 1).sum() == len(atp.blocks)  # every ATP block touches the protein
    np.testing.assert_allclose(
        np.sort(ex["block_dist"][ex["block_segment"] == 0]),
        np.sort([cdist(prot.blocks[i].x, xl).min() for i in want]),
        atol=1e-4,
    )
    assert len(ex["x"]) == len(ex["element"]) == len(ex["atom_block"])
    small = ad.interface_item(prot, atp, 8.0, 20, "1xdn")  # crop: the 20 blocks closest to the partner
    d_all = np.sort(np.concatenate([ex["block_dist"]]))
    assert len(small["block_type"]) == 20
    np.testing.assert_allclose(np.sort(small["block_dist"]), d_all[:20], atol=1e-6)
    assert (np.diff(small["atom_block"]) >= 0).all() and small["bonds"].max() < len(small["x"])
    del xa


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """Real entries, a Docking Benchmark pair, the two shipped bad files, and crafted bad input."""
    src = tmp_path_factory.mktemp("complexes")
    for name in (
        "1xdn.pdb.gz",
        "1vfy.pdb.gz",
        "4yb0.pdb.gz",
        "1tf6.pdb.gz",
        "3o1h.pdb.gz",
        "bad_empty.pdb",
        "bad_non-pdb.pdb",
        "4dst.pdb.gz",
        "4dst_protonated.pdb.gz",
    ):
        shutil.copy(PLIP / name, src / name)
    for name in ("1A2K_r_b-matched.pdb.gz", "1A2K_l_b-matched.pdb.gz"):
        shutil.copy(BM5 / name, src / name)
    lines = _lines("1vfy.pdb.gz")
    i = next(k for k, s in enumerate(lines) if s.startswith("ATOM"))
    _write(src / "9nan.pdb", lines[:i] + [lines[i][:30] + "     nan" + lines[i][38:]] + lines[i + 1 :])
    a, b = lines[i][:16] + "A" + lines[i][17:], lines[i][:16] + "B" + lines[i][17:30] + "%8.3f" % (
        float(lines[i][30:38]) + 1.0) + lines[i][38:]  # fmt: skip
    _write(src / "9alt.pdb", lines[:i] + [a, b] + lines[i + 1 :])
    atoms = [s for s in lines if s.startswith("ATOM")]
    far = [s[:21] + "B" + s[22:30] + "%8.3f" % (float(s[30:38]) + 100.0) + s[38:] for s in atoms]
    _write(src / "9far.pdb", atoms + ["TER"] + far + ["END"])
    (src / "interfaces.csv").write_text("file,chains_a,chains_b\n9far.pdb,A,B\n9far.pdb,A,Z\n")
    return src


def test_build_report_counts_and_names_every_skip(source, tmp_path):
    cfg = ml_collections.ConfigDict(dict(sources=[str(source)], cutoff=8.0, max_blocks=256, fractions=(0.1, 0.15),
                                         seed=0))  # fmt: skip
    b = ad.build(cfg, str(tmp_path))
    rep = ad.report(b)
    reasons = {s["file"].split("/")[-1].split("+")[0]: s["reason"] for s in rep["skipped"]}
    assert "no model" in reasons["bad_empty.pdb"] or "no atoms" in reasons["bad_empty.pdb"]
    assert "bad_non-pdb.pdb" in reasons
    assert "non-finite" in reasons["9nan.pdb"] and "9nan.pdb" in reasons["9nan.pdb"]
    assert "another file of entry 4dst" in reasons["4dst_protonated.pdb.gz"]
    far = [s["reason"] for s in rep["skipped"] if s["file"].endswith("9far.pdb")]
    assert any("chain 'Z' is not in the file" in r for r in far)
    assert any("no interface within 8 Å" in r for r in far)
    assert "9alt.pdb" not in reasons  # altlocs: the first conformer is read
    table = rep["interfaces"]
    total = collections.Counter()
    for s in ad.SPLITS:
        total.update(table[s])
        assert len(b.as_data_source(s)) == sum(table[s].values())
    assert all(total[m] > 0 for m in ad.MODALITIES), total
    assert all(table["test"][m] > 0 for m in ad.MODALITIES), table["test"]
    entries = {s: set(rep["entries"][s]) for s in ad.SPLITS}
    assert not (entries["train"] & entries["test"]) and not (entries["validation"] & entries["test"])
    ex = b.as_data_source("test")[0]
    assert np.asarray(ex["x"]).shape[1] == 3 and np.isfinite(ex["x"]).all()
    assert np.asarray(ex["atom_block"]).max() == len(ex["block_type"]) - 1
    json.dumps(rep)
