#!/usr/bin/env python3
"""Write a VIST2 model directory with *untrained* (random, seeded) vision weights on the
SmolLM2-135M backbone.

    python3 Training/make_untrained.py OUT_DIR [WIDTH HEIGHT PIXEL_SIZE LINE_HEIGHT [MERGE]]
    python3 Training/make_untrained.py OUT_DIR --config CONFIG.json

With --config, the geometry and vision sizes of a given model config (Training/run.sh uses this
with Training/configs/vist2-smollm2-135m-flow.json, the trained default model's, because
`vist2ctl dataset` needs a model directory for the chunker and renderer).

For efficiency benchmarks and for checking the renderer/chunker geometry on real documents
before the trained weights exist (issue 5): the costs (KV bytes, FLOPs, time to first token)
do not depend on the weights; the generated text does. Not committed; scripts/bench-vist2.sh
makes it on demand.

Without --config, the geometry of issue 3's benchmarks (the trained default model reads a
480x480 canvas of 10 px glyphs with merge 3 instead; see its model card): a 320x320 canvas of DejaVu Sans Mono at 7 px
with 8 px lines (39 rows of ~79 columns), 16x16 patches (20x20 = 400), merge 2 -> m = 100 visual
tokens per chunk, ratio 4 -> L = 400 text tokens per chunk. Chosen by measurement on Debian's
license texts (GPL-3 + Apache-2.0 + LGPL-2.1, 15.7k tokens): 448x224 at 8/9 px gave a ratio of
2.47 (24 rows bind long before 392 tokens), 384x256 at 7/8 px 3.28, 320x320 at 7/8 px 3.58, with
one-line edits changing 1-2 chunks. ViT: 4 layers, width 192, 3 heads, MLP 768 (~1.8M
parameters, 7 MB in f32).
"""
import json
import os
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vist2.model import Aligner, VisionConfig, VisionEncoder, VIST2  # noqa: E402

FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf"
FONT_SHA = "0f5db4f1749979d961019838b160bec74abdf7f9eca69553fe1aa856bbff49a4"


def main():
    out = sys.argv[1]
    if len(sys.argv) == 4 and sys.argv[2] == "--config":
        # A given model config (geometry and vision sizes), e.g. Training/configs/*.json.
        with open(sys.argv[3]) as f:
            cfg = json.load(f)
        write(out, cfg)
        return
    # Optional geometry for experiments: WIDTH HEIGHT PIXEL_SIZE LINE_HEIGHT [MERGE].
    width, height, pixel_size, line_height = (int(a) for a in sys.argv[2:6]) if len(sys.argv) >= 6 else (320, 320, 7, 8)
    merge = int(sys.argv[6]) if len(sys.argv) >= 7 else 2
    os.makedirs(out, exist_ok=True)
    vision = {"image_height": height, "image_width": width, "patch_size": 16, "num_channels": 1, "hidden_size": 192,
              "num_layers": 4, "num_heads": 3, "intermediate_size": 768, "layer_norm_eps": 1e-6}
    m = (height // 16) * (width // 16) // merge ** 2
    cfg = {"format_version": 1, "model_type": "vist2", "backbone": "smollm2-135m", "vision": vision,
           "aligner": {"merge": merge},
           "render": {"font": FONT, "font_sha256": FONT_SHA, "pixel_size": pixel_size, "line_height": line_height,
                      "width": width, "height": height, "margin": 2, "tab_width": 4},
           "chunk": {"length": 4 * m, "ratio": 4}}
    write(out, cfg)


def write(out, cfg):
    os.makedirs(out, exist_ok=True)
    vision, merge = cfg["vision"], cfg["aligner"]["merge"]
    width, height = vision["image_width"], vision["image_height"]
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    gen = torch.Generator().manual_seed(1)
    holder = VIST2.__new__(VIST2)
    torch.nn.Module.__init__(holder)
    holder.vision = VisionEncoder(VisionConfig(**vision))
    holder.aligner = Aligner(vision["hidden_size"], 576, merge, height // 16, width // 16)
    with torch.no_grad():
        for name, p in list(holder.vision.named_parameters()) + list(holder.aligner.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            if "layer_norm" in name and name.endswith("weight"):
                p.add_(1.0)
    save_file({k: v.detach().contiguous() for k, v in holder.vision_state_dict().items()}, os.path.join(out, "vision.safetensors"))
    print(out)


if __name__ == "__main__":
    main()
