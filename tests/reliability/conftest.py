"""Fixtures of the reliability suite, and its table of results.

``platform_factory(**kwargs)`` builds a ``tests.reliability.platform.Platform`` under the test's tmp dir (closed
at teardown, whatever happened). ``reliability_row`` is the test's ``ResultRow``: the scenario fills in its
numbers, the verdict comes from the test's outcome, and the session ends with the table printed and written to
``test-artifacts/reliability.md``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.reliability.platform import ROOT, Platform, ResultRow, scale

RESULTS = pytest.StashKey[list[ResultRow]]()
ARTIFACT = ROOT / "test-artifacts" / "reliability.md"
COLUMNS = ("scenario", "checked", "sent", "stored", "lost", "duplicated", "recover (s)", "scale", "verdict")


def pytest_configure(config: pytest.Config) -> None:
    config.stash[RESULTS] = []


@pytest.fixture
def platform_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Platform]]:
    made: list[Platform] = []

    def make(**kwargs: Any) -> Platform:
        # A short root: PostgreSQL's unix socket lives in its data dir and socket paths are limited to ~107 bytes.
        platform = Platform(tmp_path_factory.mktemp("plat"), **kwargs)
        made.append(platform)
        return platform

    yield make
    for platform in made:
        platform.close()


@pytest.fixture
def reliability_row(request: pytest.FixtureRequest) -> Iterator[ResultRow]:
    module = request.node.module
    name = module.__name__.rsplit(".", 1)[-1].removeprefix("test_")
    # A module of one scenario is named after its file; one of several adds the test's name.
    several = sum(1 for attr in vars(module) if attr.startswith("test_")) > 1
    row = ResultRow(scenario=f"{name}: {request.node.name.removeprefix('test_')}" if several else name)
    yield row
    call = getattr(request.node, "rep_call", None)
    if call is None:
        row.verdict = "error (setup)"
    elif call.passed:
        row.verdict = "survived"
    elif call.skipped:
        row.verdict = "skipped"
    else:
        row.verdict = "FAILED"
    request.config.stash[RESULTS].append(row)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return re.sub(r"\s+", " ", str(value)).replace("|", "/")


def render_table(rows: list[ResultRow]) -> list[str]:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        values = (row.scenario, row.checked, row.sent, row.stored, row.lost, row.duplicated,
                  row.recover_seconds, row.scale, row.verdict)  # fmt: skip
        lines.append("| " + " | ".join(_cell(v) for v in values) + " |")
    return lines


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    rows = config.stash.get(RESULTS, [])
    if not rows:
        return
    table = render_table(rows)
    terminalreporter.section("reliability suite")
    for line in table:
        terminalreporter.write_line(line)
    notes = [f"- {row.scenario}: {row.notes}" for row in rows if row.notes]
    for line in notes:
        terminalreporter.write_line(line)
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    text = [f"# Reliability suite ({scale()} scale, {stamp})", "", *table, ""]
    if notes:
        text += ["Notes:", "", *notes, ""]
    path = Path(ARTIFACT)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(text))
    terminalreporter.write_line(f"written to {path}")
