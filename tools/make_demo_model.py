#!/usr/bin/env python3
"""Write the demo's tiny chat model and its data: a byte-level BPE tokenizer trained on the task's
text (with ChatML special tokens and chat template), a randomly initialised Qwen3-MoE whose
vocabulary is that tokenizer's, and the task: "Count from A to B." answered "A A+1 ... B".
A random model answers with noise; `make demo` fine-tunes it for a minute on the CPU and asks
again (moeforge generate before and after).

    python3 tools/make_demo_model.py --out examples/demo_model --data examples/data
"""
import argparse
import json
import os
import random

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                 "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                 "{% endif %}")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def conversation(a, b):
    return [{"role": "user", "content": f"Count from {a} to {b}."},
            {"role": "assistant", "content": " ".join(str(i) for i in range(a, b + 1))}]


def rendered(messages):
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    pairs = [(a, a + n) for a in range(0, 90) for n in range(2, 8)]
    rng.shuffle(pairs)
    held_out, train = pairs[:24], pairs[24:]
    os.makedirs(args.data, exist_ok=True)
    for name, rows in (("count_chat.jsonl", train), ("count_chat_eval.jsonl", held_out)):
        with open(os.path.join(args.data, name), "w") as f:
            for a, b in rows:
                f.write(json.dumps({"messages": conversation(a, b)}) + "\n")

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = [rendered(conversation(a, b)) for a, b in pairs]
    tok.train_from_iterator(corpus, trainer)
    os.makedirs(args.out, exist_ok=True)
    tok.save(os.path.join(args.out, "tokenizer.json"))
    with open(os.path.join(args.out, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
                   "pad_token": "<|endoftext|>", "unk_token": None, "model_max_length": 128,
                   "chat_template": CHAT_TEMPLATE, "added_tokens_decoder": {
                       str(tok.token_to_id(t)): {"content": t, "special": True, "lstrip": False, "rstrip": False,
                                                 "normalized": False, "single_word": False} for t in SPECIAL}},
                  f, indent=2)

    import torch
    import transformers
    vocab = tok.get_vocab_size()
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False,
        max_position_embeddings=128, rms_norm_eps=1e-6, bos_token_id=None,
        eos_token_id=tok.token_to_id("<|im_end|>"), pad_token_id=tok.token_to_id("<|endoftext|>"))
    torch.manual_seed(args.seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    model.generation_config.eos_token_id = [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]
    model.generation_config.do_sample = False
    model.save_pretrained(args.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"{args.out}: Qwen3-MoE, {n} parameters, vocabulary {vocab}; {len(train)} training and "
          f"{len(held_out)} held-out conversations in {args.data}")


if __name__ == "__main__":
    main()
