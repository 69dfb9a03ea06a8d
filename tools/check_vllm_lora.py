#!/usr/bin/env python3
"""Loads a moeforge LoRA adapter folder with vLLM's own LoRA loader, on the CPU, the way vLLM's
worker does before serving it: vLLM's model class for the base folder is built on the meta device
(no weights, no GPU) to list the modules vLLM can put LoRA on (its packed modules expanded, as
vllm/lora/worker_manager.py does), the adapter_config.json is read and validated by vLLM's
PEFTHelper against a LoRAConfig of the adapter's rank, and LoRAModel.from_local_checkpoint reads the
tensors (it raises on any module vLLM does not expect). Then every adapter module must be among the
loaded ones, with its rank and scaling, and B @ A as in the file.

    python3 -m venv /tmp/vvenv && /tmp/vvenv/bin/pip install vllm
    /tmp/vvenv/bin/python tools/check_vllm_lora.py --base tests/fixtures/qwen3_moe_a --adapter RUN/final

Prints one line per check; exits 1 on the first failure. (vLLM 0.33.0 when written.)"""
import argparse
import json
import os
import sys


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="the base model folder (config.json)")
    ap.add_argument("--adapter", required=True, help="the PEFT adapter folder moeforge wrote")
    a = ap.parse_args()
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    import torch
    import vllm
    from safetensors.torch import load_file
    from vllm.config import DeviceConfig, LoRAConfig, ModelConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper
    from vllm.lora.utils import get_supported_lora_modules
    from vllm.model_executor.models.registry import ModelRegistry

    mc = ModelConfig(model=a.base, tokenizer=a.base, dtype="float32", skip_tokenizer_init=True, enforce_eager=True)
    vc = VllmConfig(model_config=mc, device_config=DeviceConfig(device="cpu"))
    with set_current_vllm_config(vc):
        init_distributed_environment(world_size=1, rank=0, local_rank=0,
                                     distributed_init_method="tcp://127.0.0.1:%d" % (29000 + os.getpid() % 1000),
                                     backend="gloo")
        initialize_model_parallel(1, 1)
        cls, _ = ModelRegistry.resolve_model_cls(mc.architectures, mc)
        with torch.device("meta"):
            model = cls(vllm_config=vc, prefix="")
    supported = get_supported_lora_modules(model)
    packed = getattr(model, "packed_modules_mapping", {}) or {}
    expected = set()
    for m in supported:  # vllm/lora/worker_manager.py's expansion
        expected.update(packed.get(m, [m]))
        if m == "experts":
            expected.add(m)
    print(f"vLLM {vllm.__version__}: {cls.__name__} takes LoRA on {sorted(expected)}")

    cfg = json.load(open(os.path.join(a.adapter, "adapter_config.json")))
    peft = PEFTHelper.from_local_dir(a.adapter, mc.max_model_len)
    peft.validate_legal(LoRAConfig(max_lora_rank=max(8, int(cfg["r"])), max_loras=1))
    mapper = getattr(model, "hf_to_vllm_mapper", None)
    lora = LoRAModel.from_local_checkpoint(a.adapter, expected, peft_helper=peft, lora_model_id=1, device="cpu",
                                           dtype=torch.float32, model_vocab_size=model.config.vocab_size,
                                           weights_mapper=mapper.get_rename_mapper() if mapper else None,
                                           skip_prefixes=getattr(model, "lora_skip_prefixes", None))
    tensors = load_file(os.path.join(a.adapter, "adapter_model.safetensors"))
    modules = sorted({k[len("base_model.model."):].rsplit(".lora_", 1)[0] for k in tensors})
    missing = [m for m in modules if m not in lora.loras]
    if missing:
        sys.exit(f"FAIL: vLLM loaded {len(lora.loras)} modules; not these of the adapter: {missing[:5]}")
    scale = cfg["lora_alpha"] / (cfg["r"] ** 0.5 if cfg.get("use_rslora") else cfg["r"])
    for m in modules:
        w = lora.loras[m]
        a_file, b_file = tensors[f"base_model.model.{m}.lora_A.weight"], tensors[f"base_model.model.{m}.lora_B.weight"]
        if w.rank != cfg["r"]:
            sys.exit(f"FAIL: {m}: rank {w.rank} in vLLM, {cfg['r']} in adapter_config.json")
        # vLLM folds the scaling into B when it optimises the weights; compare the products.
        got = (w.lora_b.float() @ w.lora_a.float()) * (w.scaling if hasattr(w, "scaling") else 1.0)
        want = (b_file.float() @ a_file.float()) * scale
        if not torch.allclose(got, want, rtol=1e-5, atol=1e-7):
            sys.exit(f"FAIL: {m}: vLLM's B @ A differs from the file's (max {float((got - want).abs().max()):.3g})")
    print(f"ok: vLLM's LoRA loader took all {len(modules)} modules of {a.adapter} (rank {cfg['r']}, scaling {scale:g})")


if __name__ == "__main__":
    main()
