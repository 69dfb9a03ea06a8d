#!/usr/bin/env python3
"""Loads a moeforge LoRA adapter folder with vLLM's own LoRA loader, on the CPU, the way vLLM's
worker does before serving it: vLLM's model class for the base folder is built on the meta device
(no weights, no GPU) to list the modules vLLM can put LoRA on (its packed modules expanded, as
vllm/lora/worker_manager.py does), the adapter_config.json is read and validated by vLLM's
PEFTHelper against a LoRAConfig of the adapter's rank, and LoRAModel.from_local_checkpoint reads the
tensors (it raises on any module vLLM does not expect). The modules vLLM takes are listed as its
worker lists them (vllm/lora/utils.py process_packed_modules_mapping: on a model whose experts are
per-expert modules in vLLM, e.g. Qwen3-MoE, Mixtral, DeepSeek-V3, OLMoE, "experts" expands to
"experts.<i>.<gate|down|up>"). Then every adapter module must be among the loaded ones, with its
rank and scaling, and B @ A as in the file; the routed experts' adapters are packed per layer with
vLLM's own PackedLoRALayerWeights.pack_moe in vLLM's expert order (w1 gate, w2 down, w3 up), as its
LoRA manager does before serving. With --merged (the folder `moeforge merge` wrote from the same
base and adapter), every delta vLLM would add (scaling B A, per expert and projection from the
packed tensors) must equal merged - base for the weight it adapts.

    python3 -m venv /tmp/vvenv && /tmp/vvenv/bin/pip install vllm
    /tmp/vvenv/bin/python tools/check_vllm_lora.py --base tests/fixtures/qwen3_moe_a --adapter RUN/final

Prints one line per check; exits 1 on the first failure. (vLLM 0.33.0 when written.)"""
import argparse
import json
import os
import re
import sys


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="the base model folder (config.json)")
    ap.add_argument("--adapter", required=True, help="the PEFT adapter folder moeforge wrote")
    ap.add_argument("--merged", help="the folder `moeforge merge --model BASE --adapter ADAPTER` wrote")
    a = ap.parse_args()
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    import torch
    import vllm
    from safetensors.torch import load_file
    from vllm.config import DeviceConfig, LoRAConfig, ModelConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper
    from vllm.lora.lora_weights import PackedLoRALayerWeights
    from vllm.lora.utils import get_supported_lora_modules, process_packed_modules_mapping
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
    packed = process_packed_modules_mapping(model)  # as vLLM's LoRA model manager builds it
    expected = set()
    for m in supported:  # vllm/lora/worker_manager.py's expansion
        expected.update(packed.get(m, [m]))
        if m == "experts":
            expected.add(m)
    shown = sorted(e for e in expected if not re.match(r"experts\.\d+\.", e))
    n_expert = sum(1 for e in expected if re.match(r"experts\.\d+\.", e))
    print(f"vLLM {vllm.__version__}: {cls.__name__} takes LoRA on {shown}" +
          (f" and {n_expert} per-expert names (experts.<i>.<proj>)" if n_expert else ""))

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
    deltas = {}  # HF weight name -> the delta vLLM adds to it
    for m in modules:
        if ".experts." not in m:
            w = lora.loras[m]
            deltas[m + ".weight"] = (w.lora_b.float() @ w.lora_a.float()) * w.scaling
    # The routed experts, packed per layer as vLLM's manager does (_create_merged_loras_inplace).
    layers = sorted({m.split(".experts.")[0] + ".experts" for m in modules if ".experts." in m})
    for layer in layers:
        prefix = layer[: -len(".experts")]
        names = [prefix + "." + r for r in packed["experts"]]
        subs = [lora.loras.get(n) for n in names]
        missing = [n for n, w in zip(names, subs) if w is None]
        if missing:
            sys.exit(f"FAIL: {layer}: vLLM's packing needs every expert's three projections; missing {missing[:3]}")
        pk = PackedLoRALayerWeights.pack_moe(subs, layer)
        pk.optimize()  # the scaling folded into B, as vLLM does before serving
        for i, n in enumerate(names):
            which = i % 3  # vLLM's order per expert: w1 (gate), w2 (down), w3 (up)
            expert = i // 3
            got = pk.lora_b[which][expert].float() @ pk.lora_a[which][expert].float()
            deltas[n + ".weight"] = got * pk.scaling[which]
        print(f"ok: {layer}: vLLM packs {len(names) // 3} experts x (w1, w2, w3), A {tuple(pk.lora_a[0].shape)}, "
              f"B {tuple(pk.lora_b[0].shape)}")
    if a.merged:
        base, merged = read_weights(a.base), read_weights(a.merged)
        worst = 0.0
        for name, d in deltas.items():
            if name not in base or name not in merged:
                sys.exit(f"FAIL: {name}: not a tensor of both {a.base} and {a.merged}")
            want = merged[name].float() - base[name].float()
            tol = 1e-5 * max(1.0, float(base[name].float().abs().max()))
            err = float((d - want).abs().max())
            worst = max(worst, err)
            if err > tol:
                sys.exit(f"FAIL: {name}: vLLM's delta differs from merged - base by {err:.3g}")
        untouched = [n for n in base if n not in deltas and not torch.equal(base[n], merged[n])]
        if untouched:
            sys.exit(f"FAIL: the merged folder changed weights no adapter module covers: {untouched[:3]}")
        largest = max(float(d.abs().max()) for d in deltas.values())
        if largest == 0:
            sys.exit("FAIL: every adapter delta is zero (B untrained?): the comparison would prove nothing")
        print(f"ok: every delta vLLM adds ({len(deltas)} weights, largest entry {largest:.2g}) equals merged - base "
              f"(max |diff| {worst:.2g})")
    print(f"ok: vLLM's LoRA loader took all {len(modules)} modules of {a.adapter} (rank {cfg['r']}, scaling {scale:g})")


def read_weights(folder):
    from safetensors.torch import load_file
    index = os.path.join(folder, "model.safetensors.index.json")
    files = sorted(set(json.load(open(index))["weight_map"].values())) if os.path.exists(index) else ["model.safetensors"]
    out = {}
    for f in files:  # the checkpoint's own files (a fixture folder holds reference tensors beside them)
        out.update(load_file(os.path.join(folder, f)))
    return out


if __name__ == "__main__":
    main()
