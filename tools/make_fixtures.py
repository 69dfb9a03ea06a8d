#!/usr/bin/env python3
"""Write tiny random Hugging Face checkpoints plus reference outputs for moeforge's parity tests.

Run where `transformers` and `torch` are installed (the GPU machine, or a PyPI install):
    python3 tools/make_fixtures.py --out tests/fixtures

For every case it writes tests/fixtures/<case>/ containing
  - the checkpoint exactly as `save_pretrained` writes it (config.json, *.safetensors, index if sharded),
  - reference.safetensors: input_ids [B,S] i64, labels [B,S] i64 (some -100), logits [B,S,V] f32,
    loss [] f32, train_losses [3] f32 (loss before each of 3 AdamW steps),
  - after_adamw/: the weights after those 3 steps, again via `save_pretrained`,
  - reference_grads.safetensors: the gradients of the first step, `grad.<name>` under Transformers'
    in-memory names (fused experts), and `aux_grad.<name>` of the load-balancing loss alone.
Cases with a `hub_layout` variant also get <case>_hub/: the same weights in the hub's v4 spelling
(per-expert tensor names, `rope_theta`/`rope_scaling`, `num_experts`) so both spellings are tested;
cases with `v4_config` get <case>_v4/: the same weight files with the config in the v4 spelling.
`--cases a,b` writes only those cases (MANIFEST.json keeps the others' entries).
All reference numbers are computed on the CPU in float32 (no TF32), so they are deterministic.
"""
import argparse
import json
import os
import shutil
import sys

import torch
import transformers
from safetensors.torch import load_file, save_file

ADAMW = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)

ROPE_DEFAULT = {"rope_type": "default", "rope_theta": 10000.0}

CASES = {
    # head_dim != hidden/heads, GQA 4:2, renormalised top-k, one dense-MLP layer, untied head, sharded save.
    "qwen3_moe_a": dict(
        model_type="qwen3_moe",
        config=dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8,
                    num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=True,
                    mlp_only_layers=[1], decoder_sparse_step=1, tie_word_embeddings=False,
                    rms_norm_eps=1e-6, max_position_embeddings=64,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
        dtype=torch.float32, shard="24KB", hub_layout=True),
    # head_dim = hidden/heads, multi-query (1 KV head), no renormalisation, decoder_sparse_step 2,
    # tied embeddings, linear RoPE scaling, sliding window, bf16 storage.
    "qwen3_moe_b": dict(
        model_type="qwen3_moe",
        config=dict(vocab_size=96, hidden_size=48, intermediate_size=40, num_hidden_layers=4,
                    num_attention_heads=6, num_key_value_heads=1, head_dim=8, num_experts=6,
                    num_experts_per_tok=3, moe_intermediate_size=12, norm_topk_prob=False,
                    mlp_only_layers=[], decoder_sparse_step=2, tie_word_embeddings=True,
                    rms_norm_eps=1e-5, max_position_embeddings=64, use_sliding_window=True,
                    sliding_window=5,
                    rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}),
        dtype=torch.bfloat16, shard=None, hub_layout=False),
    # The load-balancing auxiliary loss is part of the loss (output_router_logits), YaRN RoPE.
    "qwen3_moe_aux": dict(
        model_type="qwen3_moe",
        config=dict(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4,
                    num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=True,
                    output_router_logits=True, router_aux_loss_coef=0.05, tie_word_embeddings=False,
                    max_position_embeddings=64,
                    rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                     "original_max_position_embeddings": 16}),
        dtype=torch.float32, shard=None, hub_layout=False),
    # Mixtral: plain GQA, top-2 of 4, sharded save (hub names block_sparse_moe.experts.E.w1/w2/w3).
    "mixtral_a": dict(
        model_type="mixtral",
        config=dict(vocab_size=96, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                    num_experts_per_tok=2, max_position_embeddings=64, rms_norm_eps=1e-5,
                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
        dtype=torch.float32, shard="20KB", v4_config=True),
    # Every option: sliding window, head_dim != hidden/heads, tied head, load-balancing loss in the
    # loss, top-3 of 6, YaRN, bf16 storage.
    "mixtral_b": dict(
        model_type="mixtral",
        config=dict(vocab_size=80, hidden_size=48, intermediate_size=20, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=1, head_dim=16, num_local_experts=6,
                    num_experts_per_tok=3, sliding_window=5, tie_word_embeddings=True,
                    output_router_logits=True, router_aux_loss_coef=0.05, max_position_embeddings=64,
                    rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0,
                                     "original_max_position_embeddings": 32}),
        dtype=torch.bfloat16, shard=None),
    # Qwen2-MoE: QKV bias, shared expert with its sigmoid gate, no renormalisation, one dense layer.
    "qwen2_moe_a": dict(
        model_type="qwen2_moe",
        config=dict(vocab_size=96, hidden_size=32, intermediate_size=40, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, num_experts=6, num_experts_per_tok=2,
                    moe_intermediate_size=12, shared_expert_intermediate_size=20, mlp_only_layers=[1],
                    norm_topk_prob=False, max_position_embeddings=64, rope_parameters=ROPE_DEFAULT),
        dtype=torch.float32, shard=None, v4_config=True),
    # Every option: sliding window on the layers layer_types picks, decoder_sparse_step 2, renormalised
    # top-k, load-balancing loss, tied head, linear RoPE, bf16.
    "qwen2_moe_b": dict(
        model_type="qwen2_moe",
        config=dict(vocab_size=80, hidden_size=48, intermediate_size=24, num_hidden_layers=4,
                    num_attention_heads=6, num_key_value_heads=3, num_experts=8, num_experts_per_tok=3,
                    moe_intermediate_size=10, shared_expert_intermediate_size=16, decoder_sparse_step=2,
                    norm_topk_prob=True, use_sliding_window=True, sliding_window=4, max_window_layers=3,
                    output_router_logits=True, router_aux_loss_coef=0.05, tie_word_embeddings=True,
                    max_position_embeddings=64,
                    rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0}),
        dtype=torch.bfloat16, shard=None),
    # OLMoE: q/k RMSNorm over the whole projection, top-2 of 8, no renormalisation.
    "olmoe_a": dict(
        model_type="olmoe",
        config=dict(vocab_size=96, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=4, num_experts=8, num_experts_per_tok=2,
                    max_position_embeddings=64, rope_parameters=ROPE_DEFAULT),
        dtype=torch.float32, shard=None),
    # Every option: clip_qkv (clamps some values here), attention bias, GQA, renormalised top-k,
    # load-balancing loss, tied head.
    "olmoe_b": dict(
        model_type="olmoe",
        config=dict(vocab_size=80, hidden_size=48, intermediate_size=12, num_hidden_layers=3,
                    num_attention_heads=6, num_key_value_heads=2, num_experts=6, num_experts_per_tok=3,
                    clip_qkv=1.5, attention_bias=True, norm_topk_prob=True, output_router_logits=True,
                    router_aux_loss_coef=0.05, tie_word_embeddings=True, max_position_embeddings=64,
                    rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}),
        dtype=torch.float32, shard=None),
    # Dense fallbacks.
    "llama_a": dict(
        model_type="llama",
        config=dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                    rope_parameters=ROPE_DEFAULT),
        dtype=torch.float32, shard=None),
    # Every option: attention and MLP biases, head_dim != hidden/heads, Llama-3 RoPE, tied head, bf16.
    "llama_b": dict(
        model_type="llama",
        config=dict(vocab_size=80, hidden_size=48, intermediate_size=40, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=1, head_dim=16, attention_bias=True,
                    mlp_bias=True, tie_word_embeddings=True, max_position_embeddings=64,
                    rope_parameters={"rope_type": "llama3", "factor": 8.0, "rope_theta": 500000.0,
                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 16}),
        dtype=torch.bfloat16, shard=None, v4_config=True),
    "mistral_a": dict(
        model_type="mistral",
        config=dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, sliding_window=None,
                    max_position_embeddings=64, rope_parameters=ROPE_DEFAULT),
        dtype=torch.float32, shard=None),
    "mistral_b": dict(
        model_type="mistral",
        config=dict(vocab_size=80, hidden_size=48, intermediate_size=40, num_hidden_layers=2,
                    num_attention_heads=6, num_key_value_heads=2, head_dim=12, sliding_window=5,
                    tie_word_embeddings=True, max_position_embeddings=64, rope_parameters=ROPE_DEFAULT),
        dtype=torch.float32, shard=None),
    "qwen2_a": dict(
        model_type="qwen2",
        config=dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                    rope_parameters=ROPE_DEFAULT),
        dtype=torch.float32, shard=None),
    # Sliding window on layers >= max_window_layers, tied head.
    "qwen2_b": dict(
        model_type="qwen2",
        config=dict(vocab_size=80, hidden_size=48, intermediate_size=40, num_hidden_layers=3,
                    num_attention_heads=6, num_key_value_heads=2, use_sliding_window=True, sliding_window=4,
                    max_window_layers=1, tie_word_embeddings=True, max_position_embeddings=64,
                    rope_parameters=ROPE_DEFAULT),
        dtype=torch.float32, shard=None),
    "qwen3_a": dict(
        model_type="qwen3",
        config=dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                    rope_parameters=ROPE_DEFAULT),
        dtype=torch.float32, shard=None),
    # Every option: attention bias, sliding window layers, head_dim 16 (!= 48/4), tied head.
    "qwen3_b": dict(
        model_type="qwen3",
        config=dict(vocab_size=80, hidden_size=48, intermediate_size=40, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, attention_bias=True,
                    use_sliding_window=True, sliding_window=4, max_window_layers=1, tie_word_embeddings=True,
                    max_position_embeddings=64, rope_parameters=ROPE_DEFAULT),
        dtype=torch.float32, shard=None),
    # DeepSeek-V3 (for the next family to land): MLA with q LoRA, grouped sigmoid routing with the
    # correction bias, shared expert, first dense layer, routed scaling, YaRN with mscale, interleaved RoPE.
    "deepseek_v3_a": dict(
        model_type="deepseek_v3",
        config=dict(vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=12,
                    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
                    n_routed_experts=8, routed_scaling_factor=2.5, kv_lora_rank=16, q_lora_rank=24,
                    qk_rope_head_dim=8, v_head_dim=12, qk_nope_head_dim=16, n_group=4, topk_group=2,
                    num_experts_per_tok=3, first_k_dense_replace=1, norm_topk_prob=True,
                    rope_interleave=True, max_position_embeddings=64,
                    rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                     "original_max_position_embeddings": 16, "beta_fast": 32.0,
                                     "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}),
        dtype=torch.float32, shard=None),
    # No q LoRA, one group, no renormalisation, plain RoPE, no interleave, two shared experts.
    "deepseek_v3_b": dict(
        model_type="deepseek_v3",
        config=dict(vocab_size=80, hidden_size=48, intermediate_size=40, moe_intermediate_size=10,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=2,
                    n_routed_experts=6, routed_scaling_factor=1.0, kv_lora_rank=12, q_lora_rank=None,
                    qk_rope_head_dim=4, v_head_dim=8, qk_nope_head_dim=8, n_group=1, topk_group=1,
                    num_experts_per_tok=2, first_k_dense_replace=0, norm_topk_prob=False,
                    rope_interleave=False, tie_word_embeddings=True, max_position_embeddings=64,
                    rope_parameters=ROPE_DEFAULT),
        dtype=torch.float32, shard=None),
    # GPT-OSS (for a later family): sinks, alternating sliding/full attention, biases, clamped SwiGLU,
    # router bias, YaRN.
    "gpt_oss_a": dict(
        model_type="gpt_oss",
        config=dict(vocab_size=96, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4,
                    num_experts_per_tok=2, sliding_window=4, max_position_embeddings=64,
                    rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 150000.0,
                                     "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                                     "original_max_position_embeddings": 16}),
        dtype=torch.float32, shard=None),
    "gpt_oss_b": dict(
        model_type="gpt_oss",
        config=dict(vocab_size=80, hidden_size=48, intermediate_size=12, num_hidden_layers=3,
                    num_attention_heads=6, num_key_value_heads=3, head_dim=8, num_local_experts=6,
                    num_experts_per_tok=3, sliding_window=5, output_router_logits=True,
                    router_aux_loss_coef=0.05, tie_word_embeddings=True, max_position_embeddings=64,
                    rope_parameters={"rope_type": "default", "rope_theta": 150000.0}),
        dtype=torch.bfloat16, shard=None),
    # DeepSeek-V3 with two multi-token prediction depths in the checkpoint, trained with its loss; the
    # main layers dense (their MoE is deepseek_v3_a/b's), the MTP layers MoE with grouped routing
    # (Transformers has no MTP: the reference is make_mtp_case's torch module around Transformers'
    # own decoder layer, RMSNorm and rotary embedding).
    "deepseek_v3_mtp": dict(
        model_type="deepseek_v3",
        config=dict(vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=12,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
                    n_routed_experts=8, routed_scaling_factor=2.5, kv_lora_rank=16, q_lora_rank=24,
                    qk_rope_head_dim=8, v_head_dim=12, qk_nope_head_dim=16, n_group=4, topk_group=2,
                    num_experts_per_tok=3, first_k_dense_replace=2, norm_topk_prob=True,
                    rope_interleave=True, max_position_embeddings=64, num_nextn_predict_layers=2,
                    rope_parameters=ROPE_DEFAULT),
        dtype=torch.float32, shard=None, mtp=dict(depths=2, loss_scale=0.3)),
    # Nemotron-H (hybrid Mamba2 + MoE + attention): every block kind but the dense MLP, Mamba2 with
    # two groups and two scan chunks over the sequence, sigmoid routing with the correction bias,
    # relu^2 experts and shared expert, GQA without RoPE.
    "nemotron_h_a": dict(
        model_type="nemotron_h",
        config=dict(vocab_size=96, hidden_size=32, hybrid_override_pattern="MEM*E", num_attention_heads=4,
                    num_key_value_heads=2, head_dim=8, intermediate_size=24, mamba_num_heads=4, mamba_head_dim=8,
                    n_groups=2, ssm_state_size=8, conv_kernel=4, chunk_size=8, expand=2, n_routed_experts=6,
                    num_experts_per_tok=2, moe_intermediate_size=12, moe_shared_expert_intermediate_size=16,
                    n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5,
                    time_step_min=0.001, layer_norm_epsilon=1e-5, tie_word_embeddings=False,
                    max_position_embeddings=64),
        dtype=torch.float32, shard=None),
    # Grouped routing (4 groups keep 2), no renormalisation, a dense relu^2 MLP block, biases on the
    # Mamba and MLP projections, Nemotron 3 Super's latent MoE projections, tied head, bf16 storage.
    "nemotron_h_b": dict(
        model_type="nemotron_h",
        config=dict(vocab_size=80, hidden_size=48, hybrid_override_pattern="M-E*ME", num_attention_heads=6,
                    num_key_value_heads=3, head_dim=8, intermediate_size=20, mamba_num_heads=6, mamba_head_dim=4,
                    n_groups=3, ssm_state_size=6, conv_kernel=3, chunk_size=5, expand=2, n_routed_experts=8,
                    num_experts_per_tok=3, moe_intermediate_size=10, moe_shared_expert_intermediate_size=14,
                    moe_latent_size=16, n_group=4, topk_group=2, norm_topk_prob=False, routed_scaling_factor=1.5,
                    use_bias=True, mlp_bias=True, use_conv_bias=True, time_step_min=0.01, layer_norm_epsilon=1e-6,
                    tie_word_embeddings=True, max_position_embeddings=64),
        dtype=torch.bfloat16, shard=None),
}

BATCH, SEQ = 2, 12


def perturb_(model, gen):
    """Random init gives near-uniform logits; spread the weights so the test discriminates."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias") or name.endswith("sinks"):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=gen) * (1.5 / fan_in ** 0.5))
        # DeepSeek-V3's routing correction bias is a buffer; nonzero so that it changes the choice.
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=gen))


def build(case, seed=1234):
    cfg = transformers.AutoConfig.for_model(case["model_type"], **case["config"])
    cfg._attn_implementation = "eager"
    try:
        cfg._experts_implementation = "eager"
    except Exception:
        pass
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    gen = torch.Generator().manual_seed(seed)
    perturb_(model, gen)
    return model, gen


# The smallest gap, in the scores a router chooses by, between a token's last chosen expert (or
# group) and the next one that a fixture may have. Below it, two correct fp32 programs (torch on
# the CPU, moeforge on the CPU or the GPU) can choose differently after their last-bit differences
# (and Adam's sign-like first update) and the parity tests would measure the fixture, not the code.
MIN_ROUTING_MARGIN = 5e-3
ROUTING_SEED_TRIES = 128


class RoutingMargins:
    """Forward pre-hooks on every router (a `*.gate` / `*.router` module with an [E, H] weight) that
    record the smallest top-k gap of its choice: softmax routers choose by logit; DeepSeek-V3's by
    sigmoid + correction bias, first among groups (a group's score: its two best) then experts."""

    def __init__(self, c, *modules):
        self.k = getattr(c, "num_experts_per_tok", 0)
        self.n_group = getattr(c, "n_group", None) if c.model_type in ("deepseek_v3", "nemotron_h") else None
        self.topk_group = getattr(c, "topk_group", None)
        self.smallest = float("inf")
        self.handles = []
        experts = getattr(c, "num_local_experts", None) or getattr(c, "num_experts", None) or getattr(c, "n_routed_experts", None)
        for name, m in (nm for module in modules for nm in module.named_modules()):
            w = getattr(m, "weight", None)
            if (name.endswith(".gate") or name.endswith(".router")) and isinstance(w, torch.Tensor) and w.dim() == 2 \
                    and experts and w.shape[0] == experts:
                self.handles.append(m.register_forward_pre_hook(self.hook))

    @staticmethod
    def gap(scores, k):
        top = scores.topk(k + 1, dim=-1).values
        return (top[:, k - 1] - top[:, k]).min().item()

    def hook(self, module, args):
        with torch.no_grad():
            x = args[0].reshape(-1, module.weight.shape[1]).float()
            logits = torch.nn.functional.linear(x, module.weight.float(), getattr(module, "bias", None))
            if self.n_group is None:
                self.smallest = min(self.smallest, self.gap(logits, self.k))
                return
            scores = logits.sigmoid() + module.e_score_correction_bias.float()
            e = scores.shape[-1]
            if self.n_group > 1:
                groups = scores.view(-1, self.n_group, e // self.n_group).topk(2, dim=-1).values.sum(-1)
                if self.topk_group < self.n_group:
                    self.smallest = min(self.smallest, self.gap(groups, self.topk_group))
                keep = torch.zeros_like(groups).scatter_(1, groups.topk(self.topk_group, dim=-1).indices, 1.0)
                scores = scores.masked_fill(keep.repeat_interleave(e // self.n_group, dim=1) == 0, 0.0)
            self.smallest = min(self.smallest, self.gap(scores, self.k))

    def remove(self):
        for h in self.handles:
            h.remove()
        return None if self.smallest == float("inf") else self.smallest


def hub_state_dict(model, cfg):
    """The v4 hub spelling: one tensor per expert and projection."""
    out = {}
    for name, t in model.state_dict().items():
        t = t.detach().contiguous()
        if name.endswith("mlp.experts.gate_up_proj"):
            base = name[: -len("gate_up_proj")]
            inter = t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{base}{e}.gate_proj.weight"] = t[e, :inter].clone()
                out[f"{base}{e}.up_proj.weight"] = t[e, inter:].clone()
        elif name.endswith("mlp.experts.down_proj"):
            base = name[: -len("down_proj")]
            for e in range(t.shape[0]):
                out[f"{base}{e}.down_proj.weight"] = t[e].clone()
        else:
            out[name] = t.clone()
    if cfg.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def hub_config(folder, model_type):
    """config.json in the v4 hub spelling: rope_theta/rope_scaling, and num_experts where the hub used it."""
    with open(os.path.join(folder, "config.json")) as f:
        c = json.load(f)
    rp = c.pop("rope_parameters", None) or {}
    c["rope_theta"] = rp.get("rope_theta", 10000.0)
    extra = {k: v for k, v in rp.items() if k != "rope_theta"}
    c["rope_scaling"] = None if extra.get("rope_type", "default") == "default" else extra
    if "num_local_experts" in c and model_type != "mixtral":
        c["num_experts"] = c.pop("num_local_experts")
    c.pop("layer_types", None)
    c["transformers_version"] = "4.51.0"
    return c


def checkpoint_tensor_names(folder):
    from safetensors import safe_open
    names = []
    for fn in sorted(os.listdir(folder)):
        if fn.endswith(".safetensors") and not fn.startswith("reference"):
            with safe_open(os.path.join(folder, fn), "pt") as f:
                names += list(f.keys())
    return sorted(names)


def load_fp32(folder):
    """Transformers reading a folder in fp32 with the eager attention and experts (the grouped_mm
    experts need 16-byte strides, which these tiny widths do not have)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    model.config._experts_implementation = "eager"  # the experts modules share this config object
    return model


def reload_diff(folder, ids, logits):
    """Transformers must read a derived folder back to the same logits, or the fixture is wrong."""
    back = load_fp32(folder)
    back.eval()
    with torch.no_grad():
        return (back(input_ids=ids).logits - logits).abs().max().item()


def make_case(name, case, out_dir, seed=1234):
    folder = os.path.join(out_dir, name)
    shutil.rmtree(folder, ignore_errors=True)
    model, gen = build(case, seed)
    model = model.to(case["dtype"])
    kw = {"max_shard_size": case["shard"]} if case.get("shard") else {}
    model.save_pretrained(folder, **kw)
    # The reference is Transformers reading the saved folder in fp32 (so bf16-stored weights are
    # widened exactly, and RoPE tables are computed in fp32 as from_pretrained does).
    model = load_fp32(folder)
    model.eval()
    ids = torch.randint(0, model.config.vocab_size, (BATCH, SEQ), generator=gen)
    labels = ids.clone()
    labels[0, 3] = -100
    labels[1, -2] = -100
    margins = RoutingMargins(model.config, model)  # over the reference forward and the three training steps
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)
    ref = {"input_ids": ids, "labels": labels, "logits": out.logits.float().contiguous(),
           "loss": out.loss.detach().float().reshape(())}
    if getattr(out, "aux_loss", None) is not None:
        ref["aux_loss"] = torch.as_tensor(out.aux_loss).detach().float().reshape(())
    # Three AdamW steps on the same batch, fp32, no clipping.
    model.train()
    opt = torch.optim.AdamW(model.parameters(), **ADAMW)
    losses = []
    grads = {}
    for step in range(3):
        opt.zero_grad(set_to_none=True)
        out_t = model(input_ids=ids, labels=labels)
        loss = out_t.loss
        losses.append(loss.item())
        if step == 0 and getattr(out_t, "aux_loss", None) is not None:
            # The load-balancing loss's own gradient, to check it apart from the cross-entropy's.
            aux_g = torch.autograd.grad(out_t.aux_loss, [p for _, p in model.named_parameters()],
                                        retain_graph=True, allow_unused=True)
            for (n, _), g in zip(model.named_parameters(), aux_g):
                if g is not None:
                    grads["aux_grad." + n] = g.detach().float().contiguous()
        loss.backward()
        if step == 0:
            for n, p in model.named_parameters():
                if p.grad is not None:
                    grads["grad." + n] = p.grad.detach().float().contiguous()
        opt.step()
    margin = margins.remove()
    save_file(grads, os.path.join(folder, "reference_grads.safetensors"))
    ref["train_losses"] = torch.tensor(losses, dtype=torch.float32)
    # The same three steps under torch's CPU bf16 autocast (fp32 weights and AdamW, bf16 matmuls):
    # how far Transformers itself moves from its fp32 losses in bf16, for the GPU's bf16 policies.
    auto = load_fp32(folder)
    auto.train()
    opt_auto = torch.optim.AdamW(auto.parameters(), **ADAMW)
    auto_losses = []
    for step in range(3):
        opt_auto.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = auto(input_ids=ids, labels=labels).loss
        auto_losses.append(loss.float().item())
        loss.backward()
        opt_auto.step()
    ref["train_losses_bf16_autocast"] = torch.tensor(auto_losses, dtype=torch.float32)
    model.save_pretrained(os.path.join(folder, "after_adamw"))
    save_file({k: v.contiguous() for k, v in ref.items()}, os.path.join(folder, "reference.safetensors"))
    entry = {"model_type": case["model_type"], "files": sorted(os.listdir(folder)),
             "state_dict_keys": sorted(model.state_dict().keys()),
             "checkpoint_tensor_names": checkpoint_tensor_names(folder), "seed": seed, "routing_margin": margin,
             "transformers_version": transformers.__version__, "torch_version": torch.__version__}
    print(name, "seed", seed, "routing margin", margin, "loss", out.loss.item(), "train", losses,
          "bf16 autocast", auto_losses, flush=True)
    if margin is not None and margin < MIN_ROUTING_MARGIN:
        return entry  # the caller tries the next seed; variants come with the one kept
    variants = {}
    if case.get("hub_layout"):
        # Per-expert tensors written by hand (Transformers 5 writes them too, but keep the v4 file
        # as the hub has it) and the v4 config spelling.
        model2, _ = build(case, seed)
        hub = os.path.join(out_dir, name + "_hub")
        shutil.rmtree(hub, ignore_errors=True)
        os.makedirs(hub)
        save_file(hub_state_dict(model2, model2.config), os.path.join(hub, "model.safetensors"),
                  metadata={"format": "pt"})
        variants[name + "_hub"] = hub
    if case.get("v4_config"):
        # The same weight files with the config in the v4 hub spelling.
        hub = os.path.join(out_dir, name + "_v4")
        shutil.rmtree(hub, ignore_errors=True)
        os.makedirs(hub)
        for fn in os.listdir(folder):
            if fn.endswith(".safetensors") and not fn.startswith("reference") or fn == "model.safetensors.index.json":
                shutil.copy(os.path.join(folder, fn), hub)
        variants[name + "_v4"] = hub
    for vname, hub in variants.items():
        with open(os.path.join(hub, "config.json"), "w") as f:
            json.dump(hub_config(folder, case["model_type"]), f, indent=2)
        # The reference is the same as the case's: same weights, other spelling.
        shutil.copy(os.path.join(folder, "reference.safetensors"), hub)
        diff = reload_diff(hub, ids, out.logits)
        print(vname, "reload max|dlogits|", diff, flush=True)
        assert diff < 1e-5, diff
    return entry


class MTPDepth(torch.nn.Module):
    """DeepSeek-V3's multi-token prediction module (the DeepSeek-V3 report; vLLM's and Megatron's
    layout): eh_proj([enorm(embedding of token t+k), hnorm(h_{k-1})]) -> decoder layer -> head norm;
    the embedding and output head are the main model's."""

    def __init__(self, config, layer_idx, modeling):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.enorm = modeling.DeepseekV3RMSNorm(h, eps=eps)
        self.hnorm = modeling.DeepseekV3RMSNorm(h, eps=eps)
        self.eh_proj = torch.nn.Linear(2 * h, h, bias=False)
        self.layer = modeling.DeepseekV3DecoderLayer(config, layer_idx)
        self.head_norm = modeling.DeepseekV3RMSNorm(h, eps=eps)

    def checkpoint_tensors(self, prefix, model):
        """This depth under the checkpoint's names (per-expert spelling), with the copies of the
        shared embedding and head that DeepSeek's checkpoints hold."""
        out = {prefix + "enorm.weight": self.enorm.weight, prefix + "hnorm.weight": self.hnorm.weight,
               prefix + "eh_proj.weight": self.eh_proj.weight, prefix + "shared_head.norm.weight": self.head_norm.weight,
               prefix + "embed_tokens.weight": model.model.embed_tokens.weight,
               prefix + "shared_head.head.weight": model.lm_head.weight}
        layer = hub_state_dict(self.layer, model.config)
        out.update({prefix + n: t for n, t in layer.items()})
        return {n: t.detach().float().contiguous().clone() for n, t in out.items()}


def mtp_losses(model, depths, ids, labels):
    """The main loss and each depth's: depth k at position t sees token t+k (a zero embedding past
    the row's end) and predicts label t+1+k."""
    from transformers.masking_utils import create_causal_mask
    b, s = ids.shape
    v = model.config.vocab_size
    pos = torch.arange(s).unsqueeze(0).expand(b, s)
    h = model.model(input_ids=ids).last_hidden_state  # after the final norm
    main = torch.nn.functional.cross_entropy(model.lm_head(h)[:, :-1].reshape(-1, v), labels[:, 1:].reshape(-1),
                                             ignore_index=-100)
    emb_all = model.model.embed_tokens(ids)
    mask = create_causal_mask(config=model.config, inputs_embeds=emb_all, attention_mask=None,
                              past_key_values=None, position_ids=pos)
    rope = model.model.rotary_emb(emb_all, position_ids=pos)
    losses, prev = [], h
    for k, d in enumerate(depths, start=1):
        emb = torch.cat([emb_all[:, k:], torch.zeros_like(emb_all[:, :k])], dim=1)
        x = d.eh_proj(torch.cat([d.enorm(emb), d.hnorm(prev)], dim=-1))
        y = d.layer(x, attention_mask=mask, position_ids=pos, position_embeddings=rope)
        prev = d.head_norm(y)
        target = torch.cat([labels[:, k + 1:], torch.full((b, k + 1), -100, dtype=labels.dtype)], dim=1)
        losses.append(torch.nn.functional.cross_entropy(model.lm_head(prev).reshape(-1, v), target.reshape(-1),
                                                        ignore_index=-100))
    return main, losses


def add_tensors(folder, extra):
    """Adds tensors to the folder's single model.safetensors."""
    from safetensors.torch import load_file
    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    tensors.update(extra)
    save_file(tensors, path, metadata={"format": "pt"})


def make_mtp_case(name, case, out_dir, seed=1234):
    """reference.safetensors as make_case's plus `main_loss`, `mtp_losses` [depths] and
    `mtp_loss_scale`; train_losses are main + scale / depths * sum(mtp); gradients under the internal
    names (the depths' as model.layers.<num_hidden_layers + k - 1>.*, experts fused)."""
    import importlib
    folder = os.path.join(out_dir, name)
    shutil.rmtree(folder, ignore_errors=True)
    model, gen = build(case, seed)
    cfg = model.config
    modeling = importlib.import_module(type(model).__module__)
    n = case["mtp"]["depths"]
    scale = case["mtp"]["loss_scale"]
    depths = torch.nn.ModuleList([MTPDepth(cfg, cfg.num_hidden_layers + k, modeling) for k in range(n)])
    perturb_(depths, gen)
    prefixes = [f"model.layers.{cfg.num_hidden_layers + k}." for k in range(n)]

    def save(dst):
        model.save_pretrained(dst)
        extra = {}
        for d, pre in zip(depths, prefixes):
            extra.update(d.checkpoint_tensors(pre, model))
        add_tensors(dst, extra)

    save(folder)
    model = load_fp32(folder)  # the main model as Transformers reads it (the MTP tensors are unexpected to it)
    depths.float()
    model.config._experts_implementation = "eager"
    ids = torch.randint(0, cfg.vocab_size, (BATCH, SEQ), generator=gen)
    labels = ids.clone()
    labels[0, 3] = -100
    labels[1, -2] = -100
    model.train()
    params = list(model.parameters()) + [p for p in depths.parameters()]
    opt = torch.optim.AdamW(params, **ADAMW)
    margins = RoutingMargins(model.config, model, depths)
    losses, grads, first = [], {}, None
    for step in range(3):
        opt.zero_grad(set_to_none=True)
        main, mtp = mtp_losses(model, depths, ids, labels)
        loss = main + scale / n * sum(mtp)
        losses.append(loss.item())
        if first is None:
            first = (main.detach(), torch.stack([m.detach() for m in mtp]))
        loss.backward()
        if step == 0:
            for pn, p in model.named_parameters():
                grads["grad." + pn] = p.grad.detach().float().contiguous()
            for d, pre in zip(depths, prefixes):
                for pn, p in d.named_parameters():
                    internal = {"enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight",
                                "eh_proj.weight": "eh_proj.weight", "head_norm.weight": "shared_head.norm.weight"}.get(pn)
                    internal = internal or pn[len("layer."):]
                    grads["grad." + pre + internal] = p.grad.detach().float().contiguous()
        opt.step()
    margin = margins.remove()
    save_file(grads, os.path.join(folder, "reference_grads.safetensors"))
    ref = {"input_ids": ids, "labels": labels, "main_loss": first[0].reshape(()), "mtp_losses": first[1],
           "mtp_loss_scale": torch.tensor(scale, dtype=torch.float32),
           "train_losses": torch.tensor(losses, dtype=torch.float32)}
    save_file({k: v.contiguous() for k, v in ref.items()}, os.path.join(folder, "reference.safetensors"))
    save(os.path.join(folder, "after_adamw"))
    print(name, "seed", seed, "routing margin", margin, "main", first[0].item(), "mtp", first[1].tolist(),
          "train", losses, flush=True)
    return {"model_type": case["model_type"], "files": sorted(os.listdir(folder)),
            "checkpoint_tensor_names": checkpoint_tensor_names(folder), "seed": seed, "routing_margin": margin}


# LoRA cases: (base fixture, PEFT target_modules). Each writes <base>/lora/: adapter_init/ (PEFT's
# save of the starting adapter: A as PEFT initialises it, B random so the first step moves A too),
# reference.safetensors (logits of base + that adapter, the three training losses) and
# adapter_after/ (PEFT's save after three AdamW steps on the adapters alone, fp32, no clipping).
LORA_CASES = {
    "llama_a": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen3_moe_a": ["q_proj", "k_proj", "v_proj", "o_proj"],
    # Not its shared experts: PEFT 0.21 maps gate_proj/up_proj/down_proj targets of a DeepSeek-V3 (and
    # Qwen3-MoE, OLMoE) model onto the routed experts' fused parameters, whatever the prefix.
    "deepseek_v3_a": ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"],
    "nemotron_h_a": ["in_proj", "q_proj", "k_proj", "v_proj", "o_proj", "shared_experts.up_proj",
                     "shared_experts.down_proj"],
}
LORA_RANK, LORA_ALPHA = 4, 8


def train_peft_case(folder, lora_dir, config, seed):
    """PEFT's LoRA `config` on the fixture in `folder`, into `lora_dir`: adapter_init/ (A as PEFT
    initialises it, B random so the first step moves A too), the logits with it and three AdamW
    steps' losses (reference.safetensors), adapter_after/. Returns the losses."""
    from peft import get_peft_model
    shutil.rmtree(lora_dir, ignore_errors=True)
    os.makedirs(lora_dir)
    base_ref = load_file(os.path.join(folder, "reference.safetensors"))
    ids, labels = base_ref["input_ids"], base_ref["labels"]
    torch.manual_seed(seed)
    model = get_peft_model(load_fp32(folder), config)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.05)
    model.save_pretrained(os.path.join(lora_dir, "adapter_init"))
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float().contiguous()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], **ADAMW)
    losses = []
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=labels).loss
        losses.append(loss.item())
        loss.backward()
        opt.step()
    model.save_pretrained(os.path.join(lora_dir, "adapter_after"))
    save_file({"input_ids": ids, "labels": labels, "logits": logits,
               "train_losses": torch.tensor(losses, dtype=torch.float32)},
              os.path.join(lora_dir, "reference.safetensors"))
    return losses


def make_lora_case(name, out_dir, seed=4321):
    from peft import LoraConfig
    folder = os.path.join(out_dir, name)
    train_peft_case(folder, os.path.join(folder, "lora"),
                    LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=LORA_CASES[name]),
                    seed)
    return {"targets": LORA_CASES[name], "rank": LORA_RANK, "alpha": LORA_ALPHA, "seed": seed}


# LoRA on the routed experts, per expert as PEFT and vLLM name them for checkpoints with per-expert
# modules (v4 hub names: experts.{e}.gate_proj / up_proj / down_proj), plus q_proj. PEFT on
# Transformers 5 loads such an adapter into the fused experts (A of gate and up stacked along the
# rank, B block-diagonal); its training would fill B's off-diagonal blocks, which per-expert LoRA
# does not have, so their gradient is zeroed here (what moeforge trains), and the result is read
# back per expert. Writes <base>/lora_experts/ like make_lora_case's lora/.
LORA_EXPERT_CASES = {"qwen3_moe_a": ("gate_proj", "up_proj", "down_proj")}


def make_lora_experts_case(name, out_dir, seed=2468):
    from peft import PeftModel
    folder = os.path.join(out_dir, name)
    lora_dir = os.path.join(folder, "lora_experts")
    shutil.rmtree(lora_dir, ignore_errors=True)
    init_dir = os.path.join(lora_dir, "adapter_init")
    os.makedirs(init_dir)
    base_ref = load_file(os.path.join(folder, "reference.safetensors"))
    ids, labels = base_ref["input_ids"], base_ref["labels"]
    model = load_fp32(folder)
    cfg = model.config
    gate, up, down = LORA_EXPERT_CASES[name]
    r, alpha = LORA_RANK, LORA_ALPHA
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    moe_layers = [l for l, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]
    H, I = cfg.hidden_size, cfg.moe_intermediate_size
    for l, layer in enumerate(model.model.layers):
        q = layer.self_attn.q_proj
        sd[f"base_model.model.model.layers.{l}.self_attn.q_proj.lora_A.weight"] = torch.randn(r, q.in_features, generator=gen) * 0.2
        sd[f"base_model.model.model.layers.{l}.self_attn.q_proj.lora_B.weight"] = torch.randn(q.out_features, r, generator=gen) * 0.05
    for l in moe_layers:
        for e in range(cfg.num_experts):
            for proj, (fi, fo) in ((gate, (H, I)), (up, (H, I)), (down, (I, H))):
                key = f"base_model.model.model.layers.{l}.mlp.experts.{e}.{proj}"
                sd[key + ".lora_A.weight"] = torch.randn(r, fi, generator=gen) * 0.2
                sd[key + ".lora_B.weight"] = torch.randn(fo, r, generator=gen) * 0.05
    save_file(sd, os.path.join(init_dir, "adapter_model.safetensors"))
    with open(os.path.join(init_dir, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "lora_dropout": 0.0,
                   "target_modules": ["q_proj", gate, up, down], "bias": "none", "base_model_name_or_path": folder}, f,
                  indent=2)
    pm = PeftModel.from_pretrained(model, init_dir, is_trainable=True)
    pm.eval()
    with torch.no_grad():
        logits = pm(input_ids=ids).logits.float().contiguous()
    E = cfg.num_experts
    fused_b = {n: p for n, p in pm.named_parameters() if "experts.base_layer.lora_B" in n}  # gate_up's B [2I, 2r*E]

    def mask(grad):  # zero B's off-diagonal blocks, per expert: B.reshape(2I, 2r, E)
        g = grad.reshape(2 * I, 2 * r, E).clone()
        g[:I, r:, :] = 0
        g[I:, :r, :] = 0
        return g.reshape(grad.shape)

    for p in fused_b.values():
        p.register_hook(mask)
    pm.train()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], **ADAMW)
    losses = []
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        loss = pm(input_ids=ids, labels=labels).loss
        losses.append(loss.item())
        loss.backward()
        opt.step()
    # Back to per-expert tensors: A [E*R, in] -> (E, R, in); B [out, R*E] -> (out, R, E) (PEFT's layout).
    params = dict(pm.named_parameters())
    after = {}
    for l in range(len(model.model.layers)):
        for w in ("A", "B"):
            after[f"base_model.model.model.layers.{l}.self_attn.q_proj.lora_{w}.weight"] = \
                params[f"base_model.model.model.layers.{l}.self_attn.q_proj.lora_{w}.default.weight"].detach().clone()
    for l in moe_layers:
        pre = f"base_model.model.model.layers.{l}.mlp.experts"
        a_gu = params[pre + ".base_layer.lora_A.default.weight"].detach().reshape(E, 2 * r, H)
        b_gu = params[pre + ".base_layer.lora_B.default.weight"].detach().reshape(2 * I, 2 * r, E)
        a_d = params[pre + ".lora_A.default.weight"].detach().reshape(E, r, I)
        b_d = params[pre + ".lora_B.default.weight"].detach().reshape(H, r, E)
        assert float(b_gu[:I, r:, :].abs().max()) == 0 and float(b_gu[I:, :r, :].abs().max()) == 0
        for e in range(E):
            k = f"{pre}.{e}"
            after[f"{k}.{gate}.lora_A.weight"] = a_gu[e, :r].clone()
            after[f"{k}.{up}.lora_A.weight"] = a_gu[e, r:].clone()
            after[f"{k}.{gate}.lora_B.weight"] = b_gu[:I, :r, e].clone()
            after[f"{k}.{up}.lora_B.weight"] = b_gu[I:, r:, e].clone()
            after[f"{k}.{down}.lora_A.weight"] = a_d[e].clone()
            after[f"{k}.{down}.lora_B.weight"] = b_d[:, :, e].clone()
    assert set(after) == set(sd), set(after) ^ set(sd)
    after_dir = os.path.join(lora_dir, "adapter_after")
    os.makedirs(after_dir)
    save_file({k: v.contiguous() for k, v in after.items()}, os.path.join(after_dir, "adapter_model.safetensors"))
    shutil.copy(os.path.join(init_dir, "adapter_config.json"), after_dir)
    save_file({"input_ids": ids, "labels": labels, "logits": logits,
               "train_losses": torch.tensor(losses, dtype=torch.float32)},
              os.path.join(lora_dir, "reference.safetensors"))
    return {"targets": ["q_proj", gate, up, down], "rank": r, "alpha": alpha, "seed": seed}


# LoRA on the routed experts of the families PEFT has no per-expert mapping for: one adapter per
# fused 3-D expert weight, as PEFT's target_parameters puts it (and vLLM's 3-D MoE LoRA reads it),
# plus q_proj. Trained by PEFT itself (B random at the start, so the first step moves A too) and saved
# by PEFT; writes <base>/lora_experts/ like make_lora_case's lora/.
LORA_FUSED_EXPERT_CASES = {
    "gpt_oss_a": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    "qwen2_moe_a": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    "nemotron_h_a": ["mixer.experts.up_proj", "mixer.experts.down_proj"],
}


def make_lora_fused_experts_case(name, out_dir, seed=1357):
    from peft import LoraConfig
    folder = os.path.join(out_dir, name)
    targets = LORA_FUSED_EXPERT_CASES[name]
    losses = train_peft_case(folder, os.path.join(folder, "lora_experts"),
                             LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=["q_proj"],
                                        target_parameters=targets), seed)
    print(name, "fused expert LoRA losses", losses, flush=True)
    return {"targets": ["q_proj"], "target_parameters": targets, "rank": LORA_RANK, "alpha": LORA_ALPHA, "seed": seed}


# Greedy generation references: Transformers' generate(do_sample=False) from a random prompt, no
# stop token (a fixed count, so a random model's chance eos does not end it early), with the gap
# between the best and second-best logit at every step (a step whose gap is tiny could flip on
# rounding; the prompt seed is the first whose gaps all stay above GENERATE_MIN_GAP).
GENERATE_PROMPT, GENERATE_NEW, GENERATE_MIN_GAP = 7, 12, 1e-3


def make_generate_case(name, out_dir):
    folder = os.path.join(out_dir, name)
    model = load_fp32(folder)
    model.eval()
    for seed in range(99, 99 + 20):
        gen = torch.Generator().manual_seed(seed)
        prompt = torch.randint(0, model.config.vocab_size, (1, GENERATE_PROMPT), generator=gen)
        with torch.no_grad():
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                 max_new_tokens=GENERATE_NEW, min_new_tokens=GENERATE_NEW, eos_token_id=None,
                                 pad_token_id=0, return_dict_in_generate=True, output_scores=True)
        gaps = [float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in out.scores]
        if min(gaps) >= GENERATE_MIN_GAP:
            break
    else:
        raise RuntimeError(f"{name}: no prompt seed keeps every greedy step's logit gap >= {GENERATE_MIN_GAP}")
    new = out.sequences[0, GENERATE_PROMPT:]
    assert new.numel() == GENERATE_NEW, new
    save_file({"prompt_ids": prompt[0].contiguous(), "generated_ids": new.contiguous(),
               "step_logits": torch.stack([s[0].float() for s in out.scores]).contiguous()},
              os.path.join(folder, "generate_reference.safetensors"))
    print(name, "generate seed", seed, "min gap", min(gaps), "ids", new.tolist(), flush=True)
    return {"seed": seed, "prompt_tokens": GENERATE_PROMPT, "new_tokens": GENERATE_NEW, "min_gap": min(gaps)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    ap.add_argument("--lora-cases", default=None,
                    help="only (re)make the LoRA references of these existing cases (comma-separated, 'all')")
    ap.add_argument("--generate-cases", default=None,
                    help="only (re)make the greedy generation references of these existing cases (comma-separated, 'all')")
    args = ap.parse_args()
    if args.generate_cases is not None:
        path = os.path.join(args.out, "MANIFEST.json")
        with open(path) as f:
            manifest = json.load(f)
        wanted = list(manifest["cases"]) if args.generate_cases == "all" else [c for c in args.generate_cases.split(",") if c]
        manifest.setdefault("generate", {})
        for name in wanted:
            manifest["generate"][name] = make_generate_case(name, args.out)
        with open(path, "w") as f:
            json.dump(manifest, f, indent=1)
        return 0
    if args.lora_cases is not None:
        import peft
        wanted = list(dict.fromkeys(list(LORA_CASES) + list(LORA_FUSED_EXPERT_CASES))) if args.lora_cases == "all" \
            else [c for c in args.lora_cases.split(",") if c]
        path = os.path.join(args.out, "MANIFEST.json")
        with open(path) as f:
            manifest = json.load(f)
        manifest.setdefault("lora", {"peft_version": peft.__version__})
        manifest["lora"]["peft_version"] = peft.__version__
        for name in wanted:
            if name in LORA_CASES:
                manifest["lora"][name] = make_lora_case(name, args.out)
            if name in LORA_FUSED_EXPERT_CASES:
                manifest["lora"][name + "/experts"] = make_lora_fused_experts_case(name, args.out)
            if name in LORA_EXPERT_CASES:
                manifest["lora"][name + "/experts"] = make_lora_experts_case(name, args.out)
        with open(path, "w") as f:
            json.dump(manifest, f, indent=1)
        print("LoRA references made for", wanted, "with peft", peft.__version__)
        return 0
    torch.set_num_threads(4)
    os.makedirs(args.out, exist_ok=True)
    wanted = [c for c in args.cases.split(",") if c] or list(CASES)
    unknown = [c for c in wanted if c not in CASES]
    if unknown:
        sys.exit(f"unknown case(s): {unknown}; known: {list(CASES)}")
    path = os.path.join(args.out, "MANIFEST.json")
    manifest = {"cases": {}}
    if os.path.exists(path):
        with open(path) as f:
            manifest = json.load(f)
    manifest.update({"transformers_version": transformers.__version__, "torch_version": torch.__version__,
                     "adamw": {k: list(v) if isinstance(v, tuple) else v for k, v in ADAMW.items()}})
    failed = []
    for name in wanted:
        try:
            maker = make_mtp_case if "mtp" in CASES[name] else make_case
            # The first seed whose routing keeps MIN_ROUTING_MARGIN everywhere (1234 for most cases).
            for seed in range(1234, 1234 + ROUTING_SEED_TRIES):
                entry = maker(name, CASES[name], args.out, seed)
                if entry["routing_margin"] is None or entry["routing_margin"] >= MIN_ROUTING_MARGIN:
                    break
            else:
                raise RuntimeError(f"no seed in {ROUTING_SEED_TRIES} tries keeps routing margins >= {MIN_ROUTING_MARGIN}")
            manifest["cases"][name] = entry
        except Exception as e:  # keep going: one family's failure should not cost the others
            import traceback
            traceback.print_exc()
            failed.append(name)
            shutil.rmtree(os.path.join(args.out, name), ignore_errors=True)
    with open(path, "w") as f:
        json.dump(manifest, f, indent=1)
    print("transformers", transformers.__version__, "torch", torch.__version__, "failed:", failed)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
