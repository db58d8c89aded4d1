"""The native C baseline of `make bench` runs the same machine as minivmm (IMAGE_FORMAT.md).

The benchmark ratios are only worth something if both sides do the same work: these tests
build benchmarks/native/minivmm-native, feed it images written by Machine.dump_image, and
compare what it counts with what minivmm counts for the same guest bytes."""
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from minivmm import abi
from minivmm.dirty.tracker import DirtySession
from minivmm.machine import Machine
from minivmm.x86 import layout as L
from tests.conftest import payload

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "benchmarks" / "native" / "minivmm_native.c"


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    cc = next((p for p in map(shutil.which, ("cc", "gcc", "clang")) if p), None)
    if cc is None:
        pytest.skip("no C compiler found: cannot build the native baseline")
    exe = tmp_path_factory.mktemp("native") / "minivmm-native"
    r = subprocess.run([cc, "-O2", "-Wall", "-Wextra", "-Werror", "-pthread", "-o", str(exe),
                        str(SRC)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr

    def run(*args):
        proc = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)
    run.exe = exe
    return run


def test_image_carries_the_vmx_real_mode_pages(tmp_path):
    image = tmp_path / "m.img"
    with Machine(payload("hello_real")) as m:
        m.dump_image(str(image))
        want_tss = L.VMX_TSS if m.kvm.check_extension(abi.KVM_CAP_SET_TSS_ADDR) else 0
        want_map = L.VMX_IDENTITY_MAP \
            if m.kvm.check_extension(abi.KVM_CAP_SET_IDENTITY_MAP_ADDR) else 0
        nslots = len(m.vm.memory)
    raw = image.read_bytes()
    assert raw[:8] == b"MVMMIMG1"
    version, tss, idmap, n = struct.unpack_from("<IQQI", raw, 8)
    assert (version, tss, idmap, n) == (2, want_tss, want_map, nslots)
    # both pages lie below the data slot, clear of the system slot
    assert tss == 0 or L.system_slot_size(1) <= tss < tss + 3 * 4096 <= L.DATA_GPA
    assert idmap == 0 or L.system_slot_size(1) <= idmap < L.DATA_GPA


@pytest.mark.parametrize("name, mode", [("bench_out_real", "real"), ("bench_out", "long")])
def test_native_counts_the_same_exits(native, tmp_path, name, mode):
    image = tmp_path / f"{name}.img"
    with Machine(payload(name), regs={"rcx": 300}) as m:
        assert m.payload.mode == mode
        m.dump_image(str(image))
        result = m.run(timeout=60)
    assert result.ok
    py_exits = sum(result.vcpus[0].exit_counts.values())
    n = native("exits", image)
    assert n["vcpus"] == 1
    assert n["exits"] == py_exits
    assert n["sync"] == 300


@pytest.mark.parametrize("tracker", ["ring", "bitmap"])
def test_native_collects_what_minivmm_collects(native, tmp_path, tracker):
    image = tmp_path / "dirty.img"
    kw = {"ring_entries": 1024} if tracker == "ring" else {}
    with DirtySession("dirty_seq", tracker=tracker, vcpus=2, pages=4096, iterations=3,
                      collect="sync", **kw) as s:
        s.machine.dump_image(str(image))
        records = s.run(timeout=60)
        assert all(r.ok for r in records)
        data = sum(len(r.data_pages) for r in records)
        every = sum(p.count for r in records for p in r.collection.sets.values())
    assert data == 3 * 4096         # dirty_seq: every page of each share, every iteration
    args = ["dirty", image, "--tracker", tracker] + (["--ring-entries", 1024] * bool(kw))
    n = native(*args)
    assert n["vcpus"] == 2 and n["reset_mismatch"] == 0
    # the native side also logs the system slot (page tables, stacks) but never less
    assert data <= n["pages"] <= data + 3 * 64, n
    # the data slot alone: exactly what minivmm collected (both de-duplicate per collection)
    assert n["slot_pages"]["1"] == data, n
    assert n["collections"] == 4, n
    assert n["pages"] == every, (n, every)      # the system slot's pages too
    if tracker == "ring":
        assert n["ring_full_exits"] >= 1     # 2048 pages a vCPU through 1024 entries


def test_native_still_reads_version_1_images(native, tmp_path):
    subprocess.run([sys.executable, str(ROOT / "benchmarks/native/make_test_image.py"),
                    str(tmp_path)], check=True, capture_output=True)
    n = native("exits", tmp_path / "long-exits.img")
    assert (n["exits"], n["sync"]) == (1001, 1000)


def test_native_fails_when_its_result_cannot_be_written(native, tmp_path):
    subprocess.run([sys.executable, str(ROOT / "benchmarks/native/make_test_image.py"),
                    str(tmp_path)], check=True, capture_output=True)
    with open("/dev/full", "w") as full:          # every write fails with ENOSPC
        proc = subprocess.run([str(native.exe), "exits", str(tmp_path / "long-exits.img")],
                              stdout=full, stderr=subprocess.PIPE, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "stdout" in proc.stderr and "No space left on device" in proc.stderr


@pytest.mark.parametrize("off_by", [0, 1])
def test_bench_exit_rows_check_the_native_count(native, monkeypatch, off_by):
    # the KVM_RUN round-trip rows compared rates only: a baseline doing other work would
    # have given a ratio all the same (the dirty rows check their counts)
    from benchmarks import run
    monkeypatch.setattr(run, "NATIVE", native.exe)
    real = run.native

    def miscounting(*args):
        out = real(*args)
        out["exits"] += off_by
        return out
    monkeypatch.setattr(run, "native", miscounting)
    rows = run.bench_exits(reps=1, scale=0.001)
    assert [r["bench"] for r in rows] == ["KVM_RUN round trips, real mode",
                                          "KVM_RUN round trips, long mode CPL3"]
    for r in rows:
        if off_by:
            assert r["error"] == "exit counts differ (python, native): [(1001, 1002)]"
        else:
            assert "error" not in r and r["ratio"] > 0
