"""Reports: a self-contained HTML file, terminal tables and a shared figure style."""

from poisonlab.report.html import (
    Section,
    Table,
    as_section,
    as_table,
    format_value,
    render_html,
    rich_table,
    write_html_report,
)
from poisonlab.report.style import COLORS, new_figure, save_figure

__all__ = [
    "COLORS",
    "Section",
    "Table",
    "as_section",
    "as_table",
    "format_value",
    "new_figure",
    "render_html",
    "rich_table",
    "save_figure",
    "write_html_report",
]
