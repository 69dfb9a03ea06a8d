#!/usr/bin/env python3
"""Sums Nsight Compute's per-launch kernel durations by kernel name (run.sh kernels).

Input: the CSV that `ncu --csv --print-units base --print-kernel-base function --metrics
gpu__time_duration.sum` writes (one row per launch). Output: one line per kernel name with its
launches, total and mean time and share of the sum, largest first; then the largest single
launches with their grid and block sizes. ncu runs every launch alone (serialised), so the sum is
the step's GPU work without overlap, not its wall time.

--from-last NAME keeps only the launches from the last launch of a kernel whose name contains NAME
on: with a marker that opens each step (the embedding's forward, `embedding_kernel`), the table of
the last step of a run of several, where the moments are live (the first step's AdamW differs).
"""
import argparse
import csv
import io
import sys
from collections import defaultdict

UNIT_TO_NS = {"nsecond": 1.0, "ns": 1.0, "usecond": 1e3, "us": 1e3, "msecond": 1e6, "ms": 1e6, "second": 1e9, "s": 1e9}


def launches(text):
    """(name, grid, block, ns) per launch, from ncu's CSV (lines before the header are ncu's log)."""
    start = text.find('"ID"')
    if start < 0:
        raise SystemExit("kernel_table: no ncu CSV header (\"ID\",...) in the input")
    for row in csv.DictReader(io.StringIO(text[start:])):
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        unit = row.get("Metric Unit", "nsecond").strip()
        if unit not in UNIT_TO_NS:
            raise SystemExit("kernel_table: unknown time unit %r" % unit)
        value = float(row["Metric Value"].replace(",", ""))
        yield row["Kernel Name"], row.get("Grid Size", ""), row.get("Block Size", ""), value * UNIT_TO_NS[unit]


def table(rows, top_names, top_launches, width):
    by_name = defaultdict(lambda: [0, 0.0])
    for name, _, _, ns in rows:
        by_name[name][0] += 1
        by_name[name][1] += ns
    total = sum(v[1] for v in by_name.values())
    out = ["%d launches, %.3f ms of kernel time (serialised)" % (len(rows), total / 1e6), "",
           "%9s %9s %7s %6s  %s" % ("total ms", "mean us", "calls", "share", "kernel")]
    for name, (n, ns) in sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top_names]:
        out.append("%9.3f %9.1f %7d %5.1f%%  %s" % (ns / 1e6, ns / n / 1e3, n, 100 * ns / total, name[:width]))
    out += ["", "largest launches:", "%9s  %-16s %-12s %s" % ("us", "grid", "block", "kernel")]
    for name, grid, block, ns in sorted(rows, key=lambda r: -r[3])[:top_launches]:
        out.append("%9.1f  %-16s %-12s %s" % (ns / 1e3, grid, block, name[:width]))
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv", help="ncu's CSV output ('-' for stdin)")
    ap.add_argument("--top", type=int, default=40, help="kernel names to list (default 40)")
    ap.add_argument("--top-launches", type=int, default=25, help="single launches to list (default 25)")
    ap.add_argument("--width", type=int, default=110, help="characters of each kernel name to print")
    ap.add_argument("--from-last", metavar="NAME",
                    help="only the launches from the last one whose kernel name contains NAME on (the last step)")
    args = ap.parse_args()
    text = sys.stdin.read() if args.csv == "-" else open(args.csv, encoding="utf-8", errors="replace").read()
    rows = list(launches(text))
    if not rows:
        raise SystemExit("kernel_table: no gpu__time_duration.sum rows in %s" % args.csv)
    if args.from_last:
        marks = [i for i, r in enumerate(rows) if args.from_last in r[0]]
        if not marks:
            raise SystemExit("kernel_table: no launch of a kernel named like %r in %s" % (args.from_last, args.csv))
        print("from launch %d of %d (the last of %d launches of %s)" % (marks[-1], len(rows), len(marks), args.from_last))
        rows = rows[marks[-1]:]
    print(table(rows, args.top, args.top_launches, args.width))


if __name__ == "__main__":
    main()
