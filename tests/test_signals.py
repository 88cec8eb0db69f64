"""Stopping cleanly: SIGTERM as Ctrl-C, and the first Ctrl-C deferred to a safe point."""
import os
import signal
import subprocess
import sys
import time

import pytest
from spd._signals import stop_after_step, take_ctrl_c


@pytest.fixture
def saved_handlers():
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def deliver(sig):
    os.kill(os.getpid(), sig)
    time.sleep(0.2)  # the handler runs at the next bytecode


def test_take_ctrl_c_undoes_an_ignored_sigint_and_makes_sigterm_a_ctrl_c(saved_handlers):
    """A process started with `nohup ... &` has SIGINT ignored, which its children inherit; after
    take_ctrl_c (bench/study.py and the `spd` command call it) they start with Python's Ctrl-C handler,
    so stopping the study stops its runs cleanly instead of killing them. SIGTERM becomes Ctrl-C."""
    code = "import signal; print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)"
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    inherited = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    take_ctrl_c()
    reset = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert (inherited.stdout.strip(), reset.stdout.strip()) == ("False", "True")
    with pytest.raises(KeyboardInterrupt):
        deliver(signal.SIGTERM)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_first_signal_is_a_request_and_the_second_interrupts(saved_handlers, sig):
    take_ctrl_c()
    before = signal.getsignal(sig)
    calls = []
    with pytest.raises(KeyboardInterrupt), stop_after_step(lambda: calls.append("asked")) as request:
        deliver(sig)
        assert request.requested and calls == ["asked"]
        deliver(sig)
        pytest.fail("the second signal did not interrupt")
    assert signal.getsignal(sig) is before


def test_a_signal_that_would_not_interrupt_is_left_alone(saved_handlers):
    """SIGTERM's default (terminate) and an ignored SIGINT are not turned into requests."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    with stop_after_step() as request:
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        deliver(signal.SIGINT)
    assert not request.requested
