#!/usr/bin/env python3
"""The training-step benchmark of shared/BENCHMARKS.md in Hugging Face Transformers v5: the same
workload as `moeforge bench` (random init in a config's architecture, vocab-uniform random tokens,
forward + loss, backward, AdamW), bf16 parameters, sdpa attention (flex attention where the
model class has no sdpa path: GPT-OSS), `grouped_mm` experts,
torch.optim.AdamW(fused=True) on the bf16 parameters (so its moments are bf16 too). Prints a
table row and one JSON line with the same keys as moeforge's.

Balanced routing replaces each router's top-k choice with the round-robin assignment
(token t's slot j -> expert (t*k + j) mod E); the weights are still the router's probabilities
at those experts, so the router trains, as in moeforge."""
import argparse
import os
import sys

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step_timing import print_row, time_steps, with_flops  # noqa: E402


def mamba_path():
    """Which Mamba2 implementation Transformers runs: the hub's or mamba_ssm's CUDA kernels when
    either package is importable, else its torch path (chunked SSD in PyTorch)."""
    import importlib.util
    return "kernels" if importlib.util.find_spec("kernels") or importlib.util.find_spec("mamba_ssm") else "torch"


def cut_layers(cfg, n):
    """The first n layers (a hybrid model's block pattern cut to its prefix, per-layer lists too)."""
    if getattr(cfg, "model_type", "") == "nemotron_h":
        cfg.layers_block_type = list(cfg.layers_block_type)[:n]  # num_hidden_layers derives from it
        return
    cfg.num_hidden_layers = n
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = cfg.layer_types[:n]


def nemotron_flops_per_token(c, seq):
    """models/flops.cpp's count of Nemotron-H's blocks (Mamba2 in its recurrent form, relu^2 MLPs)."""
    h = c.hidden_size
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    attn = 2 * h * (q + 2 * kv) + 2 * q * h + 2 * seq * q
    heads, p, n = c.mamba_num_heads, c.mamba_head_dim, c.ssm_state_size
    inner = heads * p
    conv = inner + 2 * c.n_groups * n
    mamba = 2 * h * (inner + conv + heads) + 2 * c.conv_kernel * conv + heads * (5 * p * n + 2 * p) + 2 * inner * h
    width = c.moe_latent_size or h
    moe = c.num_experts_per_tok * 4 * width * c.moe_intermediate_size + 2 * h * c.n_routed_experts
    moe += 4 * h * c.moe_shared_expert_intermediate_size + (4 * h * width if c.moe_latent_size else 0)
    per = {"linear_attention": mamba, "full_attention": attn, "moe": moe, "mlp": 4 * h * c.intermediate_size}
    return 3 * (sum(per[b] for b in c.layers_block_type) + 2 * h * c.vocab_size)


def flops_per_token(c, seq):
    """shared/BENCHMARKS.md's count, as moeforge's models/flops.cpp makes it (latent attention with
    its own projections and q/k, v widths; shared experts; DeepSeek's first dense layers)."""
    if getattr(c, "model_type", "") == "nemotron_h":
        return nemotron_flops_per_token(c, seq)
    h, heads = c.hidden_size, c.num_attention_heads
    if getattr(c, "kv_lora_rank", None):  # DeepSeek-V3's MLA
        qk, v = c.qk_nope_head_dim + c.qk_rope_head_dim, c.v_head_dim
        qr, kvr = c.q_lora_rank or 0, c.kv_lora_rank
        attn = (2 * h * qr + 2 * qr * heads * qk) if qr else 2 * h * heads * qk
        attn += 2 * h * (kvr + c.qk_rope_head_dim) + 2 * kvr * heads * (c.qk_nope_head_dim + v)
        attn += 2 * heads * v * h + seq * heads * (qk + v)
    else:
        head_dim = getattr(c, "head_dim", None) or h // heads
        q, kv = heads * head_dim, c.num_key_value_heads * head_dim
        attn = 2 * h * (q + 2 * kv) + 2 * q * h + 2 * seq * q
    experts = getattr(c, "num_local_experts", None) or c.num_experts
    width = getattr(c, "moe_intermediate_size", None) or c.intermediate_size  # Mixtral, OLMoE, GPT-OSS
    moe = c.num_experts_per_tok * 3 * 2 * h * width + 2 * h * experts
    moe += 3 * 2 * h * width * (getattr(c, "n_shared_experts", 0) or 0)
    dense = 3 * 2 * h * c.intermediate_size
    first_dense = min(getattr(c, "first_k_dense_replace", 0) or 0, c.num_hidden_layers)
    layers = c.num_hidden_layers * attn + first_dense * dense + (c.num_hidden_layers - first_dense) * moe
    return 3 * (layers + 2 * h * c.vocab_size)


def best_attention(cfg):
    """The fastest attention the model class takes without hub kernels (none can be downloaded on
    the GPU machine): sdpa, else flex attention (GPT-OSS's sinks), else eager."""
    cls = transformers.AutoModelForCausalLM._model_mapping[type(cfg)]
    if getattr(cls, "_supports_sdpa", False):
        return "sdpa"
    if getattr(cls, "_supports_flex_attn", False):
        return "flex_attention"
    return "eager"


def balanced_gate_forward(gate):
    """Round-robin experts with the router's own weights at them: softmax probabilities,
    renormalised where the family renormalises (Mixtral always; GPT-OSS's softmax over its top-k
    logits is the same renormalisation), the router's bias included."""
    normalize = getattr(gate, "norm_topk_prob", True)
    sigmoid = hasattr(gate, "e_score_correction_bias")  # DeepSeek-V3: sigmoid scores, routed scaling

    def forward(hidden_states):
        hidden_states = hidden_states.reshape(-1, gate.hidden_dim)
        if sigmoid:
            logits = torch.nn.functional.linear(hidden_states.float(), gate.weight.float())
            probs = logits.sigmoid()
        else:
            logits = torch.nn.functional.linear(hidden_states, gate.weight, getattr(gate, "bias", None))
            probs = torch.softmax(logits, dtype=torch.float, dim=-1)
        t = probs.shape[0]
        idx = (torch.arange(t * gate.top_k, device=probs.device) % gate.num_experts).view(t, gate.top_k)
        w = probs.gather(1, idx)
        if normalize:
            w = w / (w.sum(dim=-1, keepdim=True) + (1e-20 if sigmoid else 0.0))
        if sigmoid:
            w = w * gate.routed_scaling_factor
        return logits, w.to(logits.dtype), idx
    return forward


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
    ap.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (a smoke test of this script)")
    ap.add_argument("--lora-rank", type=int, help="LoRA through PEFT (the base frozen) instead of full fine-tuning")
    ap.add_argument("--lora-alpha", type=int)
    ap.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj,experts",
                    help="PEFT target_modules; 'experts' = gate_proj,up_proj,down_proj (PEFT puts them on the fused experts)")
    a = ap.parse_args()

    cfg = AutoConfig.from_pretrained(a.config)
    if a.layers:
        cut_layers(cfg, a.layers)
    torch.manual_seed(a.seed)
    with torch.device(a.device):
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation=best_attention(cfg), experts_implementation=a.experts,
                                                 dtype=torch.bfloat16)
    model.train()
    if a.routing == "balanced":
        n = 0
        for mod in model.modules():
            if hasattr(mod, "top_k") and hasattr(mod, "num_experts") and hasattr(mod, "weight") and mod.weight.dim() == 2:
                mod.forward = balanced_gate_forward(mod)
                n += 1
        assert n > 0, "no router found to patch"
    if a.lora_rank:
        from peft import LoraConfig, get_peft_model
        targets = []
        for t in a.lora_targets.split(","):
            targets += ["gate_proj", "up_proj", "down_proj"] if t == "experts" else [t]
        model = get_peft_model(model, LoraConfig(r=a.lora_rank, lora_alpha=a.lora_alpha or 2 * a.lora_rank,
                                                 lora_dropout=0.0, target_modules=targets))
        model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=a.device == "cuda")
    timing = time_steps(lambda ids: model(input_ids=ids, labels=ids).loss, opt, cfg.vocab_size, a.batch, a.seq,
                        a.warmup, a.steps, a.device, a.seed)
    r = {
        "impl": "transformers", "transformers": transformers.__version__, "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if a.device == "cuda" else a.device, "config": a.config,
        "layers": cfg.num_hidden_layers,
        "params": sum(p.numel() for p in model.parameters() if not a.lora_rank or not p.requires_grad),
        **({"lora_rank": a.lora_rank, "lora_targets": a.lora_targets.split(","), "peft": __import__("peft").__version__,
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)} if a.lora_rank else {}),
        "seq": a.seq, "batch": a.batch,
        "routing": a.routing, "precision": "bf16", "experts_implementation": a.experts,
        "attn_implementation": best_attention(cfg),
        **({"mamba_path": mamba_path()} if cfg.model_type == "nemotron_h" else {}),
        **timing,
    }
    print_row("transformers", with_flops(r, flops_per_token(cfg, a.seq)))

if __name__ == "__main__":
    main()
