"""Core runtime: schedules, optimiser factory, the shard_map step, checkpoints, NaN guard."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from molgen.core import checkpoint, distributed, optim
from molgen.core import logging as mlog
from molgen.core.step import TrainState, global_batch, make_eval_step, make_train_step, replicate


def test_wsd_decays_to_zero_before_each_boundary_and_recovers():
    f = optim.wsd_schedule(1.0, warmup=10, period=100, decay_frac=0.1, total=250)
    lr = np.array([float(f(s)) for s in range(251)])
    assert lr[0] == pytest.approx(0.1) and lr[9] == pytest.approx(1.0)
    assert np.allclose(lr[10:90], 1.0)
    assert lr[95] == pytest.approx(0.5) and lr[99] == pytest.approx(0.1)
    assert lr[100] == pytest.approx(1.0)  # back to the peak after the boundary
    assert lr[245] == pytest.approx(0.5) and lr[250] == pytest.approx(0.0)  # last, shorter period ends at 0


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_every_optimizer_reduces_a_quadratic(name):
    cfg = common.optim(name=name, lr=0.05, schedule="warmup_cosine", warmup_steps=2, weight_decay=0.01)
    tx, _ = optim.make_optimizer(cfg, 100)
    params = {"w": jnp.ones((3, 3))}
    state = tx.init(params)
    loss = lambda p: jnp.sum((p["w"] - 0.5) ** 2)  # noqa: E731
    start = loss(params)
    for _ in range(50):
        g = jax.grad(loss)(params)
        upd, state = tx.update(g, state, params)
        params = jax.tree.map(lambda a, b: a + b, params, upd)
    assert loss(params) < 0.5 * start


def test_unknown_optimizer_is_named():
    with pytest.raises(ValueError, match="nope"):
        optim.make_optimizer(common.optim(name="nope"), 10)


def _linear_loss(params, batch, rng):
    err = (batch["x"] @ params["w"] - batch["y"]) ** 2  # [rows]
    mask = batch["mask"]
    return (err * mask).sum(), {"weight": mask.sum(), "loss": (err * mask).sum()}


def test_step_equals_hand_computed_global_mean_gradient():
    mesh = distributed.make_mesh(4)
    rng = np.random.default_rng(0)
    batch = {
        "x": rng.normal(size=(8, 3)).astype(np.float32),
        "y": rng.normal(size=8).astype(np.float32),
        "mask": np.array([1, 1, 0, 1, 1, 1, 1, 0], np.float32),
    }  # uneven weight per device
    w0 = rng.normal(size=3).astype(np.float32)
    tx, _ = optim.make_optimizer(
        common.optim(name="sgd", lr=0.1, b1=0.0, schedule="constant", clip_norm=0.0, weight_decay=0.0), 10
    )
    state = replicate(TrainState.create({"w": jnp.asarray(w0)}, tx), mesh)
    step = make_train_step(_linear_loss, mesh)
    new, metrics = step(state, global_batch(batch, mesh), jax.random.key(0))
    # hand computation: mean over unmasked rows of (x.w - y)^2 and its gradient
    m = batch["mask"].astype(bool)
    x, y = batch["x"][m], batch["y"][m]
    r = x @ w0 - y
    assert float(metrics["loss"]) == pytest.approx(np.mean(r**2), rel=1e-5)
    grad = 2 * x.T @ r / m.sum()
    np.testing.assert_allclose(np.asarray(new.params["w"]), w0 - 0.1 * grad, rtol=1e-5)
    assert int(new.step) == 1
    ev = make_eval_step(_linear_loss, mesh)(new.params, global_batch(batch, mesh), jax.random.key(0))
    assert float(ev["weight"]) == 6.0


def _ckpt_cfg(**kw):
    return common.ckpt(async_save=False, best_metric="", **kw)


def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path, caplog):
    state = {"step": jnp.int32(0), "params": {"w": jnp.ones(3)}, "opt_state": {}}
    mgr = checkpoint.manager(str(tmp_path), _ckpt_cfg())
    for s in (1, 2):
        checkpoint.save(mgr, s, {**state, "params": {"w": jnp.full(3, float(s))}}, None, {"step": s})
    mgr.wait_until_finished()
    for f in (tmp_path / "checkpoints" / "2" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    mgr = checkpoint.manager(str(tmp_path), _ckpt_cfg())
    with caplog.at_level("WARNING", logger="molgen"):
        restored = checkpoint.restore_latest(mgr, jax.eval_shape(lambda: state), None)
    assert restored is not None and restored[2] == 1
    np.testing.assert_array_equal(restored[0]["params"]["w"], np.ones(3))
    assert "does not restore" in caplog.text and "moved the corrupt checkpoint" in caplog.text
    aside = [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("2.corrupt-")]
    assert len(aside) == 1 and not (tmp_path / "checkpoints" / "2").exists()  # kept for inspection
    assert mgr.all_steps() == [1]
    checkpoint.save(mgr, 2, {**state, "params": {"w": jnp.full(3, 5.0)}}, None, {"step": 2})  # step 2 again
    mgr.wait_until_finished()
    restored = checkpoint.restore_latest(
        checkpoint.manager(str(tmp_path), _ckpt_cfg()), jax.eval_shape(lambda: state), None
    )
    assert restored[2] == 2 and float(restored[0]["params"]["w"][0]) == 5.0


def test_no_checkpoint_restores_nothing_is_moved(tmp_path):
    state = {"step": jnp.int32(0), "params": {"w": jnp.ones(3)}, "opt_state": {}}
    mgr = checkpoint.manager(str(tmp_path), _ckpt_cfg())
    checkpoint.save(mgr, 1, state, None, {"step": 1})
    mgr.wait_until_finished()
    other = {**state, "params": {"w": jnp.ones(4)}}  # another shape: a mismatch, not corruption
    assert (
        checkpoint.restore_latest(checkpoint.manager(str(tmp_path), _ckpt_cfg()), jax.eval_shape(lambda: other), None)
        is None
    )
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1"]


def test_keep_last_n_and_best(tmp_path):
    cfg = common.ckpt(async_save=False, keep=2, keep_best=1, best_metric="eval/loss", best_mode="min")
    mgr = checkpoint.manager(str(tmp_path), cfg)
    state = {"step": jnp.int32(0), "params": {"w": jnp.ones(3)}, "opt_state": {}}
    for s, loss in [(1, 5.0), (2, 1.0), (3, 4.0), (4, 3.0), (5, 6.0)]:
        checkpoint.save(mgr, s, state, None, {"step": s}, {"eval/loss": loss})
    mgr.wait_until_finished()
    assert sorted(mgr.all_steps()) == [2, 4, 5]


def test_init_from_restores_params_only(tmp_path):
    mgr = checkpoint.manager(str(tmp_path / "a"), _ckpt_cfg())
    state = {"step": jnp.int32(7), "params": {"w": jnp.arange(3.0)}, "opt_state": {"mu": jnp.zeros(3)}}
    checkpoint.save(mgr, 7, state, None, {"step": 7})
    mgr.wait_until_finished()
    p = checkpoint.restore_params(str(tmp_path / "a"), {"w": jnp.zeros(3)})
    np.testing.assert_array_equal(p["w"], np.arange(3.0))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpoint.restore_params(str(tmp_path / "missing"), {"w": jnp.zeros(3)})


def test_nan_guard_names_metric_and_step():
    with pytest.raises(mlog.NonFiniteError, match="'loss' is nan at step 7"):
        mlog.check_finite(7, {"loss": float("nan")})
    mlog.check_finite(8, {"loss": 1.0})


@jax.custom_jvp
def _poisoned(w, bad):
    """Identity on `w`; its derivative is NaN where `bad` > 0 (a finite loss with a NaN gradient)."""
    return w


@_poisoned.defjvp
def _poisoned_jvp(primals, tangents):
    w, bad = primals
    return w, tangents[0] * jnp.where(bad > 0, jnp.nan, 1.0)


def _poisoned_loss(params, batch, rng):
    w = _poisoned(params["w"], batch["bad"].max())
    err = (batch["x"] @ w - batch["y"]) ** 2
    return err.sum(), {"weight": jnp.float32(err.shape[0]), "loss": err.sum()}


def test_nan_gradient_with_finite_loss_stops_and_keeps_a_finite_checkpoint(tmp_path):
    import grain
    import ml_collections

    from molgen.core import loop

    rng = np.random.default_rng(0)
    rows = [
        {"x": rng.normal(size=3).astype(np.float32), "y": np.float32(rng.normal()), "bad": np.float32(i // 8 == 4)}
        for i in range(8 * 8)
    ]  # 8 rows a step; only step 5's rows are poisoned
    data = grain.MapDataset.source(rows).batch(8, drop_remainder=True).to_iter_dataset()
    config = ml_collections.ConfigDict(
        dict(
            train=common.train(steps=8, batch_size=8, log_every=1, eval_every=1000),
            optim=common.optim(name="sgd", lr=0.05, b1=0.0, schedule="constant", clip_norm=1.0, weight_decay=0.0),
            ckpt=_ckpt_cfg(every_steps=2, keep=10),
        )
    )
    mlog.setup(str(tmp_path))
    with pytest.raises(mlog.NonFiniteError, match="'grad_norm' is nan at step 5"):
        loop.fit(config, str(tmp_path), mesh=distributed.make_mesh(4), params={"w": jnp.ones(3)},
                 loss_fn=_poisoned_loss, train_data=data)  # fmt: skip
    assert sorted(r["step"] for r in mlog.read_metrics(str(tmp_path)) if "train/loss" in r) == [1, 2, 3, 4]
    assert checkpoint.manager(str(tmp_path), _ckpt_cfg()).all_steps() == [2, 4]  # nothing after the NaN
    w = checkpoint.restore_params(str(tmp_path), {"w": jnp.ones(3)})["w"]  # the newest checkpoint
    assert np.all(np.isfinite(w)) and not np.allclose(w, 1.0)


class _Crash(Exception):
    pass


def _on_policy_run(workdir, crash_at=0):
    """Linear regression trained on-policy through `loop.fit(make_updates=...)`: each step turns
    its data item into two 8-row batches whose targets depend on the current parameters."""
    import grain
    import ml_collections

    from molgen.core import loop

    mesh = distributed.make_mesh(4)
    config = ml_collections.ConfigDict(
        dict(
            train=common.train(steps=6, batch_size=8, log_every=1, eval_every=1000),
            optim=common.optim(
                name="sgd", lr=0.1, b1=0.9, schedule="warmup_cosine", warmup_steps=3, clip_norm=0.0, weight_decay=0.0
            ),
            ckpt=_ckpt_cfg(every_steps=2, keep=10),
        )
    )
    data = grain.MapDataset.source([{"i": np.int32(i)} for i in range(100)]).to_iter_dataset()
    w_true, seen = np.array([1.0, -2.0, 0.5], np.float32), []

    def make_updates(state, step, item):
        if step == crash_at:
            raise _Crash(step)
        w = np.asarray(jax.device_get(state.params["w"]))
        seen.append((step, int(item["i"]), int(jax.device_get(state.step))))
        batches = []
        for k in range(2):
            x = np.random.default_rng([int(item["i"]), k]).normal(size=(8, 3)).astype(np.float32)
            batch = {"x": x, "y": x @ w_true + 0.1 * (x @ w), "mask": np.ones(8, np.float32)}
            batches.append(global_batch(batch, mesh))
        return batches, {"w0": float(w[0])}

    mlog.setup(str(workdir))
    state, _ = loop.fit(config, str(workdir), mesh=mesh, params={"w": jnp.zeros(3)}, loss_fn=_linear_loss,
                        train_data=data, make_updates=make_updates, updates_per_step=2)  # fmt: skip
    return state, seen, config


def test_fit_with_make_updates_runs_several_updates_per_step_and_resumes(tmp_path):
    state, seen, config = _on_policy_run(tmp_path / "ref")
    assert int(state.step) == 12  # 6 steps x 2 updates, one optimiser step each
    assert seen == [(s, s - 1, 2 * (s - 1)) for s in range(1, 7)]  # the data item and updates before each step
    rows = [r for r in mlog.read_metrics(str(tmp_path / "ref")) if "train/loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert {"train/w0", "train/update_seconds", "train/step_seconds", "train/grad_norm"} <= set(rows[0])
    sched = optim.make_schedule(config.optim, 12)  # the schedule spans all 12 updates
    assert rows[-1]["train/lr"] == pytest.approx((float(sched(10)) + float(sched(11))) / 2, rel=1e-5)
    assert rows[-1]["train/lr"] < 0.1 * rows[2]["train/lr"]  # and has decayed by the last step

    with pytest.raises(_Crash):  # dies in step 5, after checkpoint 4
        _on_policy_run(tmp_path / "killed", crash_at=5)
    resumed, seen2, _ = _on_policy_run(tmp_path / "killed")
    assert seen2 == seen[4:]  # continues at step 5 with the saved data position and update count
    assert int(resumed.step) == 12
    np.testing.assert_allclose(jax.device_get(resumed.params["w"]), jax.device_get(state.params["w"]), rtol=1e-6)
    rows2 = [r for r in mlog.read_metrics(str(tmp_path / "killed")) if "train/loss" in r]
    assert [r["step"] for r in rows2] == list(range(1, 7))
    for a, b in zip(rows, rows2, strict=True):
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-5) and b["train/w0"] == a["train/w0"]


def test_params_guard_catches_a_non_finite_update_with_finite_loss_and_gradient():
    with pytest.raises(mlog.NonFiniteError, match="parameters after step 3 are not finite"):
        mlog.check_finite(3, {"loss": 1.0, "grad_norm": 0.5, "params_finite": 0.0})
    mlog.check_finite(3, {"loss": 1.0, "grad_norm": 0.5, "params_finite": 1.0})


def test_mesh_rejects_bad_device_count():
    with pytest.raises(ValueError, match="num_devices=3"):
        distributed.make_mesh(3)


def test_two_processes_building_one_dataset_wait_for_each_other(tmp_path):
    """Two runs that need the same (real, RDKit-built) dataset at once: the build lock makes the
    second wait and find it built, instead of failing on TFDS's rename ("already exists")."""
    import json
    import os
    import subprocess
    import sys

    code = (
        "import sys; from configs import lm_post; from molgen.lm import data; "
        "b = data.build(lm_post.prompts_data(**lm_post.TINY_PROMPTS), sys.argv[1]); "
        "print(data.report(b)['counts']['train']['ok'])"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root, "JAX_PLATFORMS": "cpu"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path)],
            cwd=root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
        assert out.split()[-1] == "12"
    (version_dir,) = (tmp_path / "moses_conformers").glob("*/1.0.0")
    assert json.loads((version_dir / "build_report.json").read_text())["counts"]["train"]["molecules"] == 12
    assert not list((tmp_path / "moses_conformers").glob("*/incomplete*"))
