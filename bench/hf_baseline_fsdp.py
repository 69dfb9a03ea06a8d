#!/usr/bin/env python3
"""The multi-GPU baseline of issue 6: Transformers v5 + torch FSDP2 on the same workload as
`moeforge launch --nproc-per-node N -- bench` (shared/BENCHMARKS.md): random init in a config's
architecture, bf16 parameters, sdpa attention, `grouped_mm` experts, every decoder layer and the
root wrapped with fully_shard (parameters, gradients and AdamW state sharded over all ranks; the
experts replicated in the sense that every rank computes every expert for its own tokens), each
rank its own batch of vocab-uniform random tokens, torch.optim.AdamW(fused=True). Start it with
`torchrun --nproc-per-node N bench/hf_baseline_fsdp.py CONFIG ...`. Rank 0 prints a table row and
one JSON line with the same keys as moeforge's; times are the slowest rank's, memory the largest."""
import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import transformers
from torch.distributed.fsdp import fully_shard
from transformers import AutoConfig, AutoModelForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hf_baseline import balanced_gate_forward, best_attention, cut_layers, flops_per_token, mamba_path  # noqa: E402


def max_over_ranks(v):
    t = torch.tensor([float(v)], device="cuda")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--layers", type=int)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--routing", choices=["native", "balanced"], default="native")
    ap.add_argument("--experts", default="grouped_mm", help="experts_implementation")
    ap.add_argument("--seed", type=int, default=1234)
    a = ap.parse_args()

    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = AutoConfig.from_pretrained(a.config)
    if a.layers:
        cut_layers(cfg, a.layers)
    torch.manual_seed(a.seed)  # the same initial weights on every rank
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation=best_attention(cfg), experts_implementation=a.experts,
                                                 dtype=torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    model.train()
    if a.routing == "balanced":
        n = 0
        for mod in model.modules():
            if hasattr(mod, "top_k") and hasattr(mod, "num_experts") and hasattr(mod, "weight") and mod.weight.dim() == 2:
                mod.forward = balanced_gate_forward(mod)
                n += 1
        assert n > 0, "no router found to patch"
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    torch.cuda.empty_cache()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    gen = torch.Generator(device="cuda").manual_seed(a.seed + rank)
    fwd, bwd, optm, step = [], [], [], []
    first = last = None
    torch.cuda.reset_peak_memory_stats()
    peak_used = 0
    for i in range(a.warmup + a.steps):
        ids = torch.randint(0, cfg.vocab_size, (a.batch, a.seq), device="cuda", generator=gen)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        loss.backward()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        t3 = time.perf_counter()
        free, total = torch.cuda.mem_get_info()
        peak_used = max(peak_used, total - free)
        lv = loss.item()
        first = lv if first is None else first
        last = lv
        if rank == 0:
            print(f"  step {i + 1}/{a.warmup + a.steps}  loss {lv:.4f}  {(t3 - t0) * 1e3:.1f} ms", file=sys.stderr)
        if i >= a.warmup:
            fwd.append((t1 - t0) * 1e3)
            bwd.append((t2 - t1) * 1e3)
            optm.append((t3 - t2) * 1e3)
            step.append((t3 - t0) * 1e3)
    gib = 1024 ** 3
    step_ms = max_over_ranks(statistics.median(step))
    tps = a.batch * a.seq / (step_ms / 1e3)
    r = {
        "impl": "transformers+fsdp2", "transformers": transformers.__version__, "torch": torch.__version__,
        "device": torch.cuda.get_device_name(), "gpus": world, "config": a.config, "layers": cfg.num_hidden_layers,
        **({"mamba_path": mamba_path()} if cfg.model_type == "nemotron_h" else {}),
        "params": params, "seq": a.seq, "batch": a.batch, "routing": a.routing, "precision": "bf16",
        "experts_implementation": a.experts, "attn_implementation": best_attention(cfg), "steps": a.steps, "warmup": a.warmup, "tokens_per_s_per_gpu": tps,
        "model_tflops_per_gpu": flops_per_token(cfg, a.seq) * tps / 1e12, "flops_per_token": flops_per_token(cfg, a.seq),
        "peak_allocated_gib": max_over_ranks(torch.cuda.max_memory_allocated() / gib),
        "peak_reserved_gib": max_over_ranks(torch.cuda.max_memory_reserved() / gib),
        "device_used_gib": max_over_ranks(peak_used / gib),
        "fwd_loss_ms": max_over_ranks(statistics.median(fwd)), "bwd_ms": max_over_ranks(statistics.median(bwd)),
        "optimizer_ms": max_over_ranks(statistics.median(optm)), "step_ms": step_ms, "first_loss": first,
        "last_loss": last,
    }
    if rank == 0:
        print(f"{'transformers+fsdp2':<14} {tps:10.0f} {r['model_tflops_per_gpu']:8.1f} {r['peak_allocated_gib']:9.2f} "
              f"{r['peak_reserved_gib']:9.2f} {r['device_used_gib']:9.2f} {r['fwd_loss_ms']:9.1f} {r['bwd_ms']:8.1f} "
              f"{r['optimizer_ms']:8.1f} {step_ms:8.1f}")
        print(json.dumps(r))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
