"""A Ray worker set-up hook for the worker-death test (tests/test_pipeline.py): installed in every worker of the
test's Ray runtime through ``runtime_env={"worker_process_setup_hook": "crash_hook.install", ...}``, so the
product's job code carries no test hook.

While the file ``$KSM_TEST_CRASH_DIR/armed`` exists, the first task job to finish its first epoch renames it to
``fired`` (an atomic rename: exactly one worker wins), writes its pid there and kills its own process, as a lost
node would. Ray then retries the job on another worker.
"""
from __future__ import annotations

import os


def install() -> None:
    folder = os.environ.get("KSM_TEST_CRASH_DIR")
    if not folder:
        return
    import pipeline.jobs as jobs

    real = jobs.task_epochs

    def dies_once_after_first_epoch(*args, **kwargs):
        epochs = real(*args, **kwargs)
        first = next(epochs)
        try:
            os.rename(os.path.join(folder, "armed"), os.path.join(folder, "fired"))
        except FileNotFoundError:  # not armed, or another worker already died
            pass
        else:
            with open(os.path.join(folder, "fired"), "w") as f:
                f.write(str(os.getpid()))
            os._exit(1)
        yield first
        return (yield from epochs)

    jobs.task_epochs = dies_once_after_first_epoch
