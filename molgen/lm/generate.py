"""Conformers for your own molecules from a trained LM run.

    python -m molgen.lm.generate --workdir=runs/lm_quickstart --input=mols.smi --n=10 --out=out.sdf

Input: `--input` (`.smi`: "SMILES [name]" per line; `.csv` with a `smiles` column and an
optional `id`/`name` column; `.sdf`, whose 3D coordinates become the reference; records with
one canonical SMILES are pooled into one molecule with several reference conformers; RDKit
perceives their stereo from 3D, and `--drop_stereo` prompts without it, as MOSES-trained models
were) and/or
`--smiles=...` (repeatable). Every molecule gets `--n` samples, batched across molecules.

Output: `--out` (SDF) holds one record per valid conformer with the properties `input_id`,
`sample_index`, `smiles` and, with a reference, `rmsd` (heavy-atom, symmetry-aware, aligned,
to the nearest reference conformer). `<out>.json` holds per-molecule validity, failure counts by
reason (tags / decode / graph) and, with a reference, best-of-n RMSD and COV/MAT at `--delta`.
`--relax=mmff` also relaxes every valid conformer with MMFF94 (hydrogens added, heavy atoms
free) into `<out>.mmff.sdf`, scored separately under "mmff" in the JSON. `--baseline` (with a
reference) scores `--n` RDKit ETKDGv3 conformers per molecule, raw and MMFF-relaxed, in the same
JSON ("rdkit_etkdg", "rdkit_etkdg_mmff"): the classical method to beat.

A molecule that cannot be prompted (unparsable SMILES, an element or charge the tokenizer has
no atom token for, a unit longer than the model's context) is skipped with its reason in the
JSON; the others still run.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import pathlib
import sys
import time
from collections import Counter

import jax
import numpy as np
from absl import flags
from rdkit import Chem, RDLogger

from molgen.chem import conformers, enriched
from molgen.core import cli
from molgen.lm import policy as policy_lib
from molgen.lm import sample, tokenizer
from molgen.lm.pretrain import init_params

log = logging.getLogger("molgen")


@dataclasses.dataclass
class Molecule:
    id: str
    input_smiles: str
    smiles: str = ""  # canonical isomeric SMILES (the prompt), "" when skipped
    ref: Chem.Mol | None = None  # reference conformers (heavy atoms), from an SDF input
    reason: str = ""  # why it is skipped
    est_tokens: int = 0  # prompt + completion tokens, estimated


# ----------------------------------------------------------------------------- input
def read_inputs(path: str = "", smiles: tuple = (), drop_stereo: bool = False) -> list[Molecule]:
    """Molecules from a .smi/.csv/.sdf file and from --smiles strings. A file that cannot be read
    as a whole raises ValueError naming it; a bad record becomes a skipped molecule."""
    mols = []
    if path:
        p = pathlib.Path(path)
        if not p.exists():
            raise ValueError(f"--input={path}: no such file")
        suffix = p.suffix.lower()
        if suffix == ".smi":
            mols += _read_smi(p)
        elif suffix == ".csv":
            mols += _read_csv(p)
        elif suffix == ".sdf":
            mols += _read_sdf(p, drop_stereo)
        else:
            raise ValueError(f"--input={path}: unknown format {suffix!r}; use .smi, .csv or .sdf")
    mols += [Molecule(f"smiles{i + 1}", s) for i, s in enumerate(smiles)]
    if not mols:
        raise ValueError("no molecules: give --input=FILE or --smiles=...")
    seen = Counter(m.id for m in mols)
    dup = [k for k, v in seen.items() if v > 1]
    if dup:
        raise ValueError(f"molecule ids are not unique in {path or '--smiles'}: {dup[:5]}")
    return mols


def _read_smi(p: pathlib.Path) -> list[Molecule]:
    out = []
    for i, line in enumerate(p.read_text().splitlines(), 1):
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        out.append(Molecule(parts[1] if len(parts) > 1 else f"line{i}", parts[0]))
    return out


def _read_csv(p: pathlib.Path) -> list[Molecule]:
    with open(p, newline="") as f:
        rows = list(csv.DictReader(f))
    cols = {c.lower(): c for c in (rows[0].keys() if rows else [])}
    if "smiles" not in cols:
        raise ValueError(f"--input={p}: no 'smiles' column (columns: {sorted(cols.values())})")
    id_col = cols.get("id") or cols.get("name")
    return [Molecule(str(r[id_col]) if id_col else f"row{i}", r[cols["smiles"]] or "") for i, r in enumerate(rows, 1)]


def _read_sdf(p: pathlib.Path, drop_stereo: bool = False) -> list[Molecule]:
    """One molecule per canonical isomeric SMILES (stereo perceived from 3D); its records'
    conformers are the reference ensemble."""
    RDLogger.DisableLog("rdApp.*")
    try:
        supplier = Chem.SDMolSupplier(str(p), removeHs=False, sanitize=True)
        by_smiles: dict[str, Molecule] = {}
        out, names = [], set()
        for k, m in enumerate(supplier, 1):
            if m is None:
                out.append(Molecule(f"record{k}", "", reason=f"SDF record does not parse: record {k} of {p.name}"))
                continue
            name = m.GetProp("_Name").strip() if m.HasProp("_Name") else ""
            heavy = Chem.RemoveHs(m)
            if drop_stereo:
                Chem.RemoveStereochemistry(heavy)
            smi = Chem.MolToSmiles(heavy, isomericSmiles=True, canonical=True)
            has_3d = heavy.GetNumConformers() > 0 and heavy.GetConformer().Is3D()
            if smi in by_smiles:
                ref = by_smiles[smi].ref
                if ref is not None and has_3d:
                    ref.AddConformer(Chem.Conformer(heavy.GetConformer()), assignId=True)
                continue
            mid = name if name and name not in names else f"{name or 'record'}{'.' if name else ''}{k}"
            names.add(mid)  # a name reused by another molecule (e.g. another stereoisomer) gets its record number
            mol = Molecule(mid, smi, ref=Chem.Mol(heavy) if has_3d else None)
            by_smiles[smi] = mol
            out.append(mol)
        return out
    finally:
        RDLogger.EnableLog("rdApp.*")


def prepare(mol: Molecule, context: int, drop_stereo: bool = False) -> Molecule:
    """Canonicalise and check that the model can write the molecule; sets `reason` when not."""
    if mol.reason:
        return mol
    RDLogger.DisableLog("rdApp.*")
    try:
        rd = Chem.MolFromSmiles(mol.input_smiles) if mol.input_smiles else None
    finally:
        RDLogger.EnableLog("rdApp.*")
    if rd is None:
        mol.reason = f"unparsable SMILES: {mol.input_smiles!r}"
        return mol
    rd = Chem.RemoveHs(rd)
    if drop_stereo:
        Chem.RemoveStereochemistry(rd)
    if rd.GetNumAtoms() == 0:
        mol.reason = f"no heavy atoms: {mol.input_smiles!r}"
        return mol
    missing = tokenizer.missing_atom_tokens(Chem.MolToSmiles(rd, isomericSmiles=True))
    if missing:
        mol.reason = f"element or charge not in the tokenizer's vocabulary: {' '.join(missing)}"
        return mol
    rd.AddConformer(Chem.Conformer(rd.GetNumAtoms()), assignId=True)
    for i in range(rd.GetNumAtoms()):  # the widest coordinate the model usually writes: 3 tokens
        rd.GetConformer().SetAtomPosition(i, (-1.2345, -1.2345, -1.2345))
    try:
        smiles, enr = enriched.encode(rd)
    except enriched.EnrichedError as e:
        mol.reason = f"not writable as enriched SMILES: {e}"
        return mol
    mol.smiles = smiles
    mol.est_tokens = len(tokenizer.encode(enriched.unit_text(smiles, enr)))
    if mol.est_tokens > context:
        mol.reason = (
            f"longer than the model's context: ~{mol.est_tokens} tokens for prompt + conformer, context {context}"
        )
    return mol


# ----------------------------------------------------------------------------- run and model
def resolve_run(path: str) -> tuple[pathlib.Path, pathlib.Path]:
    """(run directory, checkpoint path) for a run directory or one of its checkpoints/<step> folders."""
    p = pathlib.Path(path).expanduser().absolute()
    if (p / "state").is_dir() and p.parent.name == "checkpoints":
        return p.parent.parent, p
    if not (p / "model_config.json").exists():
        raise ValueError(f"--workdir={path}: no model_config.json; give an LM run or its checkpoints/<step> folder")
    return p, p


def run_settings(run: pathlib.Path) -> dict:
    """The run's context length and default sampling temperature, from its config.json."""
    cfg = json.loads((run / "config.json").read_text()) if (run / "config.json").exists() else {}
    groups = [cfg.get("data", {}), *(v for v in cfg.values() if isinstance(v, dict))]
    context = next((g[k] for k in ("seq_len", "max_len") for g in groups if g.get(k)), 0)
    temperature = (cfg.get("eval") or {}).get("temperature") or (cfg.get("sampling") or {}).get("temperature")
    return {"context": int(context), "temperature": float(temperature) if temperature else 1.0}


# ----------------------------------------------------------------------------- scoring
def score(gens: list[Chem.Mol], ref: Chem.Mol | None, delta: float) -> tuple[list[float], dict]:
    """`conformers.score_ensemble`, or nothing for a molecule without a reference."""
    return conformers.score_ensemble(gens, ref, delta) if ref is not None else ([], {})


def _sdf_block(mol: Chem.Mol, props: dict) -> str:
    m = Chem.Mol(mol)
    m.SetProp("_Name", str(props["input_id"]))
    for k, v in props.items():
        m.SetProp(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    return Chem.MolToMolBlock(m) + "".join(f">  <{k}>\n{m.GetProp(k)}\n\n" for k in props) + "$$$$\n"


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None and np.isfinite(x)]
    return float(np.mean(xs)) if xs else None


def summarize(records: list[dict], key: str = "") -> dict:
    """Totals over molecules; `key` ("mmff", "rdkit_etkdg", ...) summarises that part of the records
    that have it."""
    done = [r for r in records if not r.get("reason") and (not key or key in r)]
    rec = [r.get(key, {}) if key else r for r in done]
    with_ref = [r for r in rec if "cov_r" in r]
    out = {
        "molecules": len(records),
        "prompted": len(done),
        "skipped": len(records) - len(done),
        "skipped_reasons": dict(Counter(r["reason"].split(":")[0] for r in records if r.get("reason"))),  # by kind
        "generated": sum(r["n"] for r in done),
        "valid": sum(r["valid"] for r in rec),
        "molecules_without_valid_sample": sum(r["valid"] == 0 for r in rec),
    }
    out["validity"] = out["valid"] / max(out["generated"], 1)
    if with_ref:
        out["with_reference"] = len(with_ref)
        for k in ("best_rmsd", "cov_r", "mat_r", "cov_p", "mat_p"):
            out[k] = _mean(r[k] for r in with_ref)  # MAT: over molecules with a valid sample
    return out


# ----------------------------------------------------------------------------- main
def collect(mols: list[Molecule], texts: list[str], n: int, delta: float, relax: str = "none", baseline_seed=None):
    """(per-molecule records, SDF blocks, MMFF SDF blocks) from the sampled texts: `n` per
    prompted molecule, in the order of the prompted molecules sorted by `est_tokens`. With
    `baseline_seed`, molecules with a reference also get the RDKit baseline
    (`conformers.rdkit_baseline`)."""
    todo = sorted((m for m in mols if not m.reason), key=lambda m: m.est_tokens)
    records, by_id = [], {m.id: k for k, m in enumerate(todo)}
    sdf, sdf_mmff = [], []
    for m in mols:
        rec = {"id": m.id, "input_smiles": m.input_smiles, "smiles": m.smiles}
        if m.reason:
            records.append({**rec, "reason": m.reason})
            continue
        k = by_id[m.id]
        gens, idx, fails = [], [], Counter()
        for i, t in enumerate(texts[k * n : (k + 1) * n]):
            mol, why = conformers.check_sample(t, m.smiles)
            if mol is None:
                fails[why] += 1
            else:
                gens.append(mol)
                idx.append(i)
        rmsd, metrics = score(gens, m.ref, delta)
        rec.update(n=n, valid=len(gens), validity=len(gens) / n, failures=dict(fails), **metrics)
        if m.ref is not None:
            rec["rmsd"] = [round(x, 4) for x in rmsd]
        for j, (g, i) in enumerate(zip(gens, idx, strict=True)):
            props = {"input_id": m.id, "sample_index": i, "smiles": m.smiles}
            sdf.append(_sdf_block(g, {**props, **({"rmsd": rmsd[j]} if rmsd else {})}))
        if relax == "mmff":
            relaxed = [(conformers.mmff_relax(g), i) for g, i in zip(gens, idx, strict=True)]
            ok = [(g, i) for g, i in relaxed if g is not None]
            r_rmsd, r_metrics = score([g for g, _ in ok], m.ref, delta)
            rec["mmff"] = dict(valid=len(ok), failed=len(gens) - len(ok), **r_metrics)
            if m.ref is not None:
                rec["mmff"]["rmsd"] = [round(x, 4) for x in r_rmsd]
            for j, (g, i) in enumerate(ok):
                props = {"input_id": m.id, "sample_index": i, "smiles": m.smiles, "relaxed": "mmff"}
                sdf_mmff.append(_sdf_block(g, {**props, **({"rmsd": r_rmsd[j]} if r_rmsd else {})}))
        if baseline_seed is not None and m.ref is not None:
            for key, v in conformers.rdkit_baseline(m.smiles, m.ref, n, 10_000 + baseline_seed, delta).items():
                rec[key] = {"valid": v.pop("n_valid"), **v}
        records.append(rec)

    return records, sdf, sdf_mmff


def generate(
    workdir: str,
    out: str,
    *,
    input_path: str = "",
    smiles: tuple = (),
    n: int = 10,
    temperature: float | None = None,
    top_p: float = 1.0,
    grammar: bool = False,
    seed: int = 0,
    relax: str = "none",
    drop_stereo: bool = False,
    baseline: bool = False,
    delta: float = 0.75,
    batch_size: int = 64,
) -> dict:
    """Sample `n` conformers per input molecule; write the SDF(s) and JSON; return the summary."""
    t0 = time.time()
    if relax not in ("none", "mmff"):
        raise ValueError(f"--relax={relax}: use none or mmff")
    if n < 1:
        raise ValueError(f"--n={n}: must be at least 1")
    run, ckpt = resolve_run(workdir)
    pol = policy_lib.load_policy(str(run))
    if pol.codec != "molecular":
        raise ValueError(f"--workdir={workdir}: a {pol.codec!r} model, not a molecular LM")
    settings = run_settings(run)
    temperature = settings["temperature"] if temperature is None else temperature
    context = settings["context"] or 512
    mols = [prepare(m, context, drop_stereo) for m in read_inputs(input_path, tuple(smiles), drop_stereo)]
    todo = sorted((m for m in mols if not m.reason), key=lambda m: m.est_tokens)
    for m in mols:
        if m.reason:
            log.warning("skipping %s: %s", m.id, m.reason)

    texts = []
    if todo:
        params = policy_lib.load_params(
            dataclasses.replace(pol, workdir=str(ckpt)), jax.eval_shape(lambda: init_params(pol.model, 0))
        )
        prompt_len = max(len(tokenizer.encode(enriched.prompt_text(m.smiles))) for m in todo)
        max_new = min(max(m.est_tokens for m in todo) - prompt_len + 16, context)
        prompts = [enriched.prompt_text(m.smiles) for m in todo for _ in range(n)]
        t_sample = time.time()

        def progress(done, total):
            rate = done / max(time.time() - t_sample, 1e-9)
            eta = time.strftime("%H:%M:%S", time.gmtime((total - done) / max(rate, 1e-9)))
            log.info(
                "generate: %d/%d samples (%.0f%%), %.2f samples/s, ETA %s", done, total, 100 * done / total, rate, eta
            )

        texts = sample.sample_texts(
            params, pol.model, prompts, jax.random.key(seed), max_new=max_new, batch_size=min(batch_size, len(prompts)),
            temperature=temperature, top_p=top_p, pos_mode=pol.positions, grammar=grammar, on_batch=progress,
        )  # fmt: skip

    records, sdf, sdf_mmff = collect(mols, texts, n, delta, relax, seed if baseline else None)
    out_path = pathlib.Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text("".join(sdf))
    if relax == "mmff":
        out_path.with_suffix(".mmff.sdf").write_text("".join(sdf_mmff))
    summary = summarize(records)
    for key in ("mmff", "rdkit_etkdg", "rdkit_etkdg_mmff"):
        if any(key in r for r in records):
            summary[key] = summarize(records, key)
    summary.update(seconds=round(time.time() - t0, 1), workdir=str(ckpt), n=n, temperature=temperature, top_p=top_p,
                   grammar=grammar, seed=seed, relax=relax, drop_stereo=drop_stereo, baseline=baseline,
                   delta=delta)  # fmt: skip
    out_path.with_suffix(".json").write_text(json.dumps({"summary": summary, "molecules": records}, indent=1))
    log.info("wrote %s and %s: %s", out_path, out_path.with_suffix(".json"), json.dumps(summary))
    return summary


def _flags(fv):
    """This CLI's flags, defined on `fv` when it runs (not at import: molgen.main defines --workdir too)."""
    flags.DEFINE_string("workdir", None, "a trained LM run, or one of its checkpoints/<step> folders", required=True,
                        flag_values=fv)  # fmt: skip
    flags.DEFINE_string(
        "input", "", ".smi, .csv (a 'smiles' column) or .sdf (3D coordinates = reference)", flag_values=fv
    )
    flags.DEFINE_multi_string("smiles", [], "a SMILES to generate for (repeatable)", flag_values=fv)
    flags.DEFINE_integer("n", 10, "samples per molecule", flag_values=fv)
    flags.DEFINE_float(
        "temperature", None, "sampling temperature (default: the run's eval.temperature)", flag_values=fv
    )
    flags.DEFINE_float("top_p", 1.0, "nucleus sampling mass", flag_values=fv)
    flags.DEFINE_bool("grammar", False, "grammar-constrained decoding of coordinate blocks", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "sampling seed", flag_values=fv)
    flags.DEFINE_enum("relax", "none", ["none", "mmff"], "also MMFF-relax each valid conformer", flag_values=fv)
    flags.DEFINE_bool("drop_stereo", False, "prompt with stereo-free SMILES (for models trained without stereo "
                      "tags, e.g. MOSES; SDF stereo is otherwise perceived from 3D)", flag_values=fv)  # fmt: skip
    flags.DEFINE_bool("baseline", False, "with references: also score n RDKit ETKDGv3 conformers, raw and MMFF",
                      flag_values=fv)  # fmt: skip
    flags.DEFINE_float("delta", 0.75, "COV threshold (Å)", flag_values=fv)
    flags.DEFINE_integer("batch_size", 64, "sampled sequences per batch", flag_values=fv)
    flags.DEFINE_string("out", "out.sdf", "output SDF; the JSON report goes beside it (.json)", flag_values=fv)
    return fv


def _cli(a, argv):
    handler = logging.StreamHandler(sys.stderr)  # progress and warnings; the results go to --out
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False  # absl's root handler would print every line twice
    names = ("n", "temperature", "top_p", "grammar", "seed", "relax", "drop_stereo", "baseline", "delta", "batch_size")
    kw = dict(input_path=a.input, smiles=tuple(a.smiles), **{k: getattr(a, k) for k in names})
    generate(a.workdir, a.out, **kw)


def main(argv=None):
    """The CLI in this process: main(["--workdir=X", "--smiles=CCO"]); None: from the shell."""
    cli.run("molgen.lm.generate", _flags, _cli, argv, errors=(ValueError, FileNotFoundError))


if __name__ == "__main__":
    main()
