"""LM post-training through the real CLI on tiny configs: SFT (building its missing pretraining
run), rollouts + judge + pairs, DPO killed and resumed, beta-DPO on byte-level HH text, GRPO
killed and resumed at the same data position."""

import json
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest
from test_cli import ROOT, _env, kill_when

from molgen.lm import dpo, rewards, rollouts, sequences, tokenizer
from tests.conftest import built_once


def cli(config, workdir, *overrides, timeout=600):
    cmd = [sys.executable, "-m", "molgen.main", f"--config={config}", f"--workdir={workdir}", *overrides]
    res = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{res.stderr[-4000:]}")
    return res


def lines(path):
    return [json.loads(x) for x in pathlib.Path(path).read_text().splitlines() if x]


@pytest.fixture(scope="session")
def chain(tmp_path_factory):
    """tiny pretraining (built by the SFT run, which finds it missing) -> SFT -> rollouts; built
    once for all pytest-xdist workers, and only read by the tests."""

    def build(t):
        res = cli("experiments/lm_sft.py:tiny", t / "sft", f"--config.policy.workdir={t / 'pre'}")
        assert "building the upstream run" in res.stderr and (t / "pre" / "done.json").exists()
        assert json.loads((t / "sft" / "policy.json").read_text()) == {"positions": "aligned", "codec": "molecular"}
        assert (t / "sft" / "eval" / "conformers.json").exists()
        cli("experiments/lm_rollouts.py:tiny", t / "ro", f"--config.policy.workdir={t / 'sft'}")

    return built_once(tmp_path_factory, "lm_post", build)


def test_rollouts_manifest_judged_and_pairs(chain):
    ro = chain / "ro"
    m = json.loads((ro / "manifest.json").read_text())
    assert m["prompts"] == 6 and m["candidates"] == 24 and m["policy"] == str(chain / "sft")
    judged = lines(ro / "judged.jsonl")
    assert len(judged) == 24 and all({"reward", "r_smcov", "valid", "reason"} <= set(j) for j in judged)
    pairs = lines(ro / "pairs.jsonl")
    assert len(pairs) == 6 and all(p["chosen_reward"] >= p["rejected_reward"] for p in pairs)
    # the pairs carry the ids the policy sampled, which DPO trains on
    assert all(tokenizer.decode(p[k + "_ids"]) == p[k] for p in pairs for k in ("chosen", "rejected"))
    assert len(lines(ro / "pairs_train.jsonl")) + len(lines(ro / "pairs_heldout.jsonl")) == 6


def test_prefix_pairs_share_the_prefix_up_to_the_first_break(chain, tmp_path):
    cli("experiments/lm_rollouts.py:tiny", tmp_path, f"--config.policy.workdir={chain / 'sft'}",
        "--config.pairs.mode=prefix")  # fmt: skip
    judged = {(r["prompt_id"], r["k"]): r for r in lines(tmp_path / "judged.jsonl")}
    broken = [r for r in judged.values() if tokenizer.grammar_violation(r["ids"])[0] >= 0]
    repairs = lines(tmp_path / "repairs.jsonl")
    assert broken and len(repairs) == len(broken) and {"reward", "valid", "reason"} <= set(repairs[0])
    for c in repairs:
        o, cut = judged[(c["prompt_id"], c["k"])]["ids"], c["prefix_tokens"]
        assert tokenizer.grammar_violation(o)[0] == cut and c["ids"][:cut] == o[:cut]
        assert tokenizer.grammar_violation(c["ids"])[0] == -1  # the repair is resampled under the grammar
    pairs = lines(tmp_path / "pairs.jsonl")
    assert pairs and len(pairs) <= len(repairs)
    for p in pairs:
        n = p["prefix_tokens"]
        assert p["chosen_ids"][:n] == p["rejected_ids"][:n] and len(p["rejected_ids"]) == n + 1
        assert tokenizer.grammar_violation(p["rejected_ids"])[0] == n
        assert tokenizer.grammar_violation(p["chosen_ids"]) == (-1, 0)  # chosen: through the repaired step
        assert p["chosen_full"].startswith(p["chosen"]) and len(p["chosen_ids"]) > n
    assert json.loads((tmp_path / "summary.json").read_text())["repaired"] == len(repairs)


def test_judge_skips_malformed_lines_and_bad_prompts(chain, tmp_path):
    for f in ("prompts.jsonl", "rollouts.jsonl"):
        shutil.copy(chain / "ro" / f, tmp_path / f)
    with open(tmp_path / "prompts.jsonl", "a") as f:
        f.write(json.dumps({"prompt_id": "bad", "smiles": "C1CC(", "refs": []}) + "\n")
        f.write("{not json\n")
    with open(tmp_path / "rollouts.jsonl", "a") as f:
        f.write('{"prompt_id": "train-1", "completion": \n')  # cut mid-line
        f.write(json.dumps({"prompt_id": "bad", "k": 0, "completion": "[C]<0,0,0>[/CONFORMER]"}) + "\n")
    pool = rewards.RewardPool(0)
    counts = rollouts.judge_file(tmp_path, {"w_smcov": 5.0}, pool)
    assert counts["bad_lines"] == 2 and counts["bad_prompts"] == 1 and counts["orphans"] == 1
    assert counts["judged"] == 24 and len(lines(tmp_path / "judged.jsonl")) == 24


def _dpo_args(chain):
    return [
        f"--config.policy.workdir={chain / 'sft'}",
        f"--config.data.rollouts={chain / 'ro'}",
        "--config.train.steps=24",
        "--config.ckpt.every_steps=8",
        "--config.ckpt.async_save=False",
        "--config.dpo.risk.warmup_steps=3",
        "--config.dpo.risk.alpha=0.5",
        "--config.eval.num_molecules=0",
        "--config.train.eval_every=1000",
    ]


def test_dpo_risk_killed_resumes_with_same_beta_threshold_and_data(chain, tmp_path):
    args = _dpo_args(chain)
    ref = tmp_path / "ref"
    cli("experiments/lm_dpo_dynamic_beta.py:tiny", ref, *args)
    wd = tmp_path / "killed"
    cmd = [sys.executable, "-m", "molgen.main", "--config=experiments/lm_dpo_dynamic_beta.py:tiny",
           f"--workdir={wd}", *args]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (wd / "checkpoints" / "8").exists():
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit())
    assert done and done[-1] < 24, f"the run was not killed mid-way: {done}"
    res = cli("experiments/lm_dpo_dynamic_beta.py:tiny", wd, *args)
    assert "resumed from" in res.stderr
    a, b = lines(ref / "margins" / "margins.jsonl"), lines(wd / "margins" / "margins.jsonl")
    assert [r["step"] for r in b] == list(range(1, 25))  # the killed steps were dropped and redone
    trained = [r["step"] for r in lines(wd / "metrics.jsonl") if "train/loss" in r]
    assert trained == [r["step"] for r in lines(ref / "metrics.jsonl") if "train/loss" in r]  # each step once
    for x, y in zip(a, b, strict=True):
        assert x["pair_id"] == y["pair_id"], x["step"]  # same data position
        assert y["beta"] == pytest.approx(x["beta"], rel=1e-5) and (x["tau"] is None) == (y["tau"] is None)
        if x["tau"] is not None:
            assert y["tau"] == pytest.approx(x["tau"], rel=1e-4, abs=1e-4)
        assert y["margin"] == pytest.approx(x["margin"], rel=1e-4, abs=1e-4)
    betas = [r["beta"] for r in a]
    assert betas[:4] == [0.1] * 4 and len(set(betas)) > 2  # fixed through warmup, then moving
    assert (ref / "plots" / "dpo_beta.png").exists() and (ref / "summary.json").exists()
    first = json.loads((ref / "summary.json").read_text())
    cli("experiments/lm_dpo_dynamic_beta.py:tiny", ref, *args)  # a finished run started again
    assert first["after"] and json.loads((ref / "summary.json").read_text())["after"] == first["after"]


HH = [
    ("What is the boiling point of water?", " 100 degrees Celsius at sea level.", " I don't know."),
    ("Name a noble gas.", " Argon.", " Water."),
    ("How many carbons are in ethane?", " Two.", " Seven."),
    ("What does DNA stand for?", " Deoxyribonucleic acid.", " Do Not Ask."),
    ("Is benzene aromatic?", " Yes, it has six pi electrons in a ring.", " No."),
    ("What is NaCl?", " Sodium chloride, table salt.", " A kind of sugar."),
]


def test_beta_dpo_on_byte_level_hh_text(tmp_path):
    hh, sft_data = tmp_path / "hh.jsonl", tmp_path / "sft.jsonl"
    with open(hh, "w") as f:
        for q, good, bad in HH:
            p = f"\n\nHuman: {q}\n\nAssistant:"
            f.write(json.dumps({"chosen": p + good, "rejected": p + bad}) + "\n")
        f.write(json.dumps({"chosen": "no assistant turn", "rejected": "x"}) + "\n")  # skipped, counted
    with open(sft_data, "w") as f:
        for q, good, _ in HH:
            f.write(json.dumps({"prompt": f"\n\nHuman: {q}\n\nAssistant:", "completion": good}) + "\n")
    byte_model = ["--config.model.vocab_size=384", "--config.data.codec=bytes", "--config.eval.num_molecules=0"]
    cli("experiments/lm_sft.py:tiny", tmp_path / "sft", "--config.policy.workdir=", f"--config.data.source={sft_data}",
        f"--config.data.validation={sft_data}", *byte_model)  # fmt: skip
    assert json.loads((tmp_path / "sft" / "policy.json").read_text())["codec"] == "bytes"
    res = cli("experiments/lm_dpo.py:tiny", tmp_path / "dpo", f"--config.policy.workdir={tmp_path / 'sft'}",
              "--config.data.source=files", f"--config.data.train={hh}", f"--config.data.heldout={hh}",
              "--config.data.format=hh", "--config.dpo.beta_mode=beta_dpo", "--config.train.batch_size=4")  # fmt: skip
    assert "DPO: 6 train / 6 held-out pairs" in res.stderr and "'bad_lines': 2" in res.stderr
    m = lines(tmp_path / "dpo" / "margins" / "margins.jsonl")
    assert all(sum(r["kept"]) == 3 for r in m)  # beta-DPO keeps int(4 x 0.8) of each batch of 4
    tr = [r for r in lines(tmp_path / "dpo" / "metrics.jsonl") if "train/m0" in r]
    assert len(tr) == 6 and all(r["train/beta"] >= 1e-3 for r in tr)
    s = json.loads((tmp_path / "dpo" / "summary.json").read_text())
    # the policy starts as the reference: every implicit-reward margin is exactly 0 (ties count 1/2);
    # trained on these very pairs (held-out = train here), it must prefer the chosen side after
    assert s["before"]["margin"] == 0.0 and s["before"]["win_rate"] == 0.5
    assert s["after"]["margin"] > 0.0 and s["after"]["win_rate"] > 0.5


class _Unigram:
    """A stand-in for Qwen3 in `dpo.sequence_logps`: every position predicts params["logp"]."""

    def apply(self, variables, tokens, positions, segment_ids):
        logp = variables["params"]["logp"]
        return jnp.broadcast_to(logp, tokens.shape + logp.shape), None


def test_dpo_pair_eval_against_hand_computed_margins():
    """Held-out win rates of a unigram policy p = (.1, .2, .3, .4) against a uniform reference,
    on four pairs (prompt [2], completions of tokens 0-3) whose implicit-reward margins
    (log pi(c) - log pi(r)) - (log ref(c) - log ref(r)) are, by hand:
    [2,2] vs [1]: 2 ln .3 - ln .2 - ln .25 = ln 1.8 (win); [1] vs [3]: ln .5 (loss);
    [0,3] vs [3,0]: 0 (a tie, 1/2); [3] vs [0]: ln 4 (win)."""
    pol = {"logp": jnp.log(jnp.asarray([0.1, 0.2, 0.3, 0.4]))}
    ref_params = {"logp": jnp.log(jnp.full(4, 0.25))}
    pairs = [([2, 2], [1]), ([1], [3]), ([0, 3], [3, 0]), ([3], [0])]
    rows = []
    for i, (c, r) in enumerate(pairs):
        row = {"pair_id": np.int32(i)}
        for side, comp in (("c_", c), ("r_", r)):
            made = sequences.make_row([2], comp, 5)
            made.pop("truncated")
            row.update({side + k: v for k, v in made.items()})
        rows.append(row)
    model = _Unigram()
    ref = dpo.sequence_logps(model, ref_params, rows)
    np.testing.assert_allclose(ref["c_sum"], np.log(0.25) * np.asarray([2, 1, 2, 1]), rtol=1e-6)
    out = dpo.pair_eval(model, pol, ref, rows)
    ln = np.log
    assert out["win_rate"] == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    assert out["logp_win_rate"] == pytest.approx(2 / 4)  # mean token log-prob: [2,2] > [1] and [3] > [0] only
    assert out["margin"] == pytest.approx((ln(1.8) + ln(0.5) + 0.0 + ln(4.0)) / 4, rel=1e-5)
    assert out["chosen_logp"] == pytest.approx((2 * ln(0.3) + ln(0.2) + ln(0.1) + ln(0.4) + ln(0.4)) / 4, rel=1e-5)
    assert out["rejected_logp"] == pytest.approx((ln(0.2) + ln(0.4) + ln(0.4) + ln(0.1) + ln(0.1)) / 4, rel=1e-5)
    assert out["win_rate_se"] == pytest.approx(np.std([1, 0, 0.5, 1], ddof=1) / 2)  # over pairs
    assert out["margin_se"] == pytest.approx(np.std([ln(1.8), ln(0.5), 0.0, ln(4.0)], ddof=1) / 2, rel=1e-5)
    for r, c in zip(rows, (0, 0, 1, 2), strict=True):  # pairs 0 and 1 share a prompt: one cluster
        r["prompt_index"] = np.int32(c)
    clustered = dpo.pair_eval(model, pol, ref, rows)
    assert clustered["prompts"] == 3 and clustered["win_rate"] == out["win_rate"]
    assert clustered["win_rate_se"] == pytest.approx(np.std([0.5, 0.5, 1.0], ddof=1) / np.sqrt(3))
    same = dpo.pair_eval(model, ref_params, ref, rows)  # before training: the policy is the reference
    assert same["win_rate"] == 0.5 and same["margin"] == 0.0


GRPO_COMPARE = ("reward", "validity", "r_smcov", "kl", "loss", "ratio", "clip_frac", "grad_norm", "completion_len")


@pytest.mark.slow  # ~55 s; test_crystal_rl kills and resumes the shared on-policy loop in the default suite
def test_grpo_killed_resumes_at_the_same_data_position(chain, tmp_path):
    """GRPO SIGKILLed after step 5 (checkpoints every 4 steps, so steps 5+ are traced but not
    saved) and rerun: it resumes at step 4, drops the traced steps after it, and its molecules,
    rewards, train metrics and final evaluation equal those of an uninterrupted run."""
    args = [f"--config.policy.workdir={chain / 'pre'}", "--config.ckpt.async_save=False",
            "--config.train.steps=8", "--config.ckpt.every_steps=4"]  # fmt: skip
    ref = tmp_path / "ref"
    cli("experiments/lm_grpo.py:tiny", ref, *args)
    wd = tmp_path / "killed"
    cmd = [sys.executable, "-m", "molgen.main", "--config=experiments/lm_grpo.py:tiny", f"--workdir={wd}", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    trace = wd / "rollouts.jsonl"
    # step 5 traced, checkpoint 8 not yet written
    kill_when(proc, lambda: trace.exists() and trace.read_text().count("\n") >= 5, timeout=300)
    traced = trace.read_text().count("\n")
    done = sorted(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit())
    assert done == [4] and traced >= 5, f"not killed between steps 5 and 8: checkpoints {done}, {traced} traced"
    res = cli("experiments/lm_grpo.py:tiny", wd, *args)
    assert "resumed GRPO at step 4" in res.stderr
    a, b = lines(ref / "rollouts.jsonl"), lines(trace)
    assert [r["step"] for r in b] == list(range(1, 9))  # the traced steps after the checkpoint were redone once
    assert [r["mol_index"] for r in a] == [r["mol_index"] for r in b]
    assert [r["reward"] for r in a] == [r["reward"] for r in b]
    ta = [r for r in lines(ref / "metrics.jsonl") if "train/reward" in r]
    tb = [r for r in lines(wd / "metrics.jsonl") if "train/reward" in r]
    assert [r["step"] for r in tb] == list(range(1, 9))
    for x, y in zip(ta, tb, strict=True):  # same parameters and optimiser state after the resume
        for k in GRPO_COMPARE:
            assert y["train/" + k] == pytest.approx(x["train/" + k], rel=1e-4, abs=1e-9), (x["step"], k)
    keys = {"train/reward", "train/validity", "train/kl", "train/clip_frac", "train/completion_len", "train/r_smcov"}
    assert keys <= set(tb[-1])
    s, s_ref = json.loads((wd / "summary.json").read_text()), json.loads((ref / "summary.json").read_text())
    assert {"reward", "validity", "cov_r"} <= set(s["before"]) and {"reward", "validity"} <= set(s["after"])
    for k, v in s_ref["after"].items():
        if k != "eval_seconds":
            assert s["after"][k] == pytest.approx(v, rel=1e-4, abs=1e-9, nan_ok=True), k  # NaN: no valid sample
