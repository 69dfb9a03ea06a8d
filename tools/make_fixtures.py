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
(per-expert tensor names, `rope_theta`/`rope_scaling`, `num_experts`) so both spellings are tested.
All reference numbers are computed on the CPU in float32 (no TF32), so they are deterministic.
"""
import argparse
import json
import os
import shutil
import sys

import torch
import transformers
from safetensors.torch import save_file

ADAMW = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)

CASES = {
    # head_dim != hidden/heads, GQA 4:2, renormalised top-k, one dense-MLP layer, untied head, sharded save.
    "qwen3_moe_a": dict(
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
        config=dict(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4,
                    num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=True,
                    output_router_logits=True, router_aux_loss_coef=0.05, tie_word_embeddings=False,
                    max_position_embeddings=64,
                    rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                     "original_max_position_embeddings": 16}),
        dtype=torch.float32, shard=None, hub_layout=False),
}

BATCH, SEQ = 2, 12


def perturb_(model, gen):
    """Random init gives near-uniform logits; spread the weights so the test discriminates."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=gen) * (1.5 / fan_in ** 0.5))


def build(case):
    cfg = transformers.Qwen3MoeConfig(**case["config"])
    cfg._attn_implementation = "eager"
    try:
        cfg._experts_implementation = "eager"
    except Exception:
        pass
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(cfg)
    gen = torch.Generator().manual_seed(1234)
    perturb_(model, gen)
    return model, gen


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


def hub_config(folder):
    with open(os.path.join(folder, "config.json")) as f:
        c = json.load(f)
    rp = c.pop("rope_parameters", None) or {}
    c["rope_theta"] = rp.get("rope_theta", 10000.0)
    extra = {k: v for k, v in rp.items() if k != "rope_theta"}
    c["rope_scaling"] = None if extra.get("rope_type", "default") == "default" else extra
    if "num_local_experts" in c:
        c["num_experts"] = c.pop("num_local_experts")
    c["transformers_version"] = "4.51.0"
    return c


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(4)
    os.makedirs(args.out, exist_ok=True)
    manifest = {"transformers_version": transformers.__version__, "torch_version": torch.__version__,
                "adamw": {k: list(v) if isinstance(v, tuple) else v for k, v in ADAMW.items()},
                "cases": {}}
    for name, case in CASES.items():
        folder = os.path.join(args.out, name)
        shutil.rmtree(folder, ignore_errors=True)
        model, gen = build(case)
        model = model.to(case["dtype"])
        kw = {"max_shard_size": case["shard"]} if case["shard"] else {}
        model.save_pretrained(folder, **kw)
        # The reference is Transformers reading the saved folder in fp32 (so bf16-stored weights are
        # widened exactly, and RoPE tables are computed in fp32 as from_pretrained does).
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                                  attn_implementation="eager")
        model.eval()
        ids = torch.randint(0, model.config.vocab_size, (BATCH, SEQ), generator=gen)
        labels = ids.clone()
        labels[0, 3] = -100
        labels[1, -2] = -100
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
                    grads["grad." + n] = p.grad.detach().float().contiguous()
            opt.step()
        save_file(grads, os.path.join(folder, "reference_grads.safetensors"))
        ref["train_losses"] = torch.tensor(losses, dtype=torch.float32)
        model.save_pretrained(os.path.join(folder, "after_adamw"))
        save_file({k: v.contiguous() for k, v in ref.items()}, os.path.join(folder, "reference.safetensors"))
        keys = sorted(model.state_dict().keys())
        manifest["cases"][name] = {"files": sorted(os.listdir(folder)), "state_dict_keys": keys[:12]}
        print(name, "saved files:", sorted(os.listdir(folder)), "loss", out.loss.item(), "train", losses)
        if case["hub_layout"]:
            model2, _ = build(case)
            hub = os.path.join(args.out, name + "_hub")
            shutil.rmtree(hub, ignore_errors=True)
            os.makedirs(hub)
            save_file(hub_state_dict(model2, model2.config), os.path.join(hub, "model.safetensors"),
                      metadata={"format": "pt"})
            with open(os.path.join(hub, "config.json"), "w") as f:
                json.dump(hub_config(folder), f, indent=2)
            # The reference is the same as the case's: same weights, other spelling.
            shutil.copy(os.path.join(folder, "reference.safetensors"), hub)
            # Transformers must read this spelling back to the same logits, or the fixture is wrong.
            back = transformers.AutoModelForCausalLM.from_pretrained(hub, dtype=torch.float32)
            back.eval()
            with torch.no_grad():
                diff = (back(input_ids=ids).logits - out.logits).abs().max().item()
            print(name + "_hub reload max|dlogits|", diff)
            assert diff < 1e-5, diff
    # What save_pretrained wrote, so the adapter is checked against the real spelling.
    for name in CASES:
        from safetensors import safe_open
        folder = os.path.join(args.out, name)
        names = []
        for fn in sorted(os.listdir(folder)):
            if fn.endswith(".safetensors") and not fn.startswith("reference"):
                with safe_open(os.path.join(folder, fn), "pt") as f:
                    names += list(f.keys())
        manifest["cases"][name]["checkpoint_tensor_names"] = sorted(names)
    with open(os.path.join(args.out, "MANIFEST.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    print("transformers", transformers.__version__, "torch", torch.__version__)


if __name__ == "__main__":
    sys.exit(main())
