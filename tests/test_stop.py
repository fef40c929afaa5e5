"""core.stop: stop signals take Ctrl-C's path; a block recorded whole is not cut by them."""
import os
import signal

import pytest

from vidpipe.core.stop import handle_stop_signals, restore_signals, stop_signal, uninterrupted


def test_a_stop_signal_inside_an_uninterrupted_block_is_raised_when_the_block_ends():
    previous = handle_stop_signals()
    done = []
    try:
        with pytest.raises(KeyboardInterrupt):
            with uninterrupted():
                os.kill(os.getpid(), signal.SIGTERM)   # delivered here, in the main thread
                done.append("first half")
                with uninterrupted():                    # nested: only the outermost raises
                    done.append("second half")
                done.append("end")
        assert done == ["first half", "second half", "end"]
        assert stop_signal() == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):           # outside a block: raised at once
            os.kill(os.getpid(), signal.SIGTERM)
            done.append("never")
        assert "never" not in done
    finally:
        restore_signals(previous)
