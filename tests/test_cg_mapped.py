"""CA-mapped mdCATH files (molgen.cg.mapped): the same CG frames as the all-atom file mapped with
the stored map, read by the builder with data.force_map=stored, and clear errors otherwise."""

import json

import h5py
import numpy as np
import pytest
from cg_run import data_config

from molgen.cg import data, mapped, mdcath, simulate


@pytest.fixture(scope="module")
def mapped_file(cg_source, tmp_path_factory):
    src = str(cg_source / "mdcath_dataset_villin.h5")
    out = tmp_path_factory.mktemp("mapped") / "villin_ca.h5"
    report = mapped.convert(src, str(out), fit_temperatures=(320,), atom_every=5)
    return src, out, report


def test_mapped_frames_equal_the_all_atom_file_under_the_stored_map(mapped_file):
    src, out, report = mapped_file
    assert mdcath.is_mapped(str(out)) and not mdcath.is_mapped(src)
    maps = mdcath.stored_force_maps(str(out))
    ref = list(mdcath.read_cg(src, force_maps=maps))
    got = list(mdcath.read_cg(str(out)))
    keys = [(r.temperature, r.replica) for r in got]
    assert keys == [(r.temperature, r.replica) for r in ref] == [(320, 0), (320, 1)]
    for a, b in zip(got, ref, strict=True):
        np.testing.assert_array_equal(a.positions, b.positions)
        np.testing.assert_allclose(a.forces, b.forces, rtol=1e-5, atol=1e-4)
        np.testing.assert_array_equal(a.species, b.species)
    # the map beats the residue sums on its own fitting frames; provenance names the source's sha256
    d = report["domains"]["villin"]["320"]
    assert d["frames"] == 48 and d["mean_square_optimized"] < d["mean_square_residue_sum"]
    prov = json.loads(mdcath.provenance(str(out)))
    assert prov["source_sha256"] == mapped.sha256(src) and report["sha256"] == mapped.sha256(str(out))
    # every 5th frame keeps its atoms, the rest do not
    assert mdcath.atom_frames(str(out), "villin", 320) == {(r, i) for r in (0, 1) for i in range(0, 24, 5)}
    assert mdcath.atom_frames(src, "villin", 320) is None
    run = next(mdcath.read_runs(src, replicas=(1,)))
    np.testing.assert_array_equal(mdcath.atom_coords(str(out), "villin", 320, 1, 10), run.coords[10])
    assert mdcath.atom_coords(str(out), "villin", 320, 1, 11) is None
    with pytest.raises(mdcath.MdcathError, match=r"villin_ca.h5: domain villin, 320 K, replica 0: frame 3 has no"):
        simulate.conditional_force_noise(str(out), "villin", 320, [(0, 3)], samples=2)


def test_builder_reads_stored_forces_and_refuses_the_wrong_force_map(mapped_file, tmp_path):
    src, out, _ = mapped_file
    b = data.build(data_config(out, force_map="stored"), str(tmp_path / "tfds"))
    rep = data.report(b)
    assert rep["force_map"]["kind"] == "stored" and sum(rep["frames"].values()) == 48
    assert set(data.force_maps(b)) == {"villin"}
    test = b.as_data_source()["test"]
    ex = test[0]
    ref = {(r.replica): r for r in mdcath.read_cg(str(out))}[int(ex["replica"])]
    np.testing.assert_array_equal(ex["forces"][ex["mask"]], ref.forces[int(ex["frame"])])
    with pytest.raises(mdcath.MdcathError, match=r"villin_ca.h5: a CA-mapped file .*needs stored"):
        data.build(data_config(out, force_map="optimized"), str(tmp_path / "tfds"))
    with pytest.raises(mdcath.MdcathError, match=r"mdcath_dataset_villin.h5: an all-atom mdCATH file.*sum or optim"):
        data.build(data_config(src, force_map="stored"), str(tmp_path / "tfds"))
    with pytest.raises(mdcath.MdcathError, match="villin_ca.h5: a CA-mapped file .*has no all-atom frames"):
        next(mdcath.read_runs(str(out)))
    with pytest.raises(ValueError, match=r"no runs at data.temperatures \[999\]"):
        data.build(data_config(out, force_map="stored", temperatures=(999,)), str(tmp_path / "tfds"))


def test_nan_in_a_mapped_file_names_the_run(mapped_file, tmp_path):
    _, out, _ = mapped_file
    bad = tmp_path / "bad_ca.h5"
    bad.write_bytes(out.read_bytes())
    with h5py.File(bad, "a") as f:
        f["villin/320/1/beadForces"][4, 2, 0] = np.nan
    with pytest.raises(mdcath.MdcathError, match=r"bad_ca.h5: domain villin, temperature 320 K, replica 1: .*frame 4"):
        list(mdcath.read_cg(str(bad)))
    runs = list(mdcath.read_cg(str(bad), on_nan="skip"))
    assert runs[1].skipped_frames == (4,) and len(runs[1].positions) == 23


def test_active_learning_frames_join_a_mapped_source_under_its_map(mapped_file, tmp_path):
    """molgen.cg.active on a CA-mapped source: the round's file is all-atom (no mapped layout or
    map copied), and data.extra_train maps its forces with the source's stored map."""
    from molgen.cg import active

    src, out, _ = mapped_file
    extra = tmp_path / "round" / "mdcath_dataset_villin.h5"
    extra.parent.mkdir()
    active._copy_topology(str(out), str(extra), "villin")
    assert not mdcath.is_mapped(str(extra))
    with h5py.File(extra) as f:
        assert "forceMap" not in f["villin"] and "provenance" not in f.attrs
    run = next(mdcath.read_runs(src, replicas=(1,)))
    mdcath.write_replica(str(extra), "villin", 320, 0, run.coords[:3], run.forces[:3], np.zeros(3), {})
    b = data.build(data_config(out, force_map="stored", extra_train=str(extra.parent)), str(tmp_path / "tfds"))
    rep = data.report(b)
    assert rep["extra_train_frames"] == 3 and rep["frames"]["train"] == 48 - rep["frames"]["test"] - rep["frames"][
        "validation"] + 3  # fmt: skip
    want = next(mdcath.read_cg(src, replicas=(1,), force_maps=mdcath.stored_force_maps(str(out)))).forces[:3]
    got = [ex for ex in b.as_data_source()["train"] if ex["extra"]]
    assert len(got) == 3
    for ex in got:
        np.testing.assert_allclose(ex["forces"][ex["mask"]], want[int(ex["frame"])], rtol=1e-5, atol=1e-4)
