"""NaN-safe geometry for padded CG frames (REFERENCE.md section 2).

`safe_norm` and `safe_atan2` carry custom VJPs: the gradient of |x| at x = 0 is zero, and
atan2 at (0, 0) uses an epsilon in its denominator. Invalid entries (those touching a padded
bead) have their geometry computed from stop-gradient'ed inputs and are masked with `where`,
so neither their values nor their gradients can reach the result.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

EPS = 1e-12


@jax.custom_vjp
def safe_norm(x):
    """Euclidean norm over the last axis; zero gradient at zero length."""
    return jnp.sqrt(jnp.sum(x * x, axis=-1))


def _norm_fwd(x):
    n = safe_norm(x)
    return n, (x, n)


def _norm_bwd(res, g):
    x, n = res
    scale = jnp.where(n > 0, g / jnp.where(n > 0, n, 1.0), 0.0)
    return (x * scale[..., None],)


safe_norm.defvjp(_norm_fwd, _norm_bwd)


@jax.custom_vjp
def safe_atan2(y, x):
    return jnp.arctan2(y, x)


def _atan2_fwd(y, x):
    return jnp.arctan2(y, x), (y, x)


def _atan2_bwd(res, g):
    y, x = res
    denom = x * x + y * y + EPS
    return g * x / denom, -g * y / denom


safe_atan2.defvjp(_atan2_fwd, _atan2_bwd)


def smoothstep(t):
    """C2 smoothstep 6t^5 - 15t^4 + 10t^3 of t clipped to [0, 1]."""
    t = jnp.clip(t, 0.0, 1.0)
    return t**3 * (t * (6.0 * t - 15.0) + 10.0)


def stop_invalid(x_MxKx3, valid_M):
    """Tuples with `valid` False get stop-gradient'ed positions (see the module docstring)."""
    return jnp.where(valid_M[:, None, None], x_MxKx3, jax.lax.stop_gradient(x_MxKx3))


def gather(positions_Nx3, index_MxK, valid_M, displacement=None):
    """Positions [M, K, 3] of the index tuples; invalid tuples get stop-gradient'ed positions.

    With a jax-md `displacement(a, b) -> a - b` (periodic boxes, or a strained space for the
    virial), each tuple is rebuilt around its first bead as x_0 + displacement(x_k, x_0), so
    every difference taken afterwards is the displacement's (minimum image in a box).
    """
    x = positions_Nx3[index_MxK]
    if displacement is not None:
        d = jax.vmap(jax.vmap(displacement, (0, None)))(x, x[:, 0])
        x = x[:, :1] + d
    return stop_invalid(x, valid_M)


def distances(x_Mx2x3):
    return safe_norm(x_Mx2x3[:, 1] - x_Mx2x3[:, 0])


def angles(x_Mx3x3):
    """Angle at the middle bead, in [0, pi]."""
    u, v = x_Mx3x3[:, 0] - x_Mx3x3[:, 1], x_Mx3x3[:, 2] - x_Mx3x3[:, 1]
    return safe_atan2(safe_norm(jnp.cross(u, v)), jnp.sum(u * v, axis=-1))


def dihedrals(x_Mx4x3):
    """IUPAC dihedral angle in (-pi, pi]."""
    b1 = x_Mx4x3[:, 1] - x_Mx4x3[:, 0]
    b2 = x_Mx4x3[:, 2] - x_Mx4x3[:, 1]
    b3 = x_Mx4x3[:, 3] - x_Mx4x3[:, 2]
    n1, n2 = jnp.cross(b1, b2), jnp.cross(b2, b3)
    y = safe_norm(b2) * jnp.sum(b1 * n2, axis=-1)
    x = jnp.sum(n1 * n2, axis=-1)
    return safe_atan2(y, x)
