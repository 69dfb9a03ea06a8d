"""Fuzzing the command line: every command's valid invocation, mutated (a value swapped for a hostile
one, a value or a required option dropped, an option repeated, an unknown one added, the order
shuffled), run as a process. Whatever the arguments, moeforge must end by itself with 0 (it ran),
1 (a clear error) or 2 (a usage error): never a signal, a hang, or a library's message leaking out
(`std::`, `what():`, `stoi`, `terminate called`). Seeded and deterministic; MOEFORGE_CLI_FUZZ_CASES
raises the number of cases (default 160, a few tens of seconds), MOEFORGE_CLI_FUZZ_SEED the seed."""
import json
import os
import random
import shlex
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.environ.get("MOEFORGE_BIN", os.path.join(ROOT, "build", "moeforge"))
if not os.path.isabs(BIN):
    BIN = os.path.join(ROOT, BIN)
CASES = int(os.environ.get("MOEFORGE_CLI_FUZZ_CASES", "160"))
SEED = int(os.environ.get("MOEFORGE_CLI_FUZZ_SEED", "20261205"))
DEMO = os.path.join(ROOT, "examples", "demo_model")
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "qwen3_moe_a")

# Values a hostile or careless user passes: empty, signs, overflow, non-finite, hex, junk, huge,
# paths that are not what was asked for.
HOSTILE = ["", "-1", "0", "-0", "1e308", "-1e308", "nan", "inf", "-inf", "99999999999999999999999", "0x10", "1.5",
           "abc", ",", "1,,2", "=", "--", "-", "9" * 4000, "\u00fc\u6f22\u5b57", "/nonexistent/x", "/dev/null", "/",
           "true", "[1,2]", "{\"a\":", "\\", "'", "\"", " ", "\t1"]
LEAKS = ["std::", "what():", "stoi", "stol", "terminate called", "basic_string", "bad_alloc", "Segmentation",
         "vector::", "nlohmann", "YAML::", "CLI::"]


def _bases(tmp):
    """(command argv, options that take a value) per command: each valid as written."""
    run_dir = os.path.join(tmp, "run")
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        for s in range(1, 6):
            f.write(json.dumps({"step": s, "loss": 5.0 / s, "lr": 1e-3, "grad_norm": 1.0}) + "\n")
    rows = os.path.join(tmp, "rows.jsonl")
    with open(rows, "w") as f:
        f.write(json.dumps({"text": "Count from 3 to 5."}) + "\n")
    prompts = os.path.join(tmp, "prompts.jsonl")
    with open(prompts, "w") as f:
        f.write(json.dumps({"prompt": "Count from 3 to 5."}) + "\n" + json.dumps({"prompt_ids": [5, 6, 7]}) + "\n")
    parquet = os.path.join(ROOT, "tests", "fixtures", "parquet", "text_snappy.parquet")
    return [
        (["eval", "--model", DEMO, "--data", parquet, "--summary", "--threads", "1"], ["--model", "--data", "--threads"]),
        (["dataset", "--model", DEMO, "--data", parquet, "--seq-len", "16", "--show", "1", "--json"],
         ["--model", "--data", "--seq-len", "--show"]),
        (["generate", "--model", DEMO, "--prompts", prompts, "--batch-size", "2", "--max-new-tokens", "3", "--threads", "1"],
         ["--prompts", "--batch-size", "--max-new-tokens", "--threads"]),
        (["inspect", FIXTURE, "--gpus", "2", "--ep-size", "2"], ["--gpus", "--ep-size"]),
        (["convert", "--model", FIXTURE, "--out", os.path.join(tmp, "conv"), "--max-shard-size", "10KB", "--overwrite"],
         ["--model", "--out", "--max-shard-size"]),
        (["tokenize", "--tokenizer", DEMO, "--text", "Count from 3 to 5."], ["--tokenizer", "--text"]),
        (["tokenize", "--tokenizer", DEMO, "--decode", "5,6,7"], ["--tokenizer", "--decode"]),
        (["eval", "--model", DEMO, "--data", rows, "--summary", "--threads", "1"], ["--model", "--data", "--threads"]),
        (["generate", "--model", DEMO, "--prompt", "Count from 3 to 5.", "--max-new-tokens", "4", "--top-k", "3",
          "--top-p", "0.9", "--temperature", "0.7", "--seed", "3", "--threads", "1", "--json"],
         ["--model", "--prompt", "--max-new-tokens", "--top-k", "--top-p", "--temperature", "--seed", "--threads"]),
        (["generate", "--model", DEMO, "--prompt-ids", "5,6,7", "--max-new-tokens", "3", "--repetition-penalty", "1.2",
          "--min-new-tokens", "1", "--stop", "9", "--threads", "1"],
         ["--prompt-ids", "--max-new-tokens", "--repetition-penalty", "--min-new-tokens", "--stop"]),
        (["bench", os.path.join(FIXTURE, "config.json"), "--seq", "16", "--steps", "1", "--warmup", "0", "--layers", "1",
          "--precision", "fp32"], ["--seq", "--steps", "--warmup", "--layers", "--precision", "--batch", "--routing"]),
        (["plot", run_dir, "-o", os.path.join(tmp, "p.png"), "--width", "400"], ["-o", "--width"]),
        (["train", os.path.join(ROOT, "examples", "demo_recipe.yaml"), "steps=1", "output_dir=" + os.path.join(tmp, "t"),
          "overwrite=true", "threads=1"], []),
        (["merge", "--model", FIXTURE, "--adapter", os.path.join(FIXTURE, "lora", "adapter_init"), "--out",
          os.path.join(tmp, "merged"), "--overwrite"], ["--model", "--adapter", "--out"]),
        (["help", "generate"], []),
    ]


def _mutate(rng, argv, valued):
    argv = list(argv)
    for _ in range(rng.randint(1, 3)):
        kind = rng.choice(["value", "value", "value", "drop_value", "drop_option", "repeat", "unknown", "shuffle",
                           "override"])
        flags = [i for i, a in enumerate(argv) if a in valued and i + 1 < len(argv)]
        if kind == "value" and flags:
            argv[rng.choice(flags) + 1] = rng.choice(HOSTILE)
        elif kind == "drop_value" and flags:
            del argv[rng.choice(flags) + 1]
        elif kind == "drop_option" and flags:
            i = rng.choice(flags)
            del argv[i:i + 2]
        elif kind == "repeat" and flags:
            i = rng.choice(flags)
            argv += [argv[i], rng.choice(HOSTILE)]
        elif kind == "unknown":
            argv.insert(rng.randint(1, len(argv)), rng.choice(["--bogus", "-x", "--", "key=value", "--json=3"]))
        elif kind == "shuffle" and len(argv) > 2:
            rest = argv[1:]
            rng.shuffle(rest)
            argv = argv[:1] + rest
        elif kind == "override" and argv[0] == "train":
            # A recipe key set to a hostile value (work-sized keys keep theirs: the case must end).
            key = rng.choice(["optimizer.lr", "seq_len", "micro_batch", "global_batch", "seed", "warmup_steps",
                              "max_grad_norm", "lr_scheduler", "precision", "device", "packing", "nope", "data"])
            argv.append(f"{key}={rng.choice(HOSTILE)}")
    return argv


def test_mutated_command_lines_end_cleanly(tmp_path):
    if not os.path.exists(BIN):
        pytest.skip(f"{BIN} is not built")
    rng = random.Random(SEED)
    bases = _bases(str(tmp_path))
    failures = []
    for case in range(CASES):
        argv, valued = bases[case % len(bases)]
        argv = _mutate(rng, argv, valued)
        cmd = [BIN] + argv
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=120, cwd=str(tmp_path),
                               env=dict(os.environ, OMP_NUM_THREADS="1"))
        except subprocess.TimeoutExpired:
            failures.append(f"hang (120 s): {shlex.join(cmd)}")
            continue
        if r.returncode not in (0, 1, 2):
            failures.append(f"exit {r.returncode}: {shlex.join(cmd)}\n{r.stderr[-500:]}")
            continue
        if r.returncode != 0:
            lines = [l for l in r.stderr.splitlines() if l.strip()]
            if not lines:
                failures.append(f"exit {r.returncode} without a message: {shlex.join(cmd)}")
            leak = [w for w in LEAKS if w in r.stderr]
            if leak:
                failures.append(f"library message ({leak}): {shlex.join(cmd)}\n{r.stderr[-500:]}")
    assert not failures, f"{len(failures)} of {CASES} cases:\n" + "\n\n".join(failures[:10])
