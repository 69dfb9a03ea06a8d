#!/usr/bin/env python3
"""Compare moeforge's logits with Hugging Face Transformers' on a model folder.

    moeforge eval --model DIR --tokens T.jsonl --logits-out L.safetensors
    python3 tools/check_hf_logits.py --model DIR --tokens T.jsonl --logits L.safetensors [--tol 1e-4]

Loads DIR with transformers (fp32, eager attention), runs every row of T.jsonl and compares with the
`logits.<row>` tensors moeforge wrote. Prints the max abs difference per row; exits 1 over --tol.
"""
import argparse
import json
import sys

import torch
import transformers
from safetensors.torch import load_file

ap = argparse.ArgumentParser()
ap.add_argument("--model", required=True)
ap.add_argument("--tokens", required=True)
ap.add_argument("--logits", required=True)
ap.add_argument("--tol", type=float, default=1e-4)
args = ap.parse_args()
model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="eager")
model.eval()
ours = load_file(args.logits)
rows = [json.loads(l) for l in open(args.tokens) if l.strip()]
worst = 0.0
for i, row in enumerate(rows):
    ids = torch.tensor([row["input_ids"]])
    with torch.no_grad():
        ref = model(input_ids=ids).logits[0]
    d = (ref - ours[f"logits.{i}"]).abs().max().item()
    worst = max(worst, d)
print(json.dumps({"model": args.model, "rows": len(rows), "max_abs_diff": worst, "tol": args.tol,
                  "transformers": transformers.__version__}))
sys.exit(0 if worst <= args.tol else 1)
