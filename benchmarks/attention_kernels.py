"""Attention at our shape, kernel by kernel: what the mask, dropout and tile alignment cost.

    python benchmarks/attention_kernels.py [--batch 256] [--length 140] [--quick] [--device cuda]

Forward + backward of one attention call, (B, 12 heads, L, 64), bf16 on CUDA (fp32 on CPU),
every variant timed interleaved in one run:
  - each sdpa kernel with our mask (``bucketed_structure``: the pretraining batch's
    seq2seq/bidirectional mix, captions padded in their bucket; what ``sdpa`` trains with),
    attention dropout 0 and 0.1;
  - the same kernels with no mask, and the flash kernel (which takes no mask): the
    upper bound for a bias-free formulation at this length;
  - no mask at L rounded down to a multiple of 64 (what tile alignment alone is worth);
  - the ``varlen`` and ``flex`` backends split into their per-forward preparation (varlen
    plan / BlockMask) and the per-layer attention call;
  - FlexAttention's call with no BlockMask (its kernel's own speed at this length) and with our
    mask in 64-wide blocks and 64-wide kernel tiles (L = 140 in 128-wide tiles computes
    256 x 256 per head, in 64-wide ones 192 x 192: what tile size alone is worth);
  - ``mode split``: our mask without a dense mask where the rule allows it (an experiment, not
    a backend yet): the batch ordered seq2seq examples first, whose prefix rows attend to the
    prefix (no mask) and whose target rows attend to every key, causal aligned bottom-right
    (``causal_lower_right``: flash, no mask); the bidirectional examples in one call with the
    mask (their padding). Checked against the dense mask at the real rows before it is timed;
  - the eager reference compiled by Inductor (scores and output on cuBLAS, mask + softmax +
    dropout fused between them);
  - the ``triton`` backend (vltrain's kernels: the mask computed in the tile, no dense mask) in
    32- and 64-wide blocks, with 4 or 8 warps and 1-3 pipeline stages, checked against the
    dense mask before it is timed. On CPU its rows appear only in Triton's interpreter
    (``TRITON_INTERPRET=1``: plumbing, not speed).
A variant the device cannot run is listed with the error, not dropped. A diagnosis for the
throughput table (which backend to build next), not a target of its own.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.common import (Size, bucketed_structure, full_size, machine_description,  # noqa: E402
                               markdown_table, median, sync)
from vltrain.model import attention as A  # noqa: E402


def sdpa_with(kernel, mask, dropout):
    """fwd+bwd closure of F.scaled_dot_product_attention pinned to one kernel (None: default)."""
    def run(q, k, v, go):
        if kernel is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        else:
            from torch.nn.attention import sdpa_kernel
            with sdpa_kernel([kernel]):
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        out.backward(go)
    return run


def backend_parts(name: str, st: A.AttentionStructure, dtype):
    """(prepare-only closure, attend-only closure) of one of our backends."""
    be = A.get_backend(name)
    prepared = be.prepare(st, dtype)

    def prepare(q, k, v, go):
        be.prepare(st, dtype)

    def attend(q, k, v, go):
        be.attend(q, k, v, prepared, 0.0).backward(go)
    return prepare, attend


def built_once(make, *args):
    """A closure built on its first call, inside the caller's per-variant error handling."""
    built = []

    def run(*t):
        if not built:
            built.append(make(*args))
        return built[0](*t)
    return run


def flex_variant(st: A.AttentionStructure, block: int | None, tiles: bool = True):
    """fwd+bwd closure of a compiled flex_attention call: no BlockMask (block None), or our mask
    in ``block``-wide blocks, with kernel tiles of that width (``tiles``; the backward's in the
    ratio its kernel requires: BLOCK_N1 % BLOCK_M1 == 0, BLOCK_M2 % BLOCK_N2 == 0) or the
    kernel's own (newer torch shrinks its default tiles to fit the blocks)."""
    from torch.nn.attention.flex_attention import flex_attention
    bm, opts = None, None
    if block:
        B, L = st.key_valid.shape
        bm = A.build_block_mask(A.structure_mask_mod(st.key_valid, st.target), B, L,
                                st.key_valid.device, compiled=True, BLOCK_SIZE=block)
        if tiles:
            opts = {"BLOCK_M": block, "BLOCK_N": block, "BLOCK_M1": block // 2, "BLOCK_N1": block,
                    "BLOCK_M2": block, "BLOCK_N2": block // 2}
    call = torch.compile(lambda q, k, v, m: flex_attention(q, k, v, block_mask=m, kernel_options=opts),
                         dynamic=False, fullgraph=True)

    def run(q, k, v, go):
        call(q, k, v, bm).backward(go)
    return run


def split_plan(st: A.AttentionStructure, dtype):
    """(seq2seq count, prefix length, bidirectional examples' mask) of ``st`` ordered seq2seq
    first, and that ordered structure. Needs what VLP's batches have: every seq2seq example's
    prefix real and of one length, its targets contiguous from there, padding after them."""
    s2s = st.target.any(1)
    order = torch.argsort((~s2s).to(torch.int8), stable=True)
    st = A.AttentionStructure(st.key_valid[order], st.target[order])
    n_s = int(s2s.sum())
    if not n_s:
        return 0, 0, st.additive_mask(dtype), st
    first = st.target[:n_s].float().argmax(1)
    P = int(first[0])
    pos = torch.arange(st.target.shape[1], device=first.device)
    if (bool((first != P).any()) or not bool(st.key_valid[:n_s, :P].all())
            or not torch.equal(st.target[:n_s, P:], st.key_valid[:n_s, P:])
            or bool((st.key_valid[:n_s] & (pos[None] >= P) & ~st.target[:n_s]).any())):
        raise ValueError("mode split needs one prefix length, a real prefix and contiguous targets")
    bi = A.AttentionStructure(st.key_valid[n_s:], st.target[n_s:]).additive_mask(dtype)
    return n_s, P, bi, st


def split_attention(q, k, v, n_s: int, P: int, bi_mask, dropout: float):
    """Our rule with no dense mask for the seq2seq examples (rows ordered seq2seq first)."""
    from torch.nn.attention.bias import causal_lower_right
    L, parts = q.shape[2], []
    if n_s:
        qs, ks, vs = q[:n_s], k[:n_s], v[:n_s]
        prefix = F.scaled_dot_product_attention(qs[:, :, :P], ks[:, :, :P], vs[:, :, :P], dropout_p=dropout)
        targets = F.scaled_dot_product_attention(qs[:, :, P:], ks, vs, attn_mask=causal_lower_right(L - P, L),
                                                 dropout_p=dropout)
        parts.append(torch.cat([prefix, targets], 2))
    if n_s < q.shape[0]:
        parts.append(F.scaled_dot_product_attention(q[n_s:], k[n_s:], v[n_s:], attn_mask=bi_mask,
                                                    dropout_p=dropout))
    return torch.cat(parts, 0)


def mode_split_variant(st: A.AttentionStructure, dropout: float):
    """fwd+bwd closure of ``split_attention``; on its first call (the warm-up) its dropout-free
    output must equal sdpa with the ordered structure's dense mask at every real query row."""
    plan = []

    def run(q, k, v, go):
        if not plan:
            n_s, P, bi, ordered = split_plan(st, q.dtype)
            plan.append((n_s, P, bi))
            with torch.no_grad():
                ref = F.scaled_dot_product_attention(q, k, v, attn_mask=ordered.additive_mask(q.dtype))
                err = (split_attention(q, k, v, n_s, P, bi, 0.0) - ref).abs().amax(-1)
            err = float(err.masked_fill(~ordered.key_valid[:, None], 0).max())
            if err > (2e-2 if q.dtype == torch.bfloat16 else 1e-5):
                raise AssertionError(f"mode split differs from the dense mask by {err:.3g}")
        split_attention(q, k, v, *plan[0], dropout).backward(go)
    return run


def eager_compiled_variant(mask, dropout: float):
    """fwd+bwd closure of the eager reference through ``torch.compile``."""
    call = torch.compile(A.eager_attention, dynamic=False)

    def run(q, k, v, go):
        call(q, k, v, mask, dropout).backward(go)
    return run


def triton_variant(st: A.AttentionStructure, block: int, dropout: float, warps: int = 4, stages: int = 3):
    """fwd+bwd closure of the ``triton`` backend in ``block``-wide blocks with ``warps`` warps
    and ``stages`` pipeline stages (with dropout, the keep mask's draw included, as the backend
    trains); on its first call its dropout-free output must equal sdpa with the dense mask at
    every real query row."""
    T = A.triton_attention
    prepared = T.prepare(st.key_valid, st.target)
    checked = []

    def run(q, k, v, go):
        T.BLOCK, T.NUM_WARPS, T.NUM_STAGES = block, warps, stages
        if not checked:
            with torch.no_grad():
                ref = F.scaled_dot_product_attention(q, k, v, attn_mask=st.additive_mask(q.dtype))
                err = (T.triton_attention(q, k, v, prepared, 0.0) - ref).abs().amax(-1)
            err = float(err.masked_fill(~st.key_valid[:, None], 0).max())
            if err > (2e-2 if q.dtype == torch.bfloat16 else 1e-5):
                raise AssertionError(f"triton attention differs from the dense mask by {err:.3g}")
            checked.append(True)
        T.triton_attention(q, k, v, prepared, dropout).backward(go)
    return run


# (block, warps, stages, dropout): the training setting (64, 4, 3, 0.1) and what to try beside it
TRITON_SETTINGS = [(64, 4, 3, 0.0), (64, 4, 3, 0.1), (32, 4, 3, 0.1), (64, 8, 3, 0.1), (64, 4, 2, 0.1),
                   (64, 8, 1, 0.1)]


def triton_rows(st: A.AttentionStructure, L: int):
    """The ``triton`` backend at each launch setting."""
    return [(f"triton (vltrain's kernels), {b}-wide blocks, {w} warps, {n} stages, our mask, dropout {p}", L,
             triton_variant(st, b, p, w, n)) for b, w, n, p in TRITON_SETTINGS]


def variants(st: A.AttentionStructure, dtype, device, L: int):
    mask = A.get_backend("sdpa").prepare(st, dtype)
    out = []                                      # (label, L used, closure)
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend
        for kern in ("CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
            for p in (0.0, 0.1):
                out.append((f"sdpa {kern}, our mask, dropout {p}", L, sdpa_with(getattr(SDPBackend, kern), mask, p)))
        for kern in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
            for p in (0.0, 0.1):
                out.append((f"sdpa {kern}, no mask, dropout {p}", L, sdpa_with(getattr(SDPBackend, kern), None, p)))
        L64 = L // 64 * 64
        if L64 and L64 != L:
            out.append((f"sdpa FLASH_ATTENTION, no mask, dropout 0.0, L={L64}", L64,
                        sdpa_with(SDPBackend.FLASH_ATTENTION, None, 0.0)))
        for name in ("varlen", "flex"):
            if name == "flex" and not A.flex_available() or name == "varlen" and not A.varlen_kernel_name("cuda"):
                continue
            prep, att = backend_parts(name, st, dtype)
            out += [(f"{name}: per-forward preparation only", L, prep), (f"{name}: attention call only", L, att)]
        if A.flex_available():
            out += [("flex: attention call only, no BlockMask (full attention)", L, built_once(flex_variant, st, None)),
                    ("flex: attention call only, our mask, 64-wide blocks and tiles", L,
                     built_once(flex_variant, st, 64)),
                    ("flex: attention call only, our mask, 64-wide blocks, the kernel's tiles", L,
                     built_once(flex_variant, st, 64, False))]
        from torch.nn.attention import SDPBackend, sdpa_kernel
        first = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
        for p in (0.0, 0.1):
            split = mode_split_variant(st, p)

            def pinned(q, k, v, go, split=split):     # cuDNN first where it runs (the fastest above)
                with sdpa_kernel(first, set_priority=True):
                    split(q, k, v, go)
            out.append((f"mode split: seq2seq with no mask (prefix call + bottom-right causal call), "
                        f"dropout {p}", L, pinned))
            out.append((f"eager attention compiled (Inductor), our mask, dropout {p}", L,
                        built_once(eager_compiled_variant, st.additive_mask(dtype), p)))
    else:
        for p in (0.0, 0.1):
            out.append((f"sdpa (CPU dispatch), our mask, dropout {p}", L, sdpa_with(None, mask, p)))
            out.append((f"sdpa (CPU dispatch), no mask, dropout {p}", L, sdpa_with(None, None, p)))
            out.append((f"mode split (CPU dispatch), dropout {p}", L, mode_split_variant(st, p)))
        prep, att = backend_parts("varlen", st, dtype)
        out += [("varlen (CPU emulation): per-forward preparation only", L, prep),
                ("varlen (CPU emulation): attention call only", L, att)]
    if A.triton_attention.runs_on(device.type):   # on CPU: Triton's interpreter (the rows' plumbing)
        out += triton_rows(st, L)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--length", type=int, default=140, help="regions + text positions")
    p.add_argument("--text", type=int, default=40, help="text bucket inside --length")
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="tiny shape (CI)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.length, args.text, args.heads, args.head_dim, args.reps = 4, 22, 12, 4, 16, 2
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    B, L, h, d = args.batch, args.length, args.heads, args.head_dim
    cfg = dataclasses.replace(full_size().model, num_heads=h, hidden_size=h * d)
    st = bucketed_structure(Size("custom", cfg, batch=B, regions=L - args.text, text=args.text), device)
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(B, h, L, d, generator=g).to(device, dtype) for _ in range(4)]

    def tensors(n):
        q, k, v, go = (t[:, :, :n] for t in base)
        return [t.detach().requires_grad_() for t in (q, k, v)] + [go.contiguous()]

    rows, timed = [], []
    for label, n, fn in variants(st, dtype, device, L):
        try:
            fn(*tensors(n))                       # warm-up: compiles, autotunes, checks it runs
            fn(*tensors(n))
            sync(device)
            timed.append((label, n, fn, []))
        except Exception as e:  # noqa: BLE001 — a kernel this device refuses is a result too
            rows.append([label, "n/a", "n/a", f"{type(e).__name__}: {str(e).splitlines()[0][:90]}"])
    for _ in range(args.reps):
        for label, n, fn, times in timed:
            ins = tensors(n)
            sync(device)
            t0 = time.perf_counter()
            fn(*ins)
            sync(device)
            times.append(time.perf_counter() - t0)
    for label, n, fn, times in timed:
        t = median(times)
        # fwd + bwd of dense attention = 3 x (2 matmuls of 2·B·h·n²·d), whatever is masked
        tflops = float("nan") if "preparation" in label else 12 * B * h * n * n * d / t / 1e12
        rows.append([label, t * 1e3, tflops, "-"])
    rows.sort(key=lambda r: (r[1] == "n/a", r[0]))
    print(f"Machine: {machine_description(device)}. Shape (B, heads, L, d) = ({B}, {h}, {L}, {d}), "
          f"{str(dtype).replace('torch.', '')}, {int(st.target.any(1).sum())} of {B} examples seq2seq, "
          f"{float(st.key_valid.float().mean()):.0%} of positions real; median of {args.reps} interleaved "
          f"fwd+bwd calls.\n")
    print(markdown_table(["variant", "fwd+bwd ms", "dense-equivalent TFLOP/s", "error"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
