#!/usr/bin/env bash
# Parity and a short generation on the CUDA backend, in one go, for a GPU machine without a
# Rust toolchain. Build both executables beforehand on any machine:
#   cargo build --release -p ecache-cli --features cuda
#   cargo test --release -p ecache-model --features cuda --test parity --no-run
#     (copy the printed executable to target/release/parity-cuda)
# then run from the repository root: tools/gpu-check.sh [ecache] [parity-cuda]
# 1. The parity tests on CUDA: the same pixel values as transformers, logits within 1e-4,
#    identical greedy tokens, PPL within 1e-5, policy-level PPL within 1e-4.
# 2. Through the CLI (our own image preprocessing, which differs from PIL by up to one uint8
#    step): the full cache's answer and the PPL of every policy, printed with their
#    reference figures; the tiny random GQA model is sensitive to that difference.
set -euo pipefail
bin=${1:-target/release/ecache}
parity=${2:-target/release/parity-cuda}
"$parity" --test-threads 1
out=${OUT:-$(mktemp -d)}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
status=0
for fx in tests/fixtures/tiny-llava-mha tests/fixtures/tiny-llava-gqa; do
  name=$(basename "$fx")
  python3 - "$fx" "$out/$name.jsonl" <<'PY'
import json, os, sys
e = json.load(open(f"{sys.argv[1]}/expected.json"))
json.dump({"image": os.path.abspath(f"{sys.argv[1]}/image.png"), "question": e["question"], "answer": e["answer"]}, open(sys.argv[2], "w"))
PY
  question=$(python3 -c "import json;print(json.load(open('$fx/expected.json'))['question'])")
  "$bin" generate --backend cuda --model "$fx" --image "$fx/image.png" --prompt "$question" \
    --policy full --budget 1 --max-new-tokens 16 | tee "$out/$name.generate.txt"
  for policy in full elastic h2o local; do
    budget=0.5; [ "$policy" = full ] && budget=1
    "$bin" eval ppl --backend cuda --model "$fx" --dataset "$out/$name.jsonl" --policies "$policy" \
      --budgets "$budget" --output "$out/$name.$policy.json" >/dev/null
  done
  python3 - "$fx" "$out" "$name" <<'PY' || status=1
import json, sys
fx, out, name = sys.argv[1:]
e = json.load(open(f"{fx}/expected.json"))
ok = True
first = open(f"{out}/{name}.generate.txt").read().splitlines()[0]
if first != e["greedy_text"]:
    print(f"{name}: greedy (own preprocessing) differs:\n  cuda: {first}\n  ref:  {e['greedy_text']}")
refs = {"full": e["ppl"], **e["policy_ppl"]}
for policy, want in refs.items():
    got = json.load(open(f"{out}/{name}.{policy}.json"))[0]["ppl"]
    rel = abs(got - want) / want
    print(f"{name} {policy}: ppl {got:.5f} vs {want:.5f} (rel {rel:.2e}, own preprocessing)")
    ok &= rel < 5e-2
sys.exit(0 if ok else 1)
PY
done
[ $status = 0 ] && echo "gpu-check: all passed" || echo "gpu-check: FAILED"
exit $status
