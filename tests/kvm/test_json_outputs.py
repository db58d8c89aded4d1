"""The machine-readable outputs (--json) on the real /dev/kvm: what a consumer reads there
means what the README says it means."""
import json

import pytest

from tests.conftest import run_cli


def _end(tmp_path, src: str) -> tuple:
    path = tmp_path / "exc.asm"
    path.write_text(src)
    proc = run_cli("run", str(path), "--json")
    out = json.loads(proc.stdout)
    assert proc.returncode == 1 and out["ok"] is False, proc.stderr
    return out["vcpus"][0]["end"], proc.stderr


@pytest.mark.parametrize("src,vector,error_code", [
    ("    mov rax, 0x400000000000\n    mov qword ptr [rax], 1\n", 14, 6),   # write, user
    ("    hlt\n", 13, 0),                                # #GP(0) at CPL3: a real 0
    ("    ud2\n", 6, None),                              # #UD pushes none
    ("    int3\n", 3, None),
    (";! mode: real\n    mov ax, word ptr [0xffff]\n    hlt\n", 13, None),   # real mode: none
])
def test_run_json_has_an_error_code_only_where_the_cpu_pushes_one(tmp_path, src, vector,
                                                                  error_code):
    # the README: an exception ends with "error code where the CPU pushes one". The stub's
    # own 0 was in --json as "error_code": 0 for #UD, #BP, #DE, indistinguishable from
    # #GP(0), and real mode (which pushes none at all) printed "error code 0x0" as well
    end, stderr = _end(tmp_path, src)
    assert (end["reason"], end["vector"], end["error_code"]) == ("exception", vector,
                                                                 error_code), end
    assert ("error code" in stderr) == (error_code is not None), stderr
