"""The VIST2 forward pass in PyTorch: backbone (Llama / Qwen3), vision encoder (ViT, SigLIP
layout), tanh-linear aligner with the optional s x s merge, and the interleaved sequence with the
mask and compressed positions of docs/MODEL.md section 3.

It reads the same model directory as the Swift engine (config.json, vision.safetensors, a
Hugging Face backbone directory) and the renderer's raw output (`vist2ctl render --raw`:
float32 pixels already normalised to [-1, 1]), so training and inference share one renderer.
Written as training code: plain nn.Modules, batched, differentiable; the backbone can be frozen.
"""
import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from .lora import SCOPES, LoRA


# ---------------------------------------------------------------- backbone

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope(x, pos, base):
    """Rotate-half RoPE (Hugging Face layout). x: (..., T, heads, hd); pos: (..., T) positions."""
    hd = x.shape[-1]
    inv = base ** (-torch.arange(0, hd // 2, dtype=torch.float64, device=x.device) * 2 / hd)
    ang = pos.to(torch.float64)[..., None] * inv
    cos, sin = ang.cos().to(x.dtype)[..., None, :], ang.sin().to(x.dtype)[..., None, :]
    a, b = x[..., : hd // 2], x[..., hd // 2:]
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)


class Backbone(nn.Module):
    """A Llama / Qwen3 decoder from a Hugging Face directory (config.json + model.safetensors) or a
    GGUF file."""

    def __init__(self, directory):
        """directory: a Hugging Face directory, or a .gguf file (vist2/gguf.py dequantizes it)."""
        super().__init__()
        if os.path.isfile(directory) and directory.endswith(".gguf"):
            from .gguf import read_backbone
            c, arrays = read_backbone(directory)
            sd = {k: torch.from_numpy(v) for k, v in arrays.items()}
        else:
            with open(os.path.join(directory, "config.json")) as f:
                c = json.load(f)
            sd = load_file(os.path.join(directory, "model.safetensors"))
        self.arch = c["model_type"]
        assert self.arch in ("llama", "qwen3"), self.arch
        self.dim = c["hidden_size"]
        self.heads = c["num_attention_heads"]
        self.kv_heads = c.get("num_key_value_heads", self.heads)
        self.head_dim = c.get("head_dim", self.dim // self.heads)
        self.ffn = c["intermediate_size"]
        self.layers_n = c["num_hidden_layers"]
        self.vocab = c["vocab_size"]
        self.base = c.get("rope_theta", 10000.0)
        self.eps = c.get("rms_norm_eps", 1e-6)
        self.tied = c.get("tie_word_embeddings", False)
        self.embed = nn.Embedding(self.vocab, self.dim)
        self.embed.weight.data = sd["model.embed_tokens.weight"].float()
        # The RMS of the token embeddings: the scale of what the backbone reads at its input.
        self.embed_rms = self.embed.weight.pow(2).mean().sqrt().item()
        self.layers = nn.ModuleList()
        for i in range(self.layers_n):
            p = f"model.layers.{i}."
            L = nn.Module()
            L.attn_norm = RMSNorm(self.dim, self.eps)
            L.attn_norm.weight.data = sd[p + "input_layernorm.weight"].float()
            L.ffn_norm = RMSNorm(self.dim, self.eps)
            L.ffn_norm.weight.data = sd[p + "post_attention_layernorm.weight"].float()
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                w = sd[p + "self_attn." + name + ".weight"].float()
                lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
                lin.weight.data = w
                setattr(L, name, lin)
            for name in ("gate_proj", "up_proj", "down_proj"):
                w = sd[p + "mlp." + name + ".weight"].float()
                lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
                lin.weight.data = w
                setattr(L, name, lin)
            if self.arch == "qwen3":
                L.q_norm = RMSNorm(self.head_dim, self.eps)
                L.q_norm.weight.data = sd[p + "self_attn.q_norm.weight"].float()
                L.k_norm = RMSNorm(self.head_dim, self.eps)
                L.k_norm.weight.data = sd[p + "self_attn.k_norm.weight"].float()
            self.layers.append(L)
        self.norm = RMSNorm(self.dim, self.eps)
        self.norm.weight.data = sd["model.norm.weight"].float()
        self.lm_head = None if self.tied else sd["lm_head.weight"].float()

    def forward(self, x, pos, mask, lora=None, rows=None):
        """x: (T, dim) input embeddings; pos: (T,) positions; mask: (T, T) bool, True = may attend;
        lora, rows: see `hidden` (rows (T,)). Returns logits (T, vocab)."""
        return self.hidden(x[None], pos[None], mask[None], lora, None if rows is None else rows[None])[0] @ self.output_weight().T

    def output_weight(self):
        return self.embed.weight if self.tied else self.lm_head

    def hidden(self, x, pos, mask, lora=None, rows=None, layers=None):
        """Batched: x (B, T, dim), pos (B, T), mask (B, T, T) bool (every row must allow at least
        one key). With `lora` (vist2.lora.LoRA), its low-rank term is added to the projections it
        adapts, on the rows where `rows` (B, T) bool is True, or on every row when rows is None;
        other rows are computed by the backbone's weights exactly. Returns the final-normed hidden
        states (B, T, dim); with `layers`, the residual stream after the first `layers` layers
        instead (no final norm; 0: the input embeddings)."""
        B, T, _ = x.shape
        g = self.heads // self.kv_heads
        bias = torch.zeros(B, 1, T, T, dtype=x.dtype, device=x.device).masked_fill(~mask[:, None], float("-inf"))

        def proj(i, L, name, h):
            y = getattr(L, name)(h)
            if lora is None or not lora.has(i, name):
                return y
            d = y + lora.delta(i, name, h)
            return d if rows is None else torch.where(rows[..., None], d, y)

        for i, L in enumerate(self.layers if layers is None else self.layers[:layers]):
            h = L.attn_norm(x)
            q = proj(i, L, "q_proj", h).view(B, T, self.heads, self.head_dim)
            k = proj(i, L, "k_proj", h).view(B, T, self.kv_heads, self.head_dim)
            v = proj(i, L, "v_proj", h).view(B, T, self.kv_heads, self.head_dim)
            if self.arch == "qwen3":
                q, k = L.q_norm(q), L.k_norm(k)
            q, k = rope(q, pos, self.base).transpose(1, 2), rope(k, pos, self.base).transpose(1, 2)
            k = k.repeat_interleave(g, dim=1)
            v = v.transpose(1, 2).repeat_interleave(g, dim=1)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
            x = x + proj(i, L, "o_proj", a.transpose(1, 2).reshape(B, T, -1))
            h = L.ffn_norm(x)
            x = x + proj(i, L, "down_proj", F.silu(proj(i, L, "gate_proj", h)) * proj(i, L, "up_proj", h))
        return self.norm(x) if layers is None else x


# ---------------------------------------------------------------- vision

@dataclass
class VisionConfig:
    image_height: int
    image_width: int
    patch_size: int
    num_channels: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    layer_norm_eps: float


class ViTLayer(nn.Module):
    def __init__(self, c):
        super().__init__()
        D = c.hidden_size
        self.layer_norm1 = nn.LayerNorm(D, eps=c.layer_norm_eps)
        self.layer_norm2 = nn.LayerNorm(D, eps=c.layer_norm_eps)
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(D, D) for _ in range(4))
        self.fc1 = nn.Linear(D, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, D)
        self.heads = c.num_heads

    def forward(self, x):  # (B, P, D)
        B, P, D = x.shape
        hd = D // self.heads
        h = self.layer_norm1(x)
        q = self.q_proj(h).view(B, P, self.heads, hd).transpose(1, 2)
        k = self.k_proj(h).view(B, P, self.heads, hd).transpose(1, 2)
        v = self.v_proj(h).view(B, P, self.heads, hd).transpose(1, 2)
        a = (q @ k.transpose(-1, -2) / math.sqrt(hd)).softmax(-1) @ v
        x = x + self.out_proj(a.transpose(1, 2).reshape(B, P, D))
        return x + self.fc2(F.gelu(self.fc1(self.layer_norm2(x)), approximate="tanh"))


class VisionEncoder(nn.Module):
    """ViT with 16x16 patches in the SigLIP layout; no CLS token; post-LayerNorm."""

    def __init__(self, c):
        super().__init__()
        self.c = c
        self.patch_embedding = nn.Conv2d(c.num_channels, c.hidden_size, c.patch_size, stride=c.patch_size)
        patches = (c.image_height // c.patch_size) * (c.image_width // c.patch_size)
        self.position_embedding = nn.Embedding(patches, c.hidden_size)
        self.layers = nn.ModuleList(ViTLayer(c) for _ in range(c.num_layers))
        self.post_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, pixels):  # (B, C, H, W) in [-1, 1] -> (B, P, D)
        x = self.patch_embedding(pixels).flatten(2).transpose(1, 2)
        x = x + self.position_embedding.weight[None]
        for layer in self.layers:
            x = layer(x)
        return self.post_layernorm(x)


class Aligner(nn.Module):
    """v = tanh(x W + b) on s x s concatenated neighbouring patches (row-major within the window)."""

    def __init__(self, vision_dim, llm_dim, merge, grid_h, grid_w):
        super().__init__()
        self.merge, self.grid_h, self.grid_w = merge, grid_h, grid_w
        self.proj = nn.Linear(merge * merge * vision_dim, llm_dim)

    def merged(self, x):  # (B, P, D) -> (B, P/s², s²·D): each window's patches, concatenated
        B, P, D = x.shape
        s = self.merge
        x = x.view(B, self.grid_h // s, s, self.grid_w // s, s, D).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(B, (self.grid_h // s) * (self.grid_w // s), s * s * D)

    def forward(self, x):  # (B, P, D) -> (B, P/s², llm_dim)
        return torch.tanh(self.proj(self.merged(x)))


def vision_state_dict(vision, aligner):
    """Tensors under Hugging Face SigLIP names, plus aligner.weight / aligner.bias: the layout of
    a model directory's vision.safetensors."""
    out = {}
    for k, v in vision.state_dict().items():
        k = k.replace("layers.", "encoder.layers.").replace("q_proj", "self_attn.q_proj").replace("k_proj", "self_attn.k_proj")
        k = k.replace("v_proj", "self_attn.v_proj").replace("out_proj", "self_attn.out_proj")
        k = k.replace("fc1", "mlp.fc1").replace("fc2", "mlp.fc2")
        if k.startswith("patch_embedding") or k.startswith("position_embedding"):
            k = "embeddings." + k
        out["vision_model." + k] = v
    out["aligner.weight"] = aligner.proj.weight
    out["aligner.bias"] = aligner.proj.bias
    return out


def load_vision(vision, aligner, path):
    """Loads a model directory's vision.safetensors into the encoder and aligner."""
    sd = load_file(path)
    names = vision_state_dict(vision, aligner)
    missing = [k for k in names if k not in sd]
    if missing:
        raise ValueError(f"{path} lacks {missing}")
    with torch.no_grad():
        for k, p in names.items():
            if tuple(sd[k].shape) != tuple(p.shape):
                raise ValueError(f"{path}: {k} has shape {tuple(sd[k].shape)}, expected {tuple(p.shape)}")
            p.copy_(sd[k].float())


# ---------------------------------------------------------------- VIST2

def causal_blocks(cfg):
    """A config's `block_attention`: False for "bidirectional" (the default), True for "causal"."""
    a = cfg.get("block_attention", "bidirectional")
    if a not in ("bidirectional", "causal"):
        raise ValueError(f'block_attention must be "bidirectional" or "causal", got {a!r}')
    return a == "causal"


class VIST2(nn.Module):
    def __init__(self, model_dir):
        super().__init__()
        with open(os.path.join(model_dir, "config.json")) as f:
            self.config = json.load(f)
        cfg = self.config
        backbone = cfg["backbone"]
        self.backbone = Backbone(backbone if os.path.isabs(backbone) else os.path.join(model_dir, backbone))
        vc = VisionConfig(**cfg["vision"])
        self.vision = VisionEncoder(vc)
        gh, gw = vc.image_height // 16, vc.image_width // 16
        self.aligner = Aligner(vc.hidden_size, self.backbone.dim, cfg["aligner"]["merge"], gh, gw)
        self.m = gh * gw // cfg["aligner"]["merge"] ** 2
        self.L = cfg["chunk"]["length"]
        self.load_vision(os.path.join(model_dir, "vision.safetensors"))
        # Optional boundary tokens around each visual block: part of the block, with positions.
        st = cfg.get("special_tokens") or {}
        bdir = backbone if os.path.isabs(backbone) else os.path.join(model_dir, backbone)
        self.vision_start = self.token_id(bdir, st.get("vision_start"))
        self.vision_end = self.token_id(bdir, st.get("vision_end"))
        self.block = self.m + (self.vision_start is not None) + (self.vision_end is not None)
        self.causal_blocks = causal_blocks(cfg)
        # Optional backbone adapter (PEFT LoRA) and the rows it acts on.
        self.lora, self.lora_scope = None, None
        if cfg.get("adapter") is not None:
            a = cfg["adapter"]
            if a.get("scope") not in SCOPES:
                raise ValueError(f"adapter.scope must be one of {SCOPES}, got {a.get('scope')!r}")
            self.lora = LoRA.load(os.path.join(model_dir, a["path"]), self.backbone)
            self.lora_scope = a["scope"]

    @staticmethod
    def token_id(backbone_dir, text):
        if text is None:
            return None
        with open(os.path.join(backbone_dir, "tokenizer.json")) as f:
            tok = json.load(f)
        for a in tok.get("added_tokens", []):
            if a["content"] == text:
                return a["id"]
        return tok["model"]["vocab"][text]

    def vision_state_dict(self):
        return vision_state_dict(self.vision, self.aligner)

    def load_vision(self, path):
        load_vision(self.vision, self.aligner, path)

    def encode(self, images):
        """images: (B, H, W) normalised pixels -> (B, m, dim) visual tokens."""
        x = images[:, None]
        if self.vision.c.num_channels == 3:
            x = x.expand(-1, 3, -1, -1)
        return self.aligner(self.vision(x))

    def forward(self, instruction, segments):
        """The interleaved sequence of docs/MODEL.md section 3.

        instruction: (P,) token ids. segments: list over chunks i = 0, 1, ... of dicts with an
        optional "image" ((H, W) pixels: the chunk's visual block V_i) and optional "text" (token
        ids of T_i). Returns the logits (n_text, vocab) of every text token of the segments, in
        order, and the (kind, chunk, offset) of each sequence element.

        Mask (query may attend key): instruction tokens are causal among themselves and visible
        to all; a text token of T_i sees the instruction, V_j for j < i and T_i causally; a
        visual token of V_i sees the instruction, V_j for j < i and all of V_i (with
        block_attention "causal": V_i's tokens up to itself). Positions: the instruction 0..P-1; V_i and T_i both start at P + i*b, b = m plus the optional boundary
        tokens, which belong to the block.
        """
        P = instruction.shape[0]
        emb, kind, chunk, pos = [self.backbone.embed(instruction)], [], [], []
        kind += [0] * P
        chunk += [-1] * P
        pos += list(range(P))
        for i, seg in enumerate(segments):
            if seg.get("image") is not None:
                parts = [self.encode(seg["image"][None])[0]]
                if self.vision_start is not None:
                    parts.insert(0, self.backbone.embed(torch.tensor([self.vision_start])))
                if self.vision_end is not None:
                    parts.append(self.backbone.embed(torch.tensor([self.vision_end])))
                emb.append(torch.cat(parts))
                kind += [2] * self.block
                chunk += [i] * self.block
                pos += [P + i * self.block + k for k in range(self.block)]
            if seg.get("text") is not None and len(seg["text"]) > 0:
                t = seg["text"]
                emb.append(self.backbone.embed(t))
                kind += [1] * len(t)
                chunk += [i] * len(t)
                pos += [P + i * self.block + k for k in range(len(t))]
        x = torch.cat(emb)
        kind, chunk, pos = torch.tensor(kind), torch.tensor(chunk), torch.tensor(pos)
        n = x.shape[0]
        idx = torch.arange(n)
        q_k, k_k = kind[:, None], kind[None, :]
        q_c, k_c = chunk[:, None], chunk[None, :]
        q_i, k_i = idx[:, None], idx[None, :]
        instr_key = (k_k == 0) & ((q_k != 0) | (k_i <= q_i))
        earlier_vis = (k_k == 2) & (k_c < q_c)
        own_text = (q_k == 1) & (k_k == 1) & (k_c == q_c) & (k_i <= q_i)
        own_vis = (q_k == 2) & (k_k == 2) & (k_c == q_c) & ((k_i <= q_i) | (not self.causal_blocks))
        mask = instr_key | earlier_vis | own_text | own_vis
        rows = (kind == 2) if self.lora_scope == "visual" else None
        logits = self.backbone(x, pos.to(x.dtype), mask, self.lora, rows)
        return logits[kind == 1], (kind, chunk, pos)
