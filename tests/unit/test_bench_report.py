"""`make bench`'s reporting: verdicts, the figures printed beside them, the checks that
make it exit 1, and its arguments. No /dev/kvm needed: the runs are stood in for."""
import json
import subprocess

import pytest

from benchmarks import dirty, run


def _row(ratio, target, higher=True):
    return {"bench": "b", "python": 1.0, "native": 1.0, "ratio": ratio, "target": target,
            "unit": "u", "higher_is_better": higher}


@pytest.mark.parametrize("ratio, target, higher, shown, verdict", [
    (0.8976, 0.9, True, "0.898", "MISSED"),     # "0.90 >=0.9 BELOW" before
    (0.9, 0.9, True, "0.90", "ok"),             # the boundary is met
    (0.9004, 0.9, True, "0.9004", "ok"),
    (0.93, 0.9, True, "0.93", "ok"),
    (1.5, 1.5, False, "1.50", "ok"),
    (1.5004, 1.5, False, "1.5004", "MISSED"),   # "1.50 <=1.5" read as met
    (1.4996, 1.5, False, "1.4996", "ok"),
    (1.72, 1.5, False, "1.72", "MISSED"),       # above its target: was printed "BELOW"
])
def test_verdict_and_the_ratio_printed_agree(capsys, ratio, target, higher, shown, verdict):
    run.print_rows([_row(ratio, target, higher)])
    line = capsys.readouterr().out.splitlines()[1]
    assert line.split()[-4:-1] == [shown, f"{'>=' if higher else '<='}{target}", verdict]


def test_busy_warning():
    assert run.busy_warning(0.3, 2) == "" and run.busy_warning(None, 2) == ""
    assert run.busy_warning(0.5, 2) == ""
    assert "kept 1.60 of 2 CPUs busy" in run.busy_warning(1.6, 2)


def test_busy_cpus_counts_work_now_not_the_last_minute():
    # the load average still counted the test or bench run that had just ended, and
    # warned of "other work" on a quiet machine
    import threading
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            pass
    t = threading.Thread(target=spin)
    t.start()
    try:
        busy = run.busy_cpus(0.5)
    finally:
        stop.set()
        t.join()
    assert busy is not None and busy >= 0.5, busy     # one spinning thread: ~1 CPU


def test_busy_cpus_is_the_busy_share_of_the_interval(monkeypatch):
    # the arithmetic, from /proc/stat readings of a quiet and a half-busy second (a real
    # 'quiet' reading fails whenever other work shares the machine)
    readings = iter([(1000, 5000), (1020, 5200), (2000, 9000), (2100, 9200)])
    monkeypatch.setattr(run, "cpu_times", lambda: next(readings))
    monkeypatch.setattr(run.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(run.time, "sleep", lambda s: None)
    assert run.busy_cpus() == pytest.approx(0.2)          # 20 of 200 jiffies, 2 CPUs
    assert run.busy_cpus() == pytest.approx(1.0)          # 100 of 200
    monkeypatch.setattr(run, "cpu_times", lambda: None)   # no /proc/stat
    assert run.busy_cpus() is None


@pytest.mark.parametrize("args", [["--reps", "0"], ["--reps", "-1"], ["--reps", "x"],
                                  ["--scale", "nan"], ["--scale", "0"], ["--scale", "inf"]])
def test_bad_arguments_are_one_line_errors(capsys, args):
    with pytest.raises(SystemExit) as e:
        run.main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"error: argument {args[0]}: must be" in err.strip().splitlines()[-1]


def test_a_missing_dirty_group_is_not_skipped(monkeypatch, tmp_path):
    # an ImportError of benchmarks.dirty dropped every dirty row and exited 0
    monkeypatch.setattr(run, "NATIVE", tmp_path)                 # exists
    monkeypatch.setattr(run, "OUT", tmp_path / "out")

    class NoKvm:
        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False
    monkeypatch.setattr(run, "Kvm", NoKvm)
    monkeypatch.setattr(run, "vendor_module", lambda: "test")
    monkeypatch.setitem(__import__("sys").modules, "benchmarks.dirty", None)
    with pytest.raises(ImportError):
        run.main(["--only", "dirty"])


PY_SCALE = {"elapsed_s": 1.0, "total_s": 2.0, "data_pages": 83888, "pages": 83907,
            "error": None, "peak_rss_kib": 270000, "rss_before_kib": 15000,
            "ru_maxrss_kib": 270000, "collect_ns_per_page": 100.0, "verify_s": 0.1}
NATIVE_SCALE = {"mode": "dirty", "collections": 3, "pages": 83907, "reset_mismatch": 0,
                "elapsed_s": 0.5, "slot_pages": {"0": 19, "1": 83888}}


def _scale_rows(monkeypatch, native_out):
    monkeypatch.setattr(dirty, "python_dirty", lambda *a, **k: {
        "error": None, "elapsed_s": 0.1, "data_pages": 12288})

    def fake_run(cmd, **kw):              # the scale subprocess: writes its image, prints JSON
        with open(cmd[cmd.index("--image") + 1], "wb"):
            pass
        return subprocess.CompletedProcess(cmd, 0, json.dumps(PY_SCALE) + "\n", "")
    monkeypatch.setattr(dirty.subprocess, "run", fake_run)
    return dirty.bench_scale(lambda *args: dict(native_out))[1:]


def test_scale_rows_pass_when_the_native_run_agrees(monkeypatch):
    for row in _scale_rows(monkeypatch, NATIVE_SCALE):
        assert "error" not in row, row


@pytest.mark.parametrize("change, why", [
    ({"reset_mismatch": 2}, "KVM_RESET_DIRTY_RINGS returned another count"),
    ({"collections": 2}, "2 collections, expected 3"),
    ({"pages": 83000}, "native collected 83000 pages"),
    ({"slot_pages": {"0": 19, "1": 80000}}, "(80000 data)"),
])
def test_scale_rows_check_the_native_run(monkeypatch, change, why):
    # a native run that failed its checks (or collected other pages) was dropped from the
    # scale rows: they said "checks ok" and make bench exited 0
    for row in _scale_rows(monkeypatch, {**NATIVE_SCALE, **change}):
        assert why in row.get("error", ""), row


def test_scale_rows_report_a_native_failure(monkeypatch):
    def failing(*args):
        raise SystemExit("native baseline failed: boom")
    monkeypatch.setattr(dirty, "python_dirty", lambda *a, **k: {
        "error": None, "elapsed_s": 0.1, "data_pages": 12288})

    def fake_run(cmd, **kw):
        with open(cmd[cmd.index("--image") + 1], "wb"):
            pass
        return subprocess.CompletedProcess(cmd, 0, json.dumps(PY_SCALE) + "\n", "")
    monkeypatch.setattr(dirty.subprocess, "run", fake_run)
    for row in dirty.bench_scale(failing)[1:]:
        assert "native baseline failed: boom" in row.get("error", ""), row


def test_the_64_vcpu_case_runs_alone_with_its_peak_rss_and_native_check(monkeypatch):
    # it ran inside the bench's own process: no peak RSS of its own, no native cross-check
    cases = []

    def fake_run(cmd, **kw):
        cases.append(cmd[cmd.index("--scale-case") + 1])
        with open(cmd[cmd.index("--image") + 1], "wb"):
            pass
        return subprocess.CompletedProcess(cmd, 0, json.dumps(PY_SCALE) + "\n", "")
    monkeypatch.setattr(dirty.subprocess, "run", fake_run)
    seen = []

    def native(*args):
        seen.append(args)
        return dict(NATIVE_SCALE, collections=dirty.SCALE_ITERATIONS + 1)
    row = dirty.bench_scale(native)[0]
    assert cases == ["vcpus", "ring", "bitmap"]
    assert row["vcpus"] == dirty.SCALE_VCPUS and row["peak_rss_kib"] == 270000
    assert "peak RSS 264 MiB" in row["info"] and "error" not in row, row
    assert seen[0][:3] == ("dirty", seen[0][1], "--tracker") and "ring" in seen[0]
    assert row["native_pages"] == NATIVE_SCALE["pages"]
