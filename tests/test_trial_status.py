"""sweeps.trial_status: the driver's plain record of each trial's state."""

from __future__ import annotations

from sweeps.layout import STATUS_FILE
from sweeps.trial_status import ended_on_its_own, read_status


def test_the_last_whole_line_of_each_trial_wins(tmp_path):
    assert read_status(tmp_path) == {}
    (tmp_path / STATUS_FILE).write_text(
        '{"dir": "a", "trial_id": "1", "number": 1, "status": "RUNNING"}\n'
        '{"dir": "b", "trial_id": "2", "number": 2, "status": "RUNNING"}\n'
        '{"dir": "a", "trial_id": "1", "number": 1, "status": "TERMINATED"}\n'
        "[1, 2]\n"
        '{"dir": "b", "trial_id": "2", "number": 2, "status": "TERMI'  # cut short by a crash
    )
    assert read_status(tmp_path) == {
        "a": {"trial_id": "1", "number": 1, "status": "TERMINATED"},
        "b": {"trial_id": "2", "number": 2, "status": "RUNNING"},
    }


def test_a_trial_ends_on_its_own_at_its_final_eval_a_divergence_or_a_scheduler_stop():
    assert ended_on_its_own({"final_eval": True})
    assert ended_on_its_own({"diverged": True, "val_loss": 10.0})
    assert ended_on_its_own({"final_eval": False, "done": True})  # Ray marks the result a scheduler stops at
    assert not ended_on_its_own({"final_eval": False, "done": False})  # stopped by an interrupted driver
    assert not ended_on_its_own(None)
