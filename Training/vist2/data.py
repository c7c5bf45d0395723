"""Training examples written by `vist2ctl dataset` (the engine's own chunker, tokenizer and
renderer): images.u8 (N x H x W gray bytes), chunks.jsonl (doc, index, tokens, text, cells: [scalar,
x, y, advance] per drawn character) and
meta.json. Nothing here renders or tokenizes; it only reads what the engine wrote.
"""
import json
import os

import numpy as np
import torch

# Character classes of the auxiliary reading objective: 0 = no glyph (empty cell or space),
# 1..95 = printable ASCII 0x21..0x7E (and 0x20 maps to 0), 96 = any other character, 97 = a
# newline (drawn only in a flowing layout, as render.newline_mark).
N_CLASSES = 98


def char_class(ch):
    o = ord(ch)
    if o == 0x20:
        return 0
    if 0x21 <= o <= 0x7E:
        return o - 0x20
    if o == 0x0A:
        return 97
    return 96


class Dataset:
    def __init__(self, directory, max_chunks=0):
        with open(os.path.join(directory, "meta.json")) as f:
            self.meta = json.load(f)
        m = self.meta
        if m.get("text_only"):
            raise ValueError(f"{directory} is a text-only dataset (no images): render it with `vist2-render dataset`")
        self.h, self.w = m["height"], m["width"]
        n = m["chunks"] if max_chunks <= 0 else min(max_chunks, m["chunks"])
        self.images = np.memmap(os.path.join(directory, "images.u8"), dtype=np.uint8, mode="r", shape=(m["chunks"], self.h, self.w))
        self.tokens, self.texts, self.cells, self.docs, self.index = [], [], [], [], []
        with open(os.path.join(directory, "chunks.jsonl")) as f:
            for i, line in enumerate(f):
                if i >= n:
                    break
                r = json.loads(line)
                self.tokens.append(np.asarray(r["tokens"], dtype=np.int64))
                self.texts.append(r["text"])
                self.cells.append(np.asarray(r["cells"], dtype=np.int32).reshape(-1, 4))
                self.docs.append(r["doc"])
                self.index.append(r["index"])
        self.n = len(self.tokens)
        # Runs of consecutive chunks of one document: (first chunk, count).
        self.runs = []
        for i in range(self.n):
            if i == 0 or self.docs[i] != self.docs[i - 1] or self.index[i] != self.index[i - 1] + 1:
                self.runs.append([i, 0])
            self.runs[-1][1] += 1
        # (chunk, k): chunk has k >= 1 earlier chunks of its document.
        self.followers = [i for (s, c) in self.runs for i in range(s + 1, s + c)]

    def pixels(self, idx):
        """(B, H, W) float pixels in [-1, 1], exactly as the engine normalises them."""
        a = np.stack([self.images[i] for i in idx]).astype(np.float32)
        return torch.from_numpy(a / 127.5 - 1.0)

    def advance(self):
        """The most common cell width (the font's advance; the config pins a monospace font)."""
        w = np.concatenate([c[:, 3] for c in self.cells[:200] if len(c)] or [np.zeros(1, np.int32)])
        return max(1, int(np.bincount(w).argmax()))

    def aux_targets(self, i, region, slot_h, slot_w, line_height):
        """Per visual-token region (rows x cols of `region` pixels), a grid of slot_h x slot_w
        character classes: the character whose cell centre falls in each slot (0 if none).
        Returns a (regions, slot_h * slot_w) int64 tensor."""
        gh, gw = self.h // region, self.w // region
        out = np.zeros((gh * gw, slot_h * slot_w), dtype=np.int64)
        c = self.cells[i]
        if len(c) == 0:
            return torch.from_numpy(out)
        text = self.texts[i]
        scalars = c[:, 0]
        # Cells are [scalar, x, y, advance]: left and top edge in canvas pixels, width; the
        # height is the line height.
        cx = c[:, 1] + c[:, 3] // 2
        cy = c[:, 2] + line_height // 2
        ok = (cx < gw * region) & (cy < gh * region)
        cls = np.fromiter((char_class(text[s]) for s in scalars), dtype=np.int64, count=len(scalars))
        reg = (cy // region) * gw + cx // region
        sub_h = region // slot_h
        sub_w = region // slot_w
        slot = np.minimum((cy % region) // sub_h, slot_h - 1) * slot_w + np.minimum((cx % region) // sub_w, slot_w - 1)
        out[reg[ok], slot[ok]] = cls[ok]
        return torch.from_numpy(out)
