"""beta and the threshold over steps for several DPO runs side by side (the README's plot).

    python scripts/plot_dpo_beta.py runs/lm_dpo runs/lm_dpo_risk runs/lm_dpo_betadpo --out docs/dpo_beta_quick.png

Reads each workdir's metrics.jsonl (train/beta, train/tau or train/threshold, train/margin).
"""

import argparse
import json
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from molgen.core import logging as mlog  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workdirs", nargs="+")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    for wd in args.workdirs:
        tr = [r for r in mlog.read_metrics(wd) if "train/beta" in r]
        if not tr:
            raise SystemExit(f"{wd}/metrics.jsonl has no train/beta records")
        mode = json.loads((pathlib.Path(wd) / "config.json").read_text())["dpo"]["beta_mode"]
        steps = [r["step"] for r in tr]
        ax[0].plot(steps, [r["train/beta"] for r in tr], label=mode)
        for key, lab in (("train/tau", "tau"), ("train/threshold", "M0")):
            pts = [(r["step"], r[key]) for r in tr if r.get(key) is not None]
            if pts:
                ax[1].plot(*zip(*pts, strict=True), label=f"{mode}: {lab}")
        ax[2].plot(steps, [r["train/margin"] for r in tr], alpha=0.7, label=mode)
    ax[0].set(xlabel="step", ylabel="beta", title="beta", yscale="log")
    ax[1].set(xlabel="step", ylabel="margin", title="threshold (risk: tau, beta-DPO: M0)")
    ax[2].set(xlabel="step", ylabel="margin", title="batch mean margin")
    for a in ax:
        a.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
