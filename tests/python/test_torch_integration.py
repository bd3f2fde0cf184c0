"""memkernels.integrations.torch: every kernel as a torch.library custom op with a fake implementation,
traced by torch.compile(fullgraph=True) without graph breaks; float64 references; inference only."""
import os
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import memkernels as mk  # noqa: E402

mkt = pytest.importorskip("memkernels.integrations.torch", exc_type=ImportError)


def _ref_attention(q, k, v, causal, scale=None, left=-1, right=-1, softcap=None):
    """float64 attention for one sequence: q (sq, h, d), k/v (sk, hk, d) -> (sq, h, d)."""
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    sq, h, d = q.shape
    sk, hk = k.shape[:2]
    k = np.repeat(k, h // hk, axis=1)
    v = np.repeat(v, h // hk, axis=1)
    s = np.einsum("qhd,khd->hqk", q, k) * (scale or 1 / np.sqrt(d))
    if softcap:
        s = softcap * np.tanh(s / softcap)
    i = np.arange(sq)[:, None] + sk - sq
    j = np.arange(sk)[None, :]
    ok = np.ones((sq, sk), bool)
    if causal:
        ok &= j <= i
    if left >= 0:
        ok &= j >= i - left
    if right >= 0 and not causal:
        ok &= j <= i + right
    s = np.where(ok[None], s, -np.inf)
    m = s.max(-1, keepdims=True)
    p = np.where(ok[None], np.exp(s - np.where(np.isfinite(m), m, 0)), 0)
    den = p.sum(-1, keepdims=True)
    return np.einsum("hqk,khd->qhd", p / np.where(den > 0, den, 1), v)


def _close(got, want, tol=2e-5):
    got = got.detach().double().numpy()
    assert np.isfinite(got).all()
    err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-6)
    assert err < tol, f"relative error {err}"


@pytest.mark.parametrize("b,sq,sk,h,hk,d,causal,window,softcap", [
    (2, 9, 11, 4, 2, 16, True, None, None),
    (1, 17, 17, 3, 1, 24, False, (3, 5), 20.0),
    (3, 5, 33, 2, 2, 8, True, 7, None),
])
def test_flash_attention_op(b, sq, sk, h, hk, d, causal, window, softcap):
    g = torch.Generator().manual_seed(sq * 100 + sk)
    q, k, v = (torch.randn(b, s, n, d, generator=g) for s, n in ((sq, h), (sk, hk), (sk, hk)))
    out, lse = mkt.flash_attention(q, k, v, causal=causal, window=window, softcap=softcap, return_lse=True)
    assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == (b, h, sq) and lse.dtype == torch.float32
    left, right = (-1, -1) if window is None else ((window, window) if isinstance(window, int) else window)
    for i in range(b):
        _close(out[i], _ref_attention(q[i], k[i], v[i], causal, None, left, right, softcap))


def test_flash_attention_varlen_op():
    g = torch.Generator().manual_seed(1)
    lq, lk = [3, 1, 7], [5, 4, 7]
    q, k, v = torch.randn(sum(lq), 4, 16, generator=g), torch.randn(sum(lk), 2, 16, generator=g), \
        torch.randn(sum(lk), 2, 16, generator=g)
    cq = torch.tensor(np.cumsum([0] + lq), dtype=torch.int32)
    ck = torch.tensor(np.cumsum([0] + lk), dtype=torch.int32)
    out, lse = mkt.flash_attention_varlen(q, k, v, cq, ck, max_seqlen_q=max(lq), causal=True, return_lse=True)
    assert out.shape == q.shape and lse.shape == (4, sum(lq))
    for i in range(3):
        _close(out[cq[i]:cq[i + 1]], _ref_attention(q[cq[i]:cq[i + 1]], k[ck[i]:ck[i + 1]], v[ck[i]:ck[i + 1]], True))


def test_paged_attention_raw_op():
    g = torch.Generator().manual_seed(2)
    page, hk, h, d = 4, 2, 4, 16
    lens = [6, 9]
    k_pages, v_pages = torch.randn(8, page, hk, d, generator=g), torch.randn(8, page, hk, d, generator=g)
    pages = [[5, 1], [0, 7, 3]]
    indptr = torch.tensor([0, 2, 5], dtype=torch.int32)
    indices = torch.tensor(pages[0] + pages[1], dtype=torch.int32)
    last = torch.tensor([lens[0] - 4, lens[1] - 8], dtype=torch.int32)
    q = torch.randn(2, h, d, generator=g)  # decode: one query row per sequence
    out = mkt.paged_attention_raw(q, k_pages, v_pages, indptr, indices, last)
    assert out.shape == q.shape
    for b in range(2):
        kk = torch.cat([k_pages[p] for p in pages[b]])[:lens[b]]
        vv = torch.cat([v_pages[p] for p in pages[b]])[:lens[b]]
        _close(out[b:b + 1], _ref_attention(q[b:b + 1], kk, vv, True))


def _weights(seed=3, out_f=24, in_f=64):
    w = np.random.default_rng(seed).standard_normal((out_f, in_f)).astype(np.float32)
    return w, mk.quantize(w, "int4", group_size=32), mk.SparseMatrix.from_dense(mk.prune(w, 0.7))


@pytest.mark.parametrize("lead", [(5,), (2, 3), ()])
def test_qgemm_spmm_dequantize_ops(lead):
    w, qm, sp = _weights()
    x = torch.randn(*lead, 64, generator=torch.Generator().manual_seed(4))
    bias = torch.randn(24)
    wq = mk.dequantize(qm).astype(np.float64)
    y = mkt.qgemm(x, qm, bias)
    assert y.shape == lead + (24,) and y.dtype == torch.float32
    _close(y, x.double().numpy() @ wq.T + bias.double().numpy())
    d = mkt.dequantize(qm)
    assert d.shape == (24, 64) and d.dtype == torch.float32 and d.device.type == "cpu"
    _close(d, wq, 1e-7)
    assert mkt.dequantize(qm, torch.bfloat16).dtype == torch.bfloat16
    if len(lead) <= 1:  # spmm takes (tokens, in) or (in,)
        s = mkt.spmm(sp, x)
        assert s.shape == lead + (24,)
        _close(s, x.double().numpy() @ mk.prune(w, 0.7).astype(np.float64).T)


def test_ops_are_registered_with_valid_fake_impls():
    w, qm, sp = _weights()
    q, k = torch.randn(1, 5, 2, 8), torch.randn(1, 6, 1, 8)
    x = torch.randn(3, 64)
    cu = torch.tensor([0, 5], dtype=torch.int32)
    ops = torch.ops.memkernels
    cases = [
        (ops.flash_attention.default, (q, k, k, True, 0.0, -1, -1, 0.0)),
        (ops.flash_attention.default, (q, k, k, True, 0.0, -1, -1, 0.0, torch.tensor([4], dtype=torch.int32),
                                       torch.tensor([[False, True, True, False, True, True]]))),
        (ops.flash_attention_varlen.default, (q[0], k[0], k[0], cu, torch.tensor([0, 6], dtype=torch.int32), 5, True,
                                              0.0, -1, -1, 0.0, torch.tensor([5], dtype=torch.int32),
                                              torch.tensor([True, False, True, True, True, False]))),
        (ops.flash_attention_varlen.default, (q[0], k[0], k[0], cu, torch.tensor([0, 6], dtype=torch.int32), 5, True,
                                              0.0, 2, 0, 0.0)),
        (ops.qgemm.default, (x, mkt.QuantizedWeight(qm), None, False)),
        (ops.spmm.default, (mkt.SparseWeight(sp), x)),
        (ops.dequantize.default, (mkt.QuantizedWeight(qm), torch.float16, torch.device("cpu"))),
    ]
    for op, args in cases:
        result = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), (op, result)


def test_flash_attention_op_with_padding():
    """seqused_k and key_mask through the custom op, eager and compiled (fullgraph), against float64."""
    g = torch.Generator().manual_seed(11)
    b, sq, sk, h, hk, d = 3, 4, 10, 4, 2, 16
    q, k, v = (torch.randn(b, s, n, d, generator=g) for s, n in ((sq, h), (sk, hk), (sk, hk)))
    keep = torch.ones(b, sk, dtype=torch.bool)
    keep[0, :3] = False                       # left padding
    keep[1, 6:] = False                       # right padding
    used = torch.tensor([10, 6, 8], dtype=torch.int32)
    for name, t in (("k", k), ("v", v)):      # padding keys hold NaN: must never be read
        t[~keep] = float("nan")
        t[2, 8:] = float("nan")

    def fn(q, k, v, used, keep):
        return mkt.flash_attention(q, k, v, causal=True, seqused_k=used, key_mask=keep)

    with torch.no_grad():
        eager = fn(q, k, v, used, keep)
        torch._dynamo.reset()
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v, used, keep)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    for i in range(b):
        n = int(used[i])
        kk, vv, kp = k[i, :n].double().numpy(), v[i, :n].double().numpy(), keep[i, :n].numpy()
        kk[~kp] = 0  # the reference drops them by masking; zeros keep NaN out of its einsum
        vv[~kp] = 0
        want = _ref_attention_masked(q[i], kk, vv, kp)
        _close(eager[i], want)


def _ref_attention_masked(q, k, v, keep):
    """float64 causal attention (end-aligned) over the keys where keep is True."""
    q = np.asarray(q, np.float64)
    sq, h, d = q.shape
    sk, hk = k.shape[:2]
    k, v = np.repeat(k, h // hk, axis=1), np.repeat(v, h // hk, axis=1)
    s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(d)
    ok = (np.arange(sk)[None, :] <= np.arange(sq)[:, None] + sk - sq) & keep[None, :]
    s = np.where(ok[None], s, -np.inf)
    m = s.max(-1, keepdims=True)
    p = np.where(ok[None], np.exp(s - np.where(np.isfinite(m), m, 0)), 0)
    den = p.sum(-1, keepdims=True)
    return np.einsum("hqk,khd->qhd", p / np.where(den > 0, den, 1), v)


class _Tiny(torch.nn.Module):
    """Attention + quantized and sparse projections + a paged decode step, all through memkernels ops."""

    def __init__(self):
        super().__init__()
        _, qm, sp = _weights(5, out_f=32, in_f=64)
        self.q_proj = mkt.QuantizedLinear(qm, torch.randn(32))
        self.up = mkt.SparseLinear(sp)
        self.qm = mkt.QuantizedWeight(qm)

    def forward(self, x, k, v, k_pages, v_pages, indptr, indices, last):
        t = x.shape[0]
        q = self.q_proj(x).view(1, t, 4, 8)
        a = mkt.flash_attention(q, k, v, causal=True, window=3, softcap=30.0).reshape(t, 32)
        cu = torch.tensor([0, t], dtype=torch.int32)
        a2 = mkt.flash_attention_varlen(q[0], k[0], v[0], cu, torch.tensor([0, k.shape[1]], dtype=torch.int32),
                                        max_seqlen_q=t, causal=True).reshape(t, 32)
        pq = q[0, -1:].contiguous()
        p = mkt.paged_attention_raw(pq, k_pages, v_pages, indptr, indices, last).reshape(1, 32)
        h = torch.nn.functional.silu(a + a2 + p) @ mkt.dequantize(self.qm)[:, :32]
        return h + self.up(x).sum(-1, keepdim=True)


def _tiny_inputs():
    g = torch.Generator().manual_seed(6)
    return (torch.randn(7, 64, generator=g), torch.randn(1, 9, 2, 8, generator=g), torch.randn(1, 9, 2, 8, generator=g),
            torch.randn(4, 4, 2, 8, generator=g), torch.randn(4, 4, 2, 8, generator=g),
            torch.tensor([0, 3], dtype=torch.int32), torch.tensor([2, 0, 3], dtype=torch.int32),
            torch.tensor([1], dtype=torch.int32))


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    model, inputs = _Tiny(), _tiny_inputs()
    with torch.no_grad():
        want = model(*inputs)
        # fullgraph=True turns any graph break into an error.
        got = torch.compile(model, fullgraph=True, backend=backend)(*inputs)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # The graph holds our ops (not a fallback to Python).
    gm_ops = []

    def record(gm, example_inputs):
        gm_ops.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, fullgraph=True, backend=record)(*inputs)
    for name in ("flash_attention", "flash_attention_varlen", "paged_attention_raw", "qgemm", "spmm", "dequantize"):
        assert any(f"memkernels.{name}" in op for op in gm_ops), (name, gm_ops)


@pytest.mark.skipif(os.environ.get("MEMKERNELS_TEST_INDUCTOR") != "1",
                    reason="inductor compiles C++ (minutes on a loaded 2-core machine): set MEMKERNELS_TEST_INDUCTOR=1")
def test_torch_compile_inductor():
    torch._dynamo.reset()
    model, inputs = _Tiny(), _tiny_inputs()
    t = time.perf_counter()
    with torch.no_grad():
        want = model(*inputs)
        got = torch.compile(model, fullgraph=True, backend="inductor")(*inputs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    print(f"inductor compile + run: {time.perf_counter() - t:.1f} s")


def test_requires_grad_is_refused():
    _, qm, sp = _weights()
    q = torch.randn(1, 4, 2, 8, requires_grad=True)
    k = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="q requires grad.*inference-only"):
        mkt.flash_attention(q, k, k)
    with pytest.raises(ValueError, match="x requires grad"):
        mkt.qgemm(torch.randn(2, 64, requires_grad=True), qm)
    with pytest.raises(ValueError, match="bias requires grad"):
        mkt.qgemm(torch.randn(2, 64), qm, torch.randn(24, requires_grad=True))
    with pytest.raises(ValueError, match="x requires grad"):
        mkt.spmm(sp, torch.randn(2, 64, requires_grad=True))
    # Under no_grad (or inference_mode) the same tensors are fine.
    with torch.no_grad():
        assert mkt.flash_attention(q, k, k).shape == q.shape
    with torch.inference_mode():
        assert mkt.qgemm(torch.randn(2, 64), qm).shape == (2, 24)
    # Calling the op directly records no usable backward: backward raises instead of returning nothing.
    out, _ = torch.ops.memkernels.flash_attention(q, k, k, False, 0.0, -1, -1, 0.0)
    with pytest.raises(RuntimeError, match="inference-only"):
        out.sum().backward()


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(TypeError, match="QuantizedMatrix"):
        mkt.QuantizedWeight(np.ones((2, 2)))
    with pytest.raises(TypeError, match="SparseMatrix"):
        mkt.spmm(np.ones((2, 2)), torch.randn(2, 2))
    with pytest.raises(ValueError):  # kernel's own check (head_dim mismatch) comes through the op
        mkt.flash_attention(torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 16), torch.randn(1, 4, 2, 16))
