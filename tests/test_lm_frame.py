"""The LM's data knobs (issue 22): `data.frame` (raw / principal axes) and `data.decimals` (1-4),
applied to the enriched conformer by `enriched.reframe` on the fly in the training pipeline."""

import re

import ml_collections
import numpy as np
import pytest
from rdkit import Chem
from rdkit.Chem import rdMolAlign

from molgen.chem import enriched as E
from molgen.chem import moses
from molgen.lm import data as lm_data
from molgen.lm import tokenizer as T

CHIRAL = ["C[C@@H](N)C(=O)O", "F[C@H]1C[C@@H]2CC[C@H]1C2", "C[C@H](O)[C@@H](N)c1ccccc1"]


def _coords(enr: str) -> np.ndarray:
    return np.array([[float(v) for v in m.groups()[1:]] for m in E._ENRICHED_ATOM_RE.finditer(enr)])


def _units(smiles, seed0=0):
    out = []
    for i, smi in enumerate(smiles):
        mol = E.embed_conformers(smi, 1, seed=seed0 + i)
        out.append((mol, *E.encode(mol)))
    return out


@pytest.fixture(scope="module")
def real_units():
    """(mol, canonical SMILES, enriched) of RDKit conformers: 5 MOSES test molecules and 3 chiral ones."""
    return _units(moses.read_smiles("test")[:5] + CHIRAL)


def _rotation(rng) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q  # proper: det +1


def _with_coords(mol, xyz):
    mol = Chem.Mol(mol)
    conf = mol.GetConformer()
    for i, p in enumerate(xyz):
        conf.SetAtomPosition(i, p.tolist())
    return mol


def _stereo_from_3d(mol) -> str:
    mol = Chem.Mol(mol)
    Chem.AssignStereochemistryFrom3D(mol)
    return Chem.MolToSmiles(mol, isomericSmiles=True)


def test_fmt_coord_truncates_to_each_precision():
    assert [E.fmt_coord(-1.23456, d) for d in (1, 2, 3, 4)] == ["-1.2", "-1.23", "-1.234", "-1.2345"]
    assert [E.fmt_coord(2.7704, d) for d in (1, 2, 3, 4)] == ["2.7", "2.77", "2.77", "2.7704"]  # no float noise
    assert [E.fmt_coord(0.0999, d) for d in (1, 2, 3)] == ["0.0", "0.09", "0.099"]  # truncated, not rounded
    assert E.fmt_coord(-0.05, 1) == "0.0" and E.fmt_coord(-0.05, 2) == "-0.05"
    assert E.fmt_coord(-1.23456) == E.fmt_coord(-1.23456, 4) == "-1.2345"  # the default is unchanged


def test_reframe_decimals_rewrites_only_the_coordinates():
    enr = "[C]<-1.2345,2.7704,0.0009>1[C]<1.0,-0.05,3.1416>[O]<12.3456,-10.9999,0.5>1"
    assert E.reframe(enr) is enr and E.reframe(enr, "raw", 4) == enr  # raw / 4: the input itself
    assert E.reframe(enr, "raw", 3) == "[C]<-1.234,2.77,0.0>1[C]<1.0,-0.05,3.141>[O]<12.345,-10.999,0.5>1"
    assert E.reframe(enr, "raw", 2) == "[C]<-1.23,2.77,0.0>1[C]<1.0,-0.05,3.14>[O]<12.34,-10.99,0.5>1"
    assert E.reframe(enr, "raw", 1) == "[C]<-1.2,2.7,0.0>1[C]<1.0,0.0,3.1>[O]<12.3,-10.9,0.5>1"
    for frame, d in (("raw", 0), ("raw", 5), ("raw", True), ("raw", 2.0), ("inertia", 4), ("Principal", 4)):
        with pytest.raises(ValueError, match="frame" if d == 4 else "decimals"):
            E.reframe(enr, frame, d)


def test_principal_frame_of_real_conformers(real_units):
    for _, smi, enr in real_units:
        out = E.reframe(enr, "principal")
        assert E.strip_coords(out) == E.strip_coords(enr)  # the skeleton is untouched
        p = _coords(out)
        assert np.abs(p.mean(0)).max() < 1e-4  # centred (the truncation moves it by < 1e-4)
        cov = np.cov(p.T, bias=True)
        var = np.diag(cov)
        assert var[0] > var[1] > var[2] > 0  # axis 1 = largest spread
        assert np.abs(cov - np.diag(var)).max() < 1e-3 * var[0]  # diagonal: principal axes
        m3, scale = (p**3).sum(0), (np.abs(p) ** 3).sum(0)
        assert (m3[:2] > 1e-6 * scale[:2]).all(), (smi, m3)  # sign rule: third moments of axes 1-2 > 0
        # a proper rotation: RMSD ~0 without reflection, the same stereo read from 3D
        orig, new = E.decode(enr), E.decode(out)
        assert rdMolAlign.AlignMol(new, orig) < 1e-3
        assert _stereo_from_3d(new) == _stereo_from_3d(orig)
    # the checks can fail: a mirror image is far from the original and inverts the stereocentres
    mol, smi, enr = real_units[-1]
    mirror = E.encode(_with_coords(mol, mol.GetConformer().GetPositions() * [1, 1, -1]))[1]
    assert rdMolAlign.AlignMol(E.decode(mirror), E.decode(enr)) > 0.1
    assert _stereo_from_3d(E.decode(mirror)) != _stereo_from_3d(E.decode(enr))


def test_principal_frame_does_not_depend_on_the_input_frame(real_units):
    rng = np.random.default_rng(0)
    for mol, smi, enr in real_units:
        x = mol.GetConformer().GetPositions()
        y = x @ _rotation(rng).T + rng.normal(scale=10.0, size=3)
        np.testing.assert_allclose(E.principal_frame(y), E.principal_frame(x), atol=1e-9)  # the rule itself
        smi2, enr2 = E.encode(_with_coords(mol, y))
        assert smi2 == smi
        a, b = E.reframe(enr, "principal"), E.reframe(enr2, "principal")
        assert E.strip_coords(a) == E.strip_coords(b)
        np.testing.assert_allclose(_coords(a), _coords(b), atol=2e-3)  # the inputs differ by truncation
        # a mirror image is a different frame: the principal frame keeps it mirrored (axis 3 flipped)
        mirror = E.encode(_with_coords(mol, x * [-1, 1, 1]))[1]
        pm, pa = _coords(E.reframe(mirror, "principal")), _coords(a)
        np.testing.assert_allclose(pm[:, :2], pa[:, :2], atol=2e-3)
        np.testing.assert_allclose(pm[:, 2], -pa[:, 2], atol=2e-3)


@pytest.mark.parametrize(
    "enr",
    [
        "[C]<1.5,-2.0,3.25>",  # one atom
        "[C]<1.0,2.0,3.0>[O]<2.0,2.0,3.0>",  # two atoms: the degenerate axes 2-3
        "[O]<0.0,0.0,-1.16>=[C]<0.0,0.0,0.0>=[O]<0.0,0.0,1.16>",  # linear and symmetric: no third moment
        "[C]<0.0,0.0,0.0>([C]<0.89,0.89,0.89>)([C]<-0.89,-0.89,0.89>)([C]<-0.89,0.89,-0.89>)[C]<0.89,-0.89,-0.89>",
        "[c]<1.39,0.0,0.0>1[c]<0.695,1.2038,0.0>[c]<-0.695,1.2038,0.0>[c]<-1.39,0.0,0.0>[c]<-0.695,-1.2038,0.0>"
        "[c]<0.695,-1.2038,0.0>1",
    ],
    ids=["one_atom", "two_atoms", "linear", "isotropic", "benzene"],
)
def test_principal_frame_of_degenerate_molecules(enr):
    out = E.reframe(enr, "principal", 4)
    assert E.strip_coords(out) == E.strip_coords(enr) and out == E.reframe(enr, "principal", 4)
    p, x = _coords(out), _coords(enr)
    assert np.abs(p.mean(0)).max() < 1e-4
    d = lambda c: np.linalg.norm(c[:, None] - c[None], axis=-1)  # noqa: E731
    np.testing.assert_allclose(d(p), d(x), atol=1e-3)  # a rigid motion
    if len(x) == 2:
        assert out == "[C]<0.5,0.0,0.0>[O]<-0.5,0.0,0.0>"  # fallback: the first atom off an axis is positive


def test_tokens_per_unit_by_decimals():
    """2 decimals cost one token less per coordinate than 4; 3 decimals save only where the 3rd and
    4th digits are zeros (the tokenizer writes decimals in pairs)."""
    smiles = moses.read_smiles("test")[:200]
    units = [E.encode(E.embed_conformers(s, 1, seed=i, mmff=False)) for i, s in enumerate(smiles)]
    n = {d: np.array([len(T.encode(E.unit_text(s, E.reframe(e, "raw", d)))) for s, e in units]) for d in (1, 2, 3, 4)}
    for (_, e), n2, n4 in zip(units, n[2], n[4], strict=True):
        values = [v for block in re.findall(r"<([^>]*)>", e) for v in block.split(",")]
        long = sum(len(v.split(".")[1]) > 2 for v in values)
        assert n4 - n2 == long  # exactly one token per coordinate with a 3rd or 4th digit
    assert (n[1] == n[2]).all()
    mean = {d: n[d].mean() for d in n}
    assert mean[2] < 0.85 * mean[4] and 0.97 * mean[4] < mean[3] <= mean[4], mean


@pytest.mark.parametrize("frame", ["raw", "principal"])
def test_grammar_and_tokenizer_accept_every_precision(real_units, frame):
    for _, smi, enr in real_units:
        for d in (1, 2, 3, 4):
            text = E.unit_text(smi, E.reframe(enr, frame, d))
            ids = T.encode(text)
            assert T.decode(ids) == text and T.grammar_accepts(ids), (frame, d, text[:80])
            assert E.same_graph(E.decode(E.split_unit(text)[1]), smi)


def test_pipeline_applies_the_knobs_and_checks_them(real_units):
    source = [{"smiles": smi, "enriched": enr} for _, smi, enr in real_units]
    it = iter(lm_data.pipeline(source, global_batch=2, seq_len=512, seed=0, streams=[0], n_streams=1, train=False,
                               packing_bins=2, frame="principal", decimals=2))  # fmt: skip
    row = next(it)
    tokens, seg = row["tokens"][0], row["segment_ids"][0]
    first = T.decode(tokens[seg == 1])
    assert first == E.unit_text(source[0]["smiles"], E.reframe(source[0]["enriched"], "principal", 2))
    assert lm_data._tokenize(source[0], "sequential")["tokens"].tolist() == [
        *T.encode(E.unit_text(source[0]["smiles"], source[0]["enriched"])), T.EOT_ID]  # fmt: skip
    cfg = ml_collections.ConfigDict(dict(seq_len=8))
    assert lm_data.data_knobs(cfg) == ("raw", 4)  # a config written before the fields
    cfg.frame, cfg.decimals = "principal", 3
    assert lm_data.data_knobs(cfg) == ("principal", 3)
    cfg.frame = "pca"
    with pytest.raises(ValueError, match=r"config\.data\.frame='pca'"):
        lm_data.data_knobs(cfg)
    with pytest.raises(ValueError, match=r"config\.data\.decimals=5"):
        lm_data.pipeline(source, global_batch=2, seq_len=64, seed=0, streams=[0], n_streams=1, decimals=5)


def test_experiment_configs_inherit_one_frame_and_accept_overrides():
    import experiments.lm_pretrain_moses as pretrain_moses
    import experiments.lm_sft as lm_sft
    import experiments.lm_tiny as lm_tiny

    # every LM experiment inherits the quickstart's choice, so a post-training run reads its
    # pretraining model's text format
    for cfg in (lm_tiny.get_config(), pretrain_moses.get_config("gpu_06b"), lm_sft.get_config("tiny")):
        assert (cfg.data.frame, cfg.data.decimals) == ("principal", 2)
    cfg = lm_tiny.get_config()
    cfg.data.frame, cfg.data.decimals = "raw", 4  # what --config.data.frame=raw --config.data.decimals=4 sets
    assert lm_data.data_knobs(cfg.data) == ("raw", 4)
    with pytest.raises(TypeError):
        cfg.data.decimals = "two"  # ml_collections keeps the int type of the default


def test_units_longer_than_a_row_are_skipped_and_counted_not_cut(real_units):
    source = [{"smiles": smi, "enriched": enr, "mol_index": i} for i, (_, smi, enr) in enumerate(real_units)]
    lengths = [len(T.encode(E.unit_text(x["smiles"], x["enriched"]))) + 1 for x in source]
    seq_len = sorted(lengths)[len(lengths) // 2]  # about half the units do not fit
    long_ones = [x["mol_index"] for x, n in zip(source, lengths, strict=True) if n > seq_len]
    assert 0 < len(long_ones) < len(source)
    assert lm_data.overlong(source, seq_len) == long_ones
    rows = lm_data.pipeline(source, global_batch=1, seq_len=seq_len, seed=0, streams=[0], n_streams=1, train=False,
                            packing_bins=1)  # fmt: skip
    seen = []
    for row, _ in zip(rows, range(len(source)), strict=False):
        toks, seg = row["tokens"][0], row["segment_ids"][0]
        for s in set(seg[seg > 0].tolist()):
            text = T.decode(toks[seg == s])
            assert text.endswith("[/CONFORMER]"), text[-40:]  # whole units only
            seen.append(text)
    fits = {E.unit_text(x["smiles"], x["enriched"]) for x, n in zip(source, lengths, strict=True) if n <= seq_len}
    assert set(seen) == fits
