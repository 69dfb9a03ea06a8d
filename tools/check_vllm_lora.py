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
LoRA manager does before serving. On models vLLM marks `is_3d_moe_weight` (GPT-OSS) the experts'
adapters are PEFT's target_parameters tensors (`experts.base_layer` = gate_up, `experts` = down),
which vLLM's manager reshapes per expert in LoRAModelManager._stack_moe_lora_weights: that very
method is run here (on stand-ins for the manager and the MoE layer) to get vLLM's per-expert A and B.
With --merged (the folder `moeforge merge` wrote from the same
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
import types


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
    from vllm.lora.model_manager import LoRAModelManager
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
        try:
            with torch.device("meta"):
                model = cls(vllm_config=vc, prefix="")
        except NotImplementedError as e:
            # vLLM picks a MoE kernel backend while it builds the experts and finds none for the CPU
            # (GPT-OSS): the class is built again with that choice stubbed out, which changes no
            # module or name (only the kernel a forward would run, and nothing runs here).
            print(f"note: vLLM on the CPU: {e} -- building {cls.__name__} with its MoE kernel choice stubbed")
            import vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method as um
            um.select_unquantized_moe_backend = lambda moe_config: (None, None)
            vc = VllmConfig(model_config=mc, device_config=DeviceConfig(device="cpu"))  # (the first try registered layers)
            with set_current_vllm_config(vc), torch.device("meta"):
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
    rename = mapper.get_rename_mapper() if mapper else None

    def vname(m):  # the module's name in vLLM (its hf_to_vllm_mapper's renames, e.g. GPT-OSS's self_attn -> attn)
        return rename._map_name(m) if rename else m

    missing = [m for m in modules if vname(m) not in lora.loras]
    if missing:
        sys.exit(f"FAIL: vLLM loaded {len(lora.loras)} modules; not these of the adapter: {missing[:5]}")
    scale = cfg["lora_alpha"] / (cfg["r"] ** 0.5 if cfg.get("use_rslora") else cfg["r"])
    is_3d = bool(getattr(model, "is_3d_moe_weight", False))
    # PEFT's target_parameters adapters on the fused experts (one tensor for all experts of a layer)
    fused = [m for m in modules if m.endswith(".experts") or m.endswith(".experts.base_layer")]
    for m in modules:
        if m in fused:  # one tensor for all experts: checked per expert below
            continue
        w = lora.loras[vname(m)]
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
        if ".experts." not in m and m not in fused:
            w = lora.loras[vname(m)]
            deltas[m + ".weight"] = (w.lora_b.float() @ w.lora_a.float()) * w.scaling
    # The routed experts, packed per layer as vLLM's manager does (_create_merged_loras_inplace).
    layers = sorted({m.split(".experts.")[0] + ".experts" for m in modules if ".experts." in m and m not in fused})
    for layer in layers:
        prefix = layer[: -len(".experts")]
        names = [prefix + "." + r for r in packed["experts"]]
        subs = [lora.loras.get(vname(n)) for n in names]
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
    # 3-D expert adapters through vLLM's own reshaping (the scaling folded into B first, as vLLM's
    # _create_merged_loras_inplace does before it stacks).
    transposed = model.config.model_type == "gpt_oss"  # Transformers keeps these [E, in, out] (is_transposed)
    experts_n = getattr(model.config, "num_local_experts", None) or getattr(model.config, "num_experts", None)
    for layer in sorted({m[: -len(".base_layer")] if m.endswith(".base_layer") else m for m in fused}):
        for m in (layer, layer + ".base_layer"):
            lora.loras[vname(m)].optimize()
        manager = types.SimpleNamespace(_is_3d_moe_model=is_3d, model=model,
                                        _get_lora_layer_weights=lambda lm, name: lm.get_lora(name),
                                        _pop_lora_weights=lambda lm, names: [lm.loras.pop(n, None) for n in names])
        moe = types.SimpleNamespace(w13_lora_a_stacked=[torch.empty(1, experts_n)], global_num_experts=experts_n,
                                    local_num_experts=experts_n, ep_rank=0)
        if not is_3d:
            # A model whose experts vLLM keeps per expert takes these only with
            # --enable-mixed-moe-lora-format and is_3d_lora_weight=True on the request: its manager
            # converts them per expert (w1 gate, w2 down, w3 up) in _convert_3d_to_2d_moe_lora.
            LoRAModelManager._convert_3d_to_2d_moe_lora(manager, lora, moe, vname(layer))
            w = lora.loras[vname(layer)]
            prefix = layer[: -len(".experts")]
            names = [prefix + "." + r for r in packed["experts"]]  # per expert: w1, w2, w3
            for i, n in enumerate(names):
                which, expert = i % 3, i // 3
                deltas[n + ".weight"] = w.lora_b[which][expert].float() @ w.lora_a[which][expert].float()
            print(f"ok: {layer}: with enable_mixed_moe_lora_format vLLM converts the 3-D adapters to {experts_n} "
                  f"experts x (w1, w2, w3), A {tuple(w.lora_a[0].shape)}, B {tuple(w.lora_b[0].shape)}")
            continue
        LoRAModelManager._stack_moe_lora_weights(manager, lora, moe, vname(layer))
        w = lora.loras[vname(layer)]
        for which, name in ((0, "gate_up_proj"), (1, "down_proj")):
            a_e, b_e = w.lora_a[which].float(), w.lora_b[which].float()  # (E, r, in), (E, out, r)
            if a_e.shape[1] != cfg["r"]:
                sys.exit(f"FAIL: {layer}: vLLM's per-expert rank is {a_e.shape[1]}, the adapter's {cfg['r']}")
            d = b_e @ a_e  # (E, out, in)
            deltas[f"{layer}.{name}"] = d.transpose(1, 2) if transposed else d
        print(f"ok: {layer}: vLLM stacks {experts_n} experts' 3-D adapters: gate_up A {tuple(w.lora_a[0].shape)}, "
              f"B {tuple(w.lora_b[0].shape)}; down A {tuple(w.lora_a[1].shape)}, B {tuple(w.lora_b[1].shape)}")
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
