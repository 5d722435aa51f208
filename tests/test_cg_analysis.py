"""CG landscape analysis against hand values: end-to-end distance, block averages, core-to-core
transitions and TICA on processes with known relaxation."""

import numpy as np
import pytest

from molgen.cg import analysis


def test_end_to_end_and_pair_distances():
    x = np.zeros((2, 4, 3))
    x[:, :, 0] = np.arange(4)  # a straight chain, 1 Å apart
    x[1, 3, 0] = 5.0
    np.testing.assert_allclose(analysis.end_to_end(x), [3.0, 5.0])
    d = analysis.pair_distances(x, min_sep=2)  # pairs (0,2), (0,3), (1,3)
    np.testing.assert_allclose(d, [[2, 3, 2], [2, 5, 4]])


def test_block_average_by_hand():
    x = np.array([1.0, 1.0, 3.0, 3.0, 5.0, 5.0, 7.0])  # 3 blocks of 2 (the 7th frame dropped)
    mean, se = analysis.block_average(x, 3)
    assert mean == pytest.approx(3.0) and se == pytest.approx(2.0 / np.sqrt(3))  # std of 1, 3, 5 is 2
    with pytest.raises(ValueError, match="cannot make"):
        analysis.block_average(x, 10)


def test_transitions_count_core_to_core_only():
    rmsd = [0.5, 0.8, 2.0, 0.7, 2.5, 4.5, 3.0, 0.6, 5.0, 0.4]
    # folded core < 1, unfolded core > 4: 2.0 and 2.5 and 3.0 keep the last core; events:
    # folded -> unfolded at 4.5, -> folded at 0.6, -> unfolded at 5.0, -> folded at 0.4
    assert analysis.transitions(rmsd, 1.0, 4.0) == {"folding": 2, "unfolding": 2, "last": "folded"}
    with pytest.raises(ValueError):
        analysis.transitions(rmsd, 4.0, 1.0)


def test_tica_recovers_the_slow_process():
    """Two AR(1) processes (correlation 0.99 and 0.5 per frame) mixed by a rotation: TICA at lag
    5 finds eigenvalues 0.99^5 and 0.5^5, and its slow coordinate is the slow process."""
    rng = np.random.default_rng(0)
    trajs, slow = [], []
    for _ in range(4):
        z = np.zeros((20000, 2))
        for t in range(1, len(z)):
            z[t] = [0.99, 0.5] * z[t - 1] + rng.normal(size=2) * np.sqrt([1 - 0.99**2, 1 - 0.5**2])
        rot = np.array([[np.cos(0.7), -np.sin(0.7)], [np.sin(0.7), np.cos(0.7)]])
        trajs.append(z @ rot.T + [3.0, -1.0])
        slow.append(z[:, 0])
    m = analysis.tica(trajs, lag=5, dim=2)
    np.testing.assert_allclose(m["eigenvalues"], [0.99**5, 0.5**5], atol=0.02)
    assert m["timescales"][0] == pytest.approx(-5 / np.log(0.99**5), rel=0.15)  # 99.5 frames
    proj = analysis.tica_project(np.concatenate(trajs), m)[:, 0]
    assert abs(np.corrcoef(proj, np.concatenate(slow))[0, 1]) > 0.99
    with pytest.raises(ValueError, match="longer than the lag"):
        analysis.tica([trajs[0][:3]], lag=5)


def test_landscape_states_by_hand():
    from molgen.cg import landscape

    # two trajectories of 4 frames, folded below 1 Å, unfolded above 3 Å
    a = {"rmsd": np.array([0.5, 0.5, 4.0, 4.0])}  # folded half the time, one unfolding
    b = {"rmsd": np.array([4.0, 2.0, 0.5, 0.5])}  # one folding
    st = landscape.states([a, b], 1.0, 3.0, n_blocks=2, frame_ps=1.0)
    assert st["folded_fraction"] == pytest.approx(0.5) and (st["folding"], st["unfolding"]) == (1, 1)
    # 2 trajectories < 2 blocks? no: len(obs)=2 is not < n_blocks=2, so each trajectory is one block
    assert st["blocks"] == 2 and st["folded_fraction_se"] == pytest.approx(0.0)
    st = landscape.states([a], 1.0, 3.0, n_blocks=2)
    assert st["blocks"] == 2 and st["folded_fraction_se"] == pytest.approx(np.std([1.0, 0.0], ddof=1) / np.sqrt(2))
    assert st["trajectories"][0] == {"frames": 4, "folded_fraction": 0.5, "folding": 0, "unfolding": 1,
                                      "last": "unfolded"}  # fmt: skip


def test_landscape_overlaps_and_plots(tmp_path):
    from molgen.cg import landscape

    rng = np.random.default_rng(0)

    def obs(shift, n=4000):
        r = rng.normal(2 + shift, 0.5, n)
        return {"rmsd": r, "e2e": rng.normal(10 + shift, 1, n), "q": rng.uniform(0, 1, n), "rg": r,
                "tica": rng.normal(shift, 1, (n, 2))}  # fmt: skip

    named = {"all-atom": obs(0.0), "same": obs(0.0), "shifted": obs(3.0)}
    s = landscape.compare(named, 340.0, 20, str(tmp_path))
    assert s["same"]["overlap_rmsd"] > 0.9 and s["same"]["overlap_tica"] > 0.75
    assert s["shifted"]["overlap_rmsd"] < 0.05 and s["shifted"]["overlap_e2e"] < 0.3
    assert "all-atom" not in s
    # the reference's halves: the same distribution overlaps well, a shifted half does not
    h = landscape.compare(named, 340.0, 20, str(tmp_path), halves={"all-atom": (obs(0.0), obs(0.0)),
                                                                  "shifted": (obs(0.0), obs(3.0))})  # fmt: skip
    assert h["all-atom"]["halves_overlap_rmsd"] > 0.9 and h["shifted"]["halves_overlap_rmsd"] < 0.05
    assert h["shifted"]["overlap_rmsd"] < 0.05 and "halves_overlap_rmsd" not in h["same"]
    for f in ("fes_1d.png", "fes_2d_rmsd_q.png", "fes_2d_tica.png"):
        assert (tmp_path / f).stat().st_size > 10_000
    folded, unfolded = np.zeros((3, 3)), np.ones((3, 3))
    trajs = [np.stack([folded, unfolded]), np.stack([unfolded, folded])]
    o = [{"rmsd": np.array([0.2, 5.0])}, {"rmsd": np.array([5.0, 0.2])}]
    got = landscape.starts(folded, trajs, o, 4, 3.0)
    assert [g is folded for g in got] == [True, False, True, False]
    np.testing.assert_array_equal(got[1], unfolded)
    # unfolded starts are spread over all unfolded frames of all replicas
    ramp = [np.stack([folded, *(unfolded * k for k in (2, 3, 4))]), np.stack([unfolded * 5, unfolded * 6])]
    o = [{"rmsd": np.array([0.2, 5.0, 5.0, 5.0])}, {"rmsd": np.array([5.0, 5.0])}]
    got = landscape.starts(folded, ramp, o, 6, 3.0)
    assert [float(g[0, 0]) for g in got] == [0, 2, 0, 4, 0, 6]
    assert all(g is folded for g in landscape.starts(folded, ramp[:1], o[:1], 3, 9.0))


def test_blown_up_copies_are_cut_and_reported():
    from molgen.cg import landscape

    good = np.zeros((5, 3, 3))
    bad = good.copy()
    bad[3:, 1, 0] = np.nan
    kept, cut = landscape.finite_part([good, bad], "model")
    assert [len(k) for k in kept] == [5, 3] and cut == [{"copy": 1, "frame": 3}]
    with pytest.raises(FloatingPointError, match="model: every copy was non-finite"):
        landscape.finite_part([np.full((2, 3, 3), np.nan)], "model")
