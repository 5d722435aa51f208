"""CG force field: data -> priors -> (LBFGS) -> stage 1 -> stage 2 -> evaluation, per ensemble seed.

The model energy is E(x) = priors(x) + Allegro(x); forces are -dE/dx. The priors are fitted by
Boltzmann inversion on the training frames (`priors.json`, `priors.png`), optionally refined
by L-BFGS on the force-matching loss of the priors alone (`priors_lbfgs.json`), and then held
fixed while Allegro learns the rest by force matching:

    loss = gamma_F * MSE(F) over the xyz components of real beads
    (gamma_U * MSE(E) needs reference energies, which mdCATH does not store: gamma_U must be 0).

Stages (each switchable): stage1 (AdaBelief, warmup-cosine), stage2 (Yogi, lower lr). Each
stage trains with the shared loop in `<workdir>/seed_<k>/<stage>/`, whose checkpoints record
the stage and epoch; a killed run started again resumes in the stage and epoch it reached.
With `ensemble.seeds` > 1 the seeds train one after another (`seed_<k>/`, each with its own
data order), or with `ensemble.vmap` as one stacked run (`ensemble/`: a leading member axis on
every parameter, the optimiser applied per member, all members on the same batches; member k
is then identical to sequential seed k's init). The best by validation force MSE is kept and
`ensemble.json` reports every member and the spread.

The energy model (priors + Allegro, forces, virial) is in `cg.energy`; evaluation, the noise
floor and the plots in `cg.evaluation`; this module holds the data, the prior fits and the
staged training.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from molgen.cg import data, neighbors, priors, simulate
from molgen.cg.energy import Model, frame_forces, init_net, make_model, resolve_model_config
from molgen.cg.evaluation import evaluate, noise_floor, plot_loss
from molgen.core import loop
from molgen.core import step as core_step
from molgen.core import streams as streams_lib
from molgen.core.distributed import make_mesh
from molgen.core.records import as_str

log = logging.getLogger("molgen")


# ----------------------------------------------------------------------------- data


def build_data(config):
    """Simulate the source if it is missing and asked to, build the TFDS dataset on process 0."""
    dc = config.data
    if jax.process_index() == 0:
        if dc.simulate.enabled and not os.path.exists(dc.source):
            s = dc.simulate
            out = os.path.join(dc.source, f"mdcath_dataset_{s.domain}.h5")
            log.info("simulating %s into %s", s.domain, out)
            simulate.produce(out, s.pdb or None, s.domain, tuple(s.temperatures), s.replicas, s.frames,
                             s.steps_per_frame, s.equilibration_steps, seed=s.seed)  # fmt: skip
        builder = data.build(dc, dc.data_dir)
        log.info("dataset %s: %s", builder.data_dir, data.report(builder)["frames"])
    multihost_utils.sync_global_devices("molgen_cg_data_built")
    return data.build(dc, dc.data_dir)


def load_split(source) -> dict:
    """All frames of a split as numpy arrays (CG datasets are small)."""
    keys = ("positions", "forces", "species", "mask", "temperature", "replica", "frame", "extra")
    rows = [source[i] for i in range(len(source))]
    out = {k: np.stack([np.asarray(r[k]) for r in rows]) for k in keys}
    out["domain"] = np.asarray([as_str(r["domain"]) for r in rows])
    return out


def pipeline(source, *, global_batch, seed, streams, n_streams, train=True):
    keys = ("positions", "forces", "species", "mask", "extra")
    return streams_lib.array_pipeline(source, keys, global_batch=global_batch, seed=seed, streams=streams,
                                      n_streams=n_streams, train=train)  # fmt: skip


# ----------------------------------------------------------------------------- model


def force_loss(model, prior_params, gamma_f: float, extra_weight: float = 1.0):
    """loss_fn(params, batch, rng) for the shared step: sums over real bead components, frames
    flagged `extra` (data.extra_train) weighted by `extra_weight`; metrics are weighted means."""

    def loss_fn(params, batch, rng):
        del rng
        f = jax.vmap(lambda x, s, m: frame_forces(model, params, prior_params, x, s, m))
        _, forces, overflow = f(batch["positions"], batch["species"], batch["mask"])
        # frames from data.extra_train count extra_weight times (1 by default)
        w = jnp.where(batch["extra"], extra_weight, 1.0)[:, None, None]
        m = w * batch["mask"][..., None].astype(jnp.float32)
        sq = jnp.sum(m * (forces - batch["forces"]) ** 2)
        n = jnp.sum(m) * 3.0
        prior_f = jax.vmap(lambda x, s, mk: frame_forces(model, params, prior_params, x, s, mk, use_net=False)[1])
        prior_sq = jnp.sum(
            m
            * (jax.lax.stop_gradient(prior_f(batch["positions"], batch["species"], batch["mask"])) - batch["forces"])
            ** 2
        )
        aux = {"weight": n, "loss": gamma_f * sq, "force_mse": sq, "prior_force_mse": prior_sq,
               "nbr_overflow": jnp.sum(overflow) * n}  # fmt: skip
        return gamma_f * sq, aux

    return loss_fn


def ensemble_loss(loss_fn, members: int):
    """The summed loss of a stacked ensemble (every parameter has a leading member axis): each
    member's gradient is its own loss's. Metrics are member means, plus force_mse_<k> per member."""

    def fn(params, batch, rng):
        losses, aux = jax.vmap(lambda p: loss_fn(p, batch, rng))(params)
        out = {k: jnp.mean(v) for k, v in aux.items()}  # the weight is the same for every member
        out.update({f"force_mse_{k}": aux["force_mse"][k] for k in range(members)})
        return jnp.sum(losses), out

    return fn


# ----------------------------------------------------------------------------- priors


def source_frames(split) -> dict:
    """The split without the frames of data.extra_train: the Boltzmann samples that the prior fits
    (Boltzmann inversion and L-BFGS) need. Fixed-CA samples far from the fold have mean forces
    several times larger than equilibrium frames and would drag the bonded priors towards them."""
    return {k: v[~split["extra"]] for k, v in split.items()}


def fit_priors(config, workdir, train) -> dict:
    path = pathlib.Path(workdir) / "priors.json"
    if path.exists():
        return priors.load(str(path))
    pc = config.priors
    train = source_frames(train)
    temps = train["temperature"]
    t = pc.temperature or int(temps.min())
    sel = temps == t
    if not sel.any():
        raise ValueError(f"priors.temperature={t} K: no training frames at that temperature ({sorted(set(temps))})")
    params, curves, samples = priors.fit(train["positions"][sel], train["mask"][sel], t, pc.n_angle, pc.n_dihedral,
                                         pc.bins, pc.tail_quantile, pc.ridge, pc.wall_power)  # fmt: skip
    if jax.process_index() == 0:
        priors.save(params, str(path))
        priors.plot(params, curves, samples, t, str(pathlib.Path(workdir) / "priors.png"))
    return params


# Prior parameters that must stay positive (a stiffness, a wall's strength and radius): L-BFGS
# optimises their logarithms, so the refined priors still repel at short range and bind bonds,
# which is what keeps MD physical where the network has seen no data.
POSITIVE = {"bond": ("kr",), "repulsive": ("eps", "sigma"), "excluded": ("eps", "sigma")}


FIXED = ("power",)  # a wall's power is a modelling choice (priors.fit's wall_power), never refined


def _to_free(p):
    return {t: {k: jnp.log(jnp.abs(v)) if k in POSITIVE.get(t, ()) else v for k, v in d.items() if k not in FIXED}
            for t, d in p.items()}  # fmt: skip


def _merge(p_all, z):
    """Every prior parameter, those in the free parameters `z` taken from them."""
    return {**p_all, **{t: {**p_all[t], **v} for t, v in _from_free(z).items()}}


def _from_free(z):
    return {t: {k: jnp.exp(v) if k in POSITIVE.get(t, ()) else v for k, v in d.items()} for t, d in z.items()}


def lbfgs_priors(config, workdir, model: Model, params, train) -> dict:
    """Refine the prior parameters alone on the force-matching loss with optax L-BFGS (positive
    parameters through their logarithms, see POSITIVE). Only `stages.lbfgs.terms` are refined:
    by default the bonded terms. The repulsive and excluded-volume walls keep their Boltzmann-
    inversion fit, because force matching on equilibrium frames, which never reach the walls,
    shrinks them to nothing (sigma 5.8 -> 0.015 Å on villin) and MD then collapses."""
    path = pathlib.Path(workdir) / "priors_lbfgs.json"
    if path.exists():
        return priors.load(str(path))
    lc = config.stages.lbfgs
    train = source_frames(train)
    idx = np.random.default_rng(config.train.seed).permutation(len(train["positions"]))[: lc.frames]
    x, s, m, f_ref = (jnp.asarray(train[k][idx]) for k in ("positions", "species", "mask", "forces"))
    mm = m[..., None].astype(jnp.float32)
    p_all = priors.as_jax(params)
    terms = tuple(lc.terms)
    z0 = _to_free({t: v for t, v in p_all.items() if t in terms})

    def loss(z):
        p = _merge(p_all, z)
        f = jax.vmap(lambda a, b, c: frame_forces(model, None, p, a, b, c, use_net=False)[1])(x, s, m)
        return jnp.sum(mm * (f - f_ref) ** 2) / (jnp.sum(mm) * 3)

    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(loss)

    @jax.jit
    def step(p, state):
        value, grad = value_and_grad(p, state=state)
        updates, state = opt.update(grad, state, p, value=value, grad=grad, value_fn=loss)
        return optax.apply_updates(p, updates), state, value

    z, state = z0, opt.init(z0)
    start = float(loss(z0))
    for _ in range(lc.iterations):
        z, state, value = step(z, state)
    end = float(loss(z))
    if not np.isfinite(end) or end > start:  # keep the Boltzmann-inversion fit if L-BFGS did not help
        log.warning("L-BFGS prior refinement gave force MSE %.4g vs %.4g before; keeping the fit", end, start)
        z = z0
    log.info("L-BFGS priors: force MSE %.4g -> %.4g on %d frames", start, min(start, end), len(idx))
    out = jax.tree.map(lambda a: np.asarray(a).tolist(), _merge(p_all, z))
    if jax.process_index() == 0:
        priors.save(out, str(path))
    return out


# ----------------------------------------------------------------------------- evaluation


# ----------------------------------------------------------------------------- driver


def _stage_config(config, stage, steps_per_epoch: int, seed: int):
    """The shared loop's view of a stage: its optimiser, steps, and evaluation and checkpoint
    cadence in epochs."""
    c = copy.deepcopy(config)
    with c.unlocked():
        c.optim = stage.optim
        c.train.steps = stage.epochs * steps_per_epoch
        c.train.eval_every = stage.eval_every_epochs * steps_per_epoch
        c.train.seed = seed
        c.ckpt.every_steps = stage.ckpt_every_epochs * steps_per_epoch
    return c


def train_and_evaluate(config, workdir: str):
    if config.loss.gamma_u:
        raise ValueError("config.loss.gamma_u must be 0: mdCATH files store no reference energies")
    mesh = make_mesh(config.mesh.num_devices)
    builder = build_data(config)
    src = builder.as_data_source()
    splits = {s: load_split(src[s]) for s in data.SPLITS}
    n_max = splits["train"]["positions"].shape[1]
    config, capacity = resolve_model_config(config, workdir, splits)
    model = make_model(config, n_max, capacity, splits["train"]["positions"][0])
    prior_params = fit_priors(config, workdir, splits["train"])
    if config.stages.lbfgs.enabled:
        prior_params = lbfgs_priors(config, workdir, model, prior_params, splits["train"])
    prior_j = priors.as_jax(prior_params)

    n_streams, streams = mesh.shape["data"], loop.local_streams(mesh)
    tc = config.train
    spe = max(1, len(splits["train"]["positions"]) // tc.batch_size)
    val = splits["validation"]
    loss_fn = force_loss(model, prior_j, config.loss.gamma_f, config.loss.extra_weight)

    eval_steps = {}

    def eval_fn_for(stage_name, fn):
        def eval_fn(params, step):
            if fn not in eval_steps:
                eval_steps[fn] = core_step.make_eval_step(fn, mesh)
            eval_step = eval_steps[fn]
            it = iter(pipeline(src["validation"], global_batch=tc.batch_size, seed=0, streams=streams,
                               n_streams=n_streams, train=False))  # fmt: skip
            n_batches = max(1, -(-len(val["positions"]) // tc.batch_size))
            ms = [
                jax.device_get(eval_step(params, core_step.global_batch(next(it), mesh), jax.random.key(0)))
                for _ in range(n_batches)
            ]
            out = {k: float(np.mean([m[k] for m in ms])) for k in ms[0] if k not in ("weight", "loss")}
            if out["nbr_overflow"] > 0:
                raise neighbors.Overflow(f"neighbour list overflowed on validation frames in {stage_name}")
            return out

        return eval_fn

    def train_stages(run_dir, params, seed, members=0):
        """stage 1 then stage 2 (those enabled) in run_dir/<stage>; returns (params, stage dirs)."""
        stage_dirs = []
        fn = ensemble_loss(loss_fn, members) if members else loss_fn
        for name in ("stage1", "stage2"):
            stage = config.stages[name]
            if not stage.enabled:
                continue
            c = _stage_config(config, stage, spe, seed)
            stage_dir = os.path.join(run_dir, name)
            os.makedirs(stage_dir, exist_ok=True)
            it = pipeline(src["train"], global_batch=tc.batch_size, seed=seed, streams=streams, n_streams=n_streams)
            log.info("%s %s: %d epochs x %d steps, %s lr %g%s", run_dir, name, stage.epochs, spe, stage.optim.name,
                     stage.optim.lr, f", {members} vmapped members" if members else "")  # fmt: skip
            meta = {"stage": name, "seed": seed - tc.seed, "steps_per_epoch": spe, "members": members}
            state, _ = loop.fit(c, stage_dir, mesh=mesh, params=params, loss_fn=fn, train_data=it,
                                eval_fn=eval_fn_for(name, fn), items_per_step=lambda m: tc.batch_size,
                                item_name="frames", meta=meta, check=_no_overflow, members=members)  # fmt: skip
            params = jax.device_get(state.params)
            stage_dirs.append((name, stage_dir))
        return params, stage_dirs

    example = {"positions": splits["train"]["positions"][0], "species": splits["train"]["species"][0]}
    n_seeds = config.ensemble.seeds
    if config.ensemble.vmap and n_seeds > 1:
        # one run whose parameters carry a leading member axis; members differ by their init seed
        stacked = jax.tree.map(lambda *p: np.stack(p), *[init_net(model, tc.seed + k, example) for k in range(n_seeds)])
        stacked, stage_dirs = train_stages(os.path.join(workdir, "ensemble"), stacked, tc.seed, n_seeds)
        trained = [(k, jax.tree.map(lambda p, k=k: p[k], stacked), os.path.join(workdir, "ensemble", f"member_{k}"),
                    stage_dirs) for k in range(n_seeds)]  # fmt: skip
    else:
        trained = []
        for k in range(n_seeds):
            seed_dir = os.path.join(workdir, f"seed_{k}")
            params, stage_dirs = train_stages(seed_dir, init_net(model, tc.seed + k, example), tc.seed + k)
            trained.append((k, params, seed_dir, stage_dirs))
    results = []
    for k, params, member_dir, stage_dirs in trained:
        os.makedirs(member_dir, exist_ok=True)
        val_res = evaluate(config, member_dir, model, params, prior_j, val, "validation")
        results.append({"seed": k, "validation_force_mse": val_res["model"]["mse"], "params": params,
                        "dir": member_dir, "stage_dirs": stage_dirs})  # fmt: skip
        log.info("seed %d: validation force MSE %.4g (priors alone %.4g)", k, val_res["model"]["mse"],
                 val_res["priors_only"]["mse"])  # fmt: skip

    best = min(results, key=lambda r: r["validation_force_mse"])
    mses = [r["validation_force_mse"] for r in results]
    ens = {"seeds": [{"seed": r["seed"], "validation_force_mse": r["validation_force_mse"]} for r in results],
           "best_seed": best["seed"], "mean": float(np.mean(mses)), "std": float(np.std(mses)),
           "min": float(np.min(mses)), "max": float(np.max(mses))}  # fmt: skip
    loop.write_json(workdir, "ensemble.json", ens)
    test = evaluate(config, workdir, model, best["params"], prior_j, splits["test"], "test")
    test["best_seed"] = best["seed"]
    if n_seeds > 1:  # the members' mean energy (export.load_trained(members="mean"), md.members="mean")
        stacked = jax.tree.map(lambda *p: np.stack(p), *[r["params"] for r in results])
        os.makedirs(os.path.join(workdir, "ensemble_mean"), exist_ok=True)
        mean = evaluate(config, os.path.join(workdir, "ensemble_mean"), dataclasses.replace(model, members=n_seeds),
                        stacked, prior_j, splits["test"], "test")  # fmt: skip
        test["ensemble_mean"] = {k: mean[k] for k in ("model", "mse_ratio_model_over_priors", "paired_mse_gain")}
        log.info("test force MSE of the %d members' mean: %.4g", n_seeds, mean["model"]["mse"])
    if config.eval.noise_floor.enabled and jax.process_index() == 0:
        floor = noise_floor(config, workdir, splits["test"], data.force_maps(builder))
        nf = test["noise_floor_mse"] = floor["noise_mse"]
        test["noise_floor_mse_se"] = floor["noise_mse_se"]
        test["excess_mse_over_noise"] = {
            "model": test["model"]["mse"] - nf,
            "priors_only": test["priors_only"]["mse"] - nf,
        }
    loop.write_json(workdir, "evaluation.json", test)
    if jax.process_index() == 0 and best["stage_dirs"]:
        plot_loss(workdir, best["stage_dirs"])
    g = test["paired_mse_gain"]
    log.info(
        "test force MSE: model %.4g, priors alone %.4g (ratio %.3f; paired gain %.3g ± %.2g, z %.1f), "
        "noise floor %s (kcal/mol/Å)^2",
        test["model"]["mse"], test["priors_only"]["mse"], test["mse_ratio_model_over_priors"], g["mean"], g["se"],
        g["z"], f"{test['noise_floor_mse']:.4g}" if "noise_floor_mse" in test else "not estimated",
    )  # fmt: skip
    return test


def _no_overflow(step, metrics):
    if metrics.get("nbr_overflow", 0) > 0:
        raise neighbors.Overflow(
            f"neighbour list overflowed at step {step}: raise model.capacity_multiplier (no pair was used silently)"
        )
