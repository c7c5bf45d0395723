"""An exact float64 forward pass of a GGUF Llama model in numpy, for golden logits.

Weights are dequantized with the `gguf` package (llama.cpp's own Python reader), and every
product is done in float64 with no activation quantization, so these logits are what the model
"really" computes; llama.cpp and vist2 are both approximations of them. Written plainly from the
Llama architecture (RMSNorm, RoPE on adjacent pairs as in GGUF's permuted Q/K, GQA, SwiGLU,
tied embeddings), not from either engine's code.
"""
import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize


class ReferenceLlama:
    def __init__(self, path):
        r = GGUFReader(path)
        f = {k: v for k, v in r.fields.items()}

        def val(key, default=None):
            if key not in f:
                return default
            c = f[key].contents()
            return c

        arch = val("general.architecture")
        assert arch == "llama", arch
        self.dim = int(val("llama.embedding_length"))
        self.layers = int(val("llama.block_count"))
        self.heads = int(val("llama.attention.head_count"))
        self.kv_heads = int(val("llama.attention.head_count_kv", self.heads))
        self.head_dim = self.dim // self.heads
        self.eps = float(val("llama.attention.layer_norm_rms_epsilon"))
        self.base = float(val("llama.rope.freq_base", 10000.0))
        self.t = {}
        for t in r.tensors:
            a = dequantize(t.data, t.tensor_type).astype(np.float64)
            # gguf shapes are ne0-first; numpy arrays come out row-major (ne1, ne0).
            self.t[t.name] = a.reshape([int(x) for x in reversed(t.shape)]) if len(t.shape) > 1 else a.reshape(-1)
        self.out = self.t.get("output.weight", self.t["token_embd.weight"])

    def rms(self, x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + self.eps) * w

    def rope(self, x, pos):
        # x: (T, heads, hd); adjacent pairs (2i, 2i+1), theta = pos * base^(-2i/hd)
        hd = x.shape[-1]
        i = np.arange(hd // 2)
        theta = pos[:, None] * self.base ** (-2.0 * i / hd)
        c, s = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
        a, b = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = a * c - b * s
        out[..., 1::2] = a * s + b * c
        return out

    def logits(self, ids):
        T = len(ids)
        x = self.t["token_embd.weight"][ids]
        pos = np.arange(T, dtype=np.float64)
        mask = np.triu(np.full((T, T), -np.inf), 1)
        g = self.heads // self.kv_heads
        for l in range(self.layers):
            p = f"blk.{l}."
            h = self.rms(x, self.t[p + "attn_norm.weight"])
            q = (h @ self.t[p + "attn_q.weight"].T).reshape(T, self.heads, self.head_dim)
            k = (h @ self.t[p + "attn_k.weight"].T).reshape(T, self.kv_heads, self.head_dim)
            v = (h @ self.t[p + "attn_v.weight"].T).reshape(T, self.kv_heads, self.head_dim)
            q, k = self.rope(q, pos), self.rope(k, pos)
            att = np.empty((T, self.heads, self.head_dim))
            for hh in range(self.heads):
                kv = hh // g
                s = q[:, hh] @ k[:, kv].T / np.sqrt(self.head_dim) + mask
                s = np.exp(s - s.max(-1, keepdims=True))
                s /= s.sum(-1, keepdims=True)
                att[:, hh] = s @ v[:, kv]
            x = x + att.reshape(T, -1) @ self.t[p + "attn_output.weight"].T
            h = self.rms(x, self.t[p + "ffn_norm.weight"])
            gt = h @ self.t[p + "ffn_gate.weight"].T
            up = h @ self.t[p + "ffn_up.weight"].T
            x = x + (gt / (1 + np.exp(-gt)) * up) @ self.t[p + "ffn_down.weight"].T
        return self.rms(x, self.t["output_norm.weight"]) @ self.out.T
