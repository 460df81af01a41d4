"""Offline meta-RL datasets: the ``omrl-dataset`` v1 format, validated loading, per-task sampling.

One uncompressed ``.npz`` per (family, preset, collector seed), default ``datasets/{env}__{preset}__s{seed}.npz``:

    obs, next_obs      float32 [N, obs_dim]    agent-facing observations
    actions            float32 [N, act_dim] in [-1, 1]  (int64 [N] for discrete families)
    rewards            float32 [N]             the family's reward (sparse families: the sparse one)
    rewards_dense      float32 [N]             sparse families only: the dense reward, for relabelling
    terminals          bool [N]                true MDP terminations only, never the horizon
    timeouts           bool [N]                the episode was cut by the horizon after this step
    task_id            int32 [N]               index into tasks
    episode_id, step   int32 [N]               episode index (unique within a task), step within the episode
    collect_step       int64 [N]               collector updates done when the transition was generated
    policy_return      float32 [N]             return of the transition's episode
    tasks              float32 [T, task_dim]
    train_tasks, test_tasks  int32
    task_ptr           int64 [T + 1]           CSR offsets: task t is rows task_ptr[t]:task_ptr[t+1]
    meta               0-d str, JSON: format_version, env_id, preset, dims, horizon, collector, versions,
                       created, sha256 of all the arrays above

Rows are sorted by (task_id, episode_id, step). ``load_dataset`` checks everything it can and raises
``DatasetError`` (a ValueError) naming the file and the problem; nothing trains on bad data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from common.runs import atomic_write

FORMAT_VERSION = 1
QUALITIES = ("mixed", "start", "middle", "end", "expert")
_PER_TRANSITION = {  # key -> (dtype, required)
    "obs": (np.float32, True), "next_obs": (np.float32, True), "actions": (None, True),
    "rewards": (np.float32, True), "rewards_dense": (np.float32, False),
    "terminals": (np.bool_, True), "timeouts": (np.bool_, True), "task_id": (np.int32, True),
    "episode_id": (np.int32, True), "step": (np.int32, True), "collect_step": (np.int64, True),
    "policy_return": (np.float32, True),
}
_PER_DATASET = {"tasks": np.float32, "train_tasks": np.int32, "test_tasks": np.int32, "task_ptr": np.int64}


class DatasetError(ValueError):
    """The file is not a usable omrl dataset for this run (corrupt, wrong env/preset/dims, bad ids...)."""


def default_dataset_path(env_id: str, preset: str, seed: int = 0, root: str | os.PathLike = "datasets") -> Path:
    return Path(root) / f"{env_id}__{preset}__s{seed}.npz"


def collect_command(env_id: str, preset: str, seed: int = 0, path=None) -> str:
    out = f" --out {path}" if path is not None else ""
    return f"python -m common.collect --env-id {env_id} --preset {preset} --seed {seed}{out}"


def arrays_sha256(arrays: dict) -> str:
    """Hash of every array (name, dtype, shape, bytes) in sorted key order, ``meta`` excluded."""
    h = hashlib.sha256()
    for k in sorted(arrays):
        if k == "meta":
            continue
        a = np.ascontiguousarray(arrays[k])
        h.update(f"{k}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def library_versions() -> dict:
    import gymnasium

    try:
        import mujoco

        mj = mujoco.__version__
    except ImportError:
        mj = None
    return {"omrl": "0.1.0", "gymnasium": gymnasium.__version__, "mujoco": mj, "numpy": np.__version__,
            "torch": torch.__version__}


def save_dataset(path, arrays: dict, meta: dict, overwrite: bool = False) -> Path:
    """Write atomically (``common.runs.atomic_write``). Refuses to replace an existing file unless ``overwrite``;
    the old file stays intact until the new one is complete, and a file another process finished meanwhile is kept."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite to replace it (the old file is kept otherwise)")
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(meta, format_version=FORMAT_VERSION, sha256=arrays_sha256(arrays))
    atomic_write(path, lambda f: np.savez(f, **arrays, meta=np.array(json.dumps(meta))), overwrite=overwrite)
    return path


@dataclasses.dataclass
class Dataset:
    """A loaded, validated dataset. Arrays are numpy; use ``TaskBatchSampler`` to sample on a device."""

    path: Path
    meta: dict
    arrays: dict  # per-transition arrays, all [N, ...]
    tasks: np.ndarray
    train_tasks: np.ndarray
    test_tasks: np.ndarray
    task_ptr: np.ndarray

    def __getitem__(self, key):
        return self.arrays[key]

    @property
    def num_transitions(self):
        return len(self.arrays["rewards"])

    def task_slice(self, t: int) -> slice:
        return slice(int(self.task_ptr[t]), int(self.task_ptr[t + 1]))

    def episode_returns(self, t: int) -> np.ndarray:
        """Returns of the task's episodes, in collection order."""
        sl = self.task_slice(t)
        first = self.arrays["step"][sl] == 0
        return self.arrays["policy_return"][sl][first]


def _fail(path, msg):
    raise DatasetError(f"{path}: {msg}")


def load_dataset(path, env_id: str, preset: str | None = None, family=None, quality: str = "mixed",
                 check_sha: bool = True) -> Dataset:
    """Load and validate a dataset for ``env_id``/``preset``, against ``family`` (a ``common.envs.Family``;
    built from the file's preset when not given): obs/act dims, the task list and the split must match a
    freshly built env. ``quality`` cuts a slice of each task's episodes at load time (see ``quality_mask``)."""
    from common.envs import SPARSE_FAMILIES, canonical_env_id, make_family

    env_id = canonical_env_id(env_id)
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"dataset {path} not found; build it with: "
                                f"{collect_command(env_id, preset or '<preset>', path=path)}")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(str(arrays.pop("meta")))
    except Exception as e:  # zipfile/numpy/json errors all mean the same thing to the user
        raise DatasetError(f"{path}: corrupt or truncated file, or not an omrl dataset ({type(e).__name__}: {e})")
    if meta.get("format_version") != FORMAT_VERSION:
        _fail(path, f"unsupported format_version {meta.get('format_version')!r} (this code reads {FORMAT_VERSION})")
    if meta.get("env_id") != env_id:
        _fail(path, f"dataset built for {meta.get('env_id')}, this run asks for {env_id}")
    if preset is not None and meta.get("preset") != preset:
        _fail(path, f"dataset built for preset {meta.get('preset')!r}, this run asks for {preset!r}")
    missing_meta = [k for k in ("preset", "obs_dim", "act_dim", "horizon", "sha256") if k not in meta]
    if missing_meta:
        _fail(path, f"metadata lacks {missing_meta}")
    if family is None:
        try:
            family = make_family(env_id, meta["preset"])
        except ValueError as e:
            _fail(path, str(e))

    # Keys, dtypes, lengths.
    missing = [k for k, (_, req) in _PER_TRANSITION.items() if req and k not in arrays]
    if env_id in SPARSE_FAMILIES and "rewards_dense" not in arrays:
        missing.append("rewards_dense")  # sparse families need the dense reward for relabelling
    missing += [k for k in _PER_DATASET if k not in arrays]
    if missing:
        _fail(path, f"missing arrays {missing}")
    n = len(arrays["rewards"])
    for k, (dtype, _) in _PER_TRANSITION.items():
        if k not in arrays:
            continue
        a = arrays[k]
        if len(a) != n:
            _fail(path, f"array {k} has {len(a)} rows, rewards has {n}")
        if dtype is not None and a.dtype != dtype:
            _fail(path, f"array {k} has dtype {a.dtype}, expected {np.dtype(dtype)}")
    for k, dtype in _PER_DATASET.items():
        if arrays[k].dtype != dtype:
            _fail(path, f"array {k} has dtype {arrays[k].dtype}, expected {np.dtype(dtype)}")
    if check_sha and arrays_sha256(arrays) != meta.get("sha256"):
        _fail(path, "sha256 mismatch: the file was modified or is truncated/corrupt")

    obs_dim, act_dim = meta["obs_dim"], meta["act_dim"]
    if arrays["obs"].shape != (n, obs_dim) or arrays["next_obs"].shape != (n, obs_dim):
        _fail(path, f"obs arrays have shape {arrays['obs'].shape}, meta says obs_dim {obs_dim}")
    if family.obs_dim != obs_dim or family.act_dim != act_dim or family.n_actions != meta.get("n_actions", 0):
        _fail(path, f"dataset built for {env_id} obs {obs_dim} act {act_dim}, "
                    f"env has obs {family.obs_dim} act {family.act_dim or family.n_actions}")
    if arrays["tasks"].shape != family.tasks.shape or not np.allclose(arrays["tasks"], family.tasks, atol=1e-6):
        _fail(path, f"dataset built for another task set than {env_id}/{family.preset}")
    if not (np.array_equal(arrays["train_tasks"], family.train_idx)
            and np.array_equal(arrays["test_tasks"], family.test_idx)):
        _fail(path, f"dataset built with another train/test split than {env_id}/{family.preset}")
    if meta.get("n_actions", 0):
        if arrays["actions"].dtype != np.int64 or arrays["actions"].shape != (n,):
            _fail(path, "discrete actions must be int64 [N]")
        if n and (arrays["actions"].min() < 0 or arrays["actions"].max() >= meta["n_actions"]):
            _fail(path, "discrete action out of range")
    elif arrays["actions"].dtype != np.float32 or arrays["actions"].shape != (n, act_dim):
        _fail(path, f"actions have shape {arrays['actions'].shape} {arrays['actions'].dtype}, expected float32 [N, {act_dim}]")

    # Values and ids.
    for k in ("obs", "next_obs", "actions", "rewards", "rewards_dense", "policy_return"):
        if k in arrays and arrays[k].dtype.kind == "f" and not np.all(np.isfinite(arrays[k])):
            _fail(path, f"non-finite values in {k}")
    T = len(arrays["tasks"])
    tid, ep, st = arrays["task_id"], arrays["episode_id"], arrays["step"]
    if n and (tid.min() < 0 or tid.max() >= T):
        _fail(path, f"task_id out of range [0, {T})")
    for k in ("train_tasks", "test_tasks"):
        a = arrays[k]
        if len(a) and (a.min() < 0 or a.max() >= T):
            _fail(path, f"{k} out of range [0, {T})")
    if np.intersect1d(arrays["train_tasks"], arrays["test_tasks"]).size and not family.allow_overlap:
        _fail(path, "train and test tasks overlap")
    ptr = arrays["task_ptr"]
    if len(ptr) != T + 1 or ptr[0] != 0 or ptr[-1] != n or np.any(np.diff(ptr) < 0) or \
            not np.array_equal(np.searchsorted(ptr, np.arange(n), side="right") - 1, tid):
        _fail(path, "task_ptr does not match task_id (rows must be sorted by task)")
    # Inside an episode, step increments by 1 and next_obs[i] == obs[i + 1]; a new episode starts at step 0.
    same_ep = (ep[1:] == ep[:-1]) & (tid[1:] == tid[:-1])
    if (n and st[0] != 0) or np.any(st[1:][same_ep] != st[:-1][same_ep] + 1) or np.any(st[1:][~same_ep] != 0):
        _fail(path, "episode_id/step are inconsistent (steps must run 0, 1, ... inside each episode)")
    if not np.array_equal(arrays["next_obs"][:-1][same_ep], arrays["obs"][1:][same_ep]):
        _fail(path, "next_obs[i] != obs[i+1] inside an episode")
    ends = np.append(~same_ep, True)  # last row of every episode
    done = arrays["terminals"] | arrays["timeouts"]
    if np.any(done & ~ends):
        _fail(path, "an episode continues after a terminal/timeout")
    if n and not done[ends].all():
        _fail(path, "an episode ends without a terminal or timeout (truncated episode)")
    H = meta["horizon"]
    if n and (st.max() >= H or np.any(arrays["timeouts"] != (st == H - 1) & ~arrays["terminals"])):
        _fail(path, f"timeouts must flag exactly the non-terminal steps H-1 = {H - 1} (and no step may exceed it)")

    ds = Dataset(path=path, meta=meta, arrays={k: arrays[k] for k in _PER_TRANSITION if k in arrays},
                 tasks=arrays["tasks"], train_tasks=arrays["train_tasks"].astype(np.int64),
                 test_tasks=arrays["test_tasks"].astype(np.int64), task_ptr=ptr)
    if np.intersect1d(ds.train_tasks, ds.test_tasks).size:
        print(f"note: {path.name}: train and test tasks overlap, as in the paper's {env_id}/{meta['preset']} setting")
    return slice_quality(ds, quality) if quality != "mixed" else ds


def quality_mask(ds: Dataset, quality: str) -> np.ndarray:
    """Row mask of a quality slice, per task: ``start``/``middle``/``end`` = first/middle/last third of the
    task's episodes in collection order (MACAW's buffer slices); ``expert`` = the task's episodes with
    return in the top 10%; ``mixed`` = everything (the whole replay buffer)."""
    if quality not in QUALITIES:
        raise ValueError(f"unknown quality {quality!r}; valid: {', '.join(QUALITIES)}")
    keep = np.zeros(ds.num_transitions, bool)
    if quality == "mixed":
        keep[:] = True
        return keep
    for t in range(len(ds.tasks)):
        sl = ds.task_slice(t)
        ep = ds["episode_id"][sl]
        eps, first = np.unique(ep, return_index=True)
        if len(eps) == 0:
            continue
        if quality == "expert":
            rets = ds["policy_return"][sl][first]
            chosen = eps[rets >= np.quantile(rets, 0.9)]
        else:
            k = {"start": 0, "middle": 1, "end": 2}[quality]
            chosen = np.array_split(eps, 3)[k]
        keep[sl] = np.isin(ep, chosen)
    return keep


def slice_quality(ds: Dataset, quality: str) -> Dataset:
    keep = quality_mask(ds, quality)
    arrays = {k: v[keep] for k, v in ds.arrays.items()}
    counts = np.bincount(arrays["task_id"], minlength=len(ds.tasks))
    ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return dataclasses.replace(ds, arrays=arrays, task_ptr=ptr, meta=dict(ds.meta, quality=quality))


def ensure_dataset(env_id: str, preset: str, seed: int = 0, path=None, family=None, quality="mixed") -> Dataset:
    """Load the dataset at ``path`` (default path if None). If the *default* dataset is missing, build it
    with the default collector recipe first, saying so (on the GPU when there is one; recipes that need a
    GPU are not started on a CPU: the error gives the command instead). An explicit missing path is an error."""
    from common.envs import canonical_env_id

    env_id = canonical_env_id(env_id)
    if path is None:
        path = default_dataset_path(env_id, preset, seed)
        if not Path(path).exists():
            from common import collect

            cuda = torch.cuda.is_available()
            if not cuda and not collect.recipe_for(env_id, preset).get("cpu_sized"):
                raise FileNotFoundError(f"dataset {path} not found and its collector recipe needs a GPU (hours on a "
                                        f"CPU); build it with: {collect_command(env_id, preset, seed)} --cuda")
            print(f"dataset {path} not found: building it now with `{collect_command(env_id, preset, seed)}`")
            try:
                collect.main(collect.Args(env_id=env_id, preset=preset, seed=seed, out=str(path), cuda=cuda))
            except FileExistsError:
                if not Path(path).exists():
                    raise
                print(f"dataset {path} was built meanwhile by another process: using that one")
    return load_dataset(path, env_id, preset, family=family, quality=quality)


# ---------------------------------------------------------------------------------------------
# Sampling on the device
# ---------------------------------------------------------------------------------------------


class TaskBatchSampler:
    """Per-task data as padded device tensors ``[tasks, max_rows, dim]``, so that a batch for every task
    is one gather: ``sample(batch)`` -> dict of ``(tasks, batch, dim)`` tensors. ``keys`` picks the
    arrays (plus anything in ``extra``: name -> [N, ...] array aligned with the dataset rows)."""

    def __init__(self, ds: Dataset, task_ids, device="cpu", keys=("obs", "actions", "rewards", "next_obs", "terminals"),
                 extra: dict | None = None):
        self.task_ids = np.asarray(task_ids, np.int64)
        self.device = torch.device(device)
        counts = np.array([ds.task_ptr[t + 1] - ds.task_ptr[t] for t in self.task_ids])
        if np.any(counts == 0):
            raise DatasetError(f"{ds.path}: no transitions for tasks {self.task_ids[counts == 0].tolist()}")
        self.counts = torch.as_tensor(counts, device=self.device)
        rows = np.zeros((len(self.task_ids), counts.max()), np.int64)
        for i, t in enumerate(self.task_ids):  # pad by repeating the task's own first row; never sampled
            rows[i] = ds.task_ptr[t]
            rows[i, : counts[i]] = np.arange(ds.task_ptr[t], ds.task_ptr[t + 1])
        src = {k: ds[k] for k in keys} | (extra or {})
        self.data = {}
        for k, a in src.items():
            a = a[rows]
            dtype = torch.int64 if a.dtype.kind in "iu" else torch.float32  # bools become 0/1 floats
            self.data[k] = torch.as_tensor(a, dtype=dtype, device=self.device)

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> dict:
        # float64: a float32 uniform has 24 bits, too few to index large tasks evenly
        u = torch.rand(len(self.task_ids), batch_size, device=self.device, generator=generator, dtype=torch.float64)
        idx = (u * self.counts[:, None]).long()  # (tasks, batch), uniform over each task's own rows
        return {k: _gather_rows(v, idx) for k, v in self.data.items()}


def _gather_rows(x, idx):
    # x: (tasks, rows, *dims), idx: (tasks, batch) -> (tasks, batch, *dims)
    if x.dim() == 2:
        return torch.gather(x, 1, idx)
    flat = idx.reshape(idx.shape[0], -1, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return torch.gather(x, 1, flat)


def bamdp_rollout_rows(ds: Dataset, task_ids, horizon: int, k: int, script: str):
    """Row indices grouping each task's episodes into BAMDP rollouts of k consecutive episodes of ``horizon`` steps
    (BOReL, LDM; a remainder is dropped): ``rows`` (R, k horizon) and ``task`` (R,), sorted by task. Datasets whose
    episodes end early (terminations) are refused, naming ``script``."""
    rows, task = [], []
    for t in task_ids:
        sl = ds.task_slice(int(t))
        step = ds["step"][sl]
        if len(step) % horizon or np.any(step != np.tile(np.arange(horizon), len(step) // horizon)):
            raise SystemExit(f"{script} needs fixed-length episodes of H={horizon} steps; task {t} of {ds.path} has "
                             f"episodes that end early (terminations)")
        n_roll = len(step) // (horizon * k)
        if n_roll == 0:
            raise SystemExit(f"task {t} of {ds.path} has {len(step) // horizon} episodes, fewer than k={k}")
        rows.append(np.arange(sl.start, sl.start + n_roll * horizon * k).reshape(n_roll, horizon * k))
        task.append(np.full(n_roll, t))
    return np.concatenate(rows), np.concatenate(task)


def sample_context(ds: Dataset, task_ids, kind: str = "trajectory", n: int = 256, seed: int = 0) -> dict:
    """Offline context for evaluation mode A, a seeded draw fixed per call: ``kind='trajectory'`` gives one
    whole episode per task (stacked: all of a family's episodes have the same length when none terminated
    early; shorter ones are padded with their last transition and ``mask``=0), ``kind='transitions'`` gives
    ``n`` transitions drawn uniformly per task. Returns numpy arrays ``(tasks, len, dim)`` plus ``mask``."""
    rng = np.random.RandomState(seed)
    rows = []
    for t in task_ids:
        sl = ds.task_slice(int(t))
        if kind == "transitions":
            rows.append(rng.randint(sl.start, sl.stop, size=n))
        elif kind == "trajectory":
            eps = np.unique(ds["episode_id"][sl])
            ep = eps[rng.randint(len(eps))]
            rows.append(sl.start + np.flatnonzero(ds["episode_id"][sl] == ep))
        else:
            raise ValueError(f"unknown context kind {kind!r}")
    length = max(len(r) for r in rows)
    mask = np.zeros((len(rows), length), np.float32)
    padded = np.zeros((len(rows), length), np.int64)
    for i, r in enumerate(rows):
        padded[i] = np.concatenate([r, np.full(length - len(r), r[-1])])
        mask[i, : len(r)] = 1.0
    out = {k: v[padded] for k, v in ds.arrays.items()}
    out["mask"] = mask
    return out
