#!/usr/bin/env python3
"""Make a tiny random-weight VIST2 model and golden logits from the PyTorch reference.

    python3 Training/make_tiny_golden.py --vist2ctl .build/release/vist2ctl

Writes (committed) Tests/VistEngineTests/Fixtures/tiny-vist2/:
  config.json, vision.safetensors           the VIST2 model (ViT 2 layers, D=32, merge 2)
  backbone/{config.json,model.safetensors,tokenizer.json}   a tiny random Llama, byte-level vocab
  golden.json, golden.f32                  the scenario and the reference logits
  golden-boundary.*, golden-causal.*       the same with boundary tokens around each block, and
                                           with those and causal attention inside each block
  adapter/, adapter-partial/, adapter-bf16/   LoRA adapters written by Hugging Face PEFT, each with
                                           peft-logits.* (transformers + PEFT on plain text)
  golden-lora-visual.*, golden-lora-all.*  the scenario with `adapter` in each scope

The adapter goldens need transformers and peft besides Training/requirements.txt.

Scenario: an instruction, a document cut by the engine's chunker (all chunks but the last become
images), then a teacher-forced continuation that fills the last chunk to L tokens and goes
through two more chunk-boundary swaps. Chunk images come from the project's renderer
(`vist2ctl render --raw`), never from a second renderer. The reference evaluates the whole
interleaved sequence at once with the VIST2 mask and positions (training style); the engine
must reproduce its logits incrementally with KV eviction.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vist2.model import VIST2  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "Tests/VistEngineTests/Fixtures/tiny-vist2")
FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf"
FONT_SHA = "0f5db4f1749979d961019838b160bec74abdf7f9eca69553fe1aa856bbff49a4"
VOCAB = 288

INSTRUCTION = "Summarize:\n"
DOCUMENT = ("The sketch renderer draws text.\nEach chunk becomes an image.\n"
            "Visual tokens replace text.\nThe cache keeps only images.\nNew text goes on here.")
CONTINUATION = ("and the model keeps writing while old chunks turn into pictures; "
                "two swaps later the cache still holds few tokens.")


def byte_level_chars():
    """GPT-2's bytes_to_unicode order, so token id == byte value."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


def write_backbone(d, gen):
    os.makedirs(d, exist_ok=True)
    dim, heads, kv, hd, ffn, layers = 64, 4, 2, 16, 128, 2
    cfg = {"model_type": "llama", "vocab_size": VOCAB, "hidden_size": dim, "intermediate_size": ffn,
           "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": hd,
           "max_position_embeddings": 512, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
           "tie_word_embeddings": True, "hidden_act": "silu"}
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    r = lambda *s, scale: (torch.randn(*s, generator=gen) * scale).float()  # noqa: E731
    sd = {"model.embed_tokens.weight": r(VOCAB, dim, scale=1.0), "model.norm.weight": 1 + r(dim, scale=0.1)}
    for i in range(layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = 1 + r(dim, scale=0.1)
        sd[p + "post_attention_layernorm.weight"] = 1 + r(dim, scale=0.1)
        sd[p + "self_attn.q_proj.weight"] = r(heads * hd, dim, scale=0.15)
        sd[p + "self_attn.k_proj.weight"] = r(kv * hd, dim, scale=0.15)
        sd[p + "self_attn.v_proj.weight"] = r(kv * hd, dim, scale=0.15)
        sd[p + "self_attn.o_proj.weight"] = r(dim, heads * hd, scale=0.1)
        sd[p + "mlp.gate_proj.weight"] = r(ffn, dim, scale=0.15)
        sd[p + "mlp.up_proj.weight"] = r(ffn, dim, scale=0.15)
        sd[p + "mlp.down_proj.weight"] = r(dim, ffn, scale=0.1)
    save_file(sd, os.path.join(d, "model.safetensors"))
    chars = byte_level_chars()
    tok = {"model": {"type": "BPE", "vocab": {c: i for i, c in enumerate(chars)}, "merges": []},
           "added_tokens": [{"id": 256, "content": "<|endoftext|>", "special": True}],
           "pre_tokenizer": {"type": "ByteLevel"}}
    with open(os.path.join(d, "tokenizer.json"), "w") as f:
        json.dump(tok, f, ensure_ascii=False)


def write_vist2(d, gen):
    vision = {"image_height": 64, "image_width": 128, "patch_size": 16, "num_channels": 1, "hidden_size": 32,
              "num_layers": 2, "num_heads": 2, "intermediate_size": 64, "layer_norm_eps": 1e-6}
    m = (64 // 16) * (128 // 16) // 4
    cfg = {"format_version": 1, "model_type": "vist2", "backbone": "backbone", "vision": vision,
           "aligner": {"merge": 2},
           "render": {"font": FONT, "font_sha256": FONT_SHA, "pixel_size": 8, "line_height": 9,
                      "width": 128, "height": 64, "margin": 2, "tab_width": 4},
           "chunk": {"length": 4 * m, "ratio": 4}}
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    # Random vision weights: build the reference modules, randomise, save under SigLIP names.
    with open(os.path.join(d, "vision.safetensors"), "wb"):
        pass
    model = VIST2.__new__(VIST2)
    torch.nn.Module.__init__(model)
    from vist2.model import Aligner, VisionConfig, VisionEncoder
    vc = VisionConfig(**vision)
    model.vision = VisionEncoder(vc)
    model.aligner = Aligner(32, 64, 2, 4, 8)
    with torch.no_grad():
        for p in list(model.vision.parameters()) + list(model.aligner.parameters()):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        for name, p in model.vision.named_parameters():
            if "layer_norm" in name and name.endswith("weight"):
                p.add_(1.0)
    save_file({k: v.detach().contiguous() for k, v in model.vision_state_dict().items()}, os.path.join(d, "vision.safetensors"))


def render(vist2ctl, model_dir, text):
    """The project's renderer: chunk texts and raw pixels of `text`."""
    with tempfile.TemporaryDirectory() as t:
        src = os.path.join(t, "doc.txt")
        with open(src, "w") as f:
            f.write(text)
        out = os.path.join(t, "out")
        res = subprocess.run([vist2ctl, "render", "--local", "--model", model_dir, "--raw", "--json", "--out", out, src],
                             capture_output=True, text=True, check=True)
        summary = json.loads(res.stdout)
        chunks = []
        for c in summary["chunk_list"]:
            px = np.fromfile(os.path.join(out, c["raw"]), dtype="<f4").reshape(64, 128)
            chunks.append((c["text"], torch.from_numpy(px.copy())))
        return chunks


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vist2ctl", required=True)
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(20261125)
    os.makedirs(OUT, exist_ok=True)
    write_backbone(os.path.join(OUT, "backbone"), gen)
    write_vist2(OUT, gen)
    torch.set_grad_enabled(False)
    scenario(args, OUT, "golden")
    # The same model with boundary tokens around each block, and with those and causal
    # attention inside each block (config patched in a copy; the golden names the patch).
    for name, patch in (("golden-boundary", {"special_tokens": BOUNDARY}),
                        ("golden-causal", {"special_tokens": BOUNDARY, "block_attention": "causal"})):
        patched_scenario(args, name, patch)
    # Backbone adapters made by Hugging Face PEFT itself (its own files and names), checked
    # against transformers + PEFT on plain text, then the VIST2 scenario with each scope.
    agen = torch.Generator().manual_seed(20261201)
    for name, spec in ADAPTERS.items():
        write_peft_adapter(os.path.join(OUT, "backbone"), os.path.join(OUT, name), spec, agen)
    for scope in ("visual", "all"):
        patched_scenario(args, f"golden-lora-{scope}", {"adapter": {"path": "adapter", "scope": scope}})


def patched_scenario(args, name, patch):
    """The scenario on a copy of the tiny model whose config.json has `patch` applied; the golden
    (which names the patch) goes to OUT."""
    import shutil
    with tempfile.TemporaryDirectory() as t:
        d = os.path.join(t, "m")
        shutil.copytree(OUT, d)
        with open(os.path.join(d, "config.json")) as f:
            cfg = json.load(f)
        cfg.update(patch)
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(cfg, f, indent=1)
        scenario(args, d, name, write_to=OUT)


# Adapters, written by PEFT: one on every projection, and one on a few projections of one layer
# with rank-stabilised scaling.
ADAPTERS = {
    "adapter": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"]},
    "adapter-partial": {"r": 2, "lora_alpha": 3, "target_modules": ["q_proj", "v_proj", "down_proj"],
                        "layers_to_transform": [1], "use_rslora": True},
    "adapter-bf16": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                  "up_proj", "down_proj"], "dtype": torch.bfloat16},
}
PEFT_TEXT = "Plain text through the adapted backbone: no images here.\n"


def write_peft_adapter(backbone_dir, out, spec, gen):
    """A random LoRA adapter saved by PEFT's save_pretrained, and the reference's logits for
    PEFT_TEXT with it on every row (<out>/peft-logits.f32, (len, vocab)), checked against what
    transformers + PEFT give for the same files."""
    try:
        from peft import LoraConfig, get_peft_model
        from transformers import LlamaForCausalLM
    except ImportError:
        sys.exit("the adapter goldens need transformers and peft: pip install transformers peft")
    from vist2.lora import LoRA
    from vist2.model import Backbone
    spec = dict(spec)
    dtype = spec.pop("dtype", torch.float32)
    hf = LlamaForCausalLM.from_pretrained(backbone_dir, torch_dtype=torch.float64)
    peft_model = get_peft_model(hf, LoraConfig(lora_dropout=0.0, **spec))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                # Values the saved type holds exactly, so every reader computes with the same ones.
                p.copy_((torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.1).to(dtype).to(torch.float64))
    # Only the factors take the saved type (the base keeps its float32 values).
    lora_params = [p for n, p in peft_model.named_parameters() if "lora_" in n]
    for p in lora_params:
        p.data = p.data.to(dtype)
    peft_model.save_pretrained(out)
    for p in lora_params:
        p.data = p.data.to(torch.float64)
    # PEFT writes target_modules from a set: sort it so a rerun writes the same file.
    with open(os.path.join(out, "adapter_config.json")) as f:
        acfg = json.load(f)
    acfg["target_modules"] = sorted(acfg["target_modules"])
    with open(os.path.join(out, "adapter_config.json"), "w") as f:
        json.dump(acfg, f, indent=2, sort_keys=True)
    if os.path.exists(os.path.join(out, "README.md")):
        os.remove(os.path.join(out, "README.md"))
    ids = torch.tensor([list(PEFT_TEXT.encode("utf-8"))])
    peft_model.double().eval()
    hf_logits = peft_model(input_ids=ids).logits[0]
    # The reference reads the saved files the engine reads.
    bb = Backbone(backbone_dir).double()
    lora = LoRA.load(out, bb).double()
    T = ids.shape[1]
    ours = bb(bb.embed(ids[0]), torch.arange(T, dtype=torch.float64), torch.ones(T, T, dtype=torch.bool).tril(), lora)
    with peft_model.disable_adapter():
        hf_bare = peft_model(input_ids=ids).logits[0]
    bare = bb(bb.embed(ids[0]), torch.arange(T, dtype=torch.float64), torch.ones(T, T, dtype=torch.bool).tril())

    def rel(a, b):
        return ((a - b).abs() / b.abs().clamp(min=1)).max().item()
    # transformers computes RoPE frequencies and RMSNorm statistics in float32 even for a float64
    # model, so the two agree to ~1e-5 with or without the adapter; the adapter moves logits by far more.
    err, err_bare, moved = rel(ours, hf_logits), rel(bare, hf_bare), (bare - ours).abs().max().item()
    assert err < 1e-4 and err_bare < 1e-4 and moved > 1e-2, (err, err_bare, moved)
    ours.float().detach().numpy().astype("<f4").tofile(os.path.join(out, "peft-logits.f32"))
    with open(os.path.join(out, "peft-logits.json"), "w") as f:
        json.dump({"generator": "Training/make_tiny_golden.py", "text": PEFT_TEXT, "rows": T, "vocab": ours.shape[1],
                   "logits": "the reference (Training/vist2/lora.py, float64) with this adapter on every row",
                   "transformers_peft_max_rel_error": err, "transformers_bare_max_rel_error": err_bare,
                   "max_abs_change_by_adapter": moved}, f, indent=1)
    print(f"wrote {out}: PEFT adapter; reference vs transformers+PEFT max relative error {err:.1e} (bare {err_bare:.1e})")


# Boundary tokens for the patched scenarios: the tiny vocabulary's only control token, and a byte.
BOUNDARY = {"vision_start": "<|endoftext|>", "vision_end": "#"}


def scenario(args, model_dir, name, write_to=None):
    write_to = write_to or model_dir
    model = VIST2(model_dir).double()
    L = model.L
    ids = lambda s: torch.tensor(list(s.encode("utf-8")), dtype=torch.long)  # noqa: E731  byte-level, no merges

    doc_chunks = render(args.vist2ctl, model_dir, DOCUMENT)
    finished, last_text = doc_chunks[:-1], doc_chunks[-1][0]
    assert len(finished) >= 2, "the document should give several chunks"
    cont = list(CONTINUATION.encode("utf-8"))
    # Text chunks from the last document chunk on: filled to L tokens each, then swapped.
    stream = list(last_text.encode("utf-8")) + cont
    texts = [stream[i:i + L] for i in range(0, len(stream), L)]
    assert len(texts) >= 3, "the continuation should go through two swaps"
    segments = [{"image": px.double()} for _, px in finished]
    for j, t in enumerate(texts):
        seg = {"text": torch.tensor(t, dtype=torch.long)}
        if j < len(texts) - 1:
            swapped = render(args.vist2ctl, model_dir, bytes(t).decode("utf-8"))
            assert len(swapped) == 1, "a swapped chunk must fit one image"
            seg["image"] = swapped[0][1].double()
        segments.append(seg)
    logits, _ = model(ids(INSTRUCTION), segments)
    len0 = len(last_text.encode("utf-8"))
    # Row j predicts continuation token j: the text token just before it in the text stream.
    rows = logits[len0 - 1: len0 - 1 + len(cont)].float().numpy()
    rows.astype("<f4").tofile(os.path.join(write_to, name + ".f32"))
    P = len(INSTRUCTION.encode("utf-8"))
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    golden = {"magic": "vist2-golden", "version": 1, "generator": "Training/make_tiny_golden.py",
              "torch": torch.__version__, "instruction": INSTRUCTION, "document": DOCUMENT,
              "continuation": CONTINUATION, "chunk_length": L, "visual_tokens": model.m,
              "document_chunks": len(doc_chunks), "rows": rows.shape[0], "vocab": rows.shape[1],
              "special_tokens": cfg.get("special_tokens"), "block_attention": cfg.get("block_attention"),
              "adapter": cfg.get("adapter"),
              "kv_after_swaps": [P + (len(finished) + s + 1) * model.block for s in range(len(texts) - 1)]}
    with open(os.path.join(write_to, name + ".json"), "w") as f:
        json.dump(golden, f, indent=1)
    print(f"wrote {name}: {len(doc_chunks)} document chunks, {len(texts) - 1} swaps, {rows.shape[0]} logit rows")


if __name__ == "__main__":
    main()
