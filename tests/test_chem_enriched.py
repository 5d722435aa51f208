"""Enriched-SMILES codec and tokenizer: exact round trips on thousands of MOSES molecules."""

import numpy as np
import pytest
from rdkit import Chem

from molgen.chem import enriched as E
from molgen.chem import moses
from molgen.lm import tokenizer as T

SPECIAL = [
    "C[C@@H](N)C(=O)O",  # stereo centre
    "C/C=C/C(=O)[O-]",  # E/Z bond, charge
    "C[N+](C)(C)C",  # quaternary N
    "c1cc[nH]c1",  # aromatic NH in brackets
    "[NH3+]CC(=O)[O-]",  # zwitterion
    "O=[N+]([O-])c1ccc(Cl)cc1Br",  # nitro, halogens
    "C[S@@](=O)c1ccccc1",  # chiral sulfoxide
    "F[C@H]1C[C@@H]2CC[C@H]1C2",  # bicyclic stereo
    "c1ccc2c(c1)-c1ccccc1-2.[Na+]",  # disconnected, metal ion
    "C1CC2CCC1CC2" + "C" * 3,
    "O=C1NC(=O)c2ccccc21",
    "[2H]C([2H])([2H])O",  # isotopes (fall back to character tokens)
]


def _random_conformer(mol, rng):
    mol = Chem.Mol(mol)
    conf = Chem.Conformer(mol.GetNumAtoms())
    for i, p in enumerate(rng.normal(scale=4.0, size=(mol.GetNumAtoms(), 3))):
        conf.SetAtomPosition(i, p.tolist())
    mol.AddConformer(conf, assignId=True)
    return mol


def _roundtrip(mol):
    smiles, enr = E.encode(mol)
    text = E.unit_text(smiles, enr)
    assert T.decode(T.encode(text)) == text
    assert T.grammar_accepts(T.encode(text))  # constrained decoding never forbids a real unit
    dec = E.decode(enr)
    assert E.same_graph(dec, smiles)
    assert E.same_graph(dec, mol)
    Chem.MolToSmiles(mol)  # sets _smilesAtomOutputOrder on this copy
    order = list(mol.GetPropsAsDict(True, True)["_smilesAtomOutputOrder"])
    err = np.abs(dec.GetConformer().GetPositions() - mol.GetConformer().GetPositions()[order])
    assert err.max() < 1e-4 + 1e-9
    return len(T.encode(text))


def test_fmt_truncates_not_rounds():
    assert E.fmt_coord(2.77049) == "2.7704"
    assert E.fmt_coord(-1.23456) == "-1.2345"
    assert E.fmt_coord(2.7704) == "2.7704"  # float noise (27703.9999...) must not lose a digit
    assert E.fmt_coord(1.2110) == "1.211"
    assert E.fmt_coord(-0.00001) == "0.0"


def test_special_molecules_roundtrip():
    rng = np.random.default_rng(0)
    for smi in SPECIAL:
        mol = Chem.MolFromSmiles(smi)
        _roundtrip(_random_conformer(mol, rng))


def test_thousands_of_moses_molecules_roundtrip():
    rng = np.random.default_rng(1)
    smiles = moses.read_smiles("test")
    picks = rng.choice(len(smiles), 3000, replace=False)
    n_tokens = [_roundtrip(_random_conformer(Chem.MolFromSmiles(smiles[i]), rng)) for i in picks]
    assert 150 < np.mean(n_tokens) < 400  # vs ~550 with Qwen3's BPE (REFERENCE.md)


def test_real_conformers_roundtrip():
    for i, smi in enumerate(moses.read_smiles("test")[:30]):
        mol = E.embed_conformers(smi, 2, seed=i)
        for conf in mol.GetConformers():
            m = Chem.Mol(mol, confId=conf.GetId())
            _roundtrip(m)


def test_bare_bracket_atom_is_rejected_clearly():
    mol = Chem.MolFromSmiles("[CH2]C")  # radical: canonical SMILES writes [CH2], fine
    _roundtrip(_random_conformer(mol, np.random.default_rng(0)))
    mol = Chem.MolFromSmiles("[C]")
    with pytest.raises(E.EnrichedError, match="ambiguous"):
        E.encode(_random_conformer(mol, np.random.default_rng(0)))


def test_decode_errors_name_the_problem():
    with pytest.raises(E.EnrichedError, match="coordinate"):
        E.decode("[C]<0.0,0.0,0.0>[C]")
    with pytest.raises(E.EnrichedError, match="cannot parse"):
        E.decode("[C]<0.0,0.0,0.0>((")
    with pytest.raises(E.EnrichedError, match="parse SMILES"):
        E.embed_conformers("C1CC(", 1, 0)


def test_tokenizer_roundtrips_arbitrary_ascii():
    # text the grammar must accept: coordinate triples encode produces, and text with no block
    accepted = ["[SMILES]Xx?[/SMILES]", "%12C1", "<1,2,3>", "<1.2,3,4.5>", "[C]<-2.7704,1.211,0.3>", ""]
    # not coordinate triples (two coordinates; -100 and 5 decimals are out of range): they fall
    # back to character tokens, and the bare `<` that opens them is forbidden at once
    rejected = ["<1.2,3>", "<-100.5,2.33333,4.1>"]
    for text in accepted + rejected:
        assert T.decode(T.encode(text)) == text, text
    for text in accepted:
        assert T.grammar_accepts(T.encode(text)), text  # constrained decoding never forbids a real unit
    for text in rejected:
        assert T.vocab()[T.encode(text)[0]] == "<", text
        assert T.grammar_violation(T.encode(text)) == (0, 0), text
        assert not T.grammar_accepts(T.encode(text)), text
    with pytest.raises(ValueError, match="no token"):
        T.encode("Cé")


def test_vocabulary_is_fixed_and_coordinates_are_compact():
    assert T.vocab()[: len(T.SPECIALS)] == T.SPECIALS
    ids = T.encode("[C]<-2.7704,1.211,0.3>")
    assert [T.vocab()[i] for i in ids] == ["[C]", "<-2", ".77", "04", ",1", ".21", "1", ",0", ".3", ">"]
    assert T.vocab_size() % 128 == 0 and T.vocab_size() >= len(T.vocab())


def test_embed_real_molecule_geometry_is_sane():
    mol = E.embed_conformers("CCO", 1, seed=0)
    d = np.linalg.norm(np.diff(mol.GetConformer().GetPositions(), axis=0), axis=1)
    assert np.all((d > 1.3) & (d < 1.6))
