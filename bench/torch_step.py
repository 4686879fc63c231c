#!/usr/bin/env python3
"""One SERE training step in PyTorch eager, timed: the reference for `sere bench-step`.

The step (float32, synthetic inputs generated once):
  * student ViT (timm/DINO layout) on the 2 global crops (batch 2B at --img) and on the
    L local crops (batch L*B at --local-img, position embedding bicubically resized);
    teacher ViT (EMA copy, no grad, no drop path) on the 2 global crops;
  * DINO head on the CLS tokens (student: all views, teacher: globals), DINO loss with the
    centre, teacher temperature 0.04, student temperature 0.1, pairs of different views;
  * SERE heads on the patch tokens: for each relation (spatial, channel) and each crop kind
    (global, local) a projection ReLU(BN(r)) and a predictor ReLU(BN(W r)) (4 head pairs);
    the teacher's global features go through the global projections (they serve every
    pair, as in the Rust trainer), the student's global / local features through the
    global / local predictors;
  * spatial relation loss for every (teacher global view t, student view s != t) pair on
    bilinearly sampled overlap grids (overlap^2 points global/global,
    local_overlap^2 global/local; random grids fixed at start-up), per-head logits
    X_h X_h^T / sqrt(C / heads), tau_t 0.5, tau_s 1;
  * channel relation loss for the same pairs on all patch tokens, logits X^T X / N,
    tau_t 0.1, tau_s 1;
  * loss L_I (4 - alpha - beta) / 2 + alpha L_s + beta L_c, backward, per-parameter gradient
    clipping (DINO's clip_gradients, 3.0), AdamW (lr 5e-4 * B / 256, weight decay 0.04 on
    weights, 0 on biases and norms), teacher EMA (0.996), centre EMA (0.9).

Prints ONE JSON line on stdout (the keys of `sere bench-step` plus a few extras);
first-step losses also go to stderr.
"""

import argparse
import copy
import json
import math
import os
import resource
import statistics
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    a = p.add_argument
    a("--device", default="cpu", choices=["cpu", "cuda"])
    a("--img", type=int, default=32, help="global crop size (px)")
    a("--local-img", type=int, default=16, help="local crop size (px)")
    a("--patch", type=int, default=4)
    a("--dim", type=int, default=192)
    a("--depth", type=int, default=6)
    a("--heads", type=int, default=3)
    a("--mlp-ratio", type=float, default=4.0)
    a("--batch", type=int, default=32, help="source images per step (B)")
    a("--locals", type=int, default=4, help="local crops per image (L)")
    a("--out-dim", type=int, default=4096, help="DINO prototypes K")
    a("--head-hidden", type=int, default=2048)
    a("--bottleneck", type=int, default=256)
    a("--overlap", type=int, default=7, help="grid side, global/global pairs")
    a("--local-overlap", type=int, default=4, help="grid side, global/local pairs")
    a("--threads", type=int, default=2, help="torch intra-op threads")
    a("--steps", type=int, default=10, help="timed steps")
    a("--warmup", type=int, default=2, help="untimed steps before timing")
    a("--alpha", type=float, default=0.2, help="spatial relation weight")
    a("--beta", type=float, default=0.5, help="channel relation weight")
    a("--drop-path", type=float, default=0.1)
    a("--lr", type=float, default=5e-4, help="base lr for batch 256")
    a("--weight-decay", type=float, default=0.04)
    a("--clip-grad", type=float, default=3.0)
    a("--clip-mode", default="param", choices=["param", "global"],
      help="param: DINO's per-parameter clip_gradients; global: clip_grad_norm_")
    a("--momentum-teacher", type=float, default=0.996)
    a("--center-momentum", type=float, default=0.9)
    a("--teacher-temp", type=float, default=0.04)
    a("--student-temp", type=float, default=0.1)
    a("--spatial-tau-t", type=float, default=0.5)
    a("--channel-tau-t", type=float, default=0.1)
    a("--attn", default="sdpa", choices=["sdpa", "manual"],
      help="sdpa: F.scaled_dot_product_attention (timm's fused path); manual: softmax(QK^T)V")
    a("--seed", type=int, default=0)
    a("--check-flops", action="store_true",
      help="run one extra step under torch.utils.flop_counter.FlopCounterMode and print the "
           "measured matmul/conv/attention FLOPs next to step_flops() on stderr")
    args = p.parse_args(argv)
    if args.img % args.patch or args.local_img % args.patch:
        p.error("--patch must divide --img and --local-img")
    if args.dim % args.heads:
        p.error("--heads must divide --dim")
    if args.steps < 1:
        p.error("--steps must be >= 1")
    return args


def step_flops(cfg):
    """Matmul FLOPs of one SERE training step (2*m*n*k per GEMM, multiply-add = 2 FLOPs).

    `cfg` needs: img, local_img, patch, dim, depth, mlp_ratio, batch, locals, out_dim,
    head_hidden, bottleneck, overlap, local_overlap (attributes or dict keys). The same
    formula is `step_flops` in host/src/train/bench.rs.

    Notation: B batch, L locals, D dim, M = round(D * mlp_ratio), p patch,
    Ng = (img/p)^2 and Nl = (local_img/p)^2 patches, T = N + 1 tokens,
    K out_dim, Hh head_hidden, Bn bottleneck, Pg = overlap^2, Pl = local_overlap^2.

    Forward costs:
      embed(N)  per image     = 2*N*(3*p^2)*D                      (patch embedding)
      blocks(N) per image     = depth * [qkv 2*T*D*3D + scores 2*T*T*D + attn*V 2*T*T*D
                                         + proj 2*T*D*D + fc1 2*T*D*M + fc2 2*T*M*D]
                              = depth * (8*T*D^2 + 4*T*D*M + 4*T^2*D)
      head      per CLS row   = 2*(D*Hh + Hh*Hh + Hh*Bn + Bn*K)   (DINO head incl. last layer)
      pred      per token     = 2*D^2   (W of one SERE predictor; projections have no matmul)
      spatial   per image, pair and side = heads * 2*P*P*(D/heads) = 2*P^2*D
      channel   per image and view       = 2*N*D^2                 (X^T X)

    Factors: the student's products count 3x (forward + backward of twice the forward),
    except the patch embedding, 2x (no gradient w.r.t. the images); the teacher's 1x.

      backbone   = 2B*(2*embed(Ng) + 3*blocks(Ng)) + L*B*(2*embed(Nl) + 3*blocks(Nl))
                 + 2B*(embed(Ng) + blocks(Ng))                         (teacher, globals)
      dino       = 3*(2+L)*B*head + 2B*head
      predictors = 3 * 2 (spatial, channel) * (2B*Ng + L*B*Nl) * 2*D^2
      spatial    = 4 * (2*B*2*Pg^2*D + 2L*B*2*Pl^2*D)    (2 global/global pairs and 2L
                   global/local pairs per image; teacher side 1x + student side 3x)
      channel    = 2*D^2 * (3*(2B*Ng + L*B*Nl) + 2B*Ng)  (student once per view, 3x;
                   teacher once per global view with its global projection, 1x)
      step       = backbone + dino + predictors + spatial + channel

    Not counted: layer/batch norms, softmax, GELU/ReLU, losses, grid_sample, the bicubic
    resize of the position embedding, the weight normalisation of the last layer,
    gradient clipping, AdamW, the EMA and centre updates. Returns FLOPs (not GFLOP).
    """
    def g(k):
        return cfg[k] if isinstance(cfg, dict) else getattr(cfg, k)

    B, L, D, depth = g("batch"), g("locals"), g("dim"), g("depth")
    p = g("patch")
    M = int(round(D * g("mlp_ratio")))
    K, Hh, Bn = g("out_dim"), g("head_hidden"), g("bottleneck")
    Ng = (g("img") // p) ** 2
    Nl = (g("local_img") // p) ** 2
    Pg, Pl = g("overlap") ** 2, g("local_overlap") ** 2

    def embed(N):
        return 2 * N * 3 * p * p * D

    def blocks(N):
        T = N + 1
        return depth * (8 * T * D * D + 4 * T * D * M + 4 * T * T * D)

    backbone = (2 * B * (2 * embed(Ng) + 3 * blocks(Ng)) + L * B * (2 * embed(Nl) + 3 * blocks(Nl))
                + 2 * B * (embed(Ng) + blocks(Ng)))
    head = 2 * (D * Hh + Hh * Hh + Hh * Bn + Bn * K)
    dino = 3 * (2 + L) * B * head + 2 * B * head
    tokens_s = 2 * B * Ng + L * B * Nl
    predictors = 3 * 2 * tokens_s * 2 * D * D
    spatial = 4 * (2 * B * 2 * Pg * Pg * D + 2 * L * B * 2 * Pl * Pl * D)
    channel = 2 * D * D * (3 * tokens_s + 2 * B * Ng)
    return backbone + dino + predictors + spatial + channel


def main(argv=None):
    args = parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # already set (only possible once per process)
    import torch.nn as nn
    import torch.nn.functional as F

    dev = torch.device(args.device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            sys.exit("torch_step.py: --device cuda but torch.cuda.is_available() is False")
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32
        torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(args.seed)

    B, L, D, H = args.batch, args.locals, args.dim, args.heads
    d_head = D // H
    gsz, lsz = args.img // args.patch, args.local_img // args.patch
    Ng, Nl = gsz * gsz, lsz * lsz

    def drop_path(x, rate, training):
        if rate == 0.0 or not training:
            return x
        keep = 1.0 - rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep).div_(keep)
        return x * mask

    class Block(nn.Module):
        def __init__(self, dpr):
            super().__init__()
            hidden = int(round(D * args.mlp_ratio))
            self.norm1 = nn.LayerNorm(D, eps=1e-6)
            self.qkv = nn.Linear(D, 3 * D)
            self.proj = nn.Linear(D, D)
            self.norm2 = nn.LayerNorm(D, eps=1e-6)
            self.fc1 = nn.Linear(D, hidden)
            self.fc2 = nn.Linear(hidden, D)
            self.dpr = dpr

        def attn(self, x):
            b, t, _ = x.shape
            qkv = self.qkv(x).reshape(b, t, 3, H, d_head).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            if args.attn == "sdpa":
                o = F.scaled_dot_product_attention(q, k, v)
            else:
                a = (q * d_head ** -0.5) @ k.transpose(-2, -1)
                o = a.softmax(dim=-1) @ v
            return self.proj(o.transpose(1, 2).reshape(b, t, D))

        def forward(self, x):
            x = x + drop_path(self.attn(self.norm1(x)), self.dpr, self.training)
            x = x + drop_path(self.fc2(F.gelu(self.fc1(self.norm2(x)))), self.dpr, self.training)
            return x

    class ViT(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch_embed = nn.Conv2d(3, D, args.patch, args.patch)
            self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
            self.pos_embed = nn.Parameter(torch.zeros(1, 1 + Ng, D))
            rates = torch.linspace(0, args.drop_path, args.depth).tolist()
            self.blocks = nn.ModuleList([Block(r) for r in rates])
            self.norm = nn.LayerNorm(D, eps=1e-6)
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
            nn.init.trunc_normal_(self.cls_token, std=0.02)
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    nn.init.trunc_normal_(m.weight, std=0.02)
                    nn.init.zeros_(m.bias)

        def pos(self, side):
            if side == gsz:
                return self.pos_embed
            cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
            patch_pos = patch_pos.reshape(1, gsz, gsz, D).permute(0, 3, 1, 2)
            patch_pos = F.interpolate(patch_pos, size=(side, side), mode="bicubic",
                                      align_corners=False)
            return torch.cat([cls_pos, patch_pos.permute(0, 2, 3, 1).reshape(1, -1, D)], 1)

        def forward(self, x):
            x = self.patch_embed(x)
            side = x.shape[-1]
            x = x.flatten(2).transpose(1, 2)
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos(side)
            for blk in self.blocks:
                x = blk(x)
            return self.norm(x)

    class DINOHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = nn.Sequential(
                nn.Linear(D, args.head_hidden), nn.GELU(),
                nn.Linear(args.head_hidden, args.head_hidden), nn.GELU(),
                nn.Linear(args.head_hidden, args.bottleneck))
            for m in self.mlp:
                if isinstance(m, nn.Linear):
                    nn.init.trunc_normal_(m.weight, std=0.02)
                    nn.init.zeros_(m.bias)
            # weight-normalised last layer, g fixed to 1: W = v / ||v|| per output row
            v = torch.empty(args.out_dim, args.bottleneck)
            nn.init.kaiming_uniform_(v, a=math.sqrt(5))
            self.last_v = nn.Parameter(v)

        def forward(self, x):
            x = F.normalize(self.mlp(x), dim=-1, p=2)
            return F.linear(x, F.normalize(self.last_v, dim=1, p=2))

    class Proj(nn.Module):  # teacher side: ReLU(BN(r))
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(D)

        def forward(self, x):
            return F.relu(self.bn(x))

    class Pred(nn.Module):  # student side: ReLU(BN(W r)), W C x C without bias
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(D, D, bias=False)
            self.bn = nn.BatchNorm1d(D)

        def forward(self, x):
            return F.relu(self.bn(self.lin(x)))

    class SereModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = ViT()
            self.head = DINOHead()
            kinds = ["g", "l"] if L > 0 else ["g"]
            self.proj = nn.ModuleDict({f"{r}_{k}": Proj() for r in ("sp", "ch") for k in kinds})
            self.pred = nn.ModuleDict({f"{r}_{k}": Pred() for r in ("sp", "ch") for k in kinds})

    student = SereModel().to(dev)
    teacher = copy.deepcopy(student)
    for blk in teacher.backbone.blocks:
        blk.dpr = 0.0
    for prm in teacher.parameters():
        prm.requires_grad_(False)
    student.train()
    teacher.train()  # batch statistics in the projection BNs, as the authors' teacher
    s_params = list(student.parameters())
    t_params = list(teacher.parameters())

    regularized, not_regularized = [], []
    for name, prm in student.named_parameters():
        (not_regularized if name.endswith(".bias") or prm.ndim == 1 else regularized).append(prm)
    lr = args.lr * B / 256.0
    opt = torch.optim.AdamW([{"params": regularized, "weight_decay": args.weight_decay},
                             {"params": not_regularized, "weight_decay": 0.0}], lr=lr)
    center = torch.zeros(1, args.out_dim, device=dev)

    # ---- synthetic data and overlap grids (fixed) ----
    gen = torch.Generator().manual_seed(args.seed + 1)
    globals_ = torch.randn(2 * B, 3, args.img, args.img, generator=gen).to(dev)
    locals_ = (torch.randn(L * B, 3, args.local_img, args.local_img, generator=gen).to(dev)
               if L > 0 else None)

    def grid(n, side):
        """n grids of side x side cell centres in a random box inside [-0.9, 0.9]^2 (x first)."""
        lo = torch.rand(n, 2, generator=gen) * 0.9 - 0.9           # [-0.9, 0)
        hi = torch.rand(n, 2, generator=gen) * (0.9 - 0.3) + 0.3   # [0.3, 0.9)
        t = (torch.arange(side, dtype=torch.float32) + 0.5) / side
        xs = lo[:, None, 0] + t[None] * (hi - lo)[:, None, 0]       # n x side
        ys = lo[:, None, 1] + t[None] * (hi - lo)[:, None, 1]
        gx = xs[:, None, :].expand(n, side, side)
        gy = ys[:, :, None].expand(n, side, side)
        return torch.stack([gx, gy], -1).reshape(n, side * side, 2)

    Pg, Pl = args.overlap ** 2, args.local_overlap ** 2
    # global/global pairs (t, s) = (0, 1), (1, 0): teacher grids indexed by t, student by s.
    gg_t = grid(2 * B, args.overlap).reshape(2 * B, Pg, 1, 2).to(dev)
    gg_s = grid(2 * B, args.overlap).reshape(2 * B, Pg, 1, 2).to(dev)
    if L > 0:
        # global/local pairs (t, s): teacher view t holds its L grids side by side,
        # student local view s holds its 2 grids (one per t) side by side.
        gl_t = grid(2 * L * B, args.local_overlap).reshape(2, L, B, Pl, 2)
        gl_t = gl_t.permute(0, 2, 1, 3, 4).reshape(2 * B, L * Pl, 1, 2).to(dev)
        gl_s = grid(2 * L * B, args.local_overlap).reshape(2, L, B, Pl, 2)
        gl_s = gl_s.permute(1, 2, 0, 3, 4).reshape(L * B, 2 * Pl, 1, 2).to(dev)

    def sample(rows, views, side, g):
        """rows (views*B*side^2, D) -> bilinear samples (views*B, Q, D) at grids g (views*B, Q, 1, 2)."""
        fmap = rows.reshape(views * B, side, side, D).permute(0, 3, 1, 2)
        out = F.grid_sample(fmap, g, mode="bilinear", padding_mode="zeros", align_corners=False)
        return out.squeeze(-1).transpose(1, 2)

    def spatial_ce(t, s):
        """t, s (n, P, D) -> per-sample CE (n,), mean over heads and rows."""
        n, P, _ = t.shape
        th = t.reshape(n, P, H, d_head).transpose(1, 2)
        sh = s.reshape(n, P, H, d_head).transpose(1, 2)
        scale = d_head ** -0.5
        lt = (th @ th.transpose(-2, -1)) * scale
        ls = (sh @ sh.transpose(-2, -1)) * scale
        pt = F.softmax(lt / args.spatial_tau_t, dim=-1)
        return -(pt * F.log_softmax(ls, dim=-1)).sum(-1).mean(dim=(1, 2))

    def channel_logits(rows, views, n_tok):
        x = rows.reshape(views, B, n_tok, D)
        return x.transpose(-2, -1) @ x / n_tok  # views x B x D x D

    n_views = 2 + L

    def step():
        # ---- teacher (globals only) ----
        with torch.no_grad():
            tt = teacher.backbone(globals_)
            t_out = teacher.head(tt[:, 0])
            t_patch = tt[:, 1:].reshape(2 * B * Ng, D)
            # the teacher only sees global crops: the global projections serve all pairs
            tz = {k: teacher.proj[k](t_patch) for k in ("sp_g", "ch_g")}
            t_q = F.softmax((t_out - center) / args.teacher_temp, dim=-1).chunk(2)
            t_ch = F.softmax(channel_logits(tz["ch_g"], 2, Ng) / args.channel_tau_t, dim=-1)

        # ---- student ----
        sg = student.backbone(globals_)
        cls = [sg[:, 0]]
        s_pg = sg[:, 1:].reshape(2 * B * Ng, D)
        if L > 0:
            sl = student.backbone(locals_)
            cls.append(sl[:, 0])
            s_pl = sl[:, 1:].reshape(L * B * Nl, D)
        s_out = student.head(torch.cat(cls, 0))

        # DINO loss over (teacher view iq, student view v != iq) pairs
        s_logp = F.log_softmax(s_out / args.student_temp, dim=-1).chunk(n_views)
        l_dino = 0.0
        for iq in range(2):
            for v in range(n_views):
                if v != iq:
                    l_dino = l_dino + (-(t_q[iq] * s_logp[v]).sum(-1).mean())
        l_dino = l_dino / (2 * n_views - 2)

        # spatial relations
        with torch.no_grad():
            zt = sample(tz["sp_g"], 2, gsz, gg_t)                       # by teacher view t
        ps = sample(student.pred["sp_g"](s_pg), 2, gsz, gg_s)           # by student view s
        ps = ps.reshape(2, B, Pg, D).flip(0).reshape(2 * B, Pg, D)      # reorder to t = 1 - s
        sp_pairs = [spatial_ce(zt, ps).reshape(2, B).mean(1)]
        if L > 0:
            with torch.no_grad():
                zt = sample(tz["sp_g"], 2, gsz, gl_t)                   # 2B x L*Pl x D
                zt = zt.reshape(2, B, L, Pl, D).transpose(1, 2)        # t, s, b
            ps = sample(student.pred["sp_l"](s_pl), L, lsz, gl_s)       # L*B x 2*Pl x D
            ps = ps.reshape(L, B, 2, Pl, D).permute(2, 0, 1, 3, 4)      # t, s, b
            sp_pairs.append(spatial_ce(zt.reshape(-1, Pl, D),
                                       ps.reshape(-1, Pl, D)).reshape(2 * L, B).mean(1))
        l_sp = torch.cat(sp_pairs).mean()

        # channel relations
        ls_g = F.log_softmax(channel_logits(student.pred["ch_g"](s_pg), 2, Ng), dim=-1)
        ch_pairs = [-(t_ch * ls_g.flip(0)).sum(-1).mean(dim=(1, 2))]
        if L > 0:
            ls_l = F.log_softmax(channel_logits(student.pred["ch_l"](s_pl), L, Nl), dim=-1)
            ch_pairs.append(-(t_ch[:, None] * ls_l[None]).sum(-1).mean(dim=(2, 3)).flatten())
        l_ch = torch.cat(ch_pairs).mean()

        loss = l_dino * (4.0 - args.alpha - args.beta) / 2.0 + args.alpha * l_sp + args.beta * l_ch

        opt.zero_grad(set_to_none=True)
        loss.backward()
        grads = [q.grad for q in s_params if q.grad is not None]
        if args.clip_grad > 0:
            if args.clip_mode == "param":  # DINO utils.clip_gradients, vectorised
                norms = torch._foreach_norm(grads)
                coefs = [torch.clamp(args.clip_grad / (n + 1e-6), max=1.0) for n in norms]
                torch._foreach_mul_(grads, coefs)
            else:
                torch.nn.utils.clip_grad_norm_(s_params, args.clip_grad)
        opt.step()
        with torch.no_grad():
            m = args.momentum_teacher
            torch._foreach_mul_(t_params, m)
            torch._foreach_add_(t_params, s_params, alpha=1.0 - m)
            center.mul_(args.center_momentum).add_(t_out.mean(0, keepdim=True),
                                                   alpha=1.0 - args.center_momentum)
        return loss, l_dino, l_sp, l_ch

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def losses(out):
        return {k: round(float(v.detach()), 5)
                for k, v in zip(("total", "dino", "spatial", "channel"), out)}

    setup_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    load_avg = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    loss_first = None
    if args.check_flops:
        from torch.utils.flop_counter import FlopCounterMode
        counter = FlopCounterMode(display=False)
        with counter:
            out = step()
        sync()
        loss_first = losses(out)
        measured = counter.get_total_flops()
        per_op = {str(k): v for k, v in counter.get_flop_counts().get("Global", {}).items()}
        print(f"torch_step: FlopCounterMode {measured / 1e9:.4f} GFLOP vs step_flops "
              f"{step_flops(args) / 1e9:.4f} GFLOP; per op {per_op}", file=sys.stderr)

    for i in range(args.warmup):
        out = step()
        if loss_first is None:
            loss_first = losses(out)
    sync()
    times = []
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    for i in range(args.steps):
        t0 = time.perf_counter()
        out = step()
        sync()
        times.append(time.perf_counter() - t0)
        if loss_first is None:
            loss_first = losses(out)
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu_s = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    loss_last = losses(out)
    print(f"torch_step: first-step losses {loss_first}  (ln K = {math.log(args.out_dim):.3f}, "
          f"ln Pg = {math.log(Pg):.3f}, ln Pl = {math.log(Pl):.3f}, ln C = {math.log(D):.3f}); "
          f"last {loss_last}", file=sys.stderr)

    med = statistics.median(times)
    flops = step_flops(args)
    res = {
        "device": args.device, "threads": args.threads,
        "img": args.img, "local_img": args.local_img, "patch": args.patch, "dim": D,
        "depth": args.depth, "heads": H, "batch": B, "locals": L, "out_dim": args.out_dim,
        "overlap": args.overlap, "local_overlap": args.local_overlap,
        "steps": args.steps, "warmup": args.warmup,
        "median_ms": round(med * 1e3, 3), "min_ms": round(min(times) * 1e3, 3),
        "max_ms": round(max(times) * 1e3, 3),
        "images_per_s": round(B / med, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
        "gflop_per_step": round(flops / 1e9, 4),
        "gflop_per_s": round(flops / 1e9 / med, 3),
        "impl": "torch-eager", "torch": torch.__version__,
        "mlp_ratio": args.mlp_ratio, "head_hidden": args.head_hidden,
        "bottleneck": args.bottleneck, "alpha": args.alpha, "beta": args.beta,
        "drop_path": args.drop_path, "attn": args.attn, "clip_mode": args.clip_mode,
        "setup_rss_mb": round(setup_rss_mb, 1),
        # CPU seconds of this process per timed wall second and thread: well below 1 on CPU
        # means the cores were shared with other work and the timings are pessimistic.
        "cpu_util": round(cpu_s / (sum(times) * args.threads), 3),
        "load_avg_1m": None if load_avg is None else round(load_avg, 2),
        "loss_first": loss_first, "loss_last": loss_last,
    }
    if dev.type == "cuda":
        res["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
        res["gpu"] = torch.cuda.get_device_name()
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
