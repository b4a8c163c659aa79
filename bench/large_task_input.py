"""How a task over a large dataset starts: load_problems on a 1M-row Parquet file vs a 10k-row one.

Prints the wall time and the peak resident memory each load adds (a child process per load, so the
two do not share caches), and their ratios. The rows are read lazily from memory-mapped Arrow: the
million-row start should take seconds and add far less memory than the file's rows would as Python
objects. Usage: python bench/large_task_input.py [--rows 1000000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[3])
from distill.core.env import set_env_defaults
set_env_defaults()
import datasets  # imported before the clock: the same in both runs
from distill.config import TaskConfig
from distill.core.problems import load_problems
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
if sys.argv[2] == "eager":  # the baseline: every row as a Python object, as a plain reader holds them
    import pyarrow.parquet as pq
    rows = pq.read_table(sys.argv[1]).to_pylist()
    train, evals = rows[:512], rows[-200:]
else:
    train, evals = load_problems(TaskConfig(source="hf", name=sys.argv[1], train_size=512, eval_size=200,
                                            split="shuffle", seed=0))
seconds = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": seconds, "added_mib": (peak - before) / 1024, "train": len(train), "eval": len(evals)}))
"""


def write_parquet(path: Path, rows: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with pq.ParquetWriter(path, pa.schema([("question", pa.string()), ("answer", pa.string())])) as w:
        for start in range(0, rows, 100_000):
            n = min(100_000, rows - start)
            q = [
                f"Problem {i}: what is {i} plus {i % 97}? Show your work step by step." for i in range(start, start + n)
            ]
            w.write_table(pa.table({"question": q, "answer": [str(i + i % 97) for i in range(start, start + n)]}))


def measure(path: Path, cache: Path, mode: str = "lazy") -> dict:
    env = {"HF_DATASETS_CACHE": str(cache), "PATH": "/usr/bin:/bin"}
    root = str(Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), mode, root], env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        small, big = Path(d) / "small.parquet", Path(d) / "big.parquet"
        write_parquet(small, 10_000)
        write_parquet(big, args.rows)
        print(
            f"files: 10k rows {small.stat().st_size / 2**20:.1f} MiB, {args.rows} rows {big.stat().st_size / 2**20:.1f} MiB"
        )
        s = measure(small, Path(d) / "cache-small")
        b = measure(big, Path(d) / "cache-big")
        s2 = measure(big, Path(d) / "cache-big")  # second start: the Arrow cache is reused
        e = measure(big, Path(d) / "cache-big", "eager")
        runs = (("10k rows", s), (f"{args.rows} rows", b), (f"{args.rows} rows, cached", s2), ("eager baseline", e))
        for name, r in runs:
            print(
                f"{name:>24}: {r['seconds']:6.2f} s, +{r['added_mib']:6.1f} MiB peak ({r['train']} train, {r['eval']} eval)"
            )
        print(
            f"ratio big/small: time {b['seconds'] / s['seconds']:.1f}x, memory {b['added_mib'] / max(s['added_mib'], 1):.1f}x; "
            f"cached start {s2['seconds'] / s['seconds']:.1f}x; vs eager Python rows: time "
            f"{b['seconds'] / e['seconds']:.2f}x, memory {b['added_mib'] / e['added_mib']:.2f}x"
        )


if __name__ == "__main__":
    main()
