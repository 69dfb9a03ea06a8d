#!/usr/bin/env python3
"""The training-step benchmark of shared/BENCHMARKS.md in NVIDIA NeMo AutoModel (nemo-automodel
0.7.0): the same workload as `moeforge bench` and bench/hf_baseline.py (random init in a config's
architecture, vocab-uniform random tokens, forward + loss, backward, AdamW), with NeMo AutoModel's
own Qwen3-MoE model class and the backends this machine has (printed in the row: TransformerEngine
and DeepEP where installed, else torch sdpa attention, torch._grouped_mm experts and the torch
dispatcher). Balanced routing is NeMo's own FakeBalancedGate (its benchmarks' method). One process,
one GPU; bf16 parameters and torch.optim.AdamW(fused=True) as in hf_baseline.py. Prints a table row
and one JSON line with the same keys as moeforge's.

On the GPU machine (no PyPI) NeMo AutoModel and what it needs beyond the machine's venv travel as
wheels: tools/gpu/fetch_nemo_wheels.sh, then `bash tools/gpu/run.sh nemo CONFIG ARGS`."""
import argparse
import importlib.util
import json
import statistics
import sys
import time

import torch

sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.abspath(__file__)))
from hf_baseline import flops_per_token  # noqa: E402  (the same FLOP count as every other row)


def backends(device):
    """The fastest of NeMo AutoModel's backends that import here (its defaults pick TE when present)."""
    from nemo_automodel.components.models.common.utils import BackendConfig
    have_te = importlib.util.find_spec("transformer_engine") is not None and device == "cuda"
    return BackendConfig(attn="te" if have_te else "sdpa", linear="te" if have_te else "torch",
                         rms_norm="te" if have_te else "torch", experts="torch_mm", dispatcher="torch",
                         rope_fusion=False, enable_hf_state_dict_adapter=False)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config", help="a Qwen3-MoE config.json (or a folder holding one)")
    ap.add_argument("--layers", type=int)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--routing", choices=["native", "balanced"], default="native")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (a smoke test of this script)")
    a = ap.parse_args()

    import nemo_automodel
    from nemo_automodel.components.models.qwen3_moe.model import Qwen3MoeForCausalLM
    from transformers import AutoConfig
    import transformers

    cfg = AutoConfig.from_pretrained(a.config)
    if cfg.model_type != "qwen3_moe":
        sys.exit(f"nemo_baseline.py: {a.config}: model_type {cfg.model_type!r}; this baseline covers qwen3_moe")
    if a.layers:
        cfg.num_hidden_layers = a.layers
        if isinstance(getattr(cfg, "layer_types", None), list):
            cfg.layer_types = cfg.layer_types[:a.layers]
    try:  # the model's parameter dtype (NeMo reads torch_dtype; Transformers 5 spells it dtype)
        cfg.dtype = torch.bfloat16
        cfg.torch_dtype = torch.bfloat16
    except AttributeError:
        pass
    dev = torch.device(a.device)
    on_gpu = dev.type == "cuda"
    be = backends(a.device)
    be.fake_balanced_gate = a.routing == "balanced"
    torch.manual_seed(a.seed)
    with dev:
        model = Qwen3MoeForCausalLM.from_config(cfg, backend=be)
    model.initialize_weights(buffer_device=dev, dtype=torch.bfloat16)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=on_gpu)
    gen = torch.Generator(device=dev).manual_seed(a.seed)
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    fwd, bwd, optm, step = [], [], [], []
    first = last = None
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    peak_used = 0
    for i in range(a.warmup + a.steps):
        ids = torch.randint(0, cfg.vocab_size, (a.batch, a.seq), device=dev, generator=gen)
        sync()
        t0 = time.perf_counter()
        logits = model(ids).logits
        # Transformers' causal-LM loss: position t predicts token t + 1, in fp32.
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        sync()
        t1 = time.perf_counter()
        loss.backward()
        sync()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        t3 = time.perf_counter()
        if on_gpu:
            free, total = torch.cuda.mem_get_info()
            peak_used = max(peak_used, total - free)
        lv = loss.item()
        first = lv if first is None else first
        last = lv
        print(f"  step {i + 1}/{a.warmup + a.steps}  loss {lv:.4f}  {(t3 - t0) * 1e3:.1f} ms", file=sys.stderr)
        if i >= a.warmup:
            fwd.append((t1 - t0) * 1e3)
            bwd.append((t2 - t1) * 1e3)
            optm.append((t3 - t2) * 1e3)
            step.append((t3 - t0) * 1e3)
    step_ms = statistics.median(step)
    tps = a.batch * a.seq / (step_ms / 1e3)
    gib = 1024 ** 3
    fpt = flops_per_token(cfg, a.seq)
    r = {
        "impl": "nemo_automodel", "nemo_automodel": nemo_automodel.__version__, "transformers": transformers.__version__,
        "torch": torch.__version__, "device": torch.cuda.get_device_name() if on_gpu else "cpu", "config": a.config,
        "layers": cfg.num_hidden_layers, "params": sum(p.numel() for p in model.parameters()),
        "param_dtypes": {str(d).replace("torch.", ""): sum(p.numel() for p in model.parameters() if p.dtype == d)
                         for d in {p.dtype for p in model.parameters()}},
        "seq": a.seq, "batch": a.batch, "routing": a.routing, "precision": "bf16",
        "backends": {"attn": be.attn, "linear": be.linear, "rms_norm": be.rms_norm, "experts": be.experts,
                     "dispatcher": be.dispatcher, "fake_balanced_gate": be.fake_balanced_gate},
        "steps": a.steps, "warmup": a.warmup, "tokens_per_s_per_gpu": tps, "model_tflops_per_gpu": fpt * tps / 1e12,
        "flops_per_token": fpt,
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / gib if on_gpu else 0.0,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / gib if on_gpu else 0.0, "device_used_gib": peak_used / gib,
        "fwd_loss_ms": statistics.median(fwd), "bwd_ms": statistics.median(bwd),
        "optimizer_ms": statistics.median(optm), "step_ms": step_ms, "first_loss": first, "last_loss": last,
    }
    print(f"{'nemo_automodel':<14} {tps:10.0f} {r['model_tflops_per_gpu']:8.1f} {r['peak_allocated_gib']:9.2f} "
          f"{r['peak_reserved_gib']:9.2f} {r['device_used_gib']:9.2f} {r['fwd_loss_ms']:9.1f} {r['bwd_ms']:8.1f} "
          f"{r['optimizer_ms']:8.1f} {step_ms:8.1f}")
    print(json.dumps(r))


if __name__ == "__main__":
    main()
