"""The sandbox that runs model-written code: results, limits, and hostile programs.

Every hostile program must end within its limits while the test process, a decoy process, a
listening socket and sentinel files stay untouched, and no process of it may be left behind. The
hostile programs run in three configurations: everything on (the default), the kernel layers alone
(``guard=False``: namespaces, uid, rlimits; skipped where the kernel refuses namespaces), and the
in-process guard alone (``isolate=False``).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import uuid

import pytest

from spd.sandbox import UID_BASE, RunResult, SandboxError, capabilities, run_many, run_program, run_tests

ROOT = os.geteuid() == 0
KERNEL = {"netns", "pidns", "mountns", "readonly"} <= set(capabilities())
MODES = [
    pytest.param({}, id="all"),
    pytest.param({"guard": False}, id="kernel-only",
                 marks=pytest.mark.skipif(not KERNEL, reason="namespaces unavailable here")),
    pytest.param({"isolate": False}, id="guard-only"),
]


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture
def tag():
    return f"spdhostile{uuid.uuid4().hex[:12]}"


@pytest.fixture
def listener():
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.setblocking(False)
    yield sock
    sock.close()


@pytest.fixture
def decoy():
    proc = subprocess.Popen(["sleep", "120"])
    yield proc
    proc.kill()
    proc.wait()


@pytest.fixture
def sentinels(tmp_path):
    """A sentinel in pytest's tmp_path and a world-writable one outside /tmp (in /var/tmp)."""
    inside_tmp = tmp_path / "sentinel.txt"
    inside_tmp.write_text("keep me")
    outside = None
    if os.path.isdir("/var/tmp") and os.access("/var/tmp", os.W_OK):
        folder = f"/var/tmp/spd-sentinel-{uuid.uuid4().hex[:8]}"
        os.mkdir(folder)
        os.chmod(folder, 0o777)
        outside = os.path.join(folder, "sentinel.txt")
        with open(outside, "w") as fh:
            fh.write("keep me too")
        os.chmod(outside, 0o666)
    yield [str(inside_tmp)] + ([outside] if outside else [])
    if outside:
        for name in os.listdir(os.path.dirname(outside)):
            os.unlink(os.path.join(os.path.dirname(outside), name))
        os.rmdir(os.path.dirname(outside))


def leftovers(tag: str) -> list[int]:
    """Processes whose command line holds ``tag`` or that run as a sandbox uid."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as fh:
                cmdline = fh.read()
            uid = os.stat(f"/proc/{name}").st_uid
        except OSError:
            continue
        if tag.encode() in cmdline or uid >= UID_BASE:
            found.append(int(name))
    return found


def no_leftovers(tag: str) -> bool:
    for _ in range(50):  # killed processes may take a moment to disappear from /proc
        if not leftovers(tag):
            return True
        time.sleep(0.05)
    return False


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().split(")")[-1].split()[0] != "Z"


# -- ordinary programs ---------------------------------------------------------------------------
def test_result_of_ordinary_programs():
    ok = run_program("import math, collections, fractions, json\nprint(math.gcd(12, 18))")
    assert isinstance(ok, RunResult) and ok.passed and ok.returncode == 0 and not ok.timed_out
    assert ok.stdout == "6\n" and ok.stderr == "" and 0 < ok.duration < 10
    assert {"rlimits", "guard"} <= set(ok.isolation)
    bad = run_program("raise ValueError('boom')")
    assert not bad.passed and bad.returncode == 1 and "ValueError: boom" in bad.stderr
    assert "sandbox.py" not in bad.stderr  # the runner's own frames are not shown
    syntax = run_program("def f(:\n    pass")
    assert not syntax.passed and syntax.returncode == 1 and "SyntaxError" in syntax.stderr
    code = run_program("import sys\nsys.exit(3)")
    assert not code.passed and code.returncode == 3
    assert run_program("import sys\nsys.exit(None)").passed
    env = run_program("import os\nprint(sorted(os.environ))\nprint(os.getcwd() == os.environ['HOME'])")
    assert env.passed and "'HOME'" in env.stdout and "True" in env.stdout


def test_run_tests_passes_only_when_the_tests_ran_to_the_end():
    code = "def add(a, b):\n    return a + b"
    assert run_tests(code, ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]).passed
    wrong = run_tests(code, ["assert add(1, 2) == 4"])
    assert not wrong.passed and "AssertionError" in wrong.stderr
    assert run_tests("def area(r):\n    return math.pi * r * r", ["assert area(1) == math.pi"],
                     setup="import math").passed
    early_exit = run_tests(code + "\nimport sys\nsys.exit(0)", ["assert add(1, 2) == 4"])
    assert early_exit.returncode == 0 and not early_exit.passed
    os_exit = run_tests(code + "\nimport os\nos._exit(0)", ["assert add(1, 2) == 4"])
    assert os_exit.returncode == 0 and not os_exit.passed
    assert "__spd_tests_done" not in run_tests(code, ["assert add(1, 2) == 3"]).stdout


def test_run_many_keeps_order():
    jobs = [(f"def f():\n    return {i}", [f"assert f() == {i if i % 2 else -1}"], "") for i in range(6)]
    results = run_many(jobs, workers=3)
    assert [r.passed for r in results] == [bool(i % 2) for i in range(6)]


def test_the_temporary_folder_is_removed(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    result = run_program("open('made.txt', 'w').write('x')\nprint(open('made.txt').read())")
    assert result.passed and result.stdout == "x\n"
    assert list(tmp_path.iterdir()) == []


def test_limits_are_validated():
    with pytest.raises(SandboxError):
        run_program("pass", timeout=0)


# -- hostile programs ----------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_infinite_loop_is_killed(mode, tag):
    started = time.monotonic()
    result = run_program("while True:\n    pass", timeout=1.5, tag=tag, **mode)
    assert time.monotonic() - started < 4
    assert result.timed_out and not result.passed and result.returncode is None
    assert no_leftovers(tag)


@pytest.mark.parametrize("mode", MODES)
def test_fork_bomb_is_contained(mode, tag):
    if mode.get("isolate") is False and ROOT:
        pytest.skip("without namespaces and a uid change, RLIMIT_NPROC does not bind root")
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    started = time.monotonic()
    result = run_program(bomb, timeout=2, nproc=32, tag=tag, **mode)
    assert time.monotonic() - started < 6
    assert not result.passed
    assert no_leftovers(tag)


def test_background_and_daemon_processes_do_not_outlive_the_run(tag):
    for mode in ({}, {"isolate": False}):
        program = ("import os, time\n"
                   "if os.fork() == 0:\n"
                   "    os.setsid()\n"
                   "    if os.fork() == 0:\n"
                   "        time.sleep(60)\n"
                   "    time.sleep(60)\n"
                   "print('parent done')")
        started = time.monotonic()
        result = run_program(program, timeout=10, tag=tag, **mode)
        assert result.passed and result.stdout == "parent done\n"
        assert time.monotonic() - started < 5
        assert no_leftovers(tag), mode


@pytest.mark.parametrize("mode", MODES)
def test_memory_bomb_fails(mode, tag):
    started = time.monotonic()
    result = run_program("x = []\nwhile True:\n    x.append(bytearray(50 * 2**20))", memory_mb=512,
                         timeout=10, tag=tag, **mode)
    assert time.monotonic() - started < 8
    assert not result.passed and not result.timed_out and "MemoryError" in result.stderr
    assert no_leftovers(tag)


@pytest.mark.parametrize("mode", MODES)
def test_huge_output_is_capped(mode, tag):
    started = time.monotonic()
    loop = run_program("while True:\n    print('x' * 10**6)", max_output=10_000, file_size_mb=4, timeout=20,
                       tag=tag, **mode)
    giant = run_program("while True:\n    print('x' * 10**9)", max_output=10_000, timeout=20, tag=tag, **mode)
    assert time.monotonic() - started < 15
    for result in (loop, giant):
        assert not result.passed and not result.timed_out
        assert len(result.stdout) <= 10_000 and len(result.stderr) <= 10_000
    assert loop.truncated and loop.stdout.startswith("x" * 1000)
    assert no_leftovers(tag)


@pytest.mark.parametrize("mode", MODES)
def test_file_system_outside_the_folder_is_protected(mode, tag, tmp_path, sentinels):
    before = {p: open(p).read() for p in sentinels}
    outside_tmp = f"/tmp/outside-{uuid.uuid4().hex}"
    attempts = [f"import os\nos.remove({sentinels[0]!r})",
                f"open({sentinels[0]!r}, 'w').write('pwned')",
                f"import shutil\nshutil.rmtree({str(tmp_path)!r})",
                f"open({outside_tmp!r}, 'w').write('pwned')",
                f"import pathlib\npathlib.Path({outside_tmp!r}).mkdir()",
                f"import os\nos.rename({sentinels[0]!r}, {sentinels[0] + '.moved'!r})"]
    if len(sentinels) > 1:  # world-writable, outside /tmp: only the read-only mounts (or the guard) stop it
        attempts += [f"open({sentinels[1]!r}, 'a').write('pwned')",
                     f"import os\nos.unlink({sentinels[1]!r})",
                     f"open({os.path.dirname(sentinels[1]) + '/new.txt'!r}, 'w').write('pwned')"]
    for attempt in attempts:
        result = run_program(attempt, timeout=10, tag=tag, **mode)
        if mode.get("guard", True):
            assert not result.passed, attempt
            assert "PermissionError" in result.stderr or "FileNotFoundError" in result.stderr, result.stderr
        for path, text in before.items():
            assert os.path.exists(path) and open(path).read() == text, attempt
        assert not os.path.exists(outside_tmp), attempt
        if len(sentinels) > 1:
            assert os.listdir(os.path.dirname(sentinels[1])) == ["sentinel.txt"], attempt
    assert no_leftovers(tag)


@pytest.mark.parametrize("mode", MODES)
def test_network_is_unreachable(mode, tag, listener):
    port = listener.getsockname()[1]
    programs = [f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=3)\ns.sendall(b'pwned')",
                f"import _socket\ns = _socket.socket()\ns.settimeout(3)\ns.connect(('127.0.0.1', {port}))",
                "import socket\nsocket.getaddrinfo('example.com', 80)"]
    for program in programs:
        started = time.monotonic()
        result = run_program(program, timeout=10, tag=tag, **mode)
        assert not result.passed, (program, result)
        assert time.monotonic() - started < 8
    with pytest.raises(BlockingIOError):  # the listener never got a connection
        listener.accept()
    assert no_leftovers(tag)


@pytest.mark.parametrize("mode", MODES)
def test_parent_and_other_processes_cannot_be_killed(mode, tag, decoy):
    me = os.getpid()
    targets = [decoy.pid] if mode.get("isolate") is False else [decoy.pid, me]  # the guard alone: decoy only
    programs = ["import os, signal\nos.kill(os.getppid(), signal.SIGKILL)",
                "import os, signal\nos.killpg(os.getpgid(os.getppid()), signal.SIGKILL)",
                "import os, signal\nos.kill(-1, signal.SIGKILL)"]
    for pid in targets:
        programs += [f"import os, signal\nos.kill({pid}, signal.SIGKILL)",
                     f"import os, signal\nos.killpg({os.getpgid(pid)}, signal.SIGKILL)"]
    if mode.get("guard", True) and not mode.get("isolate", True):
        programs = [p for p in programs if "-1" not in p]  # kill(-1) as root without a uid change is fatal
    for program in programs:
        result = run_program(program, timeout=10, tag=tag, **mode)
        if mode.get("guard", True):  # refused, or (getpgid of a pid outside the PID namespace is 0)
            assert not result.passed, (program, result)  # the program only killed its own group
            assert "PermissionError" in result.stderr or result.returncode == -signal.SIGKILL
        assert alive(decoy.pid), program
    assert alive(me) and no_leftovers(tag)


def test_kernel_layers_are_active_where_available():
    caps = set(capabilities())
    assert {"rlimits", "guard"} <= caps
    if ROOT and KERNEL:
        assert "uid" in caps
        probe = run_program("import os\nprint(os.getuid(), os.getpid(), os.listdir('/tmp'))\n"
                            "import socket\nprint(socket.if_nameindex())", guard=False)
        uid, pid = probe.stdout.split()[:2]
        assert int(uid) >= UID_BASE and int(pid) == 2  # pid 1 is the namespace's init
        assert "'lo'" in probe.stdout.split("\n")[1]  # an empty network namespace: loopback only


@pytest.mark.skipif(not KERNEL, reason="namespaces unavailable here")
def test_the_kernel_layers_cannot_be_undone_from_inside(sentinels, tag):
    """Without the guard (ctypes allowed): remounting read-write, unmounting the private /tmp and
    writing a world-writable file outside /tmp all fail."""
    target = sentinels[-1]
    program = ("import ctypes, os\n"
               "libc = ctypes.CDLL(None, use_errno=True)\n"
               "libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]\n"
               "results = [libc.mount(None, p, None, 32 | 4096, None) for p in (b'/', b'/var/tmp')]\n"
               "results.append(libc.umount2(b'/tmp', 2))\n"
               "print(results)\n"
               f"open({target!r}, 'a').write('pwned')\n")
    result = run_program(program, guard=False, tag=tag)
    assert not result.passed and result.stdout.strip() == "[-1, -1, -1]", result
    assert "Read-only file system" in result.stderr or "Permission denied" in result.stderr
    assert "keep me" in open(target).read() and "pwned" not in open(target).read()
    assert {"uid", "no_new_privs"} & set(result.isolation) and "guard" not in result.isolation
    assert no_leftovers(tag)
