"""The code sandbox with real subprocesses: results, limits and the isolation layers one by one.

Most isolation tests pass ``reliability_guard=False`` so that the kernel layers, not the Python prelude,
are what stops the program.
"""

from __future__ import annotations

import math
import os
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from services.core.errors import FailedPrecondition, InvalidArgument
from services.evaluation import sandbox
from services.evaluation.sandbox import pass_at_k, run_program, sandbox_capabilities

REPO = Path(__file__).resolve().parents[2]
CAPS = sandbox_capabilities()
needs_sandbox = pytest.mark.skipif(
    not all(CAPS[name] for name in sandbox.REQUIRED_LAYERS), reason=f"sandbox layers missing here: {CAPS}"
)
PRINT_CWD = "import os\nprint(os.getcwd(), flush=True)\n"


def _cwd_of(result) -> str:
    return result.stdout_tail.splitlines()[0]


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if text.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.append(int(pid))
            except OSError:
                pass
    return found


# -- pass@k ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [(1, 1, 1, 1.0), (1, 0, 1, 0.0), (10, 5, 1, 0.5), (2, 1, 2, 1.0), (10, 3, 5, 1 - 21 / 252), (200, 0, 100, 0.0)],
)
def test_pass_at_k_known_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_matches_the_combinatorial_form():
    for n, c, k in [(20, 7, 3), (200, 13, 10), (200, 190, 100), (50, 1, 50)]:
        exact = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize(("n", "c", "k", "field"), [(0, 0, 1, "n"), (5, 6, 1, "c"), (5, -1, 1, "c"), (5, 2, 6, "k")])
def test_pass_at_k_rejects_impossible_counts(n, c, k, field):
    with pytest.raises(InvalidArgument) as err:
        pass_at_k(n, c, k)
    assert err.value.violations[0].field == field


# -- results --------------------------------------------------------------------------------------------------


def test_capabilities_report_every_layer():
    assert {"user_namespace", "network_namespace", "pid_namespace", "landlock", "rlimits", "process_limit"} <= set(CAPS)
    assert all(isinstance(v, bool) for v in CAPS.values())


@needs_sandbox
def test_correct_program_passes_and_its_tmpdir_is_removed():
    result = run_program("def add(a, b):\n    return a + b\n\nassert add(2, 2) == 4\n")
    assert result.status == "passed", result
    assert result.returncode == 0
    # The guard disables os.getcwd: ask for the tmpdir without it.
    result = run_program(PRINT_CWD, reliability_guard=False)
    assert result.status == "passed", result
    cwd = _cwd_of(result)
    assert "modelyard-sandbox-" in cwd
    assert not os.path.exists(cwd)


@needs_sandbox
def test_assertion_failure_is_failed_with_the_traceback():
    result = run_program("def add(a, b):\n    return a - b\n\nassert add(2, 2) == 4\n")
    assert result.status == "failed"
    assert result.returncode == 1
    assert "AssertionError" in result.stderr_tail and "program.py" in result.stderr_tail


@needs_sandbox
def test_guard_disables_dangerous_calls():
    result = run_program("import os\nos.system('true')\n")
    assert result.status == "failed"
    assert "NoneType" in result.stderr_tail


@needs_sandbox
def test_endless_loop_times_out_and_every_process_is_gone():
    started = time.monotonic()
    result = run_program(PRINT_CWD + "while True:\n    pass\n", timeout_s=2, reliability_guard=False)
    assert result.status == "timeout"
    assert time.monotonic() - started < 2 + 2
    cwd = _cwd_of(result)
    assert not os.path.exists(cwd)
    assert _processes_mentioning(cwd) == []  # the launcher's and the program's command lines name the tmpdir


@needs_sandbox
def test_escaped_session_is_killed_with_the_sandbox():
    program = PRINT_CWD + "import time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\ntime.sleep(60)\n"
    result = run_program(program, timeout_s=1.5, reliability_guard=False)
    assert result.status == "timeout"
    assert _processes_mentioning(_cwd_of(result)) == []


@needs_sandbox
def test_memory_hog_fails_without_hurting_the_host():
    result = run_program("b = bytearray(4 << 30)\nprint(len(b))\n", memory_bytes=512 << 20, reliability_guard=False)
    assert result.status == "failed"
    assert "MemoryError" in result.stderr_tail
    assert result.duration_s < 5


@needs_sandbox
def test_network_is_unreachable_and_the_host_server_sees_nothing():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.setblocking(False)
    port = server.getsockname()[1]
    try:
        program = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=3).sendall(b'leak')\n"
        result = run_program(program, reliability_guard=False)
        assert result.status == "failed"
        assert "Error" in result.stderr_tail
        with pytest.raises(BlockingIOError):
            server.accept()
    finally:
        server.close()


@needs_sandbox
@pytest.mark.parametrize("where", ["/tmp", str(REPO)])
def test_writes_outside_the_tmpdir_fail_and_leave_nothing(where):
    target = os.path.join(where, f"sandbox-escape-{uuid.uuid4().hex}")
    try:
        result = run_program(f"open({target!r}, 'w').write('x')\n", reliability_guard=False)
        assert result.status == "failed"
        assert "PermissionError" in result.stderr_tail
        assert not os.path.exists(target)
    finally:
        if os.path.exists(target):
            os.remove(target)


@needs_sandbox
def test_writes_inside_the_tmpdir_work():
    program = "import tempfile\nwith tempfile.NamedTemporaryFile('w') as f:\n    f.write('ok')\nopen('out.txt', 'w').write('x')\n"
    assert run_program(program, reliability_guard=False).status == "passed"


@needs_sandbox
def test_only_the_interpreter_may_be_executed():
    result = run_program("import os\nos.execv('/bin/sh', ['sh', '-c', 'echo escaped'])\n", reliability_guard=False)
    assert result.status == "failed"
    assert "escaped" not in result.stdout_tail


@needs_sandbox
def test_fork_bomb_is_contained():
    counted = run_program(
        "import os, time\nn = 0\ntry:\n    while True:\n        if os.fork() == 0:\n            time.sleep(30)\n"
        "            os._exit(0)\n        n += 1\nexcept OSError:\n    print(n)\n",
        reliability_guard=False,
    )
    assert counted.status == "passed", counted
    assert int(counted.stdout_tail) < sandbox.PROCESS_LIMIT
    bomb = PRINT_CWD + "while True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    result = run_program(bomb, timeout_s=2, reliability_guard=False)
    assert result.status == "timeout"
    assert _processes_mentioning(_cwd_of(result)) == []


@needs_sandbox
def test_output_is_capped_to_a_tail():
    result = run_program("import sys\nfor i in range(100000):\n    print(i)\nprint('end', file=sys.stderr)\n")
    assert result.status == "passed"
    assert len(result.stdout_tail.encode()) <= sandbox.TAIL_BYTES
    assert result.stdout_tail.endswith("99999\n")
    assert result.stderr_tail == "end\n"


@needs_sandbox
def test_endless_output_is_killed():
    result = run_program("while True:\n    print('x' * 1000)\n", timeout_s=20)
    assert result.status == "failed"
    assert "output over" in result.stderr_tail
    assert result.duration_s < 20


@needs_sandbox
def test_environment_is_stripped(monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "do-not-leak")
    result = run_program("import os, json\nprint(json.dumps(sorted(os.environ)))\nprint(os.environ['HOME'])\n")
    assert result.status == "passed", result
    names = set(__import__("json").loads(result.stdout_tail.splitlines()[0]))
    assert names <= {"PATH", "LANG", "HOME", "TMPDIR", "OMP_NUM_THREADS", "LC_CTYPE"}
    assert "modelyard-sandbox-" in result.stdout_tail.splitlines()[1]


@needs_sandbox
def test_many_runs_in_parallel_threads():
    programs = [(f"assert {i} % 2 == 0\n", i % 2 == 0) for i in range(16)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda p: run_program(p[0]), programs))
    assert [r.status for r in results] == ["passed" if ok else "failed" for _, ok in programs]


def test_missing_layer_refuses_unless_degraded_is_allowed(monkeypatch):
    real = sandbox.sandbox_capabilities()
    monkeypatch.setattr(sandbox, "sandbox_capabilities", lambda python=None: {**real, "landlock": False})
    with pytest.raises(FailedPrecondition) as err:
        run_program("print(1)\n")
    assert err.value.reason == "SANDBOX_UNAVAILABLE" and "landlock" in err.value.message
    if all(real[name] for name in sandbox.REQUIRED_LAYERS if name != "landlock"):
        assert run_program("print(1)\n", allow_degraded=True).status == "passed"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"timeout_s": 0}, "timeout_s"), ({"memory_bytes": 1024}, "memory_bytes"), ({"cpu_s": 0}, "cpu_s")],
)
def test_bad_limits_are_invalid_arguments(kwargs, field):
    with pytest.raises(InvalidArgument) as err:
        run_program("print(1)\n", **kwargs)
    assert err.value.violations[0].field == field


def test_missing_interpreter_is_an_error_result():
    if not all(CAPS[name] for name in sandbox.REQUIRED_LAYERS):
        pytest.skip("sandbox layers missing here")
    result = run_program("print(1)\n", python="/nonexistent/python3", allow_degraded=True)
    assert result.status == "error"
