"""Streaming real models under a DRAM budget (issue 17): tiny random-init transformers checkpoints
built offline, converted to a streaming weight store, run through load_model(dram_budget_bytes=...).

Checks: sparsity 0 equals the dense forward (1e-5 relative to the logit scale) for float and GGUF-style
quantized FFNs; the budget is never exceeded and a budget below the resident part is refused with
the numbers; sparsity skips reads (fewer bytes than whole-layer reads) and agrees with dense on most
tokens; predictor/threshold tensors round trip through the store and corrupt ones raise
CorruptDataError; the CLI's --dram-budget --sparsity --json reports the `stream` object.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import memkernels as mk
from memkernels.models import stream as st
from memkernels.weight_store import CorruptDataError
from conftest import flip_byte

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

BASE = dict(hidden_size=64, num_hidden_layers=2, vocab_size=128, intermediate_size=160, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)
BUDGET = 4 << 20


def build(tmp_path, name="llama", **overrides):
    cfg = transformers.LlamaConfig(**dict(BASE, **overrides))
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.15)
    d = str(tmp_path / name)
    model.save_pretrained(d)
    return d


def ids(n=20, seed=1):
    return np.random.default_rng(seed).integers(0, BASE["vocab_size"], n).tolist()


def rel(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.mark.parametrize("tied", [False, True])
def test_sparsity_zero_equals_dense(tmp_path, tied):
    d = build(tmp_path, tie_word_embeddings=tied)
    dense = mk.load_model(d)
    sm = mk.load_model(d, dram_budget_bytes=BUDGET, stream_dir=tmp_path / "s")
    assert isinstance(sm, st.StreamingModel) and sm.meta["ffn_dtype"] == "float32"
    t = ids()
    want = dense.logits(t)
    got = sm.logits(t)
    assert np.isfinite(got).all()
    assert rel(got, want) < 1e-5
    g_dense = dense.generate(t, max_new_tokens=8, stop_at_eos=False)
    assert sm.generate(t, max_new_tokens=8, stop_at_eos=False) == g_dense
    s = sm.stream_stats()
    assert s["decode_tokens"] == 7 and s["neurons_kept_fraction"] == 1.0
    assert s["peak_resident_bytes"] <= BUDGET
    # the store is cached: a second load does not convert again
    mtime = os.stat(st.store_path_for(d, tmp_path / "s")).st_mtime_ns
    mk.load_model(d, dram_budget_bytes=BUDGET, stream_dir=tmp_path / "s")
    assert os.stat(st.store_path_for(d, tmp_path / "s")).st_mtime_ns == mtime


def convert_quantized_dense(tmp_path, fmt, name, **build_kw):
    """A tiny model quantized to int4 in memory (exact activations: the streamed FFN runs float ones)
    and a store of `fmt` converted from those quantized weights (the loader the conversion uses is
    patched to return them)."""
    d = build(tmp_path, **build_kw)
    dense = mk.load_model(d, quantize="int4", exact=True)
    store = str(tmp_path / name)
    orig = st._load_dense
    st._load_dense = lambda path: (json.load(open(os.path.join(path, "config.json"))), dense)
    try:
        st.convert_for_streaming(d, store, ffn_format=fmt)
    finally:
        st._load_dense = orig
    return dense, store


@pytest.mark.parametrize("fmt,tol", [("int8", 2e-2), ("int4", 0.25), ("int4_int8", 0.25), ("down_int8", 2e-2),
                                     ("down_int7", 3e-2)])
def test_quantized_ffn_per_neuron_and_close_to_dense(tmp_path, fmt, tol):
    """A quantized checkpoint (quantize at load stands in for GGUF) streams int8 neurons; sparsity 0
    stays within the int8 re-quantization error of the dense quantized model."""
    dense, store = convert_quantized_dense(tmp_path, fmt, "q.mkws")
    sm = st.StreamingModel(store, BUDGET)
    assert sm.meta["ffn_dtype"] == fmt
    t = ids()
    assert rel(sm.logits(t), dense.logits(t)) < tol
    if fmt in ("int4", "int4_int8"):
        # the streamed FFN is exactly the FFN of the round-tripped weights (float64 reference)
        from memkernels.quant import dequantize
        from memkernels.models.llama import activation
        h = np.random.default_rng(2).standard_normal((5, 64)).astype(np.float32)
        for L in range(2):
            p = f"model.layers.{L}."
            w = {k: dequantize(dense.weights[p + f"mlp.{k}_proj.weight"]).astype(np.float64)
                 for k in ("gate", "up", "down")}
            up = st.unpack_int4(st.pack_int4(w["up"]), 64).astype(np.float64)
            if fmt == "int4":
                down = st.unpack_int4(st.pack_int4(w["down"].T), 64).astype(np.float64).T
            else:
                q, sc = st._int8_rows(w["down"].T.astype(np.float32))
                down = (q.astype(np.float64) * sc.astype(np.float64)[:, None]).T
            want = (activation(np, h @ w["gate"].T, "silu") * (h @ up.T)) @ down.T
            for rows in (5, 12):  # the decode kernel (<= 8 tokens) and the prefill path
                hh = np.concatenate([h] * 3)[:rows]
                wnt = (activation(np, hh @ w["gate"].T, "silu") * (hh @ up.T)) @ down.T
                assert rel(sm._mlp(hh, L, p), wnt) < 1e-4
    # every cache slot is one FFN bundle: the embedding rows are cut into bundle-sized pieces
    layers = sm.store.layers()
    assert len({L["bundle_bytes"] for L in layers}) == 1
    assert sm.store.stats()["slot_bytes"] == layers[0]["bundle_bytes"]


def test_budget_never_exceeded_and_too_small_refused(tmp_path):
    d = build(tmp_path, intermediate_size=512)
    sdir = tmp_path / "s"
    mk.load_model(d, dram_budget_bytes=BUDGET, stream_dir=sdir)  # converts
    probe = st.StreamingModel(st.store_path_for(d, sdir), BUDGET)
    resident = probe.resident_bytes
    ffn = probe.whole_layer_bytes_per_token
    # a budget that holds the resident part and a quarter of the FFN plus the store's staging
    staging = probe.store.stats()["staging_bytes"]
    budget = resident + staging + ffn // 4
    sm = mk.load_model(d, dram_budget_bytes=budget, stream_dir=sdir)
    sm.generate(ids(), max_new_tokens=12, stop_at_eos=False)
    s = sm.stream_stats()
    assert 0 < s["peak_resident_bytes"] <= budget
    assert s["bytes_read_per_token"] > 0
    with pytest.raises(ValueError, match=f"{resident} resident bytes|resident"):
        mk.load_model(d, dram_budget_bytes=resident, stream_dir=sdir)


@pytest.mark.parametrize("predictor", ["threshold", "lowrank"])
def test_sparsity_reads_fewer_bytes_and_mostly_agrees(tmp_path, predictor):
    d = build(tmp_path, intermediate_size=512)
    sdir = tmp_path / "s"
    dense = mk.load_model(d)
    t = ids(24, seed=3)
    kw = dict(dram_budget_bytes=BUDGET, stream_dir=sdir)
    whole = mk.load_model(d, whole_layer_reads=True, **kw)
    whole.generate(t, max_new_tokens=10, stop_at_eos=False)
    w = whole.stream_stats()
    assert w["bytes_read_per_token"] >= w["whole_layer_bytes_per_token"]
    sm = mk.load_model(d, sparsity=0.5, predictor=predictor, **kw)
    sm.generate(t, max_new_tokens=10, stop_at_eos=False)
    s = sm.stream_stats()
    assert 0.2 < s["neurons_kept_fraction"] < 0.9
    assert s["bytes_read_per_token"] < 0.8 * w["bytes_read_per_token"]
    # teacher-forced top-1 agreement with the dense model
    a = sm.logits(t).argmax(-1)
    b = dense.logits(t).argmax(-1)
    assert (a == b).mean() >= 0.6


def test_threshold_sparsity_matches_calibration(tmp_path):
    """On the calibration text itself, the threshold predictor keeps about 1 - S of the neurons."""
    d = build(tmp_path, intermediate_size=512)
    sdir = tmp_path / "s"
    for s in (0.25, 0.5, 0.7):
        sm = mk.load_model(d, dram_budget_bytes=BUDGET, stream_dir=sdir, sparsity=s)
        sm.logits(st.calibration_ids(sm, None, 256))
        kept = sm.stream_stats()["neurons_kept_fraction"]
        assert abs(kept - (1 - s)) < 0.1, (s, kept)


def test_predictors_round_trip_and_corruption(tmp_path):
    d = build(tmp_path)
    store = str(tmp_path / "m.mkws")
    st.convert_for_streaming(d, store, rank=8)
    sm = st.StreamingModel(store, BUDGET, sparsity=0.5, predictor="lowrank")
    # what the store returns is what the fit computed
    raw, dense = st._load_dense(d)
    H = np.random.default_rng(0).standard_normal((300, 64)).astype(np.float32)
    G = H @ np.asarray(dense.weights["model.layers.0.mlp.gate_proj.weight"]).T
    thr, A, B, lr = st.fit_predictors(H, G, "silu", 8)
    assert A.shape == (64, 8) and B.shape == (8, 160)
    assert (np.diff(thr) >= 0).all() and (np.diff(lr) >= 0).all()
    # a rank-8 fit of an exactly linear map through random inputs explains much of it
    pred = (H @ A) @ B
    assert np.linalg.norm(pred - G) < 0.9 * np.linalg.norm(G)
    with mk.WeightStore.open(store, BUDGET) as ws:
        a0 = ws.get("stream/lowrank/0/A")
    np.testing.assert_array_equal(sm._lowrank[0][0], a0)
    # flip one byte inside the first predictor tensor: the checksum catches it
    with mk.WeightStore.open(store, BUDGET) as ws:
        info = next(t for t in ws.tensors() if t["name"] == "stream/lowrank/0/A")
    bad = str(tmp_path / "bad.mkws")
    data = bytearray(open(store, "rb").read())
    data[info["offset"] + 5] ^= 0x40
    open(bad, "wb").write(bytes(data))
    with pytest.raises(CorruptDataError):
        st.StreamingModel(bad, BUDGET, sparsity=0.5, predictor="lowrank")
    # a predictor of the wrong shape (a store written by something else) is refused by name
    tensors = {"stream/meta": np.frombuffer(json.dumps(sm.meta).encode(), np.uint8)}
    with mk.WeightStore.open(store, BUDGET) as ws:
        for t in ws.tensors():
            if t["name"] != "stream/meta":
                tensors[t["name"]] = ws.get(t["name"])
        layers = {L["layer"]: ws.get_rows(L["layer"], np.arange(L["neurons"])) for L in ws.layers()}
    tensors["stream/lowrank/1/B"] = tensors["stream/lowrank/1/B"][:, :-1].copy()
    ffn = {L: {"up": np.ascontiguousarray(r[:, 0]), "down": np.ascontiguousarray(r[:, 1].T)} for L, r in layers.items()}
    wrong = str(tmp_path / "wrong.mkws")
    mk.write_weight_store(wrong, tensors, ffn)
    with pytest.raises(CorruptDataError, match="lowrank/1/B"):
        st.StreamingModel(wrong, BUDGET, sparsity=0.5, predictor="lowrank")


def test_bad_arguments(tmp_path):
    d = build(tmp_path)
    with pytest.raises(ValueError, match="sparsity"):
        mk.load_model(d, dram_budget_bytes=BUDGET, sparsity=1.5, stream_dir=tmp_path)
    with pytest.raises(ValueError, match="predictor"):
        mk.load_model(d, dram_budget_bytes=BUDGET, predictor="oracle", stream_dir=tmp_path)
    with pytest.raises(ValueError, match="dram_budget_bytes"):
        mk.load_model(d, dram_budget_bytes=-5, stream_dir=tmp_path)


def test_cli_generate_stream_json(tmp_path):
    d = build(tmp_path)
    r = subprocess.run([sys.executable, "-m", "memkernels", "generate", "--model", d, "--tokens", "3,4,5,6",
                        "--max-new-tokens", "5", "--dram-budget", str(BUDGET), "--sparsity", "0.4", "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    s = out["stream"]
    for k in ("bytes_read_per_token", "whole_layer_bytes_per_token", "hit_rate", "peak_resident_bytes"):
        assert k in s
    assert s["peak_resident_bytes"] <= BUDGET and len(out["tokens"]) == 5


# ---- issue 17 round 2: 4-bit bundles, frequency order, pinned hot neurons, per-layer sparsity ----

def _int4_reference(b, d):
    """float64 decode of pack_int4's bytes, written from the layout (not through unpack_int4)."""
    b = np.asarray(b, np.uint8)
    dp = -(-d // 32) * 32
    ng = dp // 32
    out = np.zeros((b.shape[0], dp))
    for r in range(b.shape[0]):
        codes = b[r, :dp // 2].astype(np.int64)
        q = np.empty(dp, np.int64)
        q[0::2], q[1::2] = codes & 15, codes >> 4
        sc = b[r, dp // 2:dp // 2 + 2 * ng].copy().view("<f2").astype(np.float64)
        mn = b[r, dp // 2 + 2 * ng:dp // 2 + 4 * ng].copy().view("<f2").astype(np.float64)
        out[r] = q * np.repeat(sc, 32) + np.repeat(mn, 32)
    return out[:, :d]


@pytest.mark.parametrize("n,d", [(1, 32), (7, 50), (13, 64), (5, 576), (3, 97)])
def test_int4_bundles_against_float64(n, d):
    rng = np.random.default_rng(n * 1000 + d)
    w = (rng.standard_normal((n, d)) * rng.uniform(0.01, 3, (n, 1))).astype(np.float32)
    b = st.pack_int4(w)
    assert b.dtype == np.uint8 and b.shape == (n, st.int4_part_bytes(d))
    ref = _int4_reference(b, d)
    got = np.full((n, d), np.nan, np.float32)
    got[...] = st.unpack_int4(b, d)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())
    # round to nearest within each group of 32: error <= half a step (+ float16 rounding of scale/min)
    dp = -(-d // 32) * 32
    wp = np.concatenate([w, np.zeros((n, dp - d), np.float32)], 1).reshape(n, -1, 32)
    step = (wp.max(-1) - wp.min(-1)) / 15
    bound = np.repeat(0.5 * step + 2e-3 * np.abs(wp).max(-1), 32, axis=1)[:, :d]
    assert (np.abs(ref - w) <= bound).all()
    # leading dims are kept: (k, parts, bytes) -> (k, parts, d)
    assert st.unpack_int4(np.stack([b, b], 1), d).shape == (n, 2, d)


def test_int4_keeps_gguf_q4_1_rows_exactly():
    """A row made of Q4_1 blocks (float16 scale d and min m, codes 0..15 with 0 and 15 present, as
    Q4_1 quantizes) comes back bit for bit: the up rows of a Q4_1 GGUF lose nothing."""
    rng = np.random.default_rng(5)
    n, d = 6, 128
    q = rng.integers(0, 16, (n, d // 32, 32))
    q[..., 0], q[..., 1] = 0, 15
    sc = rng.uniform(0.001, 0.05, (n, d // 32)).astype(np.float16).astype(np.float32)
    mn = (-7.5 * sc * rng.uniform(0.8, 1.2, sc.shape)).astype(np.float16).astype(np.float32)
    w = (q * sc[..., None] + mn[..., None]).astype(np.float32).reshape(n, d)
    np.testing.assert_array_equal(st.unpack_int4(st.pack_int4(w), d), w)


def test_allocate_sparsity_greedy():
    rng = np.random.default_rng(0)
    nl, ns = 5, 20
    err = np.cumsum(rng.uniform(0, 1, (nl, ns)) * rng.uniform(0.1, 10, (nl, 1)), 1)
    err[:, 0] = 0
    alloc = st.allocate_sparsity(err)
    assert alloc.shape == (nl * (ns - 1) + 1, nl)
    steps = np.round(alloc / st.S_STEP).astype(int)
    assert (steps.sum(1) == np.arange(alloc.shape[0])).all()  # one step per row
    assert (np.diff(steps, axis=0) >= 0).all() and (alloc[0] == 0).all() and np.allclose(alloc[-1], (ns - 1) * st.S_STEP)
    # the cheapest layer goes first
    inc = err[:, 1] - err[:, 0]
    assert steps[1, np.argmin(inc)] == 1


def _ffn_store(path, layers=3, neurons=64, d=40, seed=0):
    rng = np.random.default_rng(seed)
    ffn = {L: {"up": rng.standard_normal((neurons, d)).astype(np.float32),
               "down": rng.standard_normal((d, neurons)).astype(np.float32)} for L in range(layers)}
    mk.write_weight_store(path, {}, ffn)
    return ffn


def test_store_pin_keeps_hot_neurons_when_layers_cycle(tmp_path):
    """LRU's worst case: layers visited in a cycle, each token needing more than the cache. Without
    pinning the hit rate is 0; with the hot half of each layer pinned, those are all hits, never read
    again, and the budget holds."""
    path = str(tmp_path / "w.mkws")
    nl, n, d = 3, 64, 40
    ffn = _ffn_store(path, nl, n, d)
    bundle = 2 * d * 4
    with mk.WeightStore.open(path, 1 << 20) as probe:
        staging_probe = probe.stats()
    # budget: staging + slots for 60 % of all neurons
    for pinned in (False, True):
        budget = 2 * (4096 * 2) + int(0.6 * nl * n) * bundle + 8 * 4096
        with mk.WeightStore.open(path, budget, io_threads=1, window_tokens=0, merge_gap_bytes=0) as ws:
            st0 = ws.stats()
            slots = st0["cache_slots"]
            assert slots * st0["slot_bytes"] + st0["staging_bytes"] <= budget
            hot = np.arange(n // 2)
            if pinned:
                for L in range(nl):
                    ws.pin(L, hot)
                assert ws.stats()["pinned_neurons"] == nl * n // 2
            ws.reset_stats()
            rng = np.random.default_rng(1)
            for tok in range(6):
                for L in range(nl):
                    ids = np.concatenate([hot, n // 2 + rng.choice(n // 2, n // 4, replace=False)])
                    rows = ws.get_rows(L, ids)
                    np.testing.assert_array_equal(rows[:, 0], ffn[L]["up"][ids])
                    np.testing.assert_array_equal(rows[:, 1], ffn[L]["down"].T[ids])
                ws.next_token()
            s = ws.stats()
            assert s["peak_resident_bytes"] + s["staging_bytes"] <= budget
            if pinned:
                # every hot request is a hit; cold ones may hit too
                assert s["neuron_hits"] >= 6 * nl * (n // 2)
                assert s["hit_rate"] >= 0.66
                ws.clear_cache()  # pinned neurons survive clear_cache
                before = ws.stats()["bytes_read"]
                ws.get_rows(0, hot)
                assert ws.stats()["bytes_read"] == before
            else:
                assert s["hit_rate"] < 0.2
    assert staging_probe["cache_slots"] >= nl * n


def test_store_pin_limits_and_unpin(tmp_path):
    path = str(tmp_path / "w.mkws")
    _ffn_store(path, 2, 64, 40)
    budget = 30000  # 16 KiB of staging, ~40 slots of 320 B
    with mk.WeightStore.open(path, budget, io_threads=1) as ws:
        slots = ws.stats()["cache_slots"]
        assert 1 < slots < 64
        with pytest.raises(ValueError, match="pin.*do not fit"):
            ws.pin(0, np.arange(min(slots, 64)))
        assert ws.stats()["pinned_neurons"] == 0  # all or nothing
        with pytest.raises(ValueError, match="out of range"):
            ws.pin(0, [64])
        ws.pin(0, np.arange(slots - 1))
        ws.pin(0, np.arange(slots - 1))  # pinning again adds nothing
        assert ws.stats()["pinned_neurons"] == slots - 1
        # get_rows still works (one slot left: batches of one), and fetches the whole other layer
        rows = ws.get_rows(1, np.arange(64))
        assert rows.shape == (64, 2, 40)
        ws.unpin_all()
        assert ws.stats()["pinned_neurons"] == 0
        ws.clear_cache()
        assert ws.stats()["resident_bytes"] == 0


def test_neurons_stored_hottest_first_and_gate_order_matches(tmp_path):
    """The store keeps neurons in calibrated firing-frequency order; a float checkpoint's stored
    neuron i is the original neuron perm[i] bit for bit, and sparsity 0 still equals dense."""
    d = build(tmp_path, intermediate_size=256)
    store = str(tmp_path / "o.mkws")
    st.convert_for_streaming(d, store)
    raw, dense = st._load_dense(d)
    with mk.WeightStore.open(store, 64 << 20) as ws:
        for L in range(2):
            perm = ws.get(f"stream/perm/{L}")
            assert sorted(perm.tolist()) == list(range(256)) and (perm != np.arange(256)).any()
            freq = ws.get(f"stream/freq/{L}")
            f50 = freq[int(round(0.5 / st.S_STEP))]
            assert (np.diff(f50) <= 1e-6).all()  # hottest first
            assert np.allclose(freq[0], 1.0) and (np.diff(freq, axis=0) <= 1e-6).all()
            rows = ws.get_rows(L, np.arange(256))
            up = np.asarray(dense.weights[f"model.layers.{L}.mlp.up_proj.weight"], np.float32)
            down = np.asarray(dense.weights[f"model.layers.{L}.mlp.down_proj.weight"], np.float32)
            np.testing.assert_array_equal(rows[:, 0], up[perm])
            np.testing.assert_array_equal(rows[:, 1], down.T[perm])
    sm = st.StreamingModel(store, BUDGET)
    t = ids()
    assert rel(sm.logits(t), dense.logits(t)) < 1e-5


def test_budget_with_half_the_ffn_pins_hot_neurons_and_hits(tmp_path):
    """Budget = resident + staging + half the streamed FFN: the hot neurons are pinned, the hit rate
    is high, fewer bytes are read than whole layers, and the weights held never exceed the budget."""
    d = build(tmp_path, intermediate_size=512)
    sdir = tmp_path / "s"
    mk.load_model(d, dram_budget_bytes=BUDGET, stream_dir=sdir)
    store = st.store_path_for(d, sdir)
    probe = st.StreamingModel(store, BUDGET, pin_hot=False)
    resident, ffn = probe.resident_bytes, probe.whole_layer_bytes_per_token
    staging = probe.store.stats()["staging_bytes"]
    budget = resident + staging + ffn // 2
    t = ids(16, seed=4)
    for s in (0.0, 0.5):
        sm = st.StreamingModel(store, budget, sparsity=s)
        assert sm.pinned_neurons > 0
        sm.generate(t, max_new_tokens=10, stop_at_eos=False)
        r = sm.stream_stats()
        assert r["peak_resident_bytes"] <= budget
        assert r["hit_rate"] >= (0.4 if s == 0 else 0.5), r
        assert r["bytes_read_per_token"] < (0.75 if s == 0 else 0.5) * r["whole_layer_bytes_per_token"], r
    whole = st.StreamingModel(store, budget, whole_layer_reads=True)
    assert whole.pinned_neurons == 0
    whole.generate(t, max_new_tokens=4, stop_at_eos=False)
    assert whole.stream_stats()["hit_rate"] == 0.0


def test_calibrated_allocation_keeps_mean_sparsity(tmp_path):
    d = build(tmp_path, intermediate_size=256, num_hidden_layers=4)
    store = str(tmp_path / "a.mkws")
    st.convert_for_streaming(d, store)
    for s in (0.25, 0.5):
        sm = st.StreamingModel(store, BUDGET, sparsity=s, allocation="calibrated")
        assert abs(sm.layer_sparsity.mean() - s) <= st.S_STEP / 4 + 1e-9
        assert (sm.layer_sparsity >= 0).all() and (sm.layer_sparsity <= st.S_MAX + 1e-6).all()
        u = st.StreamingModel(store, BUDGET, sparsity=s)  # the default
        assert u.allocation == "uniform" and np.allclose(u.layer_sparsity, s)
    with pytest.raises(ValueError, match="allocation"):
        st.StreamingModel(store, BUDGET, allocation="best")


@pytest.mark.parametrize("fmt", ["int4", "int4_int8"])
@pytest.mark.parametrize("T,k,d", [(1, 1, 32), (1, 37, 50), (3, 64, 96), (8, 200, 576), (2, 0, 64), (1, 9, 33)])
def test_stream_ffn_int4_kernel_against_float64(T, k, d, fmt, isa):
    """The C++ decode FFN on gathered 4-bit bundles against a float64 product of the decoded weights."""
    from memkernels import _memkernels as _C
    rng = np.random.default_rng(T * 7 + k + d)
    up, down = rng.standard_normal((k, d)), rng.standard_normal((k, d))
    B = st.bundle_bytes(fmt, d)
    bundles = st.pack_bundles(fmt, up, down).reshape(k, 2, B // 2)
    h = rng.standard_normal((T, d)).astype(np.float32)
    a = rng.standard_normal((T, k)).astype(np.float32)
    if k:
        a[:, rng.random(k) < 0.3] = 0  # masked-off neurons
    flat = bundles.reshape(k, B)
    p4 = st.int4_part_bytes(d)
    U = _int4_reference(flat[:, :p4], d) if k else np.zeros((0, d))
    if fmt == "int4":
        D = _int4_reference(flat[:, p4:], d) if k else np.zeros((0, d))
    else:  # int8 codes and a float32 scale, decoded here from the bytes
        D = flat[:, p4:p4 + d].view(np.int8).astype(np.float64) * \
            flat[:, p4 + d:p4 + d + 4].copy().view("<f4").astype(np.float64)
    want = (a.astype(np.float64) * (h.astype(np.float64) @ U.T)) @ D
    got_u, got_d = st.unpack_bundles(fmt, bundles, d)
    np.testing.assert_allclose(got_u, U, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got_d, D, rtol=1e-6, atol=1e-6)
    out = np.full((T, d), np.nan, np.float32)
    _C.stream_ffn_int4(h, a, bundles, out, fmt == "int4_int8")
    assert np.isfinite(out).all()
    scale = max(np.abs(want).max(), 1e-30) if k else 1.0
    assert np.abs(out - want).max() <= 1e-4 * scale * max(1, np.sqrt(k * d) / 8)
    # bad shapes and dtypes are refused by name
    with pytest.raises(ValueError, match="bundles"):
        _C.stream_ffn_int4(h, a, np.zeros((k, 2, 3), np.uint8), out, fmt == "int4_int8")
    with pytest.raises(ValueError, match="bundles"):  # one byte off
        _C.stream_ffn_int4(h, a, np.zeros((k, 2, st.bundle_bytes(fmt, d) // 2 + 1), np.uint8), out,
                           fmt == "int4_int8")
    with pytest.raises(ValueError, match="out"):
        _C.stream_ffn_int4(h, a, bundles, np.zeros((T, d + 1), np.float32), fmt == "int4_int8")
    with pytest.raises((TypeError, ValueError), match="a"):
        _C.stream_ffn_int4(h, a.astype(np.float64), bundles, out, fmt == "int4_int8")


# ---- the streamed FFN layer in one C++ call (stream_ffn_layer: order, threshold, cache, reads, FFN) ----

def _bundle_store(path, fmt, layers, n, d, seed):
    """A store of `layers` bundle layers as convert_for_streaming writes them; returns the float64
    decoded (up, down) of each layer, from the bytes (up None for down_int8: no up part)."""
    rng = np.random.default_rng(seed)
    ffn, ref = {}, {}
    p4 = st.int4_part_bytes(d)
    for L in range(layers):
        up = rng.standard_normal((n, d)) * rng.uniform(0.2, 2, (n, 1))
        down = rng.standard_normal((n, d))
        if fmt == "down_int8":
            q, sc = st._int8_rows(down.astype(np.float32))
            b = np.zeros((n, st.int8_down_part_bytes(d)), np.uint8)
            b[:, :d] = q.view(np.uint8)
            b[:, d:d + 4] = sc.astype("<f4").view(np.uint8).reshape(n, 4)
            p4 = 0
        elif fmt == "down_int7":
            q, sc = st._int7_rows(down.astype(np.float32))
            b = st.pack_down_columns(fmt, q, sc)
        else:
            b = st.pack_bundles(fmt, up, down)
        half = b.shape[1] // 2
        ffn[L] = {"up": np.ascontiguousarray(b[:, :half]), "down": np.ascontiguousarray(b[:, half:].T)}
        U = None if fmt in st.DOWN_FORMATS else _int4_reference(b[:, :p4], d)
        if fmt == "down_int7":
            D = _int7_reference(b, d)
        elif fmt == "int4":
            D = _int4_reference(b[:, p4:], d)
        else:
            D = b[:, p4:p4 + d].view(np.int8).astype(np.float64) * b[:, p4 + d:p4 + d + 4].copy().view("<f4").astype(np.float64)
        ref[L] = (U, D)
    mk.write_weight_store(path, {}, ffn)
    return ref


def _int7_reference(b, d):
    """float64 decode of 7-bit down columns, bit by bit from the documented layout."""
    b = np.asarray(b, np.uint8)
    g = -(-d // 8)
    out = np.zeros((b.shape[0], d))
    for r in range(b.shape[0]):
        bits = np.unpackbits(b[r, :7 * g], bitorder="little")
        codes = (bits.reshape(8 * g, 7) * (1 << np.arange(7))).sum(1)[:d]
        out[r] = (codes - 64) * float(b[r, 7 * g:7 * g + 4].copy().view("<f4")[0])
    return out


@pytest.mark.parametrize("n,d", [(3, 576), (5, 33), (2, 8), (4, 1), (3, 100)])
def test_int7_down_columns_against_float64(n, d):
    rng = np.random.default_rng(n + d)
    w = (rng.standard_normal((n, d)) * rng.uniform(0.01, 5, (n, 1))).astype(np.float32)
    q, sc = st._int7_rows(w)
    assert q.min() >= -63 and q.max() <= 63
    b = st.pack_down_columns("down_int7", q, sc)
    assert b.shape == (n, st.int7_down_part_bytes(d)) and b.shape[1] % 2 == 0
    ref = _int7_reference(b, d)
    got = np.full((n, d), np.nan, np.float32)
    got[...] = st.unpack_down_columns("down_int7", b, d)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())
    assert (np.abs(ref - w) <= 0.5 * np.abs(w).max(1, keepdims=True) / 63 * (1 + 1e-5)).all()  # half a step
    if d == 576:
        assert b.shape[1] == 512  # one O_DIRECT block per column


def _layer_reference(U, D, h, act, perm, score, col_scale, sparse, thr):
    a_s = act.astype(np.float64)[:, perm]
    # the decision is float32 arithmetic (|s| * scale > threshold, all float32), as documented
    s = np.abs(act[:, perm] if score is None else score)
    if col_scale is not None:
        s = s * col_scale
    keep = np.ones_like(a_s, bool) if not sparse else s > np.float32(thr)
    coef = a_s * keep
    if U is None:  # down_int8: act is the whole coefficient
        return coef @ D, keep
    return (coef * (h.astype(np.float64) @ U.T)) @ D, keep


@pytest.mark.parametrize("fmt", ["int4", "int4_int8", "down_int8", "down_int7"])
@pytest.mark.parametrize("T,n,d", [(1, 64, 40), (3, 97, 33), (8, 150, 96), (2, 50, 576), (1, 1, 32)])
@pytest.mark.parametrize("slots", ["all", "tight", "pinned"])
def test_stream_ffn_layer_against_float64(tmp_path, fmt, T, n, d, slots, isa):
    """One call per layer: the neurons kept (threshold on the coefficient, on a separate score, or
    on either times a per-neuron scale, in the store's order through perm) are read or found in the
    cache and the FFN computed on the cached bundles, against a float64 product of the decoded
    weights; poisoned outputs; the cache's stats count every requested neuron once; the budget holds
    with the cache smaller than a layer (batches) and with pinned neurons (hits visited first, then
    the misses)."""
    from memkernels import _memkernels as _C
    path = str(tmp_path / "b.mkws")
    nl = 2
    ref = _bundle_store(path, fmt, nl, n, d, seed=T * 100 + n + d)
    with mk.WeightStore.open(path, 1 << 22) as probe:
        staging, slot = probe.stats()["staging_bytes"], probe.stats()["slot_bytes"]
    budget = {"all": 1 << 22, "tight": staging + slot * max(2, n // 3), "pinned": staging + slot * (n + 2)}[slots]
    rng = np.random.default_rng(n + d + T)
    with mk.WeightStore.open(path, budget) as ws:
        if slots == "pinned":
            ws.pin(0, np.arange(0, n, 2))
        for rep in range(2):
            for L in range(nl):
                U, D = ref[L]
                h = rng.standard_normal((T, d)).astype(np.float32)
                act = rng.standard_normal((T, n)).astype(np.float32)
                perm = rng.permutation(n).astype(np.int64)
                for sparse, use_score, use_cs in ((False, False, False), (True, False, False), (True, True, False),
                                                  (True, False, True)):
                    score = rng.standard_normal((T, n)).astype(np.float32) if use_score else None
                    cs = rng.uniform(0.1, 3, n).astype(np.float32) if use_cs else None
                    crit = np.abs(act[:, perm] if score is None else score) * (1 if cs is None else cs)
                    thr = float(np.quantile(crit, 0.4)) if sparse else 0.0
                    want, keep = _layer_reference(U, D, h, act, perm, score, cs, sparse, thr)
                    out = np.full((T, d), np.nan, np.float32)
                    before = ws.stats()
                    kept, visited = _C.stream_ffn_layer(ws._h(), L, h, act, perm, score, cs, sparse, thr, out, fmt)
                    after = ws.stats()
                    assert np.isfinite(out).all()
                    scale = max(np.abs(want).max(), 1e-30)
                    assert np.abs(out - want).max() <= 1e-4 * scale * max(1, np.sqrt(n * d) / 8)
                    assert kept == int(keep.sum()) and visited == int(keep.any(0).sum())
                    looked = (after["neuron_hits"] + after["neuron_misses"]) - (before["neuron_hits"] + before["neuron_misses"])
                    assert looked == visited
                    assert after["peak_resident_bytes"] + after["staging_bytes"] <= budget
            ws.next_token()
        if slots == "all":  # everything cached after the first pass: the second read nothing new
            assert ws.stats()["neuron_hits"] > 0


def test_stream_ffn_layer_bad_inputs_and_corrupt_reads(tmp_path):
    from memkernels import _memkernels as _C
    path = str(tmp_path / "b.mkws")
    n, d, T = 40, 64, 2
    _bundle_store(path, "int4_int8", 1, n, d, seed=3)
    rng = np.random.default_rng(0)
    h = rng.standard_normal((T, d)).astype(np.float32)
    act = rng.standard_normal((T, n)).astype(np.float32)
    perm = np.arange(n, dtype=np.int64)
    out = np.zeros((T, d), np.float32)
    with mk.WeightStore.open(path, 1 << 22) as ws:
        def call(L=0, h=h, act=act, perm=perm, score=None, cs=None, sparse=True, thr=0.5, out=out, fmt="int4_int8"):
            return _C.stream_ffn_layer(ws._h(), L, h, act, perm, score, cs, sparse, thr, out, fmt)
        with pytest.raises((TypeError, ValueError), match="act"):
            call(act=act.astype(np.float64))
        with pytest.raises(ValueError, match="act"):
            call(act=act[:, :-1].copy())
        with pytest.raises((TypeError, ValueError), match="perm"):
            call(perm=perm.astype(np.int32))
        with pytest.raises(ValueError, match="perm"):
            call(perm=np.full(n, n, np.int64))
        with pytest.raises(ValueError, match="score"):
            call(score=np.zeros((T, n + 1), np.float32))
        with pytest.raises(ValueError, match="out"):
            call(out=np.zeros((T, d + 1), np.float32))
        with pytest.raises(ValueError, match="threshold"):
            call(thr=float("nan"))
        with pytest.raises(ValueError, match="not a int4 bundle layer"):  # int4 bundles are smaller
            call(fmt="int4")
        with pytest.raises(ValueError, match="not a down_int8 bundle layer"):
            call(fmt="down_int8")
        with pytest.raises(ValueError, match="not a down_int7 bundle layer"):
            call(fmt="down_int7")
        with pytest.raises(ValueError, match="format"):
            call(fmt="int5")
        with pytest.raises(ValueError, match="col_scale"):
            call(cs=np.ones(n + 1, np.float32))
        with pytest.raises((TypeError, ValueError), match="col_scale"):
            call(cs=np.ones(n, np.float64))
        with pytest.raises(ValueError, match="bundle layer"):  # bundles of another d_model
            call(h=np.zeros((T, d + 32), np.float32), out=np.zeros((T, d + 32), np.float32))
        with pytest.raises(ValueError, match="layer"):
            call(L=5)
        with pytest.raises((TypeError, ValueError), match="h"):
            call(h=h[:, ::2])
        info = ws.layers()[0]
    # a corrupt neuron: CorruptDataError naming it; the other neurons still work afterwards
    flip_byte(path, info["offset"] + 7 * info["bundle_bytes"] + 3, 0xFF)
    with mk.WeightStore.open(path, 1 << 22) as ws:
        with pytest.raises(CorruptDataError, match="neuron 7"):
            _C.stream_ffn_layer(ws._h(), 0, h, act, perm, None, None, False, 0.0, out, "int4_int8")
        keep_off = act.copy()
        keep_off[:, 7] = 0  # neuron 7 dropped: never read
        _C.stream_ffn_layer(ws._h(), 0, h, keep_off, perm, None, None, True, 0.0, out, "int4_int8")
        assert np.isfinite(out).all()


@pytest.mark.parametrize("fmt", ["down_int8", "down_int7"])
def test_down_int8_store_reads_down_columns_by_exact_contribution(tmp_path, fmt):
    """ffn_format="down_int8": gate and up stay resident, only int8 down columns stream; a column is
    read when |act(gate_i) * (h . up_i)| * ||down_i|| exceeds the layer's calibrated threshold. The
    decode (C++, <= 8 tokens) and prefill (NumPy) paths against a float64 product; fewer bytes than
    reading every column; the budget holds; the low-rank predictor is refused."""
    from memkernels.models.llama import activation
    dense, store = convert_quantized_dense(tmp_path, fmt, "dn.mkws", intermediate_size=256)
    with pytest.raises(ValueError, match="predictor"):
        st.StreamingModel(store, BUDGET, sparsity=0.5, predictor="lowrank")
    sm = st.StreamingModel(store, BUDGET, sparsity=0.5)
    assert sm.meta["ffn_dtype"] == fmt
    rng = np.random.default_rng(4)
    for L in range(2):
        p = f"model.layers.{L}."
        rows = sm.store.get_rows(L, np.arange(256)).reshape(256, -1)
        D = rows[:, :64].view(np.int8).astype(np.float64) * rows[:, 64:68].copy().view("<f4").astype(np.float64) \
            if fmt == "down_int8" else _int7_reference(rows, 64)
        for T in (1, 5, 12):
            h = rng.standard_normal((T, 64)).astype(np.float32)
            gu = sm._linear(h, p + "mlp.gate_up_proj.weight") if p + "mlp.gate_up_proj.weight" in sm._dev else \
                np.concatenate([sm._linear(h, p + "mlp.gate_proj.weight"), sm._linear(h, p + "mlp.up_proj.weight")], 1)
            z = (activation(np, gu[:, :256], "silu") * gu[:, 256:]).astype(np.float32)[:, sm._perm[L]]
            keep = np.abs(z) * sm._dnorm[L] > np.float32(sm._threshold[L])
            assert 0 < keep.mean() < 1
            want = (z.astype(np.float64) * keep) @ D
            got = np.full((T, 64), np.nan, np.float32)
            got[...] = sm._mlp(h, L, p)
            assert rel(got, want) < 1e-4
    t = ids(24, seed=3)
    whole = st.StreamingModel(store, BUDGET, whole_layer_reads=True)
    whole.generate(t, max_new_tokens=8, stop_at_eos=False)
    sm.reset_stream_stats()
    sm.generate(t, max_new_tokens=8, stop_at_eos=False)
    s, w = sm.stream_stats(), whole.stream_stats()
    assert 0.2 < s["neurons_kept_fraction"] < 0.8
    assert s["bytes_read_per_token"] < 0.8 * w["bytes_read_per_token"]
    assert w["hit_rate"] == 0.0  # the whole-layer baseline's read-ahead is not counted as hits
    assert s["peak_resident_bytes"] <= BUDGET and w["peak_resident_bytes"] <= BUDGET


def test_load_model_ffn_format_down_int8(tmp_path):
    """load_model(..., ffn_format="down_int8") converts into its own cached file (the default
    format's store is left alone), streams only down columns, and is refused without a budget."""
    d = build(tmp_path, intermediate_size=256)
    sdir = tmp_path / "s"
    m = mk.load_model(d, dram_budget_bytes=BUDGET, stream_dir=sdir, ffn_format="down_int8", sparsity=0.3)
    assert m.meta["ffn_dtype"] == "down_int8"
    assert os.path.exists(st.store_path_for(d, sdir, "down_int8")) and not os.path.exists(st.store_path_for(d, sdir))
    out = m.generate(ids(), max_new_tokens=6, stop_at_eos=False)
    assert len(out) == 6
    s = m.stream_stats()
    assert 0.4 < s["neurons_kept_fraction"] < 0.95 and s["peak_resident_bytes"] <= BUDGET
    assert s["whole_layer_bytes_per_token"] == 2 * 256 * st.int8_down_part_bytes(64)  # down columns only
    with pytest.raises(ValueError, match="ffn_format"):
        mk.load_model(d, ffn_format="down_int8")
    with pytest.raises(ValueError, match="ffn_format"):
        mk.load_model(d, dram_budget_bytes=BUDGET, stream_dir=sdir, ffn_format="int5")
