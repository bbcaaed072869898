"""The pipeline's own restart of a stage that Ray Train gives up on (no cluster needed)."""

import pytest
from ray.exceptions import ActorDiedError
from ray.train import ControllerError

from stpp_ray.cluster.train import _fit_with_restarts


class FakeTrainer:
    """`fit()` raises the queued errors one per call, then succeeds."""

    def __init__(self, *errors: BaseException):
        self.errors, self.calls = list(errors), 0

    def make(self) -> "FakeTrainer":
        return self

    def fit(self) -> None:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)


def lost_at_startup() -> ControllerError:
    """What Ray Train 2.58 raises when a worker dies while the group starts (FailurePolicy RAISE)."""
    return ControllerError(ActorDiedError())


def test_a_worker_lost_while_the_group_starts_restarts_the_stage(capsys):
    trainer = FakeTrainer(lost_at_startup(), lost_at_startup())
    _fit_with_restarts(trainer.make, "teacher", restarts=2)
    assert trainer.calls == 3
    out = capsys.readouterr().out
    assert "[teacher] Ray Train gave up after losing a worker (ActorDiedError)" in out
    assert "(2 of 2)" in out


def test_restarts_are_bounded_and_other_failures_propagate_at_once():
    trainer = FakeTrainer(lost_at_startup(), lost_at_startup())
    with pytest.raises(ControllerError):
        _fit_with_restarts(trainer.make, "teacher", restarts=1)
    assert trainer.calls == 2
    trainer = FakeTrainer(ControllerError(ValueError("a bug in the setup")))
    with pytest.raises(ControllerError, match="a bug in the setup"):
        _fit_with_restarts(trainer.make, "teacher", restarts=2)
    assert trainer.calls == 1
    trainer = FakeTrainer(RuntimeError("not Ray's"))
    with pytest.raises(RuntimeError):
        _fit_with_restarts(trainer.make, "teacher", restarts=2)
    assert trainer.calls == 1
