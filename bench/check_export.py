#!/usr/bin/env python3
"""Checks that a backbone written by `sere export` loads into timm's
VisionTransformer and computes what sere's ViT computes.

The chain: host/tests/vit.rs checks sere's ViT (outputs and every gradient)
against the float64 PyTorch reference in host/tests/fixtures/gen_vit.py; this
script loads the exported weights into timm (strict: every name and shape
must match, nothing left over) and checks that timm's forward equals that same
reference, in float64, on random images at the trained size.

    sere export --checkpoint runs/xyz --out backbone.safetensors
    python3 bench/check_export.py backbone.safetensors [--resave timm.safetensors]

With --resave, the timm model's own state_dict is then saved the way timm and
Hugging Face publish weights (safetensors.torch.save_file, float32, metadata
{"format": "pt"} only): the file `sere train --init-from` and `sere eval`
must take back. host/tests/fixtures/timm_tiny.safetensors was made so from
a model of one block and one head of 64 channels (timm's head width: a bare
timm file does not say its heads; see `timm_round_trip` in host/tests/cli.rs):

    sere train --preset custom --dim 64 --depth 1 --heads 1 --img 16 --local-img 8 \
        --patch 4 --batch 4 --locals 0 --out-dim 64 --set head_hidden=64 \
        --set bottleneck=32 --data synthetic:size=16,train=64,test=32 --steps 2 \
        --no-eval --out /tmp/tiny
    sere export --checkpoint /tmp/tiny --out /tmp/tiny.safetensors
    python3 bench/check_export.py /tmp/tiny.safetensors \
        --resave host/tests/fixtures/timm_tiny.safetensors

Needs torch, timm and safetensors (pip install timm safetensors).
"""

import importlib.util
import pathlib
import sys

import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file


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
    args = sys.argv[1:]
    resave = None
    if "--resave" in args:
        i = args.index("--resave")
        resave = args[i + 1]
        del args[i : i + 2]
    path = args[0] if args else "backbone.safetensors"
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
        # The reference returns the final-normed tokens and the pre-norm
        # ones (what the SERE heads read); timm's forward_features is the
        # former.
        want = ref.forward(state, x)[0]
    err = (got - want).abs().max().item()
    scale = want.abs().max().item()
    print(f"{path}: {len(state)} tensors, {sum(v.numel() for v in state.values())} parameters, "
          f"{meta['network']} at step {meta.get('step')}; timm forward_features vs the reference "
          f"(float64): max |diff| {err:.3g} (scale {scale:.3g})")
    assert err <= 1e-9 * max(scale, 1.0), "timm and the reference disagree"
    print("ok: loads strictly into timm and matches the reference")
    if resave:
        # timm's own names and layout, as a timm user would publish them.
        out = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
        save_file(out, resave, metadata={"format": "pt"})
        print(f"saved timm's state_dict ({len(out)} tensors) to {resave}")


if __name__ == "__main__":
    main()
