"""CSP (molgen.crystal.csp): species assignment, exact compositions, and the match metrics."""

import numpy as np
import pytest

from configs import crystal as crystal_cfg
from molgen.chem import crystal as xtal
from molgen.crystal import common, csp, diffusion, train_ldm
from tests.test_crystal import _cscl_nacl, nacl


def test_assign_species_maximises_the_decoder_likelihood():
    lp = np.full((3, 100), -10.0)
    lp[0, 22 - 1], lp[1, 8 - 1], lp[2, 8 - 1] = -0.1, -0.2, -0.3  # site 0 looks like Ti, sites 1-2 like O
    lp[0, 8 - 1] = -0.5
    np.testing.assert_array_equal(csp.assign_species(lp, [8, 8, 22]), [22, 8, 8])
    np.testing.assert_array_equal(csp.assign_species(lp, [8, 22, 8]), [22, 8, 8])


def _random_sampler(n_max: int = 6):
    """A composition-conditioned sampler over freshly initialised VAE and DiT parameters."""
    vcfg, lcfg = crystal_cfg.vae("perov", "tiny"), crystal_cfg.csp("perov", "tiny")
    vmodel = common.make_vae(vcfg.model, n_max)
    vparams = common.init_vae(vmodel, 0, common.example_batch(n_max))
    dit = train_ldm.make_dit(lcfg, vcfg.model.latent, n_max)
    sched = diffusion.Schedule.linear(100)
    return train_ldm.Sampler(dit, train_ldm.init_dit(dit, 0), sched, vmodel, vparams, 1.0, [0] * n_max + [1])


def test_every_csp_sample_has_exactly_the_requested_composition():
    comps = [[38, 22, 8, 8, 8], [11, 17], [26, 26, 8, 8, 8, 8]]
    preds = csp.predict(_random_sampler(), comps, k=3, seed=0, steps=3, batch=4)
    assert [len(p) for p in preds] == [3, 3, 3]
    made = 0
    for comp, ps in zip(comps, preds, strict=True):
        for c in ps:
            if c is not None:
                made += 1
                assert sorted(c.species.tolist()) == sorted(comp) and len(c.frac) == len(comp)
    assert made > 0
    with pytest.raises(ValueError, match="1-6"):
        csp.predict(_random_sampler(), [[8] * 7], k=1, seed=0, steps=2)


def test_match_rate_and_rmse_at_k1_and_best_of_k():
    shifted = xtal.Crystal(nacl().lattice, nacl().frac + np.asarray([[0, 0, 0], [0.03, 0, 0]]), nacl().species)
    assert 0.01 < xtal.match_rms(shifted, nacl()) < 0.3  # displaced Cl: a match with a non-zero RMSE
    preds = [[_cscl_nacl(), shifted], [nacl(), None], [None, None]]
    res = csp.evaluate(preds, [nacl(), nacl(), nacl()], workers=1)
    assert res["n"] == 3 and res["k"] == 2
    assert res["k1"]["matched"] == 1 and res["k1"]["match_rate"] == pytest.approx(1 / 3)
    assert res["k2"]["matched"] == 2 and res["k2"]["match_rate"] == pytest.approx(2 / 3)
    assert res["k1"]["rmse"] == pytest.approx(0.0, abs=1e-6)  # the exact copy
    assert res["k2"]["rmse"] == pytest.approx(xtal.match_rms(shifted, nacl()) / 2, abs=1e-6)
