#!/usr/bin/env python3
"""Reference renderings of chat templates by Hugging Face transformers, for moeforge's chat parity tests.

    pip install transformers jinja2 tokenizers && python3 tools/make_chat_fixtures.py

Reads the templates in tests/fixtures/chat/templates/ and the tokenizer fixtures in
tests/fixtures/tokenizers/, and writes tests/fixtures/chat/:
  <style>/tokenizer.json, tokenizer_config.json (or chat_template.jinja, the v5 layout)
  <style>/reference.json   apply_chat_template text, ids and (with {% generation %}) assistant masks
  jinja_cases.json         small templates and what transformers' Jinja environment renders for them
strftime_now is pinned to 2026-01-15 so renderings are reproducible (the C++ test pins the same).
"""
import copy
import datetime as real_datetime
import json
import os
import shutil
import sys

import transformers
from transformers import PreTrainedTokenizerFast
import transformers.utils.chat_template_utils as ctu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMPLATES = os.path.join(ROOT, "tests/fixtures/chat/templates")
TOKENIZERS = os.path.join(ROOT, "tests/fixtures/tokenizers")
OUT = os.path.join(ROOT, "tests/fixtures/chat")


class PinnedDatetime(real_datetime.datetime):
    @classmethod
    def now(cls, tz=None):
        return cls(2026, 1, 15, 12, 0, 0)


ctu.datetime = PinnedDatetime  # strftime_now() reads datetime.now()
ctu._cached_compile_jinja_template.cache_clear() if hasattr(ctu._cached_compile_jinja_template, "cache_clear") else None

# style -> (tokenizer fixture it extends, template, extra special tokens, bos, eos, layout)
STYLES = {
    "qwen3": ("qwen3", "qwen3.jinja", [], None, "<|im_end|>", "config"),
    "deepseek_v3": ("deepseek_v3", "deepseek_v3.jinja",
                    ["<｜User｜>", "<｜Assistant｜>", "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>",
                     "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>", "<｜tool▁outputs▁begin｜>",
                     "<｜tool▁outputs▁end｜>", "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"],
                    "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "config"),
    "mixtral": ("mixtral", "mixtral.jinja", [], "<s>", "</s>", "config"),
    "gpt_oss": ("o200k", "gpt_oss.jinja",
                ["<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|call|>", "<|constrain|>"],
                "<|startoftext|>", "<|return|>", "jinja"),
    "chatml_generation": ("qwen3", "chatml_generation.jinja", [], None, "<|im_end|>", "config"),
}

SYSTEM = "You are a careful assistant. Answer briefly."
BASIC = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "2 + 2 = 4."},
    {"role": "user", "content": "And times three?"},
    {"role": "assistant", "content": "That makes 12.\nAnything else?"},
]
MULTILINGUAL = [
    {"role": "system", "content": "Réponds en français — ou pas.\tTabs\r\nand CRLF."},
    {"role": "user", "content": "你好，世界！Привет, мир! Γειά σου. 👩‍👩‍👧‍👦 e\u0301  x"},
    {"role": "assistant", "content": "  Leading spaces, 123456 digits, DON'T stop; it's fine.  "},
    {"role": "user", "content": "한국어 テスト العربية"},
    {"role": "assistant", "content": "✓ done 🎉"},
]
THINKING = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "Is 91 prime?"},
    {"role": "assistant", "content": "<think>\n91 = 7 * 13.\n</think>\n\nNo, 91 = 7 × 13."},
    {"role": "user", "content": "Is 97 prime?"},
    {"role": "assistant", "content": "Yes, 97 is prime.", "reasoning_content": "Check 2, 3, 5, 7: none divide 97."},
]
OPEN = BASIC[:4]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
                "days": {"type": "integer"},
                "tags": {"type": "array", "items": {"type": "string"}},
            },
            "required": ["city"],
        },
    },
}
TOOLS_QWEN = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}}]},
    {"role": "tool", "content": "{\"temp\": 21.5, \"sky\": \"clear\"}"},
    {"role": "assistant", "content": "It is 21.5 °C and clear in Paris."},
]
TOOLS_DSV3 = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
    {"role": "tool", "content": "{\"temp\": 21.5}"},
    {"role": "assistant", "content": "21.5 °C in Paris."},
]
TOOLS_GPT = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "thinking": "Need the weather tool.", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}}]},
    {"role": "tool", "content": "{\"temp\": 21.5}"},
    {"role": "assistant", "content": "21.5 °C in Paris.", "thinking": "Report it."},
]
NOT_ALTERNATING = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]

CASES = {
    "qwen3": [
        ("basic", BASIC, {}, None), ("multilingual", MULTILINGUAL, {}, None), ("thinking", THINKING, {}, None),
        ("open_generation_prompt", OPEN, {"add_generation_prompt": True}, None),
        ("no_thinking_prompt", OPEN, {"add_generation_prompt": True, "enable_thinking": False}, None),
        ("tools", TOOLS_QWEN, {}, [WEATHER_TOOL]),
    ],
    "deepseek_v3": [
        ("basic", BASIC, {}, None), ("multilingual", MULTILINGUAL, {}, None), ("thinking", THINKING[:4] + [
            {"role": "assistant", "content": "<think>check</think>Yes."}], {}, None),
        ("open_generation_prompt", OPEN, {"add_generation_prompt": True}, None), ("tools", TOOLS_DSV3, {}, None),
        # transformers drops None-valued keys, so this template then reads an undefined 'content'
        ("tools_none_content", [dict(m, content=None) if "tool_calls" in m else m for m in TOOLS_DSV3], {}, None),
    ],
    "mixtral": [
        ("basic", BASIC, {}, None), ("multilingual", MULTILINGUAL, {}, None),
        ("open", OPEN, {"add_generation_prompt": True}, None), ("not_alternating", NOT_ALTERNATING, {}, None),
    ],
    "gpt_oss": [
        ("basic", BASIC, {}, None), ("multilingual", MULTILINGUAL, {}, None),
        ("open_generation_prompt", OPEN, {"add_generation_prompt": True, "reasoning_effort": "high"}, None),
        ("tools", TOOLS_GPT, {"builtin_tools": ["python"], "model_identity": "You are a test model."}, [WEATHER_TOOL]),
    ],
    "chatml_generation": [
        ("basic", BASIC, {}, None), ("multilingual", MULTILINGUAL, {}, None),
        ("open_generation_prompt", OPEN, {"add_generation_prompt": True}, None),
    ],
}

# Small templates exercising the Jinja features chat templates use, rendered by transformers'
# own environment (trim_blocks, lstrip_blocks, loopcontrols, its tojson and globals).
JINJA_CASES = [
    ("whitespace", "a  {% if x %}\n  b\n  {% endif %}\n{{ x }}  \n{#- comment -#}  c\n", {"x": 1}),
    ("whitespace_minus", "x {{- ' y ' -}} z\n{%- if 1 %} q {% endif -%}\n w", {}),
    ("lstrip_line_start", "line\n    {% if 1 %}in{% endif %}\n  {{ 'v' }}\n\t{# c #}\nend", {}),
    ("plus_keeps", "a\n  {%+ if 1 +%}\nb{% endif %}", {}),
    ("trailing_newline", "x\n", {}),
    ("crlf_source", "a\r\n{% if 1 %}\r\nb\r\n{% endif %}\r\nc", {}),
    ("raw", "{% raw %}{{ not rendered }}{% endraw %}!", {}),
    ("literals", "{{ none }}|{{ true }}|{{ [1, 'a', none, 1.5, True] }}|{{ {'a': 1, 'b': [2]} }}|{{ (1, 2) }}", {}),
    ("floats", "{{ 1/2 }} {{ 3.0 }} {{ 1e20 }} {{ 0.1 + 0.2 }} {{ 1e-5 }} {{ 2.5e-3 }} {{ 123456789.125 }}", {}),
    ("int_math", "{{ 7 // 2 }} {{ -7 // 2 }} {{ -7 % 3 }} {{ 2 ** 10 }} {{ 7 / 7 }} {{ 'ab' * 3 }} {{ 3 - 5 }}", {}),
    ("compare_logic", "{{ 1 < 2 < 3 }} {{ 1 == 1.0 }} {{ 'a' ~ 1 ~ none }} {{ not 0 }} {{ 0 or 'x' }} {{ 1 and 2 }} {{ 'b' in 'abc' }} {{ 3 not in [1, 2] }}", {}),
    ("conditional_expr", "{{ 'y' if x else 'n' }}{{ 'y' if not x else 'n' }}[{{ 'only' if false }}]", {"x": True}),
    ("string_methods", "{{ s.strip() }}|{{ s.lstrip() }}|{{ s.rstrip() }}|{{ s.split() }}|{{ 'a,b,,c'.split(',') }}|{{ 'a,b,c'.split(',', 1) }}|{{ 'a,b,c'.rsplit(',', 1) }}|{{ s.upper() }}|{{ s.lower() }}|{{ 'hello world'.title() }}|{{ 'xhix'.strip('x') }}|{{ s.replace('b', 'B') }}|{{ s.startswith(' a') }}|{{ s.endswith(('z', 'c ')) }}|{{ s.find('b') }}|{{ s.count(' ') }}|{{ '-'.join(['a', 'b']) }}", {"s": " a b\tc "}),
    ("rsplit_whitespace", "{{ s.rsplit(None, 1) }}|{{ s.rsplit(None, 0) }}|{{ '   '.rsplit(None, 1) }}|{{ 'x  y z'.rsplit(None, 2) }}", {"s": "  a b\t c  "}),
    ("unicode_index", "{{ s[0] }}|{{ s[-1] }}|{{ s[1:3] }}|{{ s[::-1] }}|{{ s|length }}|{{ s[::2] }}|{{ s[10:] }}|{{ [1,2,3,4][1:-1] }}|{{ [1,2,3][::-1] }}", {"s": "héllo→🎉"}),
    ("for_loop", "{% for x in xs %}{{ loop.index }}/{{ loop.index0 }}/{{ loop.revindex }}/{{ loop.first }}/{{ loop.last }}/{{ loop.length }}:{{ x }};{% endfor %}", {"xs": ["a", "b", "c"]}),
    ("for_else_filter", "{% for x in xs if x > 1 %}{{ x }}{% else %}empty{% endfor %}|{% for x in [] %}{{ x }}{% else %}none{% endfor %}", {"xs": [1, 2, 3]}),
    ("for_unpack_items", "{% for k, v in d.items() %}{{ k }}={{ v }};{% endfor %}{% for k in d %}{{ k }}{% endfor %}", {"d": {"z": 1, "a": [1, 2], "m": None}}),
    ("loop_controls", "{% for x in range(10) %}{% if x == 2 %}{% continue %}{% endif %}{% if x == 5 %}{% break %}{% endif %}{{ x }}{% endfor %}", {}),
    ("loop_scope", "{% set x = 0 %}{% for i in range(3) %}{% set x = x + i %}{{ x }},{% endfor %}|{{ x }}", {}),
    ("namespace", "{% set ns = namespace(n=0, found=false) %}{% for i in range(4) %}{% set ns.n = ns.n + i %}{% endfor %}{{ ns.n }} {{ ns.found }}", {}),
    ("prev_next_cycle", "{% for x in 'abc' %}{{ loop.previtem }}-{{ loop.nextitem }}-{{ loop.cycle('odd', 'even') }};{% endfor %}", {}),
    ("macro", "{% macro m(a, b=2, c='x') %}[{{ a }}{{ b }}{{ c }}{{ z }}]{% endmacro %}{% set z = 9 %}{{ m(1) }}{{ m(1, c='y') }}{{ m(1, 3) }}", {}),
    ("macro_recursive", "{% macro f(n) %}{% if n > 0 %}{{ n }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(4) }}", {}),
    ("set_block", "{% set block %}inner {{ 1 + 1 }}{% endset %}[{{ block }}]{% set a, b = 1, 2 %}{{ a }}{{ b }}", {}),
    ("filters_text", "{{ '  x  '|trim }}|{{ 'abc'|upper }}|{{ 'ABC'|lower }}|{{ 'hello there'|title }}|{{ 'hello'|capitalize }}|{{ 'aXbX'|replace('X', '-') }}|{{ 'a\nb'|indent(2) }}|{{ 'a\nb'|indent(2, true) }}|{{ '<&>'|e }}|{{ 'one two three'|wordcount }}", {}),
    ("filters_lists", "{{ xs|join(', ') }}|{{ xs|first }}|{{ xs|last }}|{{ xs|length }}|{{ xs|reverse|list }}|{{ xs|sort }}|{{ [3, 1, 2]|max }}|{{ [3, 1, 2]|min }}|{{ [1, 2, 3]|sum }}|{{ [1, 1, 2]|unique|list }}|{{ 'abc'|list }}", {"xs": ["b", "a", "c"]}),
    ("filters_map_select", "{{ people|map(attribute='name')|join('/') }}|{{ people|selectattr('age', 'gt', 30)|map(attribute='name')|list }}|{{ people|rejectattr('admin')|map(attribute='name')|list }}|{{ [1, 2, 3, 4]|select('even')|list }}|{{ [1, 2, 3, 4]|reject('odd')|list }}|{{ ['a', 'b']|map('upper')|list }}|{{ people|selectattr('admin', 'equalto', true)|list|length }}", {"people": [{"name": "ann", "age": 31, "admin": True}, {"name": "bob", "age": 25, "admin": False}]}),
    ("filters_values", "{{ x|default('d') }}|{{ none|default('d') }}|{{ ''|default('d', true) }}|{{ '42'|int }}|{{ 'x'|int(7) }}|{{ 3.7|int }}|{{ '2.5'|float }}|{{ -3|abs }}|{{ 2.567|round(2) }}|{{ 1|string }}|{{ d|items|list }}|{{ d|dictsort }}", {"d": {"b": 1, "A": 2}}),
    ("tojson", "{{ v|tojson }}|{{ v|tojson(indent=2) }}|{{ 'é\"\\\n'|tojson }}|{{ 1.0|tojson }}|{{ none|tojson }}|{{ v|tojson(separators=(',', ':')) }}|{{ v|tojson(sort_keys=true) }}", {"v": {"b": [1, 2.5, "ü", True, None], "a": {"x": "y"}}}),
    ("tests", "{{ x is defined }}{{ y is defined }}{{ y is undefined }}{{ none is none }}{{ 's' is string }}{{ 1 is number }}{{ 1 is integer }}{{ 1.5 is float }}{{ {} is mapping }}{{ [] is sequence }}{{ 's' is iterable }}{{ true is boolean }}{{ false is false }}{{ 3 is odd }}{{ 4 is even }}{{ 9 is divisibleby 3 }}{{ 2 is in [1, 2] }}{{ x is not none }}{{ 'ab' is lower }}{{ true is sameas true }}", {"x": 1}),
    ("dict_methods", "{{ d.get('a') }}|{{ d.get('zz', 'def') }}|{{ d.get('zz') }}|{{ d.keys()|list }}|{{ d.values()|list }}|{{ d['a'] }}|{{ d.a }}|{{ d.missing is defined }}|{{ 'a' in d }}", {"d": {"a": 1, "b": 2}}),
    ("undefined_rendering", "[{{ missing }}][{{ d.nokey }}][{% for x in missing %}{{ x }}{% endfor %}][{{ missing|length }}]", {"d": {}}),
    ("globals", "{{ range(3)|list }}{{ range(1, 7, 2)|list }}{{ dict(a=1, b='x') }}{{ strftime_now('%Y-%m-%d %A') }}", {}),
    ("nested_data", "{% for m in messages %}{{ m.role }}:{{ m['content'] }}{% if m.tool_calls %}{% for t in m.tool_calls %}<{{ t.function.name }} {{ t.function.arguments|tojson }}>{% endfor %}{% endif %}\n{% endfor %}", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": {"x": 1, "y": [True, None]}}}]}]}),
    ("filter_block", "{% filter upper %}abc {{ 'd' }}{% endfilter %}", {}),
    ("string_escapes", "{{ 'a\\tb\\n' }}{{ \"q\\\"q\" }}{{ '\\u00e9\\x41' }}", {}),
    ("error_raise", "{{ raise_exception('custom failure') }}", {}),
    ("error_undefined_attr", "{{ missing.attr }}", {}),
    ("error_syntax", "{% if x %}never closed", {"x": 1}),
    ("error_type", "{{ 'a' + 1 }}", {}),
]


def render_jinja_cases():
    out = []
    for name, src, variables in JINJA_CASES:
        case = {"name": name, "template": src, "vars": variables}
        try:
            case["expected"] = ctu._compile_jinja_template(src).render(**variables)
        except Exception as e:  # errors are part of the contract: the C++ side must fail too
            case["error"] = type(e).__name__
        out.append(case)
    return out


def build_style(style):
    base, template_file, extra, bos, eos, layout = STYLES[style]
    d = os.path.join(OUT, style)
    os.makedirs(d, exist_ok=True)
    template = open(os.path.join(TEMPLATES, template_file), encoding="utf-8").read()
    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(TOKENIZERS, base, "tokenizer.json"))
    if extra:
        tok.add_special_tokens({"additional_special_tokens": extra})
    tok.bos_token = bos
    tok.eos_token = eos
    tok.chat_template = template
    for f in os.listdir(d):
        if f != "reference.json":
            os.remove(os.path.join(d, f))
    tok.save_pretrained(d)
    cfg_path = os.path.join(d, "tokenizer_config.json")
    cfg = json.load(open(cfg_path, encoding="utf-8"))
    jinja_path = os.path.join(d, "chat_template.jinja")
    if layout == "config":  # the v4 hub layout: the template inside tokenizer_config.json
        cfg["chat_template"] = template
        if os.path.exists(jinja_path):
            os.remove(jinja_path)
    else:  # the v5 layout: chat_template.jinja next to it
        cfg.pop("chat_template", None)
        with open(jinja_path, "w", encoding="utf-8") as f:
            f.write(template)
    with open(cfg_path, "w", encoding="utf-8") as f:
        json.dump(cfg, f, ensure_ascii=False, indent=2)
    for f in ("special_tokens_map.json",):
        p = os.path.join(d, f)
        if os.path.exists(p):
            os.remove(p)

    tok = PreTrainedTokenizerFast.from_pretrained(d)
    has_generation = "generation" in template and "{%- generation" in template or "{% generation" in template
    cases = []
    for name, messages, kwargs, tools in CASES[style]:
        kw = dict(kwargs)
        case = {"name": name, "messages": messages, "kwargs": kw}
        if tools:
            case["tools"] = tools
        try:
            text = tok.apply_chat_template(copy.deepcopy(messages), tools=tools, tokenize=False, **kw)
            enc = tok.apply_chat_template(copy.deepcopy(messages), tools=tools, tokenize=True, return_dict=True,
                                          return_assistant_tokens_mask=has_generation, **kw)
            case["text"] = text
            case["ids"] = list(enc["input_ids"])
            if has_generation:
                case["assistant_masks"] = list(enc["assistant_masks"])
        except Exception as e:
            case["error"] = str(e).splitlines()[0]
        cases.append(case)
    with open(os.path.join(d, "reference.json"), "w", encoding="utf-8") as f:
        json.dump({"transformers": transformers.__version__, "style": style, "cases": cases}, f,
                  ensure_ascii=False, indent=1)
    print(f"{style}: {len(cases)} cases", file=sys.stderr)


def main():
    for style in STYLES:
        build_style(style)
    with open(os.path.join(OUT, "jinja_cases.json"), "w", encoding="utf-8") as f:
        json.dump({"transformers": transformers.__version__, "cases": render_jinja_cases()}, f, ensure_ascii=False,
                  indent=1)
    print(f"jinja_cases: {len(JINJA_CASES)}", file=sys.stderr)


if __name__ == "__main__":
    main()
