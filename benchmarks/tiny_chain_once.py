"""One whole job on the tiny model set, in a fresh stage cache: the unit that `farm-bench` times to
compare two versions of the code (or two settings) side by side on a shared machine.

    OMP_NUM_THREADS=1 farm-bench -n 5 -- python benchmarks/tiny_chain_once.py --models TINY [--offload]
        --vs "env PYTHONPATH=OTHER/backend python benchmarks/tiny_chain_once.py --models TINY"

`--offload` holds one model at a time (what the memory planner picks for a default job whose two
edited-views models do not fit the free memory), so its cost shows against the same preset without.
The code that runs is whatever `make_your_3d` the Python path finds (PYTHONPATH picks a checkout).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", required=True, help="a tiny model set (make-your-3d models tiny --out DIR)")
    parser.add_argument("--preset", default="default")
    parser.add_argument("--offload", action="store_true", help="hold one model at a time")
    args = parser.parse_args()
    from make_your_3d.pipeline.generate import Generator
    from make_your_3d.pipeline.request import GenerateRequest

    with tempfile.TemporaryDirectory(prefix="tiny-chain-") as work:
        t0 = time.perf_counter()
        gen = Generator(args.models, Path(work) / "cache", "cpu", overrides={"offload": True} if args.offload else None)
        request = GenerateRequest(image=(REPO / "examples" / "toy_bear.png").read_bytes(), prompt="wearing a red scarf", preset=args.preset, seed=0)
        result = gen.run(request, Path(work) / "out")
        record = json.loads((Path(work) / "out" / "job.json").read_text())
        print(json.dumps({"seconds": round(time.perf_counter() - t0, 2), "timings": result.timings, "preset": record["preset"]["name"],
                          "offload": record["preset"]["offload"], "code": str(Path(sys.modules["make_your_3d"].__file__).parents[1])}))


if __name__ == "__main__":
    main()
