"""minivmm abi-check: every check passes or skips here, and every check can fail."""
import contextlib
import json
import re
import time
import xml.etree.ElementTree as ET

import pytest

from minivmm import Kvm
from minivmm._sys import KvmError
from minivmm.abicheck import docs, report, runner
from minivmm.abicheck.faults import FAULTS
from tests.conftest import ROOT, run_cli
from tests.kvm.reset_model import cut_resets

SPECS = list(runner.load_checks().values())
IDS = [s.id for s in SPECS]
# Checks written for a kernel bug (docs/abi-check.md, "Kernel bugs found"): on an affected
# kernel, such as this host's 6.18, they fail, but only with the failure they exist to
# detect, named in their diagnostics; on a fixed kernel they pass.
KNOWN_KERNEL_BUGS = {"ring.reset.signal_rearms": "were rewritten but not logged"}
# ... and a model of a kernel without the bug for each, where they must pass: on an affected
# host their fault test would pass whatever the fault did, so it runs on the model.
FIXED_KERNELS = {"ring.reset.signal_rearms":
                 lambda: cut_resets([962, 2050, 2178, 2178, None], reprotects=True)}


@pytest.fixture(scope="module")
def kvm():
    with Kvm() as k:
        yield k


def test_registry_is_sane():
    assert len(IDS) == len(set(IDS))
    assert set(FIXED_KERNELS) == set(KNOWN_KERNEL_BUGS)
    for s in SPECS:
        assert s.rules and all(isinstance(r, int) and 1 <= r <= 67 for r in s.rules), s.id
        assert s.cite and s.summary and s.summary != s.id, s.id
        assert s.fault in FAULTS, f"{s.id} names an unknown fault {s.fault!r}"


@pytest.mark.parametrize("check_id", IDS)
def test_check_passes_or_skips_with_reason(kvm, check_id):
    spec = runner.REGISTRY[check_id]
    res = runner.run_one(spec, kvm, unsafe=False)
    if res.status == "skip":
        assert res.reason, check_id
    elif check_id in KNOWN_KERNEL_BUGS and res.status == "fail":
        assert any(KNOWN_KERNEL_BUGS[check_id] in d for d in res.diagnostics), res.diagnostics
    else:
        assert res.status == "pass", f"{check_id}: {res.reason} {res.diagnostics}"


@pytest.mark.parametrize("check_id", [s.id for s in SPECS if not s.unsafe])
def test_check_fails_under_its_fault(kvm, check_id):
    spec = runner.REGISTRY[check_id]
    kernel = FIXED_KERNELS.get(check_id, contextlib.nullcontext)
    with kernel():
        clean = runner.run_one(spec, kvm)
    if clean.status == "skip":
        pytest.skip(f"{check_id} does not apply on this host: {clean.reason}")
    assert check_id not in FIXED_KERNELS or clean.status == "pass", (clean.reason,
                                                                      clean.diagnostics)
    with kernel(), FAULTS[spec.fault]():
        res = runner.run_one(spec, kvm)
    assert res.status == "fail", (f"{check_id} still reports {res.status} under fault "
                                  f"{spec.fault!r}: it cannot detect what it claims to")
    # detected by the check, not by a Python error in the check or the fault itself
    assert res.reason and not res.reason.startswith("check raised"), res.reason


@pytest.mark.parametrize("cuts, lost", [
    ([962, 2050, 2178, 2178, None], "960-961, 3010-3011, 5188-5189, 7366-7367"),
    ([700], "640-699")], ids=["cut four times", "cut once, then calls that reset nothing"])
def test_signal_rearms_passes_on_a_fixed_kernel_and_fails_on_the_bug(kvm, cuts, lost):
    # Modelled kernels (tests/kvm/reset_model.py): this host shows only the bug. The second
    # plan is one cut, then calls stopped before their first entry and the held-back reset
    # doing the rest; the check took it for "never cut short" and skipped, on any kernel.
    spec = runner.REGISTRY["ring.reset.signal_rearms"]
    with cut_resets(cuts, reprotects=True):
        fixed = runner.run_one(spec, kvm)
    assert fixed.status == "pass", (fixed.reason, fixed.diagnostics)
    with cut_resets(cuts, reprotects=False):
        buggy = runner.run_one(spec, kvm)
    assert buggy.status == "fail", (buggy.reason, buggy.diagnostics)
    # the pages of each cut's last batch, ending where it stopped, as on this host's 6.18
    assert any(f"pages {lost} were rewritten" in d for d in buggy.diagnostics), buggy.diagnostics
    with cut_resets([None], reprotects=True):       # before v6.17: never cut short
        assert runner.run_one(spec, kvm).status == "skip"


def test_ktap_output_and_exit_status():
    proc = run_cli("abi-check", "-k", "caps.", timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "KTAP version 1"
    plan = [l for l in lines if re.fullmatch(r"1\.\.\d+", l)]
    assert len(plan) == 1
    n = int(plan[0][3:])
    results = [l for l in lines if re.match(r"(not )?ok \d+ ", l)]
    assert len(results) == n and [int(l.split()[1 if l.startswith("ok") else 2])
                                  for l in results] == list(range(1, n + 1))
    assert any("vendor module" in l for l in lines if l.startswith("#"))
    assert lines[-1].startswith("# Totals: pass:")
    assert parse_ktap(proc.stdout)["pass"] == n


def test_the_whole_run_is_strict_ktap():
    proc = run_cli("abi-check", timeout=600)
    counts = parse_ktap(proc.stdout)
    failed = re.findall(r"^not ok \d+ (\S+)$", proc.stdout, re.M)
    assert set(failed) <= set(KNOWN_KERNEL_BUGS) and counts["error"] == 0, proc.stdout
    assert proc.returncode == (1 if failed else 0), proc.stderr



# The result-line forms of tools/testing/kunit/kunit_parser.py (TEST_RESULT, TEST_RESULT_SKIP)
KTAP_RESULT = re.compile(r"^(ok|not ok) ([0-9]+) (- )?([^#]*)( # .*)?$")
KTAP_TOTALS = re.compile(r"# Totals: pass:(\d+) fail:(\d+) xfail:(\d+) xpass:(\d+) "
                         r"skip:(\d+) error:(\d+)")


def parse_ktap(text: str) -> dict:
    """A strict reader of what abi-check prints (Documentation/dev-tools/ktap.rst): the
    version line, header diagnostics, one plan, then per test `#` diagnostics and one result
    numbered from 1, then kselftest.h's totals line, which must agree with the results."""
    lines = text.splitlines()
    assert lines[0] == "KTAP version 1" and text.endswith("\n")
    i = 1
    while lines[i].startswith("# "):
        i += 1
    plan = re.fullmatch(r"1\.\.(\d+)", lines[i])
    assert plan, lines[i]
    statuses = []
    for line in lines[i + 1:-1]:
        if line.startswith("# "):
            continue
        m = KTAP_RESULT.match(line)
        assert m and m.group(3) is None and int(m.group(2)) == len(statuses) + 1, line
        directive = (m.group(5) or " # ")[3:].split(" ")[0]
        assert directive in ("", "SKIP", "ERROR"), line
        assert directive != "ERROR" or m.group(1) == "not ok", line   # ktap.rst
        statuses.append({"SKIP": "skip", "ERROR": "error"}.get(
            directive, "pass" if m.group(1) == "ok" else "fail"))
    assert len(statuses) == int(plan.group(1))
    totals = KTAP_TOTALS.fullmatch(lines[-1])
    assert totals, lines[-1]
    counts = {s: statuses.count(s) for s in ("pass", "fail", "skip", "error")}
    assert [int(g) for g in totals.groups()] == [counts["pass"], counts["fail"], 0, 0,
                                                 counts["skip"], counts["error"]]
    return counts


def _broken(ctx):
    return {}["no such key"]       # a bug in a check, not a kernel failure


def test_a_check_that_raises_is_an_error_not_a_kernel_failure(kvm):
    # it was a plain "not ok", counted in fail:, the same as the kernel breaking a rule
    import dataclasses
    spec = dataclasses.replace(runner.REGISTRY["caps.api_version"], fn=_broken)
    results = [runner.run_one(spec, kvm), runner.run_one(runner.REGISTRY["caps.api_version"],
                                                         kvm)]
    assert [r.status for r in results] == ["error", "pass"]
    text = report.ktap(results, runner.host_header(kvm))
    assert "not ok 1 caps.api_version # ERROR check raised KeyError: 'no such key'\n" in text
    assert "# FAIL" not in text and "KeyError: 'no such key'" in text.split("not ok 1")[0]
    assert parse_ktap(text) == {"pass": 1, "fail": 0, "skip": 0, "error": 1}
    assert report.exit_status(results) == report.KSFT_FAIL
    assert report.exit_status(results[:1] + [runner.Result("b", "skip")]) == report.KSFT_FAIL
    suite = ET.fromstring(report.junit(results, runner.host_header(kvm))).find("testsuite")
    assert (suite.get("errors"), suite.get("failures")) == ("1", "0")
    assert suite.find("testcase/error").get("message").startswith("check raised KeyError")
    data = json.loads(report.to_json(results, runner.host_header(kvm)))
    assert [r["status"] for r in data["results"]] == ["error", "pass"]


def test_a_check_stopped_by_the_fd_limit_is_an_error_not_a_kernel_failure(kvm, monkeypatch):
    # `ulimit -n 20; minivmm abi-check` reported ring.reset.signal_partial "not ok" (FAIL:
    # "unexpected error: KVM_CREATE_VCPU failed: EMFILE"), as if the kernel broke a rule;
    # and an fd-making call under expect_errno (KVM_CREATE_VM takes its fd before it reads
    # the type) was "expected EINVAL, observed EMFILE". Our limit, never the kernel's
    import errno
    from minivmm import _sys, abi
    from tests.conftest import failing_ioctl
    for request, check_id in ((abi.KVM_CREATE_VCPU, "ring.enable.after_vcpu"),
                              (abi.KVM_CREATE_VM, "caps.create_vm.bad_type")):
        with monkeypatch.context() as m:
            for entry in ("_ioctl", "_ioctl_fast"):
                m.setattr(_sys, entry, failing_ioctl(getattr(_sys, entry), request,
                                                     errno.EMFILE))
            res = runner.run_one(runner.REGISTRY[check_id], kvm)
        assert res.status == "error", (check_id, res.status, res.reason)
        assert res.reason.startswith("host limit, not the kernel's: ") \
            and "EMFILE" in res.reason, (check_id, res.reason)
        assert "# ERROR host limit" in report.ktap_result(1, res)


def test_ktap_results_are_written_as_each_check_ends(kvm, monkeypatch):
    # the report was written once every check had run: a runner that stopped a hung run
    # at its timeout got no KTAP at all, not even the results of the checks that had ended
    import dataclasses
    import io
    from minivmm import cli
    seen, out = [], io.StringIO()
    second = runner.REGISTRY["caps.create_vm.on_vm_fd"]

    def spy(ctx):
        seen.append(out.getvalue())
        return second.fn(ctx)
    monkeypatch.setitem(runner.REGISTRY, second.id, dataclasses.replace(second, fn=spy))
    monkeypatch.setattr("sys.stdout", out)
    assert cli.main(["abi-check", "-k", "caps.create_vm."]) == 0
    assert seen[0].startswith("KTAP version 1\n") and "\n1..2\n" in seen[0]
    assert seen[0].endswith("\nok 1 caps.create_vm.bad_type\n")
    assert parse_ktap(out.getvalue()) == {"pass": 2, "fail": 0, "skip": 0, "error": 0}


def test_formats_json_and_junit():
    proc = run_cli("abi-check", "-k", "caps.api", "--format", "json")
    data = json.loads(proc.stdout)
    assert data["results"][0]["id"] == "caps.api_version" and data["exit_status"] == 0
    proc = run_cli("abi-check", "-k", "caps.api", "--format", "junit")
    root = ET.fromstring(proc.stdout)
    case = root.find(".//testcase")
    assert case.get("name") == "caps.api_version"


def test_the_json_report_has_one_documented_shape():
    # "skipped" was in the no-KVM document only: doc["skipped"] on a run that had KVM was a
    # KeyError, so a consumer could not test one key to tell the two apart
    ran = json.loads(run_cli("abi-check", "-k", "caps.api", "--format", "json").stdout)
    skipped = json.loads(run_cli("abi-check", "--format", "json",
                                 env={"MINIVMM_KVM_DEVICE": "/nonexistent/kvm"}).stdout)
    assert list(ran) == list(skipped) and ran["skipped"] is None
    doc = docs.DOC.read_text()
    result_keys = list(ran["results"][0])
    assert result_keys == ["n", "id", "status", "reason", "rules", "cite", "summary",
                           "diagnostics", "seconds"]
    assert all(f"`{k}`" in doc for k in list(ran) + result_keys + list(ran["header"])), \
        "docs/abi-check.md must name every key of the JSON report"


def test_list_and_unknown_pattern():
    proc = run_cli("abi-check", "--list")
    assert proc.returncode == 0 and all(i in proc.stdout for i in IDS)
    proc = run_cli("abi-check", "-k", "no.such.check")
    assert proc.returncode == 2 and "no check id matches" in proc.stderr


def test_no_kvm_is_a_skip_as_in_the_kernels_kvm_selftests():
    # it was exit 2, which a kselftest runner counts as a failure of this machine
    env = {"MINIVMM_KVM_DEVICE": "/nonexistent/kvm"}
    proc = run_cli("abi-check", env=env)
    assert proc.returncode == report.KSFT_SKIP
    line, = proc.stderr.strip().splitlines()
    assert line.startswith("minivmm abi-check: skipped: open /nonexistent/kvm failed: ENOENT")
    version, plan = proc.stdout.splitlines()
    assert version == "KTAP version 1"
    assert plan.startswith("1..0 # SKIP open /nonexistent/kvm failed: ENOENT")
    doc = json.loads(run_cli("abi-check", "--format", "json", env=env).stdout)
    assert doc["results"] == [] and "ENOENT" in doc["skipped"]
    assert doc["exit_status"] == report.KSFT_SKIP
    proc = run_cli("abi-check", "--format", "junit", env=env)
    suite = ET.fromstring(proc.stdout).find("testsuite")
    assert proc.returncode == report.KSFT_SKIP and suite.get("tests") == "0"
    assert "ENOENT" in suite.find("properties/property[@name='skipped']").get("value")


def test_a_device_that_is_not_kvm_cannot_run():
    # 1 would tell a kselftest runner that the kernel failed a check
    proc = run_cli("abi-check", "-k", "caps.api", env={"MINIVMM_KVM_DEVICE": "/dev/null"})
    assert proc.returncode == 2 and proc.stdout == ""
    line, = proc.stderr.strip().splitlines()
    assert "KVM_GET_API_VERSION" in line and "ENOTTY" in line and "/dev/null" in line


@pytest.mark.parametrize("kind", ["directory", "symlink loop"])
def test_a_device_path_that_is_no_device_cannot_run(tmp_path, kind):
    # open() failing with EISDIR or ELOOP was "skipped" (status 4), as on a machine with no
    # KVM: a fleet runner counted a misconfigured MINIVMM_KVM_DEVICE as a skip
    path = tmp_path / "kvm"
    if kind == "directory":
        path.mkdir()
    else:
        path.symlink_to(path)
    proc = run_cli("abi-check", "-k", "caps.api", env={"MINIVMM_KVM_DEVICE": str(path)})
    assert proc.returncode == 2 and proc.stdout == ""
    line, = proc.stderr.strip().splitlines()
    assert line.startswith(f"minivmm abi-check: cannot run: open {path} failed: "), line


def test_an_unwritable_output_is_refused_before_any_check(tmp_path):
    bad = tmp_path / "no-such-dir" / "report.xml"
    proc = run_cli("abi-check", "--output", str(bad), "--trace-ioctls")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line, = proc.stderr.strip().splitlines()     # no ioctl traced: nothing ran
    assert "--output" in line and "No such file" in line and not bad.exists()
    proc = run_cli("abi-check", "-k", "caps.api", "--output", "")   # was: stdout, silently
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == "minivmm abi-check: --output needs a file name\n"
    good = tmp_path / "report.json"
    proc = run_cli("abi-check", "-k", "caps.api", "--format", "json", "--output", str(good))
    assert proc.returncode == 0 and proc.stdout == ""
    assert json.loads(good.read_text())["results"][0]["status"] == "pass"


def test_a_report_that_cannot_be_written_is_cannot_run_not_a_failure(tmp_path):
    proc = run_cli("abi-check", "-k", "caps.api", "--output", "/dev/full")
    line, = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "No space left on device" in line
    listing = tmp_path / "list.txt"
    proc = run_cli("abi-check", "--list", "--output", listing)
    assert proc.returncode == 0 and proc.stdout == "" and all(i in listing.read_text()
                                                            for i in IDS)


@pytest.mark.parametrize("fmt", ["ktap", "json", "junit"])
def test_traced_ioctls_go_to_stderr_and_leave_the_report_parseable(fmt):
    proc = run_cli("abi-check", "-k", "caps.api", "--format", fmt, "--trace-ioctls")
    assert proc.returncode == 0, proc.stderr
    assert "ioctl(kvm" in proc.stderr and "ioctl(kvm" not in proc.stdout
    if fmt == "ktap":
        assert proc.stdout.splitlines()[0] == "KTAP version 1"
    elif fmt == "json":
        assert json.loads(proc.stdout)["exit_status"] == 0
    else:
        assert ET.fromstring(proc.stdout).find(".//testcase").get("name") == "caps.api_version"


def test_exit_status_rules():
    R = runner.Result
    assert report.exit_status([R("a", "pass"), R("b", "skip")]) == 0
    assert report.exit_status([R("a", "pass"), R("b", "fail")]) == 1
    assert report.exit_status([R("a", "skip"), R("b", "skip")]) == 4


def test_docs_list_every_check():
    assert docs.main(["--check"]) == 0, "run: python -m minivmm.abicheck.docs"
    text = docs.DOC.read_text()
    assert all(f"`{i}`" in text for i in IDS)
    # five cells a row: a bare | inside a citation would split it
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    bad = [r for r in rows if len(re.findall(r"(?<!\\)\|", r)) != 6]
    assert len(rows) > len(IDS) and not bad, bad


def test_the_docs_tool_outside_a_checkout_is_one_line(monkeypatch, tmp_path, capsys):
    # an installed wheel ships this module but not docs/: it was a FileNotFoundError traceback
    monkeypatch.setattr(docs, "DOC", tmp_path / "docs" / "abi-check.md")
    assert docs.main(["--check"]) == 2
    assert capsys.readouterr().err == (f"{tmp_path}/docs/abi-check.md: cannot read it (No such "
                                       "file or directory): run this in a source checkout of "
                                       "minivmm\n")


def test_check_numbers_do_not_depend_on_which_module_was_imported_first():
    # a program (or test_dirty.py) importing checks_entries first renumbered every check:
    # the KTAP numbers and the docs table changed with it
    import subprocess
    import sys
    code = ("import minivmm.abicheck.checks_entries\n"
            "from minivmm.abicheck import docs, runner\n"
            "print(docs.main(['--check']), [s.id for s in runner.select()][:3])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout
    assert out.startswith("0 ") and str(IDS[:3]) in out, out


def test_a_closed_stdout_is_cannot_run_not_a_traceback():
    # `minivmm abi-check >&-`: Python sets sys.stdout to None; writing the report raised
    # AttributeError (a traceback, and status 1, which a kselftest runner reads as "the
    # kernel failed a check")
    import os
    import subprocess
    import sys
    from tests.conftest import ROOT
    proc = subprocess.run([sys.executable, "-m", "minivmm", "abi-check", "-k", "caps.api"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          timeout=60, cwd=ROOT, preexec_fn=lambda: os.close(1))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    line, = proc.stderr.strip().splitlines()
    assert "stdout" in line


def test_the_signal_storm_leaves_no_signal_behind(kvm):
    # A SIGALRM caught by the storm thread (or still pending) reached Python after the
    # handler was restored: "Signal 14 ignored due to race condition", printed as an
    # unraisable exception in the middle of a run (seen once in a whole `make test`)
    import signal
    import sys
    bad, hook = [], sys.unraisablehook
    before = signal.getsignal(signal.SIGALRM), signal.pthread_sigmask(signal.SIG_BLOCK, [])
    sys.unraisablehook = lambda u: bad.append(str(u.exc_value))
    try:
        for _ in range(25):         # without the fix: about one run in three caught it
            for check_id in ("ring.reset.signal_partial", "ring.reset.signal_rearms"):
                runner.run_one(runner.REGISTRY[check_id], kvm)
    finally:
        sys.unraisablehook = hook
    assert not bad, bad
    assert (signal.getsignal(signal.SIGALRM), signal.pthread_sigmask(signal.SIG_BLOCK, [])) \
        == before and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_ctrl_c_ends_the_ktap_with_bail_out():
    # an interrupted run stopped mid-plan: TAP 13's "Bail out!" (kselftest.h's
    # ksft_exit_fail_msg()) tells a reader why the rest is missing; kunit_parser.py takes it
    # as a diagnostic and still counts the missing checks as crashed
    import signal
    import subprocess
    import sys
    from tests.conftest import ROOT
    proc = subprocess.Popen([sys.executable, "-m", "minivmm", "abi-check"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stdout:        # results arrive one by one: interrupt after the third
        seen.append(line)
        if line.startswith("ok 3 "):
            proc.send_signal(signal.SIGINT)
            break
    proc.wait(timeout=30)    # not communicate(): it reads the fd past the buffered lines
    lines = "".join(seen + [proc.stdout.read()]).splitlines()
    err = proc.stderr.read()
    proc.stdout.close(), proc.stderr.close()
    assert proc.returncode == 130, err
    bail = [ln for ln in lines if ln.startswith("Bail out!")]
    assert len(bail) == 1 and lines[-1] == bail[0], lines[-3:]
    done = sum(bool(KTAP_RESULT.match(ln)) for ln in lines)
    assert bail[0] == f"Bail out! interrupted (SIGINT) after {done} of {len(IDS)} checks"
    assert "Traceback" not in err


def test_the_ring_capability_is_held_to_its_value_in_bytes(kvm):
    # a power-of-two range test also passed 65536, the max in entries (an early draft of
    # KVM_CAP_DIRTY_LOG_RING returned KVM_DIRTY_RING_MAX_ENTRIES, not x 16)
    for check_id in ("caps.ring.size", "caps.ring.acq_rel"):
        assert runner.run_one(runner.REGISTRY[check_id], kvm).status == "pass"
        with FAULTS["ring_cap_in_entries"]():
            res = runner.run_one(runner.REGISTRY[check_id], kvm)
        assert res.status == "fail" and "131072" in res.reason, (check_id, res.reason)


def test_acq_rel_is_not_required_before_6_1(kvm, monkeypatch):
    # KVM_CAP_DIRTY_LOG_RING_ACQ_REL is from v6.1 (commit 17601bfed909): a 5.15 kernel that
    # offers only the plain ring is right, and failed caps.ring.acq_rel
    import os
    from minivmm import abi
    from minivmm.abicheck import checks_caps, ctx as ctxmod
    real_cap, real_uname = ctxmod.Ctx.cap, os.uname()
    monkeypatch.setattr(ctxmod.Ctx, "cap", lambda self, cap: 0 if
                        cap == abi.KVM_CAP_DIRTY_LOG_RING_ACQ_REL else real_cap(self, cap))
    spec = runner.REGISTRY["caps.ring.acq_rel"]
    for release, status in (("5.15.160", "skip"), ("6.0.19", "skip"), ("6.1.100", "fail"),
                            (real_uname.release, "fail")):
        fake = os.uname_result((real_uname.sysname, real_uname.nodename, release,
                                real_uname.version, real_uname.machine))
        monkeypatch.setattr(checks_caps.os, "uname", lambda: fake)
        res = runner.run_one(spec, kvm)
        assert res.status == status, (release, res.status, res.reason)


def test_memslot_checks_cite_the_function_the_kernel_has():
    # 6.18's virt/kvm/kvm_main.c has kvm_set_memory_region() (kvm_set_internal_memslot()
    # calls it); the cited __kvm_set_memory_region() is the older name
    for check_id in ("memslot.modify.einval", "memslot.overlap.eexist", "memslot.delete.absent"):
        cite = runner.REGISTRY[check_id].cite
        assert "kvm_main.c kvm_set_memory_region()" in cite and "__kvm_set" not in cite, cite


NEVER_LOGGED = ("ring.entries.unlogged_slot", "ring.entries.readonly_slot",
                "ring.entries.host_write")


@pytest.mark.parametrize("check_id", NEVER_LOGGED)
def test_what_must_never_be_logged_and_the_control_can_each_fail(kvm, check_id):
    # their fault was ring_drop, which broke only the control (the logged write is seen):
    # the claim itself, no entry for what must not be logged, was never shown able to fail
    spec = runner.REGISTRY[check_id]
    assert spec.fault == "ring_spurious"
    for fault, says in (("ring_spurious", "no entry"), ("ring_drop", "")):
        with FAULTS[fault]():
            res = runner.run_one(spec, kvm)
        assert res.status in ("fail", "skip"), (fault, res.status, res.reason)
        if res.status == "fail" and says:
            assert says in res.reason, res.reason


def test_immediate_exit_does_not_judge_exit_reason_after_eintr(kvm, monkeypatch):
    # api.rst 5 defines exit_reason only for a KVM_RUN that returned 0: a kernel that sets
    # KVM_EXIT_INTR on the immediate_exit EINTR keeps the ABI and failed the check
    from minivmm import abi
    from minivmm.abicheck import checks_misc, ctx as ctxmod
    machines, real_guest, real_ioctl = [], ctxmod.Ctx.guest, checks_misc.ioctl

    def guest(self, *a, **kw):
        machines.append(real_guest(self, *a, **kw))
        return machines[-1]

    def ioctl(fd, request, arg=0, name="ioctl", *a, **kw):
        try:
            return real_ioctl(fd, request, arg, name, *a, **kw)
        except KvmError as e:
            if name == "KVM_RUN" and e.errno_name == "EINTR":
                machines[-1].states[0].vcpu.run_struct.exit_reason = abi.KVM_EXIT_INTR
            raise
    monkeypatch.setattr(ctxmod.Ctx, "guest", guest)
    monkeypatch.setattr(checks_misc, "ioctl", ioctl)
    res = runner.run_one(runner.REGISTRY["misc.immediate_exit"], kvm)
    assert res.status == "pass", (res.reason, res.diagnostics)
    assert any("exit_reason after the EINTR: 0xa" in d for d in res.diagnostics), res.diagnostics


def _cap_answers(values: dict):
    """KVM_CHECK_EXTENSION answers ``values[cap]`` for the listed capabilities (a kernel
    that lost them), on /dev/kvm and on VM fds alike."""
    from minivmm.abicheck.faults import _ioctl_hook
    return _ioctl_hook(lambda name, q, a, ret, err: (values[a], 0)
                       if name == "KVM_CHECK_EXTENSION" and a in values else (ret, err))


def test_a_lost_dirty_ring_capability_fails_on_x86(kvm, monkeypatch):
    # KVM_CAP_DIRTY_LOG_RING = 0 passed caps.ring.size (0 on both fds is "the same") and
    # every other ring check skipped: a 6.18 x86 kernel without its ring exited 0
    import os
    from minivmm import abi
    from minivmm.abicheck import checks_caps
    from minivmm.dirty.ringsize import ring_limits
    ring_limits(kvm)         # measured before the fault, as a run would have
    spec = runner.REGISTRY["caps.ring.size"]
    real = os.uname()
    for release, status in ((real.release, "fail"), ("5.10.200", "pass")):
        fake = os.uname_result((real.sysname, real.nodename, release, real.version,
                                real.machine))
        monkeypatch.setattr(checks_caps.os, "uname", lambda: fake)
        with _cap_answers({abi.KVM_CAP_DIRTY_LOG_RING: 0,
                           abi.KVM_CAP_DIRTY_LOG_RING_ACQ_REL: 0}):
            res = runner.run_one(spec, kvm)
        assert res.status == status, (release, res.status, res.reason)


@pytest.mark.parametrize("check,cap", [("misc.immediate_exit", "KVM_CAP_IMMEDIATE_EXIT"),
                                       ("misc.identity_map.after_vcpu",
                                        "KVM_CAP_SET_IDENTITY_MAP_ADDR")])
def test_an_x86_wide_capability_reading_0_fails_not_skips(kvm, check, cap):
    # x86 answers these 1 unconditionally; a 0 skipped the very check they guard
    import os
    from minivmm import abi
    if os.uname().machine != "x86_64":
        pytest.skip("x86 answers these unconditionally; other architectures may not")
    spec = runner.REGISTRY[check]
    with _cap_answers({getattr(abi, cap): 0}):
        res = runner.run_one(spec, kvm)
    assert res.status == "fail" and "expected 1, observed 0" in res.reason, res.reason


def test_the_obsolete_manual_protect_cap_must_read_0(kvm):
    # rule 4 says CHECK_EXTENSION(166) is 0; the check only tried to enable it
    from minivmm import abi
    spec = runner.REGISTRY["caps.manual_protect.obsolete"]
    assert runner.run_one(spec, kvm).status == "pass"
    with _cap_answers({abi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT: 1}):
        res = runner.run_one(spec, kvm)
    assert res.status == "fail" and "KVM_CHECK_EXTENSION(166)" in res.reason, res.reason


@pytest.mark.parametrize("value", [0, 1])
def test_manual_protect2_on_x86_is_both_bits(kvm, value):
    # 0 was a SKIP (and took every manual-protect bitmap check with it), 1 a pass (and
    # INITIALLY_SET's checks skipped): x86 has answered 3 since before the dirty ring
    from minivmm import abi
    spec = runner.REGISTRY["caps.manual_protect2.value"]
    with _cap_answers({abi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: value}):
        res = runner.run_one(spec, kvm)
    assert res.status == "fail" and "observed " + str(value) in res.reason, res.reason


def test_readonly_bitmap_check_sees_an_applied_write(kvm, monkeypatch):
    # its diagnostic said "the write was not applied" without looking: a kernel that
    # exited MMIO but stored the value anyway passed
    from minivmm import abi
    from minivmm.abicheck import ctx as ctxmod
    real = ctxmod.Ctx.run_to_port

    def run_to_port(self, m, index=0, timeout=10.0):
        ev = real(self, m, index, timeout)
        info = ev.info or {}
        if ev.kind == "other" and ev.value == abi.KVM_EXIT_MMIO and info.get("is_write"):
            m.data.write(info["phys_addr"], info["data"].to_bytes(info["len"], "little"))
        return ev
    spec = runner.REGISTRY["bitmap.readonly.not_logged"]
    assert runner.run_one(spec, kvm).status == "pass"
    monkeypatch.setattr(ctxmod.Ctx, "run_to_port", run_to_port)
    res = runner.run_one(spec, kvm)
    assert res.status == "fail" and "not applied" in res.reason, (res.status, res.reason)


@pytest.mark.parametrize("fmt", ["json", "junit"])
def test_ctrl_c_leaves_no_half_document(tmp_path, fmt):
    # a JSON or JUnit report is written whole at the end: a Ctrl-C before then left an empty
    # --output file, over the report a CI had from the last run
    import signal
    import subprocess
    import sys
    from tests.conftest import ROOT
    kept, fresh = tmp_path / f"last.{fmt}", tmp_path / f"new.{fmt}"
    kept.write_text("the last report\n")
    for path in (kept, fresh):
        proc = subprocess.Popen([sys.executable, "-m", "minivmm", "abi-check", "--format", fmt,
                                 "--output", str(path), "--trace-ioctls"], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        vms = 0
        for line in proc.stderr:      # interrupt once a few checks have made their VMs
            vms += "KVM_CREATE_VM" in line
            if vms == 5:
                proc.send_signal(signal.SIGINT)
                break
        proc.stderr.read()
        assert proc.wait(timeout=30) == 130
        proc.stderr.close()
    assert kept.read_text() == "the last report\n"
    assert not fresh.exists()
    # and a finished run still replaces the old report with the whole new one
    assert run_cli("abi-check", "-k", "caps.api", "--format", fmt,
                   "--output", str(kept)).returncode == 0
    text = kept.read_text()
    assert "the last report" not in text and "caps.api_version" in text


@pytest.mark.parametrize("fmt, args", [("json", ["--list"]), ("json", ["-k", "caps.api"]),
                                       ("junit", ["-k", "caps.api"])])
def test_a_json_or_junit_report_to_dev_null(fmt, args):
    # the "a"-mode file was truncated before the document: ftruncate(/dev/null) is EINVAL,
    # and `--output /dev/null` (a runner that only wants the status) was status 2
    proc = run_cli("abi-check", *args, "--format", fmt, "--output", "/dev/null")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    proc = run_cli("abi-check", "--format", fmt, "--output", "/dev/null",
                   env={"MINIVMM_KVM_DEVICE": "/nonexistent/kvm"})
    assert proc.returncode == 4, proc.stderr     # skipped, not "cannot write the report"


def test_an_append_only_output_is_refused_before_any_check(tmp_path):
    # "w" failed at open() on a file under chattr +a; the "a" mode that keeps the last report
    # ran every check first and failed only at the end (the promise: opened before any check)
    import shutil
    import subprocess
    path = tmp_path / "report.json"
    path.write_text("the last report\n")
    if shutil.which("chattr") is None or subprocess.run(
            ["chattr", "+a", str(path)], capture_output=True).returncode != 0:
        pytest.skip("no chattr +a here (not root, or a filesystem without inode flags)")
    try:
        proc = run_cli("abi-check", "--format", "json", "--output", str(path),
                       "--trace-ioctls")
    finally:
        subprocess.run(["chattr", "-a", str(path)], check=True)
    assert proc.returncode == 2 and path.read_text() == "the last report\n"
    line, = proc.stderr.strip().splitlines()     # no ioctl traced: nothing ran
    assert line == f"minivmm abi-check: cannot write --output {path}: Operation not permitted"


@contextlib.contextmanager
def _arm64_host(monkeypatch):
    """This x86 kernel answering as an arm64 one would (arch/arm64/kvm/arm.c, guest.c):
    os.uname().machine is aarch64; x86-only vCPU ioctls and unknown VM ioctls are EINVAL
    (kvm_arch_vcpu_ioctl_{get,set}_sregs(), kvm_arch_vm_ioctl()'s default)."""
    import errno
    import os
    from minivmm import abi
    from minivmm.abicheck import faults
    real = os.uname()
    monkeypatch.setattr(os, "uname", lambda: os.uname_result(
        (real.sysname, real.nodename, real.release, real.version, "aarch64")))
    x86_only = ("KVM_GET_SREGS", "KVM_SET_SREGS", "KVM_SET_CPUID2", "KVM_GET_SUPPORTED_CPUID")

    def change(name, q, a, ret, err):
        if name.startswith(x86_only) or (q == abi.KVM_CREATE_VM and err == errno.ENOTTY):
            return -1, errno.EINVAL
        return ret, err
    with faults._ioctl_hook(change):
        yield


def test_arm64_skips_x86_guests_and_knows_its_errno(kvm, monkeypatch):
    # abi-check's guests are x86 code: on arm64 every check that ran one failed with
    # "unexpected error: KVM_..._SREGS: EINVAL" on a correct kernel; and an unknown VM
    # ioctl is EINVAL there, not x86's ENOTTY (caps.create_vm.on_vm_fd failed)
    with _arm64_host(monkeypatch):
        for check_id in ("misc.immediate_exit", "ring.softfull.exit", "memslot.move.keeps_bitmap",
                         "bitmap.get.returns_and_clears", "ring.reset.flags_zero"):
            res = runner.run_one(runner.REGISTRY[check_id], kvm)
            assert res.status == "skip" and "aarch64" in res.reason, (check_id, res.status,
                                                                      res.reason)
        res = runner.run_one(runner.REGISTRY["caps.create_vm.on_vm_fd"], kvm)
        assert res.status == "pass", res.reason


def test_ctrl_c_as_run_to_port_starts_its_watchdog_leaves_no_timer(kvm, monkeypatch):
    # A Ctrl-C raised inside the watchdog's start() (waiting for its new thread) came before
    # the try that cancels it: `minivmm abi-check` interrupted then waited at exit for the
    # non-daemon timer to fire, 10 s (seen in bitmap.correctness.random_writes)
    import signal
    import threading
    from minivmm.abicheck import ctx as ctxmod
    started = []

    class Timer(threading.Timer):
        def start(self):
            super().start()
            started.append(self)
            signal.raise_signal(signal.SIGINT)   # as if Ctrl-C came while it started

    monkeypatch.setattr(ctxmod.threading, "Timer", Timer)
    ctx = ctxmod.Ctx(kvm, False)
    try:
        m = ctx.guest("spin:\n    pause\n    jmp spin\n")
        with pytest.raises(KeyboardInterrupt):
            ctx.run_to_port(m, timeout=60.0)
    finally:
        ctx.close()
    timer, = started
    timer.join(5.0)
    assert not timer.is_alive(), "the watchdog timer outlived run_to_port"


def test_run_to_port_ends_when_another_thread_stops_it(kvm):
    # ring.entries.multi_vcpu stops its second vCPU at Ctrl-C with immediate_exit and a
    # kick: run_to_port took that EINTR for a stray signal, entered again (EINTR at once,
    # immediate_exit still set) and spun until its own watchdog fired
    import signal
    import threading
    from minivmm.abicheck import ctx as ctxmod
    from minivmm.machine import KICK_SIGNAL
    ctx = ctxmod.Ctx(kvm, False)
    events, t = {}, None
    try:
        m = ctx.guest("spin:\n    pause\n    jmp spin\n")
        t = threading.Thread(target=lambda: events.update(ev=ctx.run_to_port(m, 0, 60.0)),
                             daemon=True)
        t.start()
        time.sleep(0.2)
        m.states[0].vcpu.run_struct.immediate_exit = 1
        signal.pthread_kill(t.ident, KICK_SIGNAL)
        t.join(10.0)        # far below the watchdog's 60 s
        assert not t.is_alive(), "run_to_port ran on after it was stopped"
    finally:
        if t is not None and t.is_alive():
            t.join()
        ctx.close()
    assert events["ev"].kind == "stopped", events


@pytest.mark.parametrize("module, check_id, thread", [
    ("checks_reset", "ring.reset.while_running", "ring.reset.while_running vcpu"),
    ("checks_entries", "ring.entries.multi_vcpu", "ring.entries.multi_vcpu vcpu1")])
def test_ctrl_c_as_a_check_starts_its_vcpu_thread(kvm, monkeypatch, module, check_id, thread):
    # A Ctrl-C inside the vCPU thread's start() came before the try that stops it: the
    # thread ran on into the VM the check's close() released ("Exception in thread ...",
    # KvmError EBADF, printed after `minivmm: interrupted`)
    import importlib
    import signal
    import threading
    mod = importlib.import_module(f"minivmm.abicheck.{module}")

    class Thread(threading.Thread):
        def start(self):
            super().start()
            if self.name == thread:
                signal.raise_signal(signal.SIGINT)   # as if Ctrl-C came while it started

    class Threading:            # the check's module sees this Thread, nothing else does
        def __getattr__(self, name):
            return getattr(threading, name)
    fake = Threading()
    fake.Thread = Thread
    monkeypatch.setattr(mod, "threading", fake)
    failed, hook = [], threading.excepthook
    threading.excepthook = lambda a: failed.append(f"{a.exc_type.__name__}: {a.exc_value}")
    try:
        with pytest.raises(KeyboardInterrupt):
            runner.run_one(runner.REGISTRY[check_id], kvm)
        left = [t for t in threading.enumerate() if t.name == thread]
        for t in left:
            t.join(10.0)
    finally:
        threading.excepthook = hook
    assert not left, "the check's vCPU thread outlived the interrupted check"
    assert not failed, failed
