"""DPO with fixed beta, the risk/quantile dynamic beta, or beta-DPO (`lm_dpo`).

Policy and frozen reference both start from `config.policy.workdir` (the SFT run; built
first when it has not finished). Pairs (`config.data`):
- `source="rollouts"`: `pairs_train.jsonl` / `pairs_heldout.jsonl` of an `lm_rollouts` run
  (`data.rollouts`, built from `data.rollouts_config` when missing);
- `source="files"`: `data.train` / `data.heldout` in `data.format` "pairs" (generic
  `{prompt, chosen, rejected}` JSONL) or "hh" (Anthropic-HH), tokenised with the policy's codec
  ("bytes" for text).

`dpo.loss` "ipo" with `dpo.ipo_normalize` (default True, experiments/lm_dpo.py) forms the
margin from mean token log-probs (TRL's `ipo`; losses.dpo_margin) for the loss, accuracy, logged
margins and beta controllers; False: summed log-probs, as the other losses. Held-out win rates
always use summed log-probs.
`dpo.beta_mode`: "fixed" (dpo.beta); "risk" (losses.RiskBeta, updated on the host from the
step's global margins; the new beta applies from the next step); "beta_dpo" (losses.
beta_dpo_select inside the step on the all-gathered margins). The controller state (beta,
tau, warmup buffer, EMA) is saved in the checkpoint metadata and the pair iterator with the
state, so a killed run resumes with the same beta, threshold and data position.
`dpo.rpo_alpha` > 0 adds RPO's alpha x (mean token NLL of the chosen completion) to each
pair's loss (losses.rpo_nll). `dpo.ref_logps`: "precompute" (one pass over the pairs before
training) or "step" (the frozen reference runs inside every step). Per-pair margins go to
`margins/margins.jsonl` (one line per step: pair ids, margins, kept flags, beta, tau).

Held-out evaluation (before training and at every eval): win rates on held-out pairs (implicit
reward margin > 0; and mean token log-prob of chosen > rejected under the policy, which is
defined before training too) and, for molecular policies, mean reward / validity / COV-MAT of
samples on the held-out test molecules.
"""

from __future__ import annotations

import json
import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from molgen.chem import conformers
from molgen.core import logging as mlog
from molgen.core import loop
from molgen.core import streams as streams_lib
from molgen.core.distributed import make_mesh
from molgen.core.step import AXIS
from molgen.lm import losses, rewards, rollouts, sequences, tokenizer
from molgen.lm import policy as policy_lib
from molgen.lm.model import Qwen3

log = logging.getLogger("molgen")
SIDES = ("c_", "r_")
ROW_KEYS = ("tokens", "positions", "segment_ids", "target_mask")


# --- data --------------------------------------------------------------------------------
def pair_files(config) -> tuple[str, str, str]:
    dc = config.data
    if dc.source == "rollouts":
        w = policy_lib.ensure_run(dc.rollouts, dc.rollouts_config)
        return f"{w}/pairs_train.jsonl", f"{w}/pairs_heldout.jsonl", "pairs"
    if dc.source == "files":
        return dc.train, dc.heldout, dc.format
    raise ValueError(f"data.source={dc.source!r} is not 'rollouts' or 'files'")


def pair_rows(pairs: list[dict], pol: policy_lib.Policy, max_len: int, path: str) -> list[dict]:
    """Token rows of chosen (c_) and rejected (r_) per pair; unencodable pairs are skipped."""
    out, skipped, cut, prompts = [], 0, 0, {}
    for i, p in enumerate(pairs):
        try:
            prompt = sequences.encode_text(p["prompt"], pol.codec)
            # pairs of one prompt are not independent: held-out SEs are taken over prompts
            row = {"pair_id": np.int32(i), "prompt_index": np.int32(prompts.setdefault(p["prompt"], len(prompts)))}
            for side, key in zip(SIDES, ("chosen", "rejected"), strict=True):
                r = sequences.make_row(prompt, sampled_ids(p, key, pol.codec), max_len, pol.positions)
                cut += int(r.pop("truncated"))
                row.update({side + k: v for k, v in r.items()})
        except ValueError as e:
            skipped += 1
            log.warning("%s pair %d skipped: %s", path, i, e)
            continue
        out.append(row)
    if skipped or cut:
        log.warning("%s: %d pairs skipped, %d completions cut at data.max_len=%d", path, skipped, cut, max_len)
    return out


def sampled_ids(pair: dict, key: str, codec: str) -> np.ndarray:
    """Completion ids of pair[key]: the ids the policy sampled (`{key}_ids`, written by
    lm_rollouts) when the pair has them, else the encoded text. Re-encoding is canonical, and
    a sampled completion that breaks a coordinate block is not: DPO must push down the tokens
    the policy wrote. ValueError when the ids do not decode to the text."""
    ids = pair.get(f"{key}_ids")
    if ids is None or codec != "molecular":
        return sequences.completion_ids(pair[key], codec)
    ids = np.asarray(ids)
    if ids.ndim != 1 or ids.dtype.kind not in "iu" or ((ids < 0) | (ids >= tokenizer.vocab_size())).any():
        raise ValueError(f"{key}_ids is not a list of token ids")
    if tokenizer.decode(ids) != pair[key]:
        raise ValueError(f"{key}_ids do not decode to the {key} text")
    return ids.astype(np.int32)


def _stack(rows: list[dict], keys) -> dict:
    return {k: np.stack([r[k] for r in rows]) for k in keys}


def sequence_logps(model, params, rows: list[dict], batch_size: int = 32) -> dict:
    """Summed and mean completion log-probs of both sides for every pair row (one device)."""
    dev = jax.local_devices()[0]
    params = jax.device_put(params, dev)

    @jax.jit
    def fn(params, batch):
        out = {}
        for side in SIDES:
            lp, m = sequences.completion_logps(model, params, batch, side)
            out[side + "sum"] = (lp * m).sum(-1)
            out[side + "mean"] = (lp * m).sum(-1) / jnp.maximum(m.sum(-1), 1.0)
        return out

    keys = [s + k for s in SIDES for k in ROW_KEYS]
    res = {f"{s}{k}": [] for s in SIDES for k in ("sum", "mean")}
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        n = len(chunk)
        chunk = chunk + [chunk[-1]] * (batch_size - n)
        out = jax.device_get(fn(params, jax.device_put(_stack(chunk, keys), dev)))
        for k, v in out.items():
            res[k].append(np.asarray(v)[:n])
    return {k: np.concatenate(v) if v else np.zeros(0) for k, v in res.items()}


# --- controllers -------------------------------------------------------------------------
class Controller:
    """Host side of the DPO step: the ctrl input, per-pair margin logging, saved state."""

    def __init__(self, config, workdir: str, ref_params=None):
        dc = config.dpo
        self.mode, self.seed = dc.beta_mode, config.train.seed
        if self.mode not in ("fixed", "risk", "beta_dpo"):
            raise ValueError(f"dpo.beta_mode={self.mode!r} is not 'fixed', 'risk' or 'beta_dpo'")
        r = dc.risk
        self.risk = losses.RiskBeta(dc.beta, r.delta, r.lam, r.gamma, r.alpha, r.beta_min, r.beta_max, r.warmup_steps)
        self.m0, self.s, self.init, self.step = 0.0, 1.0, False, 0
        self.ref_params = ref_params
        self.path = pathlib.Path(workdir) / "margins" / "margins.jsonl"
        self.main = jax.process_index() == 0
        if self.main:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def ctrl(self) -> dict:
        c = {"beta": jnp.float32(self.risk.beta)}
        if self.mode == "beta_dpo":
            key = jax.random.fold_in(jax.random.key(self.seed + 7), self.step)
            c.update(m0=jnp.float32(self.m0), s=jnp.float32(self.s), init=jnp.asarray(self.init), key=key)
        if self.ref_params is not None:
            c["ref_params"] = self.ref_params
        return c

    def update(self, step: int, metrics: dict, rows: dict, state: dict) -> dict:
        self.step = step
        margins = np.asarray(rows["margin"], np.float64)
        beta_used = float(state["beta"]) if self.mode == "beta_dpo" else self.risk.beta
        out = {"beta": beta_used}
        if self.mode == "risk":
            out.update({k: v for k, v in self.risk.update(margins).items() if k != "beta"})
            out["beta_next"] = self.risk.beta
        elif self.mode == "beta_dpo":
            self.m0, self.s, self.init = float(state["m0"]), float(state["s"]), True
            out.update(m0=self.m0, s=self.s, threshold=self.m0)
        if self.main:
            rec = {"step": step, "beta": beta_used, "tau": out.get("tau", out.get("threshold")),
                   "pair_id": np.asarray(rows["pair_id"]).tolist(), "margin": margins.tolist(),
                   "kept": np.asarray(rows["keep"]).astype(int).tolist()}  # fmt: skip
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")
        return out

    def state_dict(self) -> dict:
        return {"risk": self.risk.state_dict(), "m0": self.m0, "s": self.s, "init": self.init, "step": self.step}

    def load(self, d: dict | None):
        """Restore a checkpoint's controller state (None: a fresh start) and drop margin lines
        of steps after it."""
        if d:
            self.risk.load(d["risk"])
            self.m0, self.s, self.init, self.step = d["m0"], d["s"], d["init"], d["step"]
        if self.main:  # drop lines of steps after the checkpoint (they will be redone)
            mlog.truncate_jsonl(self.path, self.step)


# --- loss --------------------------------------------------------------------------------
def dpo_loss_fn(model: Qwen3, config):
    dc = config.dpo
    bd = dc.beta_dpo

    def loss_fn(params, batch, rng, ctrl):
        del rng
        sums, n_tok = {}, {}
        for side in SIDES:
            lp, m = sequences.completion_logps(model, params, batch, side)
            sums[side], n_tok[side] = (lp * m).sum(-1), m.sum(-1)
            if dc.ref_logps == "step":
                rlp, _ = sequences.completion_logps(model, jax.lax.stop_gradient(ctrl["ref_params"]), batch, side)
                sums["ref_" + side] = (rlp * m).sum(-1)
            else:
                sums["ref_" + side] = batch["ref_" + side]
        counts = (n_tok["c_"], n_tok["r_"]) if dc.loss == "ipo" and dc.ipo_normalize else ()
        margin = losses.dpo_margin(sums["c_"], sums["r_"], sums["ref_c_"], sums["ref_r_"], *counts)
        state = {}
        if dc.beta_mode == "beta_dpo":
            gap_all = jax.lax.all_gather(jax.lax.stop_gradient(margin), AXIS, tiled=True)
            keep_all, beta, m0, s = losses.beta_dpo_select(
                gap_all, ctrl["m0"], ctrl["s"], ctrl["init"], ctrl["key"],
                beta0=dc.beta, a=bd.a, drop=bd.drop, momentum=bd.momentum, min_beta=bd.min_beta,
            )  # fmt: skip
            n = margin.shape[0]
            w = jax.lax.dynamic_slice_in_dim(keep_all, jax.lax.axis_index(AXIS) * n, n).astype(jnp.float32)
            state = {"beta": beta, "m0": m0, "s": s}
        else:
            beta, w = ctrl["beta"], jnp.ones_like(margin)
        nll = losses.rpo_nll(sums["c_"], n_tok["c_"], 1.0)  # logged; in the loss when dpo.rpo_alpha > 0
        per = (losses.dpo_loss(margin, beta, dc.loss, dc.label_smoothing) + dc.rpo_alpha * nll) * w
        aux = {
            "weight": w.sum(),
            "loss": per.sum(),
            "margin": (margin * w).sum(),
            "accuracy": ((margin > 0) * w).sum(),
            "chosen_logp": (sums["c_"] * w).sum(),
            "rejected_logp": (sums["r_"] * w).sum(),
            "chosen_nll": (nll * w).sum(),  # mean token NLL of the chosen side (RPO's term before alpha)
            "rows": {"margin": margin, "keep": w, "pair_id": batch["pair_id"]},
            "state": state,
        }
        return per.sum(), aux

    return loss_fn


# --- evaluation --------------------------------------------------------------------------
def pair_eval(model, params, ref, rows) -> dict:
    """Win rates on held-out pairs given the reference's log-probs `ref` (sequence_logps)."""
    if not rows:
        return {}
    pol = sequence_logps(model, params, rows)
    margin = (pol["c_sum"] - pol["r_sum"]) - (ref["c_sum"] - ref["r_sum"])
    cols = {
        "win_rate": (margin > 0) + 0.5 * (margin == 0),
        "logp_win_rate": (pol["c_mean"] > pol["r_mean"]).astype(float),
        "margin": margin,
        "chosen_logp": pol["c_sum"],
        "rejected_logp": pol["r_sum"],
    }
    out = {k: float(np.mean(v)) for k, v in cols.items()}
    # standard errors over prompts (pairs of one prompt share it): the SE of the per-prompt means
    cluster = np.asarray([r.get("prompt_index", r["pair_id"]) for r in rows])
    keys = np.unique(cluster)
    for k in ("win_rate", "logp_win_rate", "margin"):
        m = np.asarray([np.mean(cols[k][cluster == c]) for c in keys])
        out[f"{k}_se"] = conformers.standard_error(m)
    out["prompts"] = len(keys)
    return out


def plot_beta(workdirs: list[str], out) -> bool:
    """beta, the threshold (risk: tau, beta-DPO: M0) and the batch mean margin over steps for
    one or more DPO runs (each labelled with its beta_mode); False when none logged beta."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(wd, [r for r in mlog.read_metrics(wd) if "train/beta" in r]) for wd in workdirs]
    runs = [(wd, tr) for wd, tr in runs if tr]
    if not runs:
        return False
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    for wd, tr in runs:
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
        if a.get_legend_handles_labels()[0]:
            a.legend()
    fig.tight_layout()
    pathlib.Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


# --- family entry ------------------------------------------------------------------------
def train_and_evaluate(config, workdir: str):
    from molgen.lm import data as lm_data

    mesh = make_mesh(config.mesh.num_devices)
    pol, ref_params = policy_lib.load_upstream(config, workdir)
    model = Qwen3(pol.model)
    train_path, held_path, fmt = pair_files(config)
    counts: dict = {}
    train_rows = pair_rows(rollouts.load_pairs(train_path, fmt, counts), pol, config.data.max_len, train_path)
    held_rows = pair_rows(rollouts.load_pairs(held_path, fmt, counts), pol, config.data.max_len, held_path)
    held_rows = held_rows[: config.eval.heldout_pairs] if config.eval.heldout_pairs else held_rows
    log.info("DPO: %d train / %d held-out pairs (%s); skipped: %s", len(train_rows), len(held_rows), fmt, counts)
    if not train_rows:
        raise ValueError(f"{train_path}: no usable preference pairs")
    dc, tc = config.dpo, config.train
    keys = ["pair_id"] + [s + k for s in SIDES for k in ROW_KEYS]
    if dc.ref_logps == "precompute":
        ref = sequence_logps(model, ref_params, train_rows)
        for i, r in enumerate(train_rows):
            r["ref_c_"], r["ref_r_"] = np.float32(ref["c_sum"][i]), np.float32(ref["r_sum"][i])
        keys += ["ref_c_", "ref_r_"]
    elif dc.ref_logps != "step":
        raise ValueError(f"dpo.ref_logps={dc.ref_logps!r} is not 'precompute' or 'step'")
    held_ref = sequence_logps(model, ref_params, held_rows) if held_rows else None
    n_streams, streams = mesh.shape["data"], loop.local_streams(mesh)
    train = streams_lib.array_pipeline(
        train_rows, keys, global_batch=tc.batch_size, seed=tc.seed, streams=streams, n_streams=n_streams
    )
    groups, pool = [], None
    if pol.codec == "molecular" and config.eval.num_molecules > 0:
        source = lm_data.build(config.prompts, config.prompts.data_dir).as_data_source()
        groups = rollouts.molecule_groups(source["test"], config.eval.num_molecules)
        pool = rewards.RewardPool(config.rewards_workers)

    def eval_fn(params, step):
        params = jax.device_get(params)
        out = pair_eval(model, params, held_ref, held_rows)
        if groups and jax.process_index() == 0:
            out.update(rollouts.heldout_eval(params, pol, groups, config.eval, config.rewards.to_dict(), pool))
        if step == tc.steps and jax.process_index() == 0:  # kept, so that a restarted finished run still reports it
            loop.write_json(workdir, "eval_after.json", out)
        return out

    ctrl_ref = None
    if dc.ref_logps == "step":
        from molgen.core.step import replicate

        ctrl_ref = replicate(ref_params, mesh)
    controller = Controller(config, workdir, ctrl_ref)
    before = pathlib.Path(workdir) / "eval_before.json"
    try:
        if not before.exists():
            res = eval_fn(ref_params, 0)
            loop.write_json(workdir, "eval_before.json", res)
            log.info("before DPO: %s", res)
        multihost_utils.sync_global_devices("molgen_dpo_before")
        state, final = loop.fit(config, workdir, mesh=mesh, params=ref_params, loss_fn=dpo_loss_fn(model, config),
                                train_data=train, eval_fn=eval_fn, items_per_step=lambda m: float(tc.batch_size),
                                item_name="pairs", meta={"family": "lm_dpo", "beta_mode": dc.beta_mode},
                                controller=controller)  # fmt: skip
    finally:
        if pool is not None:
            pool.close()
    if jax.process_index() == 0:
        after = pathlib.Path(workdir) / "eval_after.json"
        after = json.loads(after.read_text()) if after.exists() else final
        summary = {"before": json.loads(before.read_text()), "after": after, "beta_mode": dc.beta_mode}
        loop.write_json(workdir, "summary.json", summary)
        try:
            plot_beta([workdir], pathlib.Path(workdir) / "plots" / "dpo_beta.png")
        except Exception as e:  # a plot must never lose the results already written
            log.warning("plotting failed: %s", e)
    return state
