"""Both studies in one scheduled run: the frontier and the substitute study share their trainings.

``abnn reproduce studies`` plans every stage of :mod:`.frontier` and :mod:`.substitute_study`
as one graph, so that the substitute and ABNN models they have in common train once and all
trainings and evaluations keep every core busy; it then writes both reports (each study's own
pipeline, which finds every stage finished and reuses it in place).  The layout is::

    OUT/frontier/            substitute, standard, abnn, fast-at, pgd-at, pgd-at-matched, report
    OUT/substitute-study/    the other substitutes and their ABNN models, report

The substitute study reuses ``OUT/frontier/substitute`` and ``OUT/frontier/abnn`` as its
``tiny`` point exactly as it reuses a Table 1 reproduction (``--table1-out``).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from .frontier import frontier_points, matched_stage, run_frontier, study_eval
from .presets import Table1Preset
from .stages import TrainPoint, log, schedule, train_and_eval_stages
from .substitute_study import abnn_point, analysis_stages, run_substitute_study, substitutes


def study_points(preset: Table1Preset, out: Path, data_root: str | None, device: str
                 ) -> tuple[list[TrainPoint], list[tuple[TrainPoint, str]]]:
    """Every training point of both studies, the shared ones once, and the ABNN points with the
    dataset their substitute's accuracy is measured on."""
    fr_dir = out / "frontier"
    points = frontier_points(preset, fr_dir, None, data_root, device)
    by = {p.name: p for p in points}
    subs, sub_points = substitutes(preset, out / "substitute-study", None, data_root, device)
    tiny = next(s for s in subs if s.name == "tiny")
    subs = [dataclasses.replace(s, spec=str(by["substitute"].run)) if s is tiny else s for s in subs]
    rename = {"sub:tiny": "substitute", "abnn:tiny": "abnn"}
    points += [p for p in sub_points if p.name not in rename]
    analysed = [(by["abnn"], tiny.val_dataset)]
    for s in subs:
        if s.name == "tiny":
            continue
        p = abnn_point(preset, s, out / "substitute-study", None, data_root, device)
        p.after = tuple(rename.get(a, a) for a in p.after)
        points.append(p)
        analysed.append((p, s.val_dataset))
    return points, analysed


def run_studies(preset: Table1Preset, out: str | Path, *, data_root: str | None = None, device: str = "cpu",
                force: bool = False, progress: bool = True, command: str = "", jobs: int | None = None,
                threads: int | None = None) -> dict:
    """Train and evaluate every point of both studies in one schedule, then write both reports."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    points, analysed = study_points(preset, out, data_root, device)
    by = {p.name: p for p in points}
    spec = study_eval(preset)
    models = [p for p in points if p.name != "substitute" and not p.name.startswith("sub:")]
    stages, done = train_and_eval_stages([p for p in points if p is not by["pgd-at-matched"]], models, spec,
                                         data_root, device, force=force)
    stages += matched_stage(by, done, force)
    stages += analysis_stages(analysed, spec, data_root, device, force)
    _, _, per_stage = schedule("studies", stages, done, jobs=jobs, threads=threads, progress=progress,
                               quiet=("analysis:",))
    kw = dict(data_root=data_root, device=device, progress=progress, command=command, jobs=1, threads=per_stage)
    frontier = run_frontier(preset, out / "frontier", **kw)
    study = run_substitute_study(preset, out / "substitute-study", table1_dir=out / "frontier", **kw)
    log(f"studies: {time.perf_counter() - t_start:.0f} s in this call")
    return {"frontier": frontier, "substitute_study": study}
