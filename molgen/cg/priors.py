"""Physics priors of the CG model and their fit by Boltzmann inversion (REFERENCE.md section 2).

| term      | energy                               | beads                          |
| bond      | 0.5 kr (r - r0)^2                    | (i, i+1)                       |
| angle     | sum_n a_n cos(n theta) + b_n sin(n theta) | (i, i+1, i+2)             |
| dihedral  | sum_n k_n (1 + cos(n phi - gamma_n)) | (i, ..., i+3)                  |
| repulsive | eps (sigma / r)^p                    | pairs with separation >= 6     |
| excluded  | eps (sigma_s / r)^p, one sigma per s | separations s = 2..5 (switch)  |
| angle wall| eps ((pi - theta_max) / (pi - theta))^p | (i, i+1, i+2)               |

Parameters are shared by all residues (one chain per domain, beads in sequence order); each
term's energy is multiplied by its weight (defaults bond 0.5, angle 0.25, dihedral 0.25,
repulsive and excluded 1.0; the angle wall is not weighted). Terms touching a padded bead are
masked (see `geometry`).

Collinear beads. A dihedral is undefined when either of its two angles is 180 degrees, and its
forces grow as 1 / sin(theta) on the way there. Each dihedral's energy is therefore multiplied
by s(theta_1) s(theta_2), a C2 switch from 1 at DIHEDRAL_DAMP[0] to 0 at DIHEDRAL_DAMP[1]
(160 and 175 degrees; CA pseudo-angles of proteins stay below about 156), so that energy and
forces stay bounded and continuous through a collinear passage. Without it, NVE of villin's
quick model jumped by 0.4-5 kcal/mol whenever an angle crossed 179 degrees (forces of 600
kcal/mol/Å). The angle wall, a restricted-bending term like the pair walls (eps = kT, so
U(theta_max) = kT, theta_max the (1 - tail_quantile) quantile of the angles), keeps MD from
getting there at all: the angle's Fourier series extrapolates freely beyond the data (villin's
fit puts 180 degrees only 2.4 kcal/mol above its minimum). Parameter files written before the
wall existed have no `angle_wall` entry and get no wall.

Fit: U(x) = -kT ln(p(x) / J(x)) from the training frames' histograms, with the Jacobians
J(r) = r^2 (bonds) and J(theta) = sin(theta) (angles), then least squares on populated bins:
a quadratic for bonds, a Fourier series for angles and a cosine series for dihedrals. sigma is
the `tail_quantile` of the pair distances (repulsive, and each excluded separation), and eps
is kT, so that U(sigma) = kT. The walls' power p (`power` in each wall's parameters; 4 where a
file predates it) is the fit's `wall_power`: 4 is soft enough that a network extrapolating into
denser packings than the data outweighs it (villin's quick model gained 85 kcal/mol from the
network while squeezing pairs to 3.4 Å against +30 from the walls); 12 (a WCA-like wall) puts
27 kT on a pair 25% inside sigma. L-BFGS never refines `power` (see train.lbfgs_priors).
"""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from molgen.cg import geometry

KB = 0.0019872041  # kcal/mol/K
TERMS = ("bond", "angle", "dihedral", "repulsive", "excluded")
DEFAULT_WEIGHTS = {"bond": 0.5, "angle": 0.25, "dihedral": 0.25, "repulsive": 1.0, "excluded": 1.0}
EXCLUDED_SEPS = (2, 3, 4, 5)
DIHEDRAL_DAMP = (160.0, 175.0)  # degrees: each dihedral fades out as one of its angles goes from 160 to 175
MIN_REPULSIVE_SEP = 6


def topology(n_max: int, chains=None) -> dict:
    """Index tuples of every term (numpy; static under jit). `chains`: lengths of consecutive
    chains (default one chain of n_max beads); terms never cross a chain boundary."""
    chains = [n_max] if chains is None else list(chains)
    if sum(chains) > n_max:
        raise ValueError(f"chains {chains} hold more than n_max={n_max} beads")
    out = {k: [] for k in ("bond", "angle", "dihedral", "repulsive", "excluded", "excluded_sep")}
    start = 0
    for n in chains:
        i = np.arange(start, start + n)
        pairs = np.stack(np.triu_indices(n, 1), axis=-1) + start
        sep = pairs[:, 1] - pairs[:, 0]
        out["bond"].append(np.stack([i[:-1], i[1:]], -1))
        out["angle"].append(np.stack([i[:-2], i[1:-1], i[2:]], -1))
        out["dihedral"].append(np.stack([i[:-3], i[1:-2], i[2:-1], i[3:]], -1))
        out["repulsive"].append(pairs[sep >= MIN_REPULSIVE_SEP])
        excl = (sep >= EXCLUDED_SEPS[0]) & (sep <= EXCLUDED_SEPS[-1])
        out["excluded"].append(pairs[excl])
        out["excluded_sep"].append(sep[excl])
        start += n
    width = {"bond": 2, "angle": 3, "dihedral": 4, "repulsive": 2, "excluded": 2}
    return {k: np.concatenate(v).reshape(-1, width[k]) if k in width else np.concatenate(v) for k, v in out.items()}


def _valid(mask, idx):
    return jnp.all(mask[idx], axis=-1)


def dihedral_damping(theta1, theta2):
    """s(theta_1) s(theta_2): 1 while both angles are below DIHEDRAL_DAMP[0], 0 once either is
    above DIHEDRAL_DAMP[1], C2 in between (see the module docstring)."""
    lo, hi = (math.radians(a) for a in DIHEDRAL_DAMP)
    s = lambda th: 1.0 - geometry.smoothstep((th - lo) / (hi - lo))  # noqa: E731
    return s(theta1) * s(theta2)


def _power_wall(r, valid, sigma, p):
    """eps (sigma / r)^power with the wall's parameters `p` (power 4 where a file predates it)."""
    r_safe = jnp.where(valid & (r > 0), r, 1.0)  # double where: no inf/NaN in the masked branch
    return jnp.where(valid & (r > 0), p["eps"] * (sigma / r_safe) ** p.get("power", 4.0), 0.0)


def term_energies(params, positions_Nx3, mask_N, topo, weights=None, excluded: bool = True, displacement=None) -> dict:
    """Energy of each prior term for one frame, kcal/mol (scalars). `displacement`: a jax-md
    displacement function (default plain differences, i.e. free space)."""
    w = dict(DEFAULT_WEIGHTS, **(weights or {}))
    out = {}
    v = _valid(mask_N, topo["bond"])
    r = geometry.distances(geometry.gather(positions_Nx3, topo["bond"], v, displacement))
    p = params["bond"]
    out["bond"] = jnp.sum(jnp.where(v, 0.5 * p["kr"] * (r - p["r0"]) ** 2, 0.0))

    v = _valid(mask_N, topo["angle"])
    theta = geometry.angles(geometry.gather(positions_Nx3, topo["angle"], v, displacement))
    n = jnp.arange(1, params["angle"]["a"].shape[0] + 1)
    e = jnp.sum(
        params["angle"]["a"] * jnp.cos(n * theta[:, None]) + params["angle"]["b"] * jnp.sin(n * theta[:, None]), -1
    )
    out["angle"] = jnp.sum(jnp.where(v, e, 0.0))
    wall = None
    if "angle_wall" in params:  # (pi - theta) is the wall's distance; unweighted, see the module docstring
        pw = params["angle_wall"]
        wall = jnp.sum(_power_wall(jnp.pi - theta, v, jnp.pi - pw["theta"], pw))

    v = _valid(mask_N, topo["dihedral"])
    x4 = geometry.gather(positions_Nx3, topo["dihedral"], v, displacement)
    damp = dihedral_damping(geometry.angles(x4[:, :3]), geometry.angles(x4[:, 1:]))
    v = v & (damp > 0)  # fully damped dihedrals: stop-gradient'ed geometry, no 0 * inf in the forces
    phi = geometry.dihedrals(geometry.stop_invalid(x4, v))
    p = params["dihedral"]
    n = jnp.arange(1, p["k"].shape[0] + 1)
    e = jnp.sum(p["k"] * (1 + jnp.cos(n * phi[:, None] - p["gamma"])), -1)
    out["dihedral"] = jnp.sum(jnp.where(v, damp * e, 0.0))

    v = _valid(mask_N, topo["repulsive"])
    r = geometry.distances(geometry.gather(positions_Nx3, topo["repulsive"], v, displacement))
    out["repulsive"] = jnp.sum(_power_wall(r, v, params["repulsive"]["sigma"], params["repulsive"]))

    if excluded:
        v = _valid(mask_N, topo["excluded"])
        r = geometry.distances(geometry.gather(positions_Nx3, topo["excluded"], v, displacement))
        sigma = params["excluded"]["sigma"][topo["excluded_sep"] - 2]
        out["excluded"] = jnp.sum(_power_wall(r, v, sigma, params["excluded"]))
    out = {k: w[k] * e for k, e in out.items()}
    if wall is not None:
        out["angle_wall"] = wall
    return out


def energy(params, positions_Nx3, mask_N, topo, weights=None, excluded: bool = True, displacement=None):
    return sum(term_energies(params, positions_Nx3, mask_N, topo, weights, excluded, displacement).values())


# ----------------------------------------------------------------------------- fitting


def _pmf(values, bins, kT, jacobian=None):
    hist, edges = np.histogram(values, bins=bins)
    centres = 0.5 * (edges[1:] + edges[:-1])
    ok = hist > 0
    p = hist / hist.sum()
    j = np.ones_like(centres) if jacobian is None else jacobian(centres)
    with np.errstate(divide="ignore"):
        u = -kT * np.log(p / np.maximum(j, 1e-12))
    return centres, u, ok, hist


def _lsq(design, u, w, ridge: float = 0.0):
    """Weighted least squares; `ridge` > 0 adds ridge * mean(diag) to the normal equations, which
    keeps Fourier fits over a narrow sampled range from trading huge cancelling coefficients
    (those lose all precision in float32). The constant column (last) is not penalised."""
    sw = np.sqrt(w / w.sum())
    a, b = design * sw[:, None], u * sw
    if not ridge:
        return np.linalg.lstsq(a, b, rcond=None)[0]
    ata = a.T @ a
    pen = ridge * np.mean(np.diag(ata)) * np.eye(len(ata))
    pen[-1, -1] = 0.0
    return np.linalg.solve(ata + pen, a.T @ b)


def fit_harmonic(r, kT: float, bins: int = 100):
    """kr, r0 of 0.5 kr (r - r0)^2 from bond lengths, with the r^2 Jacobian; and the PMF curve."""
    c, u, ok, h = _pmf(r, bins, kT, lambda x: x**2)
    coef = _lsq(np.stack([c[ok] ** 2, c[ok], np.ones(ok.sum())], -1), u[ok], h[ok])
    if coef[0] > 0:
        kr, r0 = 2 * coef[0], -coef[1] / (2 * coef[0])
    else:  # degenerate histogram: Gaussian estimate
        kr, r0 = kT / max(np.var(r), 1e-6), float(np.mean(r))
    return {"kr": float(kr), "r0": float(r0)}, (c[ok], u[ok] - u[ok].min())


def _geometry_samples(positions_FxNx3, mask_FxN, topo):
    """Bond lengths, angles, dihedrals and pair distances of real beads over all frames."""
    f = jax.jit(
        jax.vmap(
            lambda x, m: (
                geometry.distances(x[topo["bond"]]),
                geometry.angles(x[topo["angle"]]),
                geometry.dihedrals(x[topo["dihedral"]]),
                geometry.distances(x[topo["repulsive"]]),
                geometry.distances(x[topo["excluded"]]),
            )
        )
    )
    out = [np.asarray(a) for a in f(jnp.asarray(positions_FxNx3), jnp.asarray(mask_FxN))]
    masks = [
        np.all(np.asarray(mask_FxN)[:, topo[k]], -1) for k in ("bond", "angle", "dihedral", "repulsive", "excluded")
    ]
    return out, masks


def fit(positions_FxNx3, mask_FxN, temperature: float, n_angle: int = 6, n_dihedral: int = 4, bins: int = 100,
        tail_quantile: float = 0.005, ridge: float = 1e-3, wall_power: float = 4.0):  # fmt: skip
    """Fitted parameters (numpy) and the histograms behind them (for plots)."""
    n_max = positions_FxNx3.shape[1]
    topo = topology(n_max)
    kT = KB * temperature
    (r, theta, phi, rr, rx), (mb, ma, md, mr, mx) = _geometry_samples(positions_FxNx3, mask_FxN, topo)
    r, theta, phi, rr = r[mb], theta[ma], phi[md], rr[mr]
    if r.size == 0:
        raise ValueError("no bonds between real beads in the frames given to the prior fit")
    curves = {}

    bond, curves["bond"] = fit_harmonic(r, kT, bins)

    c, u, ok, h = _pmf(theta, np.linspace(0, np.pi, bins + 1), kT, np.sin)
    n = np.arange(1, n_angle + 1)
    design = np.concatenate([np.cos(n * c[ok, None]), np.sin(n * c[ok, None]), np.ones((ok.sum(), 1))], -1)
    coef = _lsq(design, u[ok], h[ok], ridge)
    angle = {"a": coef[:n_angle].tolist(), "b": coef[n_angle : 2 * n_angle].tolist()}
    curves["angle"] = (c[ok], u[ok] - u[ok].min())

    c, u, ok, h = _pmf(phi, np.linspace(-np.pi, np.pi, bins + 1), kT)
    n = np.arange(1, n_dihedral + 1)
    design = np.concatenate([np.cos(n * c[ok, None]), np.sin(n * c[ok, None]), np.ones((ok.sum(), 1))], -1)
    coef = _lsq(design, u[ok], h[ok], ridge)
    a, b = coef[:n_dihedral], coef[n_dihedral : 2 * n_dihedral]  # k cos(n phi - g) = k cos g cos + k sin g sin
    dihedral = {"k": np.hypot(a, b).tolist(), "gamma": np.arctan2(b, a).tolist()}
    curves["dihedral"] = (c[ok], u[ok] - u[ok].min())

    wp = float(wall_power)
    repulsive = {"sigma": float(np.quantile(rr, tail_quantile)), "eps": float(kT), "power": wp}
    sep = topo["excluded_sep"]
    sig = []
    for s in EXCLUDED_SEPS:
        d = rx[:, sep == s][mx[:, sep == s]]
        sig.append(float(np.quantile(d, tail_quantile)) if d.size else 0.0)
    excluded = {"sigma": sig, "eps": float(kT), "power": wp}
    angle_wall = {"theta": float(np.quantile(theta, 1.0 - tail_quantile)), "eps": float(kT), "power": wp}
    params = {"bond": bond, "angle": angle, "dihedral": dihedral, "repulsive": repulsive, "excluded": excluded,
              "angle_wall": angle_wall}  # fmt: skip
    samples = {"bond": r, "angle": theta, "dihedral": phi, "repulsive": rr}
    return params, curves, samples


def as_jax(params, dtype=jnp.float32):
    """Parameters as arrays (lists of coefficients become vectors)."""
    if isinstance(params, dict):
        return {k: as_jax(v, dtype) for k, v in params.items()}
    return jnp.asarray(params, dtype)


def save(params, path: str):
    with open(path, "w") as f:
        json.dump(jax.tree.map(lambda x: np.asarray(x).tolist(), params), f, indent=1)


def load(path: str):
    with open(path) as f:
        return json.load(f)


def plot(params, curves, samples, temperature: float, path: str):
    """Fitted potential against the Boltzmann-inverted histogram, one panel per term."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = as_jax(params)
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.5))
    x, u = curves["bond"]
    fit_u = 0.5 * params["bond"]["kr"] * (x - params["bond"]["r0"]) ** 2
    panels = [("bond", "r (Å)", x, u, fit_u)]
    for key, label in (("angle", "θ (rad)"), ("dihedral", "φ (rad)")):
        x, u = curves[key]
        n = np.arange(1, len(params[key]["a" if key == "angle" else "k"]) + 1)
        if key == "angle":
            f = np.sum(
                np.asarray(p["angle"]["a"]) * np.cos(n * x[:, None])
                + np.asarray(p["angle"]["b"]) * np.sin(n * x[:, None]),
                -1,
            )
        else:
            f = np.sum(
                np.asarray(p["dihedral"]["k"]) * (1 + np.cos(n * x[:, None] - np.asarray(p["dihedral"]["gamma"]))), -1
            )
        panels.append((key, label, x, u, f))
    for ax, (key, label, x, u, f) in zip(axes, panels, strict=False):
        ax.plot(x, u, "k.", ms=3, label="-kT ln p / J")
        ax.plot(x, f - f.min(), "r-", label="fit")
        ax.set(title=key, xlabel=label, ylabel="kcal/mol")
        ax.legend(fontsize=7)
    ax = axes[3]
    rr = samples["repulsive"]
    ax.hist(rr, bins=100, density=True, color="0.6")
    ax.axvline(params["repulsive"]["sigma"], color="r", label=f"σ = {params['repulsive']['sigma']:.2f} Å")
    ax.set(title="pairs, separation ≥ 6", xlabel="r (Å)")
    ax.legend(fontsize=7)
    fig.suptitle(f"priors by Boltzmann inversion at {temperature:.0f} K")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
