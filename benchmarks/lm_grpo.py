"""GRPO throughput: rollout tokens/s, reward evaluations/s and where a GRPO step's time goes.

    python benchmarks/lm_grpo.py [--policy=runs/lm_quickstart] [--steps=3] [--prompts=8] [--group=8]

Runs the real `lm_grpo` family (experiments/lm_grpo.py, quick settings, held-out evaluation
off) for --steps steps twice in this process's workdir tree: with the rewards judged on 2
host worker processes while the device samples the next chunk (molgen's default), and with
the same judging done serially in the main process after each chunk (baseline). From the
per-step timings in metrics.jsonl it prints tokens/s of sampling, reward evaluations/s,
the share of the step in sampling, waiting for rewards and the update, and the ratio of
step times. The first step (compilation) is left out. A second table times `judge_group`
alone on the sampled rollouts: 1 process against the 2-worker pool.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run(workdir, args, workers: int):
    cmd = [sys.executable, "-m", "molgen.main", "--config=experiments/lm_grpo.py", f"--workdir={workdir}",
           f"--config.policy.workdir={args.policy}", f"--config.train.steps={args.steps + 1}",
           f"--config.grpo.prompts_per_step={args.prompts}", f"--config.grpo.group_size={args.group}",
           "--config.eval.num_molecules=0", f"--config.rewards_workers={workers}",
           "--config.ckpt.every_steps=1000"]  # fmt: skip
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = [json.loads(x) for x in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines() if x]
    return [r for r in rows if "train/step_seconds" in r][1:]  # drop the compiling first step


def summarize(rows, rollouts_per_step):
    mean = lambda k: sum(r[f"train/{k}"] for r in rows) / len(rows)  # noqa: E731
    step, sample = mean("step_seconds"), mean("sample_seconds")
    wait, upd = mean("reward_wait_seconds"), mean("update_seconds")
    tokens = mean("completion_len") * rollouts_per_step
    return {
        "step_s": step,
        "tokens_per_s": tokens / sample,
        "sample": sample / step,
        "reward_wait": wait / step,
        "update": upd / step,
        "other": max(0.0, 1 - (sample + wait + upd) / step),
        "validity": mean("validity"),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default="runs/lm_quickstart")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    args = ap.parse_args()
    if not (pathlib.Path(args.policy) / "done.json").exists():
        sys.exit(f"{args.policy} is not a finished LM run: run experiments/lm_quickstart.py into it first")
    args.policy = str(pathlib.Path(args.policy).absolute())
    n = args.prompts * args.group
    with tempfile.TemporaryDirectory() as tmp:
        res = {}
        for name, workers in (("async pool (2 workers)", 2), ("serial (baseline)", 0)):
            t = time.time()
            res[name] = summarize(run(os.path.join(tmp, str(workers)), args, workers), n)
            print(f"# {name}: {time.time() - t:.0f} s wall", file=sys.stderr)
        rate = judge_pool_rate()
    print(f"GRPO step: {args.prompts} prompts x {args.group} completions, policy {args.policy}, "
          f"{args.steps} timed steps")  # fmt: skip
    print(f"{'rewards':>24} | {'step s':>7} | {'rollout tok/s':>13} | {'sample':>6} {'reward':>6} {'update':>6} "
          f"{'other':>6} | {'validity':>8}")  # fmt: skip
    for name, r in res.items():
        print(f"{name:>24} | {r['step_s']:7.2f} | {r['tokens_per_s']:13,.0f} | {r['sample']:6.1%} "
              f"{r['reward_wait']:6.1%} {r['update']:6.1%} {r['other']:6.1%} | {r['validity']:8.1%}")  # fmt: skip
    base, ours = res["serial (baseline)"]["step_s"], res["async pool (2 workers)"]["step_s"]
    print(f"step-time ratio serial / async: {base / ours:.2f}x")
    print(f"reward evaluations/s (judge_group on the sampled rollouts): 1 process {rate[0]:.1f}, "
          f"2-worker pool {rate[1]:.1f} (ratio {rate[1] / rate[0]:.2f}x)")  # fmt: skip


def judge_pool_rate():
    """Rollouts judged per second: 32 training molecules, each with its own reference conformers
    (twice) as the candidates, so every candidate is valid and costs the full RMSD work."""
    import experiments.lm_grpo as exp
    from molgen.lm import data as lm_data
    from molgen.lm import rewards, rollouts

    cfg = exp.get_config()
    source = lm_data.build(cfg.data, cfg.data.data_dir).as_data_source()
    groups = rollouts.molecule_groups(source["train"], 32)
    jobs = [(g["smiles"], g["refs"], [rollouts.enriched.unit_text(g["smiles"], r) for r in g["refs"]] * 2,
             cfg.rewards.to_dict()) for g in groups]  # fmt: skip
    n = sum(len(j[2]) for j in jobs)
    t = time.time()
    for j in jobs:
        rewards.judge_group(j)
    serial = n / (time.time() - t)
    pool = rewards.RewardPool(2)
    pool.collect(pool.submit(jobs[:2]))  # start the workers
    t = time.time()
    pool.collect(pool.submit(jobs))
    pooled = n / (time.time() - t)
    pool.close()
    return serial, pooled


if __name__ == "__main__":
    main()
