"""The timed training-step loop and the result row shared by the Python baselines
(bench/hf_baseline.py, bench/nemo_baseline.py): the same measurement as `moeforge bench`
(shared/BENCHMARKS.md): vocab-uniform random tokens per step, forward + loss, backward, the
optimizer step, each phase timed between device synchronisations, medians over the timed steps
after the warm-up ones, peak memory from torch's allocator and the device's used memory."""
import statistics
import sys
import time

import torch

GIB = 1024 ** 3


def time_steps(forward_loss, optimizer, vocab, batch, seq, warmup, steps, device, seed):
    """Runs warmup + steps training steps of forward_loss(ids) -> scalar loss, backward and
    optimizer (zero_grad after each step); returns the timing and loss fields of the row."""
    on_gpu = torch.device(device).type == "cuda"
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    gen = torch.Generator(device=device).manual_seed(seed)
    fwd, bwd, opt, step = [], [], [], []
    first = last = None
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    peak_used = 0
    for i in range(warmup + steps):
        ids = torch.randint(0, vocab, (batch, seq), device=device, generator=gen)
        sync()
        t0 = time.perf_counter()
        loss = forward_loss(ids)
        sync()
        t1 = time.perf_counter()
        loss.backward()
        sync()
        t2 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        t3 = time.perf_counter()
        if on_gpu:
            free, total = torch.cuda.mem_get_info()
            peak_used = max(peak_used, total - free)
        lv = loss.item()
        first = lv if first is None else first
        last = lv
        print(f"  step {i + 1}/{warmup + steps}  loss {lv:.4f}  {(t3 - t0) * 1e3:.1f} ms", file=sys.stderr)
        if i >= warmup:
            fwd.append((t1 - t0) * 1e3)
            bwd.append((t2 - t1) * 1e3)
            opt.append((t3 - t2) * 1e3)
            step.append((t3 - t0) * 1e3)
    step_ms = statistics.median(step)
    return {
        "steps": steps, "warmup": warmup,
        "tokens_per_s_per_gpu": batch * seq / (step_ms / 1e3),
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / GIB if on_gpu else 0.0,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB if on_gpu else 0.0,
        "device_used_gib": peak_used / GIB,
        "fwd_loss_ms": statistics.median(fwd), "bwd_ms": statistics.median(bwd),
        "optimizer_ms": statistics.median(opt), "step_ms": step_ms, "first_loss": first, "last_loss": last,
    }


def with_flops(row, flops_per_token):
    """The row with the model FLOPs per token and the TFLOP/s they make at its tokens/s."""
    row["flops_per_token"] = flops_per_token
    row["model_tflops_per_gpu"] = flops_per_token * row["tokens_per_s_per_gpu"] / 1e12
    return row


def print_row(impl, r):
    """The table line (the columns of `moeforge bench`'s) and then the row as one JSON line."""
    import json
    print(f"{impl:<14} {r['tokens_per_s_per_gpu']:10.0f} {r['model_tflops_per_gpu']:8.1f} {r['peak_allocated_gib']:9.2f} "
          f"{r['peak_reserved_gib']:9.2f} {r['device_used_gib']:9.2f} {r['fwd_loss_ms']:9.1f} {r['bwd_ms']:8.1f} "
          f"{r['optimizer_ms']:8.1f} {r['step_ms']:8.1f}")
    print(json.dumps(r))
