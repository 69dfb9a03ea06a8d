#!/usr/bin/env python3
"""Writes the Arrow IPC fixtures of tests/unit/test_arrow.cpp with pyarrow and datasets (PyPI), each
beside the rows pyarrow reads back from it (NAME.expected.jsonl, top-level nulls left out, binary
values as UTF-8 text), which is what moeforge's reader must give. The cases cover both IPC formats
(stream and file), the legacy framing and metadata version V4, LZ4_FRAME and ZSTD bodies, several
record batches, every type a dataset row holds (nested with nulls at each level), dictionary-encoded
columns (deltas and replacements) and string/binary views, columns of the other types beside them
(which the reader must skip by counting their buffers), and a folder
written by `datasets`' save_to_disk (saved/) and by DatasetDict.save_to_disk (saved_dict/).

    python3 -m venv /tmp/pa && /tmp/pa/bin/pip install pyarrow datasets
    /tmp/pa/bin/python tools/make_arrow_fixtures.py tests/fixtures/arrow
"""
import datetime
import decimal
import json
import os
import random
import shutil
import sys

import pyarrow as pa


def words(rng, n):
    vocab = ["the", "cat", "sat", "on", "a", "mat", "é", "日本", "tokens", "loss", "expert", "router", ""]
    return " ".join(rng.choice(vocab) for _ in range(n))


MANIFEST = {}


def plain(v):
    """A pyarrow value as the JSON moeforge gives: bytes as text, maps as [key, value] pairs."""
    if isinstance(v, bytes):
        return v.decode("utf-8")
    if isinstance(v, dict):
        return {k: plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    return v


def expected(out, name, table, fields):
    with open(os.path.join(out, name + ".expected.jsonl"), "w", encoding="utf-8") as f:
        for row in table.select(fields).to_pylist():
            f.write(json.dumps({k: plain(v) for k, v in row.items() if v is not None}, ensure_ascii=False) + "\n")


def write(out, name, table, unread=(), file_format=False, max_chunksize=None, **options):
    """`unread`: columns the test does not ask for (types a dataset row does not hold)."""
    ext = ".feather" if file_format else ".arrow"
    path = os.path.join(out, name + ext)
    opts = pa.ipc.IpcWriteOptions(**options)
    with pa.OSFile(path, "wb") as sink:
        writer = (pa.ipc.new_file if file_format else pa.ipc.new_stream)(sink, table.schema, options=opts)
        writer.write_table(table, max_chunksize=max_chunksize)
        writer.close()
    reader = pa.ipc.open_file(path) if file_format else pa.ipc.open_stream(path)
    back = reader.read_all()
    assert back.equals(table), name
    fields = [f for f in table.column_names if f not in unread]
    MANIFEST[name + ext] = {"fields": fields, "unread": list(unread)}
    expected(out, name, back, fields)


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    rng = random.Random(11)

    # Conversations as datasets stores them (list<struct<role, content>>, tools as a JSON string),
    # over record batches of 5 rows, uncompressed stream format, with columns of other types
    # beside them: a dictionary-encoded string, timestamps, decimals, a dense union, a string view
    # and a run-end encoded column, each of which the reader must step over.
    n = 23
    roles = ["system", "user", "assistant"]
    conversations = []
    for i in range(n):
        turns = [{"role": roles[min(t, 2) if t < 2 else 1 + t % 2], "content": words(rng, rng.randint(0, 12))}
                 for t in range(rng.randint(2, 6))]
        if i == 4:
            turns[1]["content"] = None
        conversations.append(turns)
    tools = [json.dumps([{"type": "function", "function": {"name": "f%d" % i}}]) if i % 4 == 0 else None
             for i in range(n)]
    kwargs = [{"enable_thinking": bool(i % 2)} if i % 3 else None for i in range(n)]
    # Each column the test does not ask for is followed by one it does, so that a miscount of the
    # skipped column's buffers misreads the next.
    table = pa.table({
        "source": pa.array([["web", "book", "code"][i % 3] for i in range(n)]).dictionary_encode(),
        "messages": conversations,
        "created": pa.array([datetime.datetime(2026, 1, 1) + datetime.timedelta(hours=i) for i in range(n)],
                            pa.timestamp("us")),
        "tools": tools,
        "score": pa.array([decimal.Decimal(i) / 4 for i in range(n)], pa.decimal128(9, 2)),
        "prompt": [words(rng, 3) for _ in range(n)],
        "tag": pa.UnionArray.from_dense(pa.array([i % 2 for i in range(n)], pa.int8()),
                                        pa.array([i // 2 for i in range(n)], pa.int32()),
                                        [pa.array(list(range(12)), pa.int64()), pa.array(["u"] * 12)]),
        "text": [words(rng, 2) for _ in range(n)],
        "note": pa.array([words(rng, 3) for _ in range(n)], pa.string_view()),
        "completion": [words(rng, 2) for _ in range(n)],
        "lang": pa.RunEndEncodedArray.from_arrays(pa.array([10, n], pa.int32()), pa.array(["en", "de"])),
        "chat_template_kwargs": kwargs,
    })
    write(out, "messages_stream", table, unread=["source", "created", "score", "tag", "note", "lang"], max_chunksize=5)

    # Token rows, ZSTD bodies: list<int64> with null and empty lists, a large_list, a null-type column.
    n = 30
    ids = [[rng.randint(0, 127) for _ in range(rng.randint(1, 40))] for _ in range(n)]
    labels = [[x if rng.random() < 0.7 else -100 for x in row] for row in ids]
    labels[2] = None
    labels[5] = []
    table = pa.table({
        "input_ids": pa.array(ids, pa.large_list(pa.int64())),
        "labels": labels,
        "comment": pa.nulls(n),
    })
    write(out, "tokens_zstd", table, compression="zstd", max_chunksize=8)

    # Text in the IPC file format (Feather v2), LZ4_FRAME bodies, large strings, one null.
    texts = [words(rng, rng.randint(1, 60)) for _ in range(40)]
    texts[7] = None
    write(out, "text_file_lz4", pa.table({"text": pa.array(texts, pa.large_string())}), file_format=True,
          compression="lz4", max_chunksize=16)

    # Every value type a row may hold, nested with nulls at each level; legacy framing (no
    # continuation marker) and metadata version V4.
    n = 9
    table = pa.table({
        "prompt": [words(rng, 4) if i != 3 else None for i in range(n)],
        "flags": pa.array([bool(i % 2) if i != 5 else None for i in range(n)]),
        "small": pa.array([i - 4 for i in range(n)], pa.int8()),
        "u16": pa.array([60000 + i for i in range(n)], pa.uint16()),
        "i32": pa.array([-(2 ** 31) + i for i in range(n)], pa.int32()),
        "u64": pa.array([2 ** 64 - 1 - i for i in range(n)], pa.uint64()),
        "half": pa.array([0.5 * i - 1 for i in range(n)], pa.float16()),
        "single": pa.array([1.25 * i for i in range(n)], pa.float32()),
        "double": pa.array([1e-300 * i if i % 2 else -1.5 * i for i in range(n)], pa.float64()),
        "raw": pa.array([("b%d" % i).encode() for i in range(n)], pa.binary()),
        "chat_template_kwargs": [{"enable_thinking": bool(i % 2), "depth": [i, None, i + 1] if i % 3 else None}
                                 if i % 4 else None for i in range(n)],
        "pairs": pa.array([[("k%d" % i, i), ("z", None)] if i % 2 else [] for i in range(n)],
                          pa.map_(pa.string(), pa.int32())),
        "triple": pa.array([[i, i + 1, None] if i != 2 else None for i in range(n)], pa.list_(pa.int32(), 3)),
        "nested": [[[i], None, []] if i % 2 else None for i in range(n)],
    })
    write(out, "all_types_legacy", table, use_legacy_format=True, metadata_version=pa.ipc.MetadataVersion.V4)

    # Dictionary-encoded columns and string/binary views (what pandas categoricals and polars'
    # text become), stream format over three record batches: the second extends the first's
    # dictionaries with a delta, the third replaces them; int8, uint16 and (nested in a list)
    # int32 indices, null indices and null dictionary values; views inline (<= 12 bytes) and in
    # data buffers, with nulls.
    def dict_batch(rng, n, sources, langs):
        return pa.record_batch({
            "source": pa.DictionaryArray.from_arrays(
                pa.array([rng.randrange(len(sources)) if rng.random() > 0.2 else None for _ in range(n)], pa.int8()),
                pa.array(sources)),
            "lang": pa.DictionaryArray.from_arrays(
                pa.array([rng.randrange(len(langs)) for _ in range(n)], pa.uint16()), pa.array(langs)),
            "tags": pa.array([[rng.choice(["a", "bb", "ccc"]) for _ in range(rng.randint(0, 3))] for _ in range(n)],
                             pa.list_(pa.dictionary(pa.int32(), pa.string()))),
            "text": pa.array([words(rng, rng.randint(0, 9)) if rng.random() > 0.15 else None for _ in range(n)],
                             pa.string_view()),
            "raw": pa.array([("r%d" % rng.randint(0, 10 ** rng.randint(1, 20))).encode() for _ in range(n)],
                            pa.binary_view()),
        })

    drng = random.Random(12)  # its own, so the cases after these keep their rows
    batches = [dict_batch(drng, 7, ["web", "book"], ["en", None]),
               dict_batch(drng, 6, ["web", "book", "code"], ["en", None, "de"]),
               dict_batch(drng, 5, ["forum", "wiki"], ["fr"])]
    path = os.path.join(out, "dictionaries_views.arrow")
    with pa.OSFile(path, "wb") as sink:
        writer = pa.ipc.new_stream(sink, batches[0].schema, options=pa.ipc.IpcWriteOptions(emit_dictionary_deltas=True))
        for b in batches:
            writer.write_batch(b)
        writer.close()
    back = pa.ipc.open_stream(path).read_all()
    assert back.equals(pa.Table.from_batches(batches)), "dictionaries_views"
    fields = back.column_names
    MANIFEST["dictionaries_views.arrow"] = {"fields": fields, "unread": []}
    expected(out, "dictionaries_views", back, fields)

    # The same columns in the file format (its dictionaries in the footer, one per column), ZSTD.
    table = pa.Table.from_batches([dict_batch(drng, 9, ["web", "book", "code"], ["en", "de"]) for _ in range(2)])
    write(out, "dictionaries_file", table.unify_dictionaries(), file_format=True, compression="zstd")

    # Prompts for `generate --prompts`: text prompts, and conversations where the prompt is null
    # (the rows of tests/fixtures/parquet/prompts_snappy).
    prompts = ["Count from %d to %d." % (i, i + 3) if i % 3 else None for i in range(6)]
    convs = [None if p else [{"role": "user", "content": "Count from %d to %d." % (i, i + 2)}] for i, p in enumerate(prompts)]
    write(out, "prompts_stream", pa.table({"prompt": prompts, "messages": convs}))

    # A folder written by datasets' save_to_disk (state.json, dataset_info.json, its Arrow files)
    # and a DatasetDict's (a folder per split, dataset_dict.json).
    import datasets

    rows = {"prompt": [words(rng, 5) for _ in range(12)], "completion": [words(rng, 4) for _ in range(12)]}
    ds = datasets.Dataset.from_dict(rows)
    for sub in ("saved", "saved_dict"):
        shutil.rmtree(os.path.join(out, sub), ignore_errors=True)
    ds.save_to_disk(os.path.join(out, "saved"), num_shards=2)
    datasets.DatasetDict({"train": ds, "test": ds.select(range(3))}).save_to_disk(os.path.join(out, "saved_dict"))
    expected(out, "saved", ds.data.table, ["prompt", "completion"])

    with open(os.path.join(out, "MANIFEST.json"), "w") as f:
        json.dump({"generator": "tools/make_arrow_fixtures.py", "pyarrow": pa.__version__,
                   "datasets": datasets.__version__, "cases": MANIFEST}, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
