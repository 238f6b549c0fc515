"""Start-up of the `nnc` command: wall time of `--help`, `info`, `decode` and `encode` as a shell
runs them, beside the same work done in-process, so the difference is what starting costs.

    python benchmarks/startup.py [--runs 7] [--model sample_models/lenet.onnx] [--json out.json]

Each command runs as `python -m nnc_tool.cli` with this interpreter (a pyenv or conda shim in
front of `nnc` adds its own ~50 ms, which is the machine's, not nnc's). The figure is the median
of --runs runs after one warm-up (so the OS file cache is warm, as it is on a second run).
Targets (issue 17): `--help` and `info` <= 0.3 s.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGET_SECONDS = {"--help": 0.3, "info": 0.3}


def median_seconds(command: list[str], runs: int) -> float:
    times = []
    for run in range(runs + 1):
        started = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
        if run:  # the first run warms the file cache
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def in_process_seconds(work, runs: int) -> float:
    work()  # imports and first-call costs belong to start-up
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--model", type=Path, default=ROOT / "sample_models" / "lenet.onnx")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import nnc_tool

    nnc = [sys.executable, "-m", "nnc_tool.cli"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="nnc-startup-") as tmp:
        stream, rebuilt = Path(tmp) / "model.nnc", Path(tmp) / f"rebuilt{args.model.suffix}"
        nnc_tool.encode(args.model, stream)
        cases = [
            ("--help", [], None),
            ("info", ["info", str(stream)], lambda: nnc_tool.info(stream)),
            ("decode", ["decode", str(stream), "-o", str(rebuilt), "-q"], lambda: nnc_tool.decode(stream, rebuilt)),
            ("encode", ["encode", str(args.model), "-o", str(stream), "-q"], lambda: nnc_tool.encode(args.model, stream)),
        ]
        for name, arguments, work in cases:
            command = nnc + (arguments or ["--help"])
            wall = median_seconds(command, args.runs)
            work_s = in_process_seconds(work, args.runs) if work is not None else 0.0
            rows.append({"command": name, "wall_s": wall, "in_process_s": work_s, "startup_s": wall - work_s,
                         "startup_share": (wall - work_s) / wall, "target_s": TARGET_SECONDS.get(name)})
    print(f"model {args.model.name}; median of {args.runs} runs; start-up = wall - the same work in-process")
    print(f"{'command':<8} {'wall s':>7} {'work s':>7} {'start-up s':>10} {'share':>6}  target")
    for row in rows:
        target = row["target_s"]
        verdict = "" if target is None else f"<= {target} s: {'met' if row['wall_s'] <= target else 'MISSED'}"
        print(f"{row['command']:<8} {row['wall_s']:7.3f} {row['in_process_s']:7.3f} {row['startup_s']:10.3f} "
              f"{100 * row['startup_share']:5.0f}%  {verdict}")
    if args.json is not None:
        args.json.write_text(json.dumps({"model": str(args.model), "runs": args.runs, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
