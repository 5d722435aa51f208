"""How far ATOMICA's rotation and translation noise move the interface atoms of the noised
segment (docs/atomica.md, Pretraining): one noise draw per interface of a split.

    python scripts/atomica_noise_displacement.py [--split=test] [--variant=quick] [--contact=5.0]

Prints the mean and median squared displacement (Å²) of the noised segment's atoms within
`--contact` Å of the partner under the rotation alone (about the segment's centroid, as
`noise.corrupt` applies it) and under the translation alone.
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from configs import atomica  # noqa: E402
from molgen.atomica import data as ad  # noqa: E402
from molgen.atomica import noise  # noqa: E402
from molgen.atomica.pretrain import record  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--split", default="test")
    ap.add_argument("--variant", default="quick")
    ap.add_argument("--contact", type=float, default=5.0)
    a = ap.parse_args()
    cfg = atomica.pretrain(a.variant)
    src = ad.build(cfg.data, cfg.data.data_dir).as_data_source(a.split)
    rot, tr = [], []
    for i in range(len(src)):
        ex = record(src[i])
        x0 = np.asarray(ex["x"], np.float64)
        aseg = np.asarray(ex["block_segment"])[np.asarray(ex["atom_block"])]
        out = noise.corrupt(ex, np.random.default_rng([0, i]))
        sel = aseg == int(out["noised"])
        if sel.sum() < 3 or (~sel).sum() == 0:
            continue
        near = np.linalg.norm(x0[sel][:, None] - x0[~sel][None], axis=-1).min(1) < a.contact
        if not near.any():
            continue
        # the same rotation as corrupt's: replay its generator up to the rotation draw
        g = np.random.default_rng([0, i])
        big = [s for s in (0, 1) if (aseg == s).sum() >= 3]
        g.choice(big) if big else g.integers(2)
        r, _ = noise.sample_rotation(g)
        c = x0[sel].mean(0)
        moved = (x0[sel] - c) @ r.T + c - x0[sel]
        rot.append(float((moved[near] ** 2).sum(1).mean()))
        tr.append(float(out["tr_eps"]) ** 2 * float((np.asarray(out["tr_z"]) ** 2).sum()))
    print(f"{a.split}: {len(rot)} interfaces with atoms within {a.contact} Å of the partner")
    print(f"rotation: mean {np.mean(rot):.2f} Å², median {np.median(rot):.2f} Å²; "
          f"translation: mean {np.mean(tr):.2f} Å², median {np.median(tr):.2f} Å²")  # fmt: skip


if __name__ == "__main__":
    main()
