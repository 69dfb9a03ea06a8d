#!/usr/bin/env python3
"""Write tokenizer.json fixtures in the styles of real MoE checkpoints, plus reference encodings
made by the Hugging Face `tokenizers` library, for moeforge's tokenizer parity tests.

    pip install tokenizers && python3 tools/make_tokenizer_fixtures.py --out tests/fixtures/tokenizers

No hub is reachable from here, so each tokenizer is *trained* (BpeTrainer, small vocabulary) on a
multilingual corpus, with the normalizer, pre-tokenizer (the exact split regexes), post-processor,
decoder and added tokens of the model family it imitates. Writes <style>/tokenizer.json and
<style>/reference.json: {"tokenizers": version, "cases": [{"text", "add_special_tokens", "ids",
"tokens", "decoded"}]}.
"""
import argparse
import json
import os

import tokenizers
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers, Regex

QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                  r"\s*[\r\n]+|\s+(?!\S)|\s+")
O200K_PATTERN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                 r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+"
                 r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
DEEPSEEK_DIGITS = r"\p{N}{1,3}"
DEEPSEEK_CJK = "[一-龥\u3040-ゟ゠-ヿ]+"  # as in the hub file: the JSON escape is the character itself
DEEPSEEK_PATTERN = (r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|"
                    r"\s*[\r\n]+|\s+(?!\S)|\s+")

CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's 12:45 and we've got 3,141,592 reasons!",
    "I'LL say it AGAIN: they'd rather not. Don't you think so? WE'RE here, you're there.",
    "def train(model, lr=1e-4):\n\tfor step in range(100):\n\t\tloss = model(x)\n    return loss  # done\r\n",
    "Съешь же ещё этих мягких французских булок, да выпей чаю. Привет, мир!",
    "Ξεσκεπάζω την ψυχοφθόρα βδελυγμία. Γειά σου Κόσμε!",
    "我能吞下玻璃而不伤身体。你好，世界！机器学习很有趣。日本語のテキストもあります。カタカナ、ひらがな。",
    "한국어 텍스트도 있습니다. 안녕하세요 세계!",
    "Emoji: 👋🏽 👨‍👩‍👧‍👦 🏳️‍🌈 ❤️ 🇫🇷 and combining marks: e\u0301 a\u0308 n\u0303 Å",
    "Numbers 1234567890 0.001 -42 1e10 ٣٤٥ ⅷ 𝟙𝟚𝟛",
    "Tabs\tand   runs of    spaces\n\n\nand newlines\r\n\r\nCRLF too.   ",
    "Mixed CamelCaseWords and snake_case_words, URLs like https://example.com/a/b?c=d&e=f.",
    "مرحبا بالعالم. हिन्दी पाठ। ไทยภาษา עברית",
] * 20

TESTS = [
    "Hello world",
    " Hello  world ",
    "The quick brown fox jumps over the lazy dog.",
    "I'LL, you're, WE'VE, it's, they'd, she'll, I'm",
    "Съешь же ещё этих мягких французских булок",
    "Γειά σου Κόσμε! Ξεσκεπάζω",
    "你好，世界！我能吞下玻璃而不伤身体。日本語のカタカナ",
    "👋🏽 👨‍👩‍👧‍👦 🏳️‍🌈 family emoji with ZWJ",
    "e\u0301 combining a\u0308 marks n\u0303 and precomposed é ä ñ",
    "tabs\there\t\tand\n\nnewlines\r\nCRLF\r\n",
    "   leading and trailing spaces   ",
    "digits 1234567890 and 3.14159 and ٣٤٥",
    "code: for (int i = 0; i < n; ++i) { x += y[i]; }",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "special<|endoftext|>inside text and <|im_start|> with spaces",
    "mixedCase WORDS And Contractions DON'T WON'T",
    "",
    "a",
    "\n",
    "🙂",
]


def byte_level(name, pattern, specials, bos=None, extra_splits=(), normalizer=None, ignore_merges=False,
               vocab=600, trim_offsets=False):
    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    if normalizer is not None:
        tok.normalizer = normalizer
    splits = [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in extra_splits]
    splits.append(pre_tokenizers.Split(Regex(pattern), behavior="isolated"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        splits + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False, trim_offsets=trim_offsets)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=specials, show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    if bos:
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1",
                                          special_tokens=[(bos, tok.token_to_id(bos))])])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def sentencepiece_bpe(vocab=400):
    """Llama-2 / Mixtral style: '▁' for spaces, byte fallback for unknown characters, BOS added."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab + 259, special_tokens=specials, show_progress=False,
                                  limit_alphabet=150)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    # Byte tokens are ordinary vocabulary entries in Llama's tokenizer.json, not added tokens.
    data = json.loads(tok.to_str())
    data["added_tokens"] = [t for t in data["added_tokens"] if not t["content"].startswith("<0x")]
    tok = Tokenizer.from_str(json.dumps(data))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B:1",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return tok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    qwen_specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    styles = {
        "qwen3": byte_level("qwen3", QWEN_PATTERN, qwen_specials, normalizer=normalizers.NFC()),
        "llama3": byte_level("llama3", LLAMA3_PATTERN, ["<|begin_of_text|>", "<|end_of_text|>"],
                             bos="<|begin_of_text|>", ignore_merges=True, trim_offsets=True),
        "o200k": byte_level("o200k", O200K_PATTERN, ["<|startoftext|>", "<|endoftext|>", "<|return|>"]),
        "deepseek_v3": byte_level("deepseek_v3", DEEPSEEK_PATTERN, ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"],
                                  bos="<｜begin▁of▁sentence｜>", extra_splits=(DEEPSEEK_DIGITS, DEEPSEEK_CJK)),
        "mixtral": sentencepiece_bpe(),
    }
    # Non-special added tokens with the flags real tokenizers use, so their matching is tested too.
    styles["qwen3"].add_tokens([tokenizers.AddedToken("<think>", special=False, normalized=False),
                                tokenizers.AddedToken("</think>", special=False, normalized=False)])
    styles["llama3"].add_special_tokens([tokenizers.AddedToken("<|eot_id|>", lstrip=False, rstrip=False)])
    styles["mixtral"].add_special_tokens([tokenizers.AddedToken("[INST]", lstrip=True, rstrip=True),
                                         tokenizers.AddedToken("[/INST]", lstrip=True, rstrip=True)])
    extra = ["<think>reasoning</think> answer", "[INST] hello [/INST] world", "x<|eot_id|>y",
             "<｜begin▁of▁sentence｜>hi<｜end▁of▁sentence｜>"]
    for name, tok in styles.items():
        folder = os.path.join(args.out, name)
        os.makedirs(folder, exist_ok=True)
        tok.save(os.path.join(folder, "tokenizer.json"))
        cases = []
        for text in TESTS + extra:
            for add in (False, True):
                enc = tok.encode(text, add_special_tokens=add)
                cases.append({"text": text, "add_special_tokens": add, "ids": enc.ids, "tokens": enc.tokens,
                              "decoded": tok.decode(enc.ids, skip_special_tokens=False),
                              "decoded_skip_special": tok.decode(enc.ids, skip_special_tokens=True)})
        with open(os.path.join(folder, "reference.json"), "w") as f:
            json.dump({"tokenizers": tokenizers.__version__, "cases": cases}, f, ensure_ascii=False, indent=0)
        print(name, "vocab", tok.get_vocab_size(), "cases", len(cases))


if __name__ == "__main__":
    main()
