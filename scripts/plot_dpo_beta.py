"""beta and the threshold over steps for several DPO runs side by side (the README's plot).

    python scripts/plot_dpo_beta.py runs/lm_dpo runs/lm_dpo_risk runs/lm_dpo_betadpo --out docs/dpo_beta_quick.png

Reads each workdir's metrics.jsonl (train/beta, train/tau or train/threshold, train/margin)
with `molgen.lm.dpo.plot_beta`, the function that draws each run's plots/dpo_beta.png.
"""

import argparse

from molgen.lm.dpo import plot_beta


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workdirs", nargs="+")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if not plot_beta(args.workdirs, args.out):
        raise SystemExit(f"no train/beta records in the metrics.jsonl of {args.workdirs}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
