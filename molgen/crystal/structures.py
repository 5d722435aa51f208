"""From decoder outputs to crystals and CIF files (host side): shared by the VAE's
reconstruction, the LDM's sampler and evaluation, the sampling CLI (molgen.crystal.sample) and
benchmarks/crystal_sampling.py, without importing any trainer.
"""

from __future__ import annotations

import os

import numpy as np

from molgen.chem import crystal as xtal


def to_crystals(out: dict, mask) -> list[xtal.Crystal | None]:
    """Decoder outputs (numpy) -> crystals; None where the decoded lattice admits no cell."""
    mask = np.asarray(mask, bool)
    n = mask.sum(-1)
    species = np.asarray(out["species_logits"]).argmax(-1) + 1
    frac = np.mod(np.asarray(out["frac"], np.float64), 1.0)
    lengths = np.asarray(out["lengths"], np.float64) * np.cbrt(np.maximum(n, 1))[:, None]
    angles = np.rad2deg(np.asarray(out["angles"], np.float64))
    crystals = []
    for i in range(len(n)):
        try:
            lat = xtal.lattice_matrix(np.concatenate([lengths[i], angles[i]]))
        except xtal.CrystalError:
            crystals.append(None)
            continue
        crystals.append(xtal.Crystal(lat, frac[i][mask[i]], species[i][mask[i]]))
    return crystals


def write_cifs(crystals, folder: str, prefix: str = "sample") -> list[str]:
    """One CIF per crystal (a None entry is skipped); returns the paths written."""
    from pymatgen.io.cif import CifWriter

    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, c in enumerate(crystals):
        if c is None:
            continue
        p = os.path.join(folder, f"{prefix}_{i:05d}.cif")
        CifWriter(xtal.to_structure(c)).write_file(p)
        paths.append(p)
    return paths
