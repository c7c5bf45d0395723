#!/usr/bin/env python3
"""Checks of the training code against the PyTorch reference (which the engine's golden tests
tie to the Swift engine). Both run the backbone through the reference's batched
`Backbone.hidden`; what the training code adds — its own construction of the interleaved
sequence, mask, compressed positions and prediction rows, and padding in a batch — must give
the reference's logits. Also: the character classes and per-cell targets of the reading objective, and (with
--compare) that a resumed run ends where an uninterrupted one does.

    python3 Training/test_train.py
"""
import json
import os
import sys
import tempfile
import unittest

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import interface_probe  # noqa: E402
import train  # noqa: E402
from vist2.data import Dataset, char_class  # noqa: E402
from vist2.model import VIST2, causal_blocks  # noqa: E402

TINY = os.path.join(HERE, "..", "Tests", "VistEngineTests", "Fixtures", "tiny-vist2")


class TrainingForward(unittest.TestCase):
    def test_batched_forward_matches_reference(self):
        self.check_batched_forward(causal=False)

    def test_batched_forward_matches_reference_causal_blocks(self):
        self.check_batched_forward(causal=True)

    def check_batched_forward(self, causal):
        torch.manual_seed(0)
        ref = VIST2(TINY)
        ref.causal_blocks = causal  # what block_attention "causal" in config.json sets
        bb = ref.backbone
        H, W = ref.config["vision"]["image_height"], ref.config["vision"]["image_width"]
        images = [torch.rand(H, W) * 2 - 1 for _ in range(2)]
        instr = torch.tensor([5, 9, 17])
        text = torch.tensor([40, 41, 42, 43, 44, 45, 46])
        with torch.no_grad():
            want, _ = ref(instr, [{"image": images[0]}, {"image": images[1]}, {"text": text}])
            blocks = [ref.encode(im[None])[0] for im in images]
            x, pos, allowed, rows = train.build(bb, instr.tolist(), blocks, text.tolist(), ref.m, causal)
            # The training code's batched forward (with a padded second sequence in the batch).
            x2, pos2, allowed2, _ = train.build(bb, [], blocks[:1], text[:3].tolist(), ref.m, causal)
            T = x.shape[0]
            xb = torch.stack([x, torch.nn.functional.pad(x2, (0, 0, 0, T - x2.shape[0]))])
            pb = torch.stack([pos.float(), torch.nn.functional.pad(pos2.float(), (0, T - pos2.shape[0]))])
            ab = torch.zeros(2, T, T, dtype=torch.bool)
            ab[:, torch.arange(T), torch.arange(T)] = True
            ab[0] = allowed
            ab[1, : x2.shape[0], : x2.shape[0]] = allowed2
            h = bb.hidden(xb, pb, ab)
            got = h[0] @ bb.embed.weight.T
        n = len(text)
        # Rows of the text tokens; row r predicts token r + 1.
        self.assertLess((got[T - n:] - want).abs().max().item(), 1e-4)
        # The first text token is predicted at the last visual token, then each token by the one before.
        self.assertEqual(rows.tolist(), [T - n - 1] + list(range(T - n, T - 1)))
        # Positions: visual block i and the text after k blocks start at P + i*m / P + k*m.
        P, m = 3, ref.m
        self.assertEqual(pos[P + m].item(), P + m)
        self.assertEqual(pos[T - n].item(), P + 2 * m)
        # Text never sees the own block of a chunk it is not in; visual blocks never see text.
        self.assertFalse(allowed[P, T - 1].item())
        self.assertTrue(allowed[T - 1, P].item() and allowed[T - 1, 0].item())
        # Inside a block: the first visual token sees the last one only with bidirectional blocks.
        self.assertEqual(allowed[P, P + m - 1].item(), not causal)
        self.assertTrue(allowed[P + m - 1, P].item())
        return want

    def test_causal_blocks_change_the_logits(self):
        self.assertFalse(torch.allclose(self.check_batched_forward(False), self.check_batched_forward(True)))
        with self.assertRaises(ValueError):
            causal_blocks({"block_attention": "sideways"})
        self.assertFalse(causal_blocks({}))

    def test_visual_adapters_touch_only_visual_rows(self):
        # interface_probe.py --adapter: the low-rank adapters change the visual rows' computation
        # and, through their keys and values, what the text reads; rows that cannot see the block
        # (the prompt) are the frozen backbone's exactly; at B = 0 nothing changes.
        torch.manual_seed(0)
        ref = VIST2(TINY)
        bb = ref.backbone
        prompt, text = [5, 9, 17], [40, 41, 42, 43]
        block = torch.randn(ref.m, bb.dim) * 0.1
        seq = train.build(bb, prompt, [block], text, ref.m, True)
        x, pos, allowed, _ = seq
        with torch.no_grad():
            frozen = bb.hidden(x[None], pos[None].float(), allowed[None])[0]
            adapters = interface_probe.VisualAdapters(bb, 2)
            adapters.mark([seq], len(prompt))
            self.assertEqual(adapters.rows[0].tolist(), [0] * 3 + [1] * ref.m + [0] * 4)
            self.assertTrue(torch.equal(bb.hidden(x[None], pos[None].float(), allowed[None])[0], frozen))
            for w in adapters.wrapped:
                w.b.normal_()
            got = bb.hidden(x[None], pos[None].float(), allowed[None])[0]
        P, m = len(prompt), ref.m
        self.assertTrue(torch.equal(got[:P], frozen[:P]))
        self.assertFalse(torch.allclose(got[P:P + m], frozen[P:P + m]))
        self.assertFalse(torch.allclose(got[P + m:], frozen[P + m:]))

    def test_mean_teacher_starts_at_the_backbones_states(self):
        # interface_probe.py teacher --start mean: each slot is tanh(s * mean of its group's states),
        # the last group averaged over the tokens it has; layer 0 is the token embeddings, layer L
        # the residual stream after L layers (all of them, then the final norm: Backbone.hidden).
        torch.manual_seed(0)
        bb = VIST2(TINY).backbone
        ids = [5, 9, 17, 40, 41, 42, 43]
        with torch.no_grad():
            t0 = interface_probe.MeanTeacher(bb, 3, 0, [ids])
            e = bb.embed(torch.tensor(ids))
            rms = bb.embed.weight.pow(2).mean().sqrt()
            self.assertAlmostEqual(t0.scale, float(rms / e.pow(2).mean().sqrt()), places=4)
            want = torch.tanh(torch.stack([e[0:3].mean(0), e[3:6].mean(0), e[6:7].mean(0)]) * t0.scale)
            self.assertTrue(torch.allclose(t0(ids), want, atol=1e-6))
            T, n = len(ids), len(bb.layers)
            mask = torch.ones(T, T, dtype=torch.bool).tril()[None]
            pos = torch.arange(T, dtype=torch.float32)[None]
            top = bb.hidden(e[None], pos, mask, layers=n)
            self.assertTrue(torch.allclose(bb.norm(top), bb.hidden(e[None], pos, mask), atol=1e-6))
            t1 = interface_probe.MeanTeacher(bb, 3, 1, [ids])
            h = bb.hidden(e[None], pos, mask, layers=1)[0]
            self.assertAlmostEqual(t1.scale, float(rms / h.pow(2).mean().sqrt()), places=4)
            self.assertTrue(torch.allclose(t1(ids)[2], torch.tanh(h[6] * t1.scale), atol=1e-6))

    def test_reading_targets(self):
        # A dataset as `vist2ctl dataset` writes it: cells are [scalar, x, y, advance].
        with tempfile.TemporaryDirectory() as d:
            with open(os.path.join(d, "meta.json"), "w") as f:
                json.dump({"chunks": 1, "height": 96, "width": 96}, f)
            open(os.path.join(d, "images.u8"), "wb").write(bytes(96 * 96))
            cells = [0, 0, 0, 6, 1, 6, 0, 6, 3, 48, 16, 6, 4, 54, 80, 6]
            with open(os.path.join(d, "chunks.jsonl"), "w") as f:
                f.write(json.dumps({"doc": "x", "index": 0, "tokens": [1], "text": "ab\ncd", "cells": cells}) + "\n")
            ds = Dataset(d)
            self.assertEqual(ds.advance(), 6)
            # 48-pixel regions (2 x 2), 3 rows of 16 pixels x 8 cells of 6 per region.
            t = ds.aux_targets(0, 48, 3, 8, 16)
            self.assertEqual(tuple(t.shape), (4, 24))
            want = torch.zeros(4, 24, dtype=torch.long)
            want[0, 0], want[0, 1] = char_class("a"), char_class("b")
            want[1, 8] = char_class("c")  # region (0, 1), row 1, cell 0
            want[3, 17] = char_class("d")  # region (1, 1), row 2, cell 1
            self.assertTrue(torch.equal(t, want))

    def test_init_from_model_directory(self):
        # A new run can start from a model directory: its encoder and aligner, bit for bit.
        with open(os.path.join(TINY, "config.json")) as f:
            cfg = json.load(f)
        ref = VIST2(TINY)
        model = train.Trainable(cfg, ref.backbone.dim, 5)
        model.init_weights(1)
        model.load_model_dir(TINY, cfg)
        got = train.vision_state_dict(model.vision, model.aligner)
        for k, v in ref.vision_state_dict().items():
            self.assertTrue(torch.equal(got[k], v), k)
        other = dict(cfg, aligner={"merge": cfg["aligner"]["merge"] + 1})
        with self.assertRaises(ValueError):
            model.load_model_dir(TINY, other)
        # Another layout of the same canvas and font is a start; another font size is not.
        model.load_model_dir(TINY, dict(cfg, render=dict(cfg["render"], newline_mark="\u21b5")))
        with self.assertRaises(ValueError):
            model.load_model_dir(TINY, dict(cfg, render=dict(cfg["render"], pixel_size=9)))

    def test_char_classes(self):
        self.assertEqual(char_class(" "), 0)
        self.assertEqual(char_class("!"), 1)
        self.assertEqual(char_class("~"), 94)
        self.assertEqual(char_class("é"), 96)
        self.assertEqual(char_class("\n"), 97)


def compare_checkpoints(a, b):
    """Exit status 0 when two checkpoints hold the same step and identical weights and
    optimiser moments (a run resumed from a checkpoint against one that never stopped)."""
    x, y = torch.load(a, weights_only=False), torch.load(b, weights_only=False)
    assert x["step"] == y["step"], (x["step"], y["step"])
    for k, v in x["model"].items():
        assert torch.equal(v, y["model"][k]), f"{k} differs"
    for i, s in x["opt"]["state"].items():
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(s[k], y["opt"]["state"][i][k]), f"optimiser state {i}.{k} differs"
    print(f"checkpoints agree at step {x['step']}")


def tiny_dataset(d, chunks=8, docs=2, seed=3):
    """A dataset directory as `vist2ctl dataset` writes it, for the tiny model's geometry (64 x
    128 pixels): random pixels and tokens, chunks in documents so that OLM items exist."""
    g = np.random.default_rng(seed)
    with open(os.path.join(d, "meta.json"), "w") as f:
        json.dump({"chunks": chunks, "height": 64, "width": 128}, f)
    g.integers(0, 256, size=(chunks, 64, 128), dtype=np.uint8).tofile(os.path.join(d, "images.u8"))
    with open(os.path.join(d, "chunks.jsonl"), "w") as f:
        for i in range(chunks):
            n = int(g.integers(5, 12))
            cells = [c for j in range(n) for c in (j, 2 + 5 * j, 2, 5)]
            f.write(json.dumps({"doc": f"d{i * docs // chunks}", "index": i % (chunks // docs),
                                "tokens": g.integers(3, 280, size=n).tolist(), "text": "abcdefghijklmnop"[:n], "cells": cells}) + "\n")
    return Dataset(d)


def shard_gradients(rank, world, data, out, port):
    """One process of a Gloo run: DDP over StepLoss on its shard of stage C's global batch; rank
    0 saves the gradients it ends up with (DDP's average over the processes)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    import torch.distributed as dist
    dist.init_process_group("gloo", rank=rank, world_size=world)
    step, items = distributed_setup(data)
    ddp = torch.nn.parallel.DistributedDataParallel(step, find_unused_parameters=True)
    step.world = world
    loss, info = ddp(stage="C", items=train.shard(items, rank, world))
    loss.backward()
    if rank == 0:
        torch.save({"grads": {k: p.grad.clone() for k, p in step.model.named_parameters() if p.grad is not None},
                    "info": info}, out)
    dist.barrier()  # a Gloo process that leaves while another still works aborts
    dist.destroy_process_group()


def distributed_setup(data):
    """The same model (tiny backbone, an encoder with a rank-2 visual adapter) and global batch
    (4 stage-C items) in every process."""
    with open(os.path.join(TINY, "config.json")) as f:
        cfg = json.load(f)
    ref = VIST2(TINY)
    bb = ref.backbone
    for p in bb.parameters():
        p.requires_grad_(False)
    ds = Dataset(data)
    torch.manual_seed(5)
    model = train.Trainable(cfg, bb.dim, ds.advance())
    model.init_weights(5)
    model.add_adapter(bb, {"rank": 2, "scope": "visual"})
    with torch.no_grad():
        for p in model.lora.B.values():
            p.normal_(0, 0.1)  # a trained adapter: B != 0, so A gets gradient too
    sched = {"max_text": 16, "max_blocks": 3, "ocr_share_C": 0.5, "aux_weight": 0.1, "scale_weight": 0.05, "distill_weight": 0.5}
    items = train.sample_items(train.step_rng(1, 7), ds, "C", sched, [1, 2, 3], 4)
    step = train.StepLoss(model, bb, ds, cfg, sched, 1)
    step.amp = False  # f32, so that only summation order differs
    return step, items


class Precision(unittest.TestCase):
    def test_auto_precision(self):
        cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
        self.assertTrue(train.amp_default(cuda, "AVX2"))
        self.assertTrue(train.amp_default(cpu, "AVX512"))
        self.assertTrue(train.amp_default(cpu, "AMX"))
        self.assertFalse(train.amp_default(cpu, "AVX2"))  # bf16 is emulated there, ~13x slower
        self.assertFalse(train.amp_default(cpu, "DEFAULT"))


class Distributed(unittest.TestCase):
    """Training on several processes (torchrun: DDP, one process per GPU) steps as one process
    with the whole global batch does."""

    def test_shards_of_a_global_batch(self):
        items = list(range(12))
        self.assertEqual(train.shard(items, 0, 1), items)
        self.assertEqual(train.shard(items, 0, 3) + train.shard(items, 1, 3) + train.shard(items, 2, 3), items)
        a = train.sample_items(train.step_rng(1, 9), TinyData.ds, "C", TinyData.sched, [1], 6)
        b = train.sample_items(train.step_rng(1, 9), TinyData.ds, "C", TinyData.sched, [1], 6)
        c = train.sample_items(train.step_rng(1, 10), TinyData.ds, "C", TinyData.sched, [1], 6)
        self.assertEqual(repr(a), repr(b))
        self.assertNotEqual(repr(a), repr(c))

    def test_two_processes_match_one(self):
        import torch.multiprocessing as mp
        with tempfile.TemporaryDirectory() as d:
            os.makedirs(os.path.join(d, "data"))
            tiny_dataset(os.path.join(d, "data"))
            step, items = distributed_setup(os.path.join(d, "data"))
            self.assertTrue(any(len(c) > 1 for _, c, _ in items) and any(len(c) == 1 for _, c, _ in items), items)
            loss, info = step(stage="C", items=items)
            loss.backward()
            want = {k: p.grad for k, p in step.model.named_parameters() if p.grad is not None}
            out = os.path.join(d, "grads.pt")
            mp.spawn(shard_gradients, args=(2, os.path.join(d, "data"), out, 29500 + os.getpid() % 1000), nprocs=2)
            got = torch.load(out, weights_only=False)
            self.assertEqual(sorted(got["grads"]), sorted(want))
            self.assertTrue(any(k.startswith("lora.") for k in want))
            for k, g in want.items():
                # Relative to the gradient, or absolute where it is zero but for rounding (a key
                # bias shifts every score of a query alike: softmax cancels it).
                err = (got["grads"][k] - g).norm().item()
                self.assertLess(err, 1e-5 * g.norm().item() + 1e-7, f"{k}: |g| {g.norm().item():.3g}")
            self.assertGreater(info["kl"], 0)
            for k in ("loss", "lm", "aux", "aux_acc", "v_rms", "tokens", "seq_tokens", "images", "kl"):
                self.assertAlmostEqual(got["info"][k], info[k], places=4, msg=k)


class Distillation(unittest.TestCase):
    def test_teacher_is_the_backbone_reading_the_text(self):
        ref = VIST2(TINY)
        bb = ref.backbone
        prefix, text = [5, 9, 17, 30, 2], [40, 41, 42]
        got = train.teacher_logits(bb, [np.array(prefix), np.array([7])], [text, text[:2]], amp=False)
        ids = torch.tensor(prefix + text)
        mask = torch.ones(len(ids), len(ids), dtype=torch.bool).tril()
        want = bb(bb.embed(ids), torch.arange(len(ids)).float(), mask)
        self.assertEqual(tuple(got.shape), (5, bb.vocab))
        self.assertTrue(torch.allclose(got[:3], want[len(prefix) - 1:-1], atol=1e-5))
        # The second sequence (padded in the batch) is its own: [7] then [40, 41].
        ids2 = torch.tensor([7, 40, 41])
        want2 = bb(bb.embed(ids2), torch.arange(3).float(), torch.ones(3, 3, dtype=torch.bool).tril())
        self.assertTrue(torch.allclose(got[3:], want2[:2], atol=1e-5))

    def test_kl(self):
        t = torch.randn(4, 11)
        self.assertAlmostEqual(train.distill_sum(t, t).item(), 0.0, places=5)
        s_ = torch.randn(4, 11)
        p, q = t.softmax(-1), s_.softmax(-1)
        self.assertAlmostEqual(train.distill_sum(s_, t).item(), (p * (p.log() - q.log())).sum().item(), places=4)
        self.assertGreater(train.distill_sum(s_, t, 2.0).item(), 0)


class ReadingStage(unittest.TestCase):
    def test_head_only_reading_stage(self):
        # schedule head_only_A: stage A's gradient reaches the reading head and nothing else.
        with open(os.path.join(TINY, "config.json")) as f:
            cfg = json.load(f)
        from vist2.model import Backbone
        bb = Backbone(os.path.join(TINY, "backbone"))
        model = train.Trainable(cfg, bb.dim, TinyData.ds.advance())
        model.init_weights(1)
        for head_only in (False, True):
            model.zero_grad(set_to_none=True)
            step = train.StepLoss(model, bb, TinyData.ds, cfg, dict(TinyData.sched, head_only_A=head_only), 1)
            step.amp = False
            loss, _ = step(stage="A", items=[0, 1])
            loss.backward()
            got = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
            head = {name for name, _ in model.named_parameters() if name.startswith("aux.")}
            if head_only:
                self.assertEqual(got, head)
            else:
                self.assertTrue(head < got and any(name.startswith("vision.") for name in got), got)


class TinyData:
    """A small dataset shared by tests that only sample from it."""
    sched = {"max_text": 16, "max_blocks": 3, "ocr_share_C": 0.5}
    _dir = tempfile.TemporaryDirectory()
    ds = tiny_dataset(_dir.name)


class Adapter(unittest.TestCase):
    """The reference's LoRA (vist2/lora.py): identity when new, exact on rows outside its scope,
    trainable with the backbone frozen, and saved / loaded in the PEFT layout unchanged."""

    def setUp(self):
        from vist2.model import Backbone
        torch.manual_seed(0)
        self.bb = Backbone(os.path.join(TINY, "backbone"))
        for p in self.bb.parameters():
            p.requires_grad_(False)
        T = 12
        self.x = self.bb.embed(torch.randint(0, 256, (T,)))[None]
        self.pos = torch.arange(T, dtype=torch.float32)[None]
        self.mask = torch.ones(T, T, dtype=torch.bool).tril()[None]

    def test_init_from_a_directory_with_another_adapter(self):
        # --init from a model directory with a rank-4 adapter: a rank-4 run takes it, a rank-2 run
        # (the CI smoke run from the shipped rank-8 model) starts its own adapter fresh.
        with open(os.path.join(TINY, "config.json")) as f:
            cfg = json.load(f)
        with tempfile.TemporaryDirectory() as d:
            src = train.Trainable(cfg, self.bb.dim, 5)
            src.init_weights(1)
            src.add_adapter(self.bb, {"rank": 4, "scope": "visual"})
            with torch.no_grad():
                for p in src.lora.B.values():
                    p.normal_(0, 0.1)
            src.export(d, cfg)
            same = train.Trainable(cfg, self.bb.dim, 5)
            same.add_adapter(self.bb, {"rank": 4, "scope": "visual"})
            same.load_model_dir(d, cfg, self.bb)
            self.assertTrue(all(torch.equal(same.lora.B[k], src.lora.B[k]) for k in src.lora.B))
            other = train.Trainable(cfg, self.bb.dim, 5)
            other.add_adapter(self.bb, {"rank": 2, "scope": "visual"})
            other.load_model_dir(d, cfg, self.bb)
            self.assertTrue(all(p.abs().sum() == 0 for p in other.lora.B.values()))

    def test_identity_scope_training_and_round_trip(self):
        from vist2.lora import LoRA
        lora = LoRA(self.bb, r=4, alpha=8)
        bare = self.bb.hidden(self.x, self.pos, self.mask)
        # A new adapter (B = 0, as PEFT initialises it) changes nothing.
        self.assertTrue(torch.equal(self.bb.hidden(self.x, self.pos, self.mask, lora), bare))
        with torch.no_grad():
            for p in lora.B.values():
                p.normal_(0, 0.1)
        rows = torch.zeros(1, 12, dtype=torch.bool)
        rows[0, 4:8] = True
        scoped = self.bb.hidden(self.x, self.pos, self.mask, lora, rows)
        # Causal: rows before the adapted ones are the backbone's bit for bit; the adapted ones move.
        self.assertTrue(torch.equal(scoped[0, :4], bare[0, :4]))
        self.assertGreater((scoped[0, 4:8] - bare[0, 4:8]).abs().max().item(), 1e-3)
        # Gradients reach both factors and nothing of the frozen backbone.
        loss = scoped.pow(2).mean()
        loss.backward()
        self.assertTrue(all(p.grad is not None and p.grad.abs().sum() > 0 for p in list(lora.A.values()) + list(lora.B.values())))
        self.assertTrue(all(p.grad is None for p in self.bb.parameters()))
        with tempfile.TemporaryDirectory() as d:
            lora.save(d)
            back = LoRA.load(d, self.bb)
        self.assertTrue(torch.equal(self.bb.hidden(self.x, self.pos, self.mask, back, rows).detach(), scoped.detach()))

    def test_some_layers_round_trip(self):
        # An adapter on layer 0 of a 2-layer backbone: layers_to_transform must say so.
        from vist2.lora import LoRA
        lora = LoRA(self.bb, r=2, alpha=4, layers=[0])
        with tempfile.TemporaryDirectory() as d:
            lora.save(d)
            back = LoRA.load(d, self.bb)
        self.assertEqual(back.layers, [0])

    def test_refuses_what_it_cannot_apply(self):
        from vist2.lora import LoRA
        lora = LoRA(self.bb, r=2, alpha=4, targets=("q_proj",))
        with tempfile.TemporaryDirectory() as d:
            lora.save(d)
            with open(os.path.join(d, "adapter_config.json")) as f:
                cfg = json.load(f)
            for key, value in (("use_dora", True), ("target_modules", "q_proj|v_proj"), ("init_lora_weights", "pissa")):
                with open(os.path.join(d, "adapter_config.json"), "w") as f:
                    json.dump(dict(cfg, **{key: value}), f)
                with self.assertRaises(ValueError, msg=key):
                    LoRA.load(d, self.bb)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--compare":
        compare_checkpoints(sys.argv[2], sys.argv[3])
    else:
        unittest.main()
