"""Dirty-tracking benchmarks (issue 3, speed): minivmm's DirtySession against the native baseline.

Not a kernel ABI mirror: it times the layers that are (minivmm.dirty, and the C baseline's
own use of <linux/kvm.h>).

Same guest bytes on both sides: DirtySession builds the machine, Machine.dump_image writes
it before the run, and benchmarks/native/minivmm-native runs that image with the same
tracker. Two figures per configuration:

* end to end: dirty pages per second (data pages reported over all iterations / wall time
  of ``session.run()``; native: its ``pages_per_s``), target >= 0.90 of native;
* collection alone: ns per collected page (harvest + reset + dedupe, or GET + CLEAR +
  decode, including ring-full harvests), target <= 1.5x native.

Plus a "scale" group without a native ratio: 64 vCPUs, and a 16 GiB data slot with 1%
of its pages dirtied, each run in a subprocess so its peak RSS is its own, and its image
run by the native baseline, whose counts must match:

    python -m benchmarks.dirty --scale-case vcpus|ring|bitmap [--image PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SLOT_DATA = 1      # minivmm.x86.layout.SLOT_DATA (the image keeps minivmm's slot ids)

PAGES_PER_VCPU = 16384
ITERATIONS = 10
CONFIGS = (("ring", 4096), ("ring", 65536), ("bitmap", None))

SCALE_VCPUS, SCALE_VCPU_PAGES, SCALE_ITERATIONS = 64, 64, 3
HUGE_PAGES, HUGE_STRIDE, HUGE_ITERATIONS = 4194304, 100, 2     # 16 GiB slot, 1% dirtied
RUN_TIMEOUT = 300.0


def _label(tracker: str, entries: int | None) -> str:
    return f"ring {entries}" if tracker == "ring" else "bitmap"


def _check(session, records) -> str | None:
    """None when every check passed, else what failed (first few reasons)."""
    bad = []
    res = session.result
    if res is None or not res.ok:
        ends = [st.end.summary() if st.end else "no end" for st in session.machine.states
                if st.end is None or st.end.reason not in ("exit-port", "hlt") or st.end.code]
        bad.append(f"guest did not finish cleanly: {ends[:3]}")
    for r in records:
        if len(r.missed):
            bad.append(f"iteration {r.iteration}: {len(r.missed)} missed pages")
        elif not r.ok:
            c = r.collection
            bad.append(f"iteration {r.iteration}: not ok (reset_count_ok={c.reset_count_ok}, "
                       f"lost={len(c.lost)}, bogus={len(c.bogus)})")
    want = sum(1 for r in records if isinstance(r.iteration, int))
    if want != session.iterations_asked:
        bad.append(f"{want} sync collections, expected {session.iterations_asked}")
    return "; ".join(bad[:4]) if bad else None


def python_dirty(tracker: str, entries: int | None, vcpus: int, pages: int, iterations: int,
                 payload: str = "dirty_seq", stride: int = 4, image: str | None = None,
                 verify: bool = True) -> dict:
    """One DirtySession run; returns its end-to-end and collection figures.

    verify=False does only what the native baseline does (collect); the verified run of
    the same configuration proves those collections complete."""
    from minivmm.dirty.tracker import DirtySession

    kw = {"ring_entries": entries} if entries else {}
    with DirtySession(payload, tracker=tracker, vcpus=vcpus, pages=pages,
                      iterations=iterations, stride=stride, collect="sync", verify=verify,
                      **kw) as s:
        if image:
            s.machine.dump_image(image)
        # Sum what every tracker.collect() call timed itself: from when it holds the
        # tracker's lock to after the reset, the span the native baseline's collect()
        # times (its caller holds the lock); the final call too, which is not recorded
        # when it found nothing.
        inner, spent = s.tracker.collect, [0.0]

        def timed_collect(*args, **kwargs):
            col = inner(*args, **kwargs)
            spent[0] += col.collect_s
            return col

        s.tracker.collect = timed_collect
        # Verification (content and plan oracles) runs in the consumer thread; timed apart
        # so the report can tell it from tracking. _record is DirtySession's own hook.
        record, verify = getattr(s, "_record", None), [0.0]
        if record is not None:
            def timed_record(*a):
                t0 = time.perf_counter()
                try:
                    return record(*a)
                finally:
                    verify[0] += time.perf_counter() - t0
            s._record = timed_record
        t0 = time.perf_counter()
        records = s.run(timeout=RUN_TIMEOUT)
        elapsed = time.perf_counter() - t0
        error = _check(s, records)
        data_pages = sum(len(r.data_pages) for r in records)
        collected = sum(p.count for r in records for p in r.collection.sets.values())
        reported_s = sum(r.collection.collect_s for r in records)
        background_s = sum(r.collection.background_s for r in records)
        collect_s = spent[0] + background_s
        return {"elapsed_s": elapsed, "data_pages": data_pages, "pages": collected,
                "pages_per_s": data_pages / elapsed if elapsed > 0 else 0.0,
                "collect_s": collect_s, "reported_collect_s": reported_s,
                "background_s": background_s, "verify_s": verify[0],
                "collect_ns_per_page": collect_s * 1e9 / collected if collected else 0.0,
                "ring_full_exits": sum(r.collection.ring_full_exits for r in records),
                "records": len(records), "error": error}


def _native_dirty(native, image: str, tracker: str, entries: int | None,
                  collections: int | None = None) -> dict:
    args = ["dirty", image, "--tracker", tracker]
    if entries:
        args += ["--ring-entries", entries]
    try:
        n = native(*args)
    except (SystemExit, subprocess.SubprocessError, ValueError) as e:
        return {"error": f"native: {e}"}
    # The same figure as the Python side's: data-slot pages over the run, not every
    # logged slot's (the system slot's page-table pages are not "dirty pages" of the
    # workload; minivmm's numerator leaves them out)
    data = n.get("slot_pages", {}).get(str(SLOT_DATA))
    if data is not None:
        n["data_pages"] = data
        n["data_pages_per_s"] = data / n["elapsed_s"] if n["elapsed_s"] > 0 else 0.0
    bad = []
    if n.get("reset_mismatch"):
        bad.append(f"{n['reset_mismatch']} KVM_RESET_DIRTY_RINGS returned another count")
    if collections is not None and n.get("collections") != collections:
        bad.append(f"{n.get('collections')} collections, expected {collections}")
    if bad:
        n["error"] = "native: " + "; ".join(bad)
    return n


def bench_speed(reps: int, scale: float, native) -> list:
    per_vcpu = max(1024, int(PAGES_PER_VCPU * scale))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        python_dirty("ring", 4096, 1, 1024, 2)                  # warm-up: imports, assembly
        for vcpus in (1, 2):
            pages = per_vcpu * vcpus
            for tracker, entries in CONFIGS:
                label = f"{_label(tracker, entries)}, {vcpus} vCPU"
                image = os.path.join(tmp, f"dirty_{tracker}_{entries}_{vcpus}.img")
                py, nat, errors = [], [], []
                # One verified run (both oracles; writes the image), then timed runs that,
                # like the native baseline, only collect.
                checked = python_dirty(tracker, entries, vcpus, pages, ITERATIONS, image=image)
                errors += [checked["error"]] if checked["error"] else []
                for rep in range(reps):
                    # alternate which side goes first, so neither always follows the other
                    def run_py():
                        return python_dirty(tracker, entries, vcpus, pages, ITERATIONS,
                                            verify=False)

                    def run_nat():
                        return _native_dirty(native, image, tracker, entries, ITERATIONS + 1)
                    if rep % 2:
                        n = run_nat()
                        p = run_py()
                    else:
                        p = run_py()
                        n = run_nat()
                    if p["data_pages"] != checked["data_pages"]:
                        errors.append(f"unverified run collected {p['data_pages']} data pages, "
                                      f"the verified one {checked['data_pages']}")
                    py.append(p)
                    nat.append(n)
                    errors += [e for e in (p["error"], n.get("error")) if e]
                    # Both de-duplicate per collection: the counts must agree exactly
                    if "pages" in n and (n["pages"] != p["pages"]
                                         or n.get("data_pages") != p["data_pages"]):
                        errors.append(f"native collected {n['pages']} pages "
                                      f"({n.get('data_pages')} data), python {p['pages']} "
                                      f"({p['data_pages']} data)")
                ok_nat = [n for n in nat if "error" not in n]
                pairs = [(a, b) for a, b in zip(py, nat) if "error" not in b]
                common = {"n": pages, "vcpus": vcpus, "tracker": tracker,
                          "ring_entries": entries, "iterations": ITERATIONS}
                pps = statistics.median(x["pages_per_s"] for x in py)
                ns = statistics.median(x["collect_ns_per_page"] for x in py)
                npps = statistics.median(x.get("data_pages_per_s", x["pages_per_s"])
                                         for x in ok_nat) if ok_nat else None
                # ratios per interleaved pair, then their median: a host that drifts
                # moves both runs of a pair alike
                e2e_r = [a["pages_per_s"] / b.get("data_pages_per_s", b["pages_per_s"])
                         for a, b in pairs]
                col_r = [a["collect_ns_per_page"] / b["collect_ns_per_page"]
                         for a, b in pairs if b["collect_ns_per_page"]]
                nns = statistics.median(x["collect_ns_per_page"] for x in ok_nat) \
                    if ok_nat else None
                e2e = {"bench": f"dirty pages/s, {label} (verified: {checked['pages_per_s']:.0f})",
                       **common, "python": pps,
                       "native": npps,
                       "ratio": statistics.median(e2e_r) if e2e_r else None,
                       "ratio_of_medians": pps / npps if npps else None,
                       "pair_ratios": e2e_r, "target": 0.90, "unit": "pages/s",
                       "python_all": [x["pages_per_s"] for x in py],
                       "native_all": [x.get("data_pages_per_s", x.get("pages_per_s"))
                                      for x in nat],
                       "python_elapsed_s": [x["elapsed_s"] for x in py],
                       "native_elapsed_s": [x.get("elapsed_s") for x in nat],
                       "python_data_pages": py[0]["data_pages"],
                       "python_verified_pages_per_s": checked["pages_per_s"],
                       "python_verified_verify_s": checked["verify_s"],
                       "native_pages": [x.get("pages") for x in nat]}
                col = {"bench": f"dirty collect ns/page, {label}", **common, "python": ns,
                       "native": nns, "ratio": statistics.median(col_r) if col_r else None,
                       "ratio_of_medians": ns / nns if nns else None,
                       "pair_ratios": col_r, "target": 1.5,
                       "unit": "ns/page", "higher_is_better": False,
                       "python_all": [x["collect_ns_per_page"] for x in py],
                       "native_all": [x.get("collect_ns_per_page") for x in nat],
                       "python_collect_s": [x["collect_s"] for x in py],
                       "python_tracker_collect_s": [x["reported_collect_s"] for x in py],
                       "python_background_s": [x["background_s"] for x in py],
                       "python_pages": [x["pages"] for x in py],
                       "python_ring_full_exits": [x["ring_full_exits"] for x in py],
                       "native_collect_s": [x.get("collect_s") for x in nat],
                       "native_ring_full_exits": [x.get("ring_full_exits") for x in nat]}
                if errors:
                    e2e["error"] = col["error"] = "; ".join(dict.fromkeys(errors))
                rows += [e2e, col]
    return rows


# ------------------------------------------------------------------ scale

def _peak_rss_kib() -> int:
    """This process image's peak RSS. ru_maxrss is the figure asked for, but Linux carries
    the parent's high-water mark over fork/vfork + exec into it (exec folds the old mm's
    hiwater into signal->maxrss), so a child of a big parent reports the parent's peak;
    /proc/self/status VmHWM is the same measure for this mm only."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def scale_case(case: str, image: str | None = None) -> dict:
    """One scale case, meant to run in its own process (peak RSS): "vcpus" (64 vCPU
    threads, a small share each) or a tracker (the 16 GiB slot with 1% dirtied)."""
    rss0 = _peak_rss_kib()
    t0 = time.perf_counter()
    if case == "vcpus":
        p = python_dirty("ring", 4096, SCALE_VCPUS, SCALE_VCPUS * SCALE_VCPU_PAGES,
                         SCALE_ITERATIONS, image=image)
    else:
        p = python_dirty(case, 4096 if case == "ring" else None, 1, HUGE_PAGES,
                         HUGE_ITERATIONS, payload="dirty_stride", stride=HUGE_STRIDE,
                         image=image)
    p["total_s"] = time.perf_counter() - t0
    p["rss_before_kib"] = rss0
    p["peak_rss_kib"] = _peak_rss_kib()
    p["ru_maxrss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return p


def bench_scale(native) -> list:
    """(a) 64 vCPU threads, a small share each; (b) a 16 GiB data slot, 1% of its pages
    dirtied, per tracker. Each case in its own process, its image run natively too."""
    cases = [("vcpus", f"scale: {SCALE_VCPUS} vCPUs, dirty_seq, ring 4096",
              {"n": SCALE_VCPUS * SCALE_VCPU_PAGES, "vcpus": SCALE_VCPUS,
               "iterations": SCALE_ITERATIONS}, "ring", SCALE_ITERATIONS)]
    cases += [(tracker, f"scale: 16 GiB slot, 1% dirty, {_label(tracker, 4096)}",
               {"n": HUGE_PAGES, "vcpus": 1, "stride": HUGE_STRIDE,
                "iterations": HUGE_ITERATIONS}, tracker, HUGE_ITERATIONS)
              for tracker in ("ring", "bitmap")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case, label, shape, tracker, iterations in cases:
            image = os.path.join(tmp, f"scale_{case}.img")
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(
                filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
            proc = subprocess.run([sys.executable, "-m", "benchmarks.dirty", "--scale-case",
                                   case, "--image", image], capture_output=True, text=True,
                                  timeout=600, cwd=ROOT, env=env)
            row = {"bench": label, **shape, "python": None, "native": None,
                   "ratio": None, "target": None, "unit": "s"}
            try:
                p = json.loads(proc.stdout.strip().splitlines()[-1])
            except (IndexError, ValueError):
                row["error"] = f"subprocess failed ({proc.returncode}): " \
                               f"{proc.stderr.strip()[-400:]}"
                row["info"] = "FAILED"
                rows.append(row)
                continue
            n = _native_dirty(native, image, tracker, 4096 if tracker == "ring" else None,
                              iterations + 1) \
                if os.path.exists(image) else {"error": "native: no image"}
            row.update(elapsed_s=p["elapsed_s"], total_s=p["total_s"],
                       data_pages=p["data_pages"], checks_ok=p["error"] is None,
                       peak_rss_kib=p["peak_rss_kib"], rss_before_kib=p["rss_before_kib"],
                       ru_maxrss_kib=p["ru_maxrss_kib"],
                       collect_ns_per_page=p["collect_ns_per_page"], verify_s=p["verify_s"],
                       native_elapsed_s=n.get("elapsed_s"), native_pages=n.get("pages"))
            row["info"] = (f"{p['elapsed_s']:.3f} s run ({p['total_s']:.2f} s with setup), "
                           f"{p['data_pages']} pages (verify {p['verify_s']:.3f} s), checks "
                           f"{'ok' if p['error'] is None else 'FAILED'}, peak RSS "
                           f"{p['peak_rss_kib'] / 1024:.0f} MiB (before {p['rss_before_kib'] / 1024:.0f})"
                           + (f"; native {n['elapsed_s']:.3f} s" if "elapsed_s" in n else ""))
            # the native run is checked as the speed rows' are: its failure, a reset count
            # or a page count that differs was dropped here, and the row said "checks ok"
            errors = [e for e in (p["error"], _native_mismatch(p, n)) if e]
            if errors:
                row["error"] = "; ".join(errors)
            rows.append(row)
    return rows


def _native_mismatch(p: dict, n: dict) -> str | None:
    """What is wrong with a native run beside the Python run ``p`` of the same image."""
    if n.get("error"):
        return n["error"]
    if n.get("pages") != p.get("pages") or n.get("data_pages") != p.get("data_pages"):
        return (f"native collected {n.get('pages')} pages ({n.get('data_pages')} data), "
                f"python {p.get('pages')} ({p.get('data_pages')} data)")
    return None


# ------------------------------------------------------------------ host

def _probe_ops():
    """Small fixed pieces of work, each like one step of a collection."""
    import mmap
    import threading

    import numpy as np
    src, dst = mmap.mmap(-1, 65536), mmap.mmap(-1, 65536)
    src.write(b"\1" * 65536)                 # both pre-faulted: the copy, not page faults
    dst.write(b"\0" * 65536)
    a, lock = np.arange(8), threading.Lock()

    def copy():
        dst[:] = src

    def lock_cycle():
        with lock:
            pass
    return (("an uncontended lock", lock_cycle), ("an 8-element numpy add", lambda: a + a),
            ("a numpy reduction", a.max), ("a 64 KiB copy", copy))


def bench_host() -> list:
    """How much slower user-space code runs right after KVM_RUN returns on this host.

    A host quirk, measured rather than assumed: each probe runs at a ring-full exit before
    the tracker's handler, then again straight away. A host where the first figure is far
    above the second makes every code path in a collection dearer the first time (on
    kvm_pvm several times dearer, docs/benchmarks.md); the native baseline pays it too,
    but over far fewer code paths."""
    from minivmm.dirty.tracker import DirtySession

    probes = _probe_ops()
    first = {name: [] for name, _ in probes}
    again = {name: [] for name, _ in probes}
    pc = time.perf_counter
    with DirtySession("dirty_seq", tracker="ring", vcpus=1, pages=16384, iterations=10,
                      ring_entries=4096, verify=False) as s:
        handler = s.tracker.on_ring_full
        turn = [0]

        def probed(st):
            # one probe per exit, in turn, so each is the first code after KVM_RUN
            name, op = probes[turn[0] % len(probes)]
            turn[0] += 1
            for out in (first, again):
                t0 = pc()
                op()
                out[name].append(pc() - t0)
            return handler(st)
        s.machine.on_ring_full = probed
        s.run(timeout=RUN_TIMEOUT)
    parts, row = [], {"bench": "host: user space right after KVM_RUN", "python": None,
                      "native": None, "ratio": None, "target": None, "unit": "us",
                      "probes": {}}
    for name, _ in probes:
        if not first[name]:
            continue
        f, g = statistics.median(first[name]) * 1e6, statistics.median(again[name]) * 1e6
        row["probes"][name] = {"first_us": f, "again_us": g, "n": len(first[name])}
        parts.append(f"{name} {f:.1f} us, again {g:.1f}")
    if not parts:
        row["error"] = "no ring-full exit to probe at"
    row["info"] = "first run at a ring-full exit: " + "; ".join(parts)
    return [row]


def bench_dirty(reps: int, scale: float, native) -> list:
    return bench_speed(reps, scale, native) + bench_scale(native) + bench_host()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="dirty-tracking benchmark helpers")
    ap.add_argument("--scale-case", choices=["vcpus", "ring", "bitmap"], required=True,
                    help="run one scale case (64 vCPUs, or the 16 GiB / 1%% slot with this "
                         "tracker) once and print its figures as JSON")
    ap.add_argument("--image", help="also write the machine image here (for the native run)")
    args = ap.parse_args(argv)
    print(json.dumps(scale_case(args.scale_case, args.image)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
