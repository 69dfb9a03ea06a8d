"""bench/hf_baseline.py (and the timing loop it shares with bench/nemo_baseline.py, bench/step_timing.py)
run end to end on the CPU with a fixture's config: its JSON row has the keys tools/gpu/run.sh and
bench/compare.sh read, tokens/s from the median step, the same first loss for the same seed, and
balanced routing patches every router. (On the GPU machine the same scripts give the benchmark rows.)"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytest.importorskip("torch")
pytest.importorskip("transformers")

KEYS = {"impl", "tokens_per_s_per_gpu", "model_tflops_per_gpu", "flops_per_token", "peak_allocated_gib",
        "peak_reserved_gib", "device_used_gib", "fwd_loss_ms", "bwd_ms", "optimizer_ms", "step_ms", "first_loss",
        "last_loss", "steps", "warmup", "seq", "batch", "routing", "layers", "params"}


def run(*args):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "hf_baseline.py"),
                        os.path.join(ROOT, "tests", "fixtures", "qwen3_moe_a"), "--device", "cpu", "--seq", "16",
                        "--steps", "3", "--warmup", "1", "--experts", "eager", *args],
                       capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1]), r.stderr


@pytest.mark.parametrize("routing", ["native", "balanced"])
def test_hf_baseline_row_on_the_cpu(routing):
    row, log = run("--routing", routing)
    assert KEYS <= set(row)
    assert row["impl"] == "transformers" and row["routing"] == routing and row["steps"] == 3
    assert log.count("  step ") == 4  # one warm-up + three timed steps, each logged
    assert row["tokens_per_s_per_gpu"] == pytest.approx(16 / (row["step_ms"] / 1e3))
    assert row["model_tflops_per_gpu"] == pytest.approx(row["flops_per_token"] * row["tokens_per_s_per_gpu"] / 1e12)
    assert row["step_ms"] > 0 and row["fwd_loss_ms"] > 0 and row["bwd_ms"] > 0
    assert 2.0 < row["first_loss"] < 8.0  # near ln(vocab) for a random model


def test_the_same_seed_gives_the_same_first_loss():
    a, _ = run("--seed", "7")
    b, _ = run("--seed", "7")
    c, _ = run("--seed", "8")
    assert a["first_loss"] == b["first_loss"] != c["first_loss"]


def nemo_baseline(fixture):
    return subprocess.run([sys.executable, os.path.join(ROOT, "bench", "nemo_baseline.py"),
                           os.path.join(ROOT, "tests", "fixtures", fixture), "--device", "cpu"],
                          capture_output=True, text=True)


def test_nemo_baseline_refuses_nemotron_h_saying_why():
    # Decided from the config alone, before NeMo AutoModel is imported (it need not be installed).
    r = nemo_baseline("nemotron_h_a")
    assert r.returncode != 0
    assert "nemotron_h_a" in r.stderr and "'nemotron_h'" in r.stderr and "mamba_ssm" in r.stderr


def test_nemo_baseline_names_the_families_it_covers():
    r = nemo_baseline("llama_a")
    assert r.returncode != 0
    assert "'llama'" in r.stderr and "deepseek_v3, gpt_oss, qwen3_moe" in r.stderr
