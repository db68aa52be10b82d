"""The ``triton`` attention backend's kernels against ``eager``, on CPU, in Triton's interpreter
(and the keep-bit kernel of ``model.hidden_dropout_masks=packed``).

    TRITON_INTERPRET=1 python -m tests.triton_attention_check

Triton reads TRITON_INTERPRET when it is imported, so this runs as its own process
(tests/test_attention_backends.py starts it). Every check raises on failure; the last line
says how many passed. fp32, so "equal" is 1e-5 as for the other backends.
"""
from __future__ import annotations

import os
import sys

import torch

from vltrain.model import attention as A


def block_edges():
    """Examples whose bounds fall on the 16-wide blocks' edges (L = 40: blocks at 0, 16, 32), so
    that a bound one position short or one block off leaves out keys a row sees: the last
    target row is the first of a block; a non-target key (after targets) is the first of a
    block; a block's first valid key is a target at its first position; a block with no valid
    key; the same at 32; and a bidirectional example."""
    B, L = 6, 40
    valid = torch.ones(B, L, dtype=torch.bool)
    target = torch.zeros(B, L, dtype=torch.bool)
    valid[0, 17:], target[0, 10:17] = False, True
    valid[1, 17:], target[1, 3:8] = False, True
    target[2, 16:] = True
    valid[3, 16:32], target[3, 32:] = False, True
    valid[4, 33:], target[4, 20:33] = False, True
    return A.AttentionStructure(valid, target)


def kernel_cases():
    """(structure, head dim, dropout p) over every mode and padding of the flex/varlen tests,
    the block edges above, a head dim that is not a power of two, and lengths across several
    blocks."""
    from tests.test_attention_backends import structures
    for i, st in enumerate([*structures(), block_edges()]):
        for d, p in ((16, 0.0), (24, 0.25)):
            yield f"structure {i}, head dim {d}, p {p}", st, d, p


def check_kernels_against_eager_with_the_same_keep_mask() -> int:
    from vltrain.model import triton_attention as T
    n = 0
    for block in (16, 32):
        T.BLOCK = block                       # L = 23: two blocks of 16, one of 32
        for name, st, d, p in kernel_cases():
            g = torch.Generator().manual_seed(n)
            B, L = st.key_valid.shape
            h = 3
            qkv = torch.randn(B, L, 3, h, d, generator=g).requires_grad_()
            q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))       # the block's strided views
            keep = torch.rand(B, h, L, L, generator=g) >= p if p else None
            out = T.triton_attention(q, k, v, T.prepare(st.key_valid, st.target), p, keep=keep)
            probs = torch.softmax(q @ k.transpose(-1, -2) * d ** -0.5 + st.additive_mask(torch.float32), -1)
            if p:
                probs = probs * keep / (1 - p)
            ref = probs @ v
            w = torch.randn(ref.shape, generator=g)
            (got_g,) = torch.autograd.grad((out * w).sum(), qkv)
            (ref_g,) = torch.autograd.grad((ref * w).sum(), qkv)
            err, gerr = float((out - ref).detach().abs().max()), float((got_g - ref_g).abs().max() / ref_g.abs().max())
            assert err < 1e-5 and gerr < 1e-5, f"block {block}, {name}: output {err:.2e}, grad {gerr:.2e}"
            n += 1
    T.BLOCK = 64
    return n


def check_model_against_eager() -> int:
    """The whole model (every mode, padding, VL-BERT's slots), forward and backward; the last
    block at selected rows; and the blocks compiled by torch.compile (the op inside the graph)."""
    from tests.test_attention_backends import MODES, assert_same, forward_backward, inputs_for, pair
    from tests.test_model import KINDS, random_inputs, test_selected_positions_equal_the_full_forward
    n = 0
    for mode in [*MODES, "targets_inside"]:
        ref, tri = pair("triton")
        x = inputs_for(ref.config, mode)
        m = "seq2seq" if mode == "targets_inside" else MODES[mode]
        assert_same(forward_backward(ref, x, m), forward_backward(tri, x, m))
        n += 1
    ref, tri = pair("triton", **KINDS["vlbert-slots"])
    x = random_inputs(ref.config, B=4)
    assert_same(forward_backward(ref, x, MODES["mixed"]), forward_backward(tri, x, MODES["mixed"]))
    n += 1
    for kind in ("vlp", "vlbert-slots"):
        test_selected_positions_equal_the_full_forward("triton", False, kind)
        n += 1

    from vltrain.model.compile import compile_blocks
    ref, tri = pair("triton")
    compile_blocks(tri)
    x = random_inputs(ref.config, B=4)
    assert_same(forward_backward(ref, x, MODES["mixed"]), forward_backward(tri, x, MODES["mixed"]))
    return n + 1


def check_dropout_in_training_only() -> int:
    """Training draws a keep mask (same seed, same result; another seed, another); eval none."""
    from tests.test_attention_backends import MODES, forward_backward, pair
    from tests.test_model import random_inputs
    ref, tri = pair("triton", attention_dropout=0.3)
    x = random_inputs(ref.config, B=4)
    tri.train()
    outs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        outs.append(forward_backward(tri, x, MODES["mixed"])[0])
    assert torch.equal(outs[0], outs[1]) and not torch.allclose(outs[0], outs[2])
    tri.eval()
    e, t = forward_backward(ref, x, MODES["mixed"], backward=False), forward_backward(tri, x, MODES["mixed"], False)
    assert (e[0] - t[0]).abs().max() < 1e-5 and not torch.allclose(outs[0], t[0])
    return 1


def check_the_backends_own_draw_keeps_1_minus_p(device: str = "cpu", dtype=torch.float32) -> int:
    """The draw itself (the other checks give the kernels their keep mask): with V = 1 each output
    is sum_k P_k keep_k / (1 - p), mean 1 at any p (keeping a share p instead gives p / (1 - p)).
    Over B x h x L = 768 rows of 48 keys its standard deviation is < 0.01. (Also run on a GPU by
    tests/test_attention_backends.py, in bf16.)"""
    from vltrain.model import triton_attention as T
    g = torch.Generator().manual_seed(0)
    B, h, L, d = 4, 4, 48, 16
    valid, target = torch.ones(B, L, dtype=torch.bool), torch.zeros(B, L, dtype=torch.bool)
    q, k = (0.1 * torch.randn(B, h, L, d, generator=g).to(device, dtype) for _ in range(2))
    for p in (0.1, 0.3):
        torch.manual_seed(1)
        out = T.triton_attention(q, k, torch.ones(B, h, L, d, device=device, dtype=dtype),
                                 T.prepare(valid.to(device), target.to(device)), p)
        assert abs(float(out.float().mean()) - 1.0) < 0.05, (p, float(out.float().mean()))
    return 1


def check_activation_checkpointing_redraws_the_same_keep_mask() -> int:
    """With model.activation_checkpointing the blocks' forward runs again in the backward and
    draws its keep mask again: torch's checkpoint restores the RNG state, so the gradients
    equal those of the run that kept its activations (same seed)."""
    from tests.test_attention_backends import MODES, forward_backward
    from tests.test_model import make_model, random_inputs
    plain = make_model("triton", attention_dropout=0.3).train()
    ckpt = make_model("triton", attention_dropout=0.3, activation_checkpointing=True).train()
    ckpt.load_state_dict(plain.state_dict())
    x = random_inputs(plain.config, B=4)
    torch.manual_seed(3)
    o0, g0 = forward_backward(plain, x, MODES["mixed"])
    torch.manual_seed(3)
    o1, g1 = forward_backward(ckpt, x, MODES["mixed"])
    assert torch.equal(o0, o1) and g0.keys() == g1.keys()
    assert all(torch.allclose(g0[n], g1[n], rtol=1e-6, atol=1e-7) for n in g0), \
        [n for n in g0 if not torch.allclose(g0[n], g1[n], rtol=1e-6, atol=1e-7)]
    return 1


def check_fully_masked_blocks_are_not_read(device: str = "cpu", dtype=torch.float32, block: int = 16) -> int:
    """The bounds skip, not just mask: a seq2seq example, prefix 0-31 and caption 32-47 in
    16-wide blocks. NaN keys/values in the caption reach no prefix row (forward, and the dQ
    pass: masked probabilities are 0, and 0 * NaN would be NaN had the blocks been read); NaN
    output gradients of the prefix rows reach no caption key (the dK/dV pass starts at the
    caption's block). ``block``-wide blocks, the prefix two of them, the caption one and a
    padding block after it (never read: NaN there too). (Also run on a GPU, in bf16 at 64.)"""
    from vltrain.model import triton_attention as T
    T.BLOCK, saved = block, T.BLOCK
    try:
        cap, L, h, d = 2 * block, 4 * block, 2, 16
        target = torch.zeros(1, L, dtype=torch.bool, device=device)
        target[0, cap:] = True
        valid = torch.ones(1, L, dtype=torch.bool, device=device)
        valid[0, 3 * block:] = False
        prepared = T.prepare(valid, target)
        g = torch.Generator().manual_seed(0)

        def rand(requires_grad=False):
            return torch.randn(1, h, L, d, generator=g).to(device, dtype).requires_grad_(requires_grad)
        q, k, v = rand(True), rand(), rand()
        k[:, :, cap:], v[:, :, cap:] = float("nan"), float("nan")
        out = T.triton_attention(q, k, v, prepared, 0.0)
        (dq,) = torch.autograd.grad(out, q, torch.ones_like(out))
        assert out[:, :, :cap].isfinite().all() and out[:, :, cap:3 * block].isnan().all()
        assert dq[:, :, :cap].isfinite().all()
        q, k, v = rand(True), rand(True), rand(True)
        k.data[:, :, 3 * block:], v.data[:, :, 3 * block:] = float("nan"), float("nan")
        out = T.triton_attention(q, k, v, prepared, 0.0)
        assert out.isfinite().all()                       # the padding block is never read as keys
        do = torch.randn(out.shape, generator=g).to(device, dtype)
        do[:, :, :cap] = float("nan")
        dk, dv = torch.autograd.grad(out, (k, v), do)
        assert dk[:, :, cap:3 * block].isfinite().all() and dv[:, :, cap:3 * block].isfinite().all()
        assert dv[:, :, :cap].isnan().all()
    finally:
        T.BLOCK = saved
    return 1


def check_packed_dropout_kernel() -> int:
    """``model.hidden_dropout_masks=packed``'s Triton kernel: byte j holds the keep bits of
    Philox counter j's four 32-bit outputs, low half then high half (bit 2k: output k's low 16
    bits, bit 2k + 1: its high 16), each kept where >= round(p * 65536); the seed is drawn from
    torch's generator; a partial last byte; every bit position keeps 1 - p."""
    import triton
    import triton.language as tl
    from vltrain.model import packed_dropout as P

    @triton.jit
    def philox_outputs(SEED, OUT, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        r0, r1, r2, r3 = tl.randint4x(tl.load(SEED), offs)
        m = offs < n
        tl.store(OUT + offs * 4, r0.to(tl.int64), mask=m)
        tl.store(OUT + offs * 4 + 1, r1.to(tl.int64), mask=m)
        tl.store(OUT + offs * 4 + 2, r2.to(tl.int64), mask=m)
        tl.store(OUT + offs * 4 + 3, r3.to(tl.int64), mask=m)

    n, p = 8 * 4000 + 5, 0.1
    torch.manual_seed(3)
    bits = P.keep_bits(n, p, torch.device("cpu"))
    torch.manual_seed(3)
    seed = torch.randint(0, 2 ** 62, (1,), dtype=torch.int64)
    nb = (n + 7) // 8
    raw = torch.empty(nb * 4, dtype=torch.int64)
    philox_outputs[(triton.cdiv(nb, 1024),)](seed, raw, nb, BLOCK=1024)
    halves = torch.stack([raw.view(nb, 4) & 0xFFFF, raw.view(nb, 4) >> 16], -1).view(nb, 8)
    expected = ((halves >= P.threshold(p)).long() << torch.arange(8)).sum(-1).to(torch.uint8)
    assert bits.shape == (nb,) and torch.equal(bits, expected)
    per_bit = P.unpack(bits, torch.empty(8 * nb)).view(nb, 8).mean(0)
    assert ((per_bit - (1 - P.threshold(p) / 65536)).abs() < 5 * (p * (1 - p) / nb) ** 0.5).all(), per_bit
    return 1


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("set TRITON_INTERPRET=1 (the kernels run in Triton's CPU interpreter)", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    n = check_kernels_against_eager_with_the_same_keep_mask()
    n += check_model_against_eager()
    n += check_dropout_in_training_only()
    n += check_the_backends_own_draw_keeps_1_minus_p()
    n += check_activation_checkpointing_redraws_the_same_keep_mask()
    n += check_fully_masked_blocks_are_not_read()
    n += check_packed_dropout_kernel()
    print(f"triton attention: all {n} checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
