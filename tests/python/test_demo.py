"""The demo: a seeded checkpoint run through load_model's streaming path and checked against the
float64 forward of the checkpoint; the command line."""
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


SMALL = ("--model-only", "--hidden", "128", "--layers", "2", "--tokens", "3", "--prompt-len", "9")


def test_seeded_checkpoint_loads_and_streams_exactly(tmp_path):
    cfg = M.write_random_checkpoint(tmp_path / "ck", vocab_size=97, hidden_size=64, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=1, intermediate_size=160, seed=3)
    dense = mk.load_model(tmp_path / "ck")
    assert dense.config.hidden_act == "relu" and dense.config.intermediate_size == 160
    sm = mk.load_model(tmp_path / "ck", dram_budget_bytes=1 << 22, stream_dir=tmp_path / "s")
    ids = [1, 5, 9, 11, 2, 3, 4, 60]
    ref = dense.reference_logits(ids)
    got = sm.logits(ids)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    assert sm.stream_stats()["peak_resident_bytes"] <= 1 << 22
    with pytest.raises(ValueError, match="num_attention_heads"):
        M.write_random_checkpoint(tmp_path / "bad", hidden_size=64, num_attention_heads=3)
    assert cfg["model_type"] == "llama"


@pytest.mark.parametrize("act", ["relu", "silu"])
def test_cli_demo_checks_against_float64(tmp_path, act):
    res = run_cli("demo", *SMALL, "--act", act, "--work-dir", str(tmp_path / "w"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "max |logit - float64 reference|" in res.stdout and res.stdout.rstrip().endswith("OK")
    assert "held at most" in res.stdout and os.path.isdir(tmp_path / "w" / "seeded-model")
    assert res.stdout.count("-> [") == 3  # the three prompts' new tokens are printed


def test_cli_demo_check_fails_on_wrong_or_nonfinite_logits(tmp_path):
    # the same checkpoint, then one weight changed after conversion (the store is stale but matches
    # the source key only if we keep mtime: rewrite the reference instead) -> MISMATCH, exit 1
    work = tmp_path / "w"
    assert run_cli("demo", *SMALL, "--work-dir", str(work)).returncode == 0
    from safetensors.numpy import load_file, save_file
    st_path = work / "seeded-model" / "model.safetensors"
    for poison in (0.5, np.nan):
        w = load_file(str(st_path))
        w["model.norm.weight"] = w["model.norm.weight"] + np.float32(poison)
        stat = os.stat(st_path)
        save_file(w, str(st_path))
        os.utime(st_path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the cached store still "matches"
        res = run_cli("demo", *SMALL, "--work-dir", str(work), "--model", str(work / "seeded-model"))
        assert res.returncode == 1, res.stdout + res.stderr
        assert "MISMATCH" in res.stdout


def test_cli_demo_checkpoint_and_sparsity(tmp_path):
    M.write_random_checkpoint(tmp_path / "ck", vocab_size=50, hidden_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                              hidden_act="silu", seed=7)
    res = run_cli("demo", "--model-only", "--model", str(tmp_path / "ck"), "--tokens", "2", "--prompt-len", "6",
                  "--work-dir", str(tmp_path / "work"), "--sparsity", "0.5")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "checkpoint" in res.stdout and "only finiteness checked" in res.stdout
    assert os.path.exists(tmp_path / "work" / "ck.stream.mkws")


def test_cli_bad_model_path_and_config(tmp_path):
    res = run_cli("demo", "--model-only", "--model", str(tmp_path / "missing"))
    assert res.returncode == 2 and "does not exist" in res.stderr
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text('{"hidden_size": 64}')
    res = run_cli("demo", "--model-only", "--model", str(tmp_path / "bad"))
    assert res.returncode == 2 and "model_type" in res.stderr
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


def test_array_ops_choices():
    assert M.array_ops("cpu").xp is np
    with pytest.raises(ValueError, match="NumPy arrays live on the CPU"):
        M.array_ops("cuda", "numpy")
    with pytest.raises(ValueError, match="CuPy arrays live on a GPU"):
        M.array_ops("cpu", "cupy")
    with pytest.raises(ValueError, match="framework: expected"):
        M.array_ops("cpu", "jax")
    with pytest.raises(ValueError, match="device: expected"):
        M.array_ops("gpu")


def write_tiny_checkpoint(d):
    return M.write_random_checkpoint(d, vocab_size=50, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, intermediate_size=96, hidden_act="silu", seed=7)


def test_cli_convert_checkpoint(tmp_path):
    cfg = write_tiny_checkpoint(tmp_path / "ckpt")
    dst = tmp_path / "c.mkws"
    res = run_cli("convert", str(tmp_path / "ckpt"), str(dst))
    assert res.returncode == 0, res.stderr
    assert f"{cfg['num_hidden_layers']} FFN layers bundled" in res.stdout
    with mk.WeightStore.open(dst, 1 << 20) as store:
        assert json.loads(store.get("config.json").tobytes())["hidden_size"] == cfg['hidden_size']
        assert len(store.layers()) == cfg['num_hidden_layers']
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
