"""Crystal family: data builder, losses, diffusion sampler, metrics, and the three CLIs on tiny configs."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from molgen.chem import crystal as xtal
from molgen.chem import match_index
from molgen.crystal import data, diffusion, vae

ROOT = pathlib.Path(__file__).resolve().parents[1]
MP20 = ROOT / "third_party" / "data" / "crystals" / "mp_20_subset"
BAD_CIF = "data_broken\n_cell_length_a 4.0\nloop_\n _atom_site_fract_x\n  nonsense\n"


def nacl() -> xtal.Crystal:
    a = 5.64
    lat = 0.5 * a * np.asarray([[0, 1, 1], [1, 0, 1], [1, 1, 0]], float)
    return xtal.Crystal(lat, np.asarray([[0, 0, 0], [0.5, 0.5, 0.5]]), np.asarray([11, 17]))


@pytest.fixture(scope="session")
def tiny_csvs(tmp_path_factory):
    """A CDVAE-format folder: 24/8/8 real MP-20 rows, with one malformed CIF row in train."""
    out = tmp_path_factory.mktemp("crystal_csv")
    import csv

    for split, n in (("train", 24), ("val", 8), ("test", 8)):
        rows = xtal.read_csv(str(MP20 / f"{split}.csv.gz"))[:n]
        if split == "train":
            rows.insert(3, {**rows[0], "material_id": "mp-broken", "cif": BAD_CIF})
        with open(out / f"{split}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return out


def test_parse_cif_error_names_the_record():
    with pytest.raises(xtal.CrystalError, match="train.csv: row 3 .*mp-broken"):
        xtal.parse_cif(BAD_CIF, "train.csv: row 3 (material_id mp-broken)")


def test_builder_skips_and_reports_bad_row(tiny_csvs, tmp_path):
    cfg = ml_collections.ConfigDict(dict(source=str(tiny_csvs), n_max=0, properties=("band_gap",), resplit=(), seed=0))
    b = data.build(cfg, str(tmp_path))
    rep = data.report(b)
    assert rep["examples"] == {"train": 24, "validation": 8, "test": 8}
    assert rep["rows"]["train"] == 25
    (bad,) = rep["skipped"]
    assert bad["row"] == 3 and bad["material_id"] == "mp-broken" and bad["file"].endswith("train.csv")
    split = data.load_split(b.as_data_source()["train"])
    n_max = rep["n_max"]
    assert split["frac"].shape == (24, n_max, 3) and split["mask"].sum(-1).max() <= n_max
    assert np.all((split["frac"] >= 0) & (split["frac"] < 1))
    # the stored crystal is the Niggli-reduced CIF structure (TFDS stores examples in its own order)
    row = xtal.read_csv(str(tiny_csvs / "train.csv"))[0]
    first = xtal.parse_cif(row["cif"])
    src = b.as_data_source()["train"]
    (k,) = [i for i in range(len(src)) if src[i]["material_id"].decode() == row["material_id"]]
    got = data.unpad({key: split[key][k] for key in ("lattice", "frac", "species", "mask")})
    assert xtal.match_rms(got, first) is not None
    np.testing.assert_allclose(split["params"][k], first.params, rtol=1e-5)
    np.testing.assert_allclose(split["properties"][k, 0], float(row["band_gap"]), rtol=1e-6)
    # missing property column: a clear error naming the file
    with pytest.raises(ValueError, match="property columns .*nope"):
        data.parse_rows(str(tiny_csvs / "test.csv"), ("nope",))


def test_resplit_is_deterministic_and_disjoint(tiny_csvs, tmp_path):
    cfg = ml_collections.ConfigDict(dict(source=str(tiny_csvs), n_max=0, properties=(), resplit=(0.25, 0.25), seed=3))
    rep = data.report(data.build(cfg, str(tmp_path)))
    assert sum(rep["examples"].values()) == 40 and rep["examples"]["test"] == 10


def test_periodic_coordinate_loss():
    """A shift by a lattice vector costs nothing; the encoder input does not change either."""
    rng = np.random.default_rng(0)
    b, n = 3, 4
    frac = rng.uniform(size=(b, n, 3)).astype(np.float32)
    batch = {"frac": jnp.asarray(frac), "mask": jnp.ones((b, n), bool), "species": jnp.full((b, n), 8),
             "params": jnp.asarray(np.tile([4.0, 4.0, 4.0, 90.0, 90.0, 90.0], (b, 1)), jnp.float32)}  # fmt: skip
    shift = rng.integers(-2, 3, size=(b, n, 3)).astype(np.float32)
    pred = {"frac": jnp.asarray(frac + shift + 0.01), "species_logits": jnp.zeros((b, n, vae.N_SPECIES)),
            "lengths": jnp.ones((b, 3)), "angles": jnp.ones((b, 3))}  # fmt: skip
    t = vae.loss_terms(pred, jnp.zeros((b, n, 2)), jnp.zeros((b, n, 2)), batch)
    np.testing.assert_allclose(t["coords"], 3 * 0.01**2, rtol=1e-3)  # only the 0.01 offset counts
    # across the boundary: 0.99 vs 0.01 is 0.02 apart, not 0.98
    near = vae.loss_terms({**pred, "frac": jnp.full((b, n, 3), 0.99)}, jnp.zeros((b, n, 2)), jnp.zeros((b, n, 2)),
                          {**batch, "frac": jnp.full((b, n, 3), 0.01)})  # fmt: skip
    np.testing.assert_allclose(near["coords"], 3 * 0.02**2, rtol=1e-3)
    np.testing.assert_allclose(vae.fourier(batch["frac"] + shift, 4), vae.fourier(batch["frac"], 4), atol=2e-5)


def test_vae_loss_terms_against_hand_values():
    b, n, k = 1, 2, 3
    mu = jnp.asarray([[[0.5, 0.0, -1.0], [0.0, 0.0, 0.0]]])
    logvar = jnp.asarray([[[0.0, np.log(2.0), 0.0], [0.0, 0.0, 0.0]]])
    mask = jnp.asarray([[True, False]])
    logits = jnp.zeros((b, n, vae.N_SPECIES)).at[0, 0, 7].set(2.0)
    batch = {"frac": jnp.zeros((b, n, 3)), "mask": mask, "species": jnp.asarray([[8, 3]]),
             "params": jnp.asarray([[4.0, 5.0, 6.0, 90.0, 90.0, 120.0]])}  # fmt: skip
    pred = {"frac": jnp.zeros((b, n, 3)), "species_logits": logits, "lengths": jnp.asarray([[4.0, 5.0, 6.0]]),
            "angles": jnp.deg2rad(jnp.asarray([[90.0, 90.0, 110.0]]))}  # fmt: skip
    t = vae.loss_terms(pred, mu, logvar, batch)
    kl = 0.5 * ((1 + 0.25 - 1 - 0) + (2 + 0 - 1 - np.log(2.0)) + (1 + 1 - 1 - 0))  # one real atom
    np.testing.assert_allclose(t["kl"], [kl], rtol=1e-5)
    ce = -(2.0 - np.log(np.exp(2.0) + vae.N_SPECIES - 1))  # class 7 = oxygen (Z 8)
    np.testing.assert_allclose(t["species_ce"], [ce], rtol=1e-5)
    np.testing.assert_allclose(t["lengths"], [0.0], atol=1e-10)  # one atom: N^(1/3) = 1
    np.testing.assert_allclose(t["angles"], [np.deg2rad(10.0) ** 2 / 3], rtol=1e-4)
    assert k == 3


def test_augment_rotates_lattice_and_keeps_distances():
    c = nacl()
    lat = jnp.asarray(c.lattice[None], jnp.float32)
    frac = jnp.asarray(c.frac[None], jnp.float32)
    lat2, frac2 = vae.augment(jax.random.key(1), lat, frac, True, True)
    r = jnp.einsum("bij,bkj->bik", lat2, lat)  # not the identity
    assert not np.allclose(np.asarray(lat2), np.asarray(lat))
    got = xtal.Crystal(np.asarray(lat2[0], float), np.asarray(frac2[0], float), c.species)
    assert xtal.match_rms(got, c) is not None and r.shape == (1, 3, 3)
    np.testing.assert_allclose(np.linalg.det(lat2[0]), np.linalg.det(lat[0]), rtol=1e-5)


def _toy_dit():
    dit = diffusion.DiT(dim=16, heads=2, layers=1, latent=4, n_max=3, use_property=True)
    mask = jnp.asarray([[True, True, False], [True, True, True]])
    params = dit.init(jax.random.key(0), jnp.zeros((2, 3, 4)), jnp.zeros(2, jnp.int32), mask,
                      prop=jnp.zeros(2), prop_drop=jnp.zeros(2, bool))["params"]  # fmt: skip
    # perturb the zero-initialised output layers so the network is not trivially zero
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(p.size), p.shape), params)
    return (lambda p, z, t, m, **kw: dit.apply({"params": p}, z, t, m, **kw)), params, mask


def test_ddim_eta0_is_deterministic_and_eta1_is_not():
    apply, params, mask = _toy_dit()
    sched = diffusion.Schedule.linear(100)
    x0 = jax.random.normal(jax.random.key(5), (2, 3, 4))
    run = lambda key, eta: diffusion.sample(apply, params, sched, key, mask, 4, steps=10, eta=eta, x_init=x0)  # noqa: E731
    a, lp_a = run(jax.random.key(1), 0.0)
    b, _ = run(jax.random.key(2), 0.0)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(lp_a), 0.0)
    c, lp_c = run(jax.random.key(1), 1.0)
    d, _ = run(jax.random.key(2), 1.0)
    assert not np.allclose(np.asarray(c), np.asarray(d))
    assert np.all(np.isfinite(np.asarray(lp_c))) and np.all(np.asarray(lp_c) != 0)
    assert np.all(np.asarray(a)[0, 2] == 0)  # padded atom stays zero


def test_ddim_step_logprob_matches_hand_gaussian():
    sched = diffusion.Schedule.linear(50)
    mask = jnp.asarray([[True, False]])
    x = jnp.asarray([[[0.3, -0.2], [0.0, 0.0]]])
    eps = jnp.asarray([[[0.1, 0.4], [0.0, 0.0]]])
    noise = jnp.asarray([[[0.5, -1.0], [7.0, 7.0]]])
    xp, mean, std, lp = diffusion.ddim_step(sched, x, eps, 30, 20, 1.0, noise, mask, reduce="sum")
    lp_mean = diffusion.ddim_step(sched, x, eps, 30, 20, 1.0, noise, mask)[3]  # default: the mean
    ab = np.cumprod(1 - sched.betas)
    a_t, a_p = ab[30], ab[20]
    x0 = (np.asarray(x) - np.sqrt(1 - a_t) * np.asarray(eps)) / np.sqrt(a_t)
    s = np.sqrt((1 - a_p) / (1 - a_t)) * np.sqrt(1 - a_t / a_p)
    m = np.sqrt(a_p) * x0 + np.sqrt(1 - a_p - s**2) * np.asarray(eps)
    np.testing.assert_allclose(np.asarray(xp)[0, 0], (m + s * np.asarray(noise))[0, 0], rtol=1e-5)
    want = np.sum(-0.5 * (np.asarray(noise)[0, 0] ** 2 + np.log(2 * np.pi * s**2)))
    np.testing.assert_allclose(float(lp[0]), want, rtol=1e-5)
    np.testing.assert_allclose(float(lp_mean[0]), want / 2, rtol=1e-5)  # 1 real atom x 2 latent dims


def test_trajectory_logprobs_reproduce_the_rollout():
    apply, params, mask = _toy_dit()
    sched = diffusion.Schedule.linear(100)
    mask = mask.at[1, 1].set(False)
    for reduce in ("mean", "sum"):
        z0, traj = diffusion.sample(apply, params, sched, jax.random.key(4), mask, 4, steps=10, eta=1.0,
                                    reduce=reduce, trajectory=True)  # fmt: skip
        assert traj["z"].shape == (11, 2, 3, 4) and traj["logp"].shape == (10, 2)
        np.testing.assert_array_equal(np.asarray(traj["z"][-1]), np.asarray(z0))
        assert np.all(np.asarray(traj["logp"][-1]) == 0) and np.all(np.asarray(traj["logp"][:-1]) != 0)  # last: σ = 0
        lp, std = diffusion.trajectory_logprobs(apply, params, sched, traj, mask, 1.0, reduce=reduce)
        np.testing.assert_allclose(np.asarray(lp), np.asarray(traj["logp"]), atol=1e-5)
        assert float(std[-1]) == 0.0 and np.all(np.asarray(std[:-1]) > 0)
        _, lp_sum = diffusion.sample(apply, params, sched, jax.random.key(4), mask, 4, steps=10, eta=1.0, reduce=reduce)
        np.testing.assert_allclose(np.asarray(lp_sum), np.asarray(traj["logp"]).sum(0), rtol=1e-5)


def test_cfg_guidance_combines_passes():
    apply, params, mask = _toy_dit()
    x = jax.random.normal(jax.random.key(3), (2, 3, 4))
    cond = {"prop": jnp.asarray([3.0, 3.0])}
    e_c = diffusion.guided_eps(apply, params, x, 7, mask, cond, 1.0)
    e_u = apply(params, x, jnp.full(2, 7), mask)  # prop None: dropped
    e_g = diffusion.guided_eps(apply, params, x, 7, mask, cond, 2.0)
    np.testing.assert_allclose(np.asarray(e_g), np.asarray(e_u + 2.0 * (e_c - e_u)), atol=1e-5)


def test_validity_and_matching():
    c = nacl()
    assert xtal.structure_valid(c) and xtal.composition_valid(c.species)
    assert not xtal.composition_valid(np.asarray([11, 17, 17]))  # NaCl2 is not charge balanced
    assert xtal.composition_valid(np.asarray([26, 28]))  # alloy
    clash = xtal.Crystal(c.lattice, np.asarray([[0, 0, 0], [0.02, 0.0, 0.0]]), c.species)
    assert not xtal.structure_valid(clash)
    shifted = xtal.Crystal(c.lattice, np.mod(c.frac + 0.37, 1.0), c.species)
    assert xtal.match_rms(shifted, c) == pytest.approx(0.0, abs=1e-6)
    idx = match_index.MatchIndex([c])
    assert idx.contains(shifted)
    other = xtal.Crystal(c.lattice * 1.0, c.frac, np.asarray([19, 17]))  # KCl in the NaCl cell
    assert not idx.contains(other)
    flat = xtal.Crystal(np.diag([5.6, 5.6, 0.0]), c.frac, c.species)  # no volume: the matcher raises
    idx.add(flat)
    assert match_index.fingerprint(flat) is None and not idx.contains(flat) and idx.contains(shifted)
    np.testing.assert_array_equal(idx.earlier(), [False, False])
    np.testing.assert_allclose(xtal.density(c), 2.16, rtol=0.02)


def test_amd_of_simple_cubic_against_closed_form():
    """Simple cubic, lattice a: 6 neighbours at a, 12 at a sqrt 2, 8 at a sqrt 3, so AMD_1..26 is
    known; a 2 x 1 x 1 supercell in another setting is the same crystal and has the same AMD."""
    a = 3.1
    want = a * np.asarray([1.0] * 6 + [2**0.5] * 12 + [3**0.5] * 8)
    sc = xtal.Crystal(a * np.eye(3), np.zeros((1, 3)), np.asarray([29]))
    np.testing.assert_allclose(xtal.amd(sc, 26), want, rtol=1e-12)
    np.testing.assert_allclose(xtal.amd(sc, 100)[:26], want, rtol=1e-12)
    m = np.asarray([[2, 0, 0], [1, 1, 0], [0, 1, 1]])  # a supercell of two cells, skewed
    two = xtal.Crystal(m @ sc.lattice, np.mod(np.asarray([[0, 0, 0], [1, 0, 0]]) @ np.linalg.inv(m), 1.0),
                       np.asarray([29, 29]))  # fmt: skip
    np.testing.assert_allclose(xtal.amd(two, 26), want, rtol=1e-9)


def _copies(c: xtal.Crystal, rng) -> list[xtal.Crystal]:
    """Copies of c that StructureMatcher calls equal: atoms moved (0.03 (V/n)^(1/3) rms), the
    lattice strained (2%), another cell setting, a 2 x 1 x 1 supercell, and these combined (the
    supercell's atoms moved less: the matcher finds the primitive cell within 0.25 Å only)."""
    n = len(c.species)
    u = (xtal.volume(c.lattice) / n) ** (1 / 3)

    def make(lat, frac, species, strain=0.0, move=0.0):
        e = rng.normal(0, strain, (3, 3))
        lat2 = lat @ (np.eye(3) + (e + e.T) / 2)
        cart = frac @ lat2 + rng.normal(0, move * u, frac.shape)
        return xtal.Crystal(lat2, np.mod(cart @ np.linalg.inv(lat2), 1.0), species)

    m = np.asarray([[1, 1, 0], [0, 1, 0], [0, -1, 1]])  # unimodular: the same lattice, another cell
    setting = (m @ c.lattice, c.frac @ np.linalg.inv(m), c.species)
    two = np.diag([2.0, 1.0, 1.0])
    supercell = (two @ c.lattice, np.concatenate([c.frac, c.frac + [1, 0, 0]]) @ np.linalg.inv(two),
                 np.concatenate([c.species, c.species]))  # fmt: skip
    return [make(c.lattice, c.frac, c.species, move=0.03), make(c.lattice, c.frac, c.species, strain=0.02),
            make(*setting), make(*supercell), make(*setting, strain=0.02, move=0.02),
            make(*supercell, strain=0.02, move=0.005)]  # fmt: skip


def _mp20(split: str, n: int, element: int | None = None) -> list[xtal.Crystal]:
    cs = [xtal.parse_cif(r["cif"]) for r in xtal.read_csv(str(MP20 / f"{split}.csv.gz"))[:n]]
    if element is None:
        return cs
    return [xtal.Crystal(c.lattice, c.frac, np.full(len(c.species), element)) for c in cs]


def test_prefilter_keeps_matcher_equal_copies():
    """Perturbed copies, other settings and supercells of real crystals (and of the same crystals
    as one element): every one that StructureMatcher calls equal to its original is among
    MatchIndex's candidates, both ways round."""
    rng = np.random.default_rng(0)
    sm = xtal.matcher()
    equal = total = 0
    for c in [nacl(), *_mp20("train", 4), *_mp20("train", 4, element=14)]:
        idx = match_index.MatchIndex([c], workers=1)
        for x in _copies(c, rng):
            total += 1
            if not sm.fit(xtal.to_structure(x), xtal.to_structure(c)):
                continue  # e.g. a pseudo-translation the move breaks: the matcher's own verdict
            equal += 1
            assert list(idx.candidates(match_index.fingerprint(x))) == [0]
            assert idx.contains(x)
            assert list(match_index.MatchIndex([x], workers=1).candidates(match_index.fingerprint(c))) == [0]
    assert equal >= 0.9 * total


def _novelty_set():
    """One composition (every atom Si): 30 real MP-20 geometries as references; as queries,
    copies of six of them (`_copies`, one each) and six other geometries."""
    rng = np.random.default_rng(1)
    refs = _mp20("train", 30, element=14)
    copies = [_copies(refs[i], rng)[i % 6] for i in range(0, 30, 5)]
    return refs, copies + _mp20("val", 6, element=14)


def test_prefilter_equals_exhaustive_matcher():
    """On every pair of a small one-composition set the prefilter keeps each pair StructureMatcher
    calls equal, and MatchIndex answers what a scan of every pair answers (also for uniqueness)."""
    refs, queries = _novelty_set()
    sm = xtal.matcher()
    rs = [xtal.to_structure(c) for c in refs]
    fit = np.asarray([[sm.fit(xtal.to_structure(q), r) for r in rs] for q in queries])
    assert 6 <= fit.any(1).sum() < len(queries)  # the copies match, some others do not
    idx = match_index.MatchIndex(refs, workers=1)
    for q, row in zip(queries, fit, strict=True):
        assert set(np.flatnonzero(row)) <= set(idx.candidates(match_index.fingerprint(q)).tolist())
    np.testing.assert_array_equal(idx.contains_many(queries), fit.any(1))
    seq = refs[:8] + queries[:4]  # queries 0 and 1 copy refs 0 and 5: not unique
    want = [any(sm.fit(xtal.to_structure(c), xtal.to_structure(d)) for d in seq[:i]) for i, c in enumerate(seq)]
    np.testing.assert_array_equal(match_index.MatchIndex(seq, workers=1).earlier(), want)


def test_match_index_fingerprints_only_the_buckets_queries_touch():
    """A query fingerprints its own formula's crystals only (a varied training set is mostly
    never fingerprinted); the answers are those of the fully built index."""
    refs = _mp20("train", 6)
    si = _mp20("train", 6, element=14)
    idx = match_index.MatchIndex(refs + si, workers=1)
    assert idx.contains(si[2]) and not idx._fp.keys() - set(range(6, 12))
    assert idx.contains_many([refs[0], si[3]]).all()
    assert len(idx.prints) == 12 and len(idx._fp) == 12  # `prints` builds the rest


def test_match_index_pool_and_progress(monkeypatch, caplog):
    """The spawned worker pool gives the in-process answers, and logs progress lines."""
    refs, queries = _novelty_set()
    want = match_index.MatchIndex(refs, workers=1).contains_many(queries)
    monkeypatch.setattr(match_index, "POOL_MIN", 1)
    monkeypatch.setattr(match_index, "PROGRESS_S", 0.0)
    with caplog.at_level("INFO", logger="molgen"):
        got = match_index.MatchIndex(refs, workers=2).contains_many(queries)
    np.testing.assert_array_equal(got, want)
    assert any("matching crystals:" in r.getMessage() and "ETA" in r.getMessage() for r in caplog.records)


def _fcc(a: float, frac, species) -> xtal.Crystal:
    lat = 0.5 * a * np.asarray([[0, 1, 1], [1, 0, 1], [1, 1, 0]], float)
    return xtal.Crystal(lat, np.asarray(frac, float), np.asarray(species))


def _cscl_nacl(a: float = 3.3, shift=0.0) -> xtal.Crystal:
    """NaCl in the CsCl structure (simple cubic, Na-Cl 2.86 Å): another NaCl polymorph."""
    return xtal.Crystal(a * np.eye(3), np.mod(np.asarray([[0, 0, 0], [0.5, 0.5, 0.5]]) + shift, 1.0),
                        np.asarray([11, 17]))  # fmt: skip


class _EchoVAE:
    """A stand-in for CrystalVAE in `train_vae.reconstruct`: encode passes the input through and
    decode returns it in the decoder's output format, edited per batch row by `params`
    (added to the atomic numbers and to the fractional coordinates)."""

    def apply(self, variables, *args, method):
        return method(variables["params"], *args)

    def encode(self, p, species, frac, lattice, mask):
        return (species, frac, lattice), None

    def decode(self, p, z, mask):
        species, frac, lattice = z
        n = jnp.maximum(mask.sum(-1), 1).astype(jnp.float32)
        lengths = jnp.linalg.norm(lattice, axis=-1)

        def angle(i, j):
            cos = jnp.sum(lattice[:, i] * lattice[:, j], -1) / (lengths[:, i] * lengths[:, j])
            return jnp.arccos(jnp.clip(cos, -1.0, 1.0))

        return {
            "species_logits": jax.nn.one_hot(species + p["species"] - 1, 100),
            "frac": frac + p["frac"][:, None, :],
            "lengths": lengths / jnp.cbrt(n)[:, None],
            "angles": jnp.stack([angle(1, 2), angle(0, 2), angle(0, 1)], -1),
        }


def test_reconstruct_match_rate_on_hand_made_decodings():
    """Three crystals through `reconstruct` with a decoder that returns its input: NaCl copied
    exactly and CaF2 translated by (0.37, 0.11, 0.5) match (RMS 0); NaCl with Na decoded as K
    does not match (species accuracy 1/2 on it). The batch of 4 has one padding row (a copy of
    row 0, edited so that it would not match): it must not count."""
    from molgen.crystal import train_vae

    caf2 = _fcc(5.463, [[0, 0, 0], [0.25, 0.25, 0.25], [0.75, 0.75, 0.75]], [20, 9, 9])
    cs, n_max = [nacl(), caf2, nacl()], 3
    mask = np.asarray([[j < len(c.species) for j in range(n_max)] for c in cs])
    frac, species = np.zeros((3, n_max, 3), np.float32), np.zeros((3, n_max), np.int32)
    for i, c in enumerate(cs):
        frac[i, : len(c.species)], species[i, : len(c.species)] = c.frac, c.species
    lattice = np.stack([c.lattice for c in cs]).astype(np.float32)
    split = {"lattice": lattice, "frac": frac, "species": species, "mask": mask,
             "params": np.zeros((3, 6), np.float32), "properties": np.zeros((3, 1), np.float32)}  # fmt: skip
    edits = {"species": np.zeros((4, n_max), np.int32), "frac": np.zeros((4, 3), np.float32)}
    edits["frac"][1] = [0.37, 0.11, 0.5]
    edits["species"][2, 0] = edits["species"][3, 0] = 19 - 11  # Na -> K
    rec = train_vae.reconstruct(_EchoVAE(), edits, split, batch=4)
    assert rec["n"] == 3 and rec["match_rate"] == pytest.approx(2 / 3)
    assert rec["rmse"] == pytest.approx(0.0, abs=1e-4)
    assert rec["species_acc"] == pytest.approx((1 + 1 + 0.5) / 3)
    first = train_vae.reconstruct(_EchoVAE(), edits, split, limit=2, batch=4)  # rows 2 and 3 are padding here
    assert first["n"] == 2 and first["match_rate"] == 1.0 and first["species_acc"] == 1.0


class _FakeCHGNet:
    """CHGNet's `predict_structure` with hand-set energies per atom: 0 for every element, and by
    (reduced formula, volume per atom rounded to Å^3) for compounds (KeyError otherwise, which
    leaves a NaN the test sees)."""

    E = {("NaCl", 22): -2.0, ("NaCl", 24): -2.1, ("NaCl", 18): -1.95, ("KCl", 31): -1.0}

    def predict_structure(self, structures, task="e", batch_size=None):
        one = not isinstance(structures, list)
        out = [{"e": self.energy(s)} for s in ([structures] if one else structures)]
        return out[0] if one else out

    def energy(self, s) -> float:
        if len(s.composition.elements) == 1:
            return 0.0
        return self.E[(s.composition.reduced_formula, round(s.volume / len(s)))]


def test_evaluate_rates_on_a_hand_made_sample_set():
    """Six samples against one training crystal (rock-salt NaCl at -2.0 eV/atom, elements at 0):
    0 rock-salt NaCl expanded 2% (matches training: not novel), -2.1 eV/atom -> E_hull -0.1;
    1 CsCl-type NaCl (novel), -1.95 -> +0.05; 2 the same translated (a duplicate of 1);
    3 rock-salt KCl (novel; K-Cl hull from the elements only), -1.0 -> -1.0;
    4 NaCl with two atoms 0.08 Å apart (structurally invalid); 5 undecodable (None)."""
    from molgen.crystal import metrics

    train = [nacl()]
    samples = [
        xtal.Crystal(nacl().lattice * 1.02, nacl().frac, nacl().species),
        _cscl_nacl(),
        _cscl_nacl(shift=0.37),
        _fcc(6.29, [[0, 0, 0], [0.5, 0.5, 0.5]], [19, 17]),
        xtal.Crystal(nacl().lattice, np.asarray([[0, 0, 0], [0.02, 0.0, 0.0]]), np.asarray([11, 17])),
        None,
    ]
    hull = metrics.Hull(train, model=_FakeCHGNet())
    out, per = metrics.evaluate(samples, train, [nacl()], hull)
    np.testing.assert_array_equal(per["struct_valid"], [1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(per["comp_valid"], [1, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(per["unique"], [1, 1, 0, 1, 0, 0])
    np.testing.assert_array_equal(per["novel"], [0, 1, 0, 1, 0, 0])
    np.testing.assert_allclose(per["e_above_hull"], [-0.1, 0.05, 0.05, -1.0, np.nan, np.nan], atol=1e-9)
    want = {"n_samples": 6, "struct_valid": 4 / 6, "comp_valid": 5 / 6, "valid": 4 / 6, "unique": 3 / 4,
            "novel": 2 / 3, "e_hull_evaluated": 4 / 6, "e_hull_median": -0.025, "stable": 2 / 6, "sun": 1 / 6,
            "msun": 2 / 6, "wdist_n_elements": 0.0}  # fmt: skip
    assert {k: out[k] for k in want} == pytest.approx(want, abs=1e-9)
    dens = [xtal.density(c) for c in samples[:4]]
    assert out["wdist_density"] == pytest.approx(np.mean(np.abs(np.asarray(dens) - xtal.density(nacl()))))


def _cli(config: str, workdir, *overrides):
    cmd = [sys.executable, "-m", "molgen.main", f"--config={config}", f"--workdir={workdir}", *overrides]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@pytest.fixture(scope="session")
def tiny_vae(tiny_csvs, tmp_path_factory):
    """The tiny VAE run `vae` on tiny_csvs and its TFDS folder `tfds`, built once for all
    pytest-xdist workers (the CLI test and the RL chain start from it); read-only."""
    from tests.conftest import built_once

    def build(t):
        _cli("experiments/crystal_vae_mp20.py:tiny", t / "vae", f"--config.data.source={tiny_csvs}",
             f"--config.data.data_dir={t / 'tfds'}")  # fmt: skip

    return built_once(tmp_path_factory, "crystal_vae", build)


def test_cli_vae_predictor_ldm_tiny(tiny_vae, tmp_path):
    """One short run of each model through the real CLI: VAE, predictor on its features, and a
    band-gap conditioned LDM sampling CIFs scored by the predictor."""
    data_dir = str(tiny_vae / "tfds")
    v, p, ld = tiny_vae / "vae", tmp_path / "pred", tmp_path / "ldm"
    ev = json.loads((v / "evaluation.json").read_text())
    t = ev["test"]  # rates against known answers: test_reconstruct_match_rate_on_hand_made_decodings
    matched = t["match_rate"] * t["n"]
    assert t["n"] == 8 and matched == pytest.approx(round(matched), abs=1e-9)  # a count out of the 8 test crystals
    assert np.isfinite(t["rmse"]) == (round(matched) > 0) and 0.0 < t["species_acc"] <= 1.0  # RMSE of matched pairs
    rep = json.loads((pathlib.Path(data_dir) / "crystal_csv").glob("*/1.0.0/build_report.json").__next__().read_text())
    assert rep["skipped"][0]["material_id"] == "mp-broken"
    _cli("experiments/crystal_predictor_mp20.py:tiny", p, f"--config.vae_workdir={v}", f"--config.data_dir={data_dir}")
    ep = json.loads((p / "evaluation.json").read_text())
    assert set(ep["test"]) == {"loss", "mae_band_gap", "baseline_mae_band_gap", "mae_formation_energy_per_atom",
                               "baseline_mae_formation_energy_per_atom"}  # fmt: skip
    _cli("experiments/crystal_ldm_mp20.py:tiny", ld, f"--config.vae_workdir={v}", f"--config.data_dir={data_dir}",
         f"--config.predictor_workdir={p}", "--config.cond.composition=True")  # fmt: skip
    m = json.loads((ld / "metrics.json").read_text())
    assert m["unconditional"]["n_samples"] == 4
    assert set(m["property"]) == {"0", "3"} and "mean_predicted" in m["property"]["3"]
    assert len(list((ld / "samples" / "unconditional").glob("*.cif"))) >= 1
    # the sampling CLI: composition (Sr1Ti1O3 -> 5 atoms) and band gap together, CIFs written
    out = tmp_path / "gen"
    cmd = [sys.executable, "-m", "molgen.crystal.sample", f"--workdir={ld}", f"--out={out}", "--n=3", "--steps=4",
           "--composition=Sr1Ti1O3", "--property=3.0", "--eta=1.0"]  # fmt: skip
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads((out / "samples.json").read_text())
    assert got["n"] == 3 and got["condition"]["prop"] == 3.0 and np.isfinite(got["mean_step_logprob_sum"])
    for cif in out.glob("*.cif"):
        assert len(xtal.parse_cif(cif.read_text(), str(cif)).species) == 5
    for wd in (v, p, ld):
        assert (wd / "config.json").exists() and (wd / "metrics.jsonl").exists()
        assert any((wd / "checkpoints").iterdir())


def test_ldm_needs_a_vae_run(tmp_path):
    cmd = [sys.executable, "-m", "molgen.main", "--config=experiments/crystal_ldm_perov.py:tiny",
           f"--workdir={tmp_path / 'x'}", f"--config.vae_workdir={tmp_path / 'missing'}",
           "--config.vae_config="]  # empty: never build it  # fmt: skip
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ})
    assert r.returncode != 0 and "no finished run" in r.stderr and "no experiment is configured" in r.stderr


def test_chgnet_hull_proxy(tmp_path):
    """A training crystal sits on the CHGNet hull; the same crystal expanded by 15% lies above it;
    KCl gets its own chemical system (K and Cl references, no training compound); the cache is
    reused."""
    from molgen.crystal import metrics

    c = nacl()
    hull = metrics.Hull([c], cache=str(tmp_path / "hull.json"))
    stretched = xtal.Crystal(c.lattice * 1.15, c.frac, c.species)
    e = hull.e_above_hull([c, stretched, None, xtal.Crystal(c.lattice, c.frac, np.asarray([19, 17]))])
    assert abs(e[0]) < 1e-6 or e[0] <= 0.0
    assert e[1] > 0.05
    assert np.isnan(e[2]) and np.isfinite(e[3])  # undecodable; KCl against its elements only
    saved = json.loads((tmp_path / "hull.json").read_text())
    assert set(saved) == {"n_train", "train", "refs"} and set(saved["refs"]) == {"11", "17", "19"}
    again = metrics.Hull([c], model=hull.model, cache=str(tmp_path / "hull.json"))
    np.testing.assert_allclose(again.e_above_hull([stretched]), e[1:2], rtol=1e-4)  # CHGNet batch noise
