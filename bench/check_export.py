#!/usr/bin/env python3
"""Checks that a backbone written by `sere export` loads into timm's
VisionTransformer and computes what sere's ViT computes.

The chain: host/tests/vit.rs checks sere's ViT (outputs and every gradient)
against the float64 PyTorch reference in host/tests/fixtures/gen_vit.py; this
script loads the exported weights into timm (strict: every name and shape
must match, nothing left over) and checks that timm's forward equals that same
reference, in float64, on random images at the trained size.

    sere export --checkpoint runs/xyz --out backbone.safetensors
    python3 bench/check_export.py backbone.safetensors

Needs torch, timm and safetensors (pip install timm safetensors).
"""

import importlib.util
import pathlib
import sys

import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file


def reference_module(meta):
    """gen_vit.py's forward, with its sizes set to the exported model's."""
    path = pathlib.Path(__file__).resolve().parent.parent / "host/tests/fixtures/gen_vit.py"
    spec = importlib.util.spec_from_file_location("gen_vit", path)
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    ref.IMG, ref.PATCH = int(meta["img_size"]), int(meta["patch_size"])
    ref.DIM, ref.DEPTH, ref.HEADS = int(meta["embed_dim"]), int(meta["depth"]), int(meta["num_heads"])
    ref.G0 = ref.IMG // ref.PATCH
    return ref


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else "backbone.safetensors"
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    assert meta.get("format") == "sere-backbone", f"{path} is not a `sere export` file"
    state = {k: v.to(torch.float64) for k, v in load_file(path).items()}
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=int(meta["img_size"]),
        patch_size=int(meta["patch_size"]),
        in_chans=int(meta["in_chans"]),
        num_classes=0,
        embed_dim=int(meta["embed_dim"]),
        depth=int(meta["depth"]),
        num_heads=int(meta["num_heads"]),
        mlp_ratio=float(meta["mlp_ratio"]),
        qkv_bias=True,
    ).to(torch.float64).eval()
    model.load_state_dict(state, strict=True)

    ref = reference_module(meta)
    torch.manual_seed(0)
    x = torch.randn(4, int(meta["in_chans"]), ref.IMG, ref.IMG, dtype=torch.float64)
    with torch.no_grad():
        got = model.forward_features(x)
        want = ref.forward(state, x)
    err = (got - want).abs().max().item()
    scale = want.abs().max().item()
    print(f"{path}: {len(state)} tensors, {sum(v.numel() for v in state.values())} parameters, "
          f"{meta['network']} at step {meta.get('step')}; timm forward_features vs the reference "
          f"(float64): max |diff| {err:.3g} (scale {scale:.3g})")
    assert err <= 1e-9 * max(scale, 1.0), "timm and the reference disagree"
    print("ok: loads strictly into timm and matches the reference")


if __name__ == "__main__":
    main()
