#!/usr/bin/env python3
"""The training-step benchmark of shared/BENCHMARKS.md in NVIDIA NeMo AutoModel (nemo-automodel
0.7.0): the same workload as `moeforge bench` and bench/hf_baseline.py (random init in a config's
architecture, vocab-uniform random tokens, forward + loss, backward, AdamW), with NeMo AutoModel's
own model class for the config's family (Qwen3-MoE, DeepSeek-V3, GPT-OSS) and the backends this
machine has (printed in the row: TransformerEngine where installed, else torch attention (sdpa; GPT-OSS's
sinks need flex attention), torch._grouped_mm experts and the torch dispatcher). Balanced routing is
NeMo's own FakeBalancedGate (its benchmarks' method). One process, one GPU; bf16 parameters and
torch.optim.AdamW(fused=True) as in hf_baseline.py. Prints a table row and one JSON line with the
same keys as moeforge's.

Nemotron-H (NeMo's nemotron_v3) is refused with the reason: NeMo's Mamba2 mixer is training-only on
the CUDA kernels of mamba_ssm and causal_conv1d, which PyPI has only as source distributions (no
wheel for any platform), so they cannot travel to the GPU machine as wheels.

On the GPU machine (no PyPI) NeMo AutoModel and what it needs beyond the machine's venv travel as
wheels: tools/gpu/fetch_nemo_wheels.sh, then `bash tools/gpu/run.sh nemo CONFIG ARGS`."""
import argparse
import importlib.util
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hf_baseline import flops_per_token  # noqa: E402  (the same FLOP count as every other row)
from step_timing import print_row, time_steps, with_flops  # noqa: E402


# model_type -> NeMo AutoModel's module and class for it, and the torch attention backend that class
# takes (GPT-OSS asserts flex or TE: its attention sinks are not in sdpa).
FAMILIES = {
    "qwen3_moe": ("nemo_automodel.components.models.qwen3_moe.model", "Qwen3MoeForCausalLM", "sdpa"),
    "deepseek_v3": ("nemo_automodel.components.models.deepseek_v3.model", "DeepseekV3ForCausalLM", "sdpa"),
    "gpt_oss": ("nemo_automodel.components.models.gpt_oss.model", "GptOssForCausalLM", "flex"),
}
# Families NeMo AutoModel has but this baseline cannot run, and exactly why.
REFUSED = {
    "nemotron_h": "NeMo AutoModel's Nemotron-H (nemotron_v3) Mamba2 mixer is training-only on the CUDA kernels "
                  "of mamba_ssm and causal_conv1d, which PyPI has only as source distributions (no wheel for "
                  "any platform, checked 2026-12-06), so they cannot travel to the GPU machine, which has no PyPI",
}


def model_class(config_path, model_type):
    """NeMo AutoModel's class for the family, and its torch attention backend; exits naming the
    config and its model_type when this baseline does not cover it."""
    if model_type in REFUSED:
        sys.exit(f"nemo_baseline.py: {config_path}: model_type {model_type!r}: {REFUSED[model_type]}")
    if model_type not in FAMILIES:
        sys.exit(f"nemo_baseline.py: {config_path}: model_type {model_type!r}; this baseline covers "
                 + ", ".join(sorted(FAMILIES)))
    module, name, torch_attn = FAMILIES[model_type]
    return getattr(importlib.import_module(module), name), torch_attn


def backends(device, torch_attn):
    """The fastest of NeMo AutoModel's backends that import here (its defaults pick TE when present)."""
    from nemo_automodel.components.models.common.utils import BackendConfig
    have_te = importlib.util.find_spec("transformer_engine") is not None and device == "cuda"
    return BackendConfig(attn="te" if have_te else torch_attn, linear="te" if have_te else "torch",
                         rms_norm="te" if have_te else "torch", experts="torch_mm", dispatcher="torch",
                         rope_fusion=False, enable_hf_state_dict_adapter=False)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config", help="a Qwen3-MoE, DeepSeek-V3 or GPT-OSS config.json (or a folder holding one)")
    ap.add_argument("--layers", type=int)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--routing", choices=["native", "balanced"], default="native")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (a smoke test of this script)")
    a = ap.parse_args()

    from transformers import AutoConfig
    import transformers

    cfg = AutoConfig.from_pretrained(a.config)
    model_cls, torch_attn = model_class(a.config, cfg.model_type)
    import nemo_automodel
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
    be = backends(a.device, torch_attn)
    be.fake_balanced_gate = a.routing == "balanced"
    torch.manual_seed(a.seed)
    with dev:
        model = model_cls.from_config(cfg, backend=be)
    model.initialize_weights(buffer_device=dev, dtype=torch.bfloat16)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=on_gpu)

    def forward_loss(ids):  # Transformers' causal-LM loss: position t predicts token t + 1, in fp32
        logits = model(ids).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())

    timing = time_steps(forward_loss, opt, cfg.vocab_size, a.batch, a.seq, a.warmup, a.steps, dev, a.seed)
    r = {
        "impl": "nemo_automodel", "nemo_automodel": nemo_automodel.__version__, "transformers": transformers.__version__,
        "torch": torch.__version__, "device": torch.cuda.get_device_name() if on_gpu else "cpu", "config": a.config,
        "layers": cfg.num_hidden_layers, "params": sum(p.numel() for p in model.parameters()),
        "param_dtypes": {str(d).replace("torch.", ""): sum(p.numel() for p in model.parameters() if p.dtype == d)
                         for d in {p.dtype for p in model.parameters()}},
        "seq": a.seq, "batch": a.batch, "routing": a.routing, "precision": "bf16",
        "backends": {"attn": be.attn, "linear": be.linear, "rms_norm": be.rms_norm, "experts": be.experts,
                     "dispatcher": be.dispatcher, "fake_balanced_gate": be.fake_balanced_gate},
        **timing,
    }
    print_row("nemo_automodel", with_flops(r, flops_per_token(cfg, a.seq)))

if __name__ == "__main__":
    main()
