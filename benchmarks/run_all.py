"""Run every benchmark in turn (``make bench``), each in its own process, and say which failed.

Each script compares peftkit with HF PEFT side by side and writes ``benchmarks/results/*.json``.
The whole set takes tens of minutes on 2 CPU cores; ``--quick`` passes ``--quick`` (fewer
layers/repeats) to the scripts that have it and shortens the real-model runs.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# script, arguments for a full run, arguments for --quick
BENCHMARKS = [
    ("bench_lora.py", [], ["--quick"]),
    # 8 of the 30 layers: at full depth the run passed 24 GB here and the OOM killer stopped it
    ("bench_lora_step.py", ["--layers", "8"], ["--layers", "2", "--repeats", "2"]),
    ("profile_lora_step.py", [], ["--layers", "2"]),
    ("bench_mixed_batch.py", [], ["--layers", "2", "--repeats", "2"]),
    ("bench_qlora_speed.py", [], ["--layers", "2", "--repeats", "2"]),
    ("bench_trim_heap.py", ["--reps", "3"], ["--reps", "1"]),
    ("bench_prompt_generate.py", [], ["--quick", "--repeats", "3"]),
    ("bench_qlora.py", [], ["--steps", "10"]),
    ("adalora_real_run.py", ["--with-peft"], ["--steps", "20", "--tag", "_quick"]),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="*", help="script names to run (default: all)")
    args = parser.parse_args()
    failed = []
    for script, full, quick in BENCHMARKS:
        if args.only and script not in args.only:
            continue
        command = [sys.executable, str(HERE / script), *(quick if args.quick else full)]
        print(f"== {' '.join(command[1:])}", flush=True)
        start = time.perf_counter()
        code = subprocess.call(command)
        print(f"== {script}: exit {code} after {time.perf_counter() - start:.0f} s", flush=True)
        if code:
            failed.append(script)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
