#!/usr/bin/env python3
"""Check that LoRA adapters written by `moeforge train` load in PEFT with the logits moeforge computes.

    python3 tools/check_peft_roundtrip.py --moeforge build/moeforge --fixtures tests/fixtures --work /tmp/prt

For each case (a fixture and its targets, experts included: per expert where PEFT maps per-expert
names onto the fused experts, else PEFT's target_parameters on the fused 3-D weights):
train a few LoRA steps with `moeforge train` (its final/ is a PEFT adapter folder), then
  - load base + adapter with PeftModel.from_pretrained (fp32) and compare its logits with
    `moeforge eval --adapter` on the same tokens (1e-4 of the largest logit);
  - `moeforge merge` the adapter and compare Transformers' logits of the merged folder, and PEFT's
    own merge_and_unload weights, with the same.
Exits non-zero on any mismatch.
"""
import argparse
import json
import os
import subprocess
import sys

import torch
import transformers
from peft import PeftModel
from safetensors.torch import load_file

CASES = {
    "llama_a": "[all-linear]",
    "qwen3_moe_a": "[q_proj, v_proj, o_proj, experts]",
    "deepseek_v3_a": "[q_a_proj, kv_b_proj, o_proj, experts]",
    "mixtral_a": "[q_proj, k_proj, experts]",
    "olmoe_a": "[q_proj, experts]",
    "nemotron_h_a": "[in_proj, q_proj, shared_experts, experts]",
    # Fused expert adapters (PEFT's target_parameters on the 3-D expert weights)
    "gpt_oss_a": "[q_proj, experts]",
    "qwen2_moe_a": "[o_proj, experts]",
}


def load(folder):
    m = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    m.config._experts_implementation = "eager"  # grouped_mm needs 16-byte strides the tiny fixtures lack
    return m.eval()


def moeforge_logits(exe, model, tokens, out, adapter=None):
    cmd = [exe, "eval", "--model", model, "--tokens", tokens, "--logits-out", out]
    if adapter:
        cmd += ["--adapter", adapter]
    subprocess.run(cmd, check=True, capture_output=True)
    t = load_file(out)
    return torch.stack([t[f"logits.{i}"] for i in range(len(t))])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--moeforge", required=True)
    ap.add_argument("--fixtures", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--data", default=None, help="training jsonl (default: tests/data/arith64.jsonl)")
    a = ap.parse_args()
    data = os.path.abspath(a.data or os.path.join(os.path.dirname(os.path.abspath(a.fixtures)), "data", "arith64.jsonl"))
    os.makedirs(a.work, exist_ok=True)
    failed = []
    for name, targets in CASES.items():
        # Absolute paths: the recipe's relative paths resolve from the recipe's folder.
        base = os.path.abspath(os.path.join(a.fixtures, name))
        work = os.path.abspath(os.path.join(a.work, name))
        os.makedirs(work, exist_ok=True)
        recipe = os.path.join(work, "recipe.yaml")
        with open(recipe, "w") as f:
            f.write(f"model: {base}\ndata: {data}\noutput_dir: {work}/out\noverwrite: true\nseq_len: 16\n"
                    f"micro_batch: 2\nglobal_batch: 2\nsteps: 3\noptimizer:\n  lr: 5.0e-2\nseed: 1\n"
                    f"peft:\n  method: lora\n  rank: 2\n  alpha: 4\n  target_modules: {targets}\n")
        r = subprocess.run([a.moeforge, "train", recipe], capture_output=True, text=True)
        if r.returncode != 0:
            print(f"{name}: moeforge train failed: {r.stderr.strip()}")
            failed.append(name)
            continue
        adapter = os.path.join(work, "out", "final")
        ids = load_file(os.path.join(base, "reference.safetensors"))["input_ids"]
        tokens = os.path.join(work, "tokens.jsonl")
        with open(tokens, "w") as f:
            for row in ids.tolist():
                f.write(json.dumps({"input_ids": row}) + "\n")
        mf = moeforge_logits(a.moeforge, base, tokens, os.path.join(work, "mf.safetensors"), adapter)
        peft_model = PeftModel.from_pretrained(load(base), adapter).eval()
        with torch.no_grad():
            pe = peft_model(input_ids=ids).logits
        scale = max(1.0, pe.abs().max().item())
        with torch.no_grad():
            plain = load(base)(input_ids=ids).logits
        merged_dir = os.path.join(work, "merged")
        subprocess.run([a.moeforge, "merge", "--model", base, "--adapter", adapter, "--out", merged_dir, "--overwrite"],
                       check=True, capture_output=True)
        with torch.no_grad():
            me = load(merged_dir)(input_ids=ids).logits
            pm = peft_model.merge_and_unload()(input_ids=ids).logits
        d_peft, d_merge, d_peft_merge = [(x - pe).abs().max().item() / scale for x in (mf, me, pm)]
        moved = (plain - pe).abs().max().item() / scale
        ok = max(d_peft, d_merge, d_peft_merge) < 1e-4 and moved > 1e-4
        print(f"{name:16s} targets {targets:40s} moeforge vs PEFT {d_peft:.2e}, merged {d_merge:.2e}, "
              f"PEFT merged {d_peft_merge:.2e}, adapter moved logits {moved:.2e}  {'ok' if ok else 'MISMATCH'}")
        if not ok:
            failed.append(name)
    print("transformers", transformers.__version__, "peft", __import__("peft").__version__, "failed:", failed)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
