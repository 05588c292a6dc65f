"""``Tracker.running``: the one place a run is closed as its block ends (FINISHED, KILLED, FAILED), as MLflow's
``start_run`` does. The client is a recorder of ``set_terminated`` calls: this starts no store."""
from __future__ import annotations

import pytest

from pipeline.errors import PipelineError, Stopped, TrackingUnreachable
from pipeline.tracking import Tracker


class Recorder:
    """The one client call ``running`` makes; ``down`` makes it fail as an unreachable server does."""

    def __init__(self, down: bool = False):
        self.closed: list[tuple[str, str]] = []
        self.down = down

    def set_terminated(self, run_id: str, status: str) -> None:
        if self.down:
            raise TrackingUnreachable("the tracking server http://127.0.0.1:1 has been unreachable")
        self.closed.append((run_id, status))


def tracker(client: Recorder) -> Tracker:
    tr = Tracker.__new__(Tracker)
    tr.client = client
    return tr


def test_a_block_that_returns_closes_the_run_finished():
    rec = Recorder()
    with tracker(rec).running("r1"):
        pass
    assert rec.closed == [("r1", "FINISHED")]


@pytest.mark.parametrize("exc, status", [(PipelineError("bad"), "FAILED"), (ValueError("bad"), "FAILED"),
                                         (Stopped(15, "stopped"), "KILLED"), (KeyboardInterrupt(), "KILLED"),
                                         (SystemExit(1), "KILLED")])  # a Ray worker's SIGTERM
def test_an_exception_closes_the_run_and_is_raised_again(exc, status):
    rec = Recorder()
    with pytest.raises(type(exc)) as got:
        with tracker(rec).running("r1"):
            raise exc
    assert got.value is exc and rec.closed == [("r1", status)]


def test_finish_false_leaves_a_successful_run_to_the_block():
    rec = Recorder()
    with tracker(rec).running("r1", finish=False):
        pass
    assert rec.closed == []
    with pytest.raises(RuntimeError):
        with tracker(rec).running("r1", finish=False):
            raise RuntimeError("boom")
    assert rec.closed == [("r1", "FAILED")]


def test_an_unreachable_server_leaves_the_run_and_hides_no_error():
    """A TrackingUnreachable from the block is raised without trying to close (the server cannot take it), and one
    raised while closing after another error does not replace that error (as jobs.task_job always did)."""
    rec = Recorder()
    with pytest.raises(TrackingUnreachable):
        with tracker(rec).running("r1"):
            raise TrackingUnreachable("down")
    assert rec.closed == []
    down = Recorder(down=True)
    with pytest.raises(ValueError, match="the real error"):
        with tracker(down).running("r1"):
            raise ValueError("the real error")
