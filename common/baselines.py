"""Reference returns of a task family, the yardsticks of every result table.

    python -m common.baselines --env-id PointRobot          # prints and writes benchmark/references/...

On the test tasks (and, for comparison, the training tasks):
- ``random``: uniform random actions.
- ``task_agnostic``: the best policy that does not know the task. numpy families: the best "go to a
  fixed point and stay" policy over a fine grid of points (chosen on the *training* tasks, reported on
  the test tasks). MuJoCo families: the best single per-task collector policy (chosen on the training
  tasks by its mean return over all of them), so it needs the dataset's ``.policies.pt``.
- ``oracle``: knows the task. numpy families: the straight-to-goal controller with the env's own
  per-axis action clipping (wind-aware for PointRobotWind); MuJoCo: each task's own final collector
  policy (a lower bound of the true oracle).
- ``behaviour`` / ``dataset_best``: mean and max episode return in each task's offline data.
- BAMDP families (several episodes per task: GridNavi, BOReL presets) also get ``*_sum{k}``: k times the
  per-episode figure, since none of these policies adapts across episodes.
Mean returns are over tasks, with ``episodes`` evaluation episodes each (fixed seeds).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
import tyro

from common.data import default_dataset_path, load_dataset
from common.envs import canonical_env_id, default_preset, make_family
from common.evaluation import per_task_mean, run_episodes
from common.runs import atomic_write_text


@dataclasses.dataclass
class Args:
    env_id: str = "PointRobot"
    """task family"""
    preset: str | None = None
    """task preset (default: the family's default)"""
    dataset: str | None = None
    """dataset for the behaviour/best rows and the MuJoCo policies (default: the default dataset path)"""
    episodes: int = 5
    """evaluation episodes per task"""
    seed: int = 0
    """evaluation seed"""
    out: str | None = None
    """JSON output (default benchmark/references/{env}__{preset}.json; 'none' to skip)"""


def _point_target(fam, venv):
    """Per-env goal and wind of the point families (task-major layout of ``venv``)."""
    if fam.env_id == "PointRobotWind":
        return np.broadcast_to(np.asarray(fam.config["goal"], np.float32), (venv.num_envs, 2)), venv.tasks
    return venv.tasks, np.zeros_like(venv.tasks)


def goto_policy(fam, targets, wind=None):
    """A controller that moves to ``targets`` [B, 2] at full per-axis speed and stays (actions in [-1, 1])."""
    if fam.discrete:
        def act(obs, ep, t):
            d = targets - obs
            # right, left, up, down, stay (GridNavi's moves: 1 up, 2 right, 3 down, 4 left)
            return np.select([d[:, 0] > 0, d[:, 0] < 0, d[:, 1] > 0, d[:, 1] < 0], [2, 4, 1, 3], 0)
        return act
    w = 0.0 if wind is None else wind
    return lambda obs, ep, t: np.clip((targets - obs - w) / 0.1, -1.0, 1.0).astype(np.float32)


def _mean_return(fam, task_idx, make_act, episodes, seed):
    venv = fam.make_vec_env(task_idx, episodes, seed=seed)
    rets, succ = run_episodes(venv, make_act(venv), 1)
    return per_task_mean(rets[:, 0], episodes), per_task_mean(succ[:, 0].astype(float), episodes)


def numpy_references(fam, episodes=5, seed=0):
    out = {}
    random_act = lambda venv: (lambda obs, ep, t: np.random.RandomState(seed + t).randint(fam.n_actions, size=venv.num_envs)
                               if fam.discrete else
                               np.random.RandomState(seed + t).uniform(-1, 1, (venv.num_envs, fam.act_dim)).astype(np.float32))

    def oracle_act(venv):
        if fam.discrete:
            return goto_policy(fam, venv.tasks)
        goal, wind = _point_target(fam, venv)
        return goto_policy(fam, goal, wind)

    # Task-agnostic candidates: fixed points on a grid, all evaluated at once (one env copy per candidate).
    if fam.discrete:
        size = fam.config["size"]
        cands = np.array([(x, y) for x in range(size) for y in range(size)], np.float32)
    else:
        g = np.arange(-1.5, 1.5001, 0.05, dtype=np.float32)
        cands = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2)
    C = len(cands)
    venv = fam.make_vec_env(fam.train_idx, C * episodes, seed=seed)
    tiled = np.tile(np.repeat(cands, episodes, axis=0), (len(fam.train_idx), 1))
    rets = run_episodes(venv, goto_policy(fam, tiled), 1)[0][:, 0].reshape(len(fam.train_idx), C, episodes)
    best = cands[rets.mean(axis=(0, 2)).argmax()]
    best_act = lambda venv: goto_policy(fam, np.tile(best, (venv.num_envs, 1)))

    for split, idx in (("test", fam.test_idx), ("train", fam.train_idx)):
        r = {}
        for name, make in (("random", random_act), ("task_agnostic", best_act), ("oracle", oracle_act)):
            ret, succ = _mean_return(fam, idx, make, episodes, seed)
            r[name] = float(ret.mean())
            if fam.env_id in ("SparsePointRobot", "GridNavi"):
                r[f"{name}_success"] = float(succ.mean())
        out[split] = r
    out["task_agnostic_policy"] = f"go to {[round(float(x), 2) for x in best]} and stay"
    return out


def mujoco_references(fam, policies_path, episodes=2, seed=0):
    """Random, best single collector policy (task-agnostic) and each task's own policy (oracle)."""
    from common.collect import TanhGaussianActor, learner_features

    if not Path(policies_path).exists():
        raise FileNotFoundError(f"{policies_path} not found: the MuJoCo task-agnostic/oracle references need the "
                                f"collector's final policies (written next to the dataset by common.collect)")
    ck = torch.load(policies_path, map_location="cpu", weights_only=False)
    R, T = ck["recipe"], len(fam.tasks)
    actor = TanhGaussianActor(T, ck["obs_in"], fam.act_dim, R["hidden"], R["layers"])
    actor.load_state_dict(ck["modules"]["actor"])
    feat = learner_features(fam, R)[0]

    @torch.no_grad()
    def cross_returns(eval_idx):
        """returns[e, p]: policy of task p in task eval_idx[e], deterministic."""
        E = len(eval_idx)
        venv = fam.make_vec_env(eval_idx, T, seed=seed)

        def act(obs, ep, t):  # env b = e * T + p runs policy p: feed member p the obs of all its envs
            o = feat(torch.as_tensor(obs).reshape(E, T, -1).transpose(0, 1))
            return actor(o, deterministic=True)[0].transpose(0, 1).reshape(E * T, -1).numpy()

        return np.mean([run_episodes(venv, act, 1)[0][:, 0].reshape(E, T) for _ in range(episodes)], axis=0)

    train_cross = cross_returns(fam.train_idx)
    best = int(fam.train_idx[train_cross[:, fam.train_idx].mean(axis=0).argmax()])
    out = {"task_agnostic_policy": f"collector policy of task {best} ({[round(float(x), 3) for x in fam.tasks[best]]})"}
    for split, idx in (("test", fam.test_idx), ("train", fam.train_idx)):
        cross = cross_returns(idx) if split == "test" else train_cross
        venv = fam.make_vec_env(idx, episodes, seed=seed)
        rnd = run_episodes(venv, lambda obs, ep, t: np.random.RandomState(seed + t).uniform(
            -1, 1, (venv.num_envs, fam.act_dim)).astype(np.float32), 1)[0][:, 0]
        out[split] = {"random": float(rnd.mean()), "task_agnostic": float(cross[:, best].mean()),
                      "oracle": float(cross[np.arange(len(idx)), idx].mean())}
    return out


def dataset_references(ds, task_idx):
    rets = [ds.episode_returns(int(t)) for t in task_idx]
    return {"behaviour": float(np.mean([r.mean() for r in rets])), "dataset_best": float(np.mean([r.max() for r in rets]))}


def compute_references(env_id, preset=None, dataset=None, episodes=5, seed=0):
    env_id = canonical_env_id(env_id)
    preset = preset or default_preset(env_id)
    fam = make_family(env_id, preset)
    path = Path(dataset) if dataset else default_dataset_path(env_id, preset)
    if fam.env_id in ("PointRobot", "SparsePointRobot", "PointRobotWind", "GridNavi"):
        ref = numpy_references(fam, episodes, seed)
    else:
        ref = mujoco_references(fam, path.with_name(path.stem + ".policies.pt"), min(episodes, 2), seed)
    ref.update(env_id=env_id, preset=preset)
    if fam.episodes_per_task > 1:  # BAMDP families report sums over k episodes; these policies do not adapt
        for split in ("test", "train"):
            for k in ("random", "task_agnostic", "oracle"):
                ref[split][f"{k}_sum{fam.episodes_per_task}"] = ref[split][k] * fam.episodes_per_task
    if path.exists():
        ds = load_dataset(path, env_id, preset, family=fam)
        for split, idx in (("test", fam.test_idx), ("train", fam.train_idx)):
            ref[split].update(dataset_references(ds, idx))
        ref["dataset"] = str(path)
    else:
        print(f"note: {path} not found, dataset behaviour/best rows skipped")
    return ref


def main(args: Args):
    ref = compute_references(args.env_id, args.preset, args.dataset, args.episodes, args.seed)
    print(f"{ref['env_id']}/{ref['preset']} references (mean return over tasks):")
    for split in ("test", "train"):
        print(f"  {split:5s} " + "  ".join(f"{k}={v:.3f}" for k, v in ref[split].items()))
    print(f"  task-agnostic policy: {ref['task_agnostic_policy']}")
    if args.out != "none":
        out = Path(args.out or f"benchmark/references/{ref['env_id']}__{ref['preset']}.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, json.dumps(ref, indent=1) + "\n")
        print(f"wrote {out}")
    return ref


if __name__ == "__main__":
    main(tyro.cli(Args))
