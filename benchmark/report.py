"""Collect the benchmark runs into benchmark/results.csv, the README results table and learning curves.

    python benchmark/report.py                                   # runs/benchmark -> README.md, benchmark/
    python benchmark/report.py --run-root runs/benchmark runs/gpu --readme README.md --out benchmark

Reads every ``summary.json`` under the run roots (written by ``common.runs.write_summary``), groups them
by (env, preset, method) and reports, per evaluation mode, the test return as mean ± std over seeds
(population std, ddof=0), the train return (mean over seeds), the number of seeds, steps, mean wall
time, mean updates/s and the machine. Reference rows (random, task-agnostic, oracle, dataset behaviour,
dataset best) come from ``{references}/{env}__{preset}.json`` (``python -m common.baselines``).

Method rows of the previous ``{out}/results.csv`` whose (env, preset, method) has no run under the run roots
are kept as they are (runs measured in another session or on another machine stay until re-measured); a
group found under the run roots replaces its old rows.

The markdown table replaces whatever sits between ``<!-- results:start -->`` and
``<!-- results:end -->`` in the README; the rest of the file is left as it was.

Learning curves ``{out}/plots/{env}__{preset}.png`` (when matplotlib imports): test return vs global_step
from each run's metrics.csv, per method and mode; at each step the mean over test tasks of the last
episode logged (the adapted one), then mean ± std over seeds at the steps all seeds logged.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmark.settings import REFERENCE_ENVS  # noqa: E402
from common.runs import atomic_write_text  # noqa: E402

START, END = "<!-- results:start -->", "<!-- results:end -->"
REFERENCE_ROWS = [("random", "random"), ("task_agnostic", "task-agnostic"), ("oracle", "oracle"),
                  ("behaviour", "dataset behaviour"), ("dataset_best", "dataset best")]
CSV_COLUMNS = ["env", "preset", "method", "mode", "test_mean", "test_std", "train_mean", "seeds", "steps",
               "wall_time_s", "updates_per_s", "machine"]
MD_COLUMNS = ["env", "preset", "method", "mode", "test return (mean ± std)", "train return", "seeds", "steps",
              "wall time", "updates/s", "machine"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-root", nargs="+", default=["runs/benchmark"], help="dirs searched for summary.json")
    p.add_argument("--readme", default="README.md", help="file holding the results markers")
    p.add_argument("--out", default="benchmark", help="results.csv and plots/ go here")
    p.add_argument("--references", default=str(REPO / "benchmark" / "references"),
                   help="dir of {env}__{preset}.json reference returns")
    return p.parse_args(argv)


def load_runs(roots) -> dict:
    """{(env_id, preset, method): [(run_dir, summary), ...]} sorted by seed."""
    groups = defaultdict(list)
    for root in roots:
        for path in sorted(Path(root).rglob("summary.json")):
            s = json.loads(path.read_text())
            groups[(s["env_id"], s["preset"], s["method"])].append((path.parent, s))
    return {k: sorted(v, key=lambda r: r[1]["seed"]) for k, v in groups.items()}


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def kept_rows(csv_path, groups: dict) -> list[dict]:
    """Method rows of an earlier results.csv whose (env, preset, method) has no run in ``groups``."""
    path = Path(csv_path)
    if not path.exists():
        return []
    with open(path, newline="") as f:
        old = [r for r in csv.DictReader(f) if r.get("seeds")]  # reference rows are rebuilt, not kept
    num = {"test_mean": float, "test_std": float, "train_mean": float, "seeds": int, "wall_time_s": float,
           "updates_per_s": float}
    return [{k: (num[k](v) if k in num and v != "" else None if k in num else v) for k, v in r.items()}
            for r in old if (r["env"], r["preset"], r["method"]) not in groups]


def result_rows(groups: dict, ref_dir, kept: list[dict] = ()) -> list[dict]:
    """One row per (env, preset, method, mode), then the reference rows of each (env, preset)."""
    env_order = {e: i for i, e in enumerate(REFERENCE_ENVS)}
    rows = []
    envs = {k[:2] for k in groups} | {(r["env"], r["preset"]) for r in kept}
    envs = sorted(envs, key=lambda e: (env_order.get(e, len(env_order)), e))
    for env, preset in envs:
        methods = {m for e, p, m in groups if (e, p) == (env, preset)}
        methods |= {r["method"] for r in kept if (r["env"], r["preset"]) == (env, preset)}
        for method in sorted(methods):
            if (env, preset, method) not in groups:
                rows += [r for r in kept if (r["env"], r["preset"], r["method"]) == (env, preset, method)]
                continue
            runs = [s for _, s in groups[(env, preset, method)]]
            for mode in sorted({m for s in runs for m in s["eval"]}):
                test = [s["eval"][mode]["test"] for s in runs if mode in s["eval"]]
                steps = sorted({s["total_steps"] for s in runs})
                rows.append(dict(env=env, preset=preset, method=method, mode=mode,
                                 test_mean=float(np.mean(test)), test_std=float(np.std(test)),
                                 train_mean=_mean([s["eval"][mode].get("train") for s in runs if mode in s["eval"]]),
                                 seeds=len(test),
                                 steps=str(steps[0]) if len(steps) == 1 else f"{steps[0]}-{steps[-1]}",
                                 wall_time_s=_mean([s["wall_time_s"] for s in runs]),
                                 updates_per_s=_mean([s["updates_per_s"] for s in runs]),
                                 machine="; ".join(sorted({s["machine"] for s in runs}))))
        rows += reference_rows(env, preset, ref_dir)
    return rows


def load_references(env, preset, ref_dir) -> dict:
    path = Path(ref_dir) / f"{env}__{preset}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def reference_rows(env, preset, ref_dir) -> list[dict]:
    ref = load_references(env, preset, ref_dir)
    rows = []
    for key, name in REFERENCE_ROWS:
        test, train = (ref.get("test") or {}).get(key), (ref.get("train") or {}).get(key)
        if test is None and train is None:
            continue
        rows.append(dict(env=env, preset=preset, method=name, mode="", test_mean=test, test_std=None,
                         train_mean=train, seeds=None, steps="", wall_time_s=None, updates_per_s=None, machine=""))
    return rows


def _hms(seconds):
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def markdown_table(rows) -> str:
    def f(x, fmt="{:.2f}"):
        return "" if x is None else fmt.format(x)

    lines = ["| " + " | ".join(MD_COLUMNS) + " |", "|" + "---|" * len(MD_COLUMNS)]
    for r in rows:
        test = f(r["test_mean"]) + ("" if r["test_std"] is None else f" ± {r['test_std']:.2f}")
        cells = [r["env"], r["preset"], r["method"], r["mode"], test, f(r["train_mean"]), f(r["seeds"], "{}"),
                 r["steps"], "" if r["wall_time_s"] is None else _hms(r["wall_time_s"]),
                 f(r["updates_per_s"], "{:.1f}"), r["machine"]]
        lines.append("| " + " | ".join(str(c).replace(" | ", ", ") for c in cells) + " |")  # keep the table intact
    return "\n".join(lines)


def splice_readme(readme, table: str) -> None:
    """Replace the text between the results markers with ``table``; everything else stays."""
    readme = Path(readme)
    text = readme.read_text()
    i, j = text.find(START), text.find(END)
    if i < 0 or j < 0 or j < i:
        raise SystemExit(f"{readme}: needs the markers {START} ... {END} (in that order) around the results table")
    note = "Test return: mean ± std (ddof=0) over seeds of the final evaluation; generated by benchmark/report.py."
    atomic_write_text(readme, text[:i + len(START)] + f"\n{note}\n\n{table}\n" + text[j:])


def write_csv(path, rows) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, CSV_COLUMNS)
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def return_curve(metrics_csv, mode) -> dict:
    """{global_step: mean test return over tasks of the last episode logged at that step}."""
    by_step = defaultdict(list)
    with open(metrics_csv, newline="") as f:
        for r in csv.DictReader(f):
            if r["mode"] == mode and r["split"] == "test":
                by_step[int(r["global_step"])].append((int(r["episode"]), float(r["return"])))
    return {s: float(np.mean([ret for ep, ret in v if ep == max(e for e, _ in v)])) for s, v in sorted(by_step.items())}


def plot_env(env, preset, groups, rows, out_png) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    machines = set()
    for (e, p, method), runs in sorted(groups.items()):
        if (e, p) != (env, preset):
            continue
        for mode in sorted({m for _, s in runs for m in s["eval"]}):
            curves = [return_curve(d / "metrics.csv", mode) for d, _ in runs if (d / "metrics.csv").exists()]
            curves = [c for c in curves if c]
            if not curves:
                continue
            steps = sorted(set.intersection(*(set(c) for c in curves)))
            y = np.array([[c[s] for s in steps] for c in curves])  # (seeds, steps)
            info = next(r for r in rows if (r["env"], r["preset"], r["method"], r["mode"]) == (env, preset, method, mode))
            label = (f"{method} {mode} ({len(curves)} seeds, {info['steps']} steps, {_hms(info['wall_time_s'])}, "
                     f"{info['updates_per_s']:.1f} upd/s)")
            line, = ax.plot(steps, y.mean(0), label=label)
            ax.fill_between(steps, y.mean(0) - y.std(0), y.mean(0) + y.std(0), color=line.get_color(), alpha=0.2)
            machines.add(info["machine"])
    for r in rows:  # reference returns as horizontal lines
        if (r["env"], r["preset"]) == (env, preset) and r["seeds"] is None and r["test_mean"] is not None:
            ax.axhline(r["test_mean"], ls="--", lw=0.8, color="gray")
            ax.annotate(r["method"], (0.01, r["test_mean"]), xycoords=("axes fraction", "data"), fontsize=7, color="gray",
                        va="bottom")
    ax.set_xlabel("global step (gradient updates)")
    ax.set_ylabel("test return")
    ax.set_title(f"{env} / {preset}\n{'; '.join(sorted(machines))}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    a = parse_args(argv)
    groups = load_runs(a.run_root)
    if not groups:
        print(f"no summary.json under {', '.join(a.run_root)}; nothing to report")
        return 1
    out = Path(a.out)
    rows = result_rows(groups, a.references, kept_rows(out / "results.csv", groups))
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "results.csv", rows)
    table = markdown_table(rows)
    splice_readme(a.readme, table)
    print(table)
    print(f"wrote {out / 'results.csv'} and the table in {a.readme}")
    try:
        import matplotlib
        matplotlib.use("Agg")
    except ImportError:
        print("matplotlib not installed: learning-curve plots skipped")
        return 0
    for env, preset in sorted({k[:2] for k in groups}):
        png = out / "plots" / f"{env}__{preset}.png"
        plot_env(env, preset, groups, rows, png)
        print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
