"""bench/device_tree.sh: what a device call carries, and the study archive moved out of its way and back."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "device_tree.sh"
pytestmark = pytest.mark.skipif(not (shutil.which("git") and Path("/proc/self/cmdline").exists()),
                                reason="needs git and /proc")


def _git(repo, *args):
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                   env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                        "GIT_COMMITTER_EMAIL": "t@t"})


@pytest.fixture
def repo(tmp_path):
    """A git checkout with the script, a committed 2 MiB archive, an ignored 3 MiB file and 1 MiB untracked."""
    root = tmp_path / "checkout"
    (root / "bench" / "results" / "study" / "m").mkdir(parents=True)
    shutil.copy(SCRIPT, root / "bench" / "device_tree.sh")
    (root / "bench" / "results" / "study" / "m" / "adapter.bin").write_bytes(os.urandom(2 << 20))
    (root / ".gitignore").write_text("/ignored.bin\n")
    _git(root, "init", "-q")
    _git(root, "add", ".")
    _git(root, "commit", "-q", "-m", "archive")
    (root / "ignored.bin").write_bytes(b"\0" * (3 << 20))
    (root / "untracked.bin").write_bytes(b"\0" * (1 << 20))
    return root


def _tree(repo, *args):
    return subprocess.run(["bash", str(repo / "bench" / "device_tree.sh"), *args], capture_output=True, text=True)


def test_mib_counts_tracked_and_untracked_but_not_ignored(repo):
    assert _tree(repo, "mib").stdout.strip() == "4"  # 2 tracked + 1 untracked + the script, rounded up
    assert _tree(repo, "mib", "ignored.bin").stdout.strip() == "7"
    missing = _tree(repo, "mib", "nowhere")
    assert missing.returncode == 2 and "nowhere" in missing.stderr


def test_stash_and_unstash_restore_the_archive_as_git_has_it(repo):
    archive = repo / "bench" / "results" / "study"
    before = (archive / "m" / "adapter.bin").read_bytes()
    out = _tree(repo, "stash")
    assert out.returncode == 0, out.stderr
    assert not archive.exists() and (repo / ".git" / "spd-device-stash" / "archive").is_dir()
    assert _tree(repo, "mib").stdout.strip() == "2"
    again = _tree(repo, "stash")
    assert again.returncode == 1 and "unstash it first" in again.stderr
    out = _tree(repo, "unstash")
    assert out.returncode == 0, out.stderr
    assert (archive / "m" / "adapter.bin").read_bytes() == before
    assert not (repo / ".git" / "spd-device-stash").exists()
    assert _tree(repo, "unstash").returncode == 1


def test_stash_refuses_uncommitted_archive_changes_and_unstash_a_rewritten_path(repo):
    archive = repo / "bench" / "results" / "study"
    (archive / "m" / "new.json").write_text("{}")
    out = _tree(repo, "stash")
    assert out.returncode == 1 and "commit them first" in out.stderr and archive.is_dir()
    (archive / "m" / "new.json").unlink()
    assert _tree(repo, "stash").returncode == 0
    (archive / "m").mkdir(parents=True)  # the study wrote into it meanwhile
    out = _tree(repo, "unstash")
    assert out.returncode == 1 and "exists again" in out.stderr
    assert (repo / ".git" / "spd-device-stash" / "archive" / "m" / "adapter.bin").exists()  # nothing lost


def test_stash_waits_for_this_checkouts_study_to_be_stopped(repo):
    (repo / "bench" / "study.py").write_text("import time\ntime.sleep(60)\n")
    _git(repo, "add", "bench/study.py")
    _git(repo, "commit", "-q", "-m", "study")
    proc = subprocess.Popen([sys.executable, "bench/study.py"], cwd=repo)
    try:
        time.sleep(0.3)
        out = _tree(repo, "stash")
        assert out.returncode == 1 and f"pid {proc.pid}" in out.stderr
        os.kill(proc.pid, signal.SIGSTOP)
        for _ in range(50):  # the stop takes effect asynchronously
            if open(f"/proc/{proc.pid}/stat").read().split(") ")[1].startswith("T"):
                break
            time.sleep(0.05)
        out = _tree(repo, "stash")
        assert out.returncode == 0, out.stderr
    finally:
        proc.kill()
        proc.wait()
