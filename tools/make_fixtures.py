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
                "last_logit_gap": float(top2[0] - top2[1]),
                "transformers": __import__("transformers").__version__,
                "torch": torch.__version__,
            },
            f,
            indent=1,
        )
    print(name, "T =", len(expanded), "greedy:", tok.decode(greedy), "ppl =", round(ppl, 4))


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
