"""Binding-site head pieces: patches that cover every residue, re-indexing, the labels and
solvent accessibility of a real protein, and the bootstrap metrics."""

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from molgen.atomica import graph as gr
from molgen.atomica import heads, sites
from molgen.chem import complexes as cx
from tests.conftest import ROOT

BM5 = ROOT / "third_party/data/complexes/bm5_bound"


@pytest.fixture(scope="module")
def site():
    r, lg = (cx.read(str(BM5 / f"1A2K_{s}_b-matched.pdb.gz")) for s in ("r", "l"))
    a = cx.merge(list(r["protein"].values()), "protein", "r")
    b = cx.merge(list(lg["protein"].values()), "protein", "l")
    return sites.site_item(a, b.x, 5.0), a, b


def test_labels_and_rsa_of_a_real_interface(site):
    ex, a, b = site
    want = [int(cdist(bl.x, b.x).min() < 5.0) for bl in a.blocks]
    np.testing.assert_array_equal(ex["label"], want)
    assert 0 < ex["label"].mean() < 0.3
    rsa = ex["rsa"]
    assert rsa.shape == (len(a.blocks),) and 0 <= rsa.min() and rsa.max() <= 1.5
    assert rsa[ex["label"] == 1].mean() > rsa[ex["label"] == 0].mean()  # interface residues are exposed


def test_patches_cover_every_residue_and_keep_labels(site):
    ex = site[0]
    pats = heads.cover(ex, 32)
    covered = np.zeros(len(ex["block_type"]), bool)
    for centre, blocks in pats:
        assert len(blocks) == 32 and centre in blocks
        covered[blocks] = True
        sub = heads.patch(ex, blocks)
        np.testing.assert_array_equal(sub["label"], ex["label"][np.sort(blocks)])
        assert sub["atom_block"].max() == 31 and (sub["bonds"] < len(sub["x"])).all()
        g = gr.build(gr.with_globals(sub))  # one segment: one global block
        assert g["block_global"].sum() == 1 and (g["label"][g["block_global"]] == -1).all()
    assert covered.all()


def test_site_metrics_hand_cases():
    labels = [np.array([0, 1, 0, 1]), np.array([0, 0, 1]), np.array([1, 0])]
    perfect = [y.astype(float) for y in labels]
    flipped = [1.0 - y for y in labels]
    m = heads.site_metrics(labels, {"perfect": perfect, "flipped": flipped}, n_boot=50)
    assert m["perfect"]["auroc"] == 1.0 and m["flipped"]["auroc"] == 0.0
    assert m["perfect_minus_flipped"]["auroc"] == 1.0 and m["perfect_minus_flipped"]["ci"][0] == 1.0
    assert m["residues"] == 9 and m["positives"] == 4 and m["proteins"] == 3
    x = heads.residue_features({"block_type": np.array([cx.AA_START, cx.UNK]), "rsa": np.array([0.2, 0.9])})
    assert x.shape == (2, 22) and x[0, 0] == 1 and x[1, 20] == 1 and x[1, 21] == pytest.approx(0.9)


def test_embed_cli_names_a_bad_split(tmp_path):
    from molgen.atomica import embed

    with pytest.raises(SystemExit, match="splits \\['tset'\\] must be a non-empty subset"):
        embed.main([f"--workdir={tmp_path}", f"--out={tmp_path / 'e'}", "--splits=tset"])
