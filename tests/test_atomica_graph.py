"""Interface graphs (k-NN at atom and block level, padding, capacity) and ATOMICA's noise
(IGSO(3), torsions, masking), each against a brute-force or closed-form reference."""

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from molgen.atomica import data as ad
from molgen.atomica import graph as gr
from molgen.atomica import noise
from molgen.chem import complexes as cx
from tests.conftest import ROOT

PLIP = ROOT / "third_party/data/complexes/plip_pdb"


@pytest.fixture(scope="module")
def record():
    mols = cx.read(str(PLIP / "1xdn.pdb.gz"))  # protein against ATP
    return ad.interface_item(mols["protein"]["A"], mols["ligand"][0], 8.0, 256, "1xdn")


def test_knn_graphs_and_block_distances_match_brute_force(record):
    g = gr.build(gr.with_globals(record))
    x, ab, bseg, glob = g["x"], g["atom_block"], g["block_segment"], g["block_global"]
    assert glob.sum() == 2 and g["block_type"][0] == cx.GLB and np.isclose(x[0], x[ab == 1].mean(0) * 0 + x[
        (bseg[ab] == 0) & ~glob[ab]].mean(0)).all()  # fmt: skip
    aseg, normal = bseg[ab], ~glob[ab]
    d = cdist(x, x)
    for i in np.flatnonzero(normal)[::7]:
        for s in (0, 1):
            cand = np.flatnonzero(normal & (aseg == s) & (np.arange(len(x)) != i))
            want = set(cand[np.argsort(d[i, cand], kind="stable")[: gr.K]])
            got = set(g["atom_src"][(g["atom_dst"] == i) & (aseg[g["atom_src"]] == s)])
            assert got == want
            assert set(g["atom_etype"][(g["atom_dst"] == i) & (aseg[g["atom_src"]] == s)]) == {int(s != aseg[i])}
    assert not np.isin(g["atom_dst"], np.flatnonzero(~normal)).any()  # global atoms get no atom edges
    nb = len(bseg)
    bd = np.array([[cdist(x[ab == p], x[ab == q]).min() for q in range(nb)] for p in range(nb)])
    for q in np.flatnonzero(~glob):
        for s in (0, 1):
            cand = np.flatnonzero(~glob & (bseg == s) & (np.arange(nb) != q))
            want = cand[np.argsort(bd[q, cand], kind="stable")[: gr.K]]
            sel = (g["block_dst"] == q) & (bseg[g["block_src"]] == s) & (g["block_etype"] < gr.GLOBAL_NORMAL)
            assert set(g["block_src"][sel]) == set(want)
            np.testing.assert_allclose(np.sort(g["block_edist"][sel]), np.sort(bd[q, want]), atol=1e-5)
    t = g["block_etype"]
    assert (t == gr.GLOBAL_GLOBAL).sum() == 2 and (t == gr.GLOBAL_NORMAL).sum() == 2 * (~glob).sum()
    np.testing.assert_allclose(g["block_x"][3], x[ab == 3].mean(0), atol=1e-5)


def test_collate_offsets_padding_and_overflow(record):
    gs = [gr.build(gr.with_globals(record)), gr.build(gr.with_globals(noise.corrupt(record, np.random.default_rng(0))))]
    cap = gr.Capacity(graphs=2)
    with pytest.raises(gr.CapacityOverflow, match="atoms needs"):
        gr.collate(gs, cap)
    assert cap.fit(gr.sizes(gs)) and not cap.fit(gr.sizes(gs))  # grows once, then fits
    b = gr.collate(gs, cap)
    n0 = len(gs[0]["x"])
    assert b["atom_mask"].sum() == n0 + len(gs[1]["x"]) and b["x"].shape[0] == cap.atoms
    np.testing.assert_array_equal(b["atom_src"][: len(gs[0]["atom_src"])], gs[0]["atom_src"])
    k = len(gs[0]["atom_src"])
    np.testing.assert_array_equal(b["atom_src"][k : k + len(gs[1]["atom_src"])], gs[1]["atom_src"] + n0)
    assert (b["atom_src"][~b["atom_edge_mask"]] == cap.atoms - 1).all()  # padding edges stay in padding
    assert (b["atom_graph"][b["atom_mask"]] == np.repeat([0, 1], [n0, len(gs[1]["x"])])).all()
    assert not b["atom_mask"][b["atom_block"] == cap.blocks - 1].any()


def test_igso3_sampler_matches_its_density():
    rng = np.random.default_rng(0)
    angles = []
    for _ in range(4000):
        r, _ = noise.sample_rotation(rng)
        angles.append(np.arccos(np.clip((np.trace(r) - 1) / 2, -1, 1)))
    angles = np.asarray(angles)
    assert angles.max() <= noise.ROT_MAX + 1e-9
    edges = np.linspace(0, noise.ROT_MAX, 11)
    hist = np.histogram(angles, edges)[0] / len(angles)
    grid = np.linspace(1e-3, noise.ROT_MAX, 4001)
    dens = noise.igso3_density(grid)
    want = [np.trapezoid(dens[(grid >= a) & (grid <= b)], grid[(grid >= a) & (grid <= b)]) for a, b in
            zip(edges[:-1], edges[1:], strict=True)]  # fmt: skip
    np.testing.assert_allclose(hist, want, atol=0.015)  # binomial SE of a bin <= 0.008
    # score: d/dtheta log p by finite differences of the density
    th, h = 0.3, 1e-4
    fd = (np.log(noise.igso3_density(th + h)) - np.log(noise.igso3_density(th - h))) / (2 * h)
    _, _, score = noise.igso3_table()
    np.testing.assert_allclose(np.interp(th, noise.igso3_table()[0], score), fd, rtol=1e-3)


def test_wrapped_normal_score_is_the_log_density_gradient():
    def logp(d):
        return np.log(sum(np.exp(-((d + 2 * np.pi * k) ** 2) / (2 * noise.TOR_SIGMA**2)) for k in range(-10, 11)))

    for d in (-3.0, -0.4, 0.0, 0.7, 3.1):
        fd = (logp(d + 1e-5) - logp(d - 1e-5)) / 2e-5
        np.testing.assert_allclose(noise.wrapped_normal_score(d), fd, rtol=1e-5, atol=1e-6)


def test_torsion_noise_keeps_bonds_and_moves_one_side(record):
    for seg in (0, 1):  # protein side chains, then ATP
        tors = noise.segment_torsions(record, seg)
        assert tors
        x = np.asarray(record["x"], np.float64)
        bonds = np.asarray(record["bonds"])
        for u, v, moving in tors[:20]:
            y = noise.turn(x, u, v, moving, 1.0)
            np.testing.assert_allclose(np.linalg.norm(y[bonds[:, 0]] - y[bonds[:, 1]], axis=1),
                                       np.linalg.norm(x[bonds[:, 0]] - x[bonds[:, 1]], axis=1), atol=1e-9)  # fmt: skip
            np.testing.assert_array_equal(y[~moving], x[~moving])
            assert np.abs(y[moving] - x[moving]).max() > 0.1 and not moving[u] and moving[v]
            if seg == 0:  # side chains: the backbone never moves
                bb = np.isin(record["position"], list(noise.BACKBONE_POS))
                assert not (moving & bb).any()


def test_corrupt_targets_and_masking(record):
    rng = np.random.default_rng(3)
    c = noise.corrupt(record, rng)
    nb = len(record["block_type"])
    masked = c["mask_target"] >= 0
    assert masked.sum() == max(1, round(0.1 * nb))
    np.testing.assert_array_equal(c["mask_target"][masked], record["block_type"][masked])
    assert (c["block_type"][masked] == cx.MASK).all()
    for b in np.flatnonzero(masked):  # one mask atom at the block's centroid
        atoms = c["atom_block"] == b
        assert atoms.sum() == 1 and c["element"][atoms][0] == cx.MASK_ATOM
    assert 0.1 <= c["tr_eps"] <= 1.0 and c["rot_ok"] == 1.0
    u, v = c["tor_bonds"].T
    assert len(u) and (np.linalg.norm(c["x"][u] - c["x"][v], axis=1) < 2.0).all()
    assert len(c["tor_score"]) == len(u)


def test_capacity_ladder_picks_the_smallest_level_that_holds_the_batch(record):
    g = gr.build(gr.with_globals(record))
    base = gr.base_capacity([g], rows=2, margin=1.0)
    assert base.graphs == 2 and base.atoms >= 2 * len(g["x"]) and base.atoms % 64 == 0
    ladder = gr.Ladder(base)
    assert ladder.pick(gr.sizes([g, g])) == ladder.level(0)  # two graphs like the sample fit level 0
    big = gr.sizes([g, g])
    big["atoms"] = 3 * base.atoms  # a batch beyond level 1: level 2 (x4), never a truncation
    cap = ladder.pick(big)
    assert cap == ladder.level(2) and cap.atoms == 4 * base.atoms and cap.atom_edges == 4 * base.atom_edges
    assert ladder.used == {0, 2}
    b = gr.collate([g, g], ladder.pick(gr.sizes([g, g])))
    assert b["x"].shape == (base.atoms, 3)
