"""core/lock.py: one holder at a time for an output folder and for a cache item's claim.
flock locks belong to an open file, so two opens in one process contend like two processes."""
from __future__ import annotations

import os
import threading

import pytest

from vidpipe.core.errors import VidpipeError
from vidpipe.core.lock import LOCK_FILE, Claim, folder_lock


def test_a_held_claim_refuses_a_second_taker_until_released(tmp_path):
    path = tmp_path / ".claims" / "v0.claim"
    first, second = Claim(path), Claim(path)
    assert first.take(wait=False)
    assert not second.take(wait=False)
    first.release()
    assert second.take(wait=False)
    second.release()


def test_a_waiting_claim_is_granted_when_the_holder_releases(tmp_path):
    path = tmp_path / ".claims" / "v0.claim"
    holder, waiter = Claim(path), Claim(path)
    assert holder.take(wait=False)
    granted = threading.Event()
    thread = threading.Thread(target=lambda: waiter.take(wait=True) and granted.set())
    thread.start()
    assert not granted.wait(0.2)          # blocked while held
    holder.release()
    thread.join(10)
    assert granted.is_set()
    with waiter:
        assert not Claim(path).take(wait=False)


def test_a_second_run_into_a_held_folder_is_refused_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    with folder_lock(run, "train"):
        assert (run / LOCK_FILE).read_text().strip() == str(os.getpid())
        with pytest.raises(VidpipeError, match=f"in use by another vidpipe train \\(pid {os.getpid()}\\)"):
            with folder_lock(run, "train"):
                pass
    assert not run.exists()               # created by the run, left empty: removed
    with folder_lock(run, "train"):       # free again
        pass
