"""``model.attention_backend=triton``: vltrain's own fused attention for short sequences.

Why: at our lengths (100 regions + ~40 text, L = 140, head dim 64) the library kernels are
far from their bounds. On an H200 cuDNN took 1.34 ms per layer (forward + backward, our
mask, dropout 0.1) for ~5e10 FLOPs (~35 TFLOP/s), 13.8 ms of a 61 ms step, for 2% of the
step's FLOPs (BENCHMARKS.md): their 128-wide tiles cover 140 with 256 (30% of the tile is
work), and our mask reaches them as a dense (B, 1, L, L) bias. These kernels instead
  * compute the mask from two (B, L) vectors (``AttentionStructure``'s ``key_valid`` and
    ``target``: the rule in ``attention.py``'s docstring) inside the tile: no dense mask;
  * tile L with ``BLOCK``-wide blocks (64: 140 -> 192; 32: 140 -> 160);
  * take attention dropout as a keep mask drawn once per call, one bit per score
    (packed_dropout.py's draw and format: 8 bits per Philox call; each query row's L scores
    in ceil(L / 8) bytes, ~7.7 MB per layer at micro-batch 256 where a bool mask took 64 MB,
    kept for the backward), so that the backward reuses exactly the forward's draw and a
    test can give eager the same mask.
Blocks no row of a tile may see are not computed: per example, the end of its last valid
non-target key and of its last valid key (``prepare``) bound each query block's key blocks
(a block of prefix rows stops before the caption's blocks; trailing padding is never read
as keys and values),
and a key block of caption keys is visited only by query blocks at or past its first one, so
a seq2seq example at L = 140 in 64-wide blocks computes 7 of its 9 tile pairs.
FlashAttention-2's algorithm: the forward keeps a running max and sum per query row (one
pass over the key blocks, the log-sum-exp saved), the backward recomputes the
probabilities (after one pass for rowsum(dO * O)); its program i computes dK/dV of key
block i, then dQ of query block i (no atomics). Scores and softmax stay in fp32 (eager rounds the scores to the input
dtype before its fp32 softmax, so bf16 results differ from eager by bf16 rounding, no more).

CUDA only (Triton GPU kernels); CPU tests run the same kernels in Triton's interpreter
(``TRITON_INTERPRET=1``, tests/triton_attention_check.py) against ``eager``. ``auto`` does
not pick it until a GPU measurement says it is faster than ``sdpa``.
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch

try:
    import triton
    import triton.language as tl
except ImportError:          # torch without Triton (CPU-only wheels on some platforms)
    triton = tl = None

# Launch settings, what benchmarks/attention_kernels.py varies: the query/key block width
# (32 or 64; Hopper's wgmma needs 64 rows per warp group, 32 falls back to mma), warps and
# pipeline stages. The defaults: FlashAttention's width for head dim 64 and Triton's own
# warps/stages, until a GPU measures the fastest at L = 140.
BLOCK = 64
NUM_WARPS = 4
NUM_STAGES = 3

MISSING_MESSAGE = "model.attention_backend=triton needs the triton package"
CPU_MESSAGE = ("model.attention_backend=triton runs Triton GPU kernels: it needs a CUDA device "
               "(on CPU use model.attention_backend=sdpa or auto)")


def available() -> bool:
    return triton is not None


def interpreting() -> bool:
    """Triton's CPU interpreter is on (tests): the kernels then run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def runs_on(device_type: str) -> bool:
    """The kernels can run on tensors of ``device_type``: CUDA, or any in Triton's interpreter."""
    return available() and (device_type == "cuda" or interpreting())


def block_for(L: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """The block width for length ``L``: ``BLOCK``, smaller for sequences shorter than it, and
    at most 32 in fp32 (its tiles take twice the shared memory: the dK/dV kernel at 64 needs
    132 KB, more than GPUs outside the data-centre parts have)."""
    return max(16, min(BLOCK if dtype != torch.float32 else min(BLOCK, 32), triton.next_power_of_2(L)))


if triton is not None:

    @triton.jit
    def _allowed(offs_m, offs_n, m_in, n_in, tq, tk, valid):
        """(M, N) mask of the rule: valid(k) and (not target(k) or (target(q) and k <= q))."""
        causal = offs_n[None, :] <= offs_m[:, None]
        return (m_in[:, None] & n_in[None, :] & (valid[None, :] != 0)
                & ((tk[None, :] == 0) | ((tq[:, None] != 0) & causal)))

    @triton.jit
    def _tile(PTR, b, h, sb, sh, sl, offs, rows_in, offs_d, d_in):
        """Rows ``offs`` of head ``h`` of example ``b`` of a (B, h, L, d) tensor; zero outside."""
        return tl.load(PTR + b * sb + h * sh + offs[:, None] * sl + offs_d[None, :],
                       mask=rows_in[:, None] & d_in[None, :], other=0.0)

    @triton.jit
    def _store_tile(PTR, x, b, h, sb, sh, sl, offs, rows_in, offs_d, d_in):
        tl.store(PTR + b * sb + h * sh + offs[:, None] * sl + offs_d[None, :], x.to(PTR.dtype.element_ty),
                 mask=rows_in[:, None] & d_in[None, :])

    @triton.jit
    def _keep_scale(KEEP, b, h, skb, skh, skl, offs_m, offs_n, m_in, n_in, keep_scale):
        """(M, N) dropout factor: 1 / (1 - p) where the keep bits keep, else 0 (score n's bit
        is bit n % 8 of its row's byte n // 8: 8 neighbouring columns read one byte)."""
        byte = tl.load(KEEP + b * skb + h * skh + offs_m[:, None] * skl + (offs_n[None, :] >> 3),
                       mask=m_in[:, None] & n_in[None, :], other=0)
        return tl.where(((byte.to(tl.int32) >> (offs_n[None, :] & 7)) & 1) != 0, keep_scale, 0.0)

    @triton.jit
    def _recompute(q, k, v, do, lse, delta, allowed, KEEP, b, h, skb, skh, skl, offs_m, offs_n, m_in, n_in,
                   qk_scale, keep_scale, DROPOUT: tl.constexpr, PREC: tl.constexpr):
        """The backward's (M, N) tiles: the dropped-out probabilities (what multiplied V) and
        dS, the scores' gradient (natural-log units: the caller applies the softmax scale)."""
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        p = tl.where(allowed, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        pz = p
        if DROPOUT:                  # one return for both: Triton inlines this function
            z = _keep_scale(KEEP, b, h, skb, skh, skl, offs_m, offs_n, m_in, n_in, keep_scale)
            pz = p * z
            dp = dp * z
        return pz, p * (dp - delta[:, None])

    @triton.jit
    def _program(H, L, D, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
        """This program's (example x head, example, head, its block's rows, which are < L, the
        head-dim offsets, which are < D). One grid axis, the blocks of one (example, head)
        consecutive: they run close in time and re-read its K/V from L2 (the grid's other axes
        stop at 65535); int64: B*h*L*L (the keep mask's offsets) can pass 2^31."""
        nb = tl.cdiv(L, BLOCK)
        pid = tl.program_id(0)
        bh = (pid // nb).to(tl.int64)
        offs = (pid % nb) * BLOCK + tl.arange(0, BLOCK)
        offs_d = tl.arange(0, BLOCK_D)
        return bh, bh // H, bh % H, offs, offs < L, offs_d, offs_d < D

    @triton.jit
    def _key_end(ENDS, b, offs_q, q_in, t_q):
        """Where the keys that query rows ``offs_q`` may see end: past every valid non-target
        key, and past the valid target keys up to the block's last target row."""
        last_t = tl.max(tl.where(q_in & (t_q != 0), offs_q, -1), 0)
        return tl.maximum(tl.load(ENDS + 2 * b), tl.minimum(last_t + 1, tl.load(ENDS + 2 * b + 1)))

    @triton.jit
    def _query_start(offs_k, k_in, t_k, valid, L, BLOCK: tl.constexpr):
        """The first query block that may see a key of block ``offs_k``: 0 if it holds a valid
        non-target key (every row sees those), the block of its first valid target key if it
        holds only targets (only target rows at or past it see them), none (L) if no valid key."""
        v = k_in & (valid != 0)
        has_non_target = tl.max((v & (t_k == 0)).to(tl.int32), 0) > 0
        first = tl.min(tl.where(v, offs_k, L), 0)
        return tl.where(has_non_target, 0, tl.where(first < L, first // BLOCK * BLOCK, L))

    @triton.jit
    def _key_block(K, V, VALID, TARGET, b, h, skb, skh, skl, svb, svh, svl, start, L, offs_d, d_in,
                   offs_q, q_in, t_q, BLOCK: tl.constexpr):
        """Key block ``start``: K and V tiles, and which of its keys each query row may see."""
        offs_n = start + tl.arange(0, BLOCK)
        n_in = offs_n < L
        k = _tile(K, b, h, skb, skh, skl, offs_n, n_in, offs_d, d_in)
        v = _tile(V, b, h, svb, svh, svl, offs_n, n_in, offs_d, d_in)
        allowed = _allowed(offs_q, offs_n, q_in, n_in, t_q, tl.load(TARGET + b * L + offs_n, mask=n_in, other=0),
                           tl.load(VALID + b * L + offs_n, mask=n_in, other=0))
        return offs_n, n_in, k, v, allowed

    @triton.jit
    def _attention_fwd_kernel(Q, K, V, VALID, TARGET, ENDS, KEEP, O, LSE,
                              sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sob, soh, sol, spb, sph, spl,
                              H, L, D, qk_scale, keep_scale,
                              DROPOUT: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
                              PREC: tl.constexpr):
        """Output rows of one query block: one pass over the key blocks."""
        bh, b, h, offs_m, m_in, offs_d, d_in = _program(H, L, D, BLOCK, BLOCK_D)
        q = _tile(Q, b, h, sqb, sqh, sql, offs_m, m_in, offs_d, d_in)
        tq = tl.load(TARGET + b * L + offs_m, mask=m_in, other=0)
        m_i = tl.full([BLOCK], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK], tl.float32)
        acc = tl.zeros([BLOCK, BLOCK_D], tl.float32)
        for start in range(0, _key_end(ENDS, b, offs_m, m_in, tq), BLOCK):
            offs_n, n_in, k, v, allowed = _key_block(K, V, VALID, TARGET, b, h, skb, skh, skl, svb, svh, svl, start,
                                                     L, offs_d, d_in, offs_m, m_in, tq, BLOCK)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale      # log2 units
            s = tl.where(allowed, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)   # a row with no key yet
            p = tl.exp2(s - m_use[:, None])
            alpha = tl.exp2(m_i - m_use)
            l_i = l_i * alpha + tl.sum(p, 1)       # the softmax's sum: before dropout
            if DROPOUT:
                p = p * _keep_scale(KEEP, b, h, spb, sph, spl, offs_m, offs_n, m_in, n_in, keep_scale)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
            m_i = m_new
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)                  # rows past L only
        _store_tile(O, acc / l_safe[:, None], b, h, sob, soh, sol, offs_m, m_in, offs_d, d_in)
        tl.store(LSE + bh * L + offs_m, m_i + tl.log2(l_safe), mask=m_in)

    @triton.jit
    def _attention_bwd_kernel(Q, K, V, DO, LSE, DELTA, VALID, TARGET, ENDS, KEEP, DQ, DK, DV,
                              sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sdob, sdoh, sdol, sgb, sgh, sgl,
                              spb, sph, spl, H, L, D, sm_scale, qk_scale, keep_scale,
                              DROPOUT: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
                              PREC: tl.constexpr):
        """Program i: dK, dV of key block i over every query block, then dQ of query block i
        over every key block (FlashAttention-2's backward without atomics; one launch)."""
        bh, b, h, offs_i, i_in, offs_d, d_in = _program(H, L, D, BLOCK, BLOCK_D)
        t_i = tl.load(TARGET + b * L + offs_i, mask=i_in, other=0)

        k = _tile(K, b, h, skb, skh, skl, offs_i, i_in, offs_d, d_in)
        v = _tile(V, b, h, svb, svh, svl, offs_i, i_in, offs_d, d_in)
        valid = tl.load(VALID + b * L + offs_i, mask=i_in, other=0)
        dk = tl.zeros([BLOCK, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK, BLOCK_D], tl.float32)
        for start in range(_query_start(offs_i, i_in, t_i, valid, L, BLOCK), L, BLOCK):
            offs_m = start + tl.arange(0, BLOCK)
            m_in = offs_m < L
            q = _tile(Q, b, h, sqb, sqh, sql, offs_m, m_in, offs_d, d_in)
            do = _tile(DO, b, h, sdob, sdoh, sdol, offs_m, m_in, offs_d, d_in)
            allowed = _allowed(offs_m, offs_i, m_in, i_in, tl.load(TARGET + b * L + offs_m, mask=m_in, other=0),
                               t_i, valid)
            pz, ds = _recompute(q, k, v, do, tl.load(LSE + bh * L + offs_m, mask=m_in, other=0.0),
                                tl.load(DELTA + bh * L + offs_m, mask=m_in, other=0.0), allowed, KEEP, b, h,
                                spb, sph, spl, offs_m, offs_i, m_in, i_in, qk_scale, keep_scale, DROPOUT, PREC)
            dv += tl.dot(tl.trans(pz.to(do.dtype)), do, input_precision=PREC)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
        _store_tile(DK, dk * sm_scale, b, h, sgb, sgh, sgl, offs_i, i_in, offs_d, d_in)
        _store_tile(DV, dv, b, h, sgb, sgh, sgl, offs_i, i_in, offs_d, d_in)

        q = _tile(Q, b, h, sqb, sqh, sql, offs_i, i_in, offs_d, d_in)
        do = _tile(DO, b, h, sdob, sdoh, sdol, offs_i, i_in, offs_d, d_in)
        lse = tl.load(LSE + bh * L + offs_i, mask=i_in, other=0.0)
        delta = tl.load(DELTA + bh * L + offs_i, mask=i_in, other=0.0)
        dq = tl.zeros([BLOCK, BLOCK_D], tl.float32)
        for start in range(0, _key_end(ENDS, b, offs_i, i_in, t_i), BLOCK):
            offs_n, n_in, k, v, allowed = _key_block(K, V, VALID, TARGET, b, h, skb, skh, skl, svb, svh, svl, start,
                                                     L, offs_d, d_in, offs_i, i_in, t_i, BLOCK)
            _, ds = _recompute(q, k, v, do, lse, delta, allowed, KEEP, b, h, spb, sph, spl, offs_i, offs_n,
                               i_in, n_in, qk_scale, keep_scale, DROPOUT, PREC)
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
        _store_tile(DQ, dq * sm_scale, b, h, sgb, sgh, sgl, offs_i, i_in, offs_d, d_in)


    @triton.jit
    def _attention_bwd_delta_kernel(O, DO, DELTA, sob, soh, sol, sdob, sdoh, sdol, H, L, D,
                                    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
        """rowsum(dO * O) of one query block, fp32: the backward's softmax correction (one read
        of O and dO; in torch it took ~5 kernels and ~770 MB of traffic per layer)."""
        bh, b, h, offs, rows_in, offs_d, d_in = _program(H, L, D, BLOCK, BLOCK_D)
        o = _tile(O, b, h, sob, soh, sol, offs, rows_in, offs_d, d_in).to(tl.float32)
        do = _tile(DO, b, h, sdob, sdoh, sdol, offs, rows_in, offs_d, d_in).to(tl.float32)
        tl.store(DELTA + bh * L + offs, tl.sum(o * do, 1), mask=rows_in)


LOG2E = 1.4426950408889634


def _meta(q: torch.Tensor, dropout: bool, block: int) -> dict:
    d = q.shape[-1]
    return dict(DROPOUT=dropout, BLOCK=block, BLOCK_D=max(16, triton.next_power_of_2(d)),
                # fp32 tests want fp32 products (Triton's default on CUDA is TF32); ignored for bf16
                PREC="ieee" if q.dtype == torch.float32 else "tf32", num_warps=NUM_WARPS, num_stages=NUM_STAGES)


def _keep_args(keep: Optional[torch.Tensor], p: float, valid: torch.Tensor) -> tuple:
    """The kernels' keep-bit arguments: (pointer, its batch/head/row strides, 1 / (1 - p)).
    Without dropout: any pointer (``valid``), zero strides and 1, never read (``DROPOUT``)."""
    if keep is None:
        return valid, (0, 0, 0), 1.0
    return keep, (keep.stride(0), keep.stride(1), keep.stride(2)), 1.0 / (1.0 - p)


def _strides(t: torch.Tensor) -> tuple:
    """(batch, head, position) strides of a (B, h, L, d) tensor whose last dim is contiguous."""
    return t.stride(0), t.stride(1), t.stride(2)


def _blhd(like: torch.Tensor) -> torch.Tensor:
    """An empty (B, L, h, d) tensor: attention's outputs and gradients in the layout the block
    reads (``transpose(1, 2).reshape(B, L, H)`` of its (B, h, L, d) view is then free)."""
    B, h, L, d = like.shape
    return torch.empty((B, L, h, d), dtype=like.dtype, device=like.device)


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def on_device(device: torch.device):
    """Launch context: Triton launches on the current CUDA device and its stream, so make it the
    tensors' (a process that has not called ``set_device``, or holds tensors on another GPU)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _forward_impl(q, k, v, valid, target, ends, keep: Optional[torch.Tensor], p: float, block: int):
    q, k, v = (_unit_last(t) for t in (q, k, v))
    B, h, L, d = q.shape
    o = _blhd(q)
    ov = o.transpose(1, 2)
    lse = torch.empty((B, h, L), dtype=torch.float32, device=q.device)
    kp, ks, kscale = _keep_args(keep, p, valid)
    with on_device(q.device):
        _attention_fwd_kernel[(B * h * triton.cdiv(L, block),)](
            q, k, v, valid, target, ends, kp, ov, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(ov), *ks,
            h, L, d, d ** -0.5 * LOG2E, kscale, **_meta(q, keep is not None, block))
    return o, lse


def _backward_impl(do, q, k, v, o, lse, valid, target, ends, keep: Optional[torch.Tensor], p: float,
                   block: int):
    """(dq, dk, dv), each (B, L, h, d); ``do`` and ``o`` are (B, L, h, d)."""
    q, k, v = (_unit_last(t) for t in (q, k, v))
    B, h, L, d = q.shape
    dov = _unit_last(do).transpose(1, 2)
    ov = o.transpose(1, 2)
    grid = (B * h * triton.cdiv(L, block),)
    meta = _meta(q, keep is not None, block)
    delta = torch.empty((B, h, L), dtype=torch.float32, device=q.device)
    dq, dk, dv = _blhd(q), _blhd(q), _blhd(q)
    dqv, dkv, dvv = (t.transpose(1, 2) for t in (dq, dk, dv))
    kp, ks, kscale = _keep_args(keep, p, valid)
    with on_device(q.device):
        _attention_bwd_delta_kernel[grid](ov, dov, delta, *_strides(ov), *_strides(dov), h, L, d, BLOCK=block,
                                          BLOCK_D=meta["BLOCK_D"], num_warps=NUM_WARPS)
        _attention_bwd_kernel[grid](q, k, v, dov, lse, delta, valid, target, ends, kp, dqv, dkv, dvv,
                                    *_strides(q), *_strides(k), *_strides(v), *_strides(dov), *_strides(dqv), *ks,
                                    h, L, d, d ** -0.5, d ** -0.5 * LOG2E, kscale, **meta)
    return dq, dk, dv


if triton is not None:
    # Custom ops: opaque to torch.compile (the compiled blocks call them as one node each,
    # their autograd registered below), so Dynamo never traces into the launches.
    @torch.library.custom_op("vltrain::short_attention", mutates_args=())
    def short_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor,
                        target: torch.Tensor, ends: torch.Tensor, keep: Optional[torch.Tensor], p: float,
                        block: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _forward_impl(q, k, v, valid, target, ends, keep, p, block)

    @short_attention.register_fake
    def _(q, k, v, valid, target, ends, keep, p, block):
        B, h, L, _ = q.shape
        return _blhd(q), q.new_empty((B, h, L), dtype=torch.float32)

    @torch.library.custom_op("vltrain::short_attention_backward", mutates_args=())
    def short_attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 o: torch.Tensor, lse: torch.Tensor, valid: torch.Tensor, target: torch.Tensor,
                                 ends: torch.Tensor, keep: Optional[torch.Tensor], p: float,
                                 block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _backward_impl(do, q, k, v, o, lse, valid, target, ends, keep, p, block)

    @short_attention_backward.register_fake
    def _(do, q, k, v, o, lse, valid, target, ends, keep, p, block):
        return _blhd(q), _blhd(q), _blhd(q)

    def _setup(ctx, inputs, output):
        q, k, v, valid, target, ends, keep, p, block = inputs
        o, lse = output
        ctx.save_for_backward(q, k, v, o, lse, valid, target, ends, keep)
        ctx.p, ctx.block = p, block

    def _backward(ctx, do, dlse):
        q, k, v, o, lse, valid, target, ends, keep = ctx.saved_tensors
        dq, dk, dv = short_attention_backward(do, q, k, v, o, lse, valid, target, ends, keep, ctx.p, ctx.block)
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2), None, None, None, None, None, None

    short_attention.register_autograd(_backward, setup_context=_setup)


def prepare(key_valid: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the kernels read, once per forward: the two (B, L) int8 vectors, and per example
    (B, 2) int32 the end of its last valid non-target key and of its last valid key (0: none)."""
    pos = torch.arange(1, key_valid.shape[1] + 1, device=key_valid.device)
    valid = key_valid.bool()
    ends = torch.stack([torch.where(valid & ~target.bool(), pos, 0).amax(1), torch.where(valid, pos, 0).amax(1)], 1)
    return valid.to(torch.int8).contiguous(), target.to(torch.int8).contiguous(), ends.to(torch.int32).contiguous()


def keep_bits_for(keep: torch.Tensor) -> torch.Tensor:
    """A (B, h, L, L) bool keep mask in the kernels' format: (B, h, L, row bytes) uint8."""
    from vltrain.model.packed_dropout import pack
    L = keep.shape[-1]
    return pack(torch.nn.functional.pad(keep, (0, _row_bytes(L) * 8 - L)))


def _row_bytes(L: int) -> int:
    """Bytes per row of keep bits (the kernels load single bytes: no alignment to keep)."""
    return (L + 7) // 8


def triton_attention(q, k, v, prepared, dropout_p: float, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, h, L, d) -> (B, h, L, d) by the rule of ``attention.py``. ``keep`` (B, h, L, L) bool
    replaces the dropout draw (tests give eager the same one, scaled by 1 / (1 - dropout_p))."""
    if not available():
        raise RuntimeError(MISSING_MESSAGE)
    if not runs_on(q.device.type):
        raise RuntimeError(CPU_MESSAGE)
    valid, target, ends = prepared
    B, h, L, _ = q.shape
    p = float(dropout_p)
    if keep is None and p > 0:
        from vltrain.model import packed_dropout
        rb = _row_bytes(L)
        bits = packed_dropout.keep_bits(B * h * L * rb * 8, p, q.device).view(B, h, L, rb)
        p = packed_dropout.drawn_p(p)          # the draw's own probability: its scale
    else:
        bits = keep_bits_for(keep) if keep is not None else None
    o, _ = short_attention(q, k, v, valid, target, ends, bits, p, block_for(L, q.dtype))
    return o.transpose(1, 2)
