"""Relative-entropy fine-tuning of a force-matched CG model (family `cg_relent`).

Force matching fits the mean force where the data are; it does not pin the free energy of
states the data barely visit. On chignolin every force-matched network stabilised compact,
partly native states by 2-4 kcal/mol (docs/cg.md), and active learning moved the trap rather
than removing it. Relative-entropy minimisation (Shell 2008; Thaler et al., J. Chem. Phys. 157,
244103 (2022), who fine-tune force-matched networks this way) fits the ensemble itself:

    dS_rel/dθ = β (<dU/dθ>_reference - <dU/dθ>_CG),

the reference average over the CA-mapped all-atom frames, the CG average over the model's own
MD. Each step here takes one Adam step on

    loss = fm_weight · force MSE (a training batch)  +  rem_weight · β (<U>_batch - <U>_CG frames),

whose gradient is that estimate (the CG frames are samples, not differentiated through), with
the force-matching term as the anchor that keeps the mean forces. The CG frames come from
persistent Langevin chains (`md.copies` copies, half from the folded structure, half from
unfolded reference frames, as `molgen.cg.landscape`), run `rem.steps_per_frame` x `rem.frames`
steps with the current parameters before every update and never restarted (persistent
contrastive divergence), after `rem.burn_in_steps` with the starting model. A chain that goes
non-finite is restarted from its start (counted in `chain_resets`). On resume the chains start
again from their starts with a new burn-in (the optimiser and data state resume exactly).

The workdir is a trained model for everything downstream: `export.load_trained` reads its base
model (`md.model_workdir`, trained by `md.model_experiment` if missing) with these parameters,
so `experiments/cg_chignolin_md.py --config.md.model_workdir=<this workdir>` runs its landscape
and exports it. evaluation.json holds the test force MSE after, before (`base`) and of the
priors alone.
"""

from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax_md import simulate, space

from molgen.cg import analysis, data, export, landscape, md, neighbors, priors, train
from molgen.cg.energy import frame_energy, make_model
from molgen.cg.evaluation import evaluate
from molgen.cg.production import ensure_model
from molgen.core import loop
from molgen.core.distributed import make_mesh
from molgen.core.step import global_batch

log = logging.getLogger("molgen")


def rem_loss(model, prior_params, *, beta: float, fm_weight: float, rem_weight: float, gamma_f: float):
    """loss_fn(params, batch, rng): force matching on the batch plus rem_weight · β · (mean
    energy of the batch's reference frames - mean energy of its CG frames `cg_*`). Logged
    `rem_gap` is β (<U>_ref - <U>_CG), `force_mse` the batch's (kcal/mol/Å)²."""
    fm = train.force_loss(model, prior_params, gamma_f)

    def energies(params, x, s, m):
        e, _, overflow = jax.vmap(lambda a, b, c: frame_energy(model, params, prior_params, a, b, c))(x, s, m)
        return e, jnp.sum(overflow)

    def loss_fn(params, batch, rng):
        fm_sum, aux = fm(params, batch, rng)
        e_ref, o_ref = energies(params, batch["positions"], batch["species"], batch["mask"])
        e_cg, o_cg = energies(params, batch["cg_positions"], batch["cg_species"], batch["cg_mask"])
        gap = beta * (jnp.mean(e_ref) - jnp.mean(e_cg))
        n = aux["weight"]  # the step divides every aux sum (and the loss) by it
        aux = {**aux, "rem_gap": gap * n, "nbr_overflow": aux["nbr_overflow"] + (o_ref + o_cg) * n}
        return fm_weight * fm_sum + rem_weight * gap * n, aux

    return loss_fn


def chains(model, nn_params, prior_params, meta, starts: list, *, temperature, dt, damp, seed):
    """Persistent Langevin chains of `len(starts)` independent copies (one system, 60 Å apart).
    Returns advance(params, steps, frames) -> (frames [frames, copies, n, 3], resets): runs
    steps x frames steps with `params`, keeping the state between calls."""
    n, copies = len(starts[0]), len(starts)
    base = md.make_system(meta, copies=copies, positions=np.stack(starts))
    x0 = base.positions.astype(np.float32)
    sys = md.System(x0, base.species, base.masses, base.chains)
    energy, nfn = md.energy_factory(model, nn_params, prior_params, sys)
    kT = md.KB * temperature
    init, apply = simulate.nvt_langevin(energy, space.free()[1], dt, kT, gamma=1 / damp)
    mass = jnp.asarray(sys.masses / md.ACCEL, jnp.float32)[:, None]
    key = jax.random.key(seed)
    piece = 100  # MD steps between neighbour-list overflow checks
    st = {"nbrs": nfn.allocate(jnp.asarray(x0)), "key": key}
    st["state"] = init(key, jnp.asarray(x0), mass=mass, kT=kT, neighbor=st["nbrs"])

    @jax.jit
    def run(state, nbrs, params, steps):
        def body(_, c):
            s, nb = c
            s = apply(s, neighbor=nb, params=params)
            return s, nfn.update(s.position, nb)

        return jax.lax.fori_loop(0, steps, body, (state, nbrs))

    def restart(bad):
        x = np.asarray(st["state"].position).reshape(copies, n, 3)
        x[bad] = x0.reshape(copies, n, 3)[bad]
        st["key"], k = jax.random.split(st["key"])
        pos = jnp.asarray(x.reshape(-1, 3))
        st["nbrs"] = nfn.allocate(pos)
        fresh = init(k, pos, mass=mass, kT=kT, neighbor=st["nbrs"])
        mom = np.asarray(st["state"].momentum).reshape(copies, n, 3)
        mom[bad] = np.asarray(fresh.momentum).reshape(copies, n, 3)[bad]
        st["state"] = fresh.set(momentum=jnp.asarray(mom.reshape(-1, 3)))

    def stretch(params, steps: int):
        """`steps` steps in pieces of at most `piece`; a piece whose neighbour list overflowed
        is redone with a longer list (so a regrow costs one piece, not the stretch)."""
        state, nbrs, done = st["state"], st["nbrs"], 0
        while done < steps:
            k = min(piece, steps - done)
            s, nb = run(state, nbrs, params, k)
            if bool(nb.did_buffer_overflow):
                nbrs = neighbors.grow(nfn, state.position, nbrs)
                log.info("relent: neighbour list grown to %d pairs", nbrs.idx.shape[1])
                continue
            state, nbrs, done = s, nb, done + k
        return state, nbrs

    def advance(params, steps: int, frames: int):
        out, resets = [], 0
        while len(out) < frames:
            state, nbrs = stretch(params, steps)
            x = np.asarray(state.position).reshape(copies, n, 3)
            bad = ~np.isfinite(x).all(axis=(1, 2))
            st["state"], st["nbrs"] = state, nbrs
            if bad.any():  # never train on a blown-up copy: restart it from its start
                resets += int(bad.sum())
                log.warning("relent: copies %s went non-finite; restarted from their starts", np.nonzero(bad)[0])
                restart(bad)
                continue
            out.append(x)
        return np.stack(out), resets

    return advance


def train_and_evaluate(config, workdir: str):
    mc, rc, tc = config.md, config.rem, config.train
    model_wd = ensure_model(config)
    loop.write_json(workdir, "relent.json", {"model_workdir": model_wd})
    base_cfg, _, nn_params, prior_params, info = export.load_trained(model_wd, "best")
    builder = train.build_data(base_cfg)
    src = builder.as_data_source()
    splits = {s: train.load_split(src[s]) for s in ("train", "test")}
    ref_train = train.source_frames(splits["train"])  # Boltzmann frames only (no data.extra_train)
    temps = np.unique(ref_train["temperature"])
    if len(temps) != 1 or int(temps[0]) != int(mc.temperature):
        raise ValueError(f"{model_wd}: relent needs training frames at md.temperature={mc.temperature} only, "
                         f"got {temps.tolist()} (set the base model's data.temperatures)")  # fmt: skip
    n_max = ref_train["positions"].shape[1]
    # every pair: the CG frames go where the data's neighbour capacity (model.json) may not reach
    model = make_model(base_cfg, n_max, n_max * (n_max - 1), ref_train["positions"][0])
    prior_j = priors.as_jax(prior_params)

    meta = export.system_metadata(base_cfg)
    protein = meta["proteins"][0]
    folded = np.asarray(protein["folded"])
    ref_trajs, _ = landscape.reference_runs(base_cfg.data.source, protein["domain"], int(mc.temperature))
    contacts = analysis.native_contacts(folded)
    ref_obs = [landscape.observables(t, folded, contacts) for t in ref_trajs]
    begin = landscape.starts(folded, ref_trajs, ref_obs, mc.copies, mc.unfolded_above)
    advance = chains(model, nn_params, prior_params, meta, begin, temperature=float(mc.temperature), dt=mc.dt,
                     damp=mc.damp, seed=mc.seed)  # fmt: skip
    n = len(folded)
    species = np.asarray(md.make_system(meta).species, np.int32)
    cg_pad = data.pad_frame(species, folded, np.zeros_like(folded), n_max)
    log.info("relent: %d chains, burn-in %d steps with the base model", mc.copies, rc.burn_in_steps)
    _, resets = advance(nn_params, rc.burn_in_steps, 1)

    def make_updates(state, step, item):
        frames, r = advance(state.params, rc.steps_per_frame, rc.frames)
        x = frames.reshape(-1, n, 3)
        cg = {"cg_positions": np.concatenate([x, np.broadcast_to(cg_pad["positions"][n:], (len(x), n_max - n, 3))], 1),
              "cg_species": np.broadcast_to(cg_pad["species"], (len(x), n_max)),
              "cg_mask": np.broadcast_to(cg_pad["mask"], (len(x), n_max))}  # fmt: skip
        rmsd = analysis.kabsch_rmsd(x, folded)
        extra = {"chain_resets": float(r), "cg_rmsd_median": float(np.median(rmsd)),
                 "cg_folded_fraction": float(np.mean(rmsd < 1.0))}  # fmt: skip
        return [global_batch({**item, **{k: np.ascontiguousarray(v) for k, v in cg.items()}}, mesh)], extra

    mesh = make_mesh(config.mesh.num_devices)
    n_streams, streams = mesh.shape["data"], loop.local_streams(mesh)
    keys = ("positions", "forces", "species", "mask", "extra")
    rows = [{k: ref_train[k][i] for k in keys} for i in range(len(ref_train["positions"]))]
    it = train.pipeline(rows, global_batch=tc.batch_size, seed=tc.seed, streams=streams,
                        n_streams=n_streams)  # fmt: skip
    beta = 1.0 / (priors.KB * float(mc.temperature))
    loss_fn = rem_loss(model, prior_j, beta=beta, fm_weight=rc.fm_weight, rem_weight=rc.rem_weight,
                       gamma_f=base_cfg.loss.gamma_f)  # fmt: skip
    state, _ = loop.fit(config, workdir, mesh=mesh, params=nn_params, loss_fn=loss_fn, train_data=it,
                        make_updates=make_updates, item_name="frames", items_per_step=lambda m: tc.batch_size,
                        meta={"stage": "relent", "base": model_wd}, check=train._no_overflow,
                        log_keys=("force_mse", "rem_gap", "cg_rmsd_median"))  # fmt: skip
    params = jax.device_get(state.params)
    os.makedirs(os.path.join(workdir, "base"), exist_ok=True)
    base_eval = evaluate(base_cfg, os.path.join(workdir, "base"), model, nn_params, prior_j, splits["test"])
    result = evaluate(base_cfg, workdir, model, params, prior_j, splits["test"])
    result["base"] = {k: base_eval[k] for k in ("model", "mse_ratio_model_over_priors", "paired_mse_gain")}
    result.update(base_workdir=model_wd, base_training=info, burn_in_chain_resets=resets)
    loop.write_json(workdir, "evaluation.json", result)
    log.info("relent test force MSE %.4g (base model %.4g, priors alone %.4g)", result["model"]["mse"],
             base_eval["model"]["mse"], result["priors_only"]["mse"])  # fmt: skip
    return result
