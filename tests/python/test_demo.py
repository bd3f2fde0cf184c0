"""The demo decoder against its float64 NumPy twin, checkpoint loading, and the command line."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import memkernels as mk
from memkernels import model as M


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "memkernels", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


def small_store(tmp_path, act="relu", **kw):
    cfg = M.ModelConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        num_key_value_heads=1, intermediate_size=160, hidden_act=act, **kw)
    path = tmp_path / "m.mkws"
    M.prepare_store(cfg, M.random_weights(cfg, seed=3), path)
    return path


@pytest.mark.parametrize("act", ["relu", "silu"])
def test_generation_matches_float64_reference(tmp_path, act):
    path = small_store(tmp_path, act)
    prompts = [[1, 5, 9, 11, 2, 3, 4], [7, 8], [30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 45, 46, 47]]
    with mk.WeightStore.open(path, 1 << 20, max_read_bytes=16 << 10) as store:
        tokens, logits, timings, model = M.generate(store, prompts, 5, progress=False)
        assert len(tokens) == 4  # three prompts + one fork
        assert tokens[3][: len(prompts[0])] == tokens[0][: len(prompts[0])]
        assert tokens[3][len(prompts[0])] != tokens[0][len(prompts[0])]  # the fork took another path
        assert all(len(t) == len(p) + 6 for t, p in zip(tokens, prompts + [prompts[0]]))
        err = M.max_logit_error(store, tokens, logits)
        assert err < 1e-3, err
        stats = store.stats()
        assert stats["peak_resident_bytes"] <= 1 << 20
        model.cache.check_invariants()


def test_reference_detects_a_wrong_weight(tmp_path):
    # the comparison can fail: perturb one logit row and the error must show it
    path = small_store(tmp_path)
    with mk.WeightStore.open(path, 1 << 20, max_read_bytes=16 << 10) as store:
        tokens, logits, _, _ = M.generate(store, [[1, 2, 3]], 2, fork_after_prefill=False, progress=False)
        pos = next(iter(logits[0]))
        logits[0][pos] = logits[0][pos] + 0.5
        assert M.max_logit_error(store, tokens, logits) >= 0.5 - 1e-6


def _gpu_ops():
    """ArrayOps on the GPU, or a skip when this machine or build cannot run CUDA."""
    if not mk.info()["cuda_available"]:
        pytest.skip("no CUDA device")
    try:
        return M.array_ops("cuda")
    except ValueError as e:
        pytest.skip(str(e))


def _torch_cpu_ops():
    pytest.importorskip("torch")
    return M.array_ops("cpu", "torch")


@pytest.mark.parametrize("where", ["torch-cpu", "cuda"])
def test_generation_in_other_frameworks_matches_numpy(tmp_path, where):
    # the driver on PyTorch tensors (CPU) or on a GPU: same tokens as the NumPy driver, same reference
    ops = _torch_cpu_ops() if where == "torch-cpu" else _gpu_ops()
    path = small_store(tmp_path)
    prompts = [[1, 5, 9, 11, 2, 3, 4], [30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 45, 46, 47, 48]]
    with mk.WeightStore.open(path, 1 << 20, max_read_bytes=16 << 10) as store:
        want_tokens, want_logits, _, _ = M.generate(store, prompts, 6, progress=False)
    with mk.WeightStore.open(path, 1 << 20, ops.device, max_read_bytes=16 << 10) as store:
        tokens, logits, _, model = M.generate(store, prompts, 6, progress=False, ops=ops)
        assert model.cache.device.startswith(ops.device)
        assert all(isinstance(row, np.ndarray) for lg in logits for row in lg.values())
        assert M.max_logit_error(store, tokens, logits) < 1e-3
        assert store.stats()["peak_resident_bytes"] <= 1 << 20
    assert tokens == want_tokens
    for got, want in zip(logits, want_logits):
        assert got.keys() == want.keys()
        for pos in got:
            np.testing.assert_allclose(got[pos], want[pos], rtol=0, atol=1e-4)


def test_array_ops_choices(tmp_path):
    assert M.array_ops("cpu").xp is np
    with pytest.raises(ValueError, match="NumPy arrays live on the CPU"):
        M.array_ops("cuda", "numpy")
    with pytest.raises(ValueError, match="CuPy arrays live on a GPU"):
        M.array_ops("cpu", "cupy")
    with pytest.raises(ValueError, match="framework: expected"):
        M.array_ops("cpu", "jax")
    with pytest.raises(ValueError, match="device: expected"):
        M.array_ops("gpu")
    with mk.WeightStore.open(small_store(tmp_path), 1 << 20) as store:
        with pytest.raises(ValueError, match="weight store is on cpu but the model runs on cuda"):
            M.StreamedModel(store, 8, 1, ops=M.ArrayOps(np, "cuda"))


def write_tiny_checkpoint(d, act="silu", tie=True):
    cfg = M.ModelConfig(vocab_size=50, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=96, hidden_act=act, tie_word_embeddings=tie)
    w = M.random_weights(cfg, seed=7)
    if tie:
        del w["lm_head.weight"]
    d.mkdir(exist_ok=True)
    conf = {k: v for k, v in vars(cfg).items()}
    conf["model_type"] = "llama"
    (d / "config.json").write_text(json.dumps(conf))
    names = sorted(w)
    half = len(names) // 2
    try:
        from safetensors.numpy import save_file
    except ImportError:
        pytest.skip("safetensors not installed")
    save_file({n: w[n] for n in names[:half]}, str(d / "model-00001-of-00002.safetensors"))
    save_file({n: w[n] for n in names[half:]}, str(d / "model-00002-of-00002.safetensors"))
    return cfg


def test_load_checkpoint_directory(tmp_path):
    cfg = write_tiny_checkpoint(tmp_path / "ckpt")
    loaded, weights = M.load_checkpoint(tmp_path / "ckpt")
    assert loaded.hidden_size == cfg.hidden_size and loaded.num_key_value_heads == 2
    np.testing.assert_array_equal(weights["lm_head.weight"], weights["model.embed_tokens.weight"])


def test_cli_demo_small_and_checkpoint(tmp_path):
    res = run_cli("demo", "--model-only", "--hidden", "128", "--layers", "2", "--tokens", "3", "--prompt-len", "9")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "max |logit - float64 reference|" in res.stdout and "OK" in res.stdout
    write_tiny_checkpoint(tmp_path / "ckpt")
    res = run_cli("demo", "--model-only", "--model", str(tmp_path / "ckpt"), "--tokens", "2", "--prompt-len", "6",
                  "--work-dir", str(tmp_path / "work"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "checkpoint" in res.stdout and os.path.exists(tmp_path / "work" / "model.mkws")


def test_cli_bad_model_path_and_config(tmp_path):
    res = run_cli("demo", "--model-only", "--model", str(tmp_path / "missing"))
    assert res.returncode == 2 and "not a directory" in res.stderr
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text('{"hidden_size": 64}')
    res = run_cli("demo", "--model-only", "--model", str(tmp_path / "bad"))
    assert res.returncode == 2 and "missing config keys" in res.stderr
    (tmp_path / "bad" / "config.json").write_text("{not json")
    res = run_cli("demo", "--model-only", "--model", str(tmp_path / "bad"))
    assert res.returncode == 2 and "cannot read model config" in res.stderr
    res = run_cli("demo", "--bogus-flag")
    assert res.returncode == 2


def test_cli_demo_device_and_framework():
    if not mk.info()["cuda_available"]:
        res = run_cli("demo", "--device", "cuda", "--model-only")
        assert res.returncode == 2 and "--device cuda" in res.stderr and "CUDA" in res.stderr
    res = run_cli("demo", "--framework", "cupy", "--model-only")
    assert res.returncode == 2 and "CuPy arrays live on a GPU" in res.stderr
    res = run_cli("demo", "--device", "gpu0", "--model-only")
    assert res.returncode == 2 and "device: expected" in res.stderr
    try:
        import torch  # noqa: F401
    except ImportError:
        return
    res = run_cli("demo", "--framework", "torch", "--model-only", "--hidden", "128", "--layers", "2", "--tokens", "3",
                  "--prompt-len", "9")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "TorchOps over torch on cpu" in res.stdout and "OK" in res.stdout


def test_cli_convert_checkpoint(tmp_path):
    cfg = write_tiny_checkpoint(tmp_path / "ckpt")
    dst = tmp_path / "c.mkws"
    res = run_cli("convert", str(tmp_path / "ckpt"), str(dst))
    assert res.returncode == 0, res.stderr
    assert f"{cfg.num_hidden_layers} FFN layers bundled" in res.stdout
    with mk.WeightStore.open(dst, 1 << 20) as store:
        assert json.loads(store.get("config.json").tobytes())["hidden_size"] == cfg.hidden_size
        assert len(store.layers()) == cfg.num_hidden_layers
    res = run_cli("convert", str(tmp_path / "missing.safetensors"), str(dst))
    assert res.returncode == 2 and "missing.safetensors" in res.stderr


def test_cli_info():
    res = run_cli("info")
    assert res.returncode == 0 and "memkernels" in res.stdout and "CPU ISA" in res.stdout


def test_cli_bench_summary(tmp_path):
    # a stand-in bench/ folder: checks the runner and the ratio summary, not any kernel's speed
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "_common.py").write_text("")
    (bench / "toy.py").write_text(
        "print('### toy table\\n')\nprint('| case | ours ms | numpy/ours |')\nprint('|---|---|---|')\n"
        "print('| n=1 | 1.00 | 2.50x |')\nprint('| n=2 | 1.00 | 0.75x |')\n")
    out = tmp_path / "r.json"
    res = run_cli("bench", "--bench-dir", str(bench), "--json", str(out))
    assert res.returncode == 0, res.stderr
    data = json.loads(out.read_text())
    assert [(r["case"], r["value"]) for r in data["ratios"]] == [("n=1", 2.5), ("n=2", 0.75)]
    assert "| toy | toy table | n=2 | numpy/ours | 0.75x |" in res.stdout
    res = run_cli("bench", "--bench-dir", str(tmp_path / "nowhere"), cwd=str(tmp_path))
    assert res.returncode == 2


def test_progress_bar_only_on_a_terminal(capsys, monkeypatch):
    M._progress("decode", 1, 2)
    assert capsys.readouterr().out == ""  # not a terminal: nothing
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    M._progress("decode", 1, 2, width=4)
    M._progress("decode", 2, 2, width=4)
    assert capsys.readouterr().out == "\r  decode [##..] 1/2\r  decode [####] 2/2\n"
