"""Stopping long work cleanly: SIGTERM as Ctrl-C for our commands, and a first Ctrl-C that lets
training finish its optimizer step and checkpoint it before stopping."""
from __future__ import annotations

import contextlib
import signal
import threading


def _terminated(signum, frame):
    raise KeyboardInterrupt


def take_ctrl_c() -> None:
    """For a command's own process: SIGTERM (``kill``) stops it like Ctrl-C, and Ctrl-C works even
    when it was started in the background (``nohup ... &`` starts it with SIGINT ignored, which its
    child processes would inherit; a handler, unlike "ignored", is not inherited)."""
    if threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGTERM, _terminated)
    signal.signal(signal.SIGINT, signal.default_int_handler)


class StopRequest:
    """Set by the first Ctrl-C (or SIGTERM, where it stands for Ctrl-C) inside :func:`stop_after_step`."""

    def __init__(self):
        self.requested = False


@contextlib.contextmanager
def stop_after_step(on_request=None):
    """While inside, the first Ctrl-C only sets ``StopRequest.requested`` (the work checks it at a
    safe point, saves and raises KeyboardInterrupt itself) and a second one interrupts at once.
    Only signals that would raise KeyboardInterrupt anyway are taken (SIGINT with Python's default
    handler; SIGTERM after :func:`take_ctrl_c`), and only from the main thread; the previous
    handlers are back on exit. ``on_request()`` is called on the first signal (e.g. to log)."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    taken = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)
             if signal.getsignal(s) in (signal.default_int_handler, _terminated)}

    def first(signum, frame):
        if request.requested:
            raise KeyboardInterrupt
        request.requested = True
        if on_request is not None:
            on_request()

    try:
        for s in taken:
            signal.signal(s, first)
        yield request
    finally:
        for s, handler in taken.items():
            signal.signal(s, handler)
