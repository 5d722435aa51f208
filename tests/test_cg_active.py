"""Active learning: a real round on the tiny trained model (jax-md exploration, backmapping,
fixed-CA all-atom samples) and the builder's `extra_train` frames (train split only, flagged,
mapped with the source's force map, left out of the priors)."""

import json

import cg_run
import h5py
import ml_collections
import numpy as np
import pytest

from molgen.cg import active, data, mdcath, train


def _cfg(source, **kw):
    return cg_run.data_config(source, **kw)


@pytest.mark.slow  # ~2.2 min; keeps the default suite inside its 20-minute budget
def test_round_writes_fixed_ca_frames_that_join_train_only(cg_trained, cg_source, tmp_path):
    out = tmp_path / "round"
    rep = active.run_round(str(cg_trained), str(out), temperatures=(320,), steps=200, record_every=50, configs=2,
                           samples=3, steps_per_sample=2, equilibration_steps=10, copies=2)  # fmt: skip
    assert rep["temperatures"]["320"]["copies"] == 2
    rows = rep["temperatures"]["320"]["new_configs"]
    assert [r["explore_copy"] for r in rows] == [0, 1]  # one configuration from each copy
    assert [r["config"] for r in rows] == [0, 1] and all(r["restraint_deviation"] < 0.5 for r in rows)
    path = out / "mdcath_dataset_villin.h5"
    runs = list(mdcath.read_runs(str(path)))
    assert [(r.temperature, r.replica, len(r.coords)) for r in runs] == [(320, 0, 3), (320, 1, 3)]
    with h5py.File(path, "r") as f:
        target = f["villin/320/1/cg_target"][()]
    ca = runs[1].topology.ca_index
    np.testing.assert_allclose(runs[1].coords[:, ca], np.broadcast_to(target, (3, *target.shape)), atol=1e-4)
    again = active.run_round(str(cg_trained), str(out), temperatures=(320,), steps=200, record_every=50, configs=2,
                             samples=3, steps_per_sample=2, equilibration_steps=10, copies=2)  # fmt: skip
    assert again["temperatures"]["320"]["new_configs"] == []  # resumed: nothing redone

    base = data.build(_cfg(cg_source), str(tmp_path / "tfds"))
    b = data.build(_cfg(cg_source, extra_train=str(out)), str(tmp_path / "tfds"))
    assert b.data_dir != base.data_dir
    r0, r1 = data.report(base), data.report(b)
    assert r1["extra_train_frames"] == 6 and r1["frames"]["train"] == r0["frames"]["train"] + 6
    s0, s1 = b.as_data_source(), base.as_data_source()
    for split in ("validation", "test"):
        a, c = train.load_split(s0[split]), train.load_split(s1[split])
        np.testing.assert_array_equal(a["forces"], c["forces"])
        assert not a["extra"].any()
    tr = train.load_split(s0["train"])
    assert tr["extra"].sum() == 6
    (w,) = data.force_maps(b).values()
    np.testing.assert_array_equal(w, next(iter(data.force_maps(base).values())))  # fitted on the source only
    k = np.flatnonzero(tr["extra"])[0]
    i = [r.replica for r in runs].index(int(tr["replica"][k]))
    np.testing.assert_allclose(tr["forces"][k][: len(w)], w @ runs[i].forces[tr["frame"][k]], rtol=1e-4, atol=1e-3)
    config = ml_collections.ConfigDict(json.loads((cg_trained / "config.json").read_text()))
    (tmp_path / "p1").mkdir(), (tmp_path / "p2").mkdir()
    p_all = train.fit_priors(config, str(tmp_path / "p1"), tr)
    p_src = train.fit_priors(config, str(tmp_path / "p2"), train.source_frames(tr))
    assert len(train.source_frames(tr)["positions"]) == len(tr["positions"]) - 6
    np.testing.assert_array_equal(p_all["bond"]["r0"], p_src["bond"]["r0"])  # extra frames do not enter the priors
    with pytest.raises(FileNotFoundError, match="data.extra_train: no mdCATH .h5 files at"):
        data.build(_cfg(cg_source, extra_train=str(tmp_path / "missing")), str(tmp_path / "tfds"))


def test_picks_spread_over_copies_and_stop_before_a_blow_up():
    frames = np.zeros((3, 20, 4, 3))
    frames[1, 12:] = np.nan  # blew up at frame 12: usable up to 12 - BLOWUP_MARGIN
    frames[2] = np.nan  # never finite: its share goes to the others
    got = active.picks(frames, 5, burn_in=0.25)
    assert got == [(0, 5), (0, 12), (0, 19), (1, 5), (1, 6)]
    assert all(i < 12 - active.BLOWUP_MARGIN for c, i in got if c == 1)
    with pytest.raises(FloatingPointError, match="every exploration copy blew up"):
        active.picks(frames[2:], 2, burn_in=0.0)
