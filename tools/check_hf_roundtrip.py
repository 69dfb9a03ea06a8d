#!/usr/bin/env python3
"""Check that folders written by `moeforge convert` load in Hugging Face Transformers with the same
logits as the folders they came from.

    python3 tools/check_hf_roundtrip.py --moeforge build/moeforge --fixtures tests/fixtures --work /tmp/rt

For every fixture with a reference.safetensors: run `moeforge convert` into --work, load both the
source and the converted folder with transformers in fp32, and compare logits on the reference
input_ids. Exits non-zero if any difference exceeds 1e-5 or a tensor name differs.
"""
import argparse
import json
import os
import subprocess
import sys

import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file


def tensor_names(folder):
    names = set()
    for fn in os.listdir(folder):
        if fn.endswith(".safetensors") and not fn.startswith("reference"):
            with safe_open(os.path.join(folder, fn), "pt") as f:
                names |= set(f.keys())
    return names


def logits(folder, ids):
    m = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    m.config._experts_implementation = "eager"  # grouped_mm needs 16-byte strides the tiny fixtures lack
    m.eval()
    with torch.no_grad():
        return m(input_ids=ids).logits


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--moeforge", required=True)
    ap.add_argument("--fixtures", required=True)
    ap.add_argument("--work", required=True)
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    worst, ok = 0.0, True
    results = {}
    for case in sorted(os.listdir(args.fixtures)):
        src = os.path.join(args.fixtures, case)
        if not os.path.exists(os.path.join(src, "reference.safetensors")):
            continue
        out = os.path.join(args.work, case)
        conv = subprocess.run([args.moeforge, "convert", "--model", src, "--out", out, "--overwrite"],
                              capture_output=True, text=True)
        if conv.returncode != 0:
            if "is not supported" in conv.stderr:  # a family moeforge does not build yet: reported, not passed
                print(f"{case}: SKIPPED, {conv.stderr.strip()}")
                results[case] = {"skipped": conv.stderr.strip()}
                continue
            print(conv.stderr, file=sys.stderr)
            return 1
        ref = load_file(os.path.join(src, "reference.safetensors"))
        a, b = logits(src, ref["input_ids"]), logits(out, ref["input_ids"])
        d = (a - b).abs().max().item()
        # Fixtures whose reference is a training run only (deepseek_v3_mtp) have no logits.
        d_ref = (b - ref["logits"]).abs().max().item() if "logits" in ref else float("nan")
        same_names = tensor_names(src) == tensor_names(out)
        results[case] = {"max_abs_diff_vs_source_in_transformers": d, "max_abs_diff_vs_reference": d_ref,
                         "same_tensor_names": same_names}
        print(f"{case}: transformers logits, converted vs source max|diff| = {d:.3g}; "
              f"vs committed reference {d_ref:.3g}; same tensor names: {same_names}")
        worst = max(worst, d)
        ok = ok and same_names and d <= 1e-5
    print(json.dumps({"transformers": transformers.__version__, "results": results}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
