"""Conformer evaluation: honest aggregates, one scoring path for evaluation and rewards, the RDKit baseline."""

import json
import math

import numpy as np
import pytest

from molgen.chem import conformers, enriched
from molgen.lm import evaluate, rewards

PARACETAMOL = "CC(=O)Nc1ccc(O)cc1"


def _rec(n_valid, cov_r, mat_r, cov_p, mat_p):
    return dict(n_gen=4, n_valid=n_valid, cov_r=cov_r, mat_r=mat_r, cov_p=cov_p, mat_p=mat_p, min_rmsd=[])


def test_mat_over_all_molecules_counts_a_failed_molecule_at_the_cap():
    records = [
        _rec(2, 0.5, 1.0, 0.5, 1.2),
        _rec(0, 0.0, math.nan, 0.0, math.nan),  # no valid sample
        _rec(1, 0.0, 4.0, 0.0, 4.5),  # valid but worse than the cap: capped too
    ]
    s = evaluate.summarize(records, delta=0.75, mat_cap=3.0)
    assert s["mat_r"] == pytest.approx((1.0 + 3.0 + 3.0) / 3)
    assert s["mat_r_valid"] == pytest.approx((1.0 + 4.0) / 2)
    assert s["mat_p"] == pytest.approx((1.2 + 3.0 + 3.0) / 3)
    assert s["cov_r"] == pytest.approx(0.5 / 3) and s["cov_p"] == pytest.approx(0.5 / 3)
    assert s["no_valid_share"] == pytest.approx(1 / 3)
    assert s["validity"] == pytest.approx(3 / 12)
    assert "rdkit_etkdg" not in s
    # standard errors over molecules, by hand: MAT-R (all) values 1, 3, 3 -> sd 1.1547, / sqrt 3
    assert s["mat_r_se"] == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + 2 * (3 - 7 / 3) ** 2) / 2) / math.sqrt(3))
    assert s["cov_r_se"] == pytest.approx(math.sqrt(((0.5 - 1 / 6) ** 2 + 2 * (1 / 6) ** 2) / 2) / math.sqrt(3))
    assert s["mat_r_valid_se"] == pytest.approx(math.sqrt(2 * 1.5**2) / math.sqrt(2))


def _texts_and_refs():
    ref = enriched.embed_conformers(PARACETAMOL, 3, seed=5)
    units = [enriched.encode(ref, c.GetId()) for c in ref.GetConformers()]
    smi = units[0][0]
    other = enriched.encode(enriched.embed_conformers("CCO", 1, seed=1))
    texts = [
        enriched.unit_text(smi, units[0][1]),
        enriched.unit_text(smi, units[1][1].replace(",", ",,", 1)),  # broken block
        enriched.unit_text(*other),  # wrong graph
        enriched.unit_text(smi, units[2][1]),
    ]
    return smi, [u[1] for u in units], texts


def test_evaluation_and_rewards_score_through_one_function():
    smi, refs, texts = _texts_and_refs()
    rec = conformers.score_molecule((smi, refs, texts, 0.75))
    judged = rewards.judge_group((smi, refs, texts, {}))
    assert [r["reason"] for r in judged["records"]] == ["valid", "decode", "graph", "valid"]
    assert rec["reasons"] == {"valid": 2, "decode": 1, "graph": 1}
    valid_min = [r["min_rmsd"] for r in judged["records"] if r["valid"]]
    np.testing.assert_allclose(rec["min_rmsd"], valid_min, atol=1e-9)
    assert max(valid_min) < 1e-3  # both are reference conformers, truncated to 1e-4 Å
    for k in ("cov_r", "mat_r", "cov_p", "mat_p"):
        assert rec[k] == pytest.approx(judged["cov"][k])
    # two of three references reproduced: COV-R is 2/3 unless the third lies within delta of them
    assert rec["cov_r"] >= 2 / 3 and rec["cov_p"] == 1.0


def test_rdkit_baseline_rows_in_the_evaluation_summary():
    smi, refs, texts = _texts_and_refs()
    rec = conformers.score_molecule((smi, refs, texts, 0.75, 12345))
    for key in ("rdkit_etkdg", "rdkit_etkdg_mmff"):
        assert rec[key]["n_valid"] == len(texts) and rec[key]["n_ref"] == 3
    # the references are ETKDG+MMFF conformers: MMFF from other seeds finds one of their minima
    assert rec["rdkit_etkdg_mmff"]["best_rmsd"] < 0.3
    s = evaluate.summarize([rec, rec], delta=0.75)
    assert s["rdkit_etkdg_mmff"]["cov_r"] == pytest.approx(rec["rdkit_etkdg_mmff"]["cov_r"])
    assert s["rdkit_etkdg"]["no_valid_share"] == 0.0


def test_curves_join_training_evaluations_and_the_final_one(tmp_path):
    rows = [
        {"step": 50, "train/loss": 2.0},
        {"step": 100, "train/loss": 1.8},
        {"step": 100, "eval/loss": 1.7, "eval/cov_r": 0.0, "eval/mat_r": 1.9},
        {"step": 200, "train/loss": 1.6},
        {"step": 200, "eval/loss": 1.5},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "eval").mkdir()
    final = {"cov_r": 0.1, "mat_r": 1.2, "rdkit_etkdg": {"cov_r": 0.3, "mat_r": 0.9}}
    (tmp_path / "eval" / "conformers.json").write_text(json.dumps({"summary": final, "molecules": []}))
    c = evaluate.curves(str(tmp_path))  # a run without step folders: the final one at the last step
    assert c["train"] == [(50, 2.0), (100, 1.8), (200, 1.6)]
    assert c["eval_loss"] == [(100, 1.7), (200, 1.5)]
    assert c["conformers"] == [(200, final)]
    for step, summary in ((100, {"cov_r": 0.0, "mat_r": 1.9}), (200, final)):
        (tmp_path / "eval" / f"step_{step}").mkdir()
        (tmp_path / "eval" / f"step_{step}" / "conformers.json").write_text(json.dumps({"summary": summary}))
    rows.append({"step": 300, "train/loss": 1.5})  # a longer run on the same workdir, under way
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    c = evaluate.curves(str(tmp_path))
    assert [s for s, _ in c["conformers"]] == [100, 200]  # not the old final at step 300
    assert c["conformers"][0][1]["mat_r"] == 1.9 and c["conformers"][1][1]["cov_r"] == 0.1
    evaluate.plot_curves([str(tmp_path)], tmp_path / "plots" / "curves.png")
    assert (tmp_path / "plots" / "curves.png").stat().st_size > 10_000
