"""The Python API against Transformers' references (the fixtures' reference.safetensors, made by
tools/make_fixtures.py) and against the CLI: the same numbers, the same errors."""
import json
import os
import subprocess

import numpy as np
import pytest
from safetensors.numpy import load_file

import moeforge

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
BIN = os.environ.get("MOEFORGE_BIN", os.path.join(ROOT, "build", "moeforge"))
FAMILIES = ["qwen3_moe_a", "qwen3_moe_b", "qwen3_moe_aux", "mixtral_a", "mixtral_b", "qwen2_moe_a", "qwen2_moe_b",
            "olmoe_a", "olmoe_b", "llama_a", "llama_b", "mistral_a", "mistral_b", "qwen2_a", "qwen2_b", "qwen3_a",
            "qwen3_b", "gpt_oss_a", "gpt_oss_b", "deepseek_v3_a", "deepseek_v3_b", "nemotron_h_a", "nemotron_h_b"]


@pytest.mark.parametrize("case", FAMILIES)
def test_logits_and_loss_match_transformers(case):
    ref = load_file(os.path.join(FIXTURES, case, "reference.safetensors"))
    model = moeforge.AutoModelForCausalLM.from_pretrained(os.path.join(FIXTURES, case))
    out = model(ref["input_ids"], labels=ref["labels"])
    assert out.logits.shape == ref["logits"].shape
    assert np.abs(out.logits - ref["logits"]).max() < 1e-4
    assert out.loss == pytest.approx(float(ref["loss"]), abs=1e-5)
    assert model.config["model_type"] == json.load(open(os.path.join(FIXTURES, case, "config.json")))["model_type"]
    # The loss alone (no logits materialised) is the same number.
    assert model(ref["input_ids"], labels=ref["labels"], return_logits=False).loss == pytest.approx(out.loss, abs=1e-5)


def test_logits_cross_to_torch_without_a_copy():
    torch = pytest.importorskip("torch")
    ref = load_file(os.path.join(FIXTURES, "llama_a", "reference.safetensors"))
    out = moeforge.AutoModelForCausalLM.from_pretrained(os.path.join(FIXTURES, "llama_a"))(torch.from_numpy(ref["input_ids"]))
    t = torch.from_dlpack(out.logits)
    assert t.data_ptr() == out.logits.ctypes.data
    assert tuple(t.shape) == out.logits.shape


def test_save_pretrained_round_trips(tmp_path):
    src = os.path.join(FIXTURES, "qwen3_moe_a")
    model = moeforge.AutoModelForCausalLM.from_pretrained(src)
    model.save_pretrained(tmp_path / "out")
    again = moeforge.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ids = load_file(os.path.join(src, "reference.safetensors"))["input_ids"]
    assert np.array_equal(model(ids).logits, again(ids).logits)
    # The checkpoint's own tensor names and dtypes (re-sharded: the fixture is in 24 KB shards).
    def tensors(folder):
        out = {}
        for f in sorted(os.listdir(folder)):
            if f.startswith("model") and f.endswith(".safetensors"):
                out.update(load_file(os.path.join(folder, f)))
        return out
    a, b = tensors(src), tensors(tmp_path / "out")
    assert a.keys() == b.keys()
    assert all(a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)


def test_generate_matches_transformers_greedy():
    ref = load_file(os.path.join(FIXTURES, "qwen3_moe_b", "generate_reference.safetensors"))
    model = moeforge.AutoModelForCausalLM.from_pretrained(os.path.join(FIXTURES, "qwen3_moe_b"))
    seen = []
    out = model.generate(ref["prompt_ids"], max_new_tokens=len(ref["generated_ids"]), do_sample=False,
                         eos_token_id=[], streamer=seen.append)
    assert out.tolist() == [ref["prompt_ids"].tolist() + ref["generated_ids"].tolist()]
    assert seen == ref["generated_ids"].tolist()


def test_generate_a_left_padded_batch_as_each_row_alone():
    ref = load_file(os.path.join(FIXTURES, "qwen3_moe_b", "generate_reference.safetensors"))
    model = moeforge.AutoModelForCausalLM.from_pretrained(os.path.join(FIXTURES, "qwen3_moe_b"))
    long, short = ref["prompt_ids"].reshape(-1).tolist(), [5, 9, 2]
    pad = len(long) - len(short)
    ids = np.asarray([long, [0] * pad + short])
    mask = np.asarray([[1] * len(long), [0] * pad + [1] * len(short)])
    n = len(ref["generated_ids"])
    for max_batch in (1, 2):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, eos_token_id=[],
                             max_batch=max_batch)
        assert out.tolist()[0] == long + ref["generated_ids"].tolist()
        alone = model.generate([short], max_new_tokens=n, do_sample=False, eos_token_id=[])
        assert out.tolist()[1] == [0] * pad + alone[0].tolist()
    with pytest.raises(moeforge.Error, match="left"):
        model.generate(ids, attention_mask=np.asarray([[1] * len(long), [1] * len(short) + [0] * pad]), max_new_tokens=2)
    with pytest.raises(moeforge.Error, match="streamer"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, streamer=print)


def test_train_equals_the_cli(tmp_path):
    recipe = {"model": os.path.join(FIXTURES, "qwen3_moe_aux"), "data": os.path.join(ROOT, "tests", "data", "arith64.jsonl"),
              "output_dir": str(tmp_path / "py"), "seq_len": 16, "micro_batch": 2, "global_batch": 4, "steps": 4,
              "optimizer": {"lr": 2e-3}, "seed": 3, "threads": 1}
    steps = []
    res = moeforge.train(recipe, on_step=steps.append)
    assert res["steps_done"] == 4 and [m["step"] for m in steps] == [1, 2, 3, 4]
    assert [m["loss"] for m in steps] == pytest.approx(res["losses"], abs=0)
    with open(tmp_path / "r.yaml", "w") as f:
        json.dump(dict(recipe, output_dir=str(tmp_path / "cli")), f)
    subprocess.run([BIN, "train", str(tmp_path / "r.yaml")], check=True, capture_output=True)
    cli = [json.loads(l)["loss"] for l in open(tmp_path / "cli" / "metrics.jsonl") if '"loss"' in l]
    assert cli == pytest.approx(res["losses"], abs=0)
    a = load_file(str(tmp_path / "py" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "cli" / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # Keyword overrides with dotted keys, as on the command line.
    res2 = moeforge.Trainer(recipe, **{"output_dir": str(tmp_path / "py2"), "optimizer.lr": 1e-3, "steps": 2}).train()
    assert res2["steps_done"] == 2


def test_tokenizer_and_chat_template():
    demo = os.path.join(ROOT, "examples", "demo_model")
    tok = moeforge.load_tokenizer(demo)
    ids = tok.encode("Count from 3 to 7.")
    assert tok.decode(ids) == "Count from 3 to 7."
    messages = [{"role": "user", "content": "Count from 3 to 5."}, {"role": "assistant", "content": "3 4 5"}]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == "<|im_start|>user\nCount from 3 to 5.<|im_end|>\n<|im_start|>assistant\n3 4 5<|im_end|>\n"
    enc = tok.apply_chat_template(messages, return_assistant_tokens_mask=True)
    assert len(enc["input_ids"]) == len(enc["assistant_masks"]) and 0 < sum(enc["assistant_masks"]) < len(enc["input_ids"])


def test_bad_input_raises_one_line_errors(tmp_path):
    with pytest.raises(moeforge.Error, match="nope"):
        moeforge.AutoModelForCausalLM.from_pretrained(tmp_path / "nope")
    model = moeforge.AutoModelForCausalLM.from_pretrained(os.path.join(FIXTURES, "llama_a"))
    with pytest.raises(moeforge.Error, match="vocabulary"):
        model(np.array([[1, 2, 10 ** 6]]))
    with pytest.raises(moeforge.Error, match="must have input_ids' shape"):
        model(np.array([[1, 2, 3]]), labels=np.array([[1, 2]]))
    with pytest.raises(moeforge.Error, match="unknown key 'optimzer.lr'"):
        moeforge.train({"model": "m", "data": "d", "output_dir": "o", "steps": 1, "optimzer": {"lr": 1}})
    with pytest.raises(moeforge.Error, match="device must be"):
        moeforge.AutoModelForCausalLM.from_pretrained(os.path.join(FIXTURES, "llama_a"), device="tpu")
    with pytest.raises(moeforge.Error, match="this process runs alone"):
        moeforge.AutoModelForCausalLM.from_pretrained(os.path.join(FIXTURES, "qwen3_moe_a"), ep_size=2)
    with pytest.raises(moeforge.Error, match="zero_stage 3"):
        moeforge.AutoModelForCausalLM.from_pretrained(os.path.join(FIXTURES, "qwen3_moe_a"), zero_stage=3)
    with pytest.raises(ValueError, match="stop"):  # a callback's exception stops the run and comes back
        def boom(m):
            raise ValueError("stop")
        moeforge.train({"model": os.path.join(FIXTURES, "llama_a"), "data": os.path.join(ROOT, "tests", "data", "arith64.jsonl"),
                        "output_dir": str(tmp_path / "x"), "steps": 3, "seq_len": 8, "micro_batch": 2, "global_batch": 2},
                       on_step=boom)


def test_train_under_a_launcher_splits_the_experts(tmp_path):
    """The same Python script under `moeforge launch` (torchrun's variables): two CPU ranks, the
    experts split over them (ep_size 2, gloo), give the one-process run's losses."""
    recipe = {"model": os.path.join(FIXTURES, "qwen3_moe_a"), "data": os.path.join(ROOT, "tests", "data", "arith64.jsonl"),
              "seq_len": 16, "micro_batch": 2, "global_batch": 4, "steps": 3, "optimizer": {"lr": 2e-3}, "seed": 3,
              "threads": 1}
    one = moeforge.train(dict(recipe, output_dir=str(tmp_path / "one")))
    _launch("import json, sys, moeforge\nmoeforge.train(json.loads(sys.argv[1]), ep_size=2)\n", tmp_path,
            json.dumps(dict(recipe, output_dir=str(tmp_path / "two"))))
    two = [json.loads(l)["loss"] for l in open(tmp_path / "two" / "metrics.jsonl") if '"loss"' in l]
    assert two == pytest.approx(one["losses"], rel=1e-5)


def _launch(script_text, tmp_path, *args):
    """Runs a Python script as two CPU ranks under `moeforge launch` (torchrun's variables)."""
    import socket
    import sys
    script = tmp_path / "run.py"
    script.write_text(script_text)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = subprocess.run([BIN, "launch", "--nproc-per-node", "2", "--master-port", str(port), "--", sys.executable,
                        str(script), *args], capture_output=True, text=True, timeout=300)
    if r.returncode != 0 and "gloo" in r.stderr:
        pytest.skip("this build has no CPU collectives (gloo)")
    assert r.returncode == 0, r.stderr
    return r


def test_from_pretrained_with_experts_split_over_ranks(tmp_path):
    """from_pretrained(ep_size=2) under a launcher: each rank holds half the experts, exchanges its
    tokens with the other, and gets Transformers' logits and loss for its own batch; the model counts
    all its parameters; save_pretrained from both ranks writes the source's tensors; train() in the
    same processes afterwards (a second rendezvous) gives the one-process run's losses."""
    case = os.path.join(FIXTURES, "qwen3_moe_a")
    whole = moeforge.AutoModelForCausalLM.from_pretrained(case)
    script = ("import json, sys, numpy as np, moeforge\n"
              "from safetensors.numpy import load_file\n"
              "case, out = sys.argv[1], sys.argv[2]\n"
              "ref = load_file(case + '/reference.safetensors')\n"
              "m = moeforge.AutoModelForCausalLM.from_pretrained(case, ep_size=2)\n"
              "ids, labels = ref['input_ids'], ref['labels']\n"
              "if m.rank == 1:\n"  # another batch on rank 1: the reference's rows reversed
              "    ids, labels = ids[::-1].copy(), labels[::-1].copy()\n"
              "o = m(ids, labels=labels)\n"
              "want = ref['logits'] if m.rank == 0 else ref['logits'][::-1]\n"
              "json.dump({'rank': m.rank, 'world': m.world_size, 'params': m.num_parameters(), 'loss': o.loss,\n"
              "           'err': float(np.abs(o.logits - want).max())}, open(out + '/rank%d.json' % m.rank, 'w'))\n"
              "m.save_pretrained(out + '/saved')\n"
              "del m\n"  # then training in the same processes: a second rendezvous on the same port
              "moeforge.train(json.loads(sys.argv[3]), ep_size=2)\n")
    recipe = {"model": case, "data": os.path.join(ROOT, "tests", "data", "arith64.jsonl"), "seq_len": 16,
              "micro_batch": 2, "global_batch": 4, "steps": 2, "seed": 3, "threads": 1}
    _launch(script, tmp_path, case, str(tmp_path), json.dumps(dict(recipe, output_dir=str(tmp_path / "two"))))
    one = moeforge.train(dict(recipe, output_dir=str(tmp_path / "one")))
    two = [json.loads(l)["loss"] for l in open(tmp_path / "two" / "metrics.jsonl") if '"loss"' in l]
    assert two == pytest.approx(one["losses"], rel=1e-5)
    ref = load_file(os.path.join(case, "reference.safetensors"))
    for rank in (0, 1):
        got = json.load(open(tmp_path / f"rank{rank}.json"))
        assert got["rank"] == rank and got["world"] == 2
        assert got["params"] == whole.num_parameters()
        assert got["err"] < 1e-4
        assert got["loss"] == pytest.approx(float(ref["loss"]), abs=1e-5)  # the same tokens, rows reordered
    again = moeforge.AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert np.array_equal(again(ref["input_ids"]).logits, whole(ref["input_ids"]).logits)


def test_generate_with_experts_split_over_ranks(tmp_path):
    """generate() on a model loaded with ep_size=2: each rank its own prompt and length (rank 1 stops
    early and keeps stepping with rank 0), each getting what one process holding every expert gets
    (rank 0: Transformers' greedy ids)."""
    case = os.path.join(FIXTURES, "qwen3_moe_b")
    ref = load_file(os.path.join(case, "generate_reference.safetensors"))
    prompt0, n0 = ref["prompt_ids"].tolist(), len(ref["generated_ids"])
    prompt1, n1 = prompt0[::-1][:3], 2
    whole = moeforge.AutoModelForCausalLM.from_pretrained(case)
    want1 = whole.generate([prompt1], max_new_tokens=n1, do_sample=False, eos_token_id=[])[0].tolist()
    script = ("import json, sys, moeforge\n"
              "case, out = sys.argv[1], sys.argv[2]\n"
              "prompts = json.loads(sys.argv[3])\n"
              "m = moeforge.AutoModelForCausalLM.from_pretrained(case, ep_size=2)\n"
              "p, n = prompts[m.rank]\n"
              "ids = m.generate([p], max_new_tokens=n, do_sample=False, eos_token_id=[])[0].tolist()\n"
              "json.dump(ids, open(out + '/gen%d.json' % m.rank, 'w'))\n")
    _launch(script, tmp_path, case, str(tmp_path), json.dumps([[prompt0, n0], [prompt1, n1]]))
    assert json.load(open(tmp_path / "gen0.json")) == prompt0 + ref["generated_ids"].tolist()
    assert json.load(open(tmp_path / "gen1.json")) == want1


# PEFT's adapters through from_pretrained(adapter=...): per-expert (qwen3_moe_a's lora_experts/) and
# PEFT's fused target_parameters tensors (gpt_oss_a, qwen2_moe_a, nemotron_h_a), against PEFT's logits.
@pytest.mark.parametrize("case", ["qwen3_moe_a", "gpt_oss_a", "qwen2_moe_a", "nemotron_h_a"])
def test_expert_adapters_give_pefts_logits(case):
    folder = os.path.join(FIXTURES, case)
    ref = load_file(os.path.join(folder, "lora_experts", "reference.safetensors"))
    model = moeforge.AutoModelForCausalLM.from_pretrained(folder, adapter=os.path.join(folder, "lora_experts", "adapter_init"))
    got = model(ref["input_ids"]).logits
    scale = max(1.0, float(np.abs(ref["logits"]).max()))
    assert np.abs(got - ref["logits"]).max() < 1e-4 * scale
    plain = moeforge.AutoModelForCausalLM.from_pretrained(folder)(ref["input_ids"]).logits
    assert np.abs(plain - ref["logits"]).max() > 1e-3  # the adapter is what moved them
