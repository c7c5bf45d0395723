"""A Llama / Qwen3 backbone straight from a GGUF file, for machines without the Swift engine (a
GPU training machine receives the 94 MB GGUF, not the 540 MB F32 export of `vist2ctl
export-backbone`). numpy only; written from the GGUF specification (ggml's docs/gguf.md) and
ggml's block layouts, independently of the engine, and checked against the engine's own export
(`python3 Training/vist2/gguf.py --compare FILE.gguf EXPORT_DIR`, run by scripts/test.sh).

    config, tensors = read_backbone("SmolLM2-135M-Instruct.Q4_1.gguf")

returns the Hugging Face config.json fields `vist2/model.py`'s Backbone reads and the tensors
under Hugging Face names, dequantized to float32, with the Q and K rows that llama.cpp's converter
interleaved for its RoPE put back in Hugging Face's rotate-half order. Tensor types: F32, F16,
BF16, Q8_0, Q4_0, Q4_1; another is refused by name.
"""
import struct
import sys

import numpy as np

GGUF_MAGIC = b"GGUF"
# Value types of the key-value section.
_SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9
# ggml tensor types: name, elements per block, bytes per block.
TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 8: ("Q8_0", 32, 34), 30: ("BF16", 1, 2)}


class GGUFError(ValueError):
    pass


class _Reader:
    def __init__(self, buf, path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n):
        if self.pos + n > len(self.buf):
            raise GGUFError(f"{self.path}: truncated at byte {self.pos} (needs {n} more)")
        b = self.buf[self.pos:self.pos + n]
        self.pos += n
        return b

    def scalar(self, fmt):
        return np.frombuffer(self.take(np.dtype(fmt).itemsize), dtype=fmt)[0].item()

    def string(self):
        n = self.scalar("<u8")
        if n > 1 << 24:
            raise GGUFError(f"{self.path}: a string of {n} bytes")
        return bytes(self.take(n)).decode("utf-8")

    def value(self, t):
        if t in _SCALARS:
            v = self.scalar(_SCALARS[t])
            return bool(v) if t == 7 else v
        if t == _STRING:
            return self.string()
        if t == _ARRAY:
            et, n = self.scalar("<u4"), self.scalar("<u8")
            if et in _SCALARS and et != 7:
                a = np.frombuffer(self.take(n * np.dtype(_SCALARS[et]).itemsize), dtype=_SCALARS[et])
                return a.tolist()
            return [self.value(et) for _ in range(n)]
        raise GGUFError(f"{self.path}: unknown value type {t} at byte {self.pos}")


def read(path):
    """(metadata dict, {name: (ggml type, dims in ggml order (fastest first), data bytes)})."""
    with open(path, "rb") as f:
        buf = memoryview(f.read())
    r = _Reader(buf, path)
    if bytes(r.take(4)) != GGUF_MAGIC:
        raise GGUFError(f"{path}: not a GGUF file")
    version = r.scalar("<u4")
    if version not in (2, 3):
        raise GGUFError(f"{path}: GGUF version {version} (2 and 3 are read)")
    n_tensors, n_kv = r.scalar("<u8"), r.scalar("<u8")
    meta = {}
    for _ in range(n_kv):
        key = r.string()
        meta[key] = r.value(r.scalar("<u4"))
    infos = []
    for _ in range(n_tensors):
        name = r.string()
        nd = r.scalar("<u4")
        if nd > 4:
            raise GGUFError(f"{path}: {name} has {nd} dimensions")
        dims = [r.scalar("<u8") for _ in range(nd)]
        infos.append((name, dims, r.scalar("<u4"), r.scalar("<u8")))
    align = int(meta.get("general.alignment", 32))
    start = (r.pos + align - 1) // align * align
    tensors = {}
    for name, dims, t, off in infos:
        if t not in TYPES:
            raise GGUFError(f"{path}: {name} has ggml type {t}, which this reader does not dequantize ({sorted(v[0] for v in TYPES.values())})")
        _, per, size = TYPES[t]
        n = int(np.prod(dims)) if dims else 1
        if n % per:
            raise GGUFError(f"{path}: {name} has {n} elements, not a whole number of {per}-element blocks")
        nbytes = n // per * size
        if start + off + nbytes > len(buf):
            raise GGUFError(f"{path}: {name}'s data lies past the end of the file")
        tensors[name] = (t, dims, buf[start + off:start + off + nbytes])
    return meta, tensors


def dequantize(t, dims, data):
    """float32 array of shape dims reversed (rows, cols) from one tensor's bytes."""
    name, per, size = TYPES[t]
    shape = tuple(reversed(dims))
    raw = np.frombuffer(data, dtype=np.uint8)
    if name == "F32":
        return raw.view("<f4").reshape(shape).copy()
    if name == "F16":
        return raw.view("<f2").astype(np.float32).reshape(shape)
    if name == "BF16":
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32).reshape(shape)
    blocks = raw.reshape(-1, size)
    d = blocks[:, 0:2].copy().view("<f2").astype(np.float32)  # (n, 1)
    if name == "Q8_0":
        q = blocks[:, 2:].view(np.int8).astype(np.float32)
        return (q * d).reshape(shape)
    if name == "Q4_0":
        qs = blocks[:, 2:]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32) - 8.0
        return (q * d).reshape(shape)
    # Q4_1: scale d and minimum m; the low nibbles are elements 0-15, the high ones 16-31.
    m = blocks[:, 2:4].copy().view("<f2").astype(np.float32)
    qs = blocks[:, 4:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)
    return (q * d + m).reshape(shape)


def _rotate_half(w, head_dim):
    """Rows of each head from llama.cpp's interleaved pairs (2i, 2i+1) back to (i, i + hd/2)."""
    rows, cols = w.shape
    return w.reshape(rows // head_dim, head_dim // 2, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def read_backbone(path):
    """(Hugging Face config dict, {HF tensor name: float32 array}) of a llama or qwen3 GGUF."""
    meta, tensors = read(path)
    arch = meta.get("general.architecture")
    if arch not in ("llama", "qwen3"):
        raise GGUFError(f"{path}: architecture {arch!r} (llama and qwen3 are read)")

    def key(k, default=None):
        v = meta.get(f"{arch}.{k}", default)
        if v is None:
            raise GGUFError(f"{path}: metadata {arch}.{k} missing")
        return v

    dim, heads = int(key("embedding_length")), int(key("attention.head_count"))
    head_dim = int(meta.get(f"{arch}.attention.key_length", dim // heads))
    layers = int(key("block_count"))

    def get(name):
        if name not in tensors:
            raise GGUFError(f"{path}: tensor {name} missing")
        return dequantize(*tensors[name])

    embed = get("token_embd.weight")
    tied = "output.weight" not in tensors
    cfg = {"model_type": arch, "vocab_size": int(embed.shape[0]), "hidden_size": dim,
           "intermediate_size": int(key("feed_forward_length")), "num_hidden_layers": layers, "num_attention_heads": heads,
           "num_key_value_heads": int(key("attention.head_count_kv", heads)), "head_dim": head_dim,
           "max_position_embeddings": int(key("context_length")), "rope_theta": float(key("rope.freq_base", 10000.0)),
           "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon")), "tie_word_embeddings": tied}
    sd = {"model.embed_tokens.weight": embed, "model.norm.weight": get("output_norm.weight")}
    if not tied:
        sd["lm_head.weight"] = get("output.weight")
    # llama.cpp's converter interleaves Q and K rows for llama; Qwen3 keeps Hugging Face's halves.
    fix = (lambda w: _rotate_half(w, head_dim)) if arch == "llama" else (lambda w: w)
    for i in range(layers):
        b, p = f"blk.{i}.", f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = get(b + "attn_norm.weight")
        sd[p + "post_attention_layernorm.weight"] = get(b + "ffn_norm.weight")
        sd[p + "self_attn.q_proj.weight"] = fix(get(b + "attn_q.weight"))
        sd[p + "self_attn.k_proj.weight"] = fix(get(b + "attn_k.weight"))
        sd[p + "self_attn.v_proj.weight"] = get(b + "attn_v.weight")
        sd[p + "self_attn.o_proj.weight"] = get(b + "attn_output.weight")
        sd[p + "mlp.gate_proj.weight"] = get(b + "ffn_gate.weight")
        sd[p + "mlp.up_proj.weight"] = get(b + "ffn_up.weight")
        sd[p + "mlp.down_proj.weight"] = get(b + "ffn_down.weight")
        if arch == "qwen3":
            sd[p + "self_attn.q_norm.weight"] = get(b + "attn_q_norm.weight")
            sd[p + "self_attn.k_norm.weight"] = get(b + "attn_k_norm.weight")
    return cfg, sd


def compare(gguf_path, export_dir):
    """Exit status 0 when read_backbone agrees with the engine's export-backbone directory: the
    same config fields and every tensor equal (up to one float32 rounding)."""
    import json
    import os

    from safetensors.numpy import load_file
    cfg, sd = read_backbone(gguf_path)
    with open(os.path.join(export_dir, "config.json")) as f:
        want_cfg = json.load(f)
    for k, v in cfg.items():
        w = want_cfg.get(k)
        ok = abs(v - w) <= 1e-6 * abs(w) if isinstance(v, float) else v == w
        assert ok, f"config {k}: {v} here, {w} in the export"
    want = load_file(os.path.join(export_dir, "model.safetensors"))
    assert sorted(want) == sorted(sd), sorted(set(want) ^ set(sd))
    worst = 0.0
    for k, w in want.items():
        assert w.shape == sd[k].shape, (k, w.shape, sd[k].shape)
        err = float(np.max(np.abs(sd[k] - w) / (np.abs(w) + 1e-30))) if w.size else 0.0
        worst = max(worst, err)
        assert err <= 2.5e-7, f"{k}: relative difference {err:.3g}"
    print(f"{gguf_path}: {len(sd)} tensors agree with {export_dir} (largest relative difference {worst:.3g})")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--compare":
        compare(sys.argv[2], sys.argv[3])
    else:
        print(__doc__)
        sys.exit(2)
