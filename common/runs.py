"""Run plumbing shared by the method scripts: run dirs, CSV/TensorBoard logging, progress lines,
summary.json, atomic writes, checkpoints, seeding and device choice.

A method script uses it like this (nothing here knows about any method)::

    run_dir = make_run_dir(args.env_id, "pearl", args.seed, args.run_dir)
    check_fresh_run_dir(run_dir, args.resume)          # never overwrite a finished run by accident
    seed_everything(args.seed); device = pick_device(args.cuda)
    logger = Logger(run_dir, vars(args))
    ...
    logger.log_eval(step, "A", "test", test_idx, returns, successes)     # -> metrics.csv
    logger.log_scalars(step, {"loss/critic": q_loss.item()})           # -> train.csv
    print_progress(step, args.total_steps, t0, {"test_return": returns.mean()})
    save_checkpoint(run_dir / "checkpoint.pt", {"meta": meta, "model": ..., "optim": ..., "step": step})
    ...
    write_summary(run_dir, method="pearl", ..., eval={"A": eval_entry(test_returns, train_returns)})

Files in a run dir: ``args.json``, ``metrics.csv`` (global_step,mode,split,task_id,episode,return,success),
``train.csv`` (global_step,name,value), ``checkpoint.pt``, ``summary.json`` and TensorBoard event files
when tensorboard is installed.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import platform
import random
import sys
import time
import warnings
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

METRICS_COLUMNS = ["global_step", "mode", "split", "task_id", "episode", "return", "success"]
TRAIN_COLUMNS = ["global_step", "name", "value"]

# ---------------------------------------------------------------------------------------------
# Run directories
# ---------------------------------------------------------------------------------------------


def make_run_dir(env_id: str, method: str, seed: int, run_dir: str | os.PathLike | None = None) -> Path:
    """Create and return ``run_dir``, by default ``runs/{env}__{method}__s{seed}__{YYYYmmdd-HHMMSS}/``."""
    if run_dir is None:
        run_dir = Path("runs") / f"{env_id}__{method}__s{seed}__{datetime.now():%Y%m%d-%H%M%S}"
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def check_fresh_run_dir(run_dir: str | os.PathLike, resume: bool) -> None:
    """Refuse to start a new run on top of another run's checkpoint (it would be overwritten)."""
    ckpt = Path(run_dir) / "checkpoint.pt"
    if ckpt.exists() and not resume:
        raise FileExistsError(f"{ckpt} exists: pass --resume to continue that run, "
                              f"or choose another --run-dir to start a new one")


# ---------------------------------------------------------------------------------------------
# Atomic writes and checkpoints
# ---------------------------------------------------------------------------------------------


def atomic_write(path: str | os.PathLike, write, overwrite: bool = True) -> Path:
    """Write ``path`` through ``write(f)`` into this process's ``path.{pid}.tmp``, fsync, then publish it: readers see
    the old or the new file, never half, and two processes writing one path never share a temporary file. With
    ``overwrite=False`` publishing never replaces a file another process wrote meanwhile (FileExistsError): a hard link,
    or where a filesystem has none, a rename after one more check."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except OSError as e:
                if isinstance(e, FileExistsError) or path.exists():
                    raise FileExistsError(f"{path} was written by another process while this one was writing it; "
                                          "that file is kept") from None
                os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only left behind when something above failed
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """torch.save ``state`` atomically. ``state["meta"]`` (method, env_id, preset, seed, dims, args) is
    required: ``load_checkpoint`` checks it before anything is restored."""
    if "meta" not in state:
        raise ValueError("checkpoint state needs a 'meta' dict (method, env_id, preset, seed, dims, args)")
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | os.PathLike, expect: dict | None = None, map_location="cpu",
                    predates: dict | None = None) -> dict:
    """Load a checkpoint written by ``save_checkpoint`` and check ``state["meta"][k] == expect[k]``.

    ``predates``: meta keys added after some checkpoints were written, with the value those checkpoints ran with
    (the flag's default); a checkpoint whose meta lacks such a key is checked against that value.
    Raises FileNotFoundError (missing), ValueError "corrupt or truncated checkpoint" (unreadable) and
    ValueError "incompatible checkpoint: built for env_id=X, this run has env_id=Y; ..." naming every
    mismatching key."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        # weights_only=False: our own files, and meta/args may hold plain Python objects.
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:
        raise ValueError(f"{path}: corrupt or truncated checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or not isinstance(state.get("meta"), dict):
        raise ValueError(f"{path}: corrupt or truncated checkpoint (no 'meta' dict; not written by save_checkpoint)")
    stored = (predates or {}) | state["meta"]
    bad = [f"built for {k}={stored.get(k)!r}, this run has {k}={v!r}"
           for k, v in (expect or {}).items() if stored.get(k) != v]
    if bad:
        raise ValueError(f"{path}: incompatible checkpoint: " + "; ".join(bad))
    return state



def args_from_saved(args_cls, saved: dict):
    """A script's ``Args`` dataclass filled from a run's saved settings (checkpoint ``args`` or args.json).

    Keys the dataclass no longer has are dropped, so runs saved by older versions still load; fields the run did
    not save keep their defaults. The caller applies its script's ``resolve_args``."""
    names = {f.name for f in dataclasses.fields(args_cls)}
    return args_cls(**{k: v for k, v in saved.items() if k in names})

# ---------------------------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------------------------


def _summary_writer(run_dir):
    try:
        from torch.utils.tensorboard import SummaryWriter  # needs the optional tensorboard package
    except ImportError:
        return None
    return SummaryWriter(str(run_dir))


class Logger:
    """CSV logs in ``run_dir`` (appended, so a resumed run continues them) plus TensorBoard when installed.

    logger = Logger(run_dir, vars(args))   # writes args.json
    logger.log_eval(step, "A", "test", task_ids, returns, successes)
    logger.log_scalars(step, {"loss/actor": 0.3})
    logger.close()
    """

    def __init__(self, run_dir: str | os.PathLike, args_dict: dict, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.run_dir / "args.json", json.dumps(args_dict, indent=1, default=str) + "\n")
        self._metrics = self._open_csv("metrics.csv", METRICS_COLUMNS)
        self._train = self._open_csv("train.csv", TRAIN_COLUMNS)
        self.writer = _summary_writer(self.run_dir) if tensorboard else None

    def _open_csv(self, name, columns):
        path = self.run_dir / name
        new = not path.exists() or path.stat().st_size == 0
        f = open(path, "a", newline="")
        if new:
            csv.writer(f).writerow(columns)
            f.flush()
        return f

    def log_eval(self, global_step: int, mode: str, split: str, task_ids, returns, successes=None, episode: int = 0):
        """One row per task (and per episode). ``returns``/``successes``: [n_tasks] -> episode column =
        ``episode``; [n_tasks, n_episodes] -> episode column = ``episode + j`` for column j."""
        returns = np.asarray(returns, dtype=float)
        returns = returns[:, None] if returns.ndim == 1 else returns
        succ = None if successes is None else np.asarray(successes, dtype=bool).reshape(returns.shape)
        task_ids = np.asarray(task_ids).reshape(-1)
        if len(task_ids) != len(returns):
            raise ValueError(f"{len(task_ids)} task ids for {len(returns)} rows of returns")
        w = csv.writer(self._metrics)
        for i, t in enumerate(task_ids):
            for j in range(returns.shape[1]):
                w.writerow([int(global_step), mode, split, int(t), episode + j, float(returns[i, j]),
                            "" if succ is None else int(succ[i, j])])
        self._metrics.flush()
        if self.writer is not None:
            self.writer.add_scalar(f"eval/{mode}/{split}/return", float(returns.mean()), global_step)
            if succ is not None:
                self.writer.add_scalar(f"eval/{mode}/{split}/success", float(succ.mean()), global_step)

    def log_scalars(self, global_step: int, scalars: dict):
        """Append ``name -> value`` rows to train.csv (losses, alpha, SPS ...)."""
        w = csv.writer(self._train)
        for name, value in scalars.items():
            w.writerow([int(global_step), name, float(value)])
            if self.writer is not None:
                self.writer.add_scalar(name, float(value), global_step)
        self._train.flush()

    def close(self):
        self._metrics.close()
        self._train.close()
        if self.writer is not None:
            self.writer.close()


# ---------------------------------------------------------------------------------------------
# Progress lines
# ---------------------------------------------------------------------------------------------


def append_csv_rows(path: str | os.PathLike, rows: list) -> None:
    """Append dict ``rows`` to the CSV at ``path`` (columns from the first row), writing the header if it is new.
    An existing file must have exactly these columns in this order: rows are never written under another header."""
    path = Path(path)
    fields = list(rows[0])
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if header != fields:
            raise ValueError(f"{path}: its columns {header} differ from the rows' {fields}; write to a new file")
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        if new:
            w.writeheader()
        w.writerows(rows)


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def progress_line(step: int, total: int, start_time: float, extra: dict | None = None, start_step: int = 0) -> str:
    """``step 500/10000 | SPS 41.2 | ETA 0:03:50 | test_return=-5.12``. SPS counts the steps since
    ``start_step`` (the resumed step) over ``time.time() - start_time``."""
    elapsed = max(time.time() - start_time, 1e-9)
    sps = (step - start_step) / elapsed
    eta = _hms((total - step) / sps) if sps > 0 else "?"
    items = [f"step {step}/{total}", f"SPS {sps:.1f}", f"ETA {eta}"]
    items += [f"{k}={v:.4g}" if isinstance(v, (float, np.floating)) else f"{k}={v}" for k, v in (extra or {}).items()]
    return " | ".join(items)


def print_progress(step: int, total: int, start_time: float, extra: dict | None = None, start_step: int = 0) -> None:
    print(progress_line(step, total, start_time, extra, start_step), flush=True)


# ---------------------------------------------------------------------------------------------
# summary.json
# ---------------------------------------------------------------------------------------------


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device) -> str:
    """One line naming the machine a result came from, e.g.
    ``Linux-6.8-x86_64, AMD EPYC, 2 CPUs, torch 2.13.0, cpu`` (no "|": it goes into markdown tables)."""
    device = torch.device(device)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    dev = str(device)
    if device.type == "cuda" and torch.cuda.is_available():
        dev += f" ({torch.cuda.get_device_name(device)})"
    return f"{platform.platform(terse=True)}, {_cpu_name()}, {cpus} CPUs, torch {torch.__version__}, {dev}"


def eval_entry(test_returns, train_returns=None) -> dict:
    """One ``eval`` mode of summary.json from per-task returns: {"test", "train", "test_per_task"}."""
    test = np.asarray(test_returns, dtype=float).reshape(-1)
    return {"test": float(test.mean()),
            "train": None if train_returns is None else float(np.mean(train_returns)),
            "test_per_task": test.tolist()}


def write_summary(run_dir, *, method: str, env_id: str, preset: str, seed: int, total_steps: int,
                  wall_time_s: float, updates_per_s: float, machine: str, dataset: str, eval: dict,
                  command: str | None = None, extra: dict | None = None) -> Path:
    """Atomically write ``run_dir/summary.json``, the record ``benchmark/report.py`` reads. Fields:

    method, env_id, preset, seed   what ran
    total_steps                    gradient steps of the main phase
    wall_time_s, updates_per_s     whole-run wall time; gradient updates per second of training
    machine                        ``machine_info(device)``
    command                        the command line (default: ``" ".join(sys.argv)``)
    dataset                        path of the offline dataset
    eval                           {mode: {"test": mean over test tasks, "train": mean or None,
                                           "test_per_task": [...]}} (final evaluation; see eval_entry)
    extra                          optional dict (method-specific numbers)
    finished                       ISO time of writing (added here)
    """
    for mode, e in eval.items():
        if not {"test", "train", "test_per_task"} <= set(e):
            raise ValueError(f"eval[{mode!r}] needs test, train and test_per_task (use eval_entry)")
    summary = dict(method=method, env_id=env_id, preset=preset, seed=int(seed), total_steps=int(total_steps),
                   wall_time_s=float(wall_time_s), updates_per_s=float(updates_per_s), machine=machine,
                   command=command if command is not None else " ".join(sys.argv), dataset=str(dataset),
                   eval=eval, extra=extra or {}, finished=datetime.now().isoformat(timespec="seconds"))
    path = Path(run_dir) / "summary.json"
    atomic_write_text(path, json.dumps(summary, indent=1) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# Seeding and device
# ---------------------------------------------------------------------------------------------


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed random, numpy and torch (CPU and CUDA). On CPU the same seed then gives the same curve;
    ``deterministic`` also pins cuDNN to deterministic kernels (GPU runs stay close, not bit-equal)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic


def pick_device(cuda: bool) -> torch.device:
    """``cuda:0`` when asked for and available; asked for but unavailable: warn and use the CPU."""
    if cuda and not torch.cuda.is_available():
        warnings.warn("--cuda was given but CUDA is not available; running on the CPU", stacklevel=2)
        cuda = False
    device = torch.device("cuda:0" if cuda else "cpu")
    print(f"device: {device}", flush=True)
    return device
