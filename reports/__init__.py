"""Leaderboard page, figures and exports, rendered from a run's results store (never by running an attack).

``write_report(run_dir)`` writes ``leaderboard.html``, ``deviation_vs_epsilon.png`` and ``results.csv``.
"""

from medrobust.reports.leaderboard import (
    deviation_figure,
    figure_png,
    format_epsilon,
    leaderboard_table,
    render_page,
    write_report,
)

__all__ = ["deviation_figure", "figure_png", "format_epsilon", "leaderboard_table", "render_page", "write_report"]
