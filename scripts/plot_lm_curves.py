"""Loss, COV-R and MAT-R against steps for one or more LM pretraining runs (docs/lm.md's curves).

    python scripts/plot_lm_curves.py runs/lm_long --out docs/lm_long_curves.png

Reads each workdir's metrics.jsonl and eval/conformers.json with `molgen.lm.evaluate.plot_curves`,
the function that draws each run's plots/curves.png.
"""

import argparse

from molgen.lm.evaluate import plot_curves


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workdirs", nargs="+")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    plot_curves(args.workdirs, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
