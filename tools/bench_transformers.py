#!/usr/bin/env python3
"""The baseline for `ecache bench`: the same protocol in PyTorch transformers.

Builds a LlamaForCausalLM of the same text config with random weights (created in the
target dtype), then times what `ecache bench` times: the prefill of `--batch` prompts of
`--prompt-len` random tokens, and `--gen-len` greedy decode steps with transformers' own
KV cache (`DynamicCache`, the full cache). Prints a table row and writes JSON with the same
field names as `ecache bench --output`.

    python3 tools/bench_transformers.py --shape crates/ecache-cli/shapes/llava-mid.json \
        --batch 1 --prompt-len 900 --gen-len 64 --dtype f32 --threads 2 --output t.json

`--shape` takes the same config.json files as `ecache bench` (a LLaVA config: its
text_config is used; a model directory: its config.json). A Qwen2-VL or Qwen2.5-VL config
builds transformers' Qwen2-VL text model (Qwen2 with multimodal RoPE) and an LM head, and
places the prompt as `ecache bench` does: 15 text tokens, a 672 x 672 picture's 24 x 24
merged cells at (15, 15 + row, 15 + column), the text after it from 15 + 24 on; the decode
steps continue from the largest position + 1. `--attn` lists the attention
implementations to time, one row each: by default transformers' default (`sdpa`) first and
`eager` second. `--compress F` also times decode after keeping only a fraction F of the
prompt's cache (the first and last slots), which shows how much a smaller cache alone
speeds transformers' decode.

`--matmul ROWS,...` instead times the decode projection `[rows, K] @ [K, N]` (`--k`,
`--n`; LLaVA-1.5-7B's MLP by default), torch's own product, to hold `ecache`'s skinny
product against (`cargo run --release -p ecache-model --example skinny_rate`).
"""
import argparse
import json
import os
import time

import types

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

SHAPES = os.path.join(os.path.dirname(__file__), "..", "crates", "ecache-cli", "shapes")
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


QWEN = ("qwen2_vl", "qwen2_5_vl")
QWEN_HEAD, QWEN_CELLS = 15, 24


def text_config(shape):
    """The decoder's config and whether it is Qwen2-VL's."""
    path = shape
    if not os.path.exists(path):
        path = os.path.join(SHAPES, f"{shape}.json")
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    config = json.load(open(path))
    if config.get("model_type") in QWEN:
        from transformers import Qwen2VLConfig

        # Qwen2.5-VL's decoder is Qwen2-VL's; its vision keys are not read here.
        config = dict(config, model_type="qwen2_vl", vision_config={})
        return Qwen2VLConfig.from_dict(config).text_config, True
    return LlamaConfig(**config.get("text_config", config)), False


class QwenDecoder(torch.nn.Module):
    """Qwen2-VL's text model and LM head (what `ecache bench` runs; no vision tower)."""

    def __init__(self, config):
        super().__init__()
        from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLTextModel

        self.config = config
        self.model = Qwen2VLTextModel(config)
        self.lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, input_ids, past_key_values, use_cache, position_ids, logits_to_keep=0, cache_position=None):
        hidden = self.model(input_ids=input_ids, past_key_values=past_key_values, use_cache=use_cache,
                            position_ids=position_ids, cache_position=cache_position).last_hidden_state
        return types.SimpleNamespace(logits=self.lm_head(hidden[:, -logits_to_keep:]))


def qwen_positions(batch, prompt_len, device):
    """[3, batch, prompt_len] multimodal positions of the bench's prompt layout."""
    rows = []
    for i in range(prompt_len):
        cell = i - QWEN_HEAD
        if 0 <= cell < QWEN_CELLS * QWEN_CELLS:
            r, c = divmod(cell, QWEN_CELLS)
            rows.append((QWEN_HEAD, QWEN_HEAD + r, QWEN_HEAD + c))
        else:
            after = max(0, cell - QWEN_CELLS * QWEN_CELLS)
            p = QWEN_HEAD + QWEN_CELLS + after if cell >= 0 else i
            rows.append((p, p, p))
    t = torch.tensor(rows, device=device).T
    return t[:, None, :].expand(3, batch, prompt_len)


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run(model, ids, gen_len, device, keep=None, positions=None):
    """Prefill, then gen_len greedy steps; returns (prefill s, decode s, kv bytes).
    `positions`: the prompt's [3, batch, T] multimodal positions (Qwen2-VL)."""
    sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        cache = DynamicCache()
        # As generate() does: the LM head only on the last position.
        extra = {} if positions is None else {"position_ids": positions}
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1, **extra)
        next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
        if keep is not None:
            # Keep `keep` prompt slots per layer: the first 4 and the most recent ones.
            for layer in cache.layers:
                for name in ("keys", "values"):
                    t = getattr(layer, name)
                    kept = torch.cat([t[:, :, :4], t[:, :, -(keep - 4):]], dim=2)
                    setattr(layer, name, kept.contiguous())
        next_ids.cpu()
        sync(device)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        position = ids.shape[1] if positions is None else int(positions.max()) + 1
        for _ in range(gen_len):
            step = torch.full((ids.shape[0], 1), position, device=ids.device)
            if positions is not None:
                step = step[None].expand(3, -1, -1)
            out = model(
                input_ids=next_ids,
                past_key_values=cache,
                position_ids=step,
                cache_position=torch.tensor([cache.get_seq_length()], device=ids.device),
                use_cache=True,
            )
            next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
            next_ids.cpu()
            position += 1
        sync(device)
        decode = time.perf_counter() - start
    kv = sum(l.keys.numel() * l.keys.element_size() * 2 for l in cache.layers)
    return prefill, decode, kv


def cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def matmul(a):
    """Times torch's [rows, k] @ [k, n] in f32 (and f16 and bf16 weights and inputs): the
    best of five rounds of eight calls after one, as `examples/skinny_rate` times ours."""
    print(f"torch {torch.__version__} on {cpu_name()} ({torch.get_num_threads()} threads)")
    print(f"| rows | [rows x {a.k}] @ [{a.k} x {a.n}] f32 ms | f16 ms | bf16 ms |")
    print("|---:|---:|---:|---:|")
    for rows in [int(r) for r in a.matmul.split(",")]:
        times = []
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            x = torch.randn(rows, a.k, dtype=dtype)
            w = torch.randn(a.k, a.n, dtype=dtype) * 0.02
            times.append(best_ms(lambda: x @ w, 8))
        print(f"| {rows} | {times[0]:.2f} | {times[1]:.2f} | {times[2]:.2f} |")


def best_ms(f, reps):
    """Milliseconds per call of f, the fastest of five rounds of reps calls."""
    f()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(reps):
            f()
        best = min(best, (time.perf_counter() - start) / reps * 1e3)
    return best


def parts(a):
    """One decoder layer's prefill part by part at llava-mid's shape, as the example
    `prefill_parts` of ecache-model times it (f32, 900 tokens)."""
    import torch.nn.functional as F

    t, hidden, heads, d, inter = 900, 1024, 16, 64, 2816
    x = torch.randn(1, t, hidden)
    gate = torch.randn(1, t, inter)
    q, k, v = (torch.randn(1, heads, t, d) for _ in range(3))
    proj = torch.nn.Linear(hidden, hidden, bias=False)
    up = torch.nn.Linear(hidden, inter, bias=False)
    down = torch.nn.Linear(inter, hidden, bias=False)
    norm = torch.nn.RMSNorm(hidden, eps=1e-5)
    rows = [
        ("q, k, v, o projections (GEMM)", best_ms(lambda: proj(x), 5), 4),
        ("gate, up projections (GEMM)", best_ms(lambda: up(x), 5), 2),
        ("down projection (GEMM)", best_ms(lambda: down(gate), 5), 1),
        ("causal attention (sdpa)", best_ms(
            lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.125), 5), 1),
        ("RMSNorm", best_ms(lambda: norm(x), 10), 2),
        ("SwiGLU", best_ms(lambda: F.silu(gate) * gate, 10), 1),
        ("residual add", best_ms(lambda: x + x, 10), 2),
        ("heads merged", best_ms(lambda: q.transpose(1, 2).reshape(1, t, heads * d), 10), 1),
    ]
    print(f"torch {torch.__version__} on {cpu_name()} ({torch.get_num_threads()} threads)")
    print("| part | ms each | per layer | ms per layer |")
    print("|---|---:|---:|---:|")
    total = 0.0
    for name, ms, n in rows:
        print(f"| {name} | {ms:.2f} | {n} | {ms * n:.2f} |")
        total += ms * n
    print(f"| sum | | | {total:.2f} |")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="llava-1.5-7b")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=900)
    p.add_argument("--gen-len", type=int, default=512)
    p.add_argument("--dtype", default="f32", choices=DTYPES)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--attn", default="sdpa,eager", help="comma list: sdpa (the default), eager")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--compress", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output")
    p.add_argument("--matmul", help="comma list of row counts: time [rows, k] @ [k, n] only")
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--n", type=int, default=11008)
    p.add_argument("--parts", action="store_true",
                   help="time one llava-mid layer's prefill part by part only")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.matmul:
        return matmul(a)
    if a.parts:
        return parts(a)
    torch.manual_seed(a.seed)
    config, qwen = text_config(a.shape)
    attentions = [x.strip() for x in a.attn.split(",") if x.strip()]
    config._attn_implementation = attentions[0]
    with torch.device(a.device):
        torch.set_default_dtype(DTYPES[a.dtype])
        model = (QwenDecoder(config) if qwen else LlamaForCausalLM(config)).eval()
    torch.set_default_dtype(torch.float32)
    ids = torch.randint(0, config.vocab_size, (a.batch, a.prompt_len), device=a.device)
    positions = qwen_positions(a.batch, a.prompt_len, a.device) if qwen else None
    rows = []
    for attention in attentions:
        # The layers read the implementation from the shared config at every forward.
        model.config._attn_implementation = attention
        for _ in range(a.warmup):
            run(model, ids, a.gen_len, a.device, positions=positions)
        for label, keep in [("full", None)] + (
            [(f"keep {a.compress}", max(8, int(a.prompt_len * a.compress)))] if a.compress else []
        ):
            prefill, decode, kv = run(model, ids, a.gen_len, a.device, keep, positions)
            rows.append(
                {
                    "policy": label,
                    "attention": attention,
                    "prefill_seconds": prefill,
                    "decode_seconds": decode,
                    "decode_tokens_per_second": a.batch * a.gen_len / decode,
                    "ms_per_step": decode * 1e3 / a.gen_len,
                    "kv_bytes_end": kv,
                }
            )
    report = {
        "engine": f"transformers {__import__('transformers').__version__}, torch {torch.__version__}",
        "shape": a.shape,
        "device": a.device,
        "threads": torch.get_num_threads(),
        "cpu": cpu_name(),
        "dtype": a.dtype,
        "batch": a.batch,
        "prompt_len": a.prompt_len,
        "gen_len": a.gen_len,
        "parameters": sum(t.numel() for t in model.parameters()),
        "rows": rows,
    }
    print(f"{report['engine']} on {a.device} ({report['threads']} threads), {a.shape} {a.dtype}")
    print("| policy | attention | prefill s | decode tok/s | ms/step | KV MiB at end |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['policy']} | {r['attention']} | {r['prefill_seconds']:.3f} "
            f"| {r['decode_tokens_per_second']:.2f} | {r['ms_per_step']:.2f} "
            f"| {r['kv_bytes_end'] / 1048576:.1f} |"
        )
    if a.output:
        tmp = a.output + ".tmp"
        json.dump(report, open(tmp, "w"), indent=2)
        os.replace(tmp, a.output)


if __name__ == "__main__":
    main()
