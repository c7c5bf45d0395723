"""A low-rank backbone adapter (LoRA) in the Hugging Face PEFT layout, for the reference and for
training (docs/MODEL.md section 6, "The backbone adapts").

On disk, as PEFT's `save_pretrained` writes it:
  adapter_config.json         peft_type "LORA", r, lora_alpha, target_modules, use_rslora, ...
  adapter_model.safetensors   base_model.model.model.layers.{i}.{self_attn|mlp}.{name}.lora_A.weight (r, in)
                              and .lora_B.weight (out, r)

A projection y = x W^T becomes y = x W^T + s (x A^T) B^T with s = lora_alpha / r (or
lora_alpha / sqrt(r) with use_rslora). The model's config.json names the adapter and its scope:
`"adapter": {"path": "adapter", "scope": "visual" | "all"}`: with "visual" only the rows of visual
blocks get the low-rank term (text rows are the backbone's own), with "all" every row does.
"""
import json
import math
import os

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
TARGETS = ATTENTION + MLP
SCOPES = ("visual", "all")

# adapter_config.json fields that change the arithmetic or the base weights; an adapter that sets
# any of them is refused (the engine refuses the same ones).
UNSUPPORTED = ("alpha_pattern", "rank_pattern", "use_dora", "lora_bias", "layer_replication", "modules_to_save",
               "trainable_token_indices", "target_parameters", "alora_invocation_tokens", "use_qalora", "arrow_config",
               "use_bdlora", "exclude_modules", "fan_in_fan_out")


def tensor_name(layer, target, ab):
    block = "self_attn" if target in ATTENTION else "mlp"
    return f"base_model.model.model.layers.{layer}.{block}.{target}.lora_{ab}.weight"


def read_config(directory):
    """adapter_config.json, checked: (r, lora_alpha, use_rslora, targets, layers or None)."""
    with open(os.path.join(directory, "adapter_config.json")) as f:
        c = json.load(f)
    if c.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"peft_type must be LORA, got {c['peft_type']!r}")
    for k in UNSUPPORTED:
        if c.get(k) not in (None, False, {}, []):
            raise ValueError(f"adapter_config.json: {k} is not supported")
    if c.get("bias", "none") != "none":
        raise ValueError("adapter_config.json: bias must be \"none\"")
    init = c.get("init_lora_weights", True)
    if init not in (True, False, "gaussian", "eva"):
        raise ValueError(f"adapter_config.json: init_lora_weights {init!r} changes the base weights")
    r, alpha = c["r"], c["lora_alpha"]
    targets = c["target_modules"]
    if targets == "all-linear":
        targets = list(TARGETS)
    if not isinstance(targets, list) or not targets or any(t not in TARGETS for t in targets):
        raise ValueError(f"target_modules must be a list of {TARGETS}, got {targets!r}")
    layers = c.get("layers_to_transform")
    if isinstance(layers, int):
        layers = [layers]
    return r, alpha, bool(c.get("use_rslora", False)), sorted(set(targets), key=TARGETS.index), layers


class LoRA(nn.Module):
    """The low-rank factors of every adapted projection, as trainable parameters."""

    def __init__(self, backbone, r, alpha, targets=TARGETS, layers=None, use_rslora=False):
        super().__init__()
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scale = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.targets = [t for t in TARGETS if t in targets]
        self.all_layers = list(range(backbone.layers_n))
        self.layers = self.all_layers if layers is None else sorted(layers)
        self.A, self.B = nn.ParameterDict(), nn.ParameterDict()
        for i in self.layers:
            L = backbone.layers[i]
            for t in self.targets:
                out_f, in_f = getattr(L, t).weight.shape
                a = torch.empty(r, in_f)
                # PEFT's default: A Kaiming-uniform, B zero, so a new adapter changes nothing.
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                self.A[f"{i}_{t}"] = nn.Parameter(a)
                self.B[f"{i}_{t}"] = nn.Parameter(torch.zeros(out_f, r))

    def has(self, layer, target):
        return f"{layer}_{target}" in self.A

    def delta(self, layer, target, h):
        """s (h A^T) B^T for the projection `target` of layer `layer`."""
        k = f"{layer}_{target}"
        return self.scale * ((h @ self.A[k].T) @ self.B[k].T)

    def state_dict_peft(self, dtype=torch.float32):
        out = {}
        for i in self.layers:
            for t in self.targets:
                out[tensor_name(i, t, "A")] = self.A[f"{i}_{t}"].detach().to(dtype).contiguous()
                out[tensor_name(i, t, "B")] = self.B[f"{i}_{t}"].detach().to(dtype).contiguous()
        return out

    def save(self, directory, base_model=None, dtype=torch.float32):
        """Writes adapter_config.json and adapter_model.safetensors as PEFT does. With dtype
        torch.bfloat16 the factors take half the space and half the engine's memory traffic per
        token (what is saved is the model: engine and reference both read those values)."""
        os.makedirs(directory, exist_ok=True)
        cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "r": self.r,
               "lora_alpha": self.alpha, "lora_dropout": 0.0, "target_modules": list(self.targets), "bias": "none",
               "use_rslora": self.use_rslora, "use_dora": False, "fan_in_fan_out": False, "init_lora_weights": True,
               "layers_to_transform": None if self.layers == self.all_layers else self.layers,
               "inference_mode": True}
        with open(os.path.join(directory, "adapter_config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        save_file(self.state_dict_peft(dtype), os.path.join(directory, "adapter_model.safetensors"),
                  metadata={"format": "pt"})

    @classmethod
    def load(cls, directory, backbone):
        """Reads a PEFT LoRA directory for `backbone`, checking every tensor's presence and shape."""
        r, alpha, use_rslora, targets, layers = read_config(directory)
        lora = cls(backbone, r, alpha, targets, layers, use_rslora)
        sd = load_file(os.path.join(directory, "adapter_model.safetensors"))
        expected = lora.state_dict_peft()
        extra = sorted(set(sd) - set(expected))
        if extra:
            raise ValueError(f"unexpected adapter tensors: {extra[:4]}")
        with torch.no_grad():
            for i in lora.layers:
                for t in lora.targets:
                    for ab, store in (("A", lora.A), ("B", lora.B)):
                        name = tensor_name(i, t, ab)
                        if name not in sd:
                            raise ValueError(f"adapter lacks {name}")
                        p = store[f"{i}_{t}"]
                        if tuple(sd[name].shape) != tuple(p.shape):
                            raise ValueError(f"{name} has shape {tuple(sd[name].shape)}, expected {tuple(p.shape)}")
                        p.copy_(sd[name].float())
        return lora
