"""molgen.lm.generate: input formats, per-molecule reasons, scoring against known conformers, the real CLI."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
from rdkit import Chem
from rdkit.Chem import AllChem

from molgen.chem import conformers, enriched
from molgen.lm import generate as gen

ROOT = pathlib.Path(__file__).resolve().parents[1]
PARACETAMOL = "CC(=O)Nc1ccc(O)cc1"


def _embedded(smiles: str, n: int, seed: int = 7) -> Chem.Mol:
    return enriched.embed_conformers(smiles, n, seed=seed)


def _sdf(path, mols_and_names):
    w = Chem.SDWriter(str(path))
    for m, name in mols_and_names:
        for c in m.GetConformers():
            m.SetProp("_Name", name)
            w.write(m, confId=c.GetId())
    w.close()


def test_prepare_gives_each_bad_molecule_its_reason():
    mols = [
        gen.prepare(gen.Molecule(k, s), context=512)
        for k, s in [
            ("ok", "OC(=O)c1ccccc1"),
            ("bad", "C1CC(("),
            ("tin", "C[Sn](C)C"),
            ("salt", "[Na+].[Cl-]"),
            ("iso", "[13CH3]O"),
            ("long", "C" * 120),
            ("empty", ""),
        ]  # fmt: skip
    ]
    why = {m.id: m.reason for m in mols}
    assert why["ok"] == "" and mols[0].smiles == "O=C(O)c1ccccc1" and 80 < mols[0].est_tokens < 160
    assert why["bad"] == "unparsable SMILES: 'C1CC(('"
    assert "[Sn]" in why["tin"] and "[Na+]" in why["salt"] and "[13CH3]" in why["iso"]
    assert why["long"].startswith("longer than the model's context") and why["long"].endswith("context 512")
    assert why["empty"].startswith("unparsable SMILES")


def test_read_inputs_smi_csv_sdf(tmp_path):
    (tmp_path / "a.smi").write_text("# a comment\nCCO ethanol\n\nc1ccccc1\n")
    smi = gen.read_inputs(str(tmp_path / "a.smi"), ("CCN",))
    assert [(m.id, m.input_smiles) for m in smi] == [("ethanol", "CCO"), ("line4", "c1ccccc1"), ("smiles1", "CCN")]
    (tmp_path / "a.csv").write_text("name,SMILES\nx1,CCO\nx2,CC(\n")
    assert [(m.id, m.input_smiles) for m in gen.read_inputs(str(tmp_path / "a.csv"))] == [("x1", "CCO"), ("x2", "CC(")]
    (tmp_path / "b.csv").write_text("id,smi\n1,CCO\n")
    with pytest.raises(ValueError, match="b.csv: no 'smiles' column"):
        gen.read_inputs(str(tmp_path / "b.csv"))
    with pytest.raises(ValueError, match="unknown format '.txt'"):
        (tmp_path / "c.txt").write_text("CCO\n")
        gen.read_inputs(str(tmp_path / "c.txt"))
    with pytest.raises(ValueError, match="missing.smi: no such file"):
        gen.read_inputs(str(tmp_path / "missing.smi"))
    # SDF: two records of one molecule pool into a two-conformer reference; a broken record is named
    _sdf(tmp_path / "r.sdf", [(_embedded(PARACETAMOL, 2), "para"), (_embedded("CCO", 1), "eth")])
    text = (tmp_path / "r.sdf").read_text()
    (tmp_path / "r.sdf").write_text(
        text + "broken\n  junk\n\n  1  0  0  0  0  0  0  0  0  0999 V2000\n  garbage\nM  END\n$$$$\n"
    )
    recs = gen.read_inputs(str(tmp_path / "r.sdf"))
    assert [m.id for m in recs] == ["para", "eth", "record4"]
    assert recs[0].ref.GetNumConformers() == 2 and recs[1].ref.GetNumConformers() == 1
    assert recs[2].reason == "SDF record does not parse: record 4 of r.sdf"


def test_collect_scores_known_texts_against_the_reference(tmp_path):
    ref = _embedded(PARACETAMOL, 2, seed=3)
    smi, enr0 = enriched.encode(ref, ref.GetConformers()[0].GetId())
    other_smi, other_enr = enriched.encode(_embedded("CCO", 1))
    mol = gen.prepare(gen.Molecule("para", smi, ref=Chem.Mol(ref)), context=512)
    texts = [
        enriched.unit_text(smi, enr0),  # reference conformer 0 itself (coordinates truncated to 1e-4 Å)
        enriched.unit_text(smi, enr0.replace("<", "<<", 1)),  # a broken coordinate block
        enriched.unit_text(other_smi, other_enr),  # another molecule: wrong graph
        enriched.prompt_text(smi) + enr0,  # no closing tag
    ]
    records, sdf, sdf_mmff = gen.collect([mol], texts, n=4, delta=0.75, relax="mmff", baseline_seed=0)
    (rec,) = records
    assert rec["valid"] == 1 and rec["validity"] == 0.25
    assert rec["failures"] == {"decode": 1, "graph": 1, "tags": 1}
    assert rec["best_rmsd"] < 1e-3 and rec["n_ref"] == 2
    # conformer 0 covers itself; it covers conformer 1 only if the two lie within delta
    d01 = conformers.best_rms(ref, ref, probe_id=ref.GetConformers()[1].GetId(), ref_id=ref.GetConformers()[0].GetId())
    assert rec["cov_r"] == pytest.approx(0.5 + 0.5 * (d01 <= 0.75))
    assert rec["mat_r"] == pytest.approx((rec["best_rmsd"] + d01) / 2, abs=1e-3)
    assert rec["cov_p"] == 1.0
    (tmp_path / "o.sdf").write_text("".join(sdf))
    (back,) = list(Chem.SDMolSupplier(str(tmp_path / "o.sdf")))
    assert back.GetProp("input_id") == "para" and back.GetProp("sample_index") == "0"
    assert float(back.GetProp("rmsd")) < 1e-3 and Chem.MolToSmiles(back) == smi
    # MMFF moves the ETKDG+MMFF reference a little at most, and is reported on its own
    assert rec["mmff"]["valid"] == 1 and rec["mmff"]["failed"] == 0 and len(sdf_mmff) == 1
    assert rec["mmff"]["best_rmsd"] < 0.5 and "relaxed" in sdf_mmff[0]
    # the RDKit baseline: 4 ETKDG conformers from other seeds; after MMFF one lands near a reference
    assert rec["rdkit_etkdg"]["valid"] == 4 and rec["rdkit_etkdg"]["n_ref"] == 2
    assert rec["rdkit_etkdg_mmff"]["best_rmsd"] < 0.5
    assert gen.summarize(records, "rdkit_etkdg")["generated"] == 4


def test_summary_counts_skipped_and_molecules_without_valid_samples():
    records = [
        {"id": "a", "reason": "unparsable SMILES: 'x'"},
        {"id": "b", "n": 4, "valid": 0, "failures": {"decode": 4}},
        {"id": "c", "n": 4, "valid": 2, "failures": {"graph": 2}, "cov_r": 1.0, "mat_r": 0.5, "cov_p": 0.5,
         "mat_p": 0.9, "best_rmsd": 0.3},
    ]  # fmt: skip
    s = gen.summarize(records)
    assert (s["molecules"], s["prompted"], s["skipped"], s["generated"], s["valid"]) == (3, 2, 1, 8, 2)
    assert s["validity"] == 0.25 and s["molecules_without_valid_sample"] == 1
    assert s["skipped_reasons"] == {"unparsable SMILES": 1}
    assert s["with_reference"] == 1 and s["cov_r"] == 1.0 and s["best_rmsd"] == 0.3


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    wd = tmp_path_factory.mktemp("gen") / "lm"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "molgen.main",
        "--config=experiments/lm_tiny.py",
        f"--workdir={wd}",
        "--config.eval.num_molecules=0",
        "--config.data.seq_len=512",
    ]  # fmt: skip; MOSES units fit in 512
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return wd


def _generate(*args, timeout=600):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "molgen.lm.generate", *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_cli_on_a_trained_run_reports_every_molecule(tmp_path, tiny_run):
    from molgen.chem import moses

    test = moses.read_smiles("test")[:3]
    (tmp_path / "in.smi").write_text(
        "".join(f"{s} mol{i}\n" for i, s in enumerate(test)) + "C1CC(( broken\nC[Sn](C)C tin\n"
    )
    _sdf(tmp_path / "ref.sdf", [(_embedded(test[0], 2), "ref0")])
    out = tmp_path / "o" / "x.sdf"
    res = _generate(f"--workdir={tiny_run / 'checkpoints' / '12'}", f"--input={tmp_path / 'in.smi'}", "--n=3",
                    f"--out={out}", "--relax=mmff", "--seed=1")  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert "generate: 9/9 samples" in res.stderr
    report = json.loads(out.with_suffix(".json").read_text())
    s, mols = report["summary"], {m["id"]: m for m in report["molecules"]}
    assert (s["molecules"], s["prompted"], s["skipped"], s["generated"]) == (5, 3, 2, 9)
    assert s["skipped_reasons"] == {"unparsable SMILES": 1, "element or charge not in the tokenizer's vocabulary": 1}
    assert mols["broken"]["reason"] == "unparsable SMILES: 'C1CC(('"
    assert "[Sn]" in mols["tin"]["reason"]
    for i in range(3):
        m = mols[f"mol{i}"]
        assert m["n"] == 3 and m["valid"] + sum(m["failures"].values()) == 3 and "mmff" in m
    assert out.read_text().count("$$$$") == s["valid"]  # the tiny model writes few valid conformers
    assert out.with_suffix(".mmff.sdf").exists()
    # an SDF input: its coordinates are the reference, so RMSD and COV/MAT are reported
    res = _generate(f"--workdir={tiny_run}", f"--input={tmp_path / 'ref.sdf'}", "--n=2", f"--out={tmp_path / 'r.sdf'}",
                    "--drop_stereo")  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    (m,) = json.loads((tmp_path / "r.json").read_text())["molecules"]  # --drop_stereo: one molecule, 2 refs
    assert m["id"] == "ref0" and m["n_ref"] == 2 and "cov_r" in m and "mat_r" in m


def test_cli_bad_flags_and_files_exit_nonzero_naming_them(tmp_path, tiny_run):
    res = _generate(f"--workdir={tiny_run}", f"--input={tmp_path / 'nope.smi'}", timeout=120)
    assert res.returncode != 0 and "nope.smi: no such file" in res.stderr
    res = _generate(f"--workdir={tmp_path}", "--smiles=CCO", timeout=120)
    assert res.returncode != 0 and "no model_config.json" in res.stderr
    res = _generate(f"--workdir={tiny_run}", "--smiles=CCO", "--relax=amber", timeout=120)
    assert res.returncode != 0 and "relax" in res.stderr


def test_mmff_failure_on_a_sampled_geometry_is_counted_not_raised():
    # a conformer the quickstart model wrote (moses_test_1) on which RDKit's MMFF BFGS raises
    # "Invariant Violation: bad direction in linearSearch"
    mol = Chem.MolFromMolFile(str(ROOT / "tests" / "data" / "mmff_bfgs_failure.mol"))
    h = Chem.AddHs(mol, addCoords=True)
    with pytest.raises(RuntimeError, match="Invariant"):
        AllChem.MMFFOptimizeMolecule(h, maxIters=500)
    assert conformers.mmff_relax(mol) is None
    smi = Chem.MolToSmiles(mol)
    text = enriched.unit_text(smi, enriched.encode(mol)[1])
    records, _, sdf_mmff = gen.collect([gen.prepare(gen.Molecule("m", smi), 512)], [text], 1, 0.75, relax="mmff")
    assert records[0]["valid"] == 1 and records[0]["mmff"] == {"valid": 0, "failed": 1} and sdf_mmff == []
