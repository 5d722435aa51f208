"""Rollouts: k candidates per prompt, a judge, preference pairs; the held-out reward evaluation.

The `lm_rollouts` family (experiments/lm_rollouts.py) writes into its workdir:
- `prompts.jsonl`: one line per prompt molecule: prompt_id, SMILES, prompt text and its
  reference conformers (enriched strings, the judge's ground truth);
- `rollouts.jsonl`: one line per candidate (prompt_id, k index, completion text, the sampled
  token ids and their count). DPO trains on these ids: re-encoding the text would give a
  malformed completion another tokenization than the one the policy sampled (for 95% of the
  decode failures of the quick rollouts), and DPO would push down sequences the policy never writes;
- `manifest.json`: policy workdir, model, sampling config, seed and counts;
- `judged.jsonl`: each candidate with its reward, components, validity and failure reason;
- `pairs.jsonl`, split by prompt into `pairs_train.jsonl` / `pairs_heldout.jsonl`:
  `{prompt, chosen, rejected, ...}` by `best_worst` (per prompt, the best against the worst
  candidate), `all_pairs` (every ordered pair whose reward gap exceeds the margin) or `prefix`
  (step-level: every candidate that breaks the coordinate grammar is repaired by resampling
  from just before the break, and the judged repair is chosen over the broken prefix;
  `repairs.jsonl` holds the judged repairs).

Readers never die on one bad record: a malformed JSONL line, a prompt whose SMILES does not
parse or a candidate whose prompt is unknown is skipped, counted and named in the log and in
`judge_report.json`. Preference files may also be generic `{prompt, chosen, rejected}` JSONL
or the Anthropic-HH format (`{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": ...}`,
the prompt being everything up to the last "Assistant:" turn).
"""

from __future__ import annotations

import json
import logging
import pathlib
import time
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
from rdkit import Chem

from molgen.chem import conformers, enriched
from molgen.core.records import as_str
from molgen.lm import rewards, sample, sequences, tokenizer
from molgen.lm.policy import Policy

log = logging.getLogger("molgen")
PAIR_MODES = ("best_worst", "all_pairs", "prefix")


# --- prompts -----------------------------------------------------------------------------
def molecule_groups(split_source, limit: int = 0) -> list[dict]:
    """Molecules of a MOSES TFDS split with their reference conformers, by molecule index."""
    by_mol: dict[int, dict] = {}
    for i in range(len(split_source)):
        ex = split_source[i]
        rec = by_mol.setdefault(int(ex["mol_index"]), {"smiles": as_str(ex["smiles"]), "refs": []})
        rec["refs"].append(as_str(ex["enriched"]))
    out = [{"mol_index": k, **v} for k, v in sorted(by_mol.items())]
    return out[:limit] if limit else out


def prompt_ids(smiles: str) -> np.ndarray:
    return tokenizer.encode(enriched.prompt_text(smiles))


# --- sampling ----------------------------------------------------------------------------
def sample_chunks(params, policy: Policy, prompts: list[np.ndarray], rng, gc, gstates=None):
    """Yield (start, [completion ids]) per chunk of `gc.batch_size` prompts (fixed shapes, one
    compilation). Completion ids end with the stop token when the model emitted it.
    `gstates`: grammar automaton state after each prompt; given, decoding is grammar-constrained
    and the prompts (which may end inside a coordinate block) are padded to multiples of 128."""
    params = jax.device_put(params, jax.local_devices()[0])  # one device samples; no replicated decode
    stop = sequences.stop_id(policy.codec)
    for start in range(0, len(prompts), gc.batch_size):
        chunk = prompts[start : start + gc.batch_size]
        n = len(chunk)
        chunk = chunk + [chunk[-1]] * (gc.batch_size - n)
        arr, lens, pos, state = sample.prepare_prompts(chunk, policy.positions, 16 if gstates is None else 128)
        gs = None if gstates is None else gstates[start : start + n]
        gs = None if gs is None else jnp.asarray(gs + gs[-1:] * (gc.batch_size - n))  # padded like the chunk
        out, n_gen = sample.generate(
            params,
            jnp.asarray(arr),
            jnp.asarray(lens),
            jax.random.fold_in(rng, start),
            cfg=policy.model,
            max_new=gc.max_new_tokens,
            temperature=gc.temperature,
            top_k=gc.top_k,
            top_p=gc.top_p,
            stop_id=stop,
            prompt_pos_BxP=jnp.asarray(pos),
            pos_state=tuple(jnp.asarray(x) for x in state),
            pos_mode=policy.positions,
            grammar=(gc.grammar or gstates is not None) and policy.codec == "molecular",
            grammar_state_B=gs,
        )
        out, n_gen = np.asarray(out), np.asarray(n_gen)
        yield start, [out[i, : n_gen[i]] for i in range(n)]


def judge_jobs(groups: list[dict], texts_per_group: list[list[str]], reward_cfg: dict):
    return [(g["smiles"], g["refs"], t, reward_cfg) for g, t in zip(groups, texts_per_group, strict=True)]


def rollout_groups(params, policy: Policy, groups: list[dict], k: int, rng, gc, reward_cfg: dict, pool, timed=False):
    """Sample k completions per group and judge them on the pool while the device samples the
    next chunk. Returns (completion ids [P][k], judged records [P][k], group stats [P]) and, with
    `timed`, the seconds spent sampling and then waiting for the rewards."""
    t0 = time.time()
    if gc.batch_size % k:
        raise ValueError(f"sampling batch_size={gc.batch_size} must be a multiple of k={k} (whole groups per chunk)")
    prompts = [prompt_ids(g["smiles"]) for g in groups for _ in range(k)]
    comps: list[np.ndarray] = [None] * len(prompts)
    handles = []
    for start, chunk in sample_chunks(params, policy, prompts, rng, gc):
        comps[start : start + len(chunk)] = chunk
        g0, g1 = start // k, (start + len(chunk)) // k
        texts = [
            [enriched.prompt_text(groups[g]["smiles"]) + tokenizer.decode(comps[g * k + j]) for j in range(k)]
            for g in range(g0, g1)
        ]
        handles.append(pool.submit(judge_jobs(groups[g0:g1], texts, reward_cfg)))
    t1 = time.time()
    judged = [r for h in handles for r in pool.collect(h)]
    ids = [comps[g * k : (g + 1) * k] for g in range(len(groups))]
    out = ids, [j["records"] for j in judged], [j["cov"] for j in judged]
    return (*out, {"sample": t1 - t0, "reward_wait": time.time() - t1}) if timed else out


def heldout_eval(params, policy: Policy, groups: list[dict], ec, reward_cfg: dict, pool, seed: int = 0) -> dict:
    """Mean reward, validity and COV/MAT on held-out molecules: `samples_per_ref` x M samples
    per molecule (M references), each molecule judged as one group."""
    k = ec.samples_per_ref * max(len(g["refs"]) for g in groups)
    ids, recs, covs = rollout_groups(params, policy, groups, k, jax.random.key(seed), ec, reward_cfg, pool)
    flat = [r for rs in recs for r in rs]
    out = rewards.summarize(flat)
    # standard errors over molecules (the samples of one molecule are not independent)
    for k, f in (("reward", lambda r: r["reward"]), ("validity", lambda r: float(r["valid"]))):
        per_mol = np.asarray([np.mean([f(r) for r in rs]) for rs in recs], float)
        out[f"{k}_se"] = conformers.standard_error(per_mol)
    # the same aggregates as `evaluate` (MAT over all molecules at eval.mat_cap and valid-only, SEs)
    n_valid = [sum(r["valid"] for r in rs) for rs in recs]
    out.update(conformers.aggregate([{"n_valid": n, **c} for n, c in zip(n_valid, covs, strict=True)],
                                    ec.get("mat_cap", 3.0)))  # fmt: skip
    out["completion_len"] = float(np.mean([len(c) for cs in ids for c in cs]))
    out["molecules"], out["samples"] = len(groups), len(flat)
    return out


# --- files -------------------------------------------------------------------------------
def read_jsonl(path, counts: dict | None = None, required: tuple = ()):
    """(line number, record) of every well-formed line; bad lines are skipped, counted in
    `counts["bad_lines"]` and logged with the file and line number."""
    counts = counts if counts is not None else {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict):
                    raise ValueError("not a JSON object")
                missing = [k for k in required if k not in rec]
                if missing:
                    raise ValueError(f"missing keys {missing}")
            except (json.JSONDecodeError, ValueError) as e:
                counts["bad_lines"] = counts.get("bad_lines", 0) + 1
                log.warning("%s line %d skipped: %s", path, n, e)
                continue
            yield n, rec


def write_jsonl(path, records) -> int:
    path = pathlib.Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    n = 0
    with open(tmp, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
            n += 1
    tmp.replace(path)  # never a half-written file under the final name
    return n


def judge_file(workdir, reward_cfg: dict, pool) -> dict:
    """rollouts.jsonl + prompts.jsonl -> judged.jsonl; returns the counts (also judge_report.json)."""
    w = pathlib.Path(workdir)
    counts: dict = defaultdict(int)
    prompts = {}
    for n, rec in read_jsonl(w / "prompts.jsonl", counts, ("prompt_id", "smiles", "refs")):
        if Chem.MolFromSmiles(rec["smiles"]) is None:
            counts["bad_prompts"] += 1
            log.warning("%s line %d: prompt %r has SMILES %r that does not parse; skipped", w / "prompts.jsonl", n,
                        rec["prompt_id"], rec["smiles"])  # fmt: skip
            continue
        prompts[rec["prompt_id"]] = rec
    by_prompt = defaultdict(list)
    for n, rec in read_jsonl(w / "rollouts.jsonl", counts, ("prompt_id", "completion")):
        if rec["prompt_id"] not in prompts:
            counts["orphans"] += 1
            log.warning("%s line %d: unknown or skipped prompt %r", w / "rollouts.jsonl", n, rec["prompt_id"])
            continue
        by_prompt[rec["prompt_id"]].append(rec)
    pids = sorted(by_prompt)
    groups = [prompts[p] for p in pids]
    texts = [[enriched.prompt_text(prompts[p]["smiles"]) + r["completion"] for r in by_prompt[p]] for p in pids]
    judged = pool.collect(pool.submit(judge_jobs(groups, texts, reward_cfg))) if pids else []
    out = []
    for p, j in zip(pids, judged, strict=True):
        for rec, score in zip(by_prompt[p], j["records"], strict=True):
            out.append({**rec, **score})
    counts["judged"] = write_jsonl(w / "judged.jsonl", out)
    counts["prompts"] = len(pids)
    (w / "judge_report.json").write_text(json.dumps(dict(counts), indent=1))
    return dict(counts)


def make_pairs(judged: list[dict], prompts: dict, mode: str = "best_worst", margin: float = 0.0, max_per_prompt=0):
    """{prompt, chosen, rejected} pairs from judged candidates grouped by prompt_id."""
    by_prompt = defaultdict(list)
    for r in judged:
        by_prompt[r["prompt_id"]].append(r)
    pairs = []
    for pid in sorted(by_prompt):
        cands = sorted(by_prompt[pid], key=lambda r: -r["reward"])
        prompt = enriched.prompt_text(prompts[pid]["smiles"]) if pid in prompts else cands[0].get("prompt", "")
        if mode == "best_worst":
            todo = [(cands[0], cands[-1])]
        elif mode == "all_pairs":
            todo = [(a, b) for i, a in enumerate(cands) for b in cands[i + 1 :]]
        else:
            raise ValueError(f"make_pairs builds 'best_worst' or 'all_pairs' pairs, not {mode!r} (prefix_pairs)")
        todo = [(a, b) for a, b in todo if a["reward"] - b["reward"] > margin]
        if max_per_prompt:
            todo = todo[:max_per_prompt]
        for a, b in todo:
            pair = {"prompt_id": pid, "prompt": prompt, "chosen": a["completion"], "rejected": b["completion"],
                    "chosen_reward": a["reward"], "rejected_reward": b["reward"]}  # fmt: skip
            if "ids" in a and "ids" in b:
                pair.update(chosen_ids=a["ids"], rejected_ids=b["ids"])
            pairs.append(pair)
    return pairs


def repair_candidates(params, policy: Policy, groups: dict, judged: list[dict], gc, rng, reward_cfg, pool):
    """Judged repairs of every candidate whose sampled ids break the coordinate grammar: the
    policy resamples the rest from the token before the first break, under the grammar.
    Each record has the original's prompt_id and k, `prefix_tokens` (ids kept) and the
    judge's fields; `groups` maps prompt_id to {smiles, refs}."""
    todo = []
    for r in judged:
        if r.get("valid") or "ids" not in r or r["prompt_id"] not in groups:
            continue
        cut, st = tokenizer.grammar_violation(r["ids"])
        if cut >= 0:
            todo.append((r, cut, st))
    todo.sort(key=lambda t: t[1])  # chunks of similar prefix lengths pad little
    prompts = [np.concatenate([prompt_ids(groups[r["prompt_id"]]["smiles"]), np.asarray(r["ids"][:cut], np.int32)])
               for r, cut, _ in todo]  # fmt: skip
    by_prompt = defaultdict(list)
    for start, chunk in sample_chunks(params, policy, prompts, rng, gc, [st for *_, st in todo]):
        for (r, cut, _), cont in zip(todo[start : start + len(chunk)], chunk, strict=True):
            ids = [int(i) for i in r["ids"][:cut]] + cont.tolist()
            rec = {"prompt_id": r["prompt_id"], "k": r["k"], "prefix_tokens": cut, "completion": tokenizer.decode(ids)}
            by_prompt[r["prompt_id"]].append({**rec, "tokens": len(ids), "ids": ids})
        log.info("repaired %d / %d broken candidates", min(start + gc.batch_size, len(todo)), len(todo))
    pids = sorted(by_prompt)
    texts = [[enriched.prompt_text(groups[p]["smiles"]) + c["completion"] for c in by_prompt[p]] for p in pids]
    scores = pool.collect(pool.submit(judge_jobs([groups[p] for p in pids], texts, reward_cfg))) if pids else []
    out = []
    for p, j in zip(pids, scores, strict=True):
        out += [{**c, **sc} for c, sc in zip(by_prompt[p], j["records"], strict=True)]
    return out


def prefix_pairs(repairs: list[dict], judged: list[dict], prompts: dict, margin: float = 0.0, max_per_prompt=0):
    """Step-level pairs (Step-DPO, Lai et al. 2024) from `repair_candidates` whose repair the
    judge scores above the original by more than `margin`: chosen = the repair up to the end of
    the repaired step (the `>` of the coordinate block it fixes), rejected = the original up to
    and including its first grammar-breaking token. Both share the prefix, so DPO's margin sees
    only the step where they part; the rest of the repair (`chosen_full`), a fresh sample of the
    policy, would add only noise to the margin."""
    orig = {(r["prompt_id"], r["k"]): r for r in judged}
    pairs, count = [], defaultdict(int)
    for c in sorted(repairs, key=lambda c: (c["prompt_id"], c["k"])):
        o, cut = orig[(c["prompt_id"], c["k"])], c["prefix_tokens"]
        if c["reward"] - o["reward"] <= margin or (max_per_prompt and count[c["prompt_id"]] >= max_per_prompt):
            continue
        count[c["prompt_id"]] += 1
        rejected = [int(i) for i in o["ids"][: cut + 1]]
        chosen = c["ids"][: tokenizer.grammar_step_end(c["ids"], cut) + 1]
        pairs.append({"prompt_id": c["prompt_id"], "prompt": enriched.prompt_text(prompts[c["prompt_id"]]["smiles"]),
                      "chosen": tokenizer.decode(chosen), "rejected": tokenizer.decode(rejected), "chosen_ids": chosen,
                      "rejected_ids": rejected, "chosen_reward": c["reward"], "rejected_reward": o["reward"],
                      "prefix_tokens": cut, "chosen_full": c["completion"]})  # fmt: skip
    return pairs


def write_pairs(workdir, pairs: list[dict], heldout_frac: float, seed: int) -> tuple[int, int]:
    """pairs.jsonl and its split by prompt (a `heldout_frac` of the prompts, drawn with `seed`)
    into pairs_train.jsonl / pairs_heldout.jsonl; returns the two counts."""
    w, rng = pathlib.Path(workdir), np.random.default_rng(seed)
    pids = sorted({p["prompt_id"] for p in pairs})
    held = set(rng.permutation(pids)[: int(round(len(pids) * heldout_frac))].tolist())
    write_jsonl(w / "pairs.jsonl", pairs)
    n_tr = write_jsonl(w / "pairs_train.jsonl", [p for p in pairs if p["prompt_id"] not in held])
    return n_tr, write_jsonl(w / "pairs_heldout.jsonl", [p for p in pairs if p["prompt_id"] in held])


def split_hh(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Anthropic-HH transcripts -> (prompt up to and including the last "\\n\\nAssistant:",
    chosen reply, rejected reply); ValueError if they do not share that prompt."""
    tag = "\n\nAssistant:"
    i = chosen.rfind(tag)
    if i < 0:
        raise ValueError("no '\\n\\nAssistant:' turn")
    prompt = chosen[: i + len(tag)]
    if not rejected.startswith(prompt):
        raise ValueError("chosen and rejected do not share the prompt")
    return prompt, chosen[len(prompt) :], rejected[len(prompt) :]


def load_pairs(path: str, fmt: str, counts: dict) -> list[dict]:
    """Preference pairs from `fmt` = "pairs" ({prompt, chosen, rejected} JSONL) or "hh"."""
    out = []
    if fmt == "pairs":
        for _, rec in read_jsonl(path, counts, ("prompt", "chosen", "rejected")):
            out.append(rec)
    elif fmt == "hh":
        for n, rec in read_jsonl(path, counts, ("chosen", "rejected")):
            try:
                p, c, r = split_hh(rec["chosen"], rec["rejected"])
            except ValueError as e:
                counts["bad_lines"] = counts.get("bad_lines", 0) + 1
                log.warning("%s line %d skipped: %s", path, n, e)
                continue
            out.append({"prompt": p, "chosen": c, "rejected": r})
    else:
        raise ValueError(f"data.format={fmt!r} is not 'pairs' or 'hh'")
    return out


# --- the lm_rollouts family --------------------------------------------------------------
def train_and_evaluate(config, workdir: str):
    """Sample k candidates per prompt, judge them, convert to pairs (see the module docstring)."""
    from molgen.core import loop
    from molgen.lm import data as lm_data
    from molgen.lm import policy as policy_lib

    if config.pairs.mode not in PAIR_MODES:
        raise ValueError(f"pairs.mode={config.pairs.mode!r} is not one of {PAIR_MODES}")
    pol, params = policy_lib.load_upstream(config)  # a rollouts run is not a policy: nothing recorded
    if jax.process_index() != 0:
        return None
    w = pathlib.Path(workdir)
    builder = lm_data.build(config.data, config.data.data_dir)
    source = builder.as_data_source()
    groups = molecule_groups(source[config.rollouts.split], config.rollouts.num_prompts)
    for g in groups:
        g["prompt_id"] = f"{config.rollouts.split}-{g['mol_index']}"
        g["prompt"] = enriched.prompt_text(g["smiles"])
    write_jsonl(w / "prompts.jsonl", [{k: g[k] for k in ("prompt_id", "smiles", "prompt", "refs")} for g in groups])
    k, rc = config.rollouts.k, config.rollouts
    prompts = [prompt_ids(g["smiles"]) for g in groups for _ in range(k)]
    rows = []
    for start, chunk in sample_chunks(params, pol, prompts, jax.random.key(rc.seed), rc):
        for j, ids in enumerate(chunk):
            g = groups[(start + j) // k]
            rows.append({"prompt_id": g["prompt_id"], "k": (start + j) % k, "completion": tokenizer.decode(ids),
                         "tokens": len(ids), "ids": ids.tolist()})  # fmt: skip
        log.info("sampled %d / %d candidates", len(rows), len(prompts))
    write_jsonl(w / "rollouts.jsonl", rows)
    manifest = {
        "policy": pol.workdir,
        "model": policy_lib.dataclasses.asdict(pol.model),
        "positions": pol.positions,
        "sampling": rc.to_dict(),
        "seed": rc.seed,
        "prompts": len(groups),
        "candidates": len(rows),
        "data": config.data.to_dict(),
    }
    loop.write_json(workdir, "manifest.json", manifest)
    pc, prompts_by_id = config.pairs, {g["prompt_id"]: g for g in groups}
    pool = rewards.RewardPool(config.rewards_workers)
    try:
        counts = judge_file(w, config.rewards.to_dict(), pool)
        log.info("judged: %s", counts)
        judged = [r for _, r in read_jsonl(w / "judged.jsonl")]
        if pc.mode == "prefix":
            rng = jax.random.fold_in(jax.random.key(rc.seed), 1)
            repairs = repair_candidates(params, pol, prompts_by_id, judged, rc, rng, config.rewards.to_dict(), pool)
            write_jsonl(w / "repairs.jsonl", repairs)
            pairs = prefix_pairs(repairs, judged, prompts_by_id, pc.margin, pc.max_per_prompt)
            counts.update(repaired=len(repairs), repaired_valid=sum(bool(r["valid"]) for r in repairs))
        else:
            pairs = make_pairs(judged, prompts_by_id, pc.mode, pc.margin, pc.max_per_prompt)
    finally:
        pool.close()
    n_tr, n_ho = write_pairs(w, pairs, pc.heldout_frac, pc.seed)
    summary = rewards.summarize(judged)
    summary.update(pairs=len(pairs), pairs_train=n_tr, pairs_heldout=n_ho, **counts)
    loop.write_json(workdir, "summary.json", summary)
    log.info("rollouts summary: %s", summary)
    return summary
