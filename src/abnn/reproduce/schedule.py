"""Run a reproduction's independent stages concurrently, one process per stage.

A stage is a top-level function and its arguments (so that a spawned process can run it), the
names of the stages it needs first, and a rough weight used only to start long chains first.
With one worker the stages run in this process, in order; with more, each runs in its own
spawned process with a fixed number of torch threads.  A stage's numbers do not depend on how
many run beside it: its thread count is the same either way (``threads``), and every training
and attack draws from its own seeded generators.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..errors import AbnnError


@dataclass
class Stage:
    name: str
    fn: Callable[..., Any]
    args: tuple = ()
    after: tuple[str, ...] = ()
    weight: float = 1.0
    kwargs: dict = field(default_factory=dict)


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def plan_workers(jobs: int | None, threads: int | None, stages: list[Stage]) -> tuple[int, int]:
    """(workers, torch threads per stage).  Default: as many workers as cores allow, up to the
    widest set of independent stages, one thread each when more than one runs."""
    cores = available_cores()
    if jobs is not None and jobs < 1:
        raise AbnnError(f"--jobs must be >= 1, got {jobs}")
    if threads is not None and threads < 1:
        raise AbnnError(f"--threads must be >= 1, got {threads}")
    roots = sum(1 for s in stages if not s.after)
    workers = jobs or max(1, min(cores // (threads or 1), max(roots, 1)))
    return workers, threads or max(1, cores // workers)


def _chain_weight(stages: dict[str, Stage]) -> dict[str, float]:
    """Each stage's weight plus the heaviest chain of stages that wait for it."""
    memo: dict[str, float] = {}

    def w(name: str) -> float:
        if name not in memo:
            kids = [s.name for s in stages.values() if name in s.after]  # noqa: B023
            memo[name] = stages[name].weight + max((w(k) for k in kids), default=0.0)
        return memo[name]

    return {n: w(n) for n in stages}


def _call(fn: Callable[..., Any], threads: int, args: tuple, kwargs: dict) -> Any:
    torch.set_num_threads(threads)
    return fn(*args, **kwargs)


def _worker_init(parent: int) -> None:
    """A stage process ends when the reproduce process that started it is gone (killed,
    say): it must not train on unattended.  Its run folder keeps the last checkpoint."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(2)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def run_stages(stages: list[Stage], *, workers: int, threads: int, done: dict[str, Any] | None = None,
               on_done: Callable[[str, Any], None] | None = None) -> dict[str, Any]:
    """Run every stage after the stages it needs; return {name: result}, ``done`` included
    (results of stages finished earlier).  The first failure cancels the stages not yet
    started and is raised once the running ones end."""
    results: dict[str, Any] = dict(done or {})
    by_name = {s.name: s for s in stages}
    missing = {d for s in stages for d in s.after} - set(by_name) - set(results)
    if missing:
        raise AbnnError(f"stages wait for unknown stages {sorted(missing)}")
    prio = _chain_weight(by_name)
    total = len(results) + len(stages)

    def ready() -> list[Stage]:
        todo = [s for s in stages if s.name not in results and s.name not in running.values()]
        return sorted((s for s in todo if all(d in results for d in s.after)), key=lambda s: -prio[s.name])

    running: dict[Future, str] = {}
    if workers <= 1 or len(stages) <= 1:
        for s in sorted(stages, key=lambda s: _topo_index(s, by_name)):
            results[s.name] = _call(s.fn, threads, s.args, s.kwargs)
            if on_done:
                on_done(s.name, results[s.name])
        return results
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                             initializer=_worker_init, initargs=(os.getpid(),)) as pool:
        error: BaseException | None = None
        while len(results) < total:
            if error is None:
                for s in ready()[: workers - len(running)]:
                    running[pool.submit(_call, s.fn, threads, s.args, s.kwargs)] = s.name
            if not running:
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                name = running.pop(fut)
                try:
                    results[name] = fut.result()
                except BaseException as exc:  # noqa: BLE001 - re-raised below, after the others end
                    error = error or exc
                    continue
                if on_done:
                    on_done(name, results[name])
        if error is not None:
            raise error
    return results


def _topo_index(stage: Stage, by_name: dict[str, Stage]) -> int:
    """Depth of a stage in the dependency graph (stable order for the sequential path)."""
    inner = [d for d in stage.after if d in by_name]
    return 0 if not inner else 1 + max(_topo_index(by_name[d], by_name) for d in inner)
