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
