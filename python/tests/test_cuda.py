"""The Python API on the GPU (device="cuda"): Transformers' numbers, logits handed to torch in GPU
memory without a copy, generation and training as on the CPU. Skipped (reported as skipped) where
this build has no CUDA backend or no GPU answers."""
import os

import numpy as np
import pytest
from safetensors.numpy import load_file

import moeforge

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
FAMILIES = ["qwen3_moe_a", "mixtral_a", "qwen2_moe_a", "olmoe_a", "llama_a", "mistral_a", "qwen2_a", "qwen3_a",
            "gpt_oss_a", "deepseek_v3_a", "nemotron_h_a"]

pytestmark = pytest.mark.skipif(moeforge.cuda_device_count() == 0,
                                reason="no GPU here (or this build has no CUDA backend)")


def _reference(case):
    return load_file(os.path.join(FIXTURES, case, "reference.safetensors"))


@pytest.mark.parametrize("case", FAMILIES)
def test_cuda_fp32_logits_and_loss_match_transformers(case):
    torch = pytest.importorskip("torch")
    ref = _reference(case)
    model = moeforge.AutoModelForCausalLM.from_pretrained(os.path.join(FIXTURES, case), device="cuda")
    assert model.device == "cuda"
    out = model(ref["input_ids"], labels=ref["labels"])
    assert out.logits.is_cuda and tuple(out.logits.shape) == ref["logits"].shape
    assert np.abs(out.logits.cpu().numpy() - ref["logits"]).max() < 1e-4
    assert out.loss == pytest.approx(float(ref["loss"]), abs=1e-5)
    assert model(ref["input_ids"], labels=ref["labels"], return_logits=False).loss == pytest.approx(out.loss, abs=1e-5)


def test_cuda_logits_are_a_torch_tensor_on_the_gpu():
    torch = pytest.importorskip("torch")
    ref = _reference("llama_a")
    out = moeforge.AutoModelForCausalLM.from_pretrained(os.path.join(FIXTURES, "llama_a"), device="cuda")(ref["input_ids"])
    assert isinstance(out.logits, torch.Tensor) and out.logits.is_cuda and out.logits.dtype == torch.float32
    view = torch.from_dlpack(out.logits)  # a consumer of the DLPack protocol shares the same memory
    assert view.data_ptr() == out.logits.data_ptr()
    assert np.abs(out.logits.cpu().numpy() - ref["logits"]).max() < 1e-4


def test_cuda_bf16_tracks_fp32():
    ref = _reference("qwen3_moe_a")
    model = moeforge.AutoModelForCausalLM.from_pretrained(os.path.join(FIXTURES, "qwen3_moe_a"), device="cuda",
                                                         dtype="bfloat16")
    out = model(ref["input_ids"], labels=ref["labels"], return_logits=False)
    assert out.loss == pytest.approx(float(ref["loss"]), rel=0.02)


def test_cuda_generate_matches_transformers_greedy():
    ref = load_file(os.path.join(FIXTURES, "qwen3_moe_b", "generate_reference.safetensors"))
    model = moeforge.AutoModelForCausalLM.from_pretrained(os.path.join(FIXTURES, "qwen3_moe_b"), device="cuda")
    out = model.generate(ref["prompt_ids"], max_new_tokens=len(ref["generated_ids"]), do_sample=False, eos_token_id=[])
    assert out.tolist() == [ref["prompt_ids"].tolist() + ref["generated_ids"].tolist()]


def test_cuda_train_tracks_the_cpu_run(tmp_path):
    recipe = {"model": os.path.join(FIXTURES, "qwen3_moe_aux"), "data": os.path.join(ROOT, "tests", "data", "arith64.jsonl"),
              "seq_len": 16, "micro_batch": 2, "global_batch": 4, "steps": 4, "optimizer": {"lr": 2e-3}, "seed": 3,
              "threads": 1}
    cpu = moeforge.train(dict(recipe, output_dir=str(tmp_path / "cpu")))
    gpu = moeforge.train(dict(recipe, output_dir=str(tmp_path / "gpu"), device="cuda", precision="fp32"))
    assert gpu["steps_done"] == 4
    assert gpu["losses"] == pytest.approx(cpu["losses"], rel=1e-4)


@pytest.mark.skipif(moeforge.cuda_device_count() < 2, reason="needs two GPUs")
def test_cuda_two_ranks_split_the_experts(tmp_path):
    """Two processes, one GPU each (moeforge launch): from_pretrained(ep_size=2, device="cuda") gives
    Transformers' logits on each rank's own batch, and train() with the experts split over the two
    GPUs gives the one-GPU run's losses."""
    import json
    import socket
    import subprocess
    import sys
    case = os.path.join(FIXTURES, "qwen3_moe_a")
    recipe = {"model": os.path.join(FIXTURES, "qwen3_moe_aux"), "data": os.path.join(ROOT, "tests", "data", "arith64.jsonl"),
              "seq_len": 16, "micro_batch": 2, "global_batch": 4, "steps": 3, "optimizer": {"lr": 2e-3}, "seed": 3,
              "threads": 1, "device": "cuda", "precision": "fp32"}
    one = moeforge.train(dict(recipe, output_dir=str(tmp_path / "one")))
    script = tmp_path / "run.py"
    script.write_text(
        "import json, sys, numpy as np, torch, moeforge\n"
        "from safetensors.numpy import load_file\n"
        "case, out, recipe = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])\n"
        "ref = load_file(case + '/reference.safetensors')\n"
        "m = moeforge.AutoModelForCausalLM.from_pretrained(case, device='cuda', ep_size=2)\n"
        "ids = ref['input_ids'] if m.rank == 0 else ref['input_ids'][::-1].copy()\n"
        "want = ref['logits'] if m.rank == 0 else ref['logits'][::-1]\n"
        "err = float(np.abs(m(ids).logits.cpu().numpy() - want).max())\n"
        "json.dump({'rank': m.rank, 'err': err}, open(out + '/rank%d.json' % m.rank, 'w'))\n"
        "del m\n"
        "moeforge.train(recipe, ep_size=2)\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bin_path = os.environ.get("MOEFORGE_BIN", os.path.join(ROOT, "build", "moeforge"))
    r = subprocess.run([bin_path, "launch", "--nproc-per-node", "2", "--master-port", str(port), "--", sys.executable,
                        str(script), case, str(tmp_path), json.dumps(dict(recipe, output_dir=str(tmp_path / "two")))],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for rank in (0, 1):
        assert json.load(open(tmp_path / f"rank{rank}.json"))["err"] < 1e-4
    two = [json.loads(l)["loss"] for l in open(tmp_path / "two" / "metrics.jsonl") if '"loss"' in l]
    assert two == pytest.approx(one["losses"], rel=1e-4)
