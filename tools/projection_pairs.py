#!/usr/bin/env python3
"""Issue 17's decode projection, ours against torch's, alternated round by round.

Each round runs `examples/skinny_rate` (our skinny product) and `tools/bench_transformers.py
--matmul` (torch's `x @ w`), each in its own process, with the same rows, shape and timing
(the best of five rounds of eight calls); odd rounds run ours first, even rounds torch's, so
that a slow stretch of a shared host falls on both sides alike. It prints every round's f32
times and ratio (ours / torch's; under 1 is faster), then per row count the median, the range
and how many rounds were within 1.1x, and writes it all as JSON.

    cargo build --release -p ecache-model --examples
    python3 tools/projection_pairs.py --rounds 12 --rows 1,8 --threads 2 \
        --output docs/results/bench/projection-pairs-TAG.json

Leave the machine otherwise idle while it runs: one process at a time is timed, and the
other side's process is not running then.
"""
import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
ROW = re.compile(r"^\|\s*(\d+)\s*\|(.*)\|\s*$")


def table(text, column):
    """{rows: the f32 ms of the given column} from a markdown table's body rows."""
    times = {}
    for line in text.splitlines():
        m = ROW.match(line)
        if m:
            cells = [c.strip() for c in m.group(2).split("|")]
            times[int(m.group(1))] = float(cells[column].split()[0])
    return times


def ours(a, env):
    exe = os.path.join(ROOT, "target", "release", "examples", "skinny_rate")
    if not os.path.exists(exe):
        sys.exit(f"{exe} is missing: run `cargo build --release -p ecache-model --examples`")
    out = subprocess.run([exe, str(a.k), str(a.n)], env=dict(env, ROWS=a.rows),
                         capture_output=True, text=True, check=True).stdout
    # Columns after `rows`: flex GEMM f32, skinny f32, skinny f16, skinny bf16.
    return table(out, 1)


def torch(a, env):
    script = os.path.join(ROOT, "tools", "bench_transformers.py")
    out = subprocess.run([sys.executable, script, "--matmul", a.rows, "--k", str(a.k),
                          "--n", str(a.n), "--threads", str(a.threads)],
                         env=env, capture_output=True, text=True, check=True).stdout
    # Columns after `rows`: f32, f16, bf16.
    return table(out, 0)


def cpu():
    """The CPU model and its widest x86 SIMD flags, from /proc/cpuinfo."""
    model, flags = platform.processor() or "unknown", set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    simd = sorted(f for f in flags if f.startswith("avx512") or f in ("avx2", "fma", "f16c"))
    return {"model": model, "simd": simd, "cpus": os.cpu_count()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--rows", default="1,8", help="comma list of row counts")
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--n", type=int, default=11008)
    p.add_argument("--threads", type=int, default=2, help="threads on both sides")
    p.add_argument("--output", help="JSON file to write")
    a = p.parse_args()
    if a.rounds < 1:
        sys.exit("--rounds must be at least 1")
    env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads))
    rows = [int(r) for r in a.rows.split(",")]
    machine = cpu()
    print(f"{machine['model']}, {machine['cpus']} CPUs, {a.threads} threads; "
          f"[rows x {a.k}] x [{a.k} x {a.n}] f32, ms (ours / torch)")
    print("| round | first | " + " | ".join(f"{r} row(s): ours / torch (ratio)" for r in rows)
          + " |")
    print("|---:|---|" + "---:|" * len(rows))
    records = []
    for rnd in range(1, a.rounds + 1):
        if rnd % 2:
            mine, theirs, first = ours(a, env), torch(a, env), "ours"
        else:
            theirs, mine, first = torch(a, env), ours(a, env), "torch"
        records.append({"round": rnd, "first": first,
                        "ours_ms": {str(r): mine[r] for r in rows},
                        "torch_ms": {str(r): theirs[r] for r in rows}})
        cells = [f"{mine[r]:.2f} / {theirs[r]:.2f} ({mine[r] / theirs[r]:.2f}x)" for r in rows]
        print(f"| {rnd} | {first} | " + " | ".join(cells) + " |", flush=True)
    summary = {}
    print()
    print("| rows | median ratio | range | rounds within 1.1x | median ours / torch ms |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        ratios = [x["ours_ms"][str(r)] / x["torch_ms"][str(r)] for x in records]
        within = sum(q <= 1.1 for q in ratios)
        med_ours = statistics.median(x["ours_ms"][str(r)] for x in records)
        med_torch = statistics.median(x["torch_ms"][str(r)] for x in records)
        summary[str(r)] = {"median_ratio": statistics.median(ratios), "min_ratio": min(ratios),
                           "max_ratio": max(ratios), "within_1_1": within,
                           "median_ours_ms": med_ours, "median_torch_ms": med_torch}
        print(f"| {r} | {statistics.median(ratios):.2f}x | {min(ratios):.2f}-{max(ratios):.2f}x"
              f" | {within} of {len(ratios)} | {med_ours:.2f} / {med_torch:.2f} |")
    if a.output:
        with open(a.output, "w") as f:
            json.dump({"machine": dict(machine, threads=a.threads), "k": a.k, "n": a.n,
                       "rounds": records, "summary": summary}, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
