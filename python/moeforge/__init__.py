"""moeforge from Python, in the shapes Transformers users write:

    import moeforge
    model = moeforge.AutoModelForCausalLM.from_pretrained("Qwen3-30B-A3B", device="cuda", dtype="bfloat16")
    out = model(input_ids, labels=input_ids)          # out.loss, out.logits (NumPy; torch.from_dlpack works)
    ids = model.generate(input_ids, max_new_tokens=32)
    model.save_pretrained("out/")

    moeforge.train("recipe.yaml", steps=100)           # or a dict with the CLI's recipe keys
    tok = moeforge.load_tokenizer("Qwen3-30B-A3B")

Errors are moeforge.Error (a RuntimeError) with the CLI's one-line messages.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Iterable, Optional

import numpy as np

from . import _moeforge
from ._moeforge import Error, cuda_device_count

__all__ = ["AutoModelForCausalLM", "CausalLM", "CausalLMOutput", "Error", "Tokenizer", "Trainer", "cuda_device_count",
           "load_tokenizer", "train"]
__version__ = "0.1.0"


def _ids(x, name: str) -> np.ndarray:
    """input_ids / labels from a list, NumPy array or torch tensor as a C-contiguous int64 [batch, seq] array."""
    if hasattr(x, "detach"):  # torch (any device)
        x = x.detach().cpu().numpy()
    a = np.ascontiguousarray(np.asarray(x, dtype=np.int64))
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2:
        raise Error(f"{name} must be [batch, seq] token ids, got shape {a.shape}")
    return a


def _from_device_array(a):
    """GPU logits as a torch CUDA tensor sharing their memory (DLPack, no copy), where torch is installed."""
    try:
        import torch
    except ImportError:
        return a
    return torch.from_dlpack(a)


@dataclasses.dataclass
class CausalLMOutput:
    loss: Optional[float]
    # [batch, seq, vocab] float32 without a copy: a NumPy array for a model on the CPU; for one on the
    # GPU a torch CUDA tensor over the model's own buffer (without torch installed, the DLPack array
    # itself, which a DLPack consumer such as cupy.from_dlpack takes once).
    logits: Optional[Any]
    aux_loss: Optional[float] = None
    loss_tokens: int = 0


class CausalLM:
    """A loaded model (moeforge.AutoModelForCausalLM.from_pretrained)."""

    def __init__(self, impl: _moeforge.Model):
        self._m = impl
        self.config = json.loads(impl.config_json())
        self.device = impl.device
        self.rank, self.world_size = impl.rank, impl.world_size  # 0 and 1 unless loaded with ep_size > 1
        self.name_or_path = impl.source_dir

    def __call__(self, input_ids, labels=None, attention_mask=None, return_logits: bool = True) -> CausalLMOutput:
        """Logits and, with labels, Transformers' shifted causal-LM loss (-100 ignored; plus the
        load-balancing term when the config asks for it). attention_mask: all ones, or None (rows are
        not padded here: right-pad with labels -100 instead). return_logits=False: the loss only,
        without materialising [batch, seq, vocab] logits."""
        ids = _ids(input_ids, "input_ids")
        if attention_mask is not None and not np.all(_ids(attention_mask, "attention_mask") == 1):
            raise Error("attention_mask with zeros is not supported: pad on the right and set those labels to -100")
        lab = None if labels is None else _ids(labels, "labels")
        loss, logits, aux, n = self._m.forward(ids, lab, return_logits or labels is None)
        if logits is not None and self.device == "cuda":
            logits = _from_device_array(logits)
        return CausalLMOutput(loss=loss, logits=logits, aux_loss=aux, loss_tokens=n)

    forward = __call__

    def generate(self, input_ids, max_new_tokens: Optional[int] = None, do_sample: Optional[bool] = None,
                 temperature: Optional[float] = None, top_k: Optional[int] = None, top_p: Optional[float] = None,
                 repetition_penalty: Optional[float] = None, eos_token_id=None, min_new_tokens: int = 0,
                 seed: int = 0, streamer: Optional[Callable[[int], Optional[bool]]] = None, attention_mask=None,
                 pad_token_id: Optional[int] = None, max_batch: int = 8) -> np.ndarray:
        """Transformers' generate: returns [B, prompt + new] ids. Defaults come from the folder's
        generation_config.json as in Transformers (do_sample, temperature, top_k 50, top_p,
        repetition_penalty, eos_token_id, max_new_tokens, else 20 new tokens). A batch (B > 1, or an
        `attention_mask` with zeros) is left-padded as for Transformers: each row's prompt is its
        tokens under mask 1, generated as alone (up to `max_batch` rows per model step), and rows
        that end early are filled with `pad_token_id` (default: the folder's pad token, else the
        first eos id). `streamer(id)` (batch 1 only) sees each new token; returning False stops."""
        ids = _ids(input_ids, "input_ids")
        eos = None if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
        args = (None if max_new_tokens is None else int(max_new_tokens), int(min_new_tokens), eos,
                None if do_sample is None else bool(do_sample), None if temperature is None else float(temperature),
                None if top_k is None else int(top_k), None if top_p is None else float(top_p),
                None if repetition_penalty is None else float(repetition_penalty), int(seed))
        mask = None if attention_mask is None else np.asarray(attention_mask)
        if mask is not None and mask.shape != ids.shape:
            raise Error(f"attention_mask {list(mask.shape)} must have input_ids' shape {list(ids.shape)}")
        if ids.shape[0] == 1 and (mask is None or mask.all()):
            new, _ = self._m.generate(ids[0].tolist(), *args, streamer)
            return np.asarray([ids[0].tolist() + list(new)], dtype=np.int64)
        if streamer is not None:
            raise Error(f"generate: a streamer takes one sequence; got a batch of {ids.shape[0]}")
        prompts = []
        for i, row in enumerate(ids):
            m = np.ones(row.shape, dtype=bool) if mask is None else mask[i].astype(bool)
            first = int(np.argmax(m)) if m.any() else len(m)
            if first == len(m) or not m[first:].all():
                raise Error(f"attention_mask row {i}: pad on the left (zeros, then ones) with at least one token")
            prompts.append(row[first:].tolist())
        new, pad = self._m.generate_many(prompts, *args, int(max_batch))
        pad = pad if pad_token_id is None else int(pad_token_id)
        longest = max(len(n) for n in new)
        if pad is None and any(len(n) < longest for n in new):
            raise Error("generate: rows ended at different lengths and the model has no pad_token_id; pass pad_token_id")
        return np.asarray([row.tolist() + list(n) + [pad] * (longest - len(n)) for row, n in zip(ids, new)], dtype=np.int64)

    def save_pretrained(self, save_directory: str, max_shard_size: str = "5GB") -> None:
        """A standard Hugging Face folder: the source's tensor names, layout and dtypes (atomic)."""
        self._m.save_pretrained(str(save_directory), max_shard_size, True)

    def num_parameters(self, only_active: bool = False) -> int:
        return self._m.active_parameters() if only_active else self._m.num_parameters()

    def __repr__(self) -> str:
        return f"moeforge.CausalLM({self.config.get('model_type')}, {self.num_parameters():,} parameters, {self.device})"


class AutoModelForCausalLM:
    @staticmethod
    def from_pretrained(pretrained_model_name_or_path, device: str = "cpu", dtype: str = "float32",
                        adapter: Optional[str] = None, ep_size: int = 1, zero_stage: int = 1, **kwargs) -> CausalLM:
        """A Hugging Face model folder (config.json + safetensors; both config spellings). device
        'cpu' (float32) or 'cuda' (float32 or bfloat16 weights for inference). `adapter`: a PEFT
        LoRA folder applied unmerged. ep_size > 1: run the same script under torchrun / srun /
        `moeforge launch`; each rank loads only its share of the experts (world size / ep_size
        groups), every rank calls the model (each with its own batch), generate (its own prompt; the
        ranks step together until all are done) and save_pretrained together,
        which writes one standard folder. zero_stage shards optimizer state for training (moeforge.train);
        a model loaded here keeps its dense weights whole (1)."""
        if kwargs:
            raise Error(f"from_pretrained: unknown argument(s) {sorted(kwargs)}")
        if zero_stage != 1:
            raise Error(f"from_pretrained: zero_stage {zero_stage} shards optimizer state and dense weights for training; "
                        "run moeforge.train (a recipe with zero_stage) for that, or pass zero_stage=1")
        dtype = {"bf16": "bfloat16", "fp32": "float32"}.get(str(dtype).replace("torch.", ""), str(dtype).replace("torch.", ""))
        return CausalLM(_moeforge.Model.from_pretrained(os.fspath(pretrained_model_name_or_path), device, dtype,
                                                        os.fspath(adapter) if adapter else "", int(ep_size)))


def _recipe_args(recipe, overrides: dict) -> tuple:
    """(yaml text, origin, base folder, key=value overrides) from a YAML path or a dict."""
    over = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in overrides.items()]
    if isinstance(recipe, dict):
        return json.dumps(recipe), "recipe (dict)", os.getcwd(), over
    path = os.fspath(recipe)
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise Error(f"{path}: cannot open recipe ({e.strerror})") from None
    return text, path, os.path.dirname(os.path.abspath(path)), over


class Trainer:
    """moeforge's trainer from Python: the CLI's recipe keys (a dict or a YAML path, plus keyword
    overrides with dots written as in the CLI: Trainer(r, **{"optimizer.lr": 1e-4})). `on_step(metrics)`
    is called after every optimizer step with {"step", "total_steps", "loss", "lr", "grad_norm",
    "tokens", ...}; `on_eval(metrics)` after each validation with {"step", "eval_loss"}."""

    def __init__(self, recipe, on_step: Optional[Callable[[dict], Any]] = None,
                 on_eval: Optional[Callable[[dict], Any]] = None, **overrides):
        self._args = _recipe_args(recipe, overrides)
        self.on_step, self.on_eval = on_step, on_eval

    def train(self) -> dict:
        """Runs the recipe; returns {"steps_done", "losses", "final_dir", "output_dir"}."""
        yaml, origin, base, over = self._args
        return _moeforge.train(yaml, origin, base, over, self.on_step, self.on_eval)


def train(recipe, on_step: Optional[Callable[[dict], Any]] = None, **overrides) -> dict:
    """moeforge train RECIPE key=value ... from Python (see Trainer)."""
    return Trainer(recipe, on_step=on_step, **overrides).train()


class Tokenizer:
    """A tokenizer.json (and the folder's chat template), as the tokenizers library and
    apply_chat_template compute them."""

    def __init__(self, path: str):
        self.path = os.fspath(path)
        self._t = _moeforge.Tokenizer.load(self.path)

    def encode(self, text: str, add_special_tokens: bool = True) -> list:
        return self._t.encode(text, add_special_tokens)

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        ids = self.encode(text, add_special_tokens)
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self._t.decode([int(i) for i in ids], skip_special_tokens)

    def apply_chat_template(self, messages: list, add_generation_prompt: bool = False, tokenize: bool = True,
                            return_assistant_tokens_mask: bool = False, chat_template: Optional[str] = None):
        text, ids, mask = _moeforge.apply_chat_template(self._t, self.path, json.dumps(messages), add_generation_prompt,
                                                        chat_template or "")
        if not tokenize:
            return text
        if return_assistant_tokens_mask:
            return {"input_ids": ids, "assistant_masks": mask}
        return ids

    def convert_tokens_to_ids(self, token: str) -> Optional[int]:
        return self._t.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self._t.vocab_size()


def load_tokenizer(path) -> Tokenizer:
    return Tokenizer(path)
