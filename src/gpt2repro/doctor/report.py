"""The doctor's result: one ``Row`` per check, rendered as a console table, JSON and a Markdown summary.

A row is ``pass``, ``fail`` or ``skipped``; a skipped row always says why, a failed one names the
failing call and, where one is known, the fix. The JSON (``SCHEMA``) is what scripts and bug reports
read; its keys are stable.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import shutil
import textwrap
from dataclasses import dataclass, field

SCHEMA = "gpt2repro-doctor/1"
PASS, FAIL, SKIPPED = "pass", "fail", "skipped"
STATUSES = (PASS, FAIL, SKIPPED)
Metric = float | int | str | bool | None


@dataclass
class Row:
    """One line of the report: what was checked, how it went, its figure and (if not passed) why."""

    name: str
    status: str
    figure: str = ""  # the headline: ms/step, a max |difference|, a version list
    detail: str = ""  # why it was skipped / what went wrong / context for the figure
    call: str = ""  # the failing call (fail rows)
    fix: str = ""  # the known fix (fail rows), empty when none is known
    seconds: float = 0.0
    metrics: dict[str, Metric] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"row status must be one of {STATUSES}, got {self.status!r}")
        if self.status == SKIPPED and not self.detail:
            raise ValueError(f"skipped row {self.name!r} must say why")


def passed(name: str, figure: str, detail: str = "", **metrics: Metric) -> Row:
    return Row(name, PASS, figure=figure, detail=detail, metrics=metrics)


def skipped(name: str, why: str, **metrics: Metric) -> Row:
    return Row(name, SKIPPED, detail=why, metrics=metrics)


def failed(name: str, call: str, detail: str, fix: str = "", figure: str = "", **metrics: Metric) -> Row:
    return Row(name, FAIL, figure=figure, detail=detail, call=call, fix=fix, metrics=metrics)


@dataclass(frozen=True)
class Failure:
    """Why a measured row fails: the call under test, what went wrong and, where known, the fix."""

    call: str
    detail: str
    fix: str = ""


def verdict(name: str, figure: str, failure: Failure | None, **metrics: Metric) -> Row:
    """A measured row: ``failed`` with its figure when there is a ``failure``, else ``passed``."""
    if failure is None:
        return passed(name, figure, **metrics)
    return failed(name, failure.call, failure.detail, fix=failure.fix, figure=figure, **metrics)


@dataclass
class Report:
    """Every row plus what the run was: the device, --quick, the wall time."""

    device: str
    quick: bool
    rows: list[Row] = field(default_factory=list)
    seconds: float = 0.0
    command: str = "gpt2repro doctor"

    @property
    def ok(self) -> bool:
        return not any(r.status == FAIL for r in self.rows)

    def counts(self) -> dict[str, int]:
        return {s: sum(r.status == s for r in self.rows) for s in STATUSES}

    def exit_code(self) -> int:
        """0 when no row failed (skipped rows are fine), 1 otherwise."""
        return 0 if self.ok else 1


def _finite(value):
    """JSON has no inf/nan: such metrics (an overflowed gradient norm) are written as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


def to_json(report: Report) -> str:
    doc = {
        "schema": SCHEMA,
        "command": report.command,
        "device": report.device,
        "quick": report.quick,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "seconds": round(report.seconds, 2),
        "ok": report.ok,
        "counts": report.counts(),
        "rows": [_finite({**dataclasses.asdict(r), "seconds": round(r.seconds, 2)}) for r in report.rows],
    }
    return json.dumps(doc, indent=2, default=str) + "\n"


_LABEL = {PASS: "pass", FAIL: "FAIL", SKIPPED: "skip"}


def _explanation(row: Row) -> list[str]:
    """The lines under a row that did not pass (or a passing row's note)."""
    lines = []
    if row.status == FAIL:
        if row.call:
            lines.append(f"failing call: {row.call}")
        if row.detail:
            lines.append(row.detail)
        lines.append(
            f"fix: {row.fix}" if row.fix else "fix: none known; paste the --markdown summary in an issue"
        )
    elif row.detail:
        lines.append(("why: " if row.status == SKIPPED else "") + row.detail)
    return lines


def render_table(report: Report, width: int | None = None) -> str:
    """The console table: row | status | seconds | figure, each explanation indented below its row."""
    width = width or max(80, min(140, shutil.get_terminal_size((110, 24)).columns))
    name_w = max(len(r.name) for r in report.rows) if report.rows else 10
    head = f"{'check':<{name_w}}  status  {'time':>6}  figure"
    indent = " " * (name_w + 18)
    out = [head, "-" * min(width, max(len(head), 60))]
    for row in report.rows:
        figure = row.figure or ("(see below)" if row.status != PASS else "")
        took = f"{row.seconds:5.1f}s" if row.seconds >= 0.05 else ""
        first = f"{row.name:<{name_w}}  {_LABEL[row.status]:<6}  {took:>6}  "
        wrapped = textwrap.wrap(figure, max(30, width - len(first))) or [""]
        out.append(first + wrapped[0])
        out.extend(indent + w for w in wrapped[1:])
        for line in _explanation(row):
            out.extend(
                textwrap.wrap(line, max(30, width - 4), initial_indent="    ", subsequent_indent="      ")
            )
    counts = report.counts()
    verdict = "all checks passed" if report.ok else f"{counts[FAIL]} check(s) FAILED"
    out.append("-" * min(width, max(len(head), 60)))
    out.append(
        f"{verdict}: {counts[PASS]} passed, {counts[FAIL]} failed, {counts[SKIPPED]} skipped "
        f"in {report.seconds:.0f} s on {report.device}{' (--quick)' if report.quick else ''}"
    )
    return "\n".join(out) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(report: Report) -> str:
    """A summary to paste into a bug report: the table, then why rows failed or were skipped."""
    counts = report.counts()
    lines = [
        f"### `{report.command}` on {report.device}{' (--quick)' if report.quick else ''}",
        "",
        f"{'OK' if report.ok else 'FAILED'}: {counts[PASS]} passed, {counts[FAIL]} failed, "
        f"{counts[SKIPPED]} skipped in {report.seconds:.0f} s; Python {platform.python_version()}; "
        f"{platform.platform()}",
        "",
        "| check | status | figure |",
        "|---|---|---|",
    ]
    lines += [f"| {_cell(r.name)} | {r.status} | {_cell(r.figure)} |" for r in report.rows]
    notes = [r for r in report.rows if r.status != PASS]
    if notes:
        lines += ["", "<details><summary>why rows failed or were skipped</summary>", ""]
        for r in notes:
            lines.append(f"- **{r.name}** ({r.status}): " + "; ".join(_cell(x) for x in _explanation(r)))
        lines += ["", "</details>"]
    return "\n".join(lines) + "\n"
