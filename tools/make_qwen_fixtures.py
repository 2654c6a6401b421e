#!/usr/bin/env python3
"""Records what transformers computes for the Qwen2-VL family on small inputs.

Run by hand (not by CI): `python3 tools/make_qwen_fixtures.py` (needs torch, transformers,
safetensors, pillow; *not* torchvision: without it transformers uses its PIL image
processor, `Qwen2VLImageProcessorPil`, which is the one ecache follows).

tests/fixtures/qwen2-vl-images/: the image processor of Qwen2-VL (the same for Qwen2.5-VL)
on three pictures that take each branch of `smart_resize` (rounding to a multiple of
28; scaling down past `max_pixels`; scaling up past `min_pixels`), two of them not square:
preprocessor_config.json as transformers saves it, the pictures, and expected.safetensors
(`pixel_values_<name>`, the patch rows) with expected.json (the `image_grid_thw` of each).

tests/fixtures/tiny-qwen2-vl/: a tiny random Qwen2-VL checkpoint as transformers saves it
(config.json, model.safetensors; a 2-layer vision tower of width 32 with 4 heads, merged
into a 2-layer GQA decoder of width 64) and expected.safetensors with the image features
(`features_<name>`: the merger's output) of the three pictures above, the logits of a
prompt with the wide picture and of three tokens after it (expected.json: the ids), the
answer's PPL under each policy at budget 0.5 by the spec implementation below, and a
word-level tokenizer with Qwen2-VL's special tokens and chat template (expected_prompt.json:
what transformers renders and encodes for one question about the wide picture).

tests/fixtures/tiny-qwen2.5-vl/: the same for Qwen2.5-VL (RMSNorm and gated-MLP vision
blocks; window attention over 3 x 3 merge groups, which the 2 x 4 merged grid of the wide
picture pads, with block 1 attending to the whole picture).
"""

import json
import math
import os
import shutil

import numpy as np
import torch
from PIL import Image
from safetensors.numpy import save_file
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from make_fixtures import ROOT, SNAPKV, WORDS_A, spec_teacher_forced, test_image

IMAGES = {"wide": (100, 60, 3), "large": (200, 120, 4), "small": (40, 40, 5)}


def build_images():
    out = os.path.join(ROOT, "qwen2-vl-images")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=28 * 28 * 12)
    processor.save_pretrained(out)
    tensors, grids = {}, {}
    for name, (w, h, seed) in IMAGES.items():
        image = test_image(w, h, seed)
        image.save(os.path.join(out, f"{name}.png"))
        batch = processor(images=image, return_tensors="np")
        tensors[f"pixel_values_{name}"] = np.ascontiguousarray(batch["pixel_values"], dtype=np.float32)
        grids[name] = batch["image_grid_thw"][0].tolist()
    save_file(tensors, os.path.join(out, "expected.safetensors"))
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump({"image_grid_thw": grids, "transformers": __import__("transformers").__version__}, f, indent=1)
    print("qwen2-vl-images", grids, {k: v.shape for k, v in tensors.items()})


def randomise(model, seed):
    """Random weights with visible scale; norms (LayerNorm, RMSNorm, the merger's ln_q)
    near 1, biases small."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm = "norm" in name or ".ln_" in name
            if p.dim() == 1 and is_norm and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * (torch.rand(p.shape, generator=g) - 0.5))
            elif p.dim() == 1:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            else:
                fan_in = int(np.prod(p.shape[1:]))
                p.copy_(torch.randn(p.shape, generator=g) * (1.5 / math.sqrt(fan_in)))


def spec_answer_nll(model, pixel_values, grid, prompt_ids, answer_ids, policy, budget):
    """make_fixtures.py's spec implementation on a Qwen model: the prompt with the image's
    features in place of its pad tokens, every token rotated at transformers' multimodal
    positions for the whole sequence (`get_rope_index`)."""
    lm = model.model.language_model
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values, grid).pooler_output
        if isinstance(feats, (list, tuple)):
            feats = torch.cat(list(feats), 0)
        ids = torch.tensor([prompt_ids + answer_ids])
        positions, _ = model.model.get_rope_index(ids, (ids == 60).long(), grid)
        prompt = lm.embed_tokens(torch.tensor(prompt_ids)).clone()
        prompt[torch.tensor(prompt_ids) == 60] = feats

    def rotary(x, lo, hi):
        return lm.rotary_emb(x, positions[:, :, lo:hi])

    return spec_teacher_forced(model, prompt[None], answer_ids, rotary, policy, budget)


# Qwen2-VL's published chat template (the image and video parts; `add_vision_id` off).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer():
    """A word-level tokenizer over the tiny model's 64 ids with Qwen2-VL's special tokens
    where the model's config puts them (image pad 60, video pad 61, vision start 62 and
    end 63) and ChatML's (<|im_start|>, <|im_end|>); newlines and spaces are tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers

    special = ["<unk>", "<|endoftext|>", "<|im_end|>", "<|im_start|>"]
    words = ["\n", " ", "system", "user", "assistant", "You", "helpful", ":"] + WORDS_A
    vocab_list = special + words
    vocab_list += [f"<unused{i}>" for i in range(60 - len(vocab_list))]
    vocab_list += ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]
    vocab = {t: i for i, t in enumerate(vocab_list)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n| |\w+|[^\w\s]"), behavior="isolated")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in
                            ["<|endoftext|>", "<|im_end|>", "<|im_start|>", "<|image_pad|>", "<|video_pad|>",
                             "<|vision_start|>", "<|vision_end|>"]])
    return tok


def build_prompt(out):
    """tokenizer.json, the chat template, and what transformers makes of one question about
    the wide picture (expected_prompt.json: the rendered text and ids): the tokenizer's
    `apply_chat_template`, then the image pad expanded to the image's tokens as
    `Qwen2VLProcessor.__call__` does (the processor itself wants torchvision for its video
    part, which this script avoids), then the tokenizer."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=make_tokenizer(), unk_token="<unk>", eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE)
    tok.save_pretrained(out)
    images = os.path.join(ROOT, "qwen2-vl-images")
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(images)
    question = "what is the colour of the circle ?"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    grid = image_processor(images=Image.open(os.path.join(images, "wide.png")), return_tensors="np")["image_grid_thw"][0]
    tokens = int(np.prod(grid)) // image_processor.merge_size ** 2
    expanded = text.replace("<|image_pad|>", "<|placeholder|>" * tokens, 1).replace("<|placeholder|>", "<|image_pad|>")
    with open(os.path.join(out, "expected_prompt.json"), "w") as f:
        json.dump({"question": question, "text": text, "input_ids": tok(expanded)["input_ids"], "image": "wide"}, f,
                  indent=1)


# Conversations for the chat template (OpenAI-style parts; an image part stands for a
# picture): a system turn, a picture between texts, an assistant answer, a follow-up; a
# text-only question; a picture after the question.
CHATS = [
    [{"role": "system", "content": [{"type": "text", "text": "describe the picture ."}]},
     {"role": "user", "content": [{"type": "text", "text": "in this image :"}, {"type": "image"},
                                  {"type": "text", "text": "what is the colour of the circle ?"}]},
     {"role": "assistant", "content": [{"type": "text", "text": "red ."}]},
     {"role": "user", "content": [{"type": "text", "text": "and the square ?"}]}],
    [{"role": "user", "content": [{"type": "text", "text": "what is a circle ?"}]}],
    [{"role": "user", "content": [{"type": "text", "text": "describe"}, {"type": "image"}]}],
]
SCORED = {"question": "what is the colour of the circle ?", "answer": "there are two red circle and a blue square ."}


def build_chat(out, model, processor, images):
    """expected_chat.json: how the chat template renders CHATS, and the NLL of each token
    of SCORED's answer after the chat prompt with the wide picture, by transformers with the
    whole cache: the engine's score task must reproduce it from the question text, the
    picture's PNG and the answer text."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(out)
    chats = [{"messages": m, "text": tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False)}
             for m in CHATS]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": SCORED["question"]}]}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    batch = processor(images=Image.open(os.path.join(images, "wide.png")), return_tensors="pt")
    tokens = int(batch["image_grid_thw"][0].prod()) // processor.merge_size ** 2
    prompt = tok(text.replace("<|image_pad|>", "<|image_pad|>" * tokens), add_special_tokens=False)["input_ids"]
    answer = tok(SCORED["answer"], add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in answer
    ids = torch.tensor([prompt + answer])
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                       mm_token_type_ids=(ids == 60).long()).logits[0].double().log_softmax(-1)
    nll = [-float(logits[len(prompt) - 1 + i, a]) for i, a in enumerate(answer)]
    with open(os.path.join(out, "expected_chat.json"), "w") as f:
        json.dump({"chats": chats, "scored": dict(SCORED, image="wide", prompt_ids=prompt, answer_ids=answer,
                                                  nll=nll)}, f, indent=1)


def build_model(name, config_class, model_class, vision, seed):
    images = os.path.join(ROOT, "qwen2-vl-images")
    out = os.path.join(ROOT, name)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    config = config_class(
        vision_config=vision,
        text_config=dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}),
        image_token_id=60, video_token_id=61, vision_start_token_id=62, vision_end_token_id=63,
    )
    torch.manual_seed(seed)
    model = model_class(config).eval()
    randomise(model, seed)
    model.save_pretrained(out)
    build_prompt(out)
    processor = Qwen2VLImageProcessorPil.from_pretrained(images)
    processor.save_pretrained(out)
    tensors = {}
    with torch.no_grad():
        for picture in IMAGES:
            batch = processor(images=Image.open(os.path.join(images, f"{picture}.png")), return_tensors="pt")
            feats = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output
            if isinstance(feats, (list, tuple)):
                feats = torch.cat(list(feats), 0)
            tensors[f"features_{picture}"] = feats.float().contiguous().numpy()
        # A prompt with the wide picture (its 2 x 4 merged tokens between the vision start
        # and end tokens), then three more tokens fed one at a time: every position's logits
        # with transformers' multimodal positions (text after the image continues from the
        # largest image position + 1).
        batch = processor(images=Image.open(os.path.join(images, "wide.png")), return_tensors="pt")
        prompt = [1, 5, 7, 62] + [60] * 8 + [63, 9, 11, 13]
        continuation = [20, 21, 22]
        ids = torch.tensor([prompt + continuation])
        mm = (ids == 60).long()
        logits = model(input_ids=ids, pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                       mm_token_type_ids=mm).logits[0]
        positions, delta = model.model.get_rope_index(ids, mm, batch["image_grid_thw"])
        # Greedy decoding after the prompt, transformers' generate() (8 tokens, no early end).
        prompt_ids = torch.tensor([prompt])
        greedy = model.generate(input_ids=prompt_ids, pixel_values=batch["pixel_values"],
                                image_grid_thw=batch["image_grid_thw"], mm_token_type_ids=(prompt_ids == 60).long(),
                                max_new_tokens=8, min_new_tokens=8, do_sample=False)[0, len(prompt):].tolist()
        tensors["logits"] = logits.float().contiguous().numpy()
        tensors["position_ids"] = positions[:, 0].numpy().astype(np.int64)
        # Policies at budget 0.5 by the independent spec implementation: the answer's PPL.
        answer = [20, 21, 22, 23, 24, 25, 26, 27]
        full = spec_answer_nll(model, batch["pixel_values"], batch["image_grid_thw"], prompt, answer, "local", 1.0)
        all_ids = torch.tensor([prompt + answer])
        ref = model(input_ids=all_ids, pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                    mm_token_type_ids=(all_ids == 60).long()).logits[0].double().log_softmax(-1)
        ref_nll = [-float(ref[len(prompt) - 1 + i, a]) for i, a in enumerate(answer)]
        assert max(abs(a - b) for a, b in zip(full, ref_nll)) < 1e-4, "spec model disagrees at budget 1"
        policy_ppl = {
            p: math.exp(np.mean(spec_answer_nll(model, batch["pixel_values"], batch["image_grid_thw"],
                                                prompt, answer, p, 0.5)))
            for p in ("local", "h2o", "elastic", "snapkv")
        }
    build_chat(out, model, processor, images)
    save_file(tensors, os.path.join(out, "expected.safetensors"))
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump({"prompt_ids": prompt, "continuation_ids": continuation, "greedy_ids": greedy, "image": "wide",
                   "rope_delta": int(delta[0, 0]), "answer_ids": answer, "ppl": math.exp(np.mean(ref_nll)),
                   "policy_budget": 0.5, "policy_ppl": policy_ppl, "snapkv_params": SNAPKV,
                   "transformers": __import__("transformers").__version__}, f, indent=1)
    print(name, {k: v.shape for k, v in tensors.items()})


if __name__ == "__main__":
    build_images()
    build_model(
        "tiny-qwen2-vl", Qwen2VLConfig, Qwen2VLForConditionalGeneration,
        dict(depth=2, embed_dim=32, num_heads=4, mlp_ratio=2, hidden_size=64, patch_size=14,
             spatial_merge_size=2, temporal_patch_size=2, hidden_act="quick_gelu", in_channels=3),
        7,
    )
    build_model(
        "tiny-qwen2.5-vl", Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
        dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64, window_size=84,
             fullatt_block_indexes=[1], hidden_act="silu", patch_size=14, spatial_merge_size=2,
             temporal_patch_size=2, in_channels=3),
        8,
    )
