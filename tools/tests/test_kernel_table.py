"""tools/gpu/kernel_table.py: sums ncu's per-launch durations by kernel name, converting units,
skipping ncu's log lines before the CSV header and rows of other metrics."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "tools", "gpu", "kernel_table.py")
HEADER = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size",'
          '"Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"')


def row(i, name, unit, value, metric="gpu__time_duration.sum", grid="(132, 1, 1)"):
    return ('"%d","1","moeforge","h","%s","1","7","(128, 1, 1)","%s","0","9.0","Command line profiler metrics",'
            '"%s","%s","%s"' % (i, name, grid, metric, unit, value))


def run(text, *args):
    r = subprocess.run([sys.executable, SCRIPT, "-", *args], input=text, capture_output=True, text=True)
    return r.returncode, r.stdout, r.stderr


def test_sums_by_name_in_nanoseconds_largest_first():
    text = "\n".join(["==PROF== Connected to process 1", "{\"impl\": \"moeforge\"}", HEADER,
                      row(0, "gemm_kernel", "nsecond", "2,000"), row(1, "norm_kernel", "usecond", "2"),
                      row(2, "gemm_kernel", "msecond", "0.004"), row(3, "gemm_kernel", "nsecond", "9", metric="other")])
    rc, out, err = run(text)
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0] == "3 launches, 0.008 ms of kernel time (serialised)"
    gemm = next(l for l in lines if l.endswith("gemm_kernel"))
    norm = next(l for l in lines if l.endswith("norm_kernel"))
    assert lines.index(gemm) < lines.index(norm)  # 6 us before 2 us
    assert gemm.split()[:4] == ["0.006", "3.0", "2", "75.0%"]
    assert norm.split()[:4] == ["0.002", "2.0", "1", "25.0%"]
    largest = lines[lines.index("largest launches:") + 2]
    assert largest.split()[0] == "4.0" and largest.endswith("gemm_kernel")


def test_input_without_a_csv_is_one_clear_error():
    rc, out, err = run("==PROF== No kernels were profiled.\n")
    assert rc != 0 and "no ncu CSV header" in err


def test_from_last_keeps_the_launches_after_the_last_marker():
    text = "\n".join([HEADER, row(0, "embedding_kernel", "nsecond", "1"), row(1, "adamw_kernel", "nsecond", "9000"),
                      row(2, "embedding_kernel", "nsecond", "1"), row(3, "adamw_kernel", "nsecond", "5000")])
    rc, out, err = run(text, "--from-last", "embedding")
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0] == "from launch 2 of 4 (the last of 2 launches of embedding)"
    assert lines[1] == "2 launches, 0.005 ms of kernel time (serialised)"
    adamw = next(l for l in lines if l.endswith("adamw_kernel"))
    assert adamw.split()[:3] == ["0.005", "5.0", "1"]
    rc, out, err = run(text, "--from-last", "no_such_kernel")
    assert rc != 0 and "no launch of a kernel named like" in err
