"""StepTimer, the run's one clock: validation and the warm-up step excluded."""

import pytest


def test_step_timer_excludes_validation_and_the_first_step():
    from types import SimpleNamespace

    from gridgen.training.callbacks.timing import StepTimer

    clock = iter([0.0, 10.0, 11.0, 11.2, 15.2, 16.0, 16.0])  # start; step 1 (warm-up) ends at 10 s; a 4 s validation
    timer = StepTimer(smoothing=0.5)
    trainer = SimpleNamespace(global_step=0, max_steps=10)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("gridgen.training.callbacks.timing.time.perf_counter", lambda: next(clock))
        timer.on_train_start(trainer, None)
        for step, validate in ((1, False), (2, False), (3, True)):
            trainer.global_step = step
            if validate:
                timer.on_validation_start(trainer, None)
                timer.on_validation_end(trainer, None)
            timer.on_train_batch_end(trainer, None, None, None, step - 1)
    # step 2: 11.0 - 10.0 = 1 s (first timed: the mean); step 3: 16.0 - 11.0 - 4.0 (validation) = 1 s
    assert timer.seconds_per_step == pytest.approx(1.0)
    assert timer.eta(trainer) == pytest.approx(7.0)
    assert timer.mean_seconds_per_step == pytest.approx(1.0)  # the run summary's figure
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("gridgen.training.callbacks.timing.time.perf_counter", lambda: 16.0)
        assert timer.training_time() == pytest.approx(12.0)  # throughput's clock: 16 s less the validation
