"""Interfaces of real complexes for the interaction family: PDB files to a TFDS builder (ArrayRecord).

Sources are folders of PDB/mmCIF files (gzip or not), read by `molgen.chem.complexes`:
- a Docking Benchmark pair, `<id>_r_b*.pdb[.gz]` with `<id>_l_b*.pdb[.gz]` (e.g. 1A2K): one protein-protein
  interface, receptor against ligand (all protein chains of each file);
- any other file is a whole entry, and gives every interface it holds: each ligand against the
  protein (protein-ligand) and against the nucleic acid (nucleic-ligand), each metal ion against
  the protein (protein-ion), the nucleic acid against the protein (protein-nucleic), and each
  pair of protein chains (protein-protein);
- `interfaces.csv` in a folder (columns file, chains_a, chains_b; chains "A" or "A,B") names
  interfaces explicitly; a chain that is not in the file is an error.
An interface pairs two segments with every block that has an atom within `cutoff` (8 Å) of the
partner, cropped to `max_blocks` (256) by distance to the partner. A candidate pair of an entry
with no block within the cutoff is not an interface (counted under `no_contact`); an explicit or
Docking Benchmark pair without one is an error. Errors (unreadable file, no atoms, missing
chain, non-finite coordinates, no interface) are named in `build_report.json` with their file
and reason, and the build goes on. Two files of one entry (`4dst` and `4dst_protonated`): the
first is read, the other is skipped as a duplicate.

Split by PDB entry (the first four characters of the file name), so no complex leaks: for each
modality in order of rarity, one entry holding it goes to test (and one to validation, when
there are three or more), then the rest are shuffled with `seed` into the split fractions.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import re

import numpy as np
import tensorflow_datasets as tfds

from molgen.chem import complexes as cx
from molgen.core.records import build_once

SPLITS = ("train", "validation", "test")
MODALITIES = ("protein-protein", "protein-ligand", "protein-ion", "protein-nucleic", "nucleic-ligand")
SUFFIXES = (".pdb", ".pdb.gz", ".ent", ".ent.gz", ".cif", ".cif.gz")
BM5 = re.compile(r"^(?P<id>[0-9A-Za-z]{4})[^_]*_(?P<side>[rl])_b.*$")
PDB_ID = re.compile(r"^[0-9][0-9A-Za-z]{3}(?![0-9A-Za-z])")
# Atom position codes: the remoteness letter of a polymer atom's name (CA: A, CB: B, ... as in
# GET/ATOMICA), backbone and sugar-phosphate atoms by name, everything else "".
POSITIONS = ("PAD", "", "N", "CA", "C", "O", "B", "G", "D", "E", "Z", "H", "P", "OP", "'", "X")
log = logging.getLogger("molgen")


@dataclasses.dataclass
class InterfaceConfig(tfds.core.BuilderConfig):
    sources: tuple = ()
    cutoff: float = 8.0
    max_blocks: int = 256
    fractions: tuple = (0.1, 0.15)  # validation, test
    seed: int = 0


def position_code(name: str) -> int:
    name = name.strip()
    if name in ("N", "CA", "C", "O"):
        return POSITIONS.index(name)
    if not name:
        return POSITIONS.index("")
    if name == "P" or name.startswith("OP") or name in ("O1P", "O2P", "O3P"):
        return POSITIONS.index("P" if name == "P" else "OP")
    if name.endswith("'") or name.endswith("*"):
        return POSITIONS.index("'")
    if len(name) >= 2 and name[1] in "BGDEZH":
        return POSITIONS.index(name[1])
    return POSITIONS.index("X")


def entry_id(path: str) -> str:
    """The PDB id a file name starts with (1x0n_state_1.pdb: 1x0n), else the name without suffix."""
    name = pathlib.Path(path).name
    m = PDB_ID.match(name)
    return m.group(0).lower() if m else name.split(".")[0]


def structure_files(sources) -> list[str]:
    files = []
    for src in sources:
        src = os.path.abspath(os.path.expanduser(src))
        if not os.path.isdir(src):
            raise FileNotFoundError(f"data.sources: {src!r} is not a folder")
        files += sorted(os.path.join(src, f) for f in os.listdir(src) if f.lower().endswith(SUFFIXES))
    if not files:
        raise FileNotFoundError(f"data.sources: no structure files ({', '.join(SUFFIXES)}) in {list(sources)}")
    return files


def interface_item(a: cx.Molecule, b: cx.Molecule, cutoff: float, max_blocks: int, where: str) -> dict:
    """The arrays of one interface (segment 0: `a`, 1: `b`): atoms (x, element, position,
    block), blocks (type, segment, distance to the partner) and the covalent bonds among the
    kept atoms."""
    da, db = cx.block_min_distances(a, b)
    keep = [np.flatnonzero(da < cutoff), np.flatnonzero(db < cutoff)]
    if not len(keep[0]) or not len(keep[1]):
        raise cx.ComplexError(f"{where}: no interface within {cutoff:g} Å between {a.name} and {b.name} "
                              f"(closest atoms {min(da.min(), db.min()):.1f} Å)")  # fmt: skip
    if len(keep[0]) + len(keep[1]) > max_blocks:  # crop around the closest cross-segment pairs
        d = np.concatenate([da[keep[0]], db[keep[1]]])
        seg = np.repeat([0, 1], [len(keep[0]), len(keep[1])])
        best = np.sort(np.argsort(d, kind="stable")[:max_blocks])
        keep = [keep[0][best[seg[best] == 0]], keep[1][best[seg[best] == 1] - len(keep[0])]]
    cols = collections.defaultdict(list)
    n = 0
    for s, (mol, dist) in enumerate(((a, da), (b, db))):
        starts = np.cumsum([0] + [len(bl.elements) for bl in mol.blocks])
        old_to_new = np.full(starts[-1], -1, np.int64)
        for i in keep[s]:
            bl, k = mol.blocks[i], len(cols["block_type"])
            cols["block_type"].append(bl.type)
            cols["block_segment"].append(s)
            cols["block_dist"].append(dist[i])
            cols["x"].append(bl.x)
            cols["element"].append(bl.elements)
            cols["position"].append([position_code(nm) for nm in bl.names])
            cols["atom_block"].append(np.full(len(bl.elements), k))
            old_to_new[starts[i] : starts[i + 1]] = np.arange(n, n + len(bl.elements))
            n += len(bl.elements)
        if len(mol.bonds):
            bonds = old_to_new[mol.bonds]
            cols["bonds"].append(bonds[(bonds >= 0).all(1)])
    return {
        "x": np.concatenate(cols["x"]).astype(np.float32),
        "element": np.concatenate(cols["element"]).astype(np.int32),
        "position": np.concatenate(cols["position"]).astype(np.int32),
        "atom_block": np.concatenate(cols["atom_block"]).astype(np.int32),
        "block_type": np.asarray(cols["block_type"], np.int32),
        "block_segment": np.asarray(cols["block_segment"], np.int32),
        "block_dist": np.asarray(cols["block_dist"], np.float32),
        "bonds": np.concatenate(cols["bonds"]).astype(np.int32).reshape(-1, 2) if cols["bonds"] else
        np.zeros((0, 2), np.int32),
    }  # fmt: skip


def candidates(path: str, mols: dict) -> list[tuple[str, cx.Molecule, cx.Molecule]]:
    """(modality, segment a, segment b) of every pair a whole entry may hold."""
    prot, nuc = list(mols["protein"].values()), list(mols["nucleic"].values())
    out = []
    p = cx.merge(prot, "protein", ",".join(m.name for m in prot)) if prot else None
    n = cx.merge(nuc, "nucleic", ",".join(m.name for m in nuc)) if nuc else None
    for lig in mols["ligand"]:
        if p is not None:
            out.append(("protein-ligand", p, lig))
        if n is not None:
            out.append(("nucleic-ligand", n, lig))
    for ion in mols["ion"]:
        if p is not None:
            out.append(("protein-ion", p, ion))
    if p is not None and n is not None:
        out.append(("protein-nucleic", p, n))
    for i in range(len(prot)):
        for j in range(i + 1, len(prot)):
            out.append(("protein-protein", prot[i], prot[j]))
    return out


def _chains(mols: dict, chains: str, where: str) -> cx.Molecule:
    picked = []
    for ch in [c.strip() for c in chains.split(",") if c.strip()]:
        found = [mols[k][ch] for k in ("protein", "nucleic") if ch in mols[k]]
        if not found:
            have = sorted(set(mols["protein"]) | set(mols["nucleic"]))
            raise cx.ComplexError(f"{where}: chain {ch!r} is not in the file (polymer chains: {have})")
        picked += found
    kind = "protein" if all(m.kind == "protein" for m in picked) else "nucleic"
    return cx.merge(picked, kind, chains)


def read_or_skip(path: str, skipped: list) -> dict | None:
    """`complexes.read(path)`, or None with the file and reason appended to `skipped`."""
    try:
        return cx.read(path)
    except cx.ComplexError as e:
        skipped.append({"file": path, "reason": str(e)})
        return None


def scan(files, skipped: list) -> tuple[dict, list[tuple[str, str]]]:
    """(Docking Benchmark pairs {entry: {"r": path, "l": path}}, whole entries [(path, entry)]);
    a second file of an entry is skipped, with the reason appended to `skipped`."""
    bm5, seen, whole = {}, {}, []
    for path in files:
        m = BM5.match(pathlib.Path(path).name)
        if m:
            bm5.setdefault(m["id"].lower(), {})[m["side"]] = path
            continue
        eid = entry_id(path)
        if eid in seen:
            why = f"another file of entry {eid} was read ({os.path.basename(seen[eid])})"
            skipped.append({"file": path, "reason": why})
            continue
        seen[eid] = path
        whole.append((path, eid))
    return bm5, whole


def split_by_entry(items: list, c: InterfaceConfig) -> dict:
    """entry -> split of interface records (`split_entries` over their modalities)."""
    entries = collections.defaultdict(set)
    for ex in items:
        entries[ex["entry"]].add(MODALITIES[ex["modality"]])
    return split_entries(entries, c.fractions, c.seed)


def collect(c: InterfaceConfig) -> tuple[list[dict], list[dict], dict]:
    """(interfaces, skipped files and pairs with reasons, counts) of the config's sources."""
    files = structure_files(c.sources)
    items, skipped, counts = [], [], collections.Counter()

    def add(modality, a, b, where, entry, strict):
        try:
            ex = interface_item(a, b, c.cutoff, c.max_blocks, where)
        except cx.ComplexError as e:
            if strict:
                skipped.append({"file": where, "reason": str(e)})
            else:
                counts["no_contact"] += 1
            return
        ex.update(entry=entry, modality=MODALITIES.index(modality), file=os.path.basename(where),
                  segments=f"{a.name}|{b.name}")  # fmt: skip
        items.append(ex)

    def read(path):
        return read_or_skip(path, skipped)

    explicit = set()
    for src in c.sources:
        idx = os.path.join(os.path.abspath(os.path.expanduser(src)), "interfaces.csv")
        if os.path.exists(idx):
            with open(idx) as f:
                for r, row in enumerate(csv.DictReader(f)):
                    missing = {"file", "chains_a", "chains_b"} - set(row)
                    if missing:
                        raise ValueError(f"{idx}: row {r}: missing columns {sorted(missing)}")
                    path = os.path.join(os.path.dirname(idx), row["file"])
                    explicit.add(path)
                    mols = read(path)
                    if mols is None:
                        continue
                    try:
                        a, b = (_chains(mols, row[k], path) for k in ("chains_a", "chains_b"))
                    except cx.ComplexError as e:
                        skipped.append({"file": path, "reason": str(e)})
                        continue
                    mod = "protein-protein" if a.kind == b.kind == "protein" else "protein-nucleic"
                    add(mod, a, b, path, entry_id(path), True)
    bm5, whole = scan([f for f in files if f not in explicit], skipped)
    for path, eid in whole:
        mols = read(path)
        if mols is not None:
            for mod, a, b in candidates(path, mols):
                add(mod, a, b, path, eid, False)
    for eid, sides in sorted(bm5.items()):
        if set(sides) != {"r", "l"}:
            why = "Docking Benchmark receptor or ligand file missing"
            skipped.append({"file": next(iter(sides.values())), "reason": why})
            continue
        r, lg = read(sides["r"]), read(sides["l"])
        if r is None or lg is None:
            continue
        if not r["protein"] or not lg["protein"]:
            skipped.append({"file": sides["r" if not r["protein"] else "l"], "reason": "no protein chain"})
            continue
        a = cx.merge(list(r["protein"].values()), "protein", "receptor")
        b = cx.merge(list(lg["protein"].values()), "protein", "ligand")
        add("protein-protein", a, b, f"{sides['r']}+{os.path.basename(sides['l'])}", eid, True)
    return items, skipped, dict(counts)


def split_entries(entries: dict, fractions, seed: int) -> dict:
    """entry -> split, with each modality in test (and in validation when it has 3+ entries)."""
    rng = np.random.default_rng(seed)
    by_mod = collections.defaultdict(list)
    for e, mods in sorted(entries.items()):
        for m in mods:
            by_mod[m].append(e)
    out = {}
    for m in sorted(by_mod, key=lambda m: (len(by_mod[m]), m)):
        pool = [e for e in by_mod[m] if e not in out]
        have = {out[e] for e in by_mod[m] if e in out}
        for split in ("test", "validation"):
            if split not in have and pool and (split == "test" or len(by_mod[m]) >= 3):
                pick = pool.pop(int(rng.integers(len(pool))))
                out[pick] = split
    rest = [e for e in sorted(entries) if e not in out]
    rng.shuffle(rest)
    n_val, n_test = (int(round(f * len(entries))) for f in fractions)
    need_test = max(n_test - sum(v == "test" for v in out.values()), 0)
    need_val = max(n_val - sum(v == "validation" for v in out.values()), 0)
    for i, e in enumerate(rest):
        out[e] = "test" if i < need_test else "validation" if i < need_test + need_val else "train"
    return out


FEATURES = {
    "x": (None, 3), "element": (None,), "position": (None,), "atom_block": (None,), "block_type": (None,),
    "block_segment": (None,), "block_dist": (None,), "bonds": (None, 2),
}  # fmt: skip


class RaggedBuilder(tfds.core.GeneratorBasedBuilder):
    """A builder of ragged records (variable atoms and blocks; the Grain pipeline pads them):
    `FEATURES` {key: shape}, float keys in `FLOATS`, the rest int32, plus `TEXTS` and `INTS`
    scalars; `_split_generators` sets `counts` for the build report."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [InterfaceConfig(name="default")]
    FEATURES: dict = {}
    FLOATS: tuple = ()
    TEXTS: tuple = ()
    INTS: tuple = ()

    def __init__(self, *, config: InterfaceConfig, **kw):
        super().__init__(config=config, **kw)
        self.counts: dict = {}

    def _info(self):
        feats = {k: tfds.features.Tensor(shape=s, dtype=np.float32 if k in self.FLOATS else np.int32)
                 for k, s in self.FEATURES.items()}  # fmt: skip
        feats.update({k: tfds.features.Text() for k in self.TEXTS}, **{k: np.int32 for k in self.INTS})
        return self.dataset_info_from_configs(features=tfds.features.FeaturesDict(feats))

    def _generate_examples(self, items, split):
        for i, ex in enumerate(items):
            yield f"{split}_{i}", ex


class Interfaces(RaggedBuilder):
    """Interfaces of real complexes."""

    FEATURES, FLOATS = FEATURES, ("x", "block_dist")
    TEXTS, INTS = ("entry", "file", "segments"), ("modality",)

    def _split_generators(self, dl_manager):
        c = self.builder_config
        items, skipped, counts = collect(c)
        split_of = split_by_entry(items, c)
        parts = {s: [ex for ex in items if split_of[ex["entry"]] == s] for s in SPLITS}
        table = {s: {m: sum(ex["modality"] == i for ex in parts[s]) for i, m in enumerate(MODALITIES)} for s in SPLITS}
        self.counts = {
            "interfaces": table,
            "entries": {s: sorted({ex["entry"] for ex in parts[s]}) for s in SPLITS},
            "skipped": skipped,
            **counts,
        }
        return {s: self._generate_examples(parts[s], s) for s in SPLITS}


def config_name(c: InterfaceConfig, prefix: str = "interfaces") -> str:
    stamp = [(f, os.path.getsize(f), int(os.path.getmtime(f))) for f in structure_files(c.sources)]
    key = json.dumps([stamp, c.cutoff, c.max_blocks, list(c.fractions), c.seed, str(Interfaces.VERSION)])
    return f"{prefix}_" + hashlib.sha1(key.encode()).hexdigest()[:12]


def build_with(builder_cls, prefix: str, cfg, data_dir: str, summary):
    """Build (once) and return `builder_cls` for a `data` config group; writes build_report.json
    (the config and the builder's counts), then `summary(counts, report path)` logs."""
    sources = tuple(os.path.abspath(os.path.expanduser(s)) for s in cfg.sources)
    bc = InterfaceConfig(name="", sources=sources, cutoff=float(cfg.cutoff), max_blocks=int(cfg.max_blocks),
                         fractions=tuple(cfg.fractions), seed=int(cfg.seed))  # fmt: skip
    bc = dataclasses.replace(bc, name=config_name(bc, prefix))

    def finish(builder, out):
        report = {"config": dataclasses.asdict(bc), **builder.counts}
        (out / "build_report.json").write_text(json.dumps(report, indent=1, default=str))
        summary(builder.counts, out / "build_report.json")

    return build_once(builder_cls, bc, data_dir, finish)


def build(cfg, data_dir: str) -> Interfaces:
    """Build (once) and return the interfaces of a `data` config group; writes build_report.json."""

    def summary(counts, path):
        for s in SPLITS:
            log.info("interfaces %s: %s", s, counts["interfaces"][s])
        if counts["skipped"]:
            log.warning("skipped %d files or pairs; see %s", len(counts["skipped"]), path)

    return build_with(Interfaces, "interfaces", cfg, data_dir, summary)


def report(builder) -> dict:
    return json.loads((pathlib.Path(builder.data_dir) / "build_report.json").read_text())
