"""ATOMICA encoder: rotation/translation behaviour of every output, invariance of the interface
embedding to atom, block and segment order, padding, and NaN-free gradients."""

import e3nn_jax as e3nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from molgen.atomica import data as ad
from molgen.atomica import graph as gr
from molgen.atomica import model, noise
from molgen.chem import complexes as cx
from tests.conftest import ROOT

EXTRA = dict(extra_atom=("atom_noised",), extra_block=("mask_target",),
             extra_graph=("tr_z", "tr_eps", "rot_score", "rot_ok"))  # fmt: skip


@pytest.fixture(scope="module")
def record():
    mols = cx.read(str(ROOT / "third_party/data/complexes/plip_pdb/1xdn.pdb.gz"))
    return ad.interface_item(mols["protein"]["A"], mols["ligand"][0], 8.0, 24, "1xdn")  # 24 blocks: fast


def _batch(recs, cap=None, **kw):
    gs = [gr.build(gr.with_globals(r)) for r in recs]
    cap = cap or gr.Capacity(graphs=len(gs))
    cap.fit(gr.sizes(gs))
    return {k: jnp.asarray(v) for k, v in gr.collate(gs, cap, **kw).items()}


@pytest.fixture(scope="module")
def noised(record):
    return noise.corrupt(record, np.random.default_rng(0))


@pytest.fixture(scope="module", params=[("depthwise", "forces"), ("fully_connected", "forces"), ("depthwise", "lsq")],
                ids=lambda p: "-".join(p))  # fmt: skip
def pretrainer(request, noised):
    tp, rigid = request.param
    m = model.Pretrainer(hidden=16, layers=2, pool_layers=1, tp=tp, rigid_head=rigid)  # compile-bound: small
    b = _batch([noised], **EXTRA)
    params = jax.jit(m.init)(jax.random.key(0), b)
    # the contact-force head starts at zero: give it weights so every test exercises it
    k = params["params"]["force_out"]["kernel"]
    params["params"]["force_out"]["kernel"] = jax.random.normal(jax.random.key(5), k.shape)
    return m, params


def test_rigid_head_matches_a_hand_computation(pretrainer, noised):
    """With the other heads' vectors zeroed, (translation, rotation) recomputed by hand (numpy)
    from the per-edge outputs phi of the contact edges (a noised and a partner atom within 8 Å,
    n along partner -> noised): "forces": the sum of phi_0 env n and the torque of phi_1 env n
    about the noised atoms' centre; "lsq": the weighted least-squares rigid fit (v, omega) to
    the misfits phi_0 with weights softplus(phi_1 + 1) env, rows a = (n, r x n), r over
    sqrt(rg^2 + 1). A phi at zero gives 0."""
    m, params = pretrainer
    b = _batch([noised], **EXTRA)
    p0 = jax.tree.map(lambda x: x, params)
    p0["params"]["force_out"]["kernel"] = jnp.zeros_like(params["params"]["force_out"]["kernel"])
    apply = jax.jit(lambda p: m.apply(p, b, capture_intermediates=lambda mod, name: mod.name == "force_out"))
    (full, st), (base, _) = apply(params), apply(p0)  # jitted: eager e3nn is several times slower
    ft, fr = np.asarray(full["trans"] - base["trans"])[0], np.asarray(full["rot"] - base["rot"])[0]
    assert np.linalg.norm(ft) > 1e-4 and np.linalg.norm(fr) > 1e-4
    phi = np.asarray(st["intermediates"]["force_out"]["__call__"][0], np.float64)
    x, src, dst = (np.asarray(b[k], np.float64) for k in ("x", "atom_src", "atom_dst"))
    src, dst = src.astype(int), dst.astype(int)
    nz = np.asarray(b["atom_noised"] & b["atom_mask"]).astype(bool)
    centre = x[nz].mean(0)
    scale = np.sqrt(np.mean(np.sum((x[nz] - centre) ** 2, -1)) + 1.0)
    want_t, want_r, big_a, rhs = np.zeros(3), np.zeros(3), np.zeros((6, 6)), np.zeros(6)
    for i in range(len(src)):
        if not (b["atom_edge_mask"][i] and int(b["atom_etype"][i]) == gr.INTER and nz[src[i]] != nz[dst[i]]):
            continue
        n, q = (dst[i], src[i]) if nz[dst[i]] else (src[i], dst[i])
        v = x[n] - x[q]
        d = np.linalg.norm(v)
        if d >= 8.0:
            continue
        env = 0.5 * (np.cos(np.pi * d / 8.0) + 1)
        want_t += phi[i, 0] * env * v / d
        want_r += phi[i, 1] * env * np.cross(x[n] - centre, v / d)
        w = np.log1p(np.exp(phi[i, 1] + 1.0)) * env
        a = np.concatenate([v / d, np.cross((x[n] - centre) / scale, v / d)])
        big_a += w * np.outer(a, a)
        rhs += w * phi[i, 0] * a
    tol = {"rtol": 1e-3, "atol": 1e-4}
    if m.rigid_head == "lsq":  # a 6 x 6 solve in float32: looser
        sol = np.linalg.solve(big_a + (1e-3 * np.trace(big_a) / 6 + 1e-4) * np.eye(6), rhs)
        want_t, want_r, tol = sol[:3], sol[3:], {"rtol": 2e-3, "atol": 2e-4}
    np.testing.assert_allclose(ft, want_t, **tol)
    np.testing.assert_allclose(fr, want_r, **tol)


def test_rotation_and_translation(pretrainer, noised):
    m, params = pretrainer
    f = jax.jit(m.apply)
    b = _batch([noised], **EXTRA)
    out = f(params, b)
    rot = np.asarray(e3nn.rand_matrix(jax.random.key(3), ()))
    shift = np.array([3.0, -7.0, 11.0], np.float32)
    b2 = dict(b, x=b["x"] @ rot.T + shift, block_x=b["block_x"] @ rot.T + shift)
    out2 = f(params, b2)
    tm, bm = b["tor_mask"], b["block_mask"]
    for k, sel in (("graph_repr", None), ("block_repr", bm), ("atom_repr", b["atom_mask"]), ("mask_logits", bm),
                   ("tor", tm)):  # fmt: skip
        a, c = np.asarray(out[k]), np.asarray(out2[k])
        if sel is not None:
            a, c = a[np.asarray(sel)], c[np.asarray(sel)]
        np.testing.assert_allclose(c, a, atol=2e-4, rtol=1e-3, err_msg=k)
    for k in ("trans", "rot"):  # vectors rotate with the input (1o and 1e alike under rotations)
        np.testing.assert_allclose(np.asarray(out2[k]), np.asarray(out[k]) @ rot.T, atol=2e-4, rtol=1e-3, err_msg=k)
    assert np.abs(np.asarray(out["trans"])).max() > 1e-6 and np.abs(np.asarray(out["tor"])[np.asarray(tm)]).max() > 0


def _permute(rec, rng, swap: bool):
    """The same interface with atoms shuffled inside blocks, blocks inside segments, and the two
    segments swapped (records list segment 0 first)."""
    bseg, ab = np.asarray(rec["block_segment"]), np.asarray(rec["atom_block"])
    segs = [1, 0] if swap else [0, 1]
    order_b = np.concatenate([rng.permutation(np.flatnonzero(bseg == s)) for s in segs])
    new_b = np.empty_like(order_b)
    new_b[order_b] = np.arange(len(order_b))
    order_a = np.concatenate([rng.permutation(np.flatnonzero(ab == b)) for b in order_b])
    new_a = np.empty_like(order_a)
    new_a[order_a] = np.arange(len(order_a))
    out = {k: np.asarray(rec[k])[order_a] for k in ("x", "element", "position")}
    out["atom_block"] = new_b[ab[order_a]]
    out["block_type"] = np.asarray(rec["block_type"])[order_b]
    out["block_segment"] = (bseg[order_b] == segs[1]).astype(np.int32)
    out["bonds"] = new_a[np.asarray(rec["bonds"])]
    return out


def test_interface_embedding_ignores_order_and_padding(record):
    m = model.Encoder(hidden=16, layers=2, pool_layers=1)
    b = _batch([record])
    params = jax.jit(m.init)(jax.random.key(1), b)
    f = jax.jit(m.apply)
    ref = np.asarray(f(params, b)["graph_repr"])[0]
    rng = np.random.default_rng(0)
    for swap in (False, True):
        got = np.asarray(f(params, _batch([_permute(record, rng, swap)]))["graph_repr"])[0]
        np.testing.assert_allclose(got, ref, atol=1e-5)
    big = gr.Capacity(graphs=3, atoms=4096, blocks=512, atom_edges=20000, block_edges=4000, torsions=64)
    got = np.asarray(f(params, _batch([record], big))["graph_repr"])
    np.testing.assert_allclose(got[0], ref, atol=1e-5)  # more padding, one more (empty) graph slot


def test_gradients_have_no_nan(pretrainer, noised):
    m, params = pretrainer

    def loss(p):
        o = m.apply(p, _batch([noised], **EXTRA))
        return sum(jnp.sum(o[k] ** 2) for k in ("trans", "rot", "tor")) + jnp.sum(o["mask_logits"][:3])

    jax.config.update("jax_debug_nans", True)
    try:
        g = jax.jit(jax.grad(loss))(params)
    finally:
        jax.config.update("jax_debug_nans", False)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(g))
