#!/usr/bin/env python3
"""Write a LoRA adapter (Hugging Face PEFT layout) for a backbone, and optionally a copy of a VIST2
model directory that uses it.

    python3 Training/make_adapter.py --backbone WORK/backbone --rank 32 --out ADAPTER_DIR \\
        [--std 0.02] [--targets q_proj,v_proj] [--dtype bfloat16] [--model-dir weights/vist2-smollm2-135m --scope all --model-out DIR]

The backbone is a Hugging Face directory (`vist2ctl export-backbone --model smollm2-135m DIR`).
New adapters start as PEFT starts them (B = 0: the model is unchanged). With --std the B factors
are random instead: a stand-in of a trained adapter's size and cost, for benchmarks and tests.
"""
import argparse
import json
import os
import shutil
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vist2.lora import SCOPES, TARGETS, LoRA  # noqa: E402
from vist2.model import Backbone  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", required=True, help="Hugging Face backbone directory")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--alpha", type=float, default=None, help="lora_alpha (default: 2 x rank)")
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--std", type=float, default=0.0, help="random B factors with this standard deviation")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="type of the saved factors")
    ap.add_argument("--out", required=True, help="adapter directory to write")
    ap.add_argument("--model-dir", help="a VIST2 model directory to copy with the adapter")
    ap.add_argument("--scope", choices=SCOPES, default="visual")
    ap.add_argument("--model-out", help="where the copy goes")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    bb = Backbone(args.backbone)
    targets = [t for t in args.targets.split(",") if t]
    lora = LoRA(bb, args.rank, args.alpha or 2 * args.rank, targets)
    if args.std > 0:
        with torch.no_grad():
            for p in lora.B.values():
                p.normal_(0, args.std)
    lora.save(args.out, base_model=os.path.abspath(args.backbone), dtype=getattr(torch, args.dtype))
    n = sum(p.numel() for p in lora.parameters())
    print(f"wrote {args.out}: rank {args.rank}, {len(lora.targets)} modules x {len(lora.layers)} layers, {n} parameters")
    if args.model_dir:
        if not args.model_out:
            sys.exit("--model-dir needs --model-out")
        shutil.copytree(args.model_dir, args.model_out)
        shutil.copytree(args.out, os.path.join(args.model_out, "adapter"))
        with open(os.path.join(args.model_out, "config.json")) as f:
            cfg = json.load(f)
        cfg["adapter"] = {"path": "adapter", "scope": args.scope}
        with open(os.path.join(args.model_out, "config.json"), "w") as f:
            json.dump(cfg, f, indent=1)
        print(f"wrote {args.model_out}: {args.model_dir} with the adapter, scope {args.scope}")


if __name__ == "__main__":
    main()
