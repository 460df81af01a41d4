"""Run one method on one env over several seeds with the settings recorded in benchmark/settings.py.

    python benchmark/run.py --method pearl --env PointRobot --seeds 1 2 3
    python benchmark/run.py --method pearl --env PointRobot --seeds 1 --extra --bf16        # flags appended
    python benchmark/run.py --method pearl --env PointRobot --preset default --args="--total-steps 200"

Per seed it runs (sequentially)

    python {script_dir}/{method}.py --env-id E --preset P --seed S --run-dir {run_root}/{E}__{method}__s{S}
        --total-steps {steps} {args} {extra}

streaming the output to the terminal and to ``{run_dir}.log``. A seed whose run dir already holds
``summary.json`` is skipped; one holding only ``checkpoint.pt`` (an interrupted run) gets ``--resume``.
The first failing run stops the loop with its exit code. ``--args`` replaces the SETTINGS entry's
preset/steps/args (use ``--args=...`` when the value starts with ``--`` and has no space).
Then: ``python benchmark/report.py``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmark.settings import SETTINGS  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", required=True, help="method script name, e.g. pearl (runs {script_dir}/pearl.py)")
    p.add_argument("--env", required=True, help="env id, e.g. PointRobot")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--run-root", default="runs/benchmark", help="run dirs go to {run_root}/{env}__{method}__s{seed}")
    p.add_argument("--preset", default=None, help="overrides the SETTINGS preset (with --args: the preset to pass)")
    p.add_argument("--args", default=None, help="flags passed instead of the SETTINGS entry's steps/args")
    p.add_argument("--script-dir", default=os.environ.get("OMRL_SCRIPT_DIR", str(REPO)),
                   help="where the method scripts live (default $OMRL_SCRIPT_DIR or the repo root)")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="flags appended to every run (keep it last)")
    return p.parse_args(argv)


def method_flags(a) -> tuple[str | None, list[str]]:
    """The preset and the method flags from SETTINGS, or from --args."""
    if a.args is not None:
        return a.preset, shlex.split(a.args)
    key = (a.method, a.env)
    if key not in SETTINGS:
        known = ", ".join(f"{m}/{e}" for m, e in sorted(SETTINGS)) or "none yet"
        raise SystemExit(f"no benchmark setting for {a.method}/{a.env} in benchmark/settings.py "
                         f"(available: {known}); add one, or pass the flags with --args")
    s = SETTINGS[key]
    return a.preset or s["preset"], ["--total-steps", str(s["steps"]), *s["args"]]


def run_seed(cmd: list[str], log_path: Path) -> int:
    """Run ``cmd``, copying its output line by line to stdout and to ``log_path``; return its exit code."""
    with open(log_path, "a") as log:
        log.write(f"# {shlex.join(cmd)}\n")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
            log.flush()
        return proc.wait()


def main(argv=None) -> int:
    a = parse_args(argv)
    preset, flags = method_flags(a)
    # A variant (e.g. pearl-relabel) names its script in SETTINGS; a plain method is its own script.
    script = Path(a.script_dir) / f"{SETTINGS.get((a.method, a.env), {}).get('script', a.method)}.py"
    if not script.exists():
        raise SystemExit(f"method script {script} not found")
    root = Path(a.run_root)
    root.mkdir(parents=True, exist_ok=True)
    for seed in a.seeds:
        run_dir = root / f"{a.env}__{a.method}__s{seed}"
        if (run_dir / "summary.json").exists():
            print(f"[run] seed {seed}: {run_dir}/summary.json exists, skipped", flush=True)
            continue
        cmd = [sys.executable, str(script), "--env-id", a.env, *(["--preset", preset] if preset else []),
               "--seed", str(seed), "--run-dir", str(run_dir), *flags, *a.extra]
        if (run_dir / "checkpoint.pt").exists():  # interrupted earlier: continue it instead of failing
            cmd.append("--resume")
        print(f"[run] seed {seed}: {shlex.join(cmd)}", flush=True)
        rc = run_seed(cmd, Path(f"{run_dir}.log"))
        if rc != 0:
            print(f"[run] seed {seed} failed with exit code {rc}; see {run_dir}.log", file=sys.stderr, flush=True)
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
