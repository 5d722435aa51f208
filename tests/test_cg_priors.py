"""Priors: safe ops, NaN safety with padded beads, forces vs finite differences, invariance, fit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from molgen.cg import data, geometry, mdcath, priors

PARAMS = {
    "bond": {"kr": 60.0, "r0": 3.8},
    "angle": {"a": [0.5, -0.3, 0.1], "b": [0.2, 0.1, -0.05]},
    "dihedral": {"k": [0.4, 0.2], "gamma": [0.3, -1.0]},
    "repulsive": {"sigma": 4.5, "eps": 0.6},
    "excluded": {"sigma": [4.5, 4.8, 5.0, 5.2], "eps": 0.6},
}


def _chain(n=12, n_max=16, seed=0):
    """A random-walk chain of n beads 3.8 Å apart, padded to n_max with parked beads."""
    rng = np.random.default_rng(seed)
    steps = rng.normal(size=(n - 1, 3))
    steps = 3.8 * steps / np.linalg.norm(steps, axis=-1, keepdims=True)
    x = np.concatenate([np.zeros((1, 3)), np.cumsum(steps, 0)])
    ex = data.pad_frame(np.zeros(n, np.int32), x.astype(np.float32), np.zeros((n, 3), np.float32), n_max)
    return jnp.asarray(ex["positions"]), jnp.asarray(ex["mask"])


def test_safe_ops_have_finite_gradients_at_zero():
    assert jnp.all(jax.grad(lambda x: geometry.safe_norm(x))(jnp.zeros(3)) == 0)
    gy, gx = jax.grad(geometry.safe_atan2, argnums=(0, 1))(0.0, 0.0)
    assert np.isfinite(gy) and np.isfinite(gx)
    x = jnp.array([3.0, 4.0, 0.0])
    np.testing.assert_allclose(jax.grad(geometry.safe_norm)(x), x / 5.0, rtol=1e-6)


def test_no_nan_with_padded_beads_coincident_and_zero_length_bond():
    x, m = _chain()
    x = x.at[14].set(x[13])  # two padded beads at the same position
    x = x.at[3].set(x[2])  # a zero-length bond between real beads
    topo, p = priors.topology(16), priors.as_jax(PARAMS)
    with jax.debug_nans(True):
        e = priors.energy(p, x, m, topo)
        f = -jax.grad(priors.energy, argnums=1)(p, x, m, topo)
        gp = jax.grad(priors.energy)(p, x, m, topo)
    assert np.isfinite(e) and np.all(np.isfinite(f))
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(gp))
    assert np.all(f[12:] == 0)  # padded beads feel nothing


def test_forces_match_finite_differences():
    with jax.enable_x64(True):
        x, m = _chain()
        x = x.astype(jnp.float64)
        topo, p = priors.topology(16), priors.as_jax(PARAMS, jnp.float64)
        e = jax.jit(lambda y: priors.energy(p, y, m, topo))  # one compile, 20 fast calls
        f = -jax.grad(e)(x)
        h, rng = 1e-5, np.random.default_rng(1)
        for _ in range(10):
            i, k = rng.integers(0, 12), rng.integers(0, 3)
            fd = -(e(x.at[i, k].add(h)) - e(x.at[i, k].add(-h))) / (2 * h)
            np.testing.assert_allclose(f[i, k], fd, rtol=1e-6, atol=1e-8)


def test_energy_invariant_under_rotation_and_translation():
    x, m = _chain()
    topo, p = priors.topology(16), priors.as_jax(PARAMS)
    q, _ = np.linalg.qr(np.random.default_rng(3).normal(size=(3, 3)))
    q = q * np.sign(np.linalg.det(q))  # proper rotation
    y = x @ jnp.asarray(q.T, jnp.float32) + jnp.array([1.0, -2.0, 3.0])
    terms_x, terms_y = priors.term_energies(p, x, m, topo), priors.term_energies(p, y, m, topo)
    for k in terms_x:
        np.testing.assert_allclose(terms_x[k], terms_y[k], rtol=2e-4, atol=1e-3)


def test_harmonic_fit_recovers_the_potential():
    kT, kr, r0 = priors.KB * 320, 50.0, 3.8
    rng = np.random.default_rng(0)  # sample p(r) ~ r^2 exp(-kr (r - r0)^2 / 2kT) by rejection
    r = rng.normal(r0, np.sqrt(kT / kr), size=400_000)
    keep = rng.uniform(size=r.size) < (r / (r0 + 1.0)) ** 2
    fit, _ = priors.fit_harmonic(r[keep], kT)
    assert fit["kr"] == pytest.approx(kr, rel=0.05) and fit["r0"] == pytest.approx(r0, abs=0.01)


def test_fit_on_villin_frames(villin_h5, tmp_path):
    runs = list(mdcath.read_cg(villin_h5))
    frames = [data.pad_frame(r.species, r.positions[i], r.forces[i], 40) for r in runs for i in range(len(r.positions))]
    pos = np.stack([f["positions"] for f in frames])
    mask = np.stack([f["mask"] for f in frames])
    params, curves, samples = priors.fit(pos, mask, temperature=320, bins=20)
    assert 3.7 < params["bond"]["r0"] < 3.95 and params["bond"]["kr"] > 0
    assert 3.0 < params["repulsive"]["sigma"] < 8.0 and all(s > 3.0 for s in params["excluded"]["sigma"])
    priors.save(params, str(tmp_path / "priors.json"))
    priors.plot(params, curves, samples, 320, str(tmp_path / "priors.png"))
    p = priors.as_jax(priors.load(str(tmp_path / "priors.json")))
    e = jax.vmap(lambda x, m: priors.energy(p, x, m, priors.topology(40)))(jnp.asarray(pos), jnp.asarray(mask))
    assert np.all(np.isfinite(e)) and (tmp_path / "priors.png").stat().st_size > 10_000


def test_paired_gain_against_hand_values():
    from molgen.cg.train import paired_gain

    ref = np.zeros((3, 2, 3))
    mask = np.asarray([[True, True], [True, False], [True, True]])
    model = np.ones((3, 2, 3))  # per-frame MSE 1
    prior = np.stack([np.full((2, 3), 2.0), np.full((2, 3), 3.0), np.full((2, 3), 1.0)])  # 4, 9, 1
    prior[1, 1] = 100.0  # a padded bead: ignored
    g = paired_gain(model, prior, ref, mask)
    d = np.asarray([3.0, 8.0, 0.0])
    assert g["mean"] == pytest.approx(d.mean())
    assert g["se"] == pytest.approx(d.std(ddof=1) / np.sqrt(3))
    assert g["frames_better"] == pytest.approx(2 / 3)
