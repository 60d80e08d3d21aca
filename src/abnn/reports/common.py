"""What every report shares: percentages, the ``--set`` overrides line, the studies' header."""

from __future__ import annotations

import datetime as dt

from ..attacks.pgd import FIRST_FOOLING, FIRST_FOOLING_NOTE
from ..plotting import pyplot


def pct(v: float | None) -> str:
    """An accuracy in [0, 1] as a percentage with one decimal ("n/a" when missing)."""
    return "n/a" if v is None else f"{100 * v:.1f}"


def generated(versions: dict) -> str:
    """The "Generated ... by abnn X (torch Y)" line of a report, without its end."""
    return (f"Generated {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} by `abnn` "
            f"{versions['abnn']} (torch {versions['torch']}")


def save_figure(fig, path) -> None:
    """Lay out, write and close a matplotlib figure."""
    plt = pyplot()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def overrides_lines(preset: dict) -> list[str]:
    """The ``--set KEY=VALUE`` that changed the named preset (recorded in its ``overrides``)."""
    over = preset.get("overrides") or ()
    if not over:
        return []
    return [f"Overrides: {', '.join(f'`{o}`' for o in over)} (`--set`; every other setting is the preset's).", ""]


def study_header(title: str, summary: dict) -> list[str]:
    """The opening of a study's report: title, versions, preset, overrides, command, evaluation."""
    p = summary["preset"]
    lines = [f"# {title}", "", generated(summary["versions"]) + ").", "",
             f"Preset **{p['name']}** (the Table 1 preset: its target, data, schedule and seed for every point): "
             f"{p['description']}.", ""]
    lines += overrides_lines(p)
    if p.get("amp", "auto") not in ("auto", "off"):
        lines += [f"Every model of this study (substitutes included) trained under {p['amp']} autocast on the CPU; "
                  "evaluation and the statistics shift ran in float32.", ""]
    if summary.get("command"):
        lines += [f"Command: `{summary['command']}`", ""]
    ev = summary["evaluation"]
    lines += [f"Evaluation, the same for every point: the first {ev['n_eval']} test images, white-box through the "
              f"whole model, float32; attacks (registry specs) {', '.join(f'`{a}`' for a in ev['attacks'])}, seed "
              f"{ev['seed']}. `pgd` is the paper's PGD-5 (eps 8/255, alpha 2/255, random start, {FIRST_FOOLING}); "
              "the worst case is per sample over all of them (a sample counts as robust only if every attack fails "
              "on it). Pixel budgets are in [0, 1] pixel units, written k/255.", FIRST_FOOLING_NOTE, ""]
    return lines
