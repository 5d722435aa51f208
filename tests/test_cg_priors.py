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
    "angle_wall": {"theta": 2.7, "eps": 0.6},
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
    from molgen.cg.evaluation import paired_gain

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


def _four_beads(theta):
    """Beads 0-3 with bond 3.8 Å, the angle at bead 1 = theta and bead 3 off the 0-1-2 plane."""
    b = 3.8
    x1, x2 = np.zeros(3), np.array([b, 0.0, 0.0])
    x0 = x1 + b * np.array([np.cos(np.pi - theta) * -1.0, np.sin(np.pi - theta), 0.0])
    x3 = x2 + b * np.array([0.3, 0.5, 0.8]) / np.linalg.norm([0.3, 0.5, 0.8])
    return jnp.asarray(np.stack([x0, x1, x2, x3]), jnp.float32)


def test_dihedral_stays_continuous_and_bounded_through_a_collinear_angle():
    """Open the angle at bead 1 through 180 degrees: the damped dihedral energy changes smoothly
    and its forces stay bounded; the undamped series jumps there (what broke NVE)."""
    p = priors.as_jax({**PARAMS, "dihedral": {"k": [2.0, 1.0], "gamma": [0.3, -1.0]}})
    p.pop("angle_wall")
    topo, m = priors.topology(4), jnp.ones(4, bool)
    e = jax.jit(lambda x: priors.term_energies(p, x, m, topo)["dihedral"])
    f = jax.jit(jax.grad(lambda x: priors.term_energies(p, x, m, topo)["dihedral"]))
    thetas = np.deg2rad(np.linspace(150.0, 210.0, 601))  # past 180: the bead swings to the other side
    with jax.debug_nans(True):
        es = np.asarray([e(_four_beads(t)) for t in thetas])
        fs = np.asarray([np.abs(f(_four_beads(t))).max() for t in thetas])
    assert np.all(np.isfinite(es)) and np.all(np.isfinite(fs))
    assert np.abs(np.diff(es)).max() < 0.05 and fs.max() < 20.0
    assert np.all(es[np.abs(np.rad2deg(thetas) - 180.0) < 5.0] == 0.0)  # both sides of collinear: fully damped
    x = _four_beads(np.deg2rad(150.0))  # below the damping window the series is untouched
    phi = geometry.dihedrals(x[None])[0]
    hand = 0.25 * sum(k * (1 + np.cos(n * phi - g)) for n, k, g in ((1, 2.0, 0.3), (2, 1.0, -1.0)))
    np.testing.assert_allclose(es[0], hand, rtol=1e-5)
    series = ((1, 2.0, 0.3), (2, 1.0, -1.0))

    def raw(t):
        phi = geometry.dihedrals(_four_beads(t)[None])[0]
        return 0.25 * sum(k * (1 + np.cos(n * phi - g)) for n, k, g in series)

    assert abs(raw(np.deg2rad(179.9)) - raw(np.deg2rad(180.1))) > 0.5  # the undamped energy jumps


def test_dihedral_damping_and_angle_wall_against_hand_values():
    lo, hi = np.deg2rad(priors.DIHEDRAL_DAMP)
    mid = 0.5 * (lo + hi)
    assert float(priors.dihedral_damping(mid, 1.0)) == pytest.approx(0.5)  # smoothstep(1/2) = 1/2
    t = 0.25
    hand = 1 - (10 * t**3 - 15 * t**4 + 6 * t**5)
    assert float(priors.dihedral_damping(lo + t * (hi - lo), lo)) == pytest.approx(hand)
    assert float(priors.dihedral_damping(hi, 1.0)) == 0.0 and float(priors.dihedral_damping(lo, lo)) == 1.0
    p = priors.as_jax(PARAMS)
    topo, m = priors.topology(4), jnp.ones(4, bool)
    for deg in (150.0, 165.0, 175.0):
        th = np.deg2rad(deg)
        wall = priors.term_energies(p, _four_beads(th), m, topo)["angle_wall"]
        th1 = float(geometry.angles(_four_beads(th)[1:][None])[0])  # the angle at bead 2
        hand = sum(0.6 * ((np.pi - 2.7) / (np.pi - a)) ** 4 for a in (th, th1))
        np.testing.assert_allclose(wall, hand, rtol=1e-4)


def test_fit_puts_the_angle_wall_at_the_tail_quantile(villin_h5):
    runs = list(mdcath.read_cg(villin_h5))
    pos = np.concatenate([r.positions for r in runs])
    params, _, samples = priors.fit(pos, np.ones(pos.shape[:2], bool), temperature=320, bins=20)
    w = params["angle_wall"]
    assert w["theta"] == pytest.approx(np.quantile(samples["angle"], 0.995))
    assert w["eps"] == pytest.approx(priors.KB * 320) and np.rad2deg(w["theta"]) < priors.DIHEDRAL_DAMP[0]
