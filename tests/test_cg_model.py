"""Allegro + priors: equivariance (e3nn helper), forces = -grad E, NaN safety, neighbour overflow."""

import e3nn_jax as e3nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from molgen.cg import allegro, data, energy, neighbors, priors, train

PRIORS = {
    "bond": {"kr": 60.0, "r0": 3.8},
    "angle": {"a": [0.5, -0.3], "b": [0.2, 0.1]},
    "dihedral": {"k": [0.4, 0.2], "gamma": [0.3, -1.0]},
    "repulsive": {"sigma": 4.5, "eps": 0.6},
    "excluded": {"sigma": [4.5, 4.8, 5.0, 5.2], "eps": 0.6},
}
NET = allegro.Allegro(n_layers=2, latent=16, channels=4, embed=4, n_basis=8, cutoff=10.0)


def _frame(n=12, n_max=16, seed=0):
    rng = np.random.default_rng(seed)
    steps = rng.normal(size=(n - 1, 3))
    x = np.concatenate([np.zeros((1, 3)), np.cumsum(3.8 * steps / np.linalg.norm(steps, axis=-1, keepdims=True), 0)])
    ex = data.pad_frame(
        rng.integers(0, 20, n).astype(np.int32), x.astype(np.float32), np.zeros((n, 3), np.float32), n_max
    )
    return jnp.asarray(ex["positions"]), jnp.asarray(ex["species"]), jnp.asarray(ex["mask"])


def _energy_fn(params, spc, mask, n_max, dtype=jnp.float32):
    """Total energy of positions, with the neighbour list rebuilt from them (all pairs here)."""
    topo = priors.topology(n_max)
    p = priors.as_jax(PRIORS, dtype)
    pairs = np.stack(np.nonzero(~np.eye(n_max, dtype=bool)))  # all directed pairs; the cutoff is inside Allegro

    def energy(x):
        c, n, v = jnp.asarray(pairs[0]), jnp.asarray(pairs[1]), mask[pairs[0]] & mask[pairs[1]]
        e_net = jnp.sum(NET.apply(params, x, spc, c, n, v) * mask)
        return e_net + priors.energy(p, x, mask, topo)

    return energy


def _params(x, spc):
    return NET.init(jax.random.key(0), x, spc, *neighbors.edges(jnp.zeros((2, 1), jnp.int32) + 16, 16))


@pytest.mark.parametrize("env_norm", ["avg", "count"])
def test_allegro_is_e3_equivariant_with_the_e3nn_helper(env_norm):
    """Per-bead energies invariant, forces equivariant under rotations and inversion (the
    helper draws R = -rotation), with either environment normalisation."""
    x, spc, mask = _frame()
    net = NET.clone(env_norm=env_norm)
    params = net.init(jax.random.key(0), x, spc, *neighbors.edges(jnp.zeros((2, 1), jnp.int32) + 16, 16))
    pairs = np.stack(np.nonzero(~np.eye(16, dtype=bool)))
    c, n = jnp.asarray(pairs[0]), jnp.asarray(pairs[1])
    v = mask[c] & mask[n]

    def fn(pos: e3nn.IrrepsArray):
        e_bead = lambda y: net.apply(params, y, spc, c, n, v) * mask  # noqa: E731
        e, g = e_bead(pos.array), jax.grad(lambda y: e_bead(y).sum())(pos.array)
        return e3nn.concatenate([e3nn.IrrepsArray("0e", e[:, None]), e3nn.IrrepsArray("1o", -g)], axis=-1)

    e3nn.utils.assert_equivariant(jax.jit(fn), jax.random.key(1), e3nn.IrrepsArray("1o", x), atol=5e-4, rtol=5e-4)


def test_total_energy_se3_invariant_forces_rotate():
    """With the priors (the dihedral term is chiral, so proper rotations only) and translations."""
    x, spc, mask = _frame()
    energy = jax.jit(_energy_fn(_params(x, spc), spc, mask, 16))  # eager e3nn is several times slower
    r = np.asarray(e3nn.rand_matrix(jax.random.key(3), ()))
    r = jnp.asarray(r * np.sign(np.linalg.det(r)), jnp.float32)
    y = x @ r.T + jnp.array([3.0, -1.0, 2.0])
    np.testing.assert_allclose(energy(y), energy(x), rtol=1e-4, atol=1e-3)
    force = jax.jit(jax.grad(energy))
    f_x, f_y = -force(x), -force(y)
    np.testing.assert_allclose(f_y[:12], f_x[:12] @ r.T, atol=2e-3 * float(jnp.abs(f_x).max()))


def test_forces_are_minus_grad_against_finite_differences():
    with jax.enable_x64(True):
        x, spc, mask = _frame()
        x = x.astype(jnp.float64)
        params = NET.init(jax.random.key(0), x, spc, *neighbors.edges(jnp.zeros((2, 1), jnp.int32) + 16, 16))
        params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
        energy = jax.jit(_energy_fn(params, spc, mask, 16, jnp.float64))  # one compile, 16 fast calls
        f = -jax.grad(energy)(x)
        rng, h = np.random.default_rng(2), 1e-5
        for _ in range(8):
            i, k = rng.integers(0, 12), rng.integers(0, 3)
            fd = -(energy(x.at[i, k].add(h)) - energy(x.at[i, k].add(-h))) / (2 * h)
            np.testing.assert_allclose(f[i, k], fd, rtol=1e-6, atol=1e-7)


def test_no_nan_with_coincident_padded_beads_and_zero_length_bond():
    x, spc, mask = _frame()
    x = x.at[15].set(x[14]).at[5].set(x[4])  # padded pair on top of each other; a zero-length bond
    params = _params(x, spc)
    energy = _energy_fn(params, spc, mask, 16)
    with jax.debug_nans(True):
        e, f = jax.value_and_grad(energy)(x)
        gp = jax.grad(lambda p: _energy_fn(p, spc, mask, 16)(x))(params)
    assert np.isfinite(e) and np.all(np.isfinite(f)) and np.all(f[12:] == 0)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(gp))


def test_neighbour_list_overflow_reallocates_never_drops():
    x, _, _ = _frame(n=40, n_max=40)
    fn = neighbors.neighbor_fn(6.0)
    nbrs = neighbors.batch(fn, x[None])
    n_pairs = int((nbrs.idx[0, 0] < 40).sum())
    squeezed = x * 0.3  # denser: more pairs than the capacity holds
    assert neighbors.overflowed(neighbors.update(fn, squeezed[None], nbrs))
    grown = neighbors.batch(fn, squeezed[None], nbrs)
    d = np.linalg.norm(squeezed[:, None] - squeezed[None], axis=-1)
    assert int((grown.idx[0, 0] < 40).sum()) == int((d < 6.0).sum() - 40) > n_pairs
    assert not neighbors.overflowed(grown)


def test_capacities_are_pairs_not_pairs_per_particle():
    """jax-md's extra_capacity counts per particle for sparse lists; with_capacity and grow give
    the number of pairs asked for, and updates keep it."""
    x, _, _ = _frame(n=40, n_max=40)
    fn = neighbors.neighbor_fn(6.0)
    first = fn.allocate(x)
    n_pairs = int((first.idx[0] < 40).sum())
    padded = neighbors.with_capacity(first, first.idx.shape[1] + 7)
    assert padded.idx.shape == (2, first.idx.shape[1] + 7) and np.all(padded.idx[:, -7:] == 40)
    moved = fn.update(x * 1.02, padded)
    assert moved.idx.shape == padded.idx.shape and int((moved.idx[0] < 40).sum()) >= n_pairs * 0.9
    grown = neighbors.grow(fn, x, first)
    assert grown.idx.shape[1] == int(first.idx.shape[1] * 1.5) < 40 * 39
    assert neighbors.grow(fn, x, neighbors.with_capacity(first, 40 * 39)).idx.shape[1] == 40 * 39
    with pytest.raises(ValueError, match="below"):
        neighbors.with_capacity(first, 3)


def test_parked_beads_never_enter_the_neighbour_list():
    x, _, mask = _frame()
    nbrs = neighbors.batch(neighbors.neighbor_fn(12.0), x[None])
    idx = np.asarray(nbrs.idx[0])
    real = idx[:, idx[0] < 16]
    assert np.all(np.asarray(mask)[real[0]]) and np.all(np.asarray(mask)[real[1]])


@pytest.mark.parametrize("periodic", [True])
def test_periodic_neighbour_list(periodic):
    box = 30.0
    x = jnp.asarray(np.random.default_rng(0).uniform(0, box, size=(40, 3)), jnp.float32)
    nbrs = neighbors.batch(neighbors.neighbor_fn(6.0, box=box), x[None])
    d = x[:, None] - x[None]
    d = d - box * jnp.round(d / box)
    expected = int((jnp.linalg.norm(d, axis=-1) < 6.0).sum() - 40)
    assert int((nbrs.idx[0, 0] < 40).sum()) == expected


def _model(box=0.0):
    """The training driver's Model (tiny config) on a 12-bead frame padded to 16."""

    cfg = _tiny_box_config(box)
    x, spc, mask = _frame()
    if box:
        x = jnp.where(mask[:, None], x + box / 2, x)
    model = energy.make_model(cfg, 16, 16 * 15, x)
    params = jax.jit(lambda: energy.init_net(model, 0, {"positions": x, "species": spc}))()  # eager: 4x slower
    return train, model, params, priors.as_jax(PRIORS), x, spc, mask


def test_virial_in_free_space_is_sum_of_x_outer_f():
    train, model, params, pp, x, spc, mask = _model()
    e, f, w, overflow = jax.jit(lambda p: energy.frame_forces_virial(model, p, pp, x, spc, mask))(params)
    e2, f2, _ = jax.jit(lambda p: energy.frame_forces(model, p, pp, x, spc, mask))(params)
    assert not bool(overflow) and np.isclose(float(e), float(e2), rtol=1e-6)
    np.testing.assert_allclose(f, f2, rtol=1e-5, atol=1e-5)
    real = np.asarray(mask)
    expected = np.einsum("ia,ib->ab", np.asarray(x)[real], np.asarray(f)[real])
    np.testing.assert_allclose(w, expected, rtol=2e-3, atol=2e-3 * np.abs(expected).max())
    np.testing.assert_allclose(w, np.asarray(w).T, atol=2e-3 * np.abs(expected).max())


def test_periodic_box_minimum_image_energy_and_virial():
    """In a box: a bead moved by a box vector changes nothing; a large box reproduces free space;
    the trace of the virial is minus the derivative of E under uniform scaling of box and beads."""
    box = 32.0
    train, model, params, pp, x, spc, mask = _model(box)
    frame_energy = jax.jit(lambda y: energy.frame_energy(model, params, pp, y, spc, mask)[0])
    e = float(frame_energy(x))
    shifted = x.at[3].add(jnp.array([box, 0.0, -box]))
    assert np.isclose(float(frame_energy(shifted)), e, rtol=1e-5)
    _, free, fparams, *_ = _model(0.0)
    x_free = jnp.where(mask[:, None], x - box / 2, x)
    e_free = float(energy.frame_energy(free, params, pp, x_free, spc, mask)[0])
    assert np.isclose(e, e_free, rtol=1e-5, atol=1e-4)

    w = jax.jit(lambda: energy.frame_forces_virial(model, params, pp, x, spc, mask)[2])()

    def scaled_energy(s):
        m = energy.make_model(_tiny_box_config(box * s), 16, 16 * 15, x * s)
        return float(energy.frame_energy(m, params, pp, x * s, spc, mask)[0])

    h = 1e-3
    de_ds = (scaled_energy(1 + h) - scaled_energy(1 - h)) / (2 * h)
    assert np.isclose(-float(jnp.trace(w)), de_ds, rtol=2e-2, atol=1e-2)


def _tiny_box_config(box):
    from experiments import cg_tiny

    cfg = cg_tiny.get_config()
    # one layer: these tests check energies, forces, virials and losses, not depth; it halves the compiles
    cfg.model.update(dict(box=box, cutoff=10.0, inner_cutoff=2.0, n_layers=1))
    return cfg


def test_inner_switch_removes_edges_shorter_than_the_data():
    """A neighbour closer than inner - width contributes nothing: the energy equals the one
    without that pair's two edges; between inner - width and inner the switch is smooth."""
    r = jnp.linspace(0.0, 3.0, 301)
    s = allegro.inner_switch(r, 2.0, 1.0)
    assert float(s[r < 1.0].max()) == 0.0 and float(s[r >= 2.0].min()) == 1.0
    assert (
        np.all(np.diff(np.asarray(s)) >= 0) and float(jax.grad(lambda t: allegro.inner_switch(t, 2.0, 1.0))(2.0)) == 0
    )
    net = allegro.Allegro(n_layers=2, latent=16, channels=4, embed=4, n_basis=8, cutoff=10.0, inner_cutoff=2.0)
    x = jnp.asarray([[0.0, 0.0, 0.0], [3.8, 0.0, 0.0], [3.8, 0.6, 0.0], [7.0, 2.0, 1.0]])
    spc = jnp.asarray([1, 2, 3, 4])
    pairs = np.stack(np.nonzero(~np.eye(4, dtype=bool)))
    c, n = jnp.asarray(pairs[0]), jnp.asarray(pairs[1])
    params = net.init(jax.random.key(0), x, spc, c, n, jnp.ones(len(c), bool))
    close = ((pairs[0] == 1) & (pairs[1] == 2)) | ((pairs[0] == 2) & (pairs[1] == 1))
    e_all = net.apply(params, x, spc, c, n, jnp.ones(len(c), bool)).sum()
    e_without = net.apply(params, x, spc, c, n, jnp.asarray(~close)).sum()
    assert np.isclose(float(e_all), float(e_without), rtol=1e-6)


def test_force_loss_weights_extra_frames_against_a_hand_computation():
    """loss = gamma_f * sum_frames w * sum_real |F - F_ref|^2, weight = 3 * sum_frames w * n_real,
    w = extra_weight for data.extra_train frames and 1 otherwise."""
    train, model, params, pp, x, spc, mask = _model()
    xs, ms, ss = jnp.stack([x, x * 1.05]), jnp.stack([mask, mask]), jnp.stack([spc, spc])
    ref = jax.random.normal(jax.random.key(1), xs.shape)
    batch = {"positions": xs, "species": ss, "mask": ms, "forces": ref, "extra": jnp.asarray([False, True])}
    loss, aux = jax.jit(lambda p, b: train.force_loss(model, pp, 2.0, extra_weight=0.25)(p, b, None))(params, batch)
    forces = jax.jit(jax.vmap(lambda a, b, c: energy.frame_forces(model, params, pp, a, b, c)[1]))(xs, ss, ms)
    real = np.asarray(mask)
    sq = [float(np.sum((np.asarray(forces[i]) - np.asarray(ref[i]))[real] ** 2)) for i in range(2)]
    assert np.isclose(float(loss), 2.0 * (sq[0] + 0.25 * sq[1]), rtol=1e-5)
    assert np.isclose(float(aux["weight"]), 3 * real.sum() * 1.25)


def test_force_matching_parameter_gradient_is_finite_with_coincident_beads():
    """Force matching trains on forces = -dE/dx, so its parameter gradient is a second derivative
    through the safe geometry. A frame with two padded beads on top of each other and a
    zero-length bond between two real beads: the loss gradient w.r.t. the parameters, jitted as
    the training step is, is computed under jax_debug_nans (a NaN in it raises) and is finite
    and not zero."""

    cfg = _tiny_box_config(0.0)  # one layer keeps the second-order compile to seconds
    x, spc, mask = _frame()
    model = energy.make_model(cfg, 16, 16 * 15, x)
    params = jax.jit(lambda: energy.init_net(model, 0, {"positions": x, "species": spc}))()  # eager: 4x slower
    bad = x.at[15].set(x[14]).at[5].set(x[4])
    batch = {"positions": bad[None], "species": spc[None], "mask": mask[None],
             "forces": jax.random.normal(jax.random.key(1), (1, *x.shape)), "extra": jnp.asarray([False])}  # fmt: skip
    loss_fn = train.force_loss(model, priors.as_jax(PRIORS), 1.0)
    before = jax.config.jax_debug_nans
    jax.config.update("jax_debug_nans", True)
    try:
        loss, grads = jax.jit(jax.value_and_grad(lambda p: loss_fn(p, batch, None)[0]))(params)
    finally:
        jax.config.update("jax_debug_nans", before)
    leaves = [np.asarray(g) for g in jax.tree.leaves(grads)]
    assert np.isfinite(float(loss)) and all(np.all(np.isfinite(g)) for g in leaves)
    assert sum(float(np.abs(g).sum()) for g in leaves) > 0


def test_ensemble_mean_energy_is_the_mean_of_its_members():
    """Model.members = M: stacked parameters give the members' mean network energy plus the
    priors once, and the forces of that mean (export.load_trained(members="mean"))."""
    import dataclasses

    _, model, p0, pp, x, spc, mask = _model()
    p1 = jax.jit(lambda: energy.init_net(model, 1, {"positions": x, "species": spc}))()
    mean = dataclasses.replace(model, members=2)
    stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), p0, p1)
    one = jax.jit(lambda p: energy.frame_forces(model, p, pp, x, spc, mask))
    (e0, f0, _), (e1, f1, _) = one(p0), one(p1)
    em, fm, _ = jax.jit(lambda p: energy.frame_forces(mean, p, pp, x, spc, mask))(stacked)
    assert abs(float(e0) - float(e1)) > 1e-3  # the members differ
    np.testing.assert_allclose(float(em), 0.5 * (float(e0) + float(e1)), rtol=1e-5)
    np.testing.assert_allclose(fm, 0.5 * (f0 + f1), rtol=1e-4, atol=1e-4)


def test_relent_loss_gradient_is_beta_times_reference_minus_cg_energy_gradients():
    """rem_loss with fm_weight 0: loss / weight = beta (<U>_ref - <U>_CG), so its parameter
    gradient is the relative-entropy estimate beta (<dU/dθ>_ref - <dU/dθ>_CG), per-frame
    gradients averaged by hand; with fm_weight 1 the force-matching gradient adds to it."""
    from molgen.cg import relent

    _, model, params, pp, x, spc, mask = _model()
    rng = np.random.default_rng(3)
    ref = jnp.stack([x, x * 1.03, x * 0.98])
    cg = jnp.stack([x * 1.1, x + jnp.asarray(rng.normal(0, 0.3, x.shape), jnp.float32)]) * mask[:, None]
    cg = jnp.where(mask[:, None], cg, x)  # padded beads stay parked
    batch = {"positions": ref, "species": jnp.stack([spc] * 3), "mask": jnp.stack([mask] * 3),
             "forces": jnp.zeros_like(ref), "extra": jnp.zeros(3, bool),
             "cg_positions": cg, "cg_species": jnp.stack([spc] * 2), "cg_mask": jnp.stack([mask] * 2)}  # fmt: skip
    beta = 1.5

    def scaled_grad(fn):  # what the shared step differentiates: loss / weight
        def scaled(p):
            loss, aux = fn(p, batch, None)
            return loss / jax.lax.stop_gradient(aux["weight"]), aux

        return jax.jit(jax.grad(scaled, has_aux=True))(params)

    def grad_of(fm_weight):
        return scaled_grad(relent.rem_loss(model, pp, beta=beta, fm_weight=fm_weight, rem_weight=1.0, gamma_f=1.0))

    g, aux = grad_of(0.0)
    e = jax.jit(jax.grad(lambda p, a: energy.frame_energy(model, p, pp, a, spc, mask)[0]))
    mean = lambda frames: jax.tree.map(lambda *t: sum(t) / len(t), *[e(params, f) for f in frames])  # noqa: E731
    want = jax.tree.map(lambda r, c: beta * (r - c), mean(ref), mean(cg))
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-3, atol=1e-6)
    e_jit = jax.jit(lambda f: energy.frame_energy(model, params, pp, f, spc, mask)[0])
    e_val = lambda f: float(e_jit(f))  # noqa: E731
    gap = beta * (np.mean([e_val(f) for f in ref]) - np.mean([e_val(f) for f in cg]))
    assert np.isclose(float(aux["rem_gap"]) / float(aux["weight"]), gap, rtol=1e-4)
    g_fm = scaled_grad(train.force_loss(model, pp, 1.0))[0]
    for a, b, c in zip(*(jax.tree.leaves(t) for t in (grad_of(1.0)[0], g, g_fm)), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b) + np.asarray(c), rtol=2e-3, atol=1e-5)
