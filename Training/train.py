#!/usr/bin/env python3
"""Train the VIST2 vision encoder and aligner on a frozen backbone (issue 5, VIST2.md section 6).

    python3 Training/train.py --run RUN_DIR [--minutes N] [--tiny]

RUN_DIR/run.json names everything a run needs (written by Training/make_default.sh or by hand):
  {"backbone": HF directory from `vist2ctl export-backbone`, "train": dataset dir, "heldout":
   dataset dir (both from `vist2ctl dataset`), "model_config": the model's config.json (geometry,
   vision sizes), "ocr_prompt_ids": token ids of the OCR instruction, "schedule": {...}}

Stages (steps are optimizer steps; the schedule is in run.json):
  A  read:  the ViT learns to read glyphs with an auxiliary per-cell character objective (a
            linear head on each visual token's merged patches predicts the character cells
            under it: 4 x 8 with the shipped geometry, 3 x 8 tiled). Cheap: no backbone.
  B  OCR:   [OCR prompt] V_i -> T_i through the frozen backbone (bf16 autocast), mixed with
            continuation V_i -> T_{i+1}; loss on every text token, the first one predicted at
            the block's last visual token.
  C  OLM:   multi-chunk documents [] V_0 .. V_k -> T_{k+1} with the mask and compressed positions
            of VIST2.md section 3, mixed with OCR.
The auxiliary reading loss stays on (small weight) in B and C. With scale_weight > 0, a scale term
pulls each visual token's RMS towards the RMS of the backbone's token embeddings (off for the
shipped model; Training/EXPERIMENTS.md).

Backbone adapter (VIST2.md section 6): with run.json's "adapter": {"rank": R, "scope": "visual" |
"all", "alpha": (default 2R), "targets": (default all seven projections)}, a LoRA
(Training/vist2/lora.py) trains with the encoder and aligner from stage B on; "visual" adapts only
the rows of visual blocks, "all" every row. It is exported in the PEFT layout to best/adapter and
named in best/config.json, and the held-out blind losses are then measured under the current
adapter at every evaluation.

Checkpoints: RUN_DIR/checkpoint.pt every --checkpoint-minutes (atomic rename) and at the end;
a run resumes from it exactly (model, optimiser, step, RNG states, data order). Every step
appends to RUN_DIR/log.jsonl; held-out evaluations too. RUN_DIR/best/ holds the model directory
(config.json + vision.safetensors) of the best held-out score of the latest stage.
"""
import argparse
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vist2.data import N_CLASSES, Dataset  # noqa: E402
from vist2.lora import SCOPES, TARGETS, LoRA  # noqa: E402
from vist2.model import Aligner, Backbone, VisionConfig, VisionEncoder, causal_blocks, load_vision, vision_state_dict  # noqa: E402


# ---------------------------------------------------------------- model

class Trainable(nn.Module):
    """Vision encoder + aligner (what the engine loads) + the auxiliary reading head (training only)."""

    def __init__(self, cfg, llm_dim, advance):
        super().__init__()
        vc = VisionConfig(**cfg["vision"])
        self.vc = vc
        self.merge = cfg["aligner"]["merge"]
        self.gh, self.gw = vc.image_height // vc.patch_size, vc.image_width // vc.patch_size
        self.vision = VisionEncoder(vc)
        self.aligner = Aligner(vc.hidden_size, llm_dim, self.merge, self.gh, self.gw)
        self.lora, self.lora_scope = None, None  # add_adapter
        # The reading head's grid: one slot per character cell a visual token's region can hold
        # (rows of line_height x cells of the font's advance: 4 x 8 for the shipped geometry).
        region = vc.patch_size * self.merge
        self.slot_h, self.slot_w = max(1, region // cfg["render"]["line_height"]), max(1, region // advance)
        self.aux = nn.Linear(self.merge ** 2 * vc.hidden_size, self.slot_h * self.slot_w * N_CLASSES)

    def init_weights(self, seed):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("bias"):
                    p.zero_()
                elif "layer_norm" in name or "post_layernorm" in name:
                    p.fill_(1.0)
                else:
                    fan_in = p[0].numel() if p.dim() > 1 else p.numel()
                    p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
            self.vision.position_embedding.weight.mul_(0.02 * math.sqrt(self.vc.hidden_size))
            # Start the aligner's outputs at the scale of the backbone's token embeddings.
            self.aligner.proj.weight.mul_(0.15)

    def forward(self, pixels):
        """-> (visual tokens (B, m, llm_dim), aux logits (B, m, slots, classes)). The reading head
        sees what the aligner's affine layer sees: each visual token's merged patches."""
        x = self.aligner.merged(self.vision(pixels[:, None]))
        v = torch.tanh(self.aligner.proj(x))
        aux = self.aux(x).view(x.shape[0], x.shape[1], self.slot_h * self.slot_w, N_CLASSES)
        return v, aux

    def add_adapter(self, bb, spec):
        """The backbone adapter run.json asks for (None: none), trained with the rest."""
        self.lora, self.lora_scope = None, None
        if spec:
            if spec.get("scope") not in SCOPES:
                raise ValueError(f"adapter.scope must be one of {SCOPES}")
            r = int(spec["rank"])
            # Its own seed, so a fresh run and a resumed one start from the same factors.
            with torch.random.fork_rng():
                torch.manual_seed(int(spec.get("seed", 1)))
                self.lora = LoRA(bb, r, spec.get("alpha", 2 * r), spec.get("targets", TARGETS))
            self.lora_scope = spec["scope"]

    def load_model_dir(self, directory, cfg, bb=None):
        """Vision encoder and aligner from a model directory whose geometry and sizes are cfg's,
        and its adapter when both it and this run have one."""
        with open(os.path.join(directory, "config.json")) as f:
            other = json.load(f)
        for key in ("vision", "aligner", "render", "chunk"):
            if other.get(key) != cfg.get(key):
                raise ValueError(f"{directory}: config.json's {key} differs from the run's model config")
        load_vision(self.vision, self.aligner, os.path.join(directory, "vision.safetensors"))
        if self.lora is not None and other.get("adapter"):
            loaded = LoRA.load(os.path.join(directory, other["adapter"]["path"]), bb)
            self.lora.load_state_dict(loaded.state_dict())
        elif other.get("adapter"):
            print(f"warning: {directory} has a backbone adapter and this run trains none: its encoder starts "
                  "from weights trained with an adapter that is left behind", flush=True)

    def export(self, directory, cfg):
        """The engine's model directory: config.json + vision.safetensors (F16), and the adapter
        (PEFT layout, F32) in adapter/ when the run trains one."""
        os.makedirs(directory, exist_ok=True)
        holder = vision_state_dict(self.vision, self.aligner)
        tmp = os.path.join(directory, "vision.safetensors.tmp")
        save_file({k: v.detach().to(torch.float16).contiguous() for k, v in holder.items()}, tmp)
        os.replace(tmp, os.path.join(directory, "vision.safetensors"))
        cfg = dict(cfg)
        cfg.pop("adapter", None)
        if self.lora is not None:
            self.lora.save(os.path.join(directory, "adapter"))
            cfg["adapter"] = {"path": "adapter", "scope": self.lora_scope}
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(cfg, f, indent=1)

    def adapted(self, seqs):
        """(lora, visual row masks) for lm_loss over sequences given as (embeddings from build(),
        instruction length P, number of blocks k): the rows the adapter acts on."""
        if self.lora is None:
            return None, None
        if self.lora_scope == "all":
            return self.lora, None
        m = self.gh * self.gw // self.merge ** 2
        masks = []
        for e, P, k in seqs:
            v = torch.zeros(e.shape[0], dtype=torch.bool)
            v[P:P + k * m] = True
            masks.append(v)
        return self.lora, masks


# ---------------------------------------------------------------- sequences

def build(bb, instr, blocks, text, m, causal=False):
    """One sequence of VIST2.md section 3: instruction ids, visual blocks (list of (m, D)
    tensors), then the text ids of the chunk after them. Returns embeddings, positions, the
    allowed-attention matrix, and for each text token the index of the row whose output
    predicts it (the first from the last visual token, or the instruction's last token if
    there are no blocks). causal: a block's tokens attend to the block causally (the config's
    block_attention "causal") instead of bidirectionally."""
    P, k, n = len(instr), len(blocks), len(text)
    parts = [bb.embed(torch.as_tensor(instr, dtype=torch.long))] if P else []
    parts += blocks
    parts.append(bb.embed(torch.as_tensor(text, dtype=torch.long)))
    x = torch.cat(parts)
    T = P + k * m + n
    kind = torch.tensor([0] * P + [2] * (k * m) + [1] * n)
    chunk = torch.tensor([-1] * P + [i for i in range(k) for _ in range(m)] + [k] * n)
    pos = torch.tensor(list(range(P)) + [P + i * m + j for i in range(k) for j in range(m)] + [P + k * m + t for t in range(n)])
    idx = torch.arange(T)
    qk, kk = kind[:, None], kind[None, :]
    qc, kc = chunk[:, None], chunk[None, :]
    qi, ki = idx[:, None], idx[None, :]
    allowed = ((kk == 0) & ((qk != 0) | (ki <= qi))) | ((kk == 2) & (kc < qc)) | ((qk == 1) & (kk == 1) & (ki <= qi)) | (
        (qk == 2) & (kk == 2) & (kc == qc) & ((ki <= qi) | (not causal)))
    first_pred = P + k * m - 1
    pred_rows = torch.tensor([first_pred] + list(range(P + k * m, T - 1)))
    return x, pos, allowed, pred_rows


def lm_loss(bb, seqs, targets, lora=None, visual=None):
    """Mean cross-entropy over all target tokens of a padded batch of sequences. With `lora`, the
    adapter acts on the rows `visual` marks (a (T_b,) bool mask per sequence) or on every row
    when visual is None."""
    T = max(s[0].shape[0] for s in seqs)
    B, D = len(seqs), seqs[0][0].shape[1]
    x = torch.zeros(B, T, D)
    pos = torch.zeros(B, T)
    rows_mask = None if visual is None else torch.zeros(B, T, dtype=torch.bool)
    allowed = torch.zeros(B, T, T, dtype=torch.bool)
    allowed[:, torch.arange(T), torch.arange(T)] = True  # padding rows attend to themselves
    rows, tgt, bi = [], [], []
    xs = []
    for b, (e, p, a, r) in enumerate(seqs):
        t = e.shape[0]
        xs.append(F.pad(e, (0, 0, 0, T - t)))
        pos[b, :t] = p.float()
        allowed[b, :t, :t] = a
        if rows_mask is not None:
            rows_mask[b, :t] = visual[b]
        rows.append(r)
        tgt.append(torch.as_tensor(targets[b], dtype=torch.long))
        bi.append(torch.full((len(r),), b))
    x = torch.stack(xs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = bb.hidden(x, pos, allowed, lora, rows_mask)
        sel = h[torch.cat(bi), torch.cat(rows)]
        logits = sel @ bb.embed.weight.T
    return F.cross_entropy(logits.float(), torch.cat(tgt)), int(sum(len(t) for t in tgt))


# ---------------------------------------------------------------- training

def aux_loss(model, ds, idx, aux_logits, cfg):
    r = cfg["render"]
    region = 16 * model.merge
    tg = torch.stack([ds.aux_targets(i, region, model.slot_h, model.slot_w, r["line_height"]) for i in idx])
    logits = aux_logits.float().reshape(-1, N_CLASSES)
    t = tg.reshape(-1)
    w = torch.where(t == 0, 0.2, 1.0)
    loss = (F.cross_entropy(logits, t, reduction="none") * w).sum() / w.sum()
    with torch.no_grad():
        ink = t != 0
        acc = (logits.argmax(-1)[ink] == t[ink]).float().mean().item() if ink.any() else 0.0
    return loss, acc


def sample_batch(rng, ds, stage, sched, ocr_ids, m, model):
    """Returns (images to encode, sequence specs). A spec: (instr ids, [image slots], text ids)."""
    specs, images = [], []
    bs = sched["batch_" + stage]
    for _ in range(bs):
        r = rng.random()
        if stage == "A":
            images.append(rng.randrange(ds.n))
            continue
        if stage == "B":
            kind = "ocr" if r < sched.get("ocr_share_B", 0.7) else "cont"
        else:
            kind = "ocr" if r < sched.get("ocr_share_C", 0.3) else "olm"
        if kind == "ocr" or not ds.followers:
            i = rng.randrange(ds.n)
            slot = len(images)
            images.append(i)
            specs.append((ocr_ids, [slot], ds.tokens[i][: sched["max_text"]]))
        else:
            j = ds.followers[rng.randrange(len(ds.followers))]
            # Earlier chunks of the same document, at most max_blocks of them.
            k = 1
            kmax = 1 if kind == "cont" else sched.get("max_blocks", 3)
            while k < kmax and j - k - 1 >= 0 and ds.docs[j - k - 1] == ds.docs[j] and ds.index[j - k - 1] == ds.index[j] - k - 1:
                k += 1
            k = rng.randint(1, k)
            slots = []
            for i in range(j - k, j):
                slots.append(len(images))
                images.append(i)
            specs.append(([], slots, ds.tokens[j][: sched["max_text"]]))
    return images, specs


def step_loss(model, bb, ds, rng, stage, sched, ocr_ids, cfg):
    m = model.gh * model.gw // model.merge ** 2
    images, specs = sample_batch(rng, ds, stage, sched, ocr_ids, m, model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v, aux = model(ds.pixels(images))
    v = v.float()
    la, acc = aux_loss(model, ds, images, aux, cfg)
    # Scale: each visual token's RMS against the RMS of the backbone's token embeddings. Left
    # alone, the aligner's tanh saturates (most outputs near +-1, RMS ~6x a token embedding's),
    # which starves it of gradient; scale_weight > 0 pulls visual tokens to the scale of text.
    # (Free visual tokens optimised for OCR settle at ~3x, Training/capacity.py; see
    # Training/EXPERIMENTS.md before using it.)
    ratio = v.pow(2).mean(-1).sqrt() / bb.embed_rms
    ls = (ratio - 1).pow(2).mean()
    sw = sched.get("scale_weight", 0.0)
    if stage == "A":
        return la + sw * ls, {"aux": la.item(), "aux_acc": acc, "v_rms": ratio.mean().item()}
    seqs, targets, shapes = [], [], []
    for instr, slots, text in specs:
        e, p, a, r = build(bb, list(instr), [v[s] for s in slots], text, m, causal_blocks(cfg))
        seqs.append((e, p, a, r))
        targets.append(text)
        shapes.append((e, len(instr), len(slots)))
    ll, n = lm_loss(bb, seqs, targets, *model.adapted(shapes))
    loss = ll + sched.get("aux_weight", 0.1) * la + sw * ls
    return loss, {"lm": ll.item(), "aux": la.item(), "aux_acc": acc, "v_rms": ratio.mean().item(), "tokens": n}


def eval_chunks(ds, n):
    """The fixed held-out chunks of every evaluation: n chunks to read and transcribe, and n
    chunks with a predecessor in their document for OLM (each predicted from the one before)."""
    rng = random.Random(1234)
    idx = [rng.randrange(ds.n) for _ in range(n)]
    fol = [ds.followers[rng.randrange(len(ds.followers))] for _ in range(n)] if ds.followers else []
    return idx, fol


def sequence_loss(bb, instr, v, text, m, causal, model=None):
    """Mean cross-entropy over the text of one sequence: instruction ids, one visual block v,
    text; through the model's adapter when it has one."""
    seq = build(bb, instr, [v], text, m, causal)
    adapted = model.adapted([(seq[0], len(instr), 1)]) if model is not None else (None, None)
    return lm_loss(bb, [seq], [text], *adapted)[0].item()


@torch.no_grad()
def blind_losses(bb, ds, cfg, ocr_ids, n_eval, m, model=None):
    """evaluate()'s OCR and OLM losses with every visual token zero ("blind": the backbone's guess
    from the prompt and the text so far alone), under the model's adapter if it has one. A loss
    near its blind value means the backbone reads nothing from the visual tokens. Without an
    adapter the backbone is frozen and the chunks are fixed, so a run computes these once."""
    idx, fol = eval_chunks(ds, n_eval)
    causal, zeros = causal_blocks(cfg), torch.zeros(m, bb.dim)
    out = {"ocr_blind": float(np.mean([sequence_loss(bb, list(ocr_ids), zeros, ds.tokens[i], m, causal, model) for i in idx]))}
    if fol:
        out["olm_blind"] = float(np.mean([sequence_loss(bb, [], zeros, ds.tokens[j], m, causal, model) for j in fol]))
    return out


@torch.no_grad()
def evaluate(model, bb, ds, cfg, ocr_ids, n_eval, stage, blind=None):
    """Held-out: aux accuracy, OCR loss (teacher-forced) and OLM loss over fixed chunks, and
    with them `blind` (blind_losses()) so that the log shows what the visual tokens add."""
    model.eval()
    m = model.gh * model.gw // model.merge ** 2
    idx, fol = eval_chunks(ds, n_eval)
    causal = causal_blocks(cfg)
    accs, ocr, olm = [], [], []
    for i in idx:
        v, aux = model(ds.pixels([i]))
        accs.append(aux_loss(model, ds, [i], aux, cfg)[1])
        if stage != "A":
            ocr.append(sequence_loss(bb, list(ocr_ids), v[0], ds.tokens[i], m, causal, model))
    if stage != "A":
        for j in fol:
            v, _ = model(ds.pixels([j - 1]))
            olm.append(sequence_loss(bb, [], v[0], ds.tokens[j], m, causal, model))
    model.train()
    out = {"aux_acc": float(np.mean(accs))}
    if ocr:
        out["ocr_loss"] = float(np.mean(ocr))
    if olm:
        out["olm_loss"] = float(np.mean(olm))
    if stage != "A" and blind:
        out.update(blind)
    return out


def score(ev, stage):
    """Lower is better: the held-out number that decides the best checkpoint of a stage."""
    if stage == "A":
        return -ev["aux_acc"]
    return ev["ocr_loss"] + ev.get("olm_loss", 0.0)


def stage_at(step, sched):
    a, b = sched["steps_A"], sched["steps_B"]
    return "A" if step < a else ("B" if step < a + b else "C")


def lr_at(step, sched):
    st = stage_at(step, sched)
    start = {"A": 0, "B": sched["steps_A"], "C": sched["steps_A"] + sched["steps_B"]}[st]
    warm = sched.get("warmup", 50)
    base = sched["lr_" + st]
    return base * min(1.0, (step - start + 1) / warm)


def save_checkpoint(path, state):
    tmp = path + ".tmp"
    torch.save(state, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="run directory with run.json")
    ap.add_argument("--minutes", type=float, default=120, help="stop (with a checkpoint) after this long")
    ap.add_argument("--checkpoint-minutes", type=float, default=5)
    ap.add_argument("--max-steps", type=int, default=0, help="stop after this step (0 = the schedule's end)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--init", help="a new run starts from this model directory's vision encoder and aligner (same "
                    "geometry and sizes; the reading head starts fresh); ignored when the run has a checkpoint")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with open(os.path.join(args.run, "run.json")) as f:
        run = json.load(f)
    sched = run["schedule"]
    with open(run["model_config"]) as f:
        cfg = json.load(f)
    ocr_ids = run["ocr_prompt_ids"]
    cfg["ocr_prompt"] = run["ocr_prompt"]

    bb = Backbone(run["backbone"])
    for p in bb.parameters():
        p.requires_grad_(False)
    train = Dataset(run["train"], run.get("max_train_chunks", 0))
    held = Dataset(run["heldout"], run.get("max_heldout_chunks", 0))
    model = Trainable(cfg, bb.dim, train.advance())
    model.init_weights(run.get("seed", 1))
    model.add_adapter(bb, run.get("adapter"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, betas=(0.9, 0.98))
    ckpt = os.path.join(args.run, "checkpoint.pt")
    step, rng, best = 0, random.Random(run.get("seed", 1)), {}
    torch.manual_seed(run.get("seed", 1))
    elapsed0 = 0.0
    if args.init and not os.path.exists(ckpt):
        model.load_model_dir(args.init, cfg, bb)
        print(f"initialised from {args.init}", flush=True)
    if os.path.exists(ckpt):
        st = torch.load(ckpt, weights_only=False)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        step, best, elapsed0 = st["step"], st["best"], st["elapsed"]
        rng.setstate(st["rng"])
        torch.set_rng_state(st["torch_rng"])
        print(f"resumed at step {step} ({elapsed0 / 3600:.2f} h trained)", flush=True)
    total = sched["steps_A"] + sched["steps_B"] + sched["steps_C"]
    if args.max_steps:
        total = min(total, args.max_steps)
    log = open(os.path.join(args.run, "log.jsonl"), "a")
    t0 = time.time()
    last_ckpt = t0

    def state():
        return {"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "best": best, "rng": rng.getstate(),
                "torch_rng": torch.get_rng_state(), "elapsed": elapsed0 + time.time() - t0, "run": run}

    blind = {}

    def do_eval():
        st_ = stage_at(max(step - 1, 0), sched)
        if st_ != "A" and (not blind or model.lora is not None):
            m = model.gh * model.gw // model.merge ** 2
            blind.update(blind_losses(bb, held, cfg, ocr_ids, sched.get("eval_chunks", 16), m, model))
        ev = evaluate(model, bb, held, cfg, ocr_ids, sched.get("eval_chunks", 16), st_, blind)
        rec = {"step": step, "stage": st_, "eval": ev, "hours": (elapsed0 + time.time() - t0) / 3600}
        log.write(json.dumps(rec) + "\n")
        log.flush()
        print(json.dumps(rec), flush=True)
        sc = score(ev, st_)
        if st_ not in best or sc < best[st_]:
            best[st_] = sc
            # The best model of the latest stage is the one to ship.
            model.export(os.path.join(args.run, "best"), cfg)
            with open(os.path.join(args.run, "best", "eval.json"), "w") as f:
                json.dump(rec, f)

    while step < total and time.time() - t0 < args.minutes * 60:
        st_ = stage_at(step, sched)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, sched)
        ts = time.time()
        loss, info = step_loss(model, bb, train, rng, st_, sched, ocr_ids, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        info.update({"step": step, "stage": st_, "loss": loss.item(), "lr": opt.param_groups[0]["lr"], "sec": round(time.time() - ts, 3),
                     "hours": round((elapsed0 + time.time() - t0) / 3600, 4)})
        log.write(json.dumps(info) + "\n")
        if step % 10 == 0:
            log.flush()
            print(json.dumps(info), flush=True)
        boundary = step in (sched["steps_A"], sched["steps_A"] + sched["steps_B"])
        if step % sched.get("eval_every", 200) == 0 or boundary or step == total:
            do_eval()
        if time.time() - last_ckpt > args.checkpoint_minutes * 60:
            save_checkpoint(ckpt, state())
            last_ckpt = time.time()
    save_checkpoint(ckpt, state())
    log.close()
    print(f"stopped at step {step} of {total}", flush=True)


if __name__ == "__main__":
    main()
