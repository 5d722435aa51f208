"""Conformer evaluation of a language model on held-out MOSES test molecules.

For each test molecule the reference ensemble is its RDKit ETKDG+MMFF conformers in the
test split (M of them); the model samples `samples_per_ref * M` conformers from the
prompt `[SMILES]...[/SMILES][CONFORMER]`. Written to `workdir/eval/`:
`conformers.json` (validity, RMSD, COV/MAT per molecule and overall, and with `eval.baseline`
the same for RDKit ETKDGv3 conformers drawn with other seeds, raw and MMFF-relaxed, as many per
molecule as the model samples; with `eval.relax="mmff"` also for the model's own valid conformers
after MMFF94, "lm_mmff"), `samples.sdf` (valid generated conformers) and plots.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import pathlib
from collections import defaultdict

import jax
import numpy as np

from molgen.chem import conformers, enriched
from molgen.core.records import as_str
from molgen.lm import sample

log = logging.getLogger("molgen")


def _plots(records, out: pathlib.Path, delta: float):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rmsd = np.concatenate([r["min_rmsd"] for r in records if r["min_rmsd"]] or [np.zeros(0)])
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].hist(rmsd[np.isfinite(rmsd)], bins=40)
    ax[0].axvline(delta, color="k", ls="--")
    ax[0].set(xlabel="RMSD to nearest reference (Å)", ylabel="generated conformers", title="precision side")
    thr = np.linspace(0, 2.5, 51)
    covs = []
    for t in thr:
        covs.append(np.mean([np.mean(np.asarray(r["ref_min"]) <= t) if r["ref_min"] else 0.0 for r in records]))
    ax[1].plot(thr, covs)
    ax[1].axvline(delta, color="k", ls="--")
    ax[1].set(xlabel="threshold δ (Å)", ylabel="COV-R", title="coverage of the reference ensemble")
    fig.tight_layout()
    fig.savefig(out / "conformer_metrics.png", dpi=120)
    plt.close(fig)


def evaluate(config, workdir: str, model_cfg, params, test_source, subdir: str = "eval") -> dict:
    """Sample, score and write results to `workdir/subdir`; returns the summary (process 0 does the work)."""
    ec = config.eval
    by_mol: dict[int, dict] = {}
    for i in range(len(test_source)):
        ex = test_source[i]
        rec = by_mol.setdefault(int(ex["mol_index"]), {"smiles": as_str(ex["smiles"]), "refs": []})
        rec["refs"].append(as_str(ex["enriched"]))
    mols = sorted(by_mol.items())[: ec.num_molecules]
    if jax.process_index() != 0:
        return {}
    prompts, owners = [], []
    for k, (_, rec) in enumerate(mols):
        n = ec.samples_per_ref * len(rec["refs"])
        prompts += [enriched.prompt_text(rec["smiles"])] * n
        owners += [k] * n
    texts = sample.sample_texts(
        params,
        model_cfg,
        prompts,
        jax.random.key(ec.seed),
        max_new=ec.max_new_tokens,
        batch_size=ec.batch_size,
        temperature=ec.temperature,
        top_k=ec.top_k,
        top_p=ec.top_p,
        pos_mode=config.data.positions,
        grammar=ec.grammar,
    )
    per_mol = defaultdict(list)
    for k, t in zip(owners, texts, strict=False):
        per_mol[k].append(t)
    # the RDKit baseline draws with seeds the references were not built with (data seeds are small)
    jobs = [
        (
            rec["smiles"],
            rec["refs"],
            per_mol[k],
            ec.delta,
            1_000_003 + 7919 * idx + ec.seed if ec.baseline else None,
            ec.get("relax", "none"),
        )
        for k, (idx, rec) in enumerate(mols)
    ]
    with mp.get_context("spawn").Pool(max(1, config.data.workers)) as pool:
        records = pool.map(conformers.score_molecule, jobs, chunksize=1)
    summary = summarize(records, ec.delta, ec.mat_cap)
    out = pathlib.Path(workdir) / subdir
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "samples.sdf", "w") as f:
        for r in records:
            for block in r.pop("valid_sdf"):
                f.write(block + "$$$$\n")
    (out / "conformers.json").write_text(json.dumps({"summary": summary, "molecules": records}, indent=1))
    (out / "samples.txt").write_text("\n".join(texts[:200]) + "\n")
    try:
        _plots(records, out, ec.delta)
    except Exception as e:  # plotting must never lose the results already written
        log.warning("plotting failed: %s", e)
    return summary


def summarize(records, delta: float, mat_cap: float = 3.0) -> dict:
    """Totals and aggregates of `score_molecule` records; with the RDKit baseline in the records,
    the same aggregates for it under "rdkit_etkdg" and "rdkit_etkdg_mmff", and with `eval.relax`,
    for the model's conformers after MMFF94 under "lm_mmff"."""
    n_gen = sum(r["n_gen"] for r in records)
    n_valid = sum(r["n_valid"] for r in records)
    rmsd = np.concatenate([r["min_rmsd"] for r in records if r["min_rmsd"]] or [np.zeros(0)])
    out = {
        "molecules": len(records),
        "generated": n_gen,
        "valid": n_valid,
        "validity": n_valid / max(n_gen, 1),
        **conformers.aggregate(records, mat_cap),
        "median_min_rmsd": float(np.median(rmsd)) if rmsd.size else float("nan"),
        "delta": delta,
        "mat_cap": mat_cap,
    }
    for key in ("lm_mmff", "rdkit_etkdg", "rdkit_etkdg_mmff"):
        if records and all(key in r for r in records):
            out[key] = conformers.aggregate([r[key] for r in records], mat_cap)
    return out


def curves(workdir: str) -> dict:
    """Loss and conformer metrics against steps of a pretraining run: train/eval loss from
    metrics.jsonl; the conformer summaries of eval/step_N/conformers.json (every evaluation
    during training, `eval.during_training`, and a copy of the final one), or for a run without
    step folders its eval/conformers.json at the last logged step."""
    from molgen.core import logging as mlog

    rows = mlog.read_metrics(workdir)
    out = {"train": [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]}
    out["eval_loss"] = [(r["step"], r["eval/loss"]) for r in rows if "eval/loss" in r]
    ev = pathlib.Path(workdir) / "eval"
    conf = {int(f.parent.name[5:]): json.loads(f.read_text())["summary"] for f in ev.glob("step_*/conformers.json")}
    if not conf and (ev / "conformers.json").exists() and rows:
        conf[max(r["step"] for r in rows)] = json.loads((ev / "conformers.json").read_text())["summary"]
    out["conformers"] = sorted(conf.items())
    return out


def plot_curves(workdirs: list[str], out) -> None:
    """Train/eval loss, COV-R and MAT-R (all molecules) against steps for one or more runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    for wd in workdirs:
        c, name = curves(wd), pathlib.Path(wd).name
        if c["train"]:
            st, lo = zip(*c["train"], strict=True)
            k = max(1, len(lo) // 200)  # a running mean over ~0.5% of the run
            ax[0].plot(st[k - 1 :], np.convolve(lo, np.ones(k) / k, "valid"), label=f"{name} train", alpha=0.7)
        if c["eval_loss"]:
            ax[0].plot(*zip(*c["eval_loss"], strict=True), "o-", label=f"{name} validation")
        if c["conformers"]:
            st = [s for s, _ in c["conformers"]]
            ax[1].plot(st, [100 * m.get("cov_r", np.nan) for _, m in c["conformers"]], "o-", label=name)
            ax[2].plot(st, [m.get("mat_r", np.nan) for _, m in c["conformers"]], "o-", label=name)
            step_last, last = c["conformers"][-1]
            if "lm_mmff" in last:  # the model's last conformers after MMFF94
                ax[1].plot([step_last], [100 * last["lm_mmff"]["cov_r"]], "s", label=f"{name} + MMFF")
                ax[2].plot([step_last], [last["lm_mmff"]["mat_r"]], "s", label=f"{name} + MMFF")
            for key, ls in (("rdkit_etkdg", ":"), ("rdkit_etkdg_mmff", "--")):
                if key in last and wd == workdirs[0]:  # the baseline of the same test molecules
                    ax[1].axhline(100 * last[key]["cov_r"], color="gray", ls=ls, label=key.replace("_", " "))
                    ax[2].axhline(last[key]["mat_r"], color="gray", ls=ls, label=key.replace("_", " "))
    ax[0].set(xlabel="step", ylabel="next-token loss (nats)", title="loss")
    ax[0].set_ylim(top=3.0)  # the first steps' ~7 nats would flatten the rest
    ax[1].set(xlabel="step", ylabel="COV-R at 0.75 Å (%)", title="coverage of the references")
    ax[2].set(xlabel="step", ylabel="MAT-R, all molecules (Å)", title="matching RMSD")
    for a in ax:
        a.legend(fontsize=8)
    fig.tight_layout()
    pathlib.Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
