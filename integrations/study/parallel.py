"""Study runs in parallel worker processes, each with its share of the CPU threads.

Runs sharing a class-image folder (prior preservation) wait for the first of them, in the sequential order, to
fill it: the class images are then the same, from the same seed, as in a sequential study.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context


def default_jobs(user_model: bool) -> int:
    """Two runs at once on a machine with 2+ cores for the bundled tiny model (its small ops use one thread
    well); one for a user's model, which fills the machine (or the GPU) by itself."""
    return 1 if user_model else max(1, min(2, os.cpu_count() or 1))


def schedule(tasks: Sequence, shared_key: Callable[[object], Hashable]) -> list[int | None]:
    """For each task, the index of the task it waits for: the first earlier task with the same ``shared_key``
    (``None``: it may start at once)."""
    first, waits_for = {}, []
    for index, task in enumerate(tasks):
        key = shared_key(task)
        waits_for.append(first.get(key))
        first.setdefault(key, index)
    return waits_for


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)


def run_parallel(function: Callable, tasks: Sequence, jobs: int, threads: int, shared_key=None, on_done=None):
    """Calls ``function(*task)`` for every task in ``jobs`` spawned processes of ``threads`` torch threads and
    returns the results in task order; ``on_done(task, result)`` is called as each finishes. A task whose
    ``shared_key`` was seen before starts only after the first task of that key finished."""
    if jobs < 1 or threads < 1:
        raise ValueError(f"jobs and threads must be >= 1, got jobs={jobs}, threads={threads}")
    waits_for = schedule(tasks, shared_key) if shared_key is not None else [None] * len(tasks)
    results, running, finished = {}, {}, set()
    context = get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_init_worker, initargs=(threads,)) as pool:
        pending = list(range(len(tasks)))
        while pending or running:
            for index in list(pending):
                if len(running) < jobs and (waits_for[index] is None or waits_for[index] in finished):
                    running[pool.submit(function, *tasks[index])] = index
                    pending.remove(index)
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                index = running.pop(future)
                results[index] = future.result()  # a failed run raises here, with its traceback
                finished.add(index)
                if on_done is not None:
                    on_done(tasks[index], results[index])
    return [results[i] for i in range(len(tasks))]
