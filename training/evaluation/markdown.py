"""Markdown tables of percentages, shared by the evaluation report and the ground-truth benchmark's summary."""

from collections.abc import Iterable, Sequence


def percent(value: float | None) -> str:
    """A rate in [0, 1] as a percentage with one decimal, "n/a" when undefined."""
    return "n/a" if value is None else f"{100 * value:.1f}"


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """The lines of a markdown table: the header, its separator, then one line per row of cells."""
    return [_row(header), "|---" * len(header) + "|", *(_row(cells) for cells in rows)]


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"
