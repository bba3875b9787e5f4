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


def test_the_cpu_notice_expects_the_later_steps_not_the_first_one(caplog):
    """A compiled run's first step (compilation: 6 s) said its 1200 steps would take 2 hours; they take 5 min."""
    from types import SimpleNamespace

    import torch

    from gridgen.training.callbacks.progress import ProgressLog
    from gridgen.training.callbacks.timing import StepTimer

    clock = iter([0.0, 0.0, 6.0, 6.25, 6.5, 6.5])  # timer start, first batch; steps end at 6 s, 6.25 s, 6.5 s; notice
    timer, notice = StepTimer(smoothing=0.5), ProgressLog(every_n_steps=100)
    trainer = SimpleNamespace(global_step=0, max_steps=1200, callbacks=[timer, notice])
    module = SimpleNamespace(device=torch.device("cpu"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("time.perf_counter", lambda: next(clock))
        timer.on_train_start(trainer, module)
        notice.on_train_start(trainer, module)
        notice.on_train_batch_start(trainer, module, None, 0)
        for step in (1, 2, 3):
            trainer.global_step = step
            timer.on_train_batch_end(trainer, module, None, None, step - 1)
            notice.on_train_batch_end(trainer, module, None, None, step - 1)
    warnings = [r.getMessage() for r in caplog.records if "of this run will take about" in r.getMessage()]
    # 6.5 s so far + 1197 steps x 0.25 s = 305.75 s
    assert warnings == ["a step takes 0.25 s on CPU (the first 3 steps, with one-time costs, 6.5 s): the 1200 steps "
                        "of this run will take about 5:06 (a GPU: strategy=gpu; fewer steps: trainer.max_steps=N)"]
