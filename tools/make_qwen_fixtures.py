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
"""

import json
import os
import shutil

import numpy as np
from safetensors.numpy import save_file
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from make_fixtures import ROOT, test_image

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


if __name__ == "__main__":
    build_images()
