"""Statistically optimised force maps for the CA slice mapping (Krämer et al. 2023, aggforce).

A force map W [R, N] sends the all-atom forces f [N, 3] of a frame to bead forces W f (the same
weights for x, y and z, so the map commutes with rotations). For the CA slice configurational
map, W gives the mean force as its conditional mean, i.e. is a valid force-matching target, if

- W[I, CA_J] = delta_IJ (each bead takes its own CA with weight 1 and no other CA), and
- every atom of a bond constraint carries its partner's weight: the recorded forces leave out
  constraint forces, and equal weights make them cancel. With HBonds constraints every
  hydrogen joins its heavy atom (a "constraint group"); hydrogens are assigned to the nearest
  heavy atom of the first stored frame.

All such maps share the mean force and differ only in noise. The residue sum (the default of
`mdcath.coarse_grain`) is one of them; the slice map (CA force alone) is another. The
optimised map minimises the mean squared mapped force over the training frames, which, the mean
force being common to all valid maps, minimises the noise. Per bead I it is a least-squares
problem in the weights g of the constraint groups within `window` residues of I (the other CA
groups held at 0, I's own at 1):

    min_g  sum_t |sum_k g_k phi_tk|^2,   phi_tk = the summed force of group k in frame t,

solved in closed form with a small ridge (`ridge` x the mean diagonal). The residue sum lies in
that feasible set, so on the fitting frames the optimum is never noisier than it.
"""

from __future__ import annotations

import numpy as np

from molgen.cg import mdcath

H_BOND_MAX = 1.35  # Å: a hydrogen farther than this from every heavy atom has no constraint partner


def constraint_groups(elements, coords_Nx3, label: str = "") -> np.ndarray:
    """Group id [N] per atom: each heavy atom is its own group, each hydrogen joins its nearest
    heavy atom. Raises MdcathError naming `label` and the atom if a hydrogen is bonded to none."""
    elements = np.asarray(elements)
    heavy = np.flatnonzero(elements != "H")
    group = np.full(len(elements), -1, np.int64)
    group[heavy] = np.arange(len(heavy))
    for i in np.flatnonzero(elements == "H"):
        d = np.linalg.norm(coords_Nx3[heavy] - coords_Nx3[i], axis=-1)
        if d.min() > H_BOND_MAX:
            raise mdcath.MdcathError(f"{label}hydrogen atom #{i} is {d.min():.2f} Å from every heavy atom")
        group[i] = group[heavy[np.argmin(d)]]
    return group


def group_forces(group: np.ndarray, forces_FxNx3) -> np.ndarray:
    """Summed force of each constraint group, [F, G, 3]."""
    out = np.zeros((len(forces_FxNx3), group.max() + 1, 3))
    np.add.at(out, (slice(None), group), np.asarray(forces_FxNx3, np.float64))
    return out


def fit(topology: mdcath.Topology, group: np.ndarray, forces_FxNx3, window: int = 1, ridge: float = 1e-6):
    """The optimised map W [R, N] from the all-atom forces of the fitting frames."""
    phi = group_forces(group, forces_FxNx3)
    cov = np.einsum("fgd,fhd->gh", phi, phi) / len(phi)
    n_groups = cov.shape[0]
    group_res = np.zeros(n_groups, np.int64)
    group_res[group] = topology.atom_residue
    ca_group = group[topology.ca_index]
    is_ca = np.zeros(n_groups, bool)
    is_ca[ca_group] = True
    w = np.zeros((len(topology.ca_index), len(group)))
    for bead, own in enumerate(ca_group):
        free = np.flatnonzero(~is_ca & (np.abs(group_res - bead) <= window))
        g = np.zeros(n_groups)
        g[own] = 1.0
        if len(free):
            a = cov[np.ix_(free, free)]
            a = a + ridge * np.trace(a) / len(free) * np.eye(len(free))
            g[free] = -np.linalg.solve(a, cov[free, own])
        w[bead] = g[group]
    return w


def residue_sum(topology: mdcath.Topology) -> np.ndarray:
    """The residue-sum map as a matrix W [R, N]."""
    w = np.zeros((len(topology.ca_index), len(topology.atom_residue)))
    w[topology.atom_residue, np.arange(len(topology.atom_residue))] = 1.0
    return w


def check(w: np.ndarray, topology: mdcath.Topology, group: np.ndarray, label: str = "", tol: float = 1e-6):
    """Raise MdcathError (naming `label`) unless W is a valid map for this topology and these
    constraint groups: W[:, CA] = identity and equal weights within every group."""
    n_res, n_atoms = len(topology.ca_index), len(topology.atom_residue)
    if w.shape != (n_res, n_atoms):
        raise mdcath.MdcathError(f"{label}force map has shape {w.shape}, expected ({n_res}, {n_atoms})")
    ca_err = np.abs(w[:, topology.ca_index] - np.eye(n_res)).max()
    tied = np.abs(w - w[:, _first_of_group(group)[group]]).max()
    if not (ca_err <= tol and tied <= tol):
        raise mdcath.MdcathError(
            f"{label}force map is not valid: CA weights off the identity by {ca_err:.3g}, "
            f"weights within constraint groups differ by {tied:.3g}"
        )


def _first_of_group(group):
    """Index of the first atom of each group."""
    return np.unique(group, return_index=True)[1]


def mean_square(w: np.ndarray, forces_FxNx3) -> float:
    """Mean squared mapped force per component over frames and beads."""
    return float(np.mean(np.einsum("rn,fnd->frd", w, np.asarray(forces_FxNx3, np.float64)) ** 2))
