"""Batched env stepping speed: transitions/s with random actions, all tasks of a family at once.

    python benchmark/env_speed.py                 # numpy families + HalfCheetahVel/AntDir (MuJoCo)
"""

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.envs import make_family  # noqa: E402


def speed(env_id, preset=None, n_per_task=1, steps=None, seconds=3.0):
    fam = make_family(env_id, preset)
    venv = fam.make_vec_env(np.arange(len(fam.tasks)), n_per_task, seed=0)
    rng = np.random.RandomState(0)
    venv.reset()
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a = rng.randint(fam.n_actions, size=venv.num_envs) if fam.discrete else \
            rng.uniform(-1, 1, (venv.num_envs, fam.act_dim)).astype(np.float32)
        _, _, term, trunc, _ = venv.step(a)
        if (term | trunc).any():
            venv.reset(mask=term | trunc)
        done += venv.num_envs
    return done / (time.perf_counter() - t0), venv.num_envs


if __name__ == "__main__":
    rows = [("PointRobot", None, 2000), ("SparsePointRobot", None, 2000), ("PointRobotWind", None, 2000),
            ("GridNavi", "borel", 5000), ("HalfCheetahVel", "cpu", 1), ("AntDir", "corro", 1)]
    for env_id, preset, n in rows:
        try:
            rate, B = speed(env_id, preset, n)
        except ImportError as e:
            print(f"{env_id:18s} skipped: {e}")
            continue
        print(f"{env_id:18s} {B:7d} envs  {rate:14,.0f} transitions/s")
