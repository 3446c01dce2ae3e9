"""Two source trees side by side in one run: ``bench_sampling.py`` of each, alternating, on the same machine.

    git worktree add /tmp/before <commit>          # the tree to compare against
    OMP_NUM_THREADS=1 python benchmarks/compare_revisions.py --before /tmp/before --after . --rounds 5 -- \\
        --setting fmnist --batch 16 --num-iter 16 --cfg 3.0

Each round runs the before tree's benchmark, then the after tree's (the order alternates from round to round,
so a machine that slows down or warms up over the run does not favour one), each in its own process with
``PYTHONPATH`` set to its tree. Prints every round's s/image per benchmark line, then the medians and minima
(the minimum is the least disturbed by other work on a shared machine) and the ratios after / before (below 1
is faster). The benchmark arguments after ``--`` go to both trees unchanged.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROW = re.compile(r"^(?P<label>[^|#]+\|[^|]+)\|\s*(?P<s>[0-9.]+)\s")  # "variant | batch iter steps cfg | s/image ..."


def run_tree(tree: Path, args: list[str]) -> dict[str, float]:
    """{row label: s/image} of one bench_sampling.py run of ``tree``."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    proc = subprocess.run([sys.executable, str(tree / "benchmarks" / "bench_sampling.py"), *args], env=env,
                          cwd=tree, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{tree}: bench_sampling.py failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    rows = {}
    for line in proc.stdout.splitlines():
        m = ROW.match(line)
        if m and not line.startswith("variant |"):
            rows[" ".join(m.group("label").split())] = float(m.group("s"))
    if not rows:
        raise SystemExit(f"{tree}: no result rows in its output:\n{proc.stdout[-2000:]}")
    return rows


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True, type=Path, help="the source tree to compare against")
    p.add_argument("--after", default=Path("."), type=Path, help="the source tree under test (default: this one)")
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args(argv[:split])
    bench = argv[split + 1:]
    trees = {"before": a.before.resolve(), "after": a.after.resolve()}
    times: dict[str, dict[str, list[float]]] = {"before": {}, "after": {}}
    print(f"# OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, {os.cpu_count()} logical CPUs; "
          f"bench_sampling.py {' '.join(bench)}")
    for r in range(a.rounds):
        for name in (("before", "after") if r % 2 == 0 else ("after", "before")):
            for label, s in run_tree(trees[name], bench).items():
                times[name].setdefault(label, []).append(s)
                print(f"round {r + 1} {name:6s} | {label} | {s:.4f} s/image", flush=True)
    print("row | before s/image: median, min | after s/image: median, min | after / before: median, min")
    for label in times["before"]:
        b, f = times["before"][label], times["after"].get(label, [float("nan")])
        mb, mf = statistics.median(b), statistics.median(f)
        print(f"{label} | {mb:.4f}, {min(b):.4f} | {mf:.4f}, {min(f):.4f} | {mf / mb:.3f}, {min(f) / min(b):.3f}")


if __name__ == "__main__":
    main()
