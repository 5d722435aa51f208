"""LM throughput: molgen (JAX) against Hugging Face transformers (PyTorch), measured in one run.

    python benchmarks/lm_throughput.py [--preset=cpu_small] [--batch=8] [--seq=512] [--gen_batch=32] [--new=256]
        [--dtype=float32] [--json=PATH]

Prints training tokens/s (the molgen pretraining step, `core.step.make_train_step` over
`pretrain.lm_loss`, against `transformers` with the same model config, batch and AdamW), sampling tokens/s (KV cache,
same prompts, exactly `--new` tokens per row on both sides), the ratios, and the achieved
training FLOP/s as a fraction of this machine's measured matmul peak in the compute dtype
(--dtype; on an H100/H200 also against the nominal bf16 peak). Each pair is timed in
alternating blocks and the medians compared (`compare`). PyTorch runs on CUDA when it sees a
GPU (--torch_device). --json writes the figures as one JSON object (benchmarks/gpu_suite.sh).
Needs torch and transformers beside molgen's own requirements.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from benchmarks.timing import (  # noqa: E402
    default_peak_n,
    device_info,
    matmul_peak,
    nominal_bf16_peak,
    write_json,
)
from configs import lm_models  # noqa: E402
from molgen.core.distributed import make_mesh  # noqa: E402
from molgen.core.step import TrainState, global_batch, make_train_step, replicate  # noqa: E402
from molgen.lm import convert, pretrain, sample  # noqa: E402
from molgen.lm.model import Qwen3, Qwen3Config, flops_per_token  # noqa: E402


def compare(fn_a, fn_b, n, rounds=3):
    """Median seconds per call of two functions, timed in alternating blocks of n calls.

    Alternating blocks spread a slow spell of a shared machine over both sides; each block starts
    with an untimed call, because the thread pools of the side that just ran (PyTorch's OpenMP
    workers spin-wait after each parallel region) slow the first calls of the other side."""
    ta, tb = [], []
    for _ in range(rounds):
        for fn, times in ((fn_a, ta), (fn_b, tb)):
            fn()
            for _ in range(n):
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
    return float(np.median(ta)), float(np.median(tb))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="cpu_small")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--gen_batch", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=48)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype of both sides")
    ap.add_argument("--skip_train", action="store_true")
    ap.add_argument("--torch_device", default="", help="PyTorch's device (default: cuda when available, else cpu)")
    ap.add_argument("--peak_n", type=int, default=0, help="matmul size of the peak (default 2048 on CPU, 8192 else)")
    ap.add_argument("--json", default="", help="also write the figures to this JSON file")
    a = ap.parse_args()
    print(f"{a}", flush=True)

    try:
        import torch
        import transformers
    except ImportError as e:
        sys.exit(f"lm_throughput.py compares against Hugging Face transformers on PyTorch: {e}; install torch and "
                 "transformers")  # fmt: skip

    torch.set_num_threads(os.cpu_count() or 1)
    tdev = torch.device(a.torch_device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def tsync():
        if tdev.type == "cuda":
            torch.cuda.synchronize(tdev)

    cfg = dataclasses.replace(Qwen3Config.from_config(lm_models.get(a.preset)), dtype=a.dtype)
    with tdev:  # initialised where it runs (a 0.6B model initialises much faster on a GPU)
        hf = transformers.Qwen3ForCausalLM(
            transformers.Qwen3Config(**convert.config_to_hf(cfg), attn_implementation="sdpa")
        ).float()
    hf_state = {k: v.detach().cpu().numpy() for k, v in hf.state_dict().items()}
    params = jax.tree.map(jnp.asarray, convert.hf_to_params(hf_state, cfg))
    del hf_state
    # bfloat16: PyTorch holds bf16 weights; molgen trains float32 master weights in bf16 compute, and
    # samples with the weights and the KV cache in bf16 (as PyTorch does)
    hf = hf.to(device=tdev, dtype=getattr(torch, a.dtype))
    gen_params = jax.tree.map(lambda x: x.astype(a.dtype), params)
    rng = np.random.default_rng(0)
    tokens = rng.integers(6, cfg.vocab_size, size=(a.batch, a.seq)).astype(np.int32)
    record = {"benchmark": "lm_throughput", **device_info(), "torch_device": str(tdev), "preset": a.preset,
              "dtype": a.dtype, "params": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)),
              "batch": a.batch, "seq": a.seq, "gen_batch": a.gen_batch, "prompt": a.prompt, "new": a.new,
              "reps": a.reps}  # fmt: skip
    write_json(a.json, record)

    t_jax = None
    if not a.skip_train:
        # --- training step: the molgen step (shard_map over a 1-device mesh, pretraining loss) ---------------
        tx = optax.adamw(1e-4, b1=0.9, b2=0.95, weight_decay=0.1)
        mesh = make_mesh(1)
        train_step = make_train_step(pretrain.lm_loss(Qwen3(cfg)), mesh)
        batch = global_batch(
            {
                "tokens": tokens,
                "positions": np.broadcast_to(np.arange(a.seq, dtype=np.int32), (a.batch, a.seq)).copy(),
                "segment_ids": np.ones((a.batch, a.seq), np.int32),
            },
            mesh,
        )
        state = [replicate(TrainState.create(jax.tree.map(jnp.array, params), tx), mesh)]  # a copy: the step donates it

        def jax_train():
            state[0], metrics = train_step(state[0], batch, jax.random.key(0))
            metrics["loss"].block_until_ready()

        hf.train()
        topt = torch.optim.AdamW(hf.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
        tok_t = torch.tensor(tokens, dtype=torch.long, device=tdev)

        def torch_train():
            topt.zero_grad(set_to_none=True)
            out = hf(tok_t, labels=tok_t)
            out.loss.backward()
            topt.step()
            tsync()

        t_jax, t_torch = compare(jax_train, torch_train, a.reps)
        n_tok = a.batch * a.seq
        print(
            f"train  tokens/s  molgen {n_tok / t_jax:10,.0f}   transformers {n_tok / t_torch:10,.0f}   "
            f"ratio {t_torch / t_jax:5.2f}x   (batch {a.batch} x seq {a.seq}, {a.preset}, {a.dtype})"
        )
        record["train"] = {
            "tokens_per_s_molgen": n_tok / t_jax,
            "tokens_per_s_transformers": n_tok / t_torch,
            "ratio": t_torch / t_jax,
            "step_s_molgen": t_jax,
            "step_s_transformers": t_torch,
        }
        write_json(a.json, record)

    # --- sampling with a KV cache -----------------------------------------------------------
    prompts = rng.integers(6, cfg.vocab_size, size=(a.gen_batch, a.prompt)).astype(np.int32)
    lens = jnp.full((a.gen_batch,), a.prompt, jnp.int32)

    def jax_gen():
        out, n = sample.generate(
            gen_params, jnp.asarray(prompts), lens, jax.random.key(0), cfg=cfg, max_new=a.new, greedy=True, stop_id=-1
        )
        out.block_until_ready()

    hf.eval()
    tp = torch.tensor(prompts, dtype=torch.long, device=tdev)

    def torch_gen():
        with torch.no_grad():
            hf.generate(
                tp,
                attention_mask=torch.ones_like(tp),
                max_new_tokens=a.new,
                min_new_tokens=a.new,
                do_sample=False,
                use_cache=True,
                pad_token_id=0,
            )
        tsync()

    g_jax, g_torch = compare(jax_gen, torch_gen, max(1, a.reps // 3), rounds=2)
    n_gen = a.gen_batch * a.new
    print(
        f"sample tokens/s  molgen {n_gen / g_jax:10,.0f}   transformers {n_gen / g_torch:10,.0f}   "
        f"ratio {g_torch / g_jax:5.2f}x   (batch {a.gen_batch}, prompt {a.prompt}, {a.new} new, KV cache, {a.dtype})"
    )
    record["sample"] = {"tokens_per_s_molgen": n_gen / g_jax, "tokens_per_s_transformers": n_gen / g_torch,
                        "ratio": g_torch / g_jax, "call_s_molgen": g_jax, "call_s_transformers": g_torch}  # fmt: skip
    write_json(a.json, record)

    # --- model FLOP utilisation ---------------------------------------------------------------
    if t_jax is None:
        return
    peak_n = a.peak_n or default_peak_n()
    peak = matmul_peak(peak_n, dtype=a.dtype)
    achieved = flops_per_token(cfg, a.seq) * n_tok / t_jax
    print(
        f"flops  training {achieved / 1e9:8.1f} GFLOP/s   matmul peak {peak / 1e9:8.1f} GFLOP/s   "
        f"MFU {achieved / peak:5.1%}   ({jax.devices()[0].device_kind}, {jax.device_count()} device)"
    )
    nominal = nominal_bf16_peak(jax.devices()[0].device_kind)
    record["flops"] = {"flops_per_token": flops_per_token(cfg, a.seq), "achieved_flop_s": achieved,
                       "matmul_peak_flop_s": peak, "matmul_peak_n": peak_n, "matmul_peak_dtype": a.dtype,
                       "mfu": achieved / peak, "nominal_bf16_peak_flop_s": nominal,
                       "mfu_nominal_bf16": achieved / nominal if nominal else None}  # fmt: skip
    if nominal:
        print(f"       against the nominal dense bf16 peak {nominal / 1e12:.0f} TFLOP/s: MFU {achieved / nominal:5.1%}")
    write_json(a.json, record)


if __name__ == "__main__":
    main()
