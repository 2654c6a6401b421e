#!/usr/bin/env python3
"""Builds tiny random LLaVA checkpoints and records what transformers computes on them.

Run by hand (not by CI): `python3 tools/make_fixtures.py` (needs torch, transformers,
tokenizers, safetensors, pillow). Writes tests/fixtures/<name>/ with a Hugging Face model
directory (config.json, weights, tokenizer.json, preprocessor_config.json), a test image,
and the reference outputs (expected.json, expected.safetensors).

Two fixtures differ on purpose:
- tiny-llava-mha: multi-head attention, 56-pixel images (16 patches), feature layer -2,
  one model.safetensors with the key names transformers 5 writes (model.language_model...).
- tiny-llava-gqa: grouped-query attention (4 query, 2 KV heads), 42-pixel images
  (9 patches), feature layer -1, a different vocabulary and rope_theta, sharded weights
  with an index and the key names of the published llava-hf checkpoints
  (language_model.model..., vision_tower..., multi_modal_projector...).
"""

import json
import math
import os
import re
import shutil

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
SPECIAL = ["<unk>", "<s>", "</s>", "<image>", "USER:", "ASSISTANT:"]
WORDS_A = (
    "what is the colour of shape in this image a an red green blue yellow circle square "
    "triangle left right top bottom there are two three one four describe picture small large "
    "and on at near it has ? . ,"
).split()
WORDS_B = WORDS_A[:30] + "purple orange star ring many few how where which object objects ? .".split()


def make_tokenizer(words):
    vocab = {tok: i for i, tok in enumerate(SPECIAL + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Split(Regex(r"USER:|ASSISTANT:|<image>|\w+|[^\w\s]"), behavior="isolated"),
        ]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return tok, vocab


def randomise(model, seed):
    """Random weights with visible scale, norms away from 1, biases away from 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in name or "layernorm" in name) and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * (torch.rand(p.shape, generator=g) - 0.5))
            elif p.dim() == 1:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[1] if p.dim() == 2 else int(np.prod(p.shape[1:]))
                p.copy_(torch.randn(p.shape, generator=g) * (1.5 / math.sqrt(fan_in)))


def test_image(width, height, seed):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], -1)
    noise = rng.integers(0, 40, size=base.shape)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


def legacy_names(state):
    """Key names of the published llava-hf checkpoints."""
    out = {}
    for k, v in state.items():
        k = re.sub(r"^model\.language_model\.", "language_model.model.", k)
        k = re.sub(r"^lm_head\.", "language_model.lm_head.", k)
        k = re.sub(r"^model\.vision_tower\.", "vision_tower.vision_model.", k)
        k = re.sub(r"^model\.multi_modal_projector\.", "multi_modal_projector.", k)
        out[k] = v.contiguous()
    return out


def save_sharded(state, out_dir, shards):
    names = sorted(state)
    per = math.ceil(len(names) / shards)
    weight_map = {}
    total = 0
    for i in range(shards):
        part = {n: state[n] for n in names[i * per : (i + 1) * per]}
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, os.path.join(out_dir, fname), metadata={"format": "pt"})
        for n, t in part.items():
            weight_map[n] = fname
            total += t.numel() * t.element_size()
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


# ---------------------------------------------------------------------------------------
# A straightforward implementation of the cache policies of the project's spec, written
# against transformers' modules, to check the Rust engine's policies end to end.

def target(budget, n, sinks=1, tail=1):
    return max(sinks + tail + 1, math.floor(budget * n + 1e-9))


# SnapKV's parameters in the fixtures: a window shorter than the tiny prompts' budget, so
# that the pooled selection (not only the window) decides what is kept.
SNAPKV = {"window": 4, "kernel": 5, "sinks": 0}


def snapkv_prefill(budget, rows, keys_len, window, kernel, sinks):
    """SnapKV at prefill from the head-mean causal attention rows (all T of them)."""
    tg = target(budget, keys_len, sinks, 0)
    if keys_len <= tg:
        return list(range(keys_len))
    wp = min(window, tg - sinks)
    prefix = keys_len - wp
    w = [sum(rows[i][j] for i in range(keys_len - wp, keys_len)) / wp for j in range(prefix)]
    half = kernel // 2
    p = [sum(w[j + d] for d in range(-half, half + 1) if 0 <= j + d < prefix) / kernel for j in range(prefix)]
    k = tg - sinks - wp
    best = sorted(sorted(range(sinks, prefix), key=lambda j: (-p[j], j))[:k])
    return list(range(sinks)) + best + list(range(prefix, keys_len))


def decide(policy, budget, phase, keys_len, scores, n, prompt_len, sinks=1, tail=1, offset=24, rf=0.5, rows=None):
    """Returns (keep, merges) on slot indices; merges maps anchor index -> member indices."""
    if policy == "snapkv":
        if phase != "prefill":
            return list(range(keys_len)), {}
        return snapkv_prefill(budget, rows, keys_len, SNAPKV["window"], SNAPKV["kernel"], SNAPKV["sinks"]), {}
    tg = target(budget, n, sinks, tail)
    if keys_len <= tg:
        return list(range(keys_len)), {}
    if policy == "local":
        return list(range(sinks)) + list(range(keys_len - (tg - sinks), keys_len)), {}
    if policy == "h2o":
        kept = list(range(keys_len))
        while len(kept) > tg:
            recent = min(max(tail, math.floor(rf * tg + 0.5)), tg - sinks)
            window = range(sinks, len(kept) - recent)
            victim = min(window, key=lambda i: (scores[kept[i]], i))
            kept.pop(victim)
        return kept, {}
    if policy == "elastic":
        if phase == "prefill":
            cands = list(range(sinks, keys_len - tail))
            k = tg - sinks - tail
            anchors = sorted(sorted(cands, key=lambda j: (-scores[j], j))[:k])
            merges = {a: [] for a in anchors}
            for j in cands:
                if j in merges:
                    continue
                best = min(anchors, key=lambda a: (abs(a - j), a))
                merges[best].append(j)
            keep = list(range(sinks)) + anchors + list(range(keys_len - tail, keys_len))
            return keep, merges
        l0 = min(prompt_len, target(budget, prompt_len, sinks, tail))
        p = max(sinks, l0 - offset)
        excess = keys_len - tg
        start = min(p, keys_len - excess)
        return list(range(start)) + list(range(start + excess, keys_len)), {}
    raise ValueError(policy)


def spec_teacher_forced(model, prompt, answer_ids, rotary, policy, budget):
    """The answer's NLL, teacher-forced, with the policy's `decide` applied after every
    layer of every step, written out over the model's own modules (LLaMA and Qwen2 alike).
    `prompt` is the embedded prompt `[1, T, hidden]`; `rotary(x, lo, hi)` gives the cos and
    sin of tokens `lo..hi`."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    lm = model.model.language_model
    cfg = lm.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = cfg.hidden_size // heads if getattr(cfg, "head_dim", None) is None else cfg.head_dim
    with torch.no_grad():
        layers = lm.layers
        cache = [{"k": None, "v": None, "score": None} for _ in layers]
        prompt_len = prompt.shape[1]

        def forward(x, lo, phase, n_after):
            t = x.shape[1]
            cos, sin = rotary(x, lo, lo + t)
            for li, layer in enumerate(layers):
                c = cache[li]
                h = layer.input_layernorm(x)
                a = layer.self_attn
                q = a.q_proj(h).view(1, t, heads, hd).transpose(1, 2)
                k = a.k_proj(h).view(1, t, kv_heads, hd).transpose(1, 2)
                v = a.v_proj(h).view(1, t, kv_heads, hd).transpose(1, 2)
                q, k = apply_rotary_pos_emb(q, k, cos, sin)
                c["k"] = k if c["k"] is None else torch.cat([c["k"], k], 2)
                c["v"] = v if c["v"] is None else torch.cat([c["v"], v], 2)
                rep = heads // kv_heads
                kk = c["k"].repeat_interleave(rep, 1)
                vv = c["v"].repeat_interleave(rep, 1)
                s = kk.shape[2]
                logits = (q @ kk.transpose(2, 3)) * hd ** -0.5
                first = s - t
                mask = torch.tensor([[j > first + i for j in range(s)] for i in range(t)])
                probs = torch.softmax(logits.masked_fill(mask, float("-inf")), -1)
                col = probs.mean(1)[0].sum(0)
                old = c["score"] if c["score"] is not None else torch.zeros(0)
                c["score"] = torch.cat([old, torch.zeros(s - old.shape[0])])
                if policy in ("h2o", "elastic") and (phase == "prefill" or policy == "h2o"):
                    c["score"] = c["score"] + col
                out = (probs @ vv).transpose(1, 2).reshape(1, t, heads * hd)
                x = x + a.o_proj(out)
                x = x + layer.mlp(layer.post_attention_layernorm(x))
                scores = c["score"].tolist()
                rows = probs.mean(1)[0].tolist() if phase == "prefill" else None
                keep, merges = decide(policy, budget, phase, s, scores, n_after, prompt_len, rows=rows)
                newk, newv, news = [], [], []
                for i in keep:
                    members = [i] + merges.get(i, [])
                    newk.append(c["k"][:, :, members].mean(2))
                    newv.append(c["v"][:, :, members].mean(2))
                    news.append(sum(scores[m] for m in members))
                c["k"], c["v"] = torch.stack(newk, 2), torch.stack(newv, 2)
                c["score"] = torch.tensor(news)
            return model.lm_head(lm.norm(x))[0, -1]

        row = forward(prompt, 0, "prefill", prompt_len)
        nll = []
        for i, a in enumerate(answer_ids):
            nll.append(-float(torch.log_softmax(row.double(), -1)[a]))
            if i + 1 < len(answer_ids):
                n = prompt_len + i
                row = forward(lm.embed_tokens(torch.tensor([[a]])), n, "decode", n + 1)
        return nll


def spec_answer_nll(model, pixel_values, expanded, answer_ids, feature_layer, policy, budget):
    """LLaVA: the image's features in place of its tokens, RoPE at the token index."""
    lm = model.model.language_model
    with torch.no_grad():
        feats = model.model.get_image_features(
            pixel_values, vision_feature_layer=feature_layer, vision_feature_select_strategy="default"
        ).pooler_output[0]
        image_id = model.config.image_token_index
        at = expanded.index(image_id)
        n_img = feats.shape[0]
        emb = lm.embed_tokens
        prompt = torch.cat([emb(torch.tensor(expanded[:at])), feats, emb(torch.tensor(expanded[at + n_img:]))])[None]

    def rotary(x, lo, hi):
        return lm.rotary_emb(x, torch.tensor([list(range(lo, hi))]))

    return spec_teacher_forced(model, prompt, answer_ids, rotary, policy, budget)


def build(name, words, vision, text, feature_layer, image_px, image_wh, seed, legacy):
    out = os.path.join(ROOT, name)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    tok, vocab = make_tokenizer(words)
    tok.save(os.path.join(out, "tokenizer.json"))
    torch.manual_seed(seed)
    patches = (image_px // vision["patch_size"]) ** 2
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=image_px, hidden_act="quick_gelu", **vision),
        text_config=LlamaConfig(
            vocab_size=len(vocab),
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
            tie_word_embeddings=False,
            **text,
        ),
        image_token_index=vocab["<image>"],
        image_seq_length=patches,
        vision_feature_layer=feature_layer,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    model = LlavaForConditionalGeneration(config).eval()
    randomise(model, seed)
    model.config.architectures = ["LlavaForConditionalGeneration"]

    processor = CLIPImageProcessor(
        size={"shortest_edge": image_px},
        crop_size={"height": image_px, "width": image_px},
        resample=3,
        do_center_crop=True,
        do_normalize=True,
        do_rescale=True,
        do_convert_rgb=True,
    )
    processor.save_pretrained(out)
    image = test_image(*image_wh, seed)
    image.save(os.path.join(out, "image.png"))
    pixel_values = processor(images=image, return_tensors="pt")["pixel_values"].float()

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if legacy:
        model.config.save_pretrained(out)
        save_sharded(legacy_names(state), out, shards=3)
    else:
        model.config.save_pretrained(out)
        save_file(state, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})

    question = "what is the colour of the circle ?" if name.endswith("mha") else "how many objects are there ?"
    answer = "the circle is red and it is at the top left ." if name.endswith("mha") else "there are three objects ."
    prompt = f"USER: <image>\n{question} ASSISTANT:"
    prompt_ids = tok.encode(prompt).ids
    answer_ids = tok.encode(answer, add_special_tokens=False).ids
    image_id = vocab["<image>"]
    assert prompt_ids.count(image_id) == 1 and vocab["<unk>"] not in prompt_ids + answer_ids
    at = prompt_ids.index(image_id)
    expanded = prompt_ids[:at] + [image_id] * patches + prompt_ids[at + 1 :]

    with torch.no_grad():
        feats = model.model.get_image_features(
            pixel_values,
            vision_feature_layer=feature_layer,
            vision_feature_select_strategy="default",
        ).pooler_output[0]
        ids = torch.tensor([expanded])
        prompt_logits = model(input_ids=ids, pixel_values=pixel_values).logits[0]
        # Greedy reference: a full forward per token, no cache, EOS not treated specially.
        greedy = []
        cur = ids
        for _ in range(16):
            nxt = int(model(input_ids=cur, pixel_values=pixel_values).logits[0, -1].argmax())
            greedy.append(nxt)
            cur = torch.cat([cur, torch.tensor([[nxt]])], 1)
        full = torch.tensor([expanded + answer_ids])
        logits = model(input_ids=full, pixel_values=pixel_values).logits[0].double()
        logp = torch.log_softmax(logits, -1)
        t = len(expanded)
        nll = [-float(logp[t - 1 + i, a]) for i, a in enumerate(answer_ids)]
        ppl = math.exp(sum(nll) / len(nll))
        spec_nll = {"full": spec_answer_nll(model, pixel_values, expanded, answer_ids, feature_layer, "local", 1.0)}
        for policy in ("elastic", "h2o", "local", "snapkv"):
            spec_nll[policy] = spec_answer_nll(model, pixel_values, expanded, answer_ids, feature_layer, policy, 0.5)
        assert abs(math.exp(sum(spec_nll["full"]) / len(nll)) - ppl) / ppl < 1e-4, "spec model disagrees at budget 1"
        policy_ppl = {p: math.exp(sum(v) / len(v)) for p, v in spec_nll.items() if p != "full"}

    save_file(
        {
            "pixel_values": pixel_values.contiguous(),
            "image_features": feats.contiguous(),
            "prompt_logits": prompt_logits.contiguous(),
        },
        os.path.join(out, "expected.safetensors"),
    )
    top2 = torch.topk(prompt_logits[-1], 2).values
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump(
            {
                "prompt": prompt,
                "question": question,
                "answer": answer,
                "prompt_ids": prompt_ids,
                "expanded_ids": expanded,
                "image_tokens": patches,
                "answer_ids": answer_ids,
                "greedy_ids": greedy,
                "greedy_text": tok.decode(greedy),
                "answer_nll": nll,
                "ppl": ppl,
                "policy_budget": 0.5,
                "policy_ppl": policy_ppl,
                "snapkv_params": SNAPKV,
                "last_logit_gap": float(top2[0] - top2[1]),
                "transformers": __import__("transformers").__version__,
                "torch": torch.__version__,
            },
            f,
            indent=1,
        )
    print(name, "T =", len(expanded), "greedy:", tok.decode(greedy), "ppl =", round(ppl, 4), policy_ppl)


def main():
    build(
        "tiny-llava-mha",
        WORDS_A,
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                    patch_size=14, projection_dim=32, layer_norm_eps=1e-5),
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0),
        feature_layer=-2,
        image_px=56,
        image_wh=(64, 48),
        seed=1,
        legacy=False,
    )
    build(
        "tiny-llava-gqa",
        WORDS_B,
        vision=dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                    patch_size=14, projection_dim=24, layer_norm_eps=1e-5),
        text=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=500000.0),
        feature_layer=-1,
        image_px=42,
        image_wh=(40, 60),
        seed=2,
        legacy=True,
    )


if __name__ == "__main__":
    main()
