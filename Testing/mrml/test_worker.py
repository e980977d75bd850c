"""The persistent worker: one thread, jobs in order, callbacks only on the polling thread, cancel and errors."""

from __future__ import annotations

import threading

from SAMEmbeddingLib.worker import Worker


def test_jobs_run_in_order_on_one_persistent_thread_and_callbacks_on_the_polling_thread():
    worker = Worker()
    threads, done, callback_threads = [], [], []
    try:
        for n in range(3):
            worker.submit(lambda task, n=n: threads.append(threading.current_thread()) or n,
                          onDone=lambda result: (done.append(result), callback_threads.append(threading.current_thread())))
        assert worker.waitForIdle(timeout=30)
    finally:
        worker.shutdown()
    assert done == [0, 1, 2]
    assert len({id(t) for t in threads}) == 1 and threads[0] is not threading.current_thread()
    assert all(t is threading.current_thread() for t in callback_threads)


def test_nothing_is_delivered_until_polled():
    worker = Worker()
    done = []
    try:
        task = worker.submit(lambda task: 1, onDone=done.append)
        while task.state in ("queued", "running"):
            threading.Event().wait(0.01)
        assert done == [] and worker.busy
        worker.poll()
        assert done == [1] and not worker.busy
    finally:
        worker.shutdown()


def test_progress_and_main_thread_calls_arrive_in_order_before_done():
    worker = Worker()
    events = []

    def job(task):
        task.progress(1, 2, "half")
        task.callInMainThread(events.append, "partial")
        task.progress(2, 2, "all")
        return "result"

    try:
        worker.submit(job, onDone=events.append, onProgress=lambda d, t, m: events.append(m))
        assert worker.waitForIdle(timeout=30)
    finally:
        worker.shutdown()
    assert events == ["half", "partial", "all", "result"]


def test_a_failing_job_reports_its_exception_and_the_worker_goes_on():
    worker = Worker()
    errors, done = [], []
    try:
        worker.submit(lambda task: 1 / 0, onError=errors.append)
        worker.submit(lambda task: "next", onDone=done.append)
        assert worker.waitForIdle(timeout=30)
    finally:
        worker.shutdown()
    assert isinstance(errors[0], ZeroDivisionError)
    assert done == ["next"]


def test_a_job_cancelled_before_it_starts_is_skipped():
    worker = Worker()
    gate, ran, done = threading.Event(), [], []
    try:
        worker.submit(lambda task: gate.wait(10))
        second = worker.submit(lambda task: ran.append(True), onDone=done.append)
        second.cancel()
        gate.set()
        assert worker.waitForIdle(timeout=30)
    finally:
        worker.shutdown()
    assert ran == [] and done == [None] and second.state == "cancelled"


def test_a_running_job_sees_its_cancel_flag():
    worker = Worker()
    started, done = threading.Event(), []

    def job(task):
        started.set()
        return task.cancelEvent.wait(10)

    try:
        task = worker.submit(job, onDone=done.append)
        started.wait(10)
        worker.cancelAll()
        assert worker.waitForIdle(timeout=30)
    finally:
        worker.shutdown()
    assert done == [True] and task.state == "cancelled"


def test_a_main_thread_call_that_fails_is_told_to_the_tasks_on_error_and_the_job_goes_on():
    """A result the main thread could not apply (e.g. a heatmap whose target changed geometry meanwhile) was only
    logged: the job then looked successful. It now reaches ``onError``; the job still finishes."""
    worker = Worker()
    errors, done = [], []

    def fails():
        raise ValueError("could not write the heatmap")

    def job(task):
        task.callInMainThread(fails)
        return "finished"

    try:
        worker.submit(job, onDone=done.append, onError=errors.append)
        assert worker.waitForIdle(timeout=10)
    finally:
        worker.shutdown()
    assert [str(e) for e in errors] == ["could not write the heatmap"] and done == ["finished"]
