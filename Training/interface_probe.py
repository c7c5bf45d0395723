#!/usr/bin/env python3
"""What can the frozen backbone read through a visual block, independent of any vision encoder?
Two probes on held-out chunks, both with the OCR sequence of Training/train.py ([OCR prompt]
V -> T, the VIST2 mask and positions), teacher-forced, loss in nats per text token:

  constructions  No training. The block is built from the chunk's own token embeddings: one
                 token per visual token ("r1": the text itself, so an upper bound for any block),
                 the first token of every 2 or 4, and all-zero ("blind": what the backbone guesses
                 from the prompt and the text so far alone). Each with the block's tokens
                 attending bidirectionally (docs/MODEL.md section 3) and causally (block_attention
                 "causal").
  teacher        A text-side encoder with perfect input: an MLP from the ids of each group of
                 --group consecutive tokens to one visual token, trained through the frozen
                 backbone on the training chunks (no pixels, nothing to read). How fast does an
                 encoder that needs no reading learn a code the backbone reads? With --start
                 first: a linear map that starts at the "first token of each group" code (with
                 --start zero: the same map starting at zero, the blind code). --curriculum 2:200
                 trains on groups of 2 for 200 steps before --group (docs/MODEL.md's ratio
                 curriculum); --adapter RANK also trains a low-rank "visual expert" in the
                 backbone's projections, on the visual rows only (not part of the engine's model).
                 --start mean [--layer L]: a linear map from the mean of each group's backbone
                 states after L layers (0: the token embeddings), starting at the identity scaled
                 to the embeddings' RMS: a code that starts inside the backbone's representation.
                 --save PATH keeps the trained code for autoencode.
  autoencode     Regresses a vision encoder and aligner (--model-dir) onto a saved code (MSE on
                 the m visual tokens of each chunk's image, no backbone in the loop) and reports
                 the held-out OCR loss of the backbone reading the encoder's tokens beside the
                 code's own: issue 14's autoencoding stage, measured.

    python3 Training/interface_probe.py constructions --backbone WORK/backbone --data WORK/ds-heldout --ocr-ids 8241,83,6842,42
    python3 Training/interface_probe.py teacher --backbone WORK/backbone --data WORK/ds-train \\
        --heldout WORK/ds-heldout --ocr-ids 8241,83,6842,42 --group 4 --minutes 12 [--causal] [--lr 1e-3]
    python3 Training/interface_probe.py autoencode --backbone WORK/backbone --data WORK/ds-train \\
        --heldout WORK/ds-heldout --ocr-ids 8241,83,6842,42 --teacher CODE.pt --model-dir weights/vist2-smollm2-135m

Results: Training/EXPERIMENTS.md, sections 4, 5 and 9. --precision auto (the default) computes
in f32 on CPUs without AVX-512, where bf16 is emulated (train.py's rule).
"""
import argparse
import contextlib
import json
import os
import random
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train  # noqa: E402
from vist2.data import Dataset  # noqa: E402
from vist2.model import Backbone  # noqa: E402


def ocr_loss(bb, ocr, v, ids, causal, adapters=None):
    seq = train.build(bb, ocr, [v], ids, v.shape[0], causal)
    if adapters:
        adapters.mark([seq], len(ocr))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=train.AMP):
        return train.lm_loss(bb, [seq], [ids])[0]


class _Adapted(nn.Module):
    def __init__(self, lin, rank, owner):
        super().__init__()
        self.lin, self.owner = lin, [owner]  # a list: the owner is not a submodule
        self.a = nn.Parameter(torch.randn(rank, lin.in_features) / lin.in_features ** 0.5)
        self.b = nn.Parameter(torch.zeros(lin.out_features, rank))

    def forward(self, x):
        d = (x @ self.a.T.to(x.dtype)) @ self.b.T.to(x.dtype)
        return self.lin(x) + d * self.owner[0].rows[..., None].to(d.dtype)


class VisualAdapters(nn.Module):
    """A low-rank "visual expert" in every projection of every layer of the frozen backbone:
    W x + B A x on the visual rows only (B starts at zero). Text rows are computed by the backbone
    exactly and read the visual rows' adapted keys and values. Not part of the engine's model:
    a probe of whether reaching deeper than the input embeddings speeds up learning a code."""

    def __init__(self, bb, rank):
        super().__init__()
        self.rows = None
        self.wrapped = nn.ModuleList()
        for L in bb.layers:
            for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
                w = _Adapted(getattr(L, name), rank, self)
                setattr(L, name, w)
                self.wrapped.append(w)

    def mark(self, seqs, prompt):
        """The visual rows of a padded batch of OCR sequences from train.build: one block right
        after the prompt, ending at the row that predicts the first text token."""
        rows = torch.zeros(len(seqs), max(s[0].shape[0] for s in seqs))
        for b, (_, _, _, pred) in enumerate(seqs):
            rows[b, prompt: int(pred[0]) + 1] = 1
        self.rows = rows


@torch.no_grad()
def constructions(bb, ds, ocr, n, tokens):
    E = bb.embed.weight
    res = {}
    for i in train.eval_chunks(ds, n)[0]:
        ids = ds.tokens[i][:tokens].tolist()
        t = torch.tensor(ids)
        blocks = {"r1 (the text itself)": E[t], "r2, first token of each 2": E[t[0::2]],
                  "r4, first token of each 4": E[t[0::4]], "blind (r4, zeros)": torch.zeros((len(ids) + 3) // 4, bb.dim)}
        for name, v in blocks.items():
            for causal in (False, True):
                key = f"{name}, {'causal' if causal else 'bidirectional'}"
                res.setdefault(key, []).append(ocr_loss(bb, ocr, v, ids, causal).item())
    return {k: round(float(np.mean(v)), 4) for k, v in res.items()}


def grouped(embed, ids, g, width=None):
    """(ceil(len/g), width, d): the embeddings of each group of g consecutive ids, the last group
    padded with zero vectors, and every group padded with zero vectors to width (default g)."""
    n = (len(ids) + g - 1) // g
    slots = torch.full((n * g,), -1, dtype=torch.long)
    slots[: len(ids)] = torch.as_tensor(ids)
    slots = F.pad(slots.view(n, g), (0, (width or g) - g), value=-1)
    return embed[slots.clamp(min=0)] * (slots >= 0)[..., None]


class Teacher(nn.Module):
    """One visual token from the ids of `group` consecutive tokens: tanh(MLP(concatenated
    frozen token embeddings)); the last group is padded with zeros."""

    def __init__(self, embed, group, hidden=1024):
        super().__init__()
        self.embed, self.group = embed, group
        self.inp = nn.Linear(group * embed.shape[1], hidden)
        self.out = nn.Linear(hidden, embed.shape[1])
        with torch.no_grad():
            self.out.weight.mul_(0.5)

    def forward(self, ids, g=None):
        """g < group: groups of g tokens, the missing slots zero (the curriculum's lower ratios)."""
        return torch.tanh(self.out(F.gelu(self.inp(grouped(self.embed, ids, g or self.group, self.group).flatten(1)))))


class LinearTeacher(nn.Module):
    """tanh(sum over the group's positions p of W_p e_p + b), starting (first=True) at W_0 = I,
    W_p = 0 for p > 0, b = 0: the "first token of each group" code, which the backbone reads
    from the start; or (first=False) at W = 0, the blind code."""

    def __init__(self, embed, group, first=True):
        super().__init__()
        self.embed, self.group = embed, group
        d = embed.shape[1]
        w = torch.zeros(group, d, d)
        if first:
            w[0] = torch.eye(d)
        self.w = nn.Parameter(w)
        self.b = nn.Parameter(torch.zeros(d))

    def forward(self, ids, g=None):
        """g < group: groups of g tokens (only W_0 .. W_{g-1} take part)."""
        return torch.tanh(torch.einsum("ngd,gde->ne", grouped(self.embed, ids, g or self.group, self.group), self.w) + self.b)


class MeanTeacher(nn.Module):
    """tanh(W mean(h) + b), h the backbone's own residual stream after its first `layer` layers
    (0: the token embeddings) reading the chunk as plain text, averaged over each group's tokens.
    Starts at W = s I, b = 0, s matching the states' RMS to the token embeddings': slots that
    start inside the backbone's representation (issue 14's autoencoding stage), which a vision
    encoder could then be regressed onto without the backbone in the loop (`autoencode`)."""

    def __init__(self, bb, group, layer, sample):
        super().__init__()
        self.bb, self.group, self.layer = [bb], group, layer  # a list: the backbone is not a submodule
        d = bb.dim
        self.scale = 1.0  # no sample: the weights come from a saved state
        if sample:
            with torch.no_grad():
                h = torch.cat([self.states(ids) for ids in sample])
                self.scale = float(bb.embed.weight.pow(2).mean().sqrt() / h.pow(2).mean().sqrt())
        self.w = nn.Parameter(torch.eye(d) * self.scale)
        self.b = nn.Parameter(torch.zeros(d))

    @torch.no_grad()
    def states(self, ids):
        bb = self.bb[0]
        x = bb.embed(torch.as_tensor(ids, dtype=torch.long))
        if self.layer == 0:
            return x
        T = x.shape[0]
        mask = torch.ones(T, T, dtype=torch.bool).tril()
        return bb.hidden(x[None], torch.arange(T, dtype=torch.float32)[None], mask[None], layers=self.layer)[0].float()

    def forward(self, ids, g=None):
        g = g or self.group
        h = self.states(ids)
        n = (len(ids) + g - 1) // g
        h = F.pad(h, (0, 0, 0, n * g - len(ids))).view(n, g, -1)
        count = torch.full((n,), float(g))
        count[-1] = len(ids) - (n - 1) * g
        return torch.tanh((h.sum(1) / count[:, None]) @ self.w.T + self.b)


def make_teacher(bb, kind, group, layer=0, sample=()):
    if kind in ("first", "zero"):
        return LinearTeacher(bb.embed.weight.detach(), group, first=kind == "first")
    if kind == "mean":
        return MeanTeacher(bb, group, layer, sample)
    return Teacher(bb.embed.weight.detach(), group)


def teacher(bb, train_ds, held, ocr, args):
    torch.manual_seed(0)
    sample = [train_ds.tokens[i][: args.tokens].tolist() for i in range(min(16, train_ds.n))]
    model = make_teacher(bb, args.start, args.group, args.layer, sample)
    adapters = VisualAdapters(bb, args.adapter) if args.adapter else None
    params = list(model.parameters()) + ([p for p in adapters.parameters() if p.requires_grad] if adapters else [])  # not the backbone's
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    rng = random.Random(1)
    held_ids = [held.tokens[i][: args.tokens].tolist() for i in train.eval_chunks(held, args.chunks)[0]]
    with torch.no_grad():  # the frozen backbone (adapters start at zero): the same at every evaluation
        blind = float(np.mean([ocr_loss(bb, ocr, torch.zeros((len(t) + args.group - 1) // args.group, bb.dim), t, args.causal,
                                        adapters).item() for t in held_ids]))

    stages = args.curriculum  # (group size, steps) stages below --group, then --group to the end

    def group_at(step):
        for g, n in stages:
            if step <= n:
                return g
            step -= n
        return args.group

    def held_loss(g):
        return float(np.mean([ocr_loss(bb, ocr, model(t, g).float(), t, args.causal, adapters).item() for t in held_ids]))

    @torch.no_grad()
    def evaluate(step):
        rec = {"step": step, "heldout_ocr": held_loss(args.group), "blind": blind}
        now = group_at(max(step, 1))  # the group size the next step trains at
        if now != args.group:
            rec["group_now"], rec["heldout_ocr_now"] = now, held_loss(now)
        print(json.dumps(rec), file=sys.stderr, flush=True)
        return rec

    curve = [evaluate(0)]
    t0, step = time.time(), 0
    while time.time() - t0 < args.minutes * 60 and (args.steps == 0 or step < args.steps):
        step += 1
        for pg in opt.param_groups:
            pg["lr"] = args.lr * min(1.0, step / 30)
        seqs, targets = [], []
        g = group_at(step)
        for _ in range(2):
            ids = train_ds.tokens[rng.randrange(train_ds.n)][: args.tokens].tolist()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=train.AMP):
                v = model(ids, g).float()
            seqs.append(train.build(bb, ocr, [v], ids, v.shape[0], args.causal))
            targets.append(ids)
        if adapters:
            adapters.mark(seqs, len(ocr))
        loss, _ = train.lm_loss(bb, seqs, targets)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 100 == 0:
            curve.append(evaluate(step))
    curve.append(evaluate(step))
    if args.save:
        torch.save({"start": args.start, "group": args.group, "layer": args.layer, "causal": args.causal,
                    "state": model.state_dict()}, args.save)
    return {"group": args.group, "layer": args.layer, "curriculum": stages, "adapter": args.adapter, "causal": args.causal, "start": args.start, "lr": args.lr,
            "steps": step, "curve": curve}


def autoencode(bb, train_ds, held, ocr, args):
    """Regresses a vision encoder and aligner (from --model-dir) onto a saved teacher's slots
    (`teacher --save`): MSE between the encoder's m visual tokens for a chunk's image and the
    teacher's slots for its text (zero rows past them), no backbone in the loop. Reports the
    regression's held-out error and, the real test, the held-out OCR loss of the backbone reading
    the encoder's tokens, beside the code's own (what the regression aims at) and blind."""
    torch.manual_seed(0)
    saved = torch.load(args.teacher, weights_only=False)
    code = make_teacher(bb, saved["start"], saved["group"], saved["layer"])  # its weights: the saved state
    code.load_state_dict(saved["state"])
    for p in code.parameters():
        p.requires_grad_(False)
    causal = saved["causal"]
    with open(os.path.join(args.model_dir, "config.json")) as f:
        cfg = json.load(f)
    enc = train.Trainable(cfg, bb.dim, train_ds.advance())
    with contextlib.redirect_stdout(sys.stderr):  # its notes; stdout is the result's JSON
        enc.load_model_dir(args.model_dir, cfg)
    m = (enc.gh // enc.merge) * (enc.gw // enc.merge)  # visual tokens per image
    params = list(enc.vision.parameters()) + list(enc.aligner.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))

    @torch.no_grad()
    def target(ds, i):
        ids = ds.tokens[i][: args.tokens].tolist()
        v = code(ids).float()[:m]
        return ids, F.pad(v, (0, 0, 0, m - v.shape[0]))

    def encode(ds, idx):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=train.AMP):
            return enc(ds.pixels(idx))[0].float()

    held_idx = train.eval_chunks(held, args.chunks)[0]
    held_t = [target(held, i) for i in held_idx]
    with torch.no_grad():
        code_ocr = float(np.mean([ocr_loss(bb, ocr, v, ids, causal).item() for ids, v in held_t]))
        blind = float(np.mean([ocr_loss(bb, ocr, torch.zeros_like(v), ids, causal).item() for ids, v in held_t]))

    @torch.no_grad()
    def evaluate(step, seconds):
        v = encode(held, held_idx)
        t = torch.stack([tv for _, tv in held_t])
        rec = {"step": step, "seconds": round(seconds, 1), "heldout_mse": float(F.mse_loss(v, t)),
               "heldout_cos": float(F.cosine_similarity(v.flatten(1), t.flatten(1)).mean()),
               "heldout_ocr": float(np.mean([ocr_loss(bb, ocr, v[b], ids, causal).item() for b, (ids, _) in enumerate(held_t)])),
               "teacher_ocr": code_ocr, "blind": blind}
        print(json.dumps(rec), file=sys.stderr, flush=True)
        return rec

    rng = random.Random(1)
    curve, t0, step, trained = [evaluate(0, 0.0)], time.time(), 0, 0.0
    while time.time() - t0 < args.minutes * 60 and (args.steps == 0 or step < args.steps):
        step += 1
        for pg in opt.param_groups:
            pg["lr"] = args.lr * min(1.0, step / 30)
        ts = time.time()
        idx = [rng.randrange(train_ds.n) for _ in range(args.batch)]
        t = torch.stack([target(train_ds, i)[1] for i in idx])
        loss = F.mse_loss(encode(train_ds, idx), t)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        trained += time.time() - ts
        if step % args.eval_every == 0:
            curve.append(evaluate(step, trained))
    if step % args.eval_every:
        curve.append(evaluate(step, trained))
    return {"teacher": args.teacher, "model_dir": args.model_dir, "batch": args.batch, "lr": args.lr, "steps": step,
            "seconds_per_step": round(trained / max(step, 1), 3), "curve": curve}


def curriculum(text):
    """--curriculum: comma-separated GROUP:STEPS stages, both positive integers."""
    stages = []
    for item in text.split(","):
        parts = item.split(":")
        if len(parts) != 2 or not all(p.strip().isdecimal() and int(p) > 0 for p in parts):
            raise argparse.ArgumentTypeError(f"expected GROUP:STEPS with positive integers (e.g. 2:200), got {item!r}")
        stages.append((int(parts[0]), int(parts[1])))
    return stages


def nonnegative(text):
    if not text.isdecimal():
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return int(text)


def positive(text):
    if not text.isdecimal() or int(text) == 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("probe", choices=("constructions", "teacher", "autoencode"))
    ap.add_argument("--backbone", required=True)
    ap.add_argument("--data", required=True, help="held-out dataset (constructions) or training dataset (teacher)")
    ap.add_argument("--heldout", help="teacher: the held-out dataset")
    ap.add_argument("--ocr-ids", required=True, help="token ids of the OCR prompt, comma-separated")
    ap.add_argument("--chunks", type=int, default=12, help="held-out chunks to measure on")
    ap.add_argument("--tokens", type=int, default=400, help="at most this many tokens of each chunk")
    ap.add_argument("--group", type=int, default=4, help="teacher: tokens per visual token")
    ap.add_argument("--causal", action="store_true", help="teacher: causal attention inside the block")
    ap.add_argument("--start", choices=("random", "first", "zero", "mean"), default="random",
                    help="teacher: an MLP from random weights, or a linear map starting at the first-token code, at zero, "
                         "or at the mean of the group's backbone states after --layer layers")
    ap.add_argument("--layer", type=nonnegative, default=0, help="teacher --start mean: layers of the backbone (0: token embeddings)")
    ap.add_argument("--save", help="teacher: save the trained code here (for autoencode)")
    ap.add_argument("--teacher", help="autoencode: a code saved by teacher --save")
    ap.add_argument("--model-dir", default="weights/vist2-smollm2-135m", help="autoencode: the vision encoder and aligner to start from")
    ap.add_argument("--batch", type=positive, default=8, help="autoencode: images per step")
    ap.add_argument("--eval-every", type=positive, default=50, help="autoencode: steps between held-out evaluations")
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "f32"],
                    help="bf16 autocast or f32; auto: bf16 on CPUs with AVX-512, f32 elsewhere (train.py's rule)")
    ap.add_argument("--curriculum", type=curriculum, default=[],
                    help="teacher: train first with smaller groups, e.g. 2:200 (groups of 2 for 200 steps) or 1:50,2:200; then --group")
    ap.add_argument("--adapter", type=nonnegative, default=0, metavar="RANK",
                    help="teacher: also train a low-rank adapter of this rank on the backbone's visual rows (not in the engine)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--minutes", type=float, default=12)
    ap.add_argument("--steps", type=int, default=0, help="teacher: stop after this many steps (0 = only --minutes)")
    args = ap.parse_args()
    if any(g >= args.group for g, _ in args.curriculum):
        ap.error(f"--curriculum: group sizes must be smaller than --group {args.group}")
    train.AMP = train.amp_default(torch.device("cpu")) if args.precision == "auto" else args.precision == "bf16"
    bb = Backbone(args.backbone)
    for p in bb.parameters():
        p.requires_grad_(False)
    ocr = [int(t) for t in args.ocr_ids.split(",")]
    if args.probe == "constructions":
        out = constructions(bb, Dataset(args.data), ocr, args.chunks, args.tokens)
    elif args.probe == "teacher":
        if not args.heldout:
            ap.error("teacher needs --heldout")
        out = teacher(bb, Dataset(args.data), Dataset(args.heldout), ocr, args)
    else:
        if not args.heldout or not args.teacher:
            ap.error("autoencode needs --heldout and --teacher")
        out = autoencode(bb, Dataset(args.data), Dataset(args.heldout), ocr, args)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
