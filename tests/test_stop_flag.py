"""StopFlag and its signal handling in-process: nohup's ignored SIGHUP, handlers given back, a stop before or
during at_once(), a second signal during clean-up, the retry timer. tests/test_signals.py runs the real command."""

from __future__ import annotations

import pytest


def test_an_ignored_sighup_stays_ignored_under_nohup():
    """`nohup aigc train ...`: the terminal closing must not stop the run."""
    import signal

    from aigc_cli.training.signals import StopFlag, stop_signals

    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        assert signal.SIGHUP not in stop_signals() and signal.SIGTERM in stop_signals()
        with StopFlag():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_stop_flag_gives_the_handlers_back():
    import signal

    from aigc_cli.training.signals import StopFlag

    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGALRM)
    before = {s: signal.getsignal(s) for s in sigs}
    with StopFlag() as stop:
        assert all(signal.getsignal(s) == stop._handle for s in sigs[:3])
    assert {s: signal.getsignal(s) for s in sigs} == before


def test_a_stop_before_at_once_stops_before_the_work():
    """A stop that came before a long load began: the load must not run for minutes first."""
    import os
    import signal

    from aigc_cli.training.signals import StopFlag, StoppedNow

    ran = []
    with StopFlag() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(StoppedNow):
            with stop.at_once():
                ran.append(True)
    assert ran == [] and stop.exit_code == 143


def test_a_second_signal_does_not_break_the_clean_up_of_the_first_stop():
    import os
    import signal
    import time

    from aigc_cli.training.signals import StopFlag, StoppedNow

    cleaned = []
    with StopFlag() as stop:
        with pytest.raises(StoppedNow):
            with stop.at_once():
                try:
                    os.kill(os.getpid(), signal.SIGTERM)
                    time.sleep(1)
                finally:
                    os.kill(os.getpid(), signal.SIGTERM)  # e.g. `timeout` and SLURM signalling twice
                    cleaned.append(True)
    assert cleaned == [True] and stop.exit_code == 143


def test_no_retry_timer_outlives_the_stop_flag():
    """A retry still due when the command's handlers go would fire SIGALRM at a default handler: the process
    killed by 'Alarm clock' after all its work."""
    import signal

    from aigc_cli.training.signals import StopFlag, retry_soon

    with StopFlag():
        assert retry_soon()
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_a_retry_due_after_at_once_ended_does_not_raise_mid_step(tmp_path, monkeypatch):
    """A stop that landed in an import inside at_once() waits for a retry (SIGALRM); when at_once() ends
    first, the retry must not raise StoppedNow wherever training then is: the loop's own check stops."""
    import signal
    import sys
    import time

    from aigc_cli.training.signals import RETRY_S, StopFlag

    (tmp_path / "stops_quickly.py").write_text("import os, signal\nos.kill(os.getpid(), signal.SIGTERM)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "stops_quickly", raising=False)
    with StopFlag() as stop:
        with stop.at_once():
            import stops_quickly  # noqa: F401 - the stop lands inside this import, which then ends at once
        time.sleep(6 * RETRY_S)  # the retry comes: a step is running here
        assert stop.signum == signal.SIGTERM  # the stop is kept for the loop's check


def test_a_stop_raised_by_its_retry_is_no_longer_pending():
    """`pending` tells the command's caller to raise the stop itself: once the retry raised it, it is not
    raised a second time."""
    import time
    import types

    from aigc_cli.training.signals import RETRY_S, RaiseOutsideImports

    class Stop(Exception):
        pass

    raiser = RaiseOutsideImports(Stop)
    importing = types.SimpleNamespace(f_code=types.SimpleNamespace(co_filename="<frozen importlib._bootstrap>"),
                                      f_back=None)
    with raiser:
        raiser(importing)
        assert raiser.pending
        with pytest.raises(Stop):
            time.sleep(20 * RETRY_S)  # the retry raises it
        assert not raiser.pending
