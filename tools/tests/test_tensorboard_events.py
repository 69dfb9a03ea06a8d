"""moeforge's TensorBoard event files, read back with the tensorboard package itself: every value
logged to metrics.jsonl appears under its TensorBoard tag at the same step (float32-rounded)."""
import json
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.environ.get("MOEFORGE_BIN", os.path.join(ROOT, "build", "moeforge"))

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def test_training_scalars_round_trip(tmp_path):
    out = tmp_path / "run"
    subprocess.run([BIN, "train", os.path.join(ROOT, "examples", "demo_recipe.yaml"), f"output_dir={out}",
                    "steps=12", "log_every=3", "eval_every=6", "report_to=tensorboard", "save_best=false"],
                   check=True, capture_output=True)
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in train] == [3, 6, 9, 12]
    assert [r["step"] for r in evals] == [6, 12]

    acc = event_accumulator.EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/learning_rate", "train/grad_norm", "eval/loss", "eval/perplexity"} <= tags
    for tag, key, rows in (("train/loss", "loss", train), ("train/learning_rate", "lr", train),
                           ("train/grad_norm", "grad_norm", train), ("eval/loss", "eval_loss", evals)):
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert [s for s, _ in got] == [r["step"] for r in rows], tag
        for (_, v), r in zip(got, rows):
            assert v == pytest.approx(r[key], rel=1e-6, abs=1e-12), tag
