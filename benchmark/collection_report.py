"""Dataset collection and reference tables for the README, plus the collectors' learning curves.

    python benchmark/collection_report.py [--datasets datasets] [--readme README.md]

Reads ``datasets/*.npz`` metadata (collector recipe, wall time, final per-task returns), their
``.curve.csv`` files and ``benchmark/references/*.json`` (``python -m common.baselines``); writes the
tables between the ``collection`` and ``references`` markers of the README and
``benchmark/plots/collection__{env}__{preset}.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from common.runs import atomic_write_text  # noqa: E402


def splice(text, name, table):
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    i, j = text.find(start), text.find(end)
    if i < 0 or j < i:
        raise SystemExit(f"README has no {start} ... {end} markers")
    return text[: i + len(start)] + "\n" + table + "\n" + text[j:]


def dataset_meta(path):
    with np.load(path) as z:
        meta = json.loads(str(z["meta"]))
        meta["_n"] = len(z["rewards"])
        meta["_train"], meta["_test"] = z["train_tasks"], z["test_tasks"]
    return meta


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="datasets")
    p.add_argument("--references", default=str(REPO / "benchmark" / "references"))
    p.add_argument("--readme", default=str(REPO / "README.md"))
    p.add_argument("--plots", default=str(REPO / "benchmark" / "plots"))
    args = p.parse_args(argv)
    refs = {}
    for f in sorted(Path(args.references).glob("*.json")):
        r = json.loads(f.read_text())
        refs[(r["env_id"], r["preset"])] = r

    rows = ["| dataset | tasks (train/test) | transitions | updates per task | wall time | device | final per-task return, train / test tasks (min) | oracle (test) | task-agnostic (test) |",
            "|---|---|---|---|---|---|---|---|---|"]
    for path in sorted(Path(args.datasets).glob("*__s*.npz")):
        m = dataset_meta(path)
        c = m["collector"]
        final = np.array(c["final_returns"])
        ref = refs.get((m["env_id"], m["preset"]), {}).get("test", {})
        fmt = lambda x: "n/a" if x is None else f"{x:.2f}"
        rows.append(f"| `{path.name}` | {len(m['_train'])}/{len(m['_test'])} | {m['_n']:,} | {c['updates']:,} "
                    f"({c['algo'].upper()}) | {c['wall_time_s'] / 60:.1f} min | {c['device']} | "
                    f"{final[m['_train']].mean():.2f} / {final[m['_test']].mean():.2f} ({final.min():.2f}) | "
                    f"{fmt(ref.get('oracle'))} | {fmt(ref.get('task_agnostic'))} |")
        _plot(path, m, refs.get((m["env_id"], m["preset"])), Path(args.plots))

    ref_rows = ["| env / preset | split | random | task-agnostic | oracle | dataset behaviour | dataset best | task-agnostic policy |",
                "|---|---|---|---|---|---|---|---|"]
    for (env, preset), r in refs.items():
        for split in ("test", "train"):
            v = r[split]
            n = next((k.split("_sum")[1] for k in v if k.startswith("oracle_sum")), None)

            def g(k):  # BAMDP families also show the sum over their n episodes
                if v.get(k) is None:
                    return "n/a"
                return f"{v[k]:.2f}" + (f" (sum of {n}: {v[f'{k}_sum{n}']:.1f})" if n and f"{k}_sum{n}" in v else "")
            ref_rows.append(f"| {env} / {preset} | {split} | {g('random')} | {g('task_agnostic')} | {g('oracle')} | "
                            f"{g('behaviour')} | {g('dataset_best')} | {r.get('task_agnostic_policy', '') if split == 'test' else ''} |")

    readme = Path(args.readme)
    text = splice(readme.read_text(), "collection", "\n".join(rows))
    text = splice(text, "references", "\n".join(ref_rows))
    atomic_write_text(readme, text)
    print("\n".join(rows + [""] + ref_rows))


def _plot(path, meta, ref, out_dir):
    curve = path.with_name(path.stem + ".curve.csv")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: collection plots skipped")
        return
    if not curve.exists():
        return
    with open(curve) as f:
        data = list(csv.DictReader(f))
    x = np.array([float(r["updates"]) for r in data])
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(x, [float(r["mean_return"]) for r in data], label="mean over tasks (exploration episodes)")
    ax.fill_between(x, [float(r["min_return"]) for r in data], [float(r["max_return"]) for r in data], alpha=0.2,
                    label="min..max over tasks")
    if ref:
        for key, style in (("oracle", "--"), ("task_agnostic", ":"), ("random", "-.")):
            if ref["test"].get(key) is not None:
                ax.axhline(ref["test"][key], ls=style, color="k", lw=1, label=f"{key} (test tasks)")
    c = meta["collector"]
    ax.set(xlabel="collector updates per task", ylabel="episode return",
           title=f"{meta['env_id']}/{meta['preset']} collection, {c['wall_time_s'] / 60:.1f} min on {c['device']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_dir / f"collection__{meta['env_id']}__{meta['preset']}.png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
