#!/usr/bin/env python3
"""How much can the frozen backbone read from m visual tokens at all? For a few held-out chunks,
optimise m free vectors per chunk (v = tanh(z), no encoder) for the OCR loss of the training
code (the same sequence, mask and positions as Training/train.py), then measure how many of
the chunk's tokens are the backbone's most likely next token given them (teacher-forced; at
1.0 greedy transcription is exact). An upper bound on what any encoder could hand the
backbone through this interface: if free vectors cannot be read, no vision encoder's can.

    python3 Training/capacity.py --backbone WORK/backbone --data WORK/ds-heldout --ocr-ids 1,2 \
        [--chunks 2] [--steps 150] [--tokens 400] [--causal]
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train  # noqa: E402
from vist2.data import Dataset  # noqa: E402
from vist2.model import Backbone  # noqa: E402


@torch.no_grad()
def argmax_accuracy(bb, ocr_ids, v, text, m, causal):
    """Teacher-forced: the fraction of positions whose most likely token is the chunk's. At 1.0
    greedy decoding reproduces the chunk exactly (by induction over the positions)."""
    x, pos, allowed, rows = train.build(bb, ocr_ids, [v], text, m, causal)
    h = bb.hidden(x[None], pos[None], allowed[None])[0]
    pred = (h[rows] @ bb.embed.weight.T).argmax(-1)
    return (pred == torch.as_tensor(text)).float().mean().item()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--ocr-ids", required=True, help="token ids of the OCR prompt, comma-separated")
    ap.add_argument("--chunks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--tokens", type=int, default=400, help="transcribe at most this many tokens of each chunk")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--causal", action="store_true", help="causal attention inside the block (block_attention \"causal\")")
    args = ap.parse_args()
    torch.manual_seed(0)
    bb = Backbone(args.backbone)
    for p in bb.parameters():
        p.requires_grad_(False)
    ds = Dataset(args.data, max_chunks=args.chunks)
    m = ds.meta["visual_tokens"]
    ocr = [int(t) for t in args.ocr_ids.split(",")]
    e_rms = bb.embed_rms
    results = []
    for i in range(ds.n):
        text = ds.tokens[i][: args.tokens].tolist()
        z = torch.nn.Parameter(torch.randn(m, bb.dim) * e_rms)
        opt = torch.optim.Adam([z], lr=args.lr)
        t0, curve = time.time(), []
        for s in range(args.steps):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss, _ = train.lm_loss(bb, [train.build(bb, ocr, [torch.tanh(z)], text, m, args.causal)], [text])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if s % 25 == 0 or s == args.steps - 1:
                curve.append((s, round(loss.item(), 4)))
                print(f"chunk {i} step {s} loss {loss.item():.4f} ({time.time() - t0:.0f} s)", file=sys.stderr)
        v = torch.tanh(z).detach()
        acc = argmax_accuracy(bb, ocr, v, text, m, args.causal)
        results.append({"chunk": i, "tokens": len(text), "loss_curve": curve, "argmax_token_accuracy": acc,
                        "rms_over_embedding_rms": v.pow(2).mean().sqrt().item() / e_rms, "seconds": round(time.time() - t0)})
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
