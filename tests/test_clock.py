"""PhaseClock: wall, CPU and paused time of a phase, the pause measured on a really stopped process."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from spd._clock import PhaseClock, usable_cores

CHILD = textwrap.dedent("""
    import json, sys, time
    from spd._clock import PhaseClock
    with PhaseClock(tick=0.05, slack=0.5) as clock:
        print("ready", flush=True)
        sys.stdin.readline()  # until the parent says the pause is over
        time.sleep(0.3)
    print(json.dumps(clock.record()), flush=True)
""")


def test_busy_work_is_not_a_pause():
    with PhaseClock(tick=0.05, slack=0.5) as clock:
        end = time.perf_counter() + 0.4
        while time.perf_counter() < end:  # holds the GIL: the watcher still wakes (switch interval)
            pass
    got = clock.record()
    assert "paused_seconds" not in got and clock.paused_seconds == 0.0
    assert got["seconds"] >= 0.4 and got["cpu_seconds"] >= 0.2
    # one busy thread: at most one core's worth of CPU per running second
    assert got["cpu_share"] == pytest.approx(clock.cpu_seconds / clock.seconds / usable_cores(), abs=0.01)
    assert 0.5 / usable_cores() <= got["cpu_share"] <= 1.05 / usable_cores()


@pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="needs POSIX job control signals")
def test_a_stopped_process_counts_the_stop_as_paused():
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        time.sleep(0.3)
        os.kill(child.pid, signal.SIGSTOP)
        time.sleep(2.0)
        os.kill(child.pid, signal.SIGCONT)
        child.stdin.write("go\n")
        child.stdin.flush()
        got = json.loads(child.stdout.readline())
    finally:
        child.kill()
        child.wait()
    assert 1.7 <= got["paused_seconds"] <= 2.6, got
    assert got["seconds"] >= 2.6 and got["seconds"] - got["paused_seconds"] < 1.5, got
    assert got["cpu_seconds"] < 1.0 and got["cpu_share"] < 0.5, got  # it mostly waited, stopped or not
