"""Dataset format, validation errors, atomic writes, samplers, quality slices, collector on a tiny recipe."""

import json
import zipfile

import numpy as np
import pytest
import torch

from common import collect
from common.data import (DatasetError, TaskBatchSampler, ensure_dataset, load_dataset, quality_mask, sample_context,
                         save_dataset, slice_quality)
from common.envs import make_family


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A PointRobot dataset from a 3-iteration collector run (all 50 tasks, 8 episodes each)."""
    path = tmp_path_factory.mktemp("ds") / "PointRobot__default__s0.npz"
    collect.main(collect.Args(env_id="PointRobot", out=str(path), iterations=3, updates_per_iter=2,
                              checkpoint_every_s=1e9))
    return path


def _arrays(path):
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays.pop("meta")))
    return arrays, meta


def _resave(path, arrays, meta, **changes):
    arrays = dict(arrays, **changes)
    save_dataset(path, arrays, {k: v for k, v in meta.items() if k not in ("sha256", "format_version")})


def test_round_trip_and_layout(tiny):
    fam = make_family("PointRobot")
    ds = load_dataset(tiny, "omrl/PointRobot-v0", "default", family=fam)
    T, H = len(fam.tasks), fam.horizon
    eps = collect.RECIPES["PointRobot"]["init_episodes"] + 3 * 2
    assert ds.num_transitions == T * eps * H
    assert np.array_equal(np.diff(ds.task_ptr), np.full(T, eps * H))
    assert ds["timeouts"].sum() == T * eps and not ds["terminals"].any()  # the horizon is a timeout, never a terminal
    assert np.array_equal(ds.tasks, fam.tasks) and np.array_equal(ds.test_tasks, fam.test_idx)
    # Rewards are the env's own: -||next_obs - goal||
    goal = fam.tasks[ds["task_id"]]
    assert np.allclose(ds["rewards"], -np.linalg.norm(ds["next_obs"] - goal, axis=1), atol=1e-5)
    # policy_return is the sum of the episode's rewards
    sl = ds.task_slice(7)
    ep = ds["episode_id"][sl]
    first = ep == ep[0]
    assert ds["policy_return"][sl][first][0] == pytest.approx(ds["rewards"][sl][first].sum(), rel=1e-5)
    assert ds.meta["versions"]["numpy"] == np.__version__
    for ext in (".policies.pt", ".curve.csv"):
        assert tiny.with_name(tiny.stem + ext).exists()


def test_missing_dataset_names_the_build_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m common.collect --env-id PointRobot --preset default"):
        load_dataset(tmp_path / "nope.npz", "PointRobot", "default")


def test_corrupt_and_truncated_files(tiny, tmp_path):
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip at all" * 100)
    with pytest.raises(DatasetError, match="corrupt or truncated"):
        load_dataset(junk, "PointRobot")
    cut = tmp_path / "cut.npz"
    cut.write_bytes(tiny.read_bytes()[: tiny.stat().st_size // 2])
    with pytest.raises(DatasetError, match="corrupt or truncated"):
        load_dataset(cut, "PointRobot")


def test_wrong_env_preset_dims_and_task_set(tiny, tmp_path):
    with pytest.raises(DatasetError, match="built for PointRobot, this run asks for GridNavi"):
        load_dataset(tiny, "GridNavi")
    with pytest.raises(DatasetError, match="preset 'default', this run asks for 'pearl'"):
        load_dataset(tiny, "PointRobot", "pearl")
    arrays, meta = _arrays(tiny)
    p = tmp_path / "dims.npz"
    _resave(p, arrays, dict(meta, obs_dim=3))
    with pytest.raises(DatasetError, match="meta says obs_dim 3"):
        load_dataset(p, "PointRobot")
    p2 = tmp_path / "tasks.npz"
    _resave(p2, arrays, meta, tasks=arrays["tasks"] + 0.5)
    with pytest.raises(DatasetError, match="another task set"):
        load_dataset(p2, "PointRobot", family=make_family("PointRobot"))
    p3 = tmp_path / "split.npz"
    _resave(p3, arrays, meta, test_tasks=arrays["test_tasks"][:-1])
    with pytest.raises(DatasetError, match="another train/test split"):
        load_dataset(p3, "PointRobot", family=make_family("PointRobot"))


def test_bad_ids_and_episode_structure(tiny, tmp_path):
    arrays, meta = _arrays(tiny)
    bad = arrays["task_id"].copy()
    bad[-1] = 50
    p = tmp_path / "ids.npz"
    _resave(p, arrays, meta, task_id=bad)
    with pytest.raises(DatasetError, match="task_id out of range"):
        load_dataset(p, "PointRobot")
    p2 = tmp_path / "overlap.npz"
    _resave(p2, arrays, meta, test_tasks=np.array([0, 41], np.int32))
    with pytest.raises(DatasetError, match="overlap"):
        load_dataset(p2, "PointRobot")
    step = arrays["step"].copy()
    step[5] = 9
    p3 = tmp_path / "step.npz"
    _resave(p3, arrays, meta, step=step)
    with pytest.raises(DatasetError, match="episode_id/step are inconsistent"):
        load_dataset(p3, "PointRobot")
    nobs = arrays["next_obs"].copy()
    nobs[3] += 1.0
    p4 = tmp_path / "nobs.npz"
    _resave(p4, arrays, meta, next_obs=nobs)
    with pytest.raises(DatasetError, match=r"next_obs\[i\] != obs\[i\+1\]"):
        load_dataset(p4, "PointRobot")
    p5 = tmp_path / "dtype.npz"
    _resave(p5, arrays, meta, rewards=arrays["rewards"].astype(np.float64))
    with pytest.raises(DatasetError, match="rewards has dtype float64"):
        load_dataset(p5, "PointRobot")


def test_checksum_mismatch(tiny, tmp_path):
    arrays, meta = _arrays(tiny)
    arrays["rewards"][10] += 1.0  # keep the old meta (and its sha256)
    p = tmp_path / "sha.npz"
    with open(p, "wb") as f:
        np.savez(f, **arrays, meta=np.array(json.dumps(meta)))
    with pytest.raises(DatasetError, match="sha256 mismatch"):
        load_dataset(p, "PointRobot")


def test_never_overwrites_and_writes_atomically(tiny, tmp_path, monkeypatch):
    arrays, meta = _arrays(tiny)
    before = tiny.read_bytes()
    with pytest.raises(FileExistsError, match="--overwrite"):
        save_dataset(tiny, arrays, meta)
    with pytest.raises(FileExistsError, match="--overwrite"):
        collect.main(collect.Args(env_id="PointRobot", out=str(tiny), iterations=1))
    assert tiny.read_bytes() == before

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("common.data.os.replace", boom)  # crash before the rename: the old file must survive
    with pytest.raises(OSError):
        save_dataset(tiny, arrays, meta, overwrite=True)
    assert tiny.read_bytes() == before
    assert zipfile.is_zipfile(tiny)


def test_concurrent_build_keeps_the_first_finished_file(tiny, tmp_path, monkeypatch):
    """Two processes building the same missing dataset: the one that finishes second must not replace the first's
    file, and leaves no temporary file behind."""
    arrays, meta = _arrays(tiny)
    out = tmp_path / "race.npz"
    real_savez = np.savez

    def savez_then_other_process_publishes(f, **kw):
        real_savez(f, **kw)
        out.write_bytes(b"the other process's dataset")

    monkeypatch.setattr("common.data.np.savez", savez_then_other_process_publishes)
    with pytest.raises(FileExistsError, match="another process"):
        save_dataset(out, arrays, meta)
    assert out.read_bytes() == b"the other process's dataset"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["race.npz"]


def test_task_batch_sampler_draws_each_task_from_its_own_rows(tiny):
    ds = load_dataset(tiny, "PointRobot")
    tasks = ds.train_tasks[:5]
    s = TaskBatchSampler(ds, tasks, extra={"task_id": ds["task_id"], "row": np.arange(ds.num_transitions)})
    b = s.sample(64, torch.Generator().manual_seed(0))
    assert b["obs"].shape == (5, 64, 2) and b["rewards"].shape == (5, 64) and b["terminals"].dtype == torch.float32
    assert (b["task_id"] == torch.as_tensor(tasks)[:, None]).all()
    rows = b["row"].numpy()
    assert np.array_equal(b["obs"].numpy(), ds["obs"][rows])
    big = s.sample(4000, torch.Generator().manual_seed(1))["row"].numpy()
    for i, t in enumerate(tasks):  # uniform over the task's rows: every row reachable, none outside
        sl = ds.task_slice(int(t))
        assert big[i].min() >= sl.start and big[i].max() < sl.stop
        assert len(np.unique(big[i])) > 0.9 * (sl.stop - sl.start) * (1 - np.exp(-4000 / (sl.stop - sl.start)))


def test_sample_context_trajectory_and_transitions(tiny):
    ds = load_dataset(tiny, "PointRobot")
    c = sample_context(ds, ds.test_tasks, "trajectory", seed=3)
    assert c["obs"].shape == (10, 20, 2) and c["mask"].all()
    assert (c["step"] == np.arange(20)).all() and (c["task_id"] == ds.test_tasks[:, None]).all()
    assert (c["episode_id"] == c["episode_id"][:, :1]).all()  # one whole episode per task
    c2 = sample_context(ds, ds.test_tasks, "transitions", n=256, seed=3)
    assert c2["obs"].shape == (10, 256, 2)
    assert np.array_equal(sample_context(ds, ds.test_tasks, seed=3)["obs"], c["obs"])  # seeded


def test_quality_slices(tiny):
    ds = load_dataset(tiny, "PointRobot")
    start, end, expert = (quality_mask(ds, q) for q in ("start", "end", "expert"))
    assert not (start & end).any() and start.any() and end.any()
    assert ds["collect_step"][start].max() <= ds["collect_step"][end].min()
    assert ds["policy_return"][expert].mean() > ds["policy_return"].mean()
    sliced = slice_quality(ds, "end")
    assert sliced.num_transitions == end.sum() and sliced.task_ptr[-1] == end.sum()
    with pytest.raises(ValueError, match="valid: mixed, start"):
        quality_mask(ds, "great")


def test_ensure_dataset_builds_a_missing_default(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    key = ("GridNavi", "borel")
    monkeypatch.setitem(collect.RECIPES, key, dict(collect.recipe_for(*key), iterations=2, updates_per_iter=2))
    ds = ensure_dataset("GridNavi", "borel", seed=0)
    assert "building it now" in capsys.readouterr().out
    assert (tmp_path / "datasets" / "GridNavi__borel__s0.npz").exists()
    assert ds["actions"].dtype == np.int64 and ds.meta["n_actions"] == 5
    with pytest.raises(FileNotFoundError):  # an explicit path is never built silently
        ensure_dataset("GridNavi", "borel", path=tmp_path / "other.npz")


def test_collector_resumes_from_a_partial_checkpoint(tmp_path):
    full = tmp_path / "full.npz"
    collect.main(collect.Args(env_id="PointRobotWind", out=str(full), iterations=4, updates_per_iter=3,
                              checkpoint_every_s=1e9))
    part = tmp_path / "part.npz"
    stopped = collect.main(collect.Args(env_id="PointRobotWind", out=str(part), iterations=4, updates_per_iter=3,
                                        stop_after_s=0.0))
    assert stopped is None and part.with_name(part.name + ".partial.pt").exists() and not part.exists()
    collect.main(collect.Args(env_id="PointRobotWind", out=str(part), iterations=4, updates_per_iter=3))
    a, b = load_dataset(full, "PointRobotWind"), load_dataset(part, "PointRobotWind")
    for k in ("obs", "actions", "rewards", "collect_step"):
        assert np.array_equal(a[k], b[k]), k  # same seed: the resumed run equals the uninterrupted one
    collect.main(collect.Args(env_id="PointRobotWind", out=str(tmp_path / "x.npz"), iterations=4,
                              updates_per_iter=3, stop_after_s=0.0))
    with pytest.raises(ValueError, match="another collector configuration"):
        collect.main(collect.Args(env_id="PointRobotWind", out=str(tmp_path / "x.npz"), iterations=5))


def test_each_resumed_chunk_gets_its_own_time_budget(tmp_path):
    out = tmp_path / "chunks.npz"
    kw = dict(env_id="PointRobotWind", out=str(out), iterations=5, updates_per_iter=2)
    assert collect.main(collect.Args(**kw, stop_after_s=0.0)) is None
    partial = out.with_name(out.name + ".partial.pt")
    ck = torch.load(partial, weights_only=False)
    assert ck["state"]["iteration"] == 1
    ck["state"]["elapsed"] = 1e4  # earlier chunks took long: the new chunk's budget must not count them
    torch.save(ck, partial)
    assert collect.main(collect.Args(**kw, stop_after_s=600.0)) == out
    assert load_dataset(out, "PointRobotWind").meta["collector"]["updates"] == 10


def _drop_rows(arrays, drop):
    keep = np.ones(len(arrays["rewards"]), bool)
    keep[drop] = False
    out = {k: (v[keep] if v.shape[:1] == keep.shape else v) for k, v in arrays.items()}
    counts = np.bincount(out["task_id"], minlength=len(arrays["tasks"]))
    out["task_ptr"] = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return out


def test_early_terminations_load_but_cut_episodes_do_not(tiny, tmp_path):
    arrays, meta = _arrays(tiny)
    term = arrays["terminals"].copy()
    term[5] = True  # task 0, episode 0 ends at step 5 (a MuJoCo-style termination)
    timeouts = arrays["timeouts"].copy()
    p = tmp_path / "term.npz"
    _resave(p, _drop_rows(dict(arrays, terminals=term, timeouts=timeouts), np.arange(6, 20)), meta)
    ds = load_dataset(p, "PointRobot")
    assert ds.task_ptr[1] == arrays["task_ptr"][1] - 14
    c = sample_context(ds, [0], "trajectory", seed=0)
    assert c["mask"].shape[1] == 20  # other episodes of task 0 are full length; padding is masked when short
    p2 = tmp_path / "cut.npz"
    _resave(p2, _drop_rows(arrays, np.arange(6, 20)), meta)  # no terminal, no timeout: a truncated file
    with pytest.raises(DatasetError, match="ends without a terminal or timeout"):
        load_dataset(p2, "PointRobot")
    p3 = tmp_path / "timeout.npz"
    timeouts[3] = True
    _resave(p3, dict(arrays, timeouts=timeouts), meta)
    with pytest.raises(DatasetError, match="continues after a terminal/timeout"):
        load_dataset(p3, "PointRobot")


def test_sparse_datasets_must_keep_the_dense_reward(tmp_path):
    path = tmp_path / "sparse.npz"
    collect.main(collect.Args(env_id="SparsePointRobot", out=str(path), iterations=1, updates_per_iter=1))
    ds = load_dataset(path, "SparsePointRobot")
    goal = ds.tasks[ds["task_id"]]
    assert np.allclose(ds["rewards_dense"], -np.linalg.norm(ds["next_obs"] - goal, axis=1), atol=1e-5)
    arrays, meta = _arrays(path)
    del arrays["rewards_dense"]
    p2 = tmp_path / "nodense.npz"
    _resave(p2, arrays, meta)
    with pytest.raises(DatasetError, match="rewards_dense"):
        load_dataset(p2, "SparsePointRobot")
