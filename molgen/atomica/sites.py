"""Binding-site proteins for the interaction family's residue head: one protein with its
partner removed, each residue labelled 1 when one of its atoms lies within 5 Å of the partner,
with its relative solvent accessibility; a TFDS builder split by entry exactly as the
interfaces of the same sources (`atomica.data`), so pretraining never sees a test entry.

Proteins: each Docking Benchmark receptor against its ligand and back; the protein chains of
each whole PDB entry against its ligands, ions and nucleic acids (entries without a
non-protein partner are left out).
"""

from __future__ import annotations

import logging
import os

import numpy as np

from molgen.atomica import data as ad
from molgen.chem import complexes as cx

SITE_KINDS = ("bm5-receptor", "bm5-ligand", "entry")
SITE_FEATURES = {"x": (None, 3), "element": (None,), "position": (None,), "atom_block": (None,), "block_type": (None,),
                 "block_segment": (None,), "bonds": (None, 2), "label": (None,), "rsa": (None,)}  # fmt: skip
log = logging.getLogger("molgen")


def site_item(prot: cx.Molecule, partner_x: np.ndarray, cutoff: float) -> dict:
    """A whole protein as one segment, with per-residue labels (an atom within `cutoff` Å of
    the partner) and relative solvent accessibility (of the protein alone)."""
    sizes = [len(b.elements) for b in prot.blocks]
    return {
        "x": prot.x.astype(np.float32),
        "element": np.concatenate([b.elements for b in prot.blocks]).astype(np.int32),
        "position": np.array([ad.position_code(n) for b in prot.blocks for n in b.names], np.int32),
        "atom_block": np.repeat(np.arange(len(sizes)), sizes).astype(np.int32),
        "block_type": np.array([b.type for b in prot.blocks], np.int32),
        "block_segment": np.zeros(len(sizes), np.int32),
        "bonds": prot.bonds.astype(np.int32).reshape(-1, 2),
        "label": cx.contact_labels(prot, partner_x, cutoff),
        "rsa": cx.relative_sasa(prot),
    }


def collect_sites(c: ad.InterfaceConfig, cutoff: float = 5.0) -> tuple[list[dict], list[dict]]:
    """(proteins with labels, skipped files with reasons) of the config's sources."""
    items, skipped = [], []

    def add(prot, partner_x, path, eid, kind, chains):
        try:
            ex = site_item(prot, partner_x, cutoff)
        except cx.ComplexError as e:
            skipped.append({"file": path, "reason": str(e)})
            return
        ex.update(entry=eid, file=os.path.basename(path), kind=SITE_KINDS.index(kind), chains=chains)
        items.append(ex)

    bm5, whole = ad.scan(ad.structure_files(c.sources), [])  # duplicate entries: left out silently
    for path, eid in whole:
        mols = ad.read_or_skip(path, skipped)
        if mols is None or not mols["protein"]:
            continue
        others = mols["ligand"] + mols["ion"] + list(mols["nucleic"].values())
        if not others:
            continue
        prot = cx.merge(list(mols["protein"].values()), "protein", ",".join(mols["protein"]))
        add(prot, np.concatenate([o.x for o in others]), path, eid, "entry", prot.name)
    for eid, sides in sorted(bm5.items()):
        if set(sides) != {"r", "l"}:
            continue
        r, lg = ad.read_or_skip(sides["r"], skipped), ad.read_or_skip(sides["l"], skipped)
        if r is None or lg is None or not r["protein"] or not lg["protein"]:
            continue
        a = cx.merge(list(r["protein"].values()), "protein", ",".join(r["protein"]))
        b = cx.merge(list(lg["protein"].values()), "protein", ",".join(lg["protein"]))
        add(a, b.x, sides["r"], eid, "bm5-receptor", a.name)
        add(b, a.x, sides["l"], eid, "bm5-ligand", b.name)
    return items, skipped


class Sites(ad.RaggedBuilder):
    """Whole proteins with per-residue binding-site labels."""

    FEATURES, FLOATS = SITE_FEATURES, ("x", "rsa")
    TEXTS, INTS = ("entry", "file", "chains"), ("kind",)

    def _split_generators(self, dl_manager):
        c = self.builder_config
        split_of = ad.split_by_entry(ad.collect(c)[0], c)
        items, skipped = collect_sites(c)
        parts = {s: [ex for ex in items if split_of.get(ex["entry"], "train") == s] for s in ad.SPLITS}
        self.counts = {
            "proteins": {
                s: {k: sum(ex["kind"] == i for ex in parts[s]) for i, k in enumerate(SITE_KINDS)} for s in ad.SPLITS
            },
            "residues": {s: int(sum(len(ex["label"]) for ex in parts[s])) for s in ad.SPLITS},
            "positives": {s: int(sum(ex["label"].sum() for ex in parts[s])) for s in ad.SPLITS},
            "entries": {s: sorted({ex["entry"] for ex in parts[s]}) for s in ad.SPLITS},
            "skipped": skipped,
        }
        return {s: self._generate_examples(parts[s], s) for s in ad.SPLITS}


def build(cfg, data_dir: str) -> Sites:
    """Build (once) the binding-site proteins of a `data` config group; writes build_report.json."""

    def summary(counts, path):
        log.info("binding-site proteins %s, residues %s, positives %s", counts["proteins"], counts["residues"],
                 counts["positives"])  # fmt: skip

    return ad.build_with(Sites, "sites", cfg, data_dir, summary)
