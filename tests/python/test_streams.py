"""stream=None means the calling framework's current CUDA stream (issue 15 #4), not the legacy
default stream: work the caller queued under `with torch.cuda.stream(s):` or `with
cupy.cuda.Stream():` must be ordered before the kernel. No GPU is needed: the frameworks'
current-stream functions are replaced by fakes and the handle the kernels receive is recorded."""
import sys
import types

import numpy as np
import pytest

import memkernels
from memkernels import _arrays


class _FakeCudaArray:
    """A CUDA array of a given framework as the wrappers see it: shape, dtype, DLPack device."""

    def __init__(self, shape, dtype="float16", index=1):
        self.shape = tuple(shape)
        self.dtype = dtype
        self.device = f"cuda:{index}"
        self._index = index

    def __dlpack__(self, stream=None):  # pragma: no cover - never exported in these tests
        raise AssertionError("not exported")

    def __dlpack_device__(self):
        return (2, self._index)


def _fake_class(module):
    # _arrays recognises the framework by the array type's module.
    return type("Tensor", (_FakeCudaArray,), {"__module__": module})


@pytest.fixture
def fake_torch(monkeypatch):
    torch = pytest.importorskip("torch")
    calls = []

    class Stream:
        cuda_stream = 0x7001

    def current_stream(device=None):
        calls.append(device)
        return Stream()

    monkeypatch.setattr(torch.cuda, "current_stream", current_stream)
    return _fake_class("torch"), calls


@pytest.fixture
def fake_cupy(monkeypatch):
    devices = []

    class Device:
        def __init__(self, index):
            self.index = index

        def __enter__(self):
            devices.append(self.index)
            return self

        def __exit__(self, *exc):
            devices.pop()

    class Stream:
        def __init__(self):
            self.ptr = 0x9001 + (devices[-1] if devices else -1)

    cuda = types.SimpleNamespace(Device=Device, get_current_stream=lambda: Stream())
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(cuda=cuda))
    return _fake_class("cupy")


def test_none_is_torch_current_stream_of_the_tensor_device(fake_torch):
    cls, calls = fake_torch
    t = cls((2, 3), index=1)
    assert _arrays.stream_handle(None, t) == 0x7001
    assert calls == ["cuda:1"]


def test_none_is_cupy_current_stream_on_the_array_device(fake_cupy):
    a = fake_cupy((4,), index=2)
    # the fake's handle encodes the device that was current when it was asked for
    assert _arrays.stream_handle(None, a) == 0x9001 + 2


def test_none_for_numpy_cpu_or_no_array_is_the_default_stream(fake_torch):
    assert _arrays.stream_handle(None) == 0
    assert _arrays.stream_handle(None, np.zeros(3)) == 0
    torch = pytest.importorskip("torch")
    assert _arrays.stream_handle(None, torch.zeros(3)) == 0  # a CPU tensor: no CUDA stream asked for
    assert fake_torch[1] == []


def test_explicit_streams_win_over_the_current_one(fake_torch):
    cls, calls = fake_torch
    t = cls((1,))
    assert _arrays.stream_handle(5, t) == 5
    assert _arrays.stream_handle(types.SimpleNamespace(cuda_stream=11), t) == 11
    assert _arrays.stream_handle(types.SimpleNamespace(ptr=12), t) == 12
    assert calls == []
    with pytest.raises(TypeError, match="stream: expected"):
        _arrays.stream_handle("s", t)
    with pytest.raises(TypeError, match="stream: expected"):
        _arrays.stream_handle(True, t)


class _Recorder:
    """Stands in for the compiled module: records the stream handle each kernel receives."""

    def __init__(self):
        self.streams = {}

    def __getattr__(self, name):
        def kernel(*args):
            self.streams[name] = args
        return kernel


def test_wrappers_pass_the_frameworks_current_stream(monkeypatch, fake_torch):
    cls, _ = fake_torch
    rec = _Recorder()
    for mod in (memkernels.attention, memkernels.quant, memkernels.sparse, memkernels.paged):
        monkeypatch.setattr(mod, "_C", rec)
    q = cls((1, 4, 2, 8))
    memkernels.flash_attention(q, q, q, out=cls((1, 4, 2, 8)))
    assert rec.streams["flash_attention"][-3] == 0x7001  # before seqused_k, key_mask
    memkernels.flash_attention(q, q, q, out=cls((1, 4, 2, 8)), stream=3)
    assert rec.streams["flash_attention"][-3] == 3
    qv = cls((4, 2, 8))
    cu = cls((2,), dtype="int32")
    memkernels.flash_attention_varlen(qv, qv, qv, cu, cu, out=cls((4, 2, 8)))
    assert rec.streams["flash_attention_varlen"][-3] == 0x7001
    memkernels.paged_attention_raw(qv, qv, qv, cu, cu, cu, out=cls((4, 2, 8)))
    assert rec.streams["paged_attention_raw"][-3] == 0x7001


def test_cupy_arrays_get_cupys_current_stream(monkeypatch, fake_cupy):
    rec = _Recorder()
    monkeypatch.setattr(memkernels.paged, "_C", rec)
    qv = fake_cupy((4, 2, 8), index=0)
    cu = fake_cupy((2,), dtype="int32", index=0)
    memkernels.paged_attention_raw(qv, qv, qv, cu, cu, cu, out=fake_cupy((4, 2, 8), index=0))
    assert rec.streams["paged_attention_raw"][-3] == 0x9001
