"""Several ``peftkit`` command lines, one after another, in the same worker processes.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/run_recipes.py \\
        '[["train", "a.yaml"], ["train", "b.yaml", "--resume", "ckpt"]]'

Each command goes through ``peftkit.cli.main`` exactly as ``-m peftkit`` would; the 2-process
tests pay the interpreter start and the imports (~10 s of a ~12 s tiny run) once per launch
instead of once per recipe. Rank 0 prints ``=== RUN <n>`` before each command, so a test can
cut the shared stdout into one piece per command. The first failing command ends the launch.
"""

from __future__ import annotations

import json
import os
import sys

from peftkit.cli import main

if __name__ == "__main__":
    for index, argv in enumerate(json.loads(sys.argv[1])):
        if os.environ.get("RANK", "0") == "0":
            print(f"=== RUN {index}", flush=True)
        code = main(argv)
        if code:
            sys.exit(code)
