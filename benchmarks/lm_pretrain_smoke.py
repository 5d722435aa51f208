"""0.6B pretraining smoke test: the reference shape of experiments/lm_pretrain_moses.py:gpu_06b
(Qwen3-0.6B with molgen's vocabulary, bf16 compute, remat) trained for a few steps on one batch.

    python benchmarks/lm_pretrain_smoke.py [--preset=qwen3_0.6b] [--batch=8] [--seq=4096] [--steps=8] [--json=PATH]

Runs the molgen pretraining step (`core.step.make_train_step` over `pretrain.lm_loss`, AdamW
with float32 master weights) --steps times on one fixed batch of random tokens, checks that
every loss and parameter stays finite and that the loss falls (the batch is memorised), and
reports the tracing and compilation times, the median step time (the first step left out), tokens/s and
MFU: the model FLOPs (`model.flops_per_token`: 6N plus attention, the remat recomputation not
counted) per second over the peak, by default a measured matmul in the compute dtype (--peak
gives one in FLOP/s), and on an H100/H200 also over the nominal dense bf16 peak (989 TFLOP/s).
Exits 1 when a check fails, after writing --json.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time

import jax
import numpy as np
import optax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchmarks.timing import default_peak_n, device_info, matmul_peak, nominal_bf16_peak, write_json  # noqa: E402
from configs import lm_models  # noqa: E402
from molgen.core.distributed import make_mesh  # noqa: E402
from molgen.core.step import TrainState, global_batch, make_train_step, replicate  # noqa: E402
from molgen.lm import pretrain  # noqa: E402
from molgen.lm.model import Qwen3, Qwen3Config, count_params, flops_per_token  # noqa: E402


def model_config(a) -> Qwen3Config:
    """The preset with molgen's vocabulary (as gpu_06b), the compute dtype and remat."""
    cfg = Qwen3Config.from_config(lm_models.get(a.preset))
    vocab = a.vocab or lm_models.get("cpu_small").vocab_size  # molgen's tokenizer, not Qwen3's BPE
    return dataclasses.replace(
        cfg, vocab_size=vocab, dtype=a.dtype, remat=bool(a.remat), n_layers=a.layers or cfg.n_layers
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="qwen3_0.6b")
    ap.add_argument("--vocab", type=int, default=0, help="vocabulary size (default: molgen's tokenizer)")
    ap.add_argument("--layers", type=int, default=0, help="override the preset's layer count (0: keep)")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--remat", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--peak", type=float, default=0.0, help="peak FLOP/s for MFU (default: a measured matmul)")
    ap.add_argument("--peak_n", type=int, default=0, help="matmul size of the measured peak (default 2048 CPU, 8192)")
    ap.add_argument("--json", default="", help="also write the figures to this JSON file")
    a = ap.parse_args()
    if a.steps < 3:
        sys.exit("--steps must be at least 3 (the first step is not timed, and the loss must fall)")
    print(f"{a}", flush=True)

    cfg = model_config(a)
    params = pretrain.init_params(cfg, 0)
    n_params = count_params(params)
    mesh = make_mesh(1)
    tx = optax.adamw(a.lr, b1=0.9, b2=0.95, weight_decay=0.1)
    train_step = make_train_step(pretrain.lm_loss(Qwen3(cfg)), mesh)
    state = replicate(TrainState.create(params, tx), mesh)
    del params
    rng = np.random.default_rng(0)
    batch = global_batch(
        {
            "tokens": rng.integers(6, cfg.vocab_size, size=(a.batch, a.seq)).astype(np.int32),
            "positions": np.broadcast_to(np.arange(a.seq, dtype=np.int32), (a.batch, a.seq)).copy(),
            "segment_ids": np.ones((a.batch, a.seq), np.int32),
        },
        mesh,
    )
    key = jax.random.key(0)
    record = {"benchmark": "lm_pretrain_smoke", **device_info(), "preset": a.preset, "config": dataclasses.asdict(cfg),
              "params": n_params, "batch": a.batch, "seq": a.seq, "tokens_per_step": a.batch * a.seq,
              "steps": a.steps, "lr": a.lr}  # fmt: skip
    print(f"{a.preset}: {n_params / 1e6:.1f}M parameters, vocab {cfg.vocab_size}, {cfg.n_layers} layers, {cfg.dtype}, "
          f"remat {cfg.remat}; batch {a.batch} x seq {a.seq}; {jax.devices()[0].device_kind}", flush=True)  # fmt: skip

    write_json(a.json, record)  # a run stopped while compiling still names what it built
    t = time.perf_counter()
    lowered = train_step.lower(state, batch, key)
    record["lower_s"] = time.perf_counter() - t
    t = time.perf_counter()
    step = lowered.compile()
    record["compile_s"] = time.perf_counter() - t
    print(f"trace and lower {record['lower_s']:.1f} s, compile {record['compile_s']:.1f} s", flush=True)
    write_json(a.json, record)

    losses, grad_norms, finite, times = [], [], [], []
    for i in range(a.steps):
        t = time.perf_counter()
        state, m = step(state, batch, key)
        m = jax.device_get(m)  # waits for the step
        times.append(time.perf_counter() - t)
        losses.append(float(m["loss"]))
        grad_norms.append(float(m["grad_norm"]))
        finite.append(float(m["params_finite"]) == 1.0 and math.isfinite(losses[-1]))
        print(f"step {i}  loss {losses[-1]:.4f}  grad_norm {grad_norms[-1]:.3f}  {times[-1]:.3f} s", flush=True)
    step_s = float(np.median(times[1:]))
    tokens_per_s = a.batch * a.seq / step_s
    fpt = flops_per_token(cfg, a.seq)
    ok_finite, ok_falls = all(finite), losses[-1] < losses[0]
    record.update(losses=losses, grad_norms=grad_norms, step_times_s=times, first_step_s=times[0], step_s=step_s,
                  tokens_per_s=tokens_per_s, flops_per_token=fpt, achieved_flop_s=fpt * tokens_per_s,
                  finite=ok_finite, loss_falls=ok_falls, ok=ok_finite and ok_falls)  # fmt: skip
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        record["peak_device_memory_gib"] = stats["peak_bytes_in_use"] / 2**30
    write_json(a.json, record)

    if a.peak:
        peak, source = a.peak, "given"
    else:
        record["matmul_peak_n"] = a.peak_n or default_peak_n()
        peak, source = matmul_peak(record["matmul_peak_n"], dtype=a.dtype), f"measured {a.dtype} matmul"
    nominal = nominal_bf16_peak(jax.devices()[0].device_kind)
    achieved = fpt * tokens_per_s
    record.update(peak_flop_s=peak, peak_source=source, mfu=achieved / peak, nominal_bf16_peak_flop_s=nominal,
                  mfu_nominal_bf16=achieved / nominal if nominal else None)  # fmt: skip
    write_json(a.json, record)
    print(
        f"step {step_s:.3f} s   tokens/s {tokens_per_s:,.0f}   {achieved / 1e12:.3f} TFLOP/s   "
        f"MFU {achieved / peak:5.1%} of {peak / 1e12:.3f} TFLOP/s ({source})"
        + (f"   {achieved / nominal:5.1%} of the nominal {nominal / 1e12:.0f}" if nominal else "")
    )
    verdict = "OK" if record["ok"] else "FAILED"
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}   finite {ok_finite}   falls {ok_falls}   {verdict}")
    if not record["ok"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
