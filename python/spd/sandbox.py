"""Running model-written code: every program in its own, locked-down process.

    result = run_program("print(1 + 1)", timeout=5)            # RunResult(passed=True, ...)
    result = run_tests(code, ["assert f(1) == 2"], setup="import math")
    results = run_many([(code, tests, setup), ...])            # a small thread pool over processes

A program never runs in the evaluator's process. ``run_program`` starts this file as a script
(``python -I -S sandbox.py CONFIG``), the *runner*, in a new session (its own process group) with a
minimal environment, stdin from /dev/null and stdout/stderr going to files in a private temporary
folder. The runner sets the sandbox up and then runs the program in a forked child:

Kernel-enforced (when the runner can set them up; ``RunResult.isolation`` lists what was active):
  * ``netns``: a new, empty network namespace (not even loopback is up): no network at all.
  * ``mountns``/``readonly``: a private mount namespace in which every file system mount
    (except /proc, /sys, /dev) is remounted read-only (per-mount flag, with MS_BIND: the host's
    mounts stay writable), and a fresh size-limited tmpfs is mounted over /tmp (and /dev/shm);
    the program's working folder is /tmp/work inside it. Nothing the program writes reaches the
    host's file system, and it is all gone when the namespace ends. The Python installation is
    bind-mounted read-only at /tmp/.spd-python so that an unprivileged program can import the
    standard library even when the interpreter lives in a private folder such as /root.
  * ``pidns``: a new PID namespace: the program sees no process outside it (it cannot signal the
    evaluator, the runner, or another sandbox), and when its init exits, the kernel kills every
    process left in it (fork bombs, background children).
  * ``uid``: when started as root, the program runs as an otherwise unused uid/gid (one per run),
    so file permissions apply to it, it cannot signal root's processes, it has no capabilities,
    and RLIMIT_NPROC counts only its own processes. ``no_new_privs`` is set (setuid binaries
    cannot give privileges back). Without root, a user namespace is used for the namespaces
    (``userns``) and the program keeps the caller's uid; it is root only inside that namespace
    and drops every capability (``nocaps``: bounding, ambient, effective and permitted sets)
    before it starts, so it cannot undo the read-only mounts or unmount the private /tmp.
  * ``rlimits`` (always): RLIMIT_CPU (CPU seconds), RLIMIT_AS (address space), RLIMIT_FSIZE
    (largest file, which also caps stdout/stderr on disk: the evaluator reads at most
    ``max_output`` bytes of each), RLIMIT_NPROC (processes/threads), RLIMIT_NOFILE, RLIMIT_CORE=0.
  * a wall-clock timeout enforced by the evaluator, which then SIGKILLs the runner's whole process
    tree (the PID namespace's init first) and its process group; the temporary folder is removed.

Best effort, in the program's own interpreter (``guard``; a determined program can get around it,
e.g. through ``gc.get_referents`` on the guard's closures, or by re-initializing builtin modules;
it is the only protection when the namespaces cannot be created): socket creation raises;
``os.kill``/``os.killpg`` only reach the program's own process and its descendants / its own
process group; writing, creating, deleting, renaming or chmod-ing paths outside the working folder
raises (reads are allowed anywhere); starting other executables (``exec*``, ``posix_spawn``,
``subprocess``, ``os.system``) and importing ``ctypes`` raise; umask 077.

Honest limits: without root and without unprivileged user namespaces only the rlimits, the
timeout, process-group killing (the runner is a child subreaper and kills leftovers) and the
in-process guard apply: a program can then read the caller's files, and, if it defeats the guard,
write them or use the network. As root without namespaces (``isolate=False``, or a kernel that
refuses them) the program runs as root unless the Python installation is readable by other users,
and RLIMIT_NPROC does not bind root. Reads are never restricted: a program can read any
world-readable file. There is no seccomp filter and no cgroup (memory is bounded by RLIMIT_AS,
which counts virtual, not resident, memory).
"""
from __future__ import annotations

import itertools
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

__all__ = ["RunResult", "SandboxError", "run_program", "run_tests", "run_many", "build_test_program",
           "capabilities"]

try:  # this file also runs as a plain script (the runner), outside the spd package
    from .errors import SpdError as _BaseError
except ImportError:  # pragma: no cover - the runner never raises it
    _BaseError = RuntimeError


class SandboxError(_BaseError):
    """The sandbox itself could not run a program (not a failure of the program)."""


@dataclass(frozen=True)
class RunResult:
    """How one program run ended. ``passed``: exit code 0, not timed out (and, for ``run_tests``,
    the tests ran to their end)."""

    passed: bool
    returncode: int | None  # the program's exit code; -N when killed by signal N; None on timeout
    timed_out: bool
    stdout: str
    stderr: str
    duration: float
    truncated: bool = False  # stdout or stderr was longer than max_output (only the start is kept)
    isolation: tuple[str, ...] = field(default=())  # the protections that were active


# -- Linux constants ---------------------------------------------------------------------------
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE = 1024, 2048, 4096, 16384, 1 << 18
MS_RELATIME, MS_STRICTATIME = 1 << 21, 1 << 24
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 24, 36, 38
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
MOUNT_OPTION_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
                      "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME, "strictatime": MS_STRICTATIME}

SANDBOX_WORK = "/tmp/work"  # the program's folder inside the mount namespace
SANDBOX_PYTHON = "/tmp/.spd-python"  # the read-only view of the Python installation there
UID_BASE = 2_000_000_000  # fresh uids, one per run (when root)
DONE_MARK = "__spd_tests_done_"

_counter = itertools.count()
_counter_lock = threading.Lock()


# ============================================================================================
# evaluator side
# ============================================================================================
def run_program(code: str, *, timeout: float = 10.0, memory_mb: int = 1024, max_output: int = 64_000,
                file_size_mb: int = 16, nproc: int = 64, disk_mb: int = 64, isolate: bool = True,
                guard: bool = True, tag: str = "") -> RunResult:
    """Run ``code`` (Python source) in a sandbox; see the module doc for the protections.

    ``timeout``: wall-clock seconds from start to kill (the CPU limit is about the same);
    ``memory_mb``: address-space limit; ``max_output``: bytes of stdout/stderr kept (each);
    ``file_size_mb``: the largest file the program may write (stdout/stderr included; beyond it the
    write fails, which ends the program); ``nproc``: processes+threads; ``disk_mb``: size of the
    private /tmp; ``isolate=False`` skips the namespaces and the uid change and ``guard=False``
    the in-process guard (both for tests of the single layers); ``tag`` is put on the runner's
    command line (to find its processes in a process listing).
    """
    return _run(code, timeout=timeout, memory_mb=memory_mb, max_output=max_output,
                file_size_mb=file_size_mb, nproc=nproc, disk_mb=disk_mb, isolate=isolate,
                guard=guard, tag=tag, done_mark=None)


def build_test_program(code: str, tests: list[str], setup: str = "", done_mark: str | None = None) -> str:
    """The program ``run_tests`` runs: the setup code, the code, then the tests, one per line."""
    parts = [setup.strip("\n"), code.strip("\n"), *(t.strip("\n") for t in tests)]
    program = "\n".join(p for p in parts if p) + "\n"
    if done_mark:
        program += (f"import sys as _spd_sys\n_spd_sys.__stdout__.write('\\n{done_mark}\\n')\n"
                    f"_spd_sys.__stdout__.flush()\n")
    return program


def run_tests(code: str, tests: list[str], setup: str = "", **limits) -> RunResult:
    """Run ``setup`` + ``code`` + ``tests`` (assert lines) as one program.

    Passed: exit code 0 within the limits *and* the line after the last test was reached (a
    program that calls ``exit(0)`` before its tests does not pass).
    """
    mark = f"{DONE_MARK}{os.urandom(8).hex()}"
    program = build_test_program(code, tests, setup, done_mark=mark)
    return _run(program, done_mark=mark, **{**_DEFAULTS, **limits})


_DEFAULTS = dict(timeout=10.0, memory_mb=1024, max_output=64_000, file_size_mb=16, nproc=64, disk_mb=64,
                 isolate=True, guard=True, tag="")


def run_many(jobs, *, workers: int | None = None, progress=None, **limits) -> list[RunResult]:
    """``run_tests(code, tests, setup)`` for each ``(code, tests, setup)`` of ``jobs``, in order,
    ``workers`` at a time (default: min(8, CPU count)). ``progress``: called once per finished job."""
    from concurrent.futures import ThreadPoolExecutor

    jobs = list(jobs)
    workers = workers or max(1, min(8, os.cpu_count() or 1))

    def one(job):
        code, tests, setup = job
        result = run_tests(code, tests, setup, **limits)
        if progress is not None:
            progress()
        return result

    if workers == 1 or len(jobs) <= 1:
        return [one(j) for j in jobs]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, jobs))


_CAPS: tuple[str, ...] | None = None


def capabilities() -> tuple[str, ...]:
    """The protections a run gets on this machine (runs one trivial program, cached)."""
    global _CAPS
    if _CAPS is None:
        _CAPS = run_program("pass", timeout=30).isolation
    return _CAPS


def _next_uid() -> int | None:
    """A fresh uid for one run (as root, when the uid map allows it), else None."""
    if os.geteuid() != 0:
        return None
    with _counter_lock:
        n = next(_counter)
    uid = UID_BASE + (os.getpid() % 1_000_000) * 100 + n % 100
    try:
        with open("/proc/self/uid_map") as fh:
            ranges = [tuple(int(x) for x in line.split()) for line in fh if line.strip()]
    except OSError:
        ranges = []
    if any(start <= uid < start + count for start, _, count in ranges):
        return uid
    return 65534 if any(start <= 65534 < start + count for start, _, count in ranges) else None


def _run(code: str, *, timeout, memory_mb, max_output, file_size_mb, nproc, disk_mb, isolate, guard, tag,
         done_mark) -> RunResult:
    if timeout <= 0 or memory_mb <= 0 or max_output < 0 or file_size_mb <= 0 or nproc <= 0:
        raise SandboxError("sandbox limits must be positive")
    base = tempfile.mkdtemp(prefix="spd-sandbox-")
    try:
        os.chmod(base, 0o711)  # an unprivileged program (no mount namespace) must reach base/work
        program = os.path.join(base, "program.py")
        with open(program, "w", encoding="utf-8") as fh:
            fh.write(code)
        os.chmod(program, 0o644)
        os.mkdir(os.path.join(base, "work"), 0o700)
        status_r, status_w = os.pipe()
        config = {"program": program, "work": os.path.join(base, "work"), "status_fd": status_w,
                  "timeout": timeout, "memory_mb": memory_mb, "file_size_mb": file_size_mb, "nproc": nproc,
                  "disk_mb": disk_mb, "isolate": isolate, "guard": guard, "uid": _next_uid() if isolate else None}
        config_path = os.path.join(base, "config.json")
        with open(config_path, "w") as fh:
            json.dump(config, fh)
        out_path, err_path = os.path.join(base, "stdout"), os.path.join(base, "stderr")
        argv = [sys.executable, "-I", "-S", os.path.abspath(__file__), config_path]
        if tag:
            argv.append("".join(c if c.isalnum() or c in "-_." else "_" for c in tag))
        started = time.monotonic()
        try:
            with open(out_path, "wb") as out, open(err_path, "wb") as err:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                        pass_fds=(status_w,), start_new_session=True, cwd=base,
                                        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
        finally:
            os.close(status_w)
        try:
            timed_out = not _wait_exit(proc.pid, timeout - (time.monotonic() - started))
            if timed_out:
                _kill_tree(proc.pid)
            else:
                _killpg(proc.pid)  # anything left in the runner's group (it is still a zombie: no pid reuse)
        finally:
            runner_rc = proc.wait()
            duration = time.monotonic() - started
        status = _read_status(status_r)
        stdout, out_trunc = _read_head(out_path, max_output)
        stderr, err_trunc = _read_head(err_path, max_output)
        if "error" in status:
            raise SandboxError(f"the sandbox could not start the program: {status['error']}")
        if not timed_out and "ready" not in status:
            tail = stderr.strip().splitlines()[-1] if stderr.strip() else f"runner exit code {runner_rc}"
            raise SandboxError(f"the sandbox runner failed before starting the program: {tail}")
        if timed_out:
            returncode = None
        elif "exit" in status:
            returncode = status["exit"]
        else:
            returncode = runner_rc
        passed = returncode == 0 and not timed_out
        if done_mark is not None:
            passed = passed and done_mark in _read_tail(out_path, len(done_mark) + 8)
            stdout = stdout.replace(f"\n{done_mark}\n", "")
        return RunResult(passed=passed, returncode=returncode, timed_out=timed_out, stdout=stdout,
                         stderr=stderr, duration=duration, truncated=out_trunc or err_trunc,
                         isolation=tuple(status.get("isolation", ())))
    finally:
        shutil.rmtree(base, onerror=_force_remove)


def _force_remove(func, path, _exc):
    try:  # a folder the program made unreadable/unwritable (only possible without root)
        os.chmod(os.path.dirname(path), 0o700)
        os.chmod(path, 0o700)
        func(path)
    except OSError:
        pass


def _wait_exit(pid: int, timeout: float) -> bool:
    """True once ``pid`` has exited (left unreaped), False when ``timeout`` passed first."""
    deadline = time.monotonic() + max(timeout, 0.0)
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    try:
        delay = 0.002
        while True:
            left = deadline - time.monotonic()
            if pidfd is not None:
                if select.select([pidfd], [], [], max(left, 0))[0]:
                    return True
            else:
                if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                    return True
                time.sleep(max(min(delay, left), 0))
                delay = min(delay * 2, 0.05)
            if time.monotonic() >= deadline:
                return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _process_parents() -> dict[int, int]:
    parents = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as fh:
                    stat = fh.read()
                parents[int(name)] = int(stat[stat.rindex(b")") + 2:].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    return parents


def _descendants(pid: int) -> list[int]:
    """Every descendant of ``pid``, parents before children."""
    children: dict[int, list[int]] = {}
    for child, parent in _process_parents().items():
        children.setdefault(parent, []).append(child)
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(0), [])
        out += kids
        todo += kids
    return out


def _kill_tree(pid: int) -> None:
    """SIGKILL the runner's descendants (the PID namespace's init first), its group, then it."""
    for _ in range(50):
        found = _descendants(pid)
        for p in found:
            try:
                os.kill(p, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        _killpg(pid)
        if not found:
            break
        time.sleep(0.01)
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read_status(fd: int) -> dict:
    os.set_blocking(fd, False)
    data = b""
    try:
        while True:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            data += chunk
    finally:
        os.close(fd)
    status: dict = {}
    for line in data.decode("utf-8", "replace").splitlines():
        try:
            status.update(json.loads(line))
        except (json.JSONDecodeError, TypeError, ValueError):
            pass
    return status


def _read_head(path: str, limit: int) -> tuple[str, bool]:
    try:
        with open(path, "rb") as fh:
            data = fh.read(limit + 1)
    except OSError:
        return "", False
    return data[:limit].decode("utf-8", "replace"), len(data) > limit


def _read_tail(path: str, n: int) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(fh.tell() - n, 0))
            return fh.read(n).decode("utf-8", "replace")
    except OSError:
        return ""


# ============================================================================================
# runner side (this file run as a script; standard library only)
# ============================================================================================
class _Setup:
    def __init__(self, cfg: dict):
        import ctypes

        self.cfg = cfg
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                                    ctypes.c_char_p]
        self.libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
        self.ctypes = ctypes
        self.isolation: list[str] = []
        self.root = os.geteuid() == 0
        self.userns = False
        self.mountns = False
        self.pidns = False
        self.work = os.path.realpath(cfg["work"])
        self.user_threads = 0 if self.root else _threads_of(os.getuid())  # counted before any namespace

    def _err(self) -> str:
        return os.strerror(self.ctypes.get_errno())

    def mount(self, src, target, fstype, flags, data=None) -> bool:
        enc = (lambda s: s.encode() if isinstance(s, str) else s)
        return self.libc.mount(enc(src), enc(target), enc(fstype), flags, enc(data)) == 0

    def prctl(self, option, arg) -> bool:
        return self.libc.prctl(option, arg, 0, 0, 0) == 0

    # -- namespaces ------------------------------------------------------------------------------
    def unshare(self) -> None:
        flags = CLONE_NEWNET | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
        attempts = ([flags] if self.root else []) + [flags | CLONE_NEWUSER]
        uid, gid = os.getuid(), os.getgid()
        for f in attempts:
            if self.libc.unshare(f) != 0:
                continue
            if f & CLONE_NEWUSER:
                try:
                    _write("/proc/self/setgroups", "deny")
                    _write("/proc/self/uid_map", f"0 {uid} 1")
                    _write("/proc/self/gid_map", f"0 {gid} 1")
                except OSError:
                    return  # a user namespace we cannot use: the process keeps running unprivileged
                self.userns = True
                self.isolation.append("userns")
            self.isolation.append("netns")
            self.pidns = True
            self.mountns = True
            return

    def lock_filesystem(self) -> None:
        """Every mount read-only, fresh tmpfs on /tmp and /dev/shm, Python at SANDBOX_PYTHON."""
        if not self.mount(None, "/", None, MS_REC | MS_PRIVATE):
            self.mountns = False
            return
        self.isolation.append("mountns")
        failed = []
        for point, options in _mounts():
            if point == "/proc" or point.startswith(("/proc/", "/sys", "/dev")):
                continue
            flags = MS_REMOUNT | MS_BIND | MS_RDONLY  # MS_BIND: this mount only, never the file system
            for opt in options:
                flags |= MOUNT_OPTION_FLAGS.get(opt, 0)
            if not self.mount(None, point, None, flags) and "ro" not in options:
                failed.append(point)
        if not failed:
            self.isolation.append("readonly")
        prefix = os.path.realpath(sys.base_prefix)
        python_fd = os.open(prefix, os.O_PATH | os.O_DIRECTORY)  # still reachable if /tmp hides it
        size = f"size={int(self.cfg['disk_mb'])}m"
        if not self.mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"{size},mode=1777"):
            raise RuntimeError(f"cannot mount a tmpfs on /tmp: {self._err()}")
        if os.path.isdir("/dev/shm"):
            self.mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=1m,mode=1777")
        os.mkdir(SANDBOX_PYTHON, 0o755)
        ok = (self.mount(f"/proc/self/fd/{python_fd}", SANDBOX_PYTHON, None, MS_BIND | MS_REC)
              and self.mount(None, SANDBOX_PYTHON, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV))
        error = self._err()
        os.close(python_fd)
        if not ok:
            raise RuntimeError(f"cannot bind-mount the Python installation: {error}")
        sys.path[:] = [SANDBOX_PYTHON + p[len(prefix):] if p == prefix or p.startswith(prefix + os.sep) else p
                       for p in sys.path]
        sys.path_importer_cache.clear()
        os.mkdir(SANDBOX_WORK, 0o700)
        self.work = SANDBOX_WORK

    # -- the program's process -------------------------------------------------------------------
    def limit_and_drop(self) -> None:
        import resource

        cfg = self.cfg
        cpu = int(cfg["timeout"]) + 1
        nproc = int(cfg["nproc"])
        uid = cfg.get("uid") if (self.root and not self.userns) else None
        if uid is not None and not self.mountns and not _world_readable_python():
            uid = None  # an unprivileged uid could not import the standard library
        if uid is None and not self.root:
            nproc += self.user_threads  # RLIMIT_NPROC counts all of this user's threads
        limits = [(resource.RLIMIT_CPU, cpu, cpu + 1), (resource.RLIMIT_CORE, 0, 0),
                  (resource.RLIMIT_AS, int(cfg["memory_mb"]) << 20, int(cfg["memory_mb"]) << 20),
                  (resource.RLIMIT_FSIZE, int(cfg["file_size_mb"]) << 20, int(cfg["file_size_mb"]) << 20),
                  (resource.RLIMIT_NOFILE, 256, 256), (resource.RLIMIT_NPROC, nproc, nproc)]
        for which, soft, hard in limits:
            resource.setrlimit(which, (soft, hard))
        self.isolation.append("rlimits")
        if uid is not None:
            os.chown(self.work, uid, uid)
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            self.isolation.append("uid")
        if os.geteuid() == 0 and self.drop_capabilities():
            # a user namespace's root (or root without a uid change): without capabilities it cannot
            # undo the read-only mounts, unmount the private /tmp, or signal other users' processes
            self.isolation.append("nocaps")
        if self.prctl(PR_SET_NO_NEW_PRIVS, 1):  # and no exec can give capabilities back
            self.isolation.append("no_new_privs")
        os.umask(0o077)

    def drop_capabilities(self) -> bool:
        ctypes = self.ctypes

        class Header(ctypes.Structure):
            _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

        class Data(ctypes.Structure):
            _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                        ("inheritable", ctypes.c_uint32)]

        for cap in range(64):  # the bounding set (needs CAP_SETPCAP, so before the capset below)
            self.prctl(PR_CAPBSET_DROP, cap)
        self.libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
        header, data = Header(0x20080522, 0), (Data * 2)()  # _LINUX_CAPABILITY_VERSION_3, all zero
        return self.libc.capset(ctypes.byref(header), data) == 0


def _write(path: str, text: str) -> None:
    with open(path, "w") as fh:
        fh.write(text)


def _mounts() -> list[tuple[str, list[str]]]:
    out = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            parts = line.split()
            point = parts[4].encode().decode("unicode_escape")  # \040 for spaces etc.
            out.append((point, parts[5].split(",")))
    return out


def _world_readable_python() -> bool:
    path = os.path.realpath(sys.base_prefix)
    while True:
        try:
            if not os.stat(path).st_mode & 0o001:
                return False
        except OSError:
            return False
        if path == "/":
            return True
        path = os.path.dirname(path)


def _threads_of(uid: int) -> int:
    n = 0
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/status") as fh:
                    fields = dict(line.split(":", 1) for line in fh if ":" in line)
                if int(fields["Uid"].split()[0]) == uid:
                    n += int(fields.get("Threads", "1"))
            except (OSError, ValueError, KeyError):
                pass
    return n


def _exit_status(status: int) -> dict:
    if os.WIFSIGNALED(status):
        return {"exit": -os.WTERMSIG(status)}
    return {"exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None}


def _send(fd: int, record: dict) -> None:
    try:
        os.write(fd, (json.dumps(record) + "\n").encode())
    except OSError:
        pass


def _runner_main(argv: list[str]) -> int:
    with open(argv[0]) as fh:
        cfg = json.load(fh)
    status_fd = int(cfg["status_fd"])
    try:
        with open(cfg["program"], encoding="utf-8") as fh:
            source = fh.read()
        setup = _Setup(cfg)
        if cfg["isolate"]:
            setup.unshare()
            if setup.mountns:
                setup.lock_filesystem()
        setup.prctl(PR_SET_CHILD_SUBREAPER, 1)  # orphans come back to the runner, which kills them
    except Exception as exc:  # noqa: BLE001 - reported to the evaluator as a sandbox failure
        _send(status_fd, {"error": f"{type(exc).__name__}: {exc}"})
        return 125
    sys.stdout.flush()
    sys.stderr.flush()
    if setup.pidns:
        init = os.fork()
        if init == 0:
            _ns_init(setup, source, status_fd)  # never returns
        os.close(status_fd)
        status = os.waitpid(init, 0)[1]
        return os.WEXITSTATUS(status) if os.WIFEXITED(status) else 125
    child = os.fork()
    if child == 0:
        _program(setup, source, status_fd)  # never returns
    status = _reap_until(child)
    _send(status_fd, _exit_status(status))
    os.close(status_fd)
    _kill_leftovers()
    return 0


def _reap_until(pid: int) -> int:
    while True:
        try:
            got, status = os.waitpid(-1, 0)
        except ChildProcessError:
            return 0
        if got == pid:
            return status


def _kill_leftovers() -> None:
    """The runner is a child subreaper: kill and reap whatever the program left behind."""
    me = os.getpid()
    for _ in range(1000):
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        except ChildProcessError:
            return
        kids = [p for p, parent in _process_parents().items() if parent == me]
        for p in kids:
            try:
                os.kill(p, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.001)


def _ns_init(setup: _Setup, source: str, status_fd: int) -> None:
    """PID 1 of the new PID namespace: start the program, reap orphans, report its exit status.

    When this process exits the kernel kills every other process in the namespace.
    """
    try:
        setup.isolation.append("pidns")
        setup.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if setup.mountns:
            setup.mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        sys.stdout.flush()
        child = os.fork()
        if child == 0:
            _program(setup, source, status_fd)
        status = _reap_until(child)
        _send(status_fd, _exit_status(status))
    finally:
        os._exit(0)


def _program(setup: _Setup, source: str, status_fd: int) -> None:
    """The program's own process: limits, privileges, guard, then the code. Never returns."""
    rc = 1
    try:
        os.setpgid(0, 0)  # its own group: os.killpg(0) reaches only the program's processes
        setup.limit_and_drop()
        setup.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # after the uid change, which clears it
        work = setup.work
        os.chdir(work)
        path = os.path.join(work, "program.py")
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(source)
        os.environ.clear()
        os.environ.update({"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8",
                           "PYTHONIOENCODING": "utf-8"})
        sys.argv = [path]
        sys.dont_write_bytecode = True
        try:
            code = compile(source, path, "exec")
        except (SyntaxError, ValueError) as exc:  # the program's fault (ValueError: a NUL byte)
            _send(status_fd, {"ready": True, "isolation": setup.isolation})
            import traceback

            traceback.print_exception(type(exc), exc, None)
            _flush()
            os._exit(1)
        if setup.cfg["guard"]:
            _install_guard(work)
            setup.isolation.append("guard")
        _send(status_fd, {"ready": True, "isolation": setup.isolation})
        os.close(status_fd)
    except BaseException as exc:  # noqa: BLE001 - a setup failure: reported as a sandbox error
        _send(status_fd, {"error": f"{type(exc).__name__}: {exc}"})
        _flush()
        os._exit(1)
    globals_ = {"__name__": "__main__", "__file__": path, "__builtins__": __builtins__}
    try:
        exec(code, globals_)
        rc = 0
    except SystemExit as exc:
        if exc.code is None:
            rc = 0
        elif isinstance(exc.code, int):
            rc = exc.code & 0xFF
        else:
            try:
                print(exc.code, file=sys.stderr)
            except Exception:  # noqa: BLE001
                pass
            rc = 1
    except BaseException as exc:  # noqa: BLE001 - the program's uncaught exception
        try:
            import traceback

            traceback.print_exception(type(exc), exc, exc.__traceback__.tb_next)
        except BaseException:  # noqa: BLE001
            pass
        rc = 1
    _flush()
    os._exit(rc)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001 - e.g. the file size limit was reached
            pass


def _install_guard(work: str) -> None:
    """Best-effort in-process restrictions (see the module doc): they raise PermissionError."""
    import _io
    import builtins
    import posix
    import signal as signal_mod
    import socket

    import _posixsubprocess
    import _socket

    real = {name: getattr(posix, name) for name in dir(posix)}
    realpath, join, getcwd, readlink = os.path.realpath, os.path.join, posix.getcwd, posix.readlink
    real_open, real_fileio = builtins.open, _io.FileIO
    me = posix.getpid()

    def deny(what):
        raise PermissionError(f"sandbox: {what} is not allowed")

    def inside(path, dir_fd=None) -> bool:
        if isinstance(path, int):
            return True  # an already open file descriptor
        p = os.fsdecode(path)
        if not p.startswith("/"):
            base = readlink(f"/proc/self/fd/{dir_fd}") if dir_fd is not None else getcwd()
            p = join(base, p)
        full = realpath(p)
        return full == work or full.startswith(work + "/")

    def check(path, dir_fd=None, what="writing"):
        if not inside(path, dir_fd):
            deny(f"{what} {os.fsdecode(path) if not isinstance(path, int) else path!r} (outside {work})")

    def writes(mode) -> bool:
        return any(c in str(mode) for c in "wax+")

    def guarded_open(file, mode="r", *args, **kwargs):
        if writes(mode):
            check(file)
        return real_open(file, mode, *args, **kwargs)

    class GuardedFileIO(real_fileio):
        def __init__(self, file, mode="r", *args, **kwargs):
            if writes(mode):
                check(file)
            super().__init__(file, mode, *args, **kwargs)

    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def guarded_os_open(path, flags, mode=0o777, *, dir_fd=None):
        if flags & write_flags:
            check(path, dir_fd)
        return real["open"](path, flags, mode, dir_fd=dir_fd)

    def one_path(name):
        fn = real[name]

        def wrapper(path, *args, dir_fd=None, **kwargs):
            check(path, dir_fd, name)
            if dir_fd is not None:
                kwargs["dir_fd"] = dir_fd
            return fn(path, *args, **kwargs)

        return wrapper

    def two_paths(name):
        fn = real[name]

        def wrapper(src, dst, *args, src_dir_fd=None, dst_dir_fd=None, **kwargs):
            check(src, src_dir_fd, name)
            check(dst, dst_dir_fd, name)
            for key, value in (("src_dir_fd", src_dir_fd), ("dst_dir_fd", dst_dir_fd)):
                if value is not None:
                    kwargs[key] = value
            return fn(src, dst, *args, **kwargs)

        return wrapper

    def own_descendant(pid: int) -> bool:
        if pid in (0, me) or pid == real["getpid"]():
            return True
        seen = 0
        while pid > 1 and seen < 10_000:
            try:
                with real_open(f"/proc/{pid}/stat", "rb") as fh:
                    stat = fh.read()
                pid = int(stat[stat.rindex(b")") + 2:].split()[1])
            except (OSError, ValueError, IndexError):
                return False
            if pid == me:
                return True
            seen += 1
        return False

    def guarded_kill(pid, sig):
        if pid < 0 or not own_descendant(pid):
            deny(f"signalling process {pid}")
        return real["kill"](pid, sig)

    def guarded_killpg(pgid, sig):
        if pgid not in (0, real["getpgrp"]()):
            deny(f"signalling process group {pgid}")
        return real["killpg"](pgid, sig)

    def no_exec(*_args, **_kwargs):
        deny("starting another program")

    def no_socket(*_args, **_kwargs):
        deny("network access (creating a socket)")

    patches = {"open": guarded_os_open, "kill": guarded_kill, "killpg": guarded_killpg}
    for name in ("remove", "unlink", "rmdir", "mkdir", "chmod", "chown", "lchown", "truncate", "utime",
                 "mkfifo", "mknod", "setxattr", "removexattr", "lchmod", "chflags", "lchflags"):
        if name in real:
            patches[name] = one_path(name)
    for name in ("rename", "replace", "link"):
        patches[name] = two_paths(name)
    real_symlink = real["symlink"]

    def guarded_symlink(src, dst, target_is_directory=False, *, dir_fd=None):
        check(dst, dir_fd, "symlink")  # the link's target may be anywhere: writes through it are checked
        return real_symlink(src, dst, target_is_directory, dir_fd=dir_fd)

    patches["symlink"] = guarded_symlink
    for name in ("execv", "execve", "posix_spawn", "posix_spawnp", "system", "fexecve"):
        if name in real:
            patches[name] = no_exec
    for name, fn in patches.items():
        setattr(posix, name, fn)
        setattr(os, name, fn)
    for name in ("execl", "execle", "execlp", "execlpe", "execvp", "execvpe", "popen", "spawnv", "spawnve",
                 "spawnvp", "spawnvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe"):
        if hasattr(os, name):
            setattr(os, name, no_exec)
    _posixsubprocess.fork_exec = no_exec
    if hasattr(signal_mod, "pidfd_send_signal"):
        signal_mod.pidfd_send_signal = no_exec
    builtins.open = guarded_open
    _io.open = guarded_open
    import io

    io.open = guarded_open
    io.FileIO = _io.FileIO = GuardedFileIO

    class NoSocket(_socket.socket):
        def __init__(self, *args, **kwargs):
            no_socket()

    socket.socket = _socket.socket = socket.SocketType = _socket.SocketType = NoSocket
    socket.create_connection = socket.create_server = socket.fromfd = no_socket
    _socket.fromfd = no_socket
    for name in ("ctypes", "_ctypes", "ctypes.util"):
        sys.modules[name] = None  # import raises ImportError
    for name in list(sys.modules):
        if name.startswith("ctypes."):
            sys.modules[name] = None


if __name__ == "__main__":
    sys.exit(_runner_main(sys.argv[1:]))
