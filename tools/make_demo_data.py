#!/usr/bin/env python3
"""Write the demo's tiny pre-tokenized dataset: arithmetic progressions modulo the vocabulary
(start a, stride d: a, a+d, a+2d, ...), which a tiny model learns within a few hundred steps.

    python3 tools/make_demo_data.py --vocab 128 --rows 512 --len 24 --out examples/data/arith.jsonl
"""
import argparse
import json
import random

ap = argparse.ArgumentParser()
ap.add_argument("--vocab", type=int, default=128)
ap.add_argument("--rows", type=int, default=512)
ap.add_argument("--len", type=int, default=24)
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--out", required=True)
args = ap.parse_args()
rng = random.Random(args.seed)
with open(args.out, "w") as f:
    for _ in range(args.rows):
        a, d = rng.randrange(args.vocab), rng.randrange(1, 9)
        f.write(json.dumps({"input_ids": [(a + i * d) % args.vocab for i in range(args.len)]}) + "\n")
