#!/usr/bin/env python3
"""The markdown table of `tools/bench-pairs.sh` runs: for each protocol and round of a TAG, our
full-cache row against transformers' sdpa and eager rows, with the ratios and our share of the
triad measured in that run.

    python3 tools/pairs_table.py 2026-12-02e [docs/results/bench]
"""
import glob
import json
import os
import re
import sys


def main():
    tag = sys.argv[1]
    folder = sys.argv[2] if len(sys.argv) > 2 else "docs/results/bench"
    print("| protocol, round | ecache prefill s | sdpa / eager prefill s | ecache ms/step"
          " | sdpa / eager ms/step | prefill vs sdpa | vs eager | decode vs sdpa | vs eager"
          " | share of triad (GB/s) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    pattern = os.path.join(folder, f"*-ecache-{tag}-r*.json")
    for path in sorted(glob.glob(pattern)):
        name, rnd = re.match(rf".*/(.+)-ecache-{re.escape(tag)}-r(\d+)\.json", path).groups()
        theirs_path = path.replace("-ecache-", "-transformers-")
        if not os.path.exists(theirs_path):
            continue
        ours = json.load(open(path))
        theirs = json.load(open(theirs_path))
        full = next(r for r in ours["rows"] if r["policy"] == "full")
        by = {r["attention"]: r for r in theirs["rows"]}
        s, e = by["sdpa"], by["eager"]
        p, d = full["prefill_seconds"], full["ms_per_step"]
        print(f"| {name}, {rnd} | {p:.3f} | {s['prefill_seconds']:.3f} / {e['prefill_seconds']:.3f}"
              f" | {d:.2f} | {s['ms_per_step']:.2f} / {e['ms_per_step']:.2f}"
              f" | {s['prefill_seconds'] / p:.2f}x | {e['prefill_seconds'] / p:.2f}x"
              f" | {s['ms_per_step'] / d:.2f}x | {e['ms_per_step'] / d:.2f}x"
              f" | {full['bandwidth_share'] * 100:.0f}% ({ours['machine']['bandwidth_gb_s']:.1f}) |")


if __name__ == "__main__":
    main()
