import os
import signal

from stamp_dist.signals import stop_requests


def test_stop_signal_sets_the_flag_and_handlers_come_back():
    before = signal.getsignal(signal.SIGTERM)
    with stop_requests() as stop:
        assert not stop.is_set()
        os.kill(os.getpid(), signal.SIGTERM)  # would end the process without the handler
        assert stop.is_set()
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_signal_during_the_handler_does_not_deadlock():
    """SLURM's stop request is repeated; a second signal can arrive while the first is being handled.
    (With a threading.Event this deadlocked on the Event's lock: the handler interrupted itself.)"""
    calls = []

    def again():
        calls.append(len(calls))
        if len(calls) < 3:
            os.kill(os.getpid(), signal.SIGUSR1)  # handled inside this handler, before it returns

    with stop_requests(again) as stop:
        os.kill(os.getpid(), signal.SIGUSR1)
    assert stop.is_set() and calls == [0, 1, 2]


def test_ctrl_c_requests_a_stop_and_a_second_one_aborts():
    """Ctrl-C is a stop request like SIGTERM (checkpoint, then stop); pressed again it aborts at once."""
    import pytest

    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a background job
    with stop_requests() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.is_set()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before
