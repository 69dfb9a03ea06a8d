#!/usr/bin/env python3
"""Writes the Parquet fixtures of tests/unit/test_parquet.cpp with pyarrow (PyPI), each beside the
rows pyarrow reads back from it (NAME.expected.jsonl, top-level nulls left out), which is what
moeforge's reader must give. The cases cover every codec, page kind and encoding the reader takes,
nested lists and structs with nulls at every level, and columns a dataset does not read.

    python3 -m venv /tmp/pa && /tmp/pa/bin/pip install pyarrow
    /tmp/pa/bin/python tools/make_parquet_fixtures.py tests/fixtures/parquet
"""
import json
import os
import random
import sys

import pyarrow as pa
import pyarrow.parquet as pq


def words(rng, n):
    vocab = ["the", "cat", "sat", "on", "a", "mat", "é", "日本", "tokens", "loss", "expert", "router", ""]
    return " ".join(rng.choice(vocab) for _ in range(n))


MANIFEST = {}


def write(out, name, table, unread=(), **options):
    """`unread`: columns the test does not ask for (types the reader refuses)."""
    path = os.path.join(out, name + ".parquet")
    pq.write_table(table, path, **options)
    fields = [f for f in table.column_names if f not in unread]
    MANIFEST[name] = {"fields": fields}
    with open(os.path.join(out, name + ".expected.jsonl"), "w", encoding="utf-8") as f:
        for row in pq.read_table(path, columns=fields).to_pylist():
            f.write(json.dumps({k: v for k, v in row.items() if v is not None}, ensure_ascii=False) + "\n")
    return path


# --- A file in the older list forms, which pyarrow reads but does not write: a repeated field
# without a LIST annotation, two-level lists (the repeated node is the element: a primitive named
# "array", a group named "<list>_tuple") and a three-level list with other names (Hive's "bag").
# Written here byte by byte (Thrift's compact protocol, one uncompressed v1 page per column); the
# expected rows are still pyarrow's reading of it.

def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def zigzag(n):
    return varint((n << 1) ^ (n >> 63))


I32, I64, BINARY, LIST, STRUCT = 5, 6, 8, 9, 12


def struct(fields):
    """fields: [(id, type, value)], value already encoded for I32/I64/BINARY/LIST/STRUCT."""
    out, last = bytearray(), 0
    for fid, ftype, value in fields:
        delta = fid - last
        out += bytes([(delta << 4) | ftype]) if 0 < delta <= 15 else bytes([ftype]) + zigzag(fid)
        last = fid
        out += value
    return bytes(out) + b"\0"


def i32(v): return zigzag(v)
def i64(v): return zigzag(v)
def binary(b): return varint(len(b)) + b


def tlist(elem_type, items):
    head = bytes([(len(items) << 4) | elem_type]) if len(items) < 15 else bytes([0xF0 | elem_type]) + varint(len(items))
    return head + b"".join(items)


def hybrid(levels, width):
    """Levels as one bit-packed run (padded to a multiple of 8 values)."""
    if width == 0:
        return b""
    padded = list(levels) + [0] * (-len(levels) % 8)
    bits = 0
    for i, v in enumerate(padded):
        bits |= v << (i * width)
    return varint((len(padded) // 8) << 1 | 1) + bits.to_bytes(len(padded) * width // 8, "little")


def plain(ptype, values):
    if ptype == "int64":
        return b"".join(v.to_bytes(8, "little", signed=True) for v in values)
    if ptype == "int32":
        return b"".join(v.to_bytes(4, "little", signed=True) for v in values)
    return b"".join(len(v).to_bytes(4, "little") + v for v in values)


def write_legacy_lists(path):
    REQ, OPT, REP = 0, 1, 2
    T_I32, T_I64, T_BYTES = 1, 2, 6
    schema = [  # (name, repetition, physical type or None, children, converted type)
        ("schema", None, None, 4, None),
        ("input_ids", REP, T_I64, 0, None),
        ("labels", OPT, None, 1, 3), ("array", REP, T_I64, 0, None),
        ("words", OPT, None, 1, 3), ("bag", REP, None, 1, None), ("array_element", OPT, T_BYTES, 0, 0),
        ("pairs", OPT, None, 1, 3), ("pairs_tuple", REP, None, 2, None), ("a", REQ, T_I32, 0, None),
        ("b", REQ, T_I32, 0, None),
    ]
    # Per column: path, type, (max rep, max def), [(rep, def, value or None)] over 3 rows.
    columns = [
        (["input_ids"], T_I64, "int64", (1, 1), [(0, 1, 1), (1, 1, 2), (1, 1, 3), (0, 0, None), (0, 1, 7)]),
        (["labels", "array"], T_I64, "int64", (1, 2), [(0, 2, 4), (1, 2, 5), (0, 0, None), (0, 1, None)]),
        (["words", "bag", "array_element"], T_BYTES, "bytes", (1, 3),
         [(0, 3, b"x"), (1, 2, None), (1, 3, b"y"), (0, 1, None), (0, 0, None)]),
        (["pairs", "pairs_tuple", "a"], T_I32, "int32", (1, 2), [(0, 2, 1), (0, 0, None), (0, 2, 3), (1, 2, 5)]),
        (["pairs", "pairs_tuple", "b"], T_I32, "int32", (1, 2), [(0, 2, 2), (0, 0, None), (0, 2, 4), (1, 2, 6)]),
    ]
    body, chunks = bytearray(b"PAR1"), []
    for path_names, ptype, kind, (max_rep, max_def), entries in columns:
        reps = hybrid([e[0] for e in entries], max_rep.bit_length())
        defs = hybrid([e[1] for e in entries], max_def.bit_length())
        page = (len(reps).to_bytes(4, "little") + reps + len(defs).to_bytes(4, "little") + defs +
                plain(kind, [e[2] for e in entries if e[1] == max_def]))
        header = struct([(1, I32, i32(0)), (2, I32, i32(len(page))), (3, I32, i32(len(page))),
                         (5, STRUCT, struct([(1, I32, i32(len(entries))), (2, I32, i32(0)), (3, I32, i32(3)),
                                             (4, I32, i32(3))]))])
        offset = len(body)
        body += header + page
        size = len(header) + len(page)
        meta = struct([(1, I32, i32(ptype)), (2, LIST, tlist(I32, [i32(0), i32(3)])),
                       (3, LIST, tlist(BINARY, [binary(n.encode()) for n in path_names])), (4, I32, i32(0)),
                       (5, I64, i64(len(entries))), (6, I64, i64(size)), (7, I64, i64(size)), (9, I64, i64(offset))])
        chunks.append(struct([(2, I64, i64(offset)), (3, STRUCT, meta)]))
    elements = []
    for name, rep, ptype, children, converted in schema:
        f = []
        if ptype is not None:
            f.append((1, I32, i32(ptype)))
        if rep is not None:
            f.append((3, I32, i32(rep)))
        f.append((4, BINARY, binary(name.encode())))
        if children:
            f.append((5, I32, i32(children)))
        if converted is not None:
            f.append((6, I32, i32(converted)))
        elements.append(struct(f))
    row_group = struct([(1, LIST, tlist(STRUCT, chunks)), (2, I64, i64(len(body) - 4)), (3, I64, i64(3))])
    footer = struct([(1, I32, i32(1)), (2, LIST, tlist(STRUCT, elements)), (3, I64, i64(3)),
                     (4, LIST, tlist(STRUCT, [row_group]))])
    with open(path, "wb") as f:
        f.write(bytes(body) + footer + len(footer).to_bytes(4, "little") + b"PAR1")


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    rng = random.Random(7)

    # Text rows over two row groups and many small dictionary-encoded pages, SNAPPY.
    texts = [words(rng, rng.randint(1, 30)) for _ in range(50)]
    write(out, "text_snappy", pa.table({"text": texts}), compression="snappy", row_group_size=20,
          data_page_size=256, dictionary_pagesize_limit=128)

    # Prompt / completion with a null and a column of a type the reader does not take (INT96
    # timestamps): a dataset reads only its fields. GZIP, plain values.
    n = 12
    prompts = [words(rng, 5) for _ in range(n)]
    prompts[3] = None
    table = pa.table({
        "prompt": prompts,
        "completion": [words(rng, 4) for _ in range(n)],
        "created": pa.array([1700000000 + i for i in range(n)], pa.timestamp("ns")),
    })
    write(out, "prompt_completion_gzip", table, unread=["created"], compression="gzip", use_dictionary=False,
          use_deprecated_int96_timestamps=True)

    # Token rows: list<int64> with null and empty lists, data pages v2, ZSTD, no dictionary.
    ids = [[rng.randint(0, 127) for _ in range(rng.randint(1, 40))] for _ in range(30)]
    labels = [[x if rng.random() < 0.7 else -100 for x in row] for row in ids]
    labels[2] = None
    labels[5] = []
    write(out, "tokens_zstd_v2", pa.table({"input_ids": ids, "labels": labels}), compression="zstd",
          data_page_version="2.0", use_dictionary=False, data_page_size=512)

    # Conversations: list<struct<role, content>> with a null content, a struct column, LZ4_RAW.
    roles = ["system", "user", "assistant"]
    conversations = []
    for i in range(16):
        turns = [{"role": roles[min(t, 2) if t < 2 else 1 + t % 2], "content": words(rng, rng.randint(0, 12))}
                 for t in range(rng.randint(2, 6))]
        if i == 4:
            turns[1]["content"] = None
        conversations.append(turns)
    kwargs = [{"enable_thinking": bool(i % 2)} if i % 3 else None for i in range(16)]
    write(out, "messages_lz4", pa.table({"messages": conversations, "chat_template_kwargs": kwargs}),
          compression="lz4", row_group_size=7)

    # The DELTA encodings (no dictionary), uncompressed, pages v1.
    n = 300
    ints = [[rng.randint(-2**31, 2**31 - 1) for _ in range(rng.randint(0, 5))] for _ in range(n)]
    table = pa.table({
        "input_ids": pa.array(ints, pa.list_(pa.int32())),
        "text": [words(rng, rng.randint(0, 8)) for _ in range(n)],
        "prompt": ["prefix shared " + str(i // 3) + words(rng, 2) for i in range(n)],
        "big": pa.array([rng.randint(-2**62, 2**62) for _ in range(n)], pa.int64()),
        # int32 deltas that wrap (the writer's arithmetic is 32-bit), without drawing from rng.
        "small": pa.array([(-1) ** i * (2**31 - 1 - 7919 * i) for i in range(n)], pa.int32()),
    })
    write(out, "delta_plain", table, compression="none", use_dictionary=False,
          column_encoding={"input_ids": "DELTA_BINARY_PACKED", "text": "DELTA_LENGTH_BYTE_ARRAY",
                           "prompt": "DELTA_BYTE_ARRAY", "big": "DELTA_BINARY_PACKED",
                           "small": "DELTA_BINARY_PACKED"})

    # Nesting with nulls at every level, maps, unsigned and floating values, booleans (v1 PLAIN
    # bit-packed and v2 RLE).
    n = 40
    nested = []
    for i in range(n):
        r = rng.random()
        nested.append(None if r < 0.1 else [] if r < 0.2 else
                      [None if rng.random() < 0.2 else [rng.randint(0, 9) if rng.random() < 0.8 else None
                                                         for _ in range(rng.randint(0, 3))]
                       for _ in range(rng.randint(1, 3))])
    table = pa.table({
        "nested": pa.array(nested, pa.list_(pa.list_(pa.int64()))),
        "record": pa.array([None if i % 7 == 0 else {"name": words(rng, 1), "scores": [rng.random() for _ in range(i % 3)],
                                                      "flag": i % 2 == 0} for i in range(n)],
                           pa.struct([("name", pa.string()), ("scores", pa.list_(pa.float64())), ("flag", pa.bool_())])),
        "counts": pa.array([[(words(rng, 1) + str(k), k) for k in range(i % 4)] for i in range(n)],
                           pa.map_(pa.string(), pa.int64())),
        "unsigned": pa.array([2**32 - 1 - i for i in range(n)], pa.uint32()),
        "ratio": pa.array([i / 8 for i in range(n)], pa.float32()),
        "ok": [i % 3 == 0 for i in range(n)],
    })
    write(out, "nested_v1", table, compression="snappy", row_group_size=16)
    write(out, "nested_v2", table, compression="zstd", data_page_version="2.0", row_group_size=25)
    # ShareGPT conversations (from / value) with a system column, and Alpaca rows, as datasets on
    # the hub hold them; SNAPPY.
    speakers = ["human", "gpt"]
    sharegpt = [[{"from": speakers[t % 2], "value": words(rng, rng.randint(1, 9))} for t in range(rng.randint(1, 3) * 2)]
                for _ in range(10)]
    systems = [words(rng, 4) if i % 3 == 0 else None for i in range(10)]
    write(out, "sharegpt_snappy", pa.table({"conversations": sharegpt, "system": systems}), compression="snappy")
    alpaca = pa.table({
        "instruction": [words(rng, 6) for _ in range(10)],
        "input": [words(rng, 3) if i % 2 else "" for i in range(10)],
        "output": [words(rng, 5) for _ in range(10)],
    })
    write(out, "alpaca_zstd", alpaca, compression="zstd")
    # Prompts for `generate --prompts`: text prompts, and conversations where the prompt is null.
    prompts = ["Count from %d to %d." % (i, i + 3) if i % 3 else None for i in range(6)]
    convs = [None if p else [{"role": "user", "content": "Count from %d to %d." % (i, i + 2)}] for i, p in enumerate(prompts)]
    write(out, "prompts_snappy", pa.table({"prompt": prompts, "messages": convs}), compression="snappy")
    # BYTE_STREAM_SPLIT (byte k of every value in stream k) on integer and floating columns, a
    # list with nulls among them, over two pages; its own generator, so the cases above keep their
    # draws. Floats are exact binary fractions (JSON round trips them).
    bss = random.Random(11)
    n = 60
    split = pa.table({
        "input_ids": pa.array([None if i % 9 == 4 else [bss.randint(-2**31, 2**31 - 1) for _ in range(bss.randint(0, 6))]
                               for i in range(n)], pa.list_(pa.int32())),
        "big": pa.array([bss.randint(-2**62, 2**62) for _ in range(n)], pa.int64()),
        "ratio": pa.array([bss.randint(-4096, 4096) / 64 for _ in range(n)], pa.float32()),
        "score": pa.array([None if i % 7 == 0 else bss.randint(-2**40, 2**40) / 1024 for i in range(n)], pa.float64()),
    })
    write(out, "byte_stream_split", split, compression="none", use_dictionary=False, data_page_size=256,
          column_encoding={c: "BYTE_STREAM_SPLIT" for c in ["input_ids.list.element", "big", "ratio", "score"]})
    # BROTLI pages (v1 and v2 row groups alike), ShareGPT rows; its own generator too.
    br = random.Random(13)
    convs = [[{"from": "human" if t % 2 == 0 else "gpt", "value": words(br, br.randint(1, 20))} for t in range(2 * br.randint(1, 3))]
             for _ in range(40)]
    write(out, "sharegpt_brotli", pa.table({"conversations": convs}), compression="brotli", row_group_size=15)
    write(out, "text_brotli_v2", pa.table({"text": [words(br, br.randint(0, 30)) for _ in range(50)]}),
          compression="brotli", data_page_version="2.0", row_group_size=20)
    legacy = os.path.join(out, "legacy_lists.parquet")
    write_legacy_lists(legacy)
    MANIFEST["legacy_lists"] = {"fields": ["input_ids", "labels", "words", "pairs"]}
    with open(os.path.join(out, "legacy_lists.expected.jsonl"), "w", encoding="utf-8") as f:
        for row in pq.read_table(legacy).to_pylist():
            row = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in row.items()}
            f.write(json.dumps({k: v for k, v in row.items() if v is not None}, ensure_ascii=False) + "\n")
    with open(os.path.join(out, "MANIFEST.json"), "w") as f:
        json.dump({"pyarrow": pa.__version__, "cases": MANIFEST}, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
