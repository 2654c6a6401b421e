#!/usr/bin/env bash
# The whole GPU measurement of docs/performance.md in one go, for a GPU machine without a
# Rust toolchain. Build the binary beforehand on any machine (no CUDA toolkit needed):
#   cargo build --release -p ecache-cli --features cuda
# then, from the repository root on the GPU machine:
#   tools/gpu-bench.sh [path/to/ecache] [shape] [dtype]
# Writes under $OUT (or a temporary directory): ecache.json (every policy beside the full
# cache, one process), transformers.json (the same protocol in PyTorch, eager attention,
# and a 20% prompt cache), nvidia-smi peak memory, and a summary with the ratios and the
# memory roofline.
set -euo pipefail
bin=${1:-target/release/ecache}
shape=${2:-llava-1.5-7b}
dtype=${3:-f16}
batch=${BATCH:-8}
prompt=${PROMPT_LEN:-900}
gen=${GEN_LEN:-512}
out=${OUT:-$(mktemp -d)}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"

# Peak device memory as the driver sees it, sampled every 100 ms during each engine's run.
sample() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$1" & echo $!; }

pid=$(sample "$out/ecache.mem")
"$bin" bench --backend cuda --shape "$shape" --dtype "$dtype" --batch "$batch" \
  --prompt-len "$prompt" --gen-len "$gen" --policies local,h2o,elastic --budgets 0.2,0.5 \
  --output "$out/ecache.json" | tee "$out/ecache.txt"
kill "$pid"

torch_dtype=$dtype
pid=$(sample "$out/transformers.mem")
python3 tools/bench_transformers.py --device cuda --shape "$shape" --dtype "$torch_dtype" \
  --batch "$batch" --prompt-len "$prompt" --gen-len "$gen" --attn eager --compress 0.2 \
  --output "$out/transformers.json" | tee "$out/transformers.txt"
kill "$pid"

python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
e = json.load(open(f"{out}/ecache.json"))
t = json.load(open(f"{out}/transformers.json"))
peak = lambda f: max(int(x) for x in open(f).read().split() if x.strip().isdigit())
full = e["rows"][0]
tf = t["rows"][0]
bytes_per = 2 if e["dtype"] in ("F16", "BF16") else 4
weights = e["parameters"] * bytes_per
# KV read per step at mid-generation (prompt + half the generated tokens), full cache.
kv = full["kv_bytes_end"] * (e["prompt_len"] + e["gen_len"] / 2) / (e["prompt_len"] + e["gen_len"])
roofline = e["batch"] / ((weights + kv) / 3.0e12)
lines = [
    f"ecache full: {full['decode_tokens_per_second']:.1f} tok/s, transformers: {tf['decode_tokens_per_second']:.1f} tok/s "
    f"-> {full['decode_tokens_per_second'] / tf['decode_tokens_per_second']:.2f}x",
    f"memory roofline at 3 TB/s: {roofline:.0f} tok/s -> ecache full at {full['decode_tokens_per_second'] / roofline:.0%}",
    f"peak device memory (nvidia-smi): ecache {peak(out + '/ecache.mem')} MiB, transformers {peak(out + '/transformers.mem')} MiB",
]
for r in e["rows"][1:]:
    lines.append(f"{r['policy']} {r['budget']}: {r['decode_speedup']:.2f}x decode vs our full cache, KV {r['kv_ratio']:.2f}")
open(f"{out}/summary.txt", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
