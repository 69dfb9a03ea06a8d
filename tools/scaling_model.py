#!/usr/bin/env python3
"""A scaling model for moeforge's expert-parallel training step (issue 21): predicts tokens/s per
GPU at 2, 4, 8, 16 (two nodes) and 64 GPUs from quantities measured on 1 and 2 GPUs
(docs/benchmarks.md, docs/perf-notes.md), to be compared with the runs when such machines are lent.

Per layer and step (T tokens per GPU, top-k, hidden H, bf16):
  compute        the measured per-layer step time at EP 2 less its measured exchange (the expert
                 GEMMs do the same rows per GPU whatever the EP size), plus the expert AdamW that
                 EP e removes (each GPU updates E/e experts)
  exchange       4 all-to-alls (dispatch, combine, and their backward), each: a fixed cost (host
                 synchronisation of the counts, routing plan, the receive-side reorder) measured as
                 the 2-GPU residual, plus the bytes leaving the GPU, T*k*H*2*(e-1)/e, at the link's
                 bandwidth (on-node NVLink; off-node peers' share at the network's)
  dense sync     one all-reduce of the layer's dense gradients over the data-parallel ranks (ring:
                 2 (n-1)/n of the bytes), and of the experts' gradients over replicas when EP < GPUs
Nothing overlaps in the first column ("as built": today's code); the second hides the exchange and the
gradient sums behind compute ("perfect overlap": the ceiling of issue 21's overlap work).

    python3 tools/scaling_model.py            # the table for q30 (Qwen3-30B-A3B, 48 layers, seq 4096)
"""
import argparse

GB = 1e9


def ring_ms(nbytes, n, bw_gbs):
    """A ring all-reduce of nbytes over n ranks: 2 (n-1)/n of the bytes through each rank's link."""
    return 0.0 if n <= 1 else 1e3 * 2 * (n - 1) / n * nbytes / (bw_gbs * GB)


def layer_parts(gpus, ep, nodes, a):
    """(compute-only ms, exchange ms, gradient-sum ms) of one layer on `gpus` GPUs over `nodes` nodes."""
    per_node = gpus // nodes
    rows_bytes = a.tokens * a.top_k * a.hidden * 2          # one direction of one exchange, all destinations
    on_node = rows_bytes * (min(ep, per_node) - 1) / ep      # to the EP peers on this node (NVLink)
    off_node = rows_bytes * (ep - min(ep, per_node)) / ep    # to those on other nodes (the network)
    a2a = a.a2a_fixed_ms + 1e3 * max(on_node / (a.nvlink_gbs * GB), off_node / (a.net_gbs * GB))
    exchange = 4 * a2a
    net = nodes > 1
    dense = ring_ms(a.dense_params_per_layer * 2, gpus, a.net_gbs if net else a.nvlink_gbs)
    replicas = gpus // ep                                     # copies of each expert shard (data parallel)
    experts = ring_ms(a.expert_params_per_layer / ep * 2, replicas, a.net_gbs if replicas > 1 and net else a.nvlink_gbs)
    adamw = a.expert_params_per_layer / ep * a.adamw_ns_per_param * 1e-6
    return a.compute_ms + adamw, exchange, dense + experts


def predict(gpus, ep, nodes, a):
    """Step ms per GPU: (as built, perfect overlap)."""
    compute, exchange, sums = layer_parts(gpus, ep, nodes, a)
    built = a.layers * (compute + exchange + sums) + a.head_ms
    overlap = a.layers * max(compute, exchange + sums) + a.head_ms
    return built, overlap


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per GPU per step")
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--expert-params-per-layer", type=float, default=128 * 3 * 2048 * 768)
    ap.add_argument("--dense-params-per-layer", type=float, default=18.9e6 + 0.26e6)
    # Measured (2 H200s, NVLink, commit 89e5b27-6c9dfa8; docs/benchmarks.md and docs/perf-notes.md):
    ap.add_argument("--step-ms-ep2", type=float, default=453.0, help="q30 48 layers EP 2 balanced: 453 ms per step")
    ap.add_argument("--exchange-ms-ep2", type=float, default=(6.96 + 5.43 + 4.32 + 5.83) / 8,
                    help="MOEFORGE_PHASE_TIMES, 8 layers: the four exchanges' phases per layer")
    ap.add_argument("--adamw-ns-per-param", type=float, default=17.0e6 / 5.3e9,
                    help="one GPU, q30-L8: ~17 ms of AdamW for 5.3B parameters")
    ap.add_argument("--nvlink-gbs", type=float, default=447.0,
                    help="all_to_all_single: 67 MB per peer in 0.15 ms on the 2-GPU NVLink pair")
    ap.add_argument("--net-gbs", type=float, default=50.0, help="400 Gb/s per GPU between nodes (assumed)")
    ap.add_argument("--head-ms", type=float, default=12.0, help="embedding, LM head and loss (assumed from 1-GPU phases)")
    a = ap.parse_args()
    # Calibration on the 2-GPU run: the fixed cost of one all-to-all is the measured exchange less its
    # bytes at NVLink bandwidth; the compute-only time per layer is the measured step less the head,
    # the exchange, the 2-GPU gradient sum and half the experts' AdamW.
    rows_bytes = a.tokens * a.top_k * a.hidden * 2
    a.a2a_fixed_ms = a.exchange_ms_ep2 / 4 - 1e3 * rows_bytes / 2 / (a.nvlink_gbs * GB)
    a.compute_ms = 0.0
    _, _, sums2 = layer_parts(2, 2, 1, a)
    a.compute_ms = ((a.step_ms_ep2 - a.head_ms) / a.layers - a.exchange_ms_ep2 - sums2
                    - a.expert_params_per_layer / 2 * a.adamw_ns_per_param * 1e-6)
    print(f"calibrated on 2 GPUs: compute {a.compute_ms:.2f} ms per layer (without expert AdamW), "
          f"a fixed {a.a2a_fixed_ms:.3f} ms per all-to-all; one exchange direction moves {rows_bytes / 1e6:.0f} MB")
    print(f"{'GPUs':>5} {'nodes':>5} {'EP':>4} | {'step ms':>8} {'tok/s/GPU':>10} | {'overlap ms':>10} {'tok/s/GPU':>10}")
    for gpus, ep, nodes in [(2, 2, 1), (4, 4, 1), (8, 8, 1), (16, 16, 2), (16, 8, 2), (64, 8, 8), (64, 64, 8)]:
        built, overlap = predict(gpus, ep, nodes, a)
        print(f"{gpus:>5} {nodes:>5} {ep:>4} | {built:8.0f} {a.tokens / built * 1e3:10,.0f} | {overlap:10.0f} "
              f"{a.tokens / overlap * 1e3:10,.0f}")


if __name__ == "__main__":
    main()
