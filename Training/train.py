#!/usr/bin/env python3
"""Train the VIST2 vision encoder and aligner on a frozen backbone (issue 5, docs/MODEL.md section 6).

    python3 Training/train.py --run RUN_DIR [--minutes N] [--device cpu|cuda|auto] [--batch N|auto]
    torchrun --nproc_per_node=G Training/train.py --run-dir RUN_DIR --device cuda --batch auto

RUN_DIR/run.json names everything a run needs (written by Training/make_default.sh or by hand):
  {"backbone": HF directory from `vist2ctl export-backbone`, "train": dataset dir, "heldout":
   dataset dir (both from `vist2ctl dataset`), "model_config": the model's config.json (geometry,
   vision sizes), "ocr_prompt_ids": token ids of the OCR instruction, "schedule": {...}}

Stages (steps are optimizer steps; the schedule is in run.json):
  A  read:  the ViT learns to read glyphs with an auxiliary per-cell character objective (a
            linear head on each visual token's merged patches predicts the character cells
            under it: 4 x 8 with the shipped geometry, 3 x 8 tiled). Cheap: no backbone.
            With schedule "head_only_A": true only the reading head learns (for a run that
            starts from a trained encoder with --init: the head starts fresh).
  B  OCR:   [OCR prompt] V_i -> T_i through the frozen backbone, mixed with
            continuation V_i -> T_{i+1}; loss on every text token, the first one predicted at
            the block's last visual token.
  C  OLM:   multi-chunk documents [] V_0 .. V_k -> T_{k+1} with the mask and compressed positions
            of docs/MODEL.md section 3, mixed with OCR.
With schedule "distill_weight" w > 0, stages B and C add w x KL(teacher || student) on every
sequence that continues a document (continuation and OLM): the teacher is the bare backbone
reading the earlier chunks as text (their token ids, then the next chunk's), the student the
model reading them as visual blocks; both predict the next chunk's tokens ("distill_temperature",
default 1). A dense signal for retention: the whole next-token distribution of a reader that
has the full text, not one token.
The auxiliary reading loss stays on (small weight) in B and C. With scale_weight > 0, a scale term
pulls each visual token's RMS towards the RMS of the backbone's token embeddings (off for the
shipped model; Training/EXPERIMENTS.md).

Backbone adapter (docs/MODEL.md section 6): with run.json's "adapter": {"rank": R, "scope": "visual" |
"all", "alpha": (default 2R), "targets": (default all seven projections), "dtype": the exported
factors' type, "float32" (default) or "bfloat16"}, a LoRA
(Training/vist2/lora.py) trains with the encoder and aligner from stage B on; "visual" adapts only
the rows of visual blocks, "all" every row. It is exported in the PEFT layout to best/adapter and
named in best/config.json, and the held-out blind losses are then measured under the current
adapter at every evaluation.

Where it runs: on the CPU by default; with --device cuda on one GPU; under torchrun on several
processes, one GPU each (DDP over NCCL; over Gloo with --device cpu). Every process draws the
same global batch of a step from a generator seeded by (seed, step) and takes its own
contiguous shard, so a run on G processes with per-process batch b steps
as one process with batch G x b does (test_train.py checks the gradients). --batch sets the
per-process batch of stages B and C (stage A in the schedule's ratio); "auto" sizes it to the
GPU's free memory from one probe step. Learning rates are the schedule's whatever the batch.
--precision auto (the default) computes in bf16 autocast on CUDA and on CPUs with AVX-512, in f32
on other CPUs, where bf16 is emulated and ~13x slower.
Rank 0 alone evaluates, exports and writes checkpoints and the log; the log records tokens/s
(positions through the backbone, all processes) and images/s per step and over each 10 steps.

Checkpoints: RUN_DIR/checkpoint.pt every --checkpoint-minutes (atomic rename) and at the end;
a run resumes from it exactly (model, optimiser, step; the data order follows from the step). Every step
appends to RUN_DIR/log.jsonl; held-out evaluations too. RUN_DIR/best/ holds the model directory
(config.json + vision.safetensors) of the best held-out score of the latest stage.
"""
import argparse
import hashlib
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
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
        self.lora, self.lora_scope, self.lora_dtype = None, None, torch.float32  # add_adapter
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

    def forward(self, pixels, head_only=False):
        """-> (visual tokens (B, m, llm_dim), aux logits (B, m, slots, classes)). The reading head
        sees what the aligner's affine layer sees: each visual token's merged patches. head_only:
        no gradient reaches the encoder or the aligner (only the reading head learns)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not head_only):
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
            # The type of the exported factors: "bfloat16" halves the model directory's adapter
            # and the engine's memory traffic for it (both read the saved values).
            dtype = spec.get("dtype", "float32")
            if dtype not in ("float32", "bfloat16"):
                raise ValueError('adapter.dtype must be "float32" or "bfloat16"')
            self.lora_dtype = getattr(torch, dtype)

    def load_model_dir(self, directory, cfg, bb=None):
        """Vision encoder and aligner from a model directory whose geometry and sizes are cfg's,
        and its adapter when this run trains one of the same rank, alpha, targets, layers and
        scope (another one starts fresh)."""
        with open(os.path.join(directory, "config.json")) as f:
            other = json.load(f)
        for key in ("vision", "aligner", "chunk"):
            if other.get(key) != cfg.get(key):
                raise ValueError(f"{directory}: config.json's {key} differs from the run's model config")
        # The layout may differ (the weights fit any layout of the same canvas and font: a model
        # that reads one layout is a start for another); the canvas and the font may not.
        mine, theirs = dict(cfg.get("render", {})), dict(other.get("render", {}))
        layout = ("tile", "newline_mark")
        if {k: v for k, v in mine.items() if k not in layout} != {k: v for k, v in theirs.items() if k not in layout}:
            raise ValueError(f"{directory}: config.json's render differs from the run's model config beyond the layout")
        if any(mine.get(k) != theirs.get(k) for k in layout):
            print(f"note: {directory} was trained on another layout ({', '.join(k for k in layout if mine.get(k) != theirs.get(k))})",
                  flush=True)
        load_vision(self.vision, self.aligner, os.path.join(directory, "vision.safetensors"))
        if self.lora is not None and other.get("adapter"):
            loaded = LoRA.load(os.path.join(directory, other["adapter"]["path"]), bb)
            same = (loaded.r, loaded.alpha, list(loaded.targets), loaded.layers, other["adapter"].get("scope")) == (
                self.lora.r, self.lora.alpha, list(self.lora.targets), self.lora.layers, self.lora_scope)
            if same:
                self.lora.load_state_dict(loaded.state_dict())
            else:
                print(f"note: {directory}'s adapter (rank {loaded.r}, scope {other['adapter'].get('scope')}) is not this "
                      f"run's (rank {self.lora.r}, scope {self.lora_scope}): this run's adapter starts fresh", flush=True)
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
            self.lora.save(os.path.join(directory, "adapter"), dtype=self.lora_dtype)
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
    """One sequence of docs/MODEL.md section 3: instruction ids, visual blocks (list of (m, D)
    tensors), then the text ids of the chunk after them. Returns embeddings, positions, the
    allowed-attention matrix, and for each text token the index of the row whose output
    predicts it (the first from the last visual token, or the instruction's last token if
    there are no blocks). causal: a block's tokens attend to the block causally (the config's
    block_attention "causal") instead of bidirectionally."""
    P, k, n = len(instr), len(blocks), len(text)
    dev = bb.embed.weight.device
    parts = [bb.embed(torch.as_tensor(instr, dtype=torch.long, device=dev))] if P else []
    parts += blocks
    parts.append(bb.embed(torch.as_tensor(text, dtype=torch.long, device=dev)))
    x = torch.cat(parts)
    T = P + k * m + n
    kind = torch.tensor([0] * P + [2] * (k * m) + [1] * n, device=dev)
    chunk = torch.tensor([-1] * P + [i for i in range(k) for _ in range(m)] + [k] * n, device=dev)
    pos = torch.tensor(list(range(P)) + [P + i * m + j for i in range(k) for j in range(m)] + [P + k * m + t for t in range(n)], device=dev)
    idx = torch.arange(T, device=dev)
    qk, kk = kind[:, None], kind[None, :]
    qc, kc = chunk[:, None], chunk[None, :]
    qi, ki = idx[:, None], idx[None, :]
    allowed = ((kk == 0) & ((qk != 0) | (ki <= qi))) | ((kk == 2) & (kc < qc)) | ((qk == 1) & (kk == 1) & (ki <= qi)) | (
        (qk == 2) & (kk == 2) & (kc == qc) & ((ki <= qi) | (not causal)))
    first_pred = P + k * m - 1
    pred_rows = torch.tensor([first_pred] + list(range(P + k * m, T - 1)), device=dev)
    return x, pos, allowed, pred_rows


# bf16 autocast (set by main from --precision; tests compare in f32).
AMP = True


def amp_default(device, cpu_capability=None):
    """Whether --precision auto trains in bf16 autocast: always on CUDA; on the CPU only where it
    has AVX-512. bf16 matmuls on an AVX2-only CPU are emulated: the ViT's step there takes ~13x
    as long in bf16 as in f32 (44 s against 3.4 s for 8 images on a 2-core EPYC)."""
    if device.type == "cuda":
        return True
    cap = cpu_capability if cpu_capability is not None else torch.backends.cpu.get_cpu_capability()
    return cap.upper().startswith("AVX512") or cap.upper().startswith("AMX")


def lm_loss(bb, seqs, targets, lora=None, visual=None, reduction="mean", amp=None, logits_out=None):
    """Cross-entropy over all target tokens of a padded batch of sequences: their mean, or with
    reduction "sum" their sum; and the number of tokens. With `lora`, the adapter acts on the rows
    `visual` marks (a (T_b,) bool mask per sequence) or on every row when visual is None. Runs on
    the device the sequences are on, in bf16 autocast (amp=False: in f32; None: AMP)."""
    T = max(s[0].shape[0] for s in seqs)
    B, D = len(seqs), seqs[0][0].shape[1]
    dev = seqs[0][0].device
    pos = torch.zeros(B, T, device=dev)
    rows_mask = None if visual is None else torch.zeros(B, T, dtype=torch.bool, device=dev)
    allowed = torch.zeros(B, T, T, dtype=torch.bool, device=dev)
    allowed[:, torch.arange(T, device=dev), torch.arange(T, device=dev)] = True  # padding rows attend to themselves
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
        tgt.append(torch.as_tensor(targets[b], dtype=torch.long, device=dev))
        bi.append(torch.full((len(r),), b, device=dev))
    x = torch.stack(xs)
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=AMP if amp is None else amp):
        h = bb.hidden(x, pos, allowed, lora, rows_mask)
        sel = h[torch.cat(bi), torch.cat(rows)]
        logits = sel @ bb.embed.weight.T
    if logits_out is not None:
        logits_out.append(logits)  # one row per target token, in order: what distillation compares
    return F.cross_entropy(logits.float(), torch.cat(tgt), reduction=reduction), int(sum(len(t) for t in tgt))


@torch.no_grad()
def teacher_logits(bb, prefixes, texts, amp=None):
    """The backbone reading the full text (the distillation teacher): for each sequence, the
    token ids of its prefix (the chunks the student sees as images) then of its text, causal,
    positions 0..; returns the logits that predict each text token, rows in order (the first
    text token is predicted at the prefix's last token). The bare backbone: no adapter."""
    dev = bb.embed.weight.device
    seqs = [list(map(int, p)) + list(map(int, t)) for p, t in zip(prefixes, texts)]
    T = max(len(q) for q in seqs)
    ids = torch.zeros(len(seqs), T, dtype=torch.long, device=dev)
    for b, q in enumerate(seqs):
        ids[b, :len(q)] = torch.as_tensor(q, device=dev)
    pos = torch.arange(T, device=dev, dtype=torch.float32).expand(len(seqs), T)
    mask = torch.ones(T, T, dtype=torch.bool, device=dev).tril().expand(len(seqs), T, T)
    rows, bi = [], []
    for b, (p, t) in enumerate(zip(prefixes, texts)):
        rows.append(torch.arange(len(p) - 1, len(p) - 1 + len(t), device=dev))
        bi.append(torch.full((len(t),), b, device=dev))
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=AMP if amp is None else amp):
        h = bb.hidden(bb.embed(ids), pos, mask)
        return (h[torch.cat(bi), torch.cat(rows)] @ bb.embed.weight.T).float()


def distill_sum(student, teacher, temperature=1.0):
    """Sum over rows of KL(teacher || student) on softmax(logits / T), times T^2 (so that the
    gradient's scale does not depend on T)."""
    t = F.log_softmax(teacher / temperature, dim=-1)
    s_ = F.log_softmax(student.float() / temperature, dim=-1)
    return (t.exp() * (t - s_)).sum() * temperature ** 2


# ---------------------------------------------------------------- training

def aux_terms(model, ds, idx, aux_logits, cfg):
    """The reading objective over images idx: (weighted cross-entropy summed over cells, the sum
    of the weights, cells with ink read right, cells with ink). Empty cells weigh 0.2."""
    r = cfg["render"]
    region = 16 * model.merge
    tg = torch.stack([ds.aux_targets(i, region, model.slot_h, model.slot_w, r["line_height"]) for i in idx])
    logits = aux_logits.float().reshape(-1, N_CLASSES)
    t = tg.reshape(-1).to(logits.device)
    w = torch.where(t == 0, 0.2, 1.0)
    total = (F.cross_entropy(logits, t, reduction="none") * w).sum()
    with torch.no_grad():
        ink = t != 0
        right = int((logits.argmax(-1)[ink] == t[ink]).sum().item())
    return total, float(w.sum().item()), right, int(ink.sum().item())


def aux_loss(model, ds, idx, aux_logits, cfg):
    """(mean of aux_terms' weighted loss, per-cell accuracy on cells with ink)."""
    total, weight, right, ink = aux_terms(model, ds, idx, aux_logits, cfg)
    return total / weight, (right / ink if ink else 0.0)


def sample_items(rng, ds, stage, sched, ocr_ids, n):
    """The global batch of one step: n items drawn with rng. Stage A: chunk indices to read. B and
    C: (instruction ids, [chunks shown as visual blocks, in order], text ids of the chunk to
    predict): OCR (the OCR prompt, a chunk, its own text), continuation (B: a chunk, the next
    chunk's text) or OLM (C: up to max_blocks earlier chunks of a document, the next one's text)."""
    items = []
    for _ in range(n):
        if stage == "A":
            items.append(rng.randrange(ds.n))
            continue
        r = rng.random()
        if stage == "B":
            kind = "ocr" if r < sched.get("ocr_share_B", 0.7) else "cont"
        else:
            kind = "ocr" if r < sched.get("ocr_share_C", 0.3) else "olm"
        if kind == "ocr" or not ds.followers:
            i = rng.randrange(ds.n)
            items.append((list(ocr_ids), [i], ds.tokens[i][: sched["max_text"]]))
        else:
            j = ds.followers[rng.randrange(len(ds.followers))]
            # Earlier chunks of the same document, at most max_blocks of them.
            k = 1
            kmax = 1 if kind == "cont" else sched.get("max_blocks", 3)
            while k < kmax and j - k - 1 >= 0 and ds.docs[j - k - 1] == ds.docs[j] and ds.index[j - k - 1] == ds.index[j] - k - 1:
                k += 1
            k = rng.randint(1, k)
            items.append(([], list(range(j - k, j)), ds.tokens[j][: sched["max_text"]]))
    return items


def step_rng(seed, step):
    """The data order: step s of a run draws its global batch from its own generator, so every
    process of a multi-GPU run draws the same batch and takes its shard of it, and a resumed run
    (any number of processes) continues the same sequence of batches."""
    return random.Random(f"vist2-train:{seed}:{step}")


def shard(items, rank, world):
    """Process rank's contiguous share of a global batch (its length is a multiple of world)."""
    n = len(items) // world
    return items[rank * n:(rank + 1) * n]


class StepLoss(nn.Module):
    """One step's loss on one process's shard, as a module: the DDP wrapper of a multi-process run
    wraps this, so every trained parameter (encoder, aligner, reading head, adapter) is used inside
    its forward. Each term is a sum over the shard divided by the count over the whole global
    batch (one all-reduce of the counts), times the number of processes, because DDP averages the
    processes' gradients: N processes with shards of a batch step exactly as one process with
    the whole batch does (up to summation order). The frozen backbone and the data are held
    outside the module tree, so that DDP neither broadcasts nor buckets them."""

    def __init__(self, model, bb, ds, cfg, sched, world):
        super().__init__()
        self.model = model
        self.outside = (bb, ds)
        self.cfg, self.sched, self.world = cfg, sched, world
        self.amp = AMP  # bf16 autocast (tests compare in f32)

    def forward(self, stage, items):
        model, (bb, ds), cfg, sched = self.model, self.outside, self.cfg, self.sched
        dev = bb.embed.weight.device
        m = model.gh * model.gw // model.merge ** 2
        if stage == "A":
            images, specs = list(items), []
        else:
            images, specs = [], []
            for instr, chunks, text in items:
                specs.append((instr, list(range(len(images), len(images) + len(chunks))), text))
                images += chunks
        # head_only_A: stage A fits only the reading head (a run started with --init from a trained
        # encoder, whose reading head starts fresh, fits the head before stage C's 0.1 x reading
        # loss sends its gradient into the encoder).
        head_only = stage == "A" and bool(sched.get("head_only_A", False))
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.amp):
            v, aux = model(ds.pixels(images).to(dev, non_blocking=True), head_only=head_only)
        v = v.float()
        a_sum, a_weight, right, ink = aux_terms(model, ds, images, aux, cfg)
        # Scale: each visual token's RMS against the RMS of the backbone's token embeddings. Left
        # alone, the aligner's tanh saturates (most outputs near +-1, RMS ~6x a token embedding's),
        # which starves it of gradient; scale_weight > 0 pulls visual tokens to the scale of text.
        # (Free visual tokens optimised for OCR settle at ~3x, Training/capacity.py; see
        # Training/EXPERIMENTS.md before using it.)
        ratio = v.pow(2).mean(-1).sqrt() / bb.embed_rms
        s_sum = (ratio - 1).pow(2).sum()
        l_sum, n_text, n_seq = torch.zeros((), device=dev), 0, 0
        d_sum, n_distill = torch.zeros((), device=dev), 0
        dw = sched.get("distill_weight", 0.0) if stage != "A" else 0.0
        if specs:
            seqs, targets, shapes = [], [], []
            for instr, slots, text in specs:
                e, p, a, r = build(bb, list(instr), [v[s] for s in slots], text, m, causal_blocks(cfg))
                seqs.append((e, p, a, r))
                targets.append(text)
                shapes.append((e, len(instr), len(slots)))
                n_seq += e.shape[0]
            logits = [] if dw > 0 else None
            l_sum, n_text = lm_loss(bb, seqs, targets, *model.adapted(shapes), reduction="sum", amp=self.amp, logits_out=logits)
            if dw > 0:
                # Distillation (retention): on the sequences that continue a document (no
                # instruction: continuation and OLM), the student reading earlier chunks as images
                # matches the next chunk's distributions of the backbone reading them as text.
                rows, start, prefixes, texts = [], 0, [], []
                for (instr, chunks, text) in items:
                    if not instr:
                        rows.append(torch.arange(start, start + len(text), device=dev))
                        prefixes.append(np.concatenate([ds.tokens[c] for c in chunks]))
                        texts.append(text)
                    start += len(text)
                if rows:
                    teacher = teacher_logits(bb, prefixes, texts, amp=self.amp)
                    d_sum = distill_sum(logits[0][torch.cat(rows)], teacher, sched.get("distill_temperature", 1.0))
                    n_distill = sum(len(t) for t in texts)
        # Global counts (and sums, for the log) over every process's shard.
        stats = torch.tensor([l_sum.item(), a_sum.item(), s_sum.item(), ratio.sum().item(), n_text, a_weight, ratio.numel(),
                              right, ink, n_seq, len(images), d_sum.item(), n_distill], dtype=torch.float64, device=dev)
        if self.world > 1:
            dist.all_reduce(stats)
        L, A, S, R, n_text_all, a_weight_all, n_vis, right_all, ink_all, seq_all, img_all, D, n_distill_all = stats.tolist()
        sw = sched.get("scale_weight", 0.0)
        loss = self.world * (a_sum / a_weight_all * (1.0 if stage == "A" else sched.get("aux_weight", 0.1)) + sw * s_sum / n_vis)
        info = {"aux": A / a_weight_all, "aux_acc": right_all / ink_all if ink_all else 0.0, "v_rms": R / n_vis}
        if stage != "A":
            loss = loss + self.world * l_sum / max(n_text_all, 1)
            info.update({"lm": L / max(n_text_all, 1), "tokens": int(n_text_all), "seq_tokens": int(seq_all)})
        if n_distill_all:
            loss = loss + self.world * dw * d_sum / n_distill_all
            info["kl"] = D / n_distill_all
        info["images"] = int(img_all)
        # The loss as one process with the whole batch would report it.
        info["loss"] = (info.get("lm", 0.0) + info["aux"] * (1.0 if stage == "A" else sched.get("aux_weight", 0.1)) + sw * S / n_vis
                        + dw * info.get("kl", 0.0))
        return loss, info


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
    causal, zeros = causal_blocks(cfg), torch.zeros(m, bb.dim, device=bb.embed.weight.device)
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
    dev = bb.embed.weight.device
    idx, fol = eval_chunks(ds, n_eval)
    causal = causal_blocks(cfg)
    accs, ocr, olm = [], [], []
    for i in idx:
        v, aux = model(ds.pixels([i]).to(dev))
        accs.append(aux_loss(model, ds, [i], aux, cfg)[1])
        if stage != "A":
            ocr.append(sequence_loss(bb, list(ocr_ids), v[0], ds.tokens[i], m, causal, model))
    if stage != "A":
        for j in fol:
            v, _ = model(ds.pixels([j - 1]).to(dev))
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


class Runtime:
    """Where this process trains: its device and its place in a multi-process run. torchrun sets
    RANK, WORLD_SIZE and LOCAL_RANK; without them there is one process. CUDA processes talk
    over NCCL (one GPU each: LOCAL_RANK's), CPU processes over Gloo."""

    def __init__(self, device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda":
            if not torch.cuda.is_available():
                raise SystemExit("train.py: --device cuda, but PyTorch sees no CUDA device")
            torch.cuda.set_device(local)
            self.dev = torch.device("cuda", local)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        elif device == "cpu":
            self.dev = torch.device("cpu")
        else:
            raise SystemExit(f"train.py: --device must be cpu, cuda or auto, got {device!r}")
        if self.world > 1:
            dist.init_process_group("nccl" if self.dev.type == "cuda" else "gloo")
        self.main = self.rank == 0

    def agree(self, flag):
        """Rank 0's decision, for every process (whether to stop: only rank 0's clock counts)."""
        if self.world == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.dev)
        dist.broadcast(t, 0)
        return bool(t.item())

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def smallest(self, n):
        if self.world == 1:
            return n
        t = torch.tensor([float(n)], device=self.dev)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    def same_weights(self, model):
        """True when every process holds bit-identical trained weights (what DDP keeps in step)."""
        if self.world == 1:
            return True
        h = hashlib.sha256()
        for _, p in sorted(model.state_dict().items()):
            h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        mine = torch.tensor([int.from_bytes(h.digest()[:7], "little")], dtype=torch.int64, device=self.dev)
        every = [torch.zeros_like(mine) for _ in range(self.world)]
        dist.all_gather(every, mine)
        return all(torch.equal(e, every[0]) for e in every)

    def close(self):
        if self.world > 1:
            dist.barrier()  # a Gloo process that leaves while another still works aborts
            dist.destroy_process_group()


def batches(sched, batch):
    """Per-process batch of each stage: the schedule's, or --batch N for stages B and C with stage
    A scaled by the schedule's ratio."""
    out = {st: int(sched["batch_" + st]) for st in "ABC"}
    if batch:
        out = {"A": max(1, batch * out["A"] // out["B"]), "B": batch, "C": batch}
    return out


def auto_batch(step, rt, ds, sched, ocr_ids, probe=4, cap=64):
    """--batch auto on CUDA: the per-process batch of stages B and C that fills about half of the
    GPU's free memory, from the peak memory of one probe step of `probe` stage-C sequences (the
    longest: several blocks and a chunk of text; nothing is updated). The same on every process
    (the smallest); at most `cap`."""
    if rt.dev.type != "cuda":
        return 0
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(rt.dev)
    base = torch.cuda.memory_allocated(rt.dev)
    items = sample_items(random.Random("vist2-probe"), ds, "C", dict(sched, ocr_share_C=0.0), ocr_ids, probe)
    loss, _ = step(stage="C", items=items)
    loss.backward()
    step.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated(rt.dev) - base
    del loss
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(rt.dev)
    per = max(1, peak // probe)
    n = rt.smallest(max(1, min(cap, int(0.5 * free / per))))
    if rt.main:
        print(f"batch auto: {peak / 2**30:.2f} GiB for {probe} sequences, {free / 2**30:.1f} GiB free -> {n} per process",
              flush=True)
    return n


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", "--run", dest="run", required=True, help="run directory with run.json (--run-dir under torchrun, whose own --run-path --run would abbreviate)")
    ap.add_argument("--minutes", type=float, default=120, help="stop (with a checkpoint) after this long")
    ap.add_argument("--checkpoint-minutes", type=float, default=5)
    ap.add_argument("--max-steps", type=int, default=0, help="stop after this step (0 = the schedule's end)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda (one GPU per process: LOCAL_RANK's) or auto")
    ap.add_argument("--batch", default="0", help="per-process batch of stages B and C (stage A scaled by the "
                    "schedule's ratio); auto: sized to the GPU's memory; 0: the schedule's")
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "f32"],
                    help="bf16 autocast or f32; auto: bf16 on CUDA and on CPUs with AVX-512, f32 elsewhere")
    ap.add_argument("--init", help="a new run starts from this model directory's vision encoder and aligner (same "
                    "geometry and sizes; the reading head starts fresh); ignored when the run has a checkpoint")
    args = ap.parse_args()
    if args.batch != "auto" and not (args.batch.isdigit()):
        raise SystemExit(f"train.py: --batch must be a number or auto, got {args.batch!r}")
    rt = Runtime(args.device)
    global AMP
    AMP = amp_default(rt.dev) if args.precision == "auto" else args.precision == "bf16"
    if args.threads:
        torch.set_num_threads(args.threads)
    with open(os.path.join(args.run, "run.json")) as f:
        run = json.load(f)
    sched = run["schedule"]
    with open(run["model_config"]) as f:
        cfg = json.load(f)
    ocr_ids = run["ocr_prompt_ids"]
    cfg["ocr_prompt"] = run["ocr_prompt"]
    seed = run.get("seed", 1)

    bb = Backbone(run["backbone"])
    for p in bb.parameters():
        p.requires_grad_(False)
    bb.to(rt.dev)
    train = Dataset(run["train"], run.get("max_train_chunks", 0))
    held = Dataset(run["heldout"], run.get("max_heldout_chunks", 0))
    torch.manual_seed(seed)
    model = Trainable(cfg, bb.dim, train.advance())
    model.init_weights(seed)
    model.add_adapter(bb, run.get("adapter"))
    ckpt = os.path.join(args.run, "checkpoint.pt")
    step, best = 0, {}
    elapsed0 = 0.0
    if args.init and not os.path.exists(ckpt):
        model.load_model_dir(args.init, cfg, bb)
        if rt.main:
            print(f"initialised from {args.init}", flush=True)
    model.to(rt.dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, betas=(0.9, 0.98))
    if os.path.exists(ckpt):
        st = torch.load(ckpt, map_location="cpu", weights_only=False)
        model.load_state_dict(st["model"])
        # A checkpoint brought back from a GPU run (Training/gpu/) carries no optimiser moments:
        # they start afresh (with the schedule's warm-up behind it, the first steps are full size).
        if "opt" in st:
            opt.load_state_dict(st["opt"])
        step, best, elapsed0 = st["step"], st["best"], st["elapsed"]
        if "torch_rng" in st:
            torch.set_rng_state(st["torch_rng"])
        if rt.main:
            print(f"resumed at step {step} ({elapsed0 / 3600:.2f} h trained)" + ("" if "opt" in st else "; optimiser moments start afresh"),
                  flush=True)
    step_loss = StepLoss(model, bb, train, cfg, sched, rt.world)
    per = batches(sched, 0 if args.batch == "auto" else int(args.batch))
    if args.batch == "auto":
        n = auto_batch(step_loss, rt, train, sched, ocr_ids)
        if n:
            per = batches(sched, n)
    ddp = step_loss
    if rt.world > 1:
        # find_unused_parameters: stage A leaves the adapter (and, without the scale term, the
        # aligner's projection) out of the loss.
        ddp = DDP(step_loss, device_ids=[rt.dev.index] if rt.dev.type == "cuda" else None, find_unused_parameters=True)
    total = sched["steps_A"] + sched["steps_B"] + sched["steps_C"]
    if args.max_steps:
        total = min(total, args.max_steps)
    log = open(os.path.join(args.run, "log.jsonl"), "a") if rt.main else None
    if rt.main:
        print(json.dumps({"device": str(rt.dev), "precision": "bf16" if AMP else "f32", "processes": rt.world,
                          "batch_per_process": per,
                          "global_batch": {k: v * rt.world for k, v in per.items()}}), flush=True)
    t0 = time.time()
    last_ckpt = t0

    def state():
        return {"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "best": best,
                "torch_rng": torch.get_rng_state(), "elapsed": elapsed0 + time.time() - t0, "run": run,
                "processes": rt.world, "batch_per_process": per}

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

    window = {"sec": 0.0, "seq_tokens": 0, "images": 0}
    while step < total and not rt.agree(time.time() - t0 >= args.minutes * 60):
        st_ = stage_at(step, sched)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, sched)
        ts = time.time()
        items = shard(sample_items(step_rng(seed, step), train, st_, sched, ocr_ids, per[st_] * rt.world), rt.rank, rt.world)
        loss, info = ddp(stage=st_, items=items)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if rt.dev.type == "cuda":
            torch.cuda.synchronize(rt.dev)
        step += 1
        sec = time.time() - ts
        # Throughput over the whole run (every process): positions through the backbone and
        # images through the encoder per second.
        info.update({"step": step, "stage": st_, "lr": opt.param_groups[0]["lr"], "sec": round(sec, 3),
                     "tok_s": round(info.get("seq_tokens", 0) / sec, 1), "img_s": round(info["images"] / sec, 2),
                     "hours": round((elapsed0 + time.time() - t0) / 3600, 4)})
        for k in window:
            window[k] += sec if k == "sec" else info.get(k, 0)
        if rt.main:
            log.write(json.dumps(info) + "\n")
            if step % 10 == 0:
                log.flush()
                info["tok_s_10"] = round(window["seq_tokens"] / window["sec"], 1)
                info["img_s_10"] = round(window["images"] / window["sec"], 2)
                print(json.dumps(info), flush=True)
        if step % 10 == 0:
            window = dict.fromkeys(window, 0)
        boundary = step in (sched["steps_A"], sched["steps_A"] + sched["steps_B"])
        if step % sched.get("eval_every", 200) == 0 or boundary or step == total:
            if rt.main:
                do_eval()
            rt.barrier()
        if rt.main and time.time() - last_ckpt > args.checkpoint_minutes * 60:
            save_checkpoint(ckpt, state())
            last_ckpt = time.time()
    if rt.main:
        save_checkpoint(ckpt, state())
        log.close()
        print(f"stopped at step {step} of {total}", flush=True)
    if not rt.same_weights(model):
        raise SystemExit("train.py: the processes ended with different weights")
    if rt.main and rt.world > 1:
        print(f"{rt.world} processes agree on the weights", flush=True)
    rt.close()


if __name__ == "__main__":
    main()
