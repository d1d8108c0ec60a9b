"""The leaderboard: one self-contained HTML page, its figure and a CSV, rendered from a run's results store.

The page is a pure function of the store (style.md: results as data, the page rendered from them by a template);
nothing here runs an attack. Data preparation (`leaderboard_table`, `deviation_figure`) is kept apart from
rendering (`render_page`), and `write_report` ties them together.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import jinja2
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from medrobust.errors import MedrobustError
from medrobust.results.examples import VIEWS, read_examples
from medrobust.results.metrics import OBJECTIVE_STRENGTH
from medrobust.results.reliability import CHECKS, declared_roles
from medrobust.results.store import STORE_FILENAME, ResultStore
from medrobust.vocabulary import AGE_BIN_KEYS, AGE_BIN_LABELS, DEFAULT_EXTRACTOR, NORMS, THREAT_MODELS

PAGE_FILENAME = "leaderboard.html"
FIGURE_FILENAME = "deviation_vs_epsilon.png"
CSV_FILENAME = "results.csv"

# Spec keys without which a cell cannot be placed on the page.
REQUIRED_SPEC = ("model", "attack", "norm", "epsilon", "unit", "threat_model", "objective")
# The leaderboard's order: model, attack, norm (l-inf, l2, l0 as in the paper and the figure, then any other
# alphabetically), epsilon; the remaining keys only make it total.
SORT_ORDER = ("model", "attack", "norm", "epsilon", "unit", "threat_model", "objective", "seed", "id")
# Spec keys that place a cell in the threat-model comparison: every key of a cell's identity but its threat model.
COMPARISON_KEYS = ("model", "attack", "params", "norm", "epsilon", "unit", "objective", "split", "count", "seed")
# Say how a cell went rather than what it measured: constant over done cells, so left out of the CSV.
BOOKKEEPING = ("status", "error")
# Integer fields; a failed cell's missing metrics turn them float in the store's mixed frame.
COUNT_FIELDS = ("n", *(f"n_{key}" for key in AGE_BIN_KEYS), "forward", "backward", "steps", "count", "seed")
UNIT_LABELS = {"abs": "intensity units", "range": "fraction of image range", "std": "image standard deviations"}

# (column, header, format) of the tables; each starts with what identifies a cell.
_CELL_COLUMNS = (("model", "model", "text"), ("attack", "attack", "text"), ("norm", "norm", "text"),
                 ("epsilon", "epsilon", "epsilon"), ("threat_model", "threat model", "text"),
                 ("objective", "objective", "text"))
LEADERBOARD_COLUMNS = _CELL_COLUMNS + (
    ("clean_mae", "clean MAE (y)", "years"), ("adversarial_mae", "adversarial MAE (y) [95 % CI]", "years_ci"),
    ("mean_abs_deviation", "mean |deviation| (y) [95 % CI]", "years_ci"), ("success_5y", "success@5y", "percent"),
    ("mean_psnr", "PSNR (dB)", "decibels"), ("mean_ssim", "SSIM", "ssim"),
    ("seconds", "runtime (s)", "seconds"), ("reliability", "checks", "checks"))
# A median-smoothed model's l2 cells: what the attack reached beside what the certificate guarantees.
CERTIFIED_COLUMNS = _CELL_COLUMNS + (
    ("clean_mae", "clean MAE (y)", "years"), ("mean_abs_deviation", "empirical mean |deviation| (y)", "years_ci"),
    ("certified_max_deviation", "certified worst |deviation| (y)", "years"),
    ("certified_within_1y", "certified within 1 y", "percent"),
    ("certified_within_5y", "certified within 5 y", "percent"), ("abstained", "abstained", "count"),
    ("certificate_beaten", "beaten", "count"))
AGE_BIN_COLUMNS = _CELL_COLUMNS + tuple((f"abs_mean_deviation_{key}", f"{label} y", "years")
                                        for key, label in zip(AGE_BIN_KEYS, AGE_BIN_LABELS, strict=True))


def _rank(value: object, order: tuple[str, ...]) -> tuple[int, str]:
    """Sort key of a value that has a fixed order: its place in ``order``, then any other value alphabetically."""
    return (order.index(value), "") if value in order else (len(order), str(value))


def norm_rank(norm: str) -> tuple[int, str]:
    """Sort key of a budget norm: l-inf, l2, l0 (the paper's order, as in the figure), then any other norm."""
    return _rank(norm, NORMS)


def _sort_key(column: pd.Series) -> pd.Series:
    """``sort_values``' key: norms by `norm_rank`, every other column as it is."""
    if column.name != "norm":
        return column
    return column.map(lambda norm: "{} {}".format(*norm_rank(norm)))


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _as_json(value: object) -> object:
    """A dict (an attack's params) as sorted JSON text; anything else as it is."""
    return json.dumps(value, sort_keys=True) if isinstance(value, dict) else value


def format_ssim(value: float) -> str:
    """An SSIM with two significant digits of 1 - SSIM (at least three decimals): 0.980, 0.99912, 0.9999955; an
    unchanged image's 1 as 1. Attacks at the paper's budgets leave SSIM within 1e-5 of 1, where a fixed number of
    decimals would print 1.000 for every cell."""
    if value >= 1:
        return f"{value:g}"
    decimals = min(12, max(3, math.ceil(-math.log10(1 - value)) + 1))
    return f"{value:.{decimals}f}"


def format_epsilon(value: float) -> str:
    """An epsilon as a reader writes it: 0.5, 2 or 0.01 plain; 5e-04 or 1.5e-03 in scientific notation."""
    if value == 0 or 0.01 <= abs(value) < 1e4:
        return f"{value:g}"
    mantissa, exponent = f"{value:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{exponent}"


def fired_checks(reasons: str) -> str:
    """The names of the reliability checks that fired, from their reasons joined by "; " (each reason starts
    with its check's name, see medrobust.results.reliability): "flagged: black-box, unbounded"."""
    names = [name for name in CHECKS if f"{name}: " in reasons]
    return "flagged: " + ", ".join(names) if names else "flagged"


_FORMATS = {
    "text": str,
    "epsilon": format_epsilon,
    "years": lambda value: f"{value:.2f}",
    "years_ci": lambda value: f"{value:.2f}",  # the interval is added from the row (`_table_cell`)
    "decibels": lambda value: f"{value:.1f}",
    "ssim": format_ssim,
    "percent": lambda value: f"{100 * value:.0f} %",
    "seconds": lambda value: f"{value:.1f}",
    "checks": lambda reasons: fired_checks(reasons) if reasons else "ok",
    "rank": lambda value: f"{int(value)}",
    "count": lambda value: f"{int(value):,}",
}


def leaderboard_table(cells: pd.DataFrame, source: str | Path = STORE_FILENAME) -> pd.DataFrame:
    """The done cells of a store's ``cells()`` frame, one row each, in leaderboard order (model, attack, norm,
    epsilon, then the rest of the spec), with ``params`` as a JSON string and counts as integers. Without a done
    cell: no rows, only the spec columns the page needs.

    ``source`` names the store in the error raised when a done cell lacks a spec key the page needs.
    """
    if cells.empty or "status" not in cells:
        return pd.DataFrame(columns=list(REQUIRED_SPEC))
    done = cells[cells["status"] == "done"].drop(columns=[c for c in BOOKKEEPING if c in cells])
    if done.empty:
        return pd.DataFrame(columns=list(REQUIRED_SPEC))
    absent = [key for key in REQUIRED_SPEC if key not in done]
    if absent:
        raise MedrobustError(f"{source}: its cells have no {absent[0]!r} field; was it written by `medrobust run`?")
    if "extractor" in done:  # a `recomputed` cell says how its features were measured, unless by the default
        named = done["extractor"].notna() & (done["extractor"] != DEFAULT_EXTRACTOR)
        done.loc[named, "threat_model"] = done.loc[named, "threat_model"] + " (" + done.loc[named, "extractor"] + ")"
    done = done.sort_values([key for key in SORT_ORDER if key in done], kind="stable", ignore_index=True,
                            key=_sort_key)
    counts = [key for key in COUNT_FIELDS if key in done and done[key].notna().all()]
    done[counts] = done[counts].astype("int64")
    for column in ("params", "model_card"):  # nested values as JSON text, so the table and the CSV stay flat
        if column in done:
            done[column] = done[column].map(_as_json)
    if "reliability" in done:  # the reliability checks' reasons, one text ("" when the cell passed them)
        done["reliability"] = done["reliability"].map(lambda reasons: "; ".join(reasons) if reasons else "")
    return done


# What a headline number is called, per objective (the metric and its sign are ``OBJECTIVE_STRENGTH``'s: the
# worst case is the largest strength, the most robust model the smallest).
HEADLINE_LABELS = {"error": "robust MAE (y)", "deviation": "worst-case |deviation| (y)",
                   "older": "worst-case shift up (y)", "younger": "worst-case shift down (y)"}


def budgets_of(cells: pd.DataFrame) -> list[tuple[str, str, float]]:
    """The budgets (norm, unit, epsilon) of ``cells``, in the page's order: l-inf, l2, l0, then unit and epsilon."""
    return sorted(set(zip(cells["norm"], cells["unit"], cells["epsilon"], strict=True)),
                  key=lambda b: (norm_rank(b[0]), b[1], b[2]))


def budget_label(norm: str, unit: str, epsilon: float) -> str:
    """A budget as the tables' headers write it: ``linf 2e-03 of range``, ``l0 25``."""
    units = {"range": "of range", "std": "std", "abs": "abs"}
    return f"{norm} {format_epsilon(epsilon)}" + ("" if norm == "l0" else f" {units.get(unit, unit)}")


def headline_table(table: pd.DataFrame, roles: dict[str, tuple[str, str]] | None = None) -> tuple[pd.DataFrame,
                                                                                                   list[str], str]:
    """One row per model, threat model and objective, ranked: the worst case over attacks at each budget of the
    run. From a `leaderboard_table`. Where the run has ``ensemble`` cells (an attack declaring role ``ensemble``)
    the worst case is the ensemble's, per subject; else the strongest single attack's mean per budget (a
    weaker bound: say so). Returns (rows, the budget columns in order, the source: "ensemble" or "strongest
    attack"); each budget column holds the objective's measure (``HEADLINE_LABELS``), with ``<column>_ci_low``
    and ``_ci_high`` where the cell has an interval. Rows are ranked within each objective by the standard budget
    (the largest l-inf budget, else the largest of the first norm), the most robust (smallest) first; ``checks``
    counts the row's cells the reliability checks flagged, over every attack."""
    empty = pd.DataFrame(columns=["rank", "model", "threat_model", "objective", "clean_mae", "checks"])
    table = table[table["objective"].isin(list(OBJECTIVE_STRENGTH))] if not table.empty else table
    if table.empty:
        return empty, [], ""
    if roles is None:
        roles = declared_roles(set(table["attack"]))
    ensembles = [name for name, (role, _) in roles.items() if role == "ensemble"]
    source = "ensemble" if table["attack"].isin(ensembles).any() else "strongest attack"
    chosen = table[table["attack"].isin(ensembles)] if source == "ensemble" else table
    budgets = budgets_of(chosen)
    labels = [budget_label(*budget) for budget in budgets]
    linf = [label for budget, label in zip(budgets, labels, strict=True) if budget[0] == "linf"]
    standard = (linf or [label for budget, label in zip(budgets, labels, strict=True)
                         if budget[0] == budgets[0][0]])[-1]
    rows = []
    for (model, threat_model, objective), group in table.groupby(["model", "threat_model", "objective"],
                                                                 sort=False):
        metric, sign = OBJECTIVE_STRENGTH[objective]
        flagged = group[group.get("reliability", pd.Series("", index=group.index)).astype(bool)]
        row = {"model": model, "threat_model": threat_model, "objective": objective,
               "clean_mae": group["clean_mae"].mean(),
               "model_name": group["model_name"].iloc[0] if "model_name" in group else "",
               "checks": "; ".join(f"{cell['attack']} {budget_label(cell['norm'], cell['unit'], cell['epsilon'])}: "
                                   f"{cell['reliability']}" for _, cell in flagged.iterrows()),
               "flagged": len(flagged)}
        picks = group[group["attack"].isin(ensembles)] if source == "ensemble" else group
        for (norm, unit, epsilon), label in zip(budgets, labels, strict=True):
            at = at_budget(picks, (norm, unit, epsilon))
            if at.empty:
                continue
            best = at.loc[(sign * at[metric]).idxmax()]
            row[label] = sign * best[metric]
            for suffix in ("_ci_low", "_ci_high"):
                if f"{metric}{suffix}" in best and not _missing(best[f"{metric}{suffix}"]):
                    row[f"{label}{suffix}"] = sign * best[f"{metric}{suffix}"]
            if sign < 0 and f"{label}_ci_low" in row:  # negated: the interval's ends swap
                row[f"{label}_ci_low"], row[f"{label}_ci_high"] = row[f"{label}_ci_high"], row[f"{label}_ci_low"]
        rows.append(row)
    frame = pd.DataFrame.from_records(rows)
    if standard not in frame:
        frame[standard] = math.nan
    frame = frame.sort_values(["objective", standard], kind="stable", na_position="last", ignore_index=True)
    frame.insert(0, "rank", frame.groupby("objective").cumcount() + 1)
    frame.attrs["standard"] = standard
    frame.attrs["budgets"] = dict(zip(labels, budgets, strict=True))
    frame.attrs["cells"] = chosen  # the cells the worst case is taken from (the ensemble's, or every attack's)
    return frame, labels, source


def at_budget(cells: pd.DataFrame, budget: tuple[str, str, float]) -> pd.DataFrame:
    """The cells of ``cells`` at ``budget`` (norm, unit, epsilon)."""
    norm, unit, epsilon = budget
    return cells[(cells["norm"] == norm) & (cells["unit"] == unit) & (cells["epsilon"] == epsilon)]


def epsilon_axis(ax, epsilons: list[float], norm: str, unit: str) -> str:
    """An epsilon axis as every figure draws it: logarithmic where all its epsilons are > 0 (budgets are usually
    geometric, the paper's 5e-4, 1e-3, 2e-3), ticks at the budgets themselves labelled as the leaderboard writes
    them; returns the axis label (voxels for l0, else the unit)."""
    epsilons = sorted(epsilons)
    if epsilons[0] > 0 and len(epsilons) > 1:
        ax.set_xscale("log")
    ax.set_xticks(epsilons, [format_epsilon(e) for e in epsilons])
    ax.minorticks_off()
    return f"epsilon ({'voxels' if norm == 'l0' else UNIT_LABELS.get(unit, unit)})"


def figure_legend(figure: Figure, ax) -> Figure:
    """One legend for the whole figure, outside the panels, taken from ``ax``'s (None when that panel had no
    finite value to draw: then none)."""
    legend = ax.get_legend()
    if legend is not None:
        figure.legend(legend.legend_handles, [text.get_text() for text in legend.get_texts()],
                      loc="outside right upper")
        legend.remove()
    return figure


def robustness_figure(headline: pd.DataFrame) -> Figure | None:
    """The robustness curve: the headline's worst case against epsilon, one line per model (and threat model),
    one panel per norm and objective. None without a headline."""
    budgets = headline.attrs.get("budgets", {})
    records = [{"model": row["model"], "threat model": row["threat_model"], "norm": budgets[label][0],
                "unit": budgets[label][1], "epsilon": budgets[label][2], "objective": row["objective"],
                "value": row[label]} for _, row in headline.iterrows() for label in budgets
               if label in row and not _missing(row[label])]
    if not records:
        return None
    data = pd.DataFrame.from_records(records)
    data["line"] = data["model"].astype(str) + (" / " + data["threat model"].astype(str)
                                                if data["threat model"].nunique() > 1 else "")
    panels = sorted(set(zip(data["norm"], data["unit"], data["objective"], strict=True)),
                    key=lambda p: (norm_rank(p[0]), p[1], p[2]))
    lines = sorted(data["line"].unique())
    figure = Figure(figsize=(4.2 * len(panels) + 2.4, 3.4), layout="constrained")
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, (norm, unit, objective) in zip(axes, panels, strict=True):
        panel = data[(data["norm"] == norm) & (data["unit"] == unit) & (data["objective"] == objective)]
        sns.lineplot(data=panel, x="epsilon", y="value", hue="line", hue_order=lines, marker="o", errorbar=None,
                     ax=ax, legend=ax is axes[0], palette=sns.color_palette("colorblind", len(lines)))
        ax.set(title=f"{norm}, objective {objective}", xlabel=epsilon_axis(ax, list(panel["epsilon"].unique()),
                                                                          norm, unit),
               ylabel=HEADLINE_LABELS[objective])
    return figure_legend(figure, axes[0])


def age_bin_figure(headline: pd.DataFrame) -> Figure | None:
    """The paper's figure by age: |mean deviation| per TRUE-age bin at the standard budget, one bar per model,
    one panel per threat model, from the cells the headline's worst case comes from (the strongest of them per
    model). None where those cells have no age bins."""
    cells, standard = headline.attrs.get("cells"), headline.attrs.get("standard")
    budget = headline.attrs.get("budgets", {}).get(standard)
    if cells is None or budget is None or f"abs_mean_deviation_{AGE_BIN_KEYS[0]}" not in cells:
        return None
    at = at_budget(cells, budget)
    records = []
    for (model, threat_model), group in at.groupby(["model", "threat_model"], sort=False):
        strongest = group.loc[group["mean_abs_deviation"].idxmax()]
        records += [{"model": model, "threat model": threat_model, "true age (y)": label,
                     "|mean deviation| (y)": strongest[f"abs_mean_deviation_{key}"]}
                    for key, label in zip(AGE_BIN_KEYS, AGE_BIN_LABELS, strict=True)]
    data = pd.DataFrame.from_records(records).dropna()
    if data.empty:
        return None
    threat_models = sorted(data["threat model"].unique(), key=lambda t: _rank(t, THREAT_MODELS))
    models = sorted(data["model"].astype(str).unique())
    figure = Figure(figsize=(4.6 * len(threat_models) + 2.4, 3.4), layout="constrained")
    axes = figure.subplots(1, len(threat_models), squeeze=False, sharey=True)[0]
    for ax, threat_model in zip(axes, threat_models, strict=True):
        sns.barplot(data=data[data["threat model"] == threat_model], x="true age (y)", y="|mean deviation| (y)",
                    hue="model", hue_order=models, order=list(AGE_BIN_LABELS), errorbar=None, ax=ax,
                    legend=ax is axes[0], palette=sns.color_palette("colorblind", len(models)))
        ax.set(title=f"{threat_model}, {standard}")
    return figure_legend(figure, axes[0])


def _comparable(key: str, value: object) -> object:
    """A spec value as the threat-model comparison matches it: an attack's params (a dict or its JSON text) without
    the threat model they name."""
    if key != "params":
        return value
    params = json.loads(value) if isinstance(value, str) else value
    return {name: setting for name, setting in params.items() if name != "threat_model"}


def threat_model_table(table: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """The threat models side by side: from a `leaderboard_table`, one row per cell identity but its threat model
    (the `COMPARISON_KEYS` it has), with each threat model's mean |deviation| and its interval in the columns
    ``<threat model>``, ``<threat model>_ci_low`` and ``_ci_high`` (NaN where that threat model was not run, e.g.
    for a model without context features). Returns (rows in leaderboard order, threat models in the order
    fixed, perturbed, recomputed, then any other). No rows when the table holds fewer than two threat models.

    Cells that share an identity and a threat model (the same cell in two stores' runs) get rows of their own
    rather than being averaged."""
    present = list(dict.fromkeys(table.get("threat_model", [])))
    threat_models = sorted(present, key=lambda threat_model: _rank(threat_model, THREAT_MODELS))
    keys = [key for key in COMPARISON_KEYS if key in table]
    columns = keys + [f"{t}{suffix}" for t in threat_models for suffix in ("", "_ci_low", "_ci_high")]
    if len(threat_models) < 2:
        return pd.DataFrame(columns=columns), threat_models
    rows: dict[tuple, dict] = {}
    for _, cell in table.iterrows():
        identity = tuple(None if _missing(cell[key]) else _as_json(_comparable(key, cell[key])) for key in keys)
        occurrence = 0
        while cell["threat_model"] in rows.get((identity, occurrence), {}):
            occurrence += 1
        row = rows.setdefault((identity, occurrence), dict(zip(keys, identity, strict=True)))
        row[cell["threat_model"]] = cell.get("mean_abs_deviation")
        for suffix in ("_ci_low", "_ci_high"):
            row[f"{cell['threat_model']}{suffix}"] = cell.get(f"mean_abs_deviation{suffix}")
    return pd.DataFrame.from_records(list(rows.values()), columns=columns), threat_models


def deviation_figure(table: pd.DataFrame) -> Figure | None:
    """Mean |deviation| (years) vs epsilon, one line per model, one panel per attack x norm (and epsilon unit):
    the analogue of Li et al. 2020's figure. None when ``table`` (from `leaderboard_table`) is empty.

    An epsilon axis is logarithmic where all its epsilons are > 0, with ticks at the epsilons. Where cells also
    differ in threat model or objective, those set the line style, so no line averages over them.
    """
    if table.empty:
        return None
    data = table.assign(variant=table["threat_model"].astype(str) + " / " + table["objective"].astype(str))
    style = {"style": "variant", "markers": True} if data["variant"].nunique() > 1 else {"marker": "o"}
    models = sorted(data["model"].astype(str).unique())
    attacks = sorted(data["attack"].unique())
    # l-inf, l2, l0 (the paper's order), then any other norm.
    budgets = sorted(set(zip(data["norm"], data["unit"], strict=True)), key=lambda b: (norm_rank(b[0]), b[1]))
    panels = sorted(set(zip(data["attack"], data["norm"], data["unit"], strict=True)),
                    key=lambda p: (norm_rank(p[1]), p[2], p[0]))
    if len(panels) == len(attacks) * len(budgets):
        # Every attack at every norm: a grid like seaborn's relplot(row=attack, col=norm).
        place = {(a, n, u): (attacks.index(a), budgets.index((n, u))) for a, n, u in panels}
        rows, columns = len(attacks), len(budgets)
    else:  # attacks of their own norms: the panels in reading order, l-inf first, three to a row
        columns = min(3, len(panels))
        rows = -(-len(panels) // columns)
        place = {panel: divmod(i, columns) for i, panel in enumerate(panels)}
    figure = Figure(figsize=(4.2 * columns + 2.0, 3.4 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False)
    drawn = []
    for (attack, norm, unit), panel in sorted(data.groupby(["attack", "norm", "unit"]), key=lambda g: place[g[0]]):
        ax = axes[place[attack, norm, unit]]
        # errorbar=None: repeated cells (seeds) are averaged without a bootstrap band, so the figure is reproducible.
        sns.lineplot(data=panel, x="epsilon", y="mean_abs_deviation", hue="model", hue_order=models, errorbar=None,
                     legend=not drawn, ax=ax, palette=sns.color_palette("colorblind", len(models)), **style)
        ax.set(title=f"{attack}, {norm}", xlabel=epsilon_axis(ax, list(panel["epsilon"].unique()), norm, unit),
               ylabel="mean |deviation| (years)")
        drawn.append(ax)
    for ax in axes.flat:
        ax.set_visible(ax in drawn)  # an attack that lacks a norm leaves its place empty
    return figure_legend(figure, drawn[0])


def literal_text(figure: Figure) -> Figure:
    """``figure`` with every text drawn literally: labels are the user's free text, and matplotlib would parse a
    "$...$" in a model label as mathtext (and fail on an unknown macro such as "$\\nosuchmacro$")."""
    for text in figure.findobj(lambda artist: hasattr(artist, "set_parse_math")):
        text.set_parse_math(False)
    return figure


def figure_png(figure: Figure) -> bytes:
    """The figure as PNG bytes (rendered by Agg without pyplot, so no global backend is touched), its texts
    literal."""
    buffer = io.BytesIO()
    literal_text(figure).savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


@dataclass(frozen=True)
class _Cell:
    """One table cell: its text, the raw number it sorts by (None: sorts as text) and a hover title."""

    text: str
    value: float | None = None
    title: str = ""


def _image_metric_cell(row: pd.Series, column: str, kind: str) -> _Cell:
    """Mean PSNR or SSIM, with the median (and for PSNR the images left unchanged) on hover. A cell whose every
    image is unchanged has no finite PSNR to average: it shows infinity and sorts above every finite PSNR."""
    value, median = row.get(column), row.get(column.replace("mean_", "median_"))
    unchanged, count = row.get("n_unchanged"), row.get("n")
    if _missing(value):
        if column == "mean_psnr" and not _missing(unchanged) and unchanged > 0 and unchanged == count:
            return _Cell("∞", 1e308, "every image unchanged")
        return _Cell("–", math.nan)
    title = "" if _missing(median) else f"median {_FORMATS[kind](median)}"
    if column == "mean_psnr" and not _missing(unchanged) and unchanged > 0:
        title += f"; {int(unchanged)} of {int(count)} images unchanged (PSNR infinite, left out of the mean)"
    return _Cell(_FORMATS[kind](value), float(value), title)


def _table_cell(row: pd.Series, column: str, kind: str) -> _Cell:
    value = row.get(column)
    if kind in ("decibels", "ssim"):
        return _image_metric_cell(row, column, kind)
    if _missing(value):
        return _Cell("–", math.nan if kind != "text" else None)
    text = _FORMATS[kind](value)
    if column == "epsilon":
        unit = row.get("unit")
        return _Cell(f"{text} ({unit})", float(value), UNIT_LABELS.get(unit, str(unit)))
    if column == "attack":
        return _Cell(text, None, str(_as_json(row.get("params")) or ""))
    if column == "model":
        return _Cell(text, None, str(row.get("model_name") or ""))
    if kind == "years_ci":  # the point estimate, then its bootstrap interval where the cell has one
        low, high = row.get(f"{column}_ci_low"), row.get(f"{column}_ci_high")
        if _missing(low) or _missing(high):
            return _Cell(text, float(value))
        return _Cell(f"{text} [{low:.2f}, {high:.2f}]", float(value), "95 % bootstrap interval over subjects")
    if kind == "checks":  # hover for the reasons
        return _Cell(text, None, value or "passed every reliability check that applies (docs/running.md)")
    return _Cell(text, None if kind == "text" else float(value))


def _table(frame: pd.DataFrame, columns: tuple[tuple[str, str, str], ...]) -> dict:
    """What the template's table macro takes: the headers and, per row of ``frame``, its cells."""
    return {"headers": [header for _, header, _ in columns],
            "rows": [[_table_cell(row, column, kind) for column, _, kind in columns] for _, row in frame.iterrows()]}


def _flatten(mapping: dict, prefix: str = "") -> list[tuple[str, str]]:
    """Nested dicts (the environment's package versions) as (dotted key, text) pairs."""
    pairs = []
    for key, value in sorted(mapping.items()):
        if isinstance(value, dict):
            pairs.extend(_flatten(value, f"{prefix}{key}."))
        else:
            pairs.append((f"{prefix}{key}", "–" if value is None else str(value)))
    return pairs


def _summary(cells: pd.DataFrame, table: pd.DataFrame, runs: list[dict]) -> str:
    """One line: cells done and failed, subjects per cell, and when the latest run ran."""
    failed = int((cells["status"] == "failed").sum()) if "status" in cells else 0
    parts = [f"{len(table)} cells done, {failed} failed"]
    counts = sorted({int(n) for n in table.get("n", []) if not _missing(n)})
    if counts:
        splits = set(table.get("split", []))
        subjects = str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
        parts.append(f"{subjects} subjects per cell" + (f" from the {splits.pop()} split" if len(splits) == 1 else ""))
    if runs:
        latest = runs[-1]
        parts.append(f"latest run {latest['id']} started {latest['started_at']}, finished "
                     f"{latest['finished_at'] or 'not yet'}")
    return " · ".join(parts)


def model_cards(table: pd.DataFrame, headline: pd.DataFrame) -> pd.DataFrame:
    """One row per model of a `leaderboard_table`: what it is (architecture, source, weights hash, parameters,
    input contract), how it was trained and its clean test metrics (from its checkpoint's sidecar, where it has
    one: the runner records them per cell as ``model_card``), and its headline results across threat models."""
    rows = []
    for model, group in table.groupby("model", sort=False):
        first = group.iloc[0]
        raw = first.get("model_card")
        card = json.loads(raw) if isinstance(raw, str) and raw else {}
        training, test = card.get("training") or {}, card.get("test_metrics") or {}
        grid = card.get("input_shape")
        inputs = "–" if not grid else (f"{'x'.join(map(str, grid))} at {'x'.join(f'{v:g}' for v in card['voxel_size'])}"
                                       f" mm, {card.get('normalization')}" + (f", {card['features']} context features"
                                                                               if card.get("features") else ""))
        trained = "–"
        if training:
            parts = [f"{training.get('epochs')} epochs (best {training.get('best_epoch')})",
                     f"loss {training.get('loss')}", f"seed {training.get('seed')}"]
            if training.get("best_val_mae") is not None:
                parts.append(f"val MAE {training['best_val_mae']:.2f} y")
            defence = training.get("defence")
            if defence:
                parts.append(f"adversarially trained against {defence['attack']} ({defence['norm']} "
                             f"{defence['epsilon']:g} of range, {defence['steps']} steps, {defence['ratio']:g} of each "
                             f"batch, context {defence['threat_model']})")
            trained = ", ".join(parts)
        results = headline[headline["model"] == model] if "model" in headline else headline.iloc[0:0]
        standard = headline.attrs.get("standard", "")
        summary = "; ".join(f"{row['threat_model']} ({row['objective']}): rank {int(row['rank'])}, "
                            f"{row[standard]:.2f} y at {standard}" for _, row in results.iterrows()
                            if standard in row and not _missing(row[standard]))
        rows.append({"model": model, "architecture": first.get("model_name", "–"),
                     "source": first.get("checkpoint", "–"),
                     "weights": str(first.get("checkpoint_sha256") or "–")[:12],
                     "parameters": card.get("parameters", math.nan), "input": inputs, "trained": trained,
                     "test_mae": test.get("mae", math.nan), "test_n": test.get("n"), "results": summary or "–"})
    return pd.DataFrame.from_records(rows)


MODEL_CARD_COLUMNS = (("model", "model", "text"), ("architecture", "architecture", "text"),
                      ("source", "source", "text"), ("weights", "weights (sha256)", "text"),
                      ("parameters", "parameters", "count"), ("input", "input", "text"),
                      ("trained", "trained", "text"), ("test_mae", "clean test MAE (y, its sidecar)", "years"),
                      ("results", "headline results", "text"))


# The headline rows whose adversarial examples the page shows (the most robust first).
EXAMPLE_ROWS = 6


def example_figure(examples: list[dict]) -> Figure:
    """A cell's adversarial examples (``medrobust.results.examples.read_examples``): per subject (the median and
    the worst |deviation|) the clean slice, the attacked slice (on the clean one's grey scale) and the
    perturbation scaled to its own largest |value| (a diverging map, 0 grey), one row per view."""
    figure = Figure(figsize=(2.3 * 3 * len(examples), 2.2 * len(VIEWS) + 0.6), layout="constrained")
    axes = figure.subplots(len(VIEWS), 3 * len(examples), squeeze=False)
    for number, example in enumerate(examples):
        largest = max(float(abs(adversarial - clean).max()) for clean, adversarial in example["views"].values())
        for row, view in enumerate(VIEWS):
            clean, adversarial = example["views"][view]
            low, high = float(clean.min()), float(clean.max())
            panels = ((clean, "gray", low, high, "clean"), (adversarial, "gray", low, high, "attacked"),
                      (adversarial - clean, "RdBu_r", -largest or -1, largest or 1,
                       f"perturbation (±{largest:.3g})"))
            for column, (image, cmap, vmin, vmax, label) in enumerate(panels):
                ax = axes[row, 3 * number + column]
                ax.imshow(image.T, cmap=cmap, vmin=vmin, vmax=vmax, origin="lower", interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if row == 0:
                    ax.set_title(label, fontsize=9)
                if column == 0:
                    ax.set_ylabel(view, fontsize=9)
        figure.text((number + 0.5) / len(examples), 1.0, f"{example['which']}: {example['subject']}",
                    ha="center", va="bottom", fontsize=10)
    return figure


def example_panels(headline: pd.DataFrame, run_dirs: list[Path]) -> list[dict]:
    """For the first headline rows, the cell their worst case comes from at the standard budget and its examples
    drawn (PNG) with each subject's facts; rows whose cell has no examples (2D images, older runs) are left out."""
    cells, standard = headline.attrs.get("cells"), headline.attrs.get("standard")
    budget = headline.attrs.get("budgets", {}).get(standard)
    if cells is None or budget is None:
        return []
    panels = []
    for _, row in headline.head(EXAMPLE_ROWS).iterrows():
        at = at_budget(cells, budget)
        at = at[(at["model"] == row["model"]) & (at["threat_model"] == row["threat_model"])
                & (at["objective"] == row["objective"])]
        if at.empty:
            continue
        cell = at.loc[at["mean_abs_deviation"].idxmax()]
        examples = next((found for folder in run_dirs if (found := read_examples(folder, cell["id"]))), [])
        if not examples:
            continue
        facts = [f"{example['which']} subject {example['subject']}: true age {example['true_age']:.1f} y, predicted "
                 f"{example['clean_prediction']:.1f} y clean and {example['adversarial_prediction']:.1f} y "
                 f"attacked, PSNR {example['psnr']:.1f} dB, SSIM {format_ssim(example['ssim'])}"
                 for example in examples]
        panels.append({"title": f"{row['model']} ({row['threat_model']}, {row['objective']}): {cell['attack']} at "
                                f"{standard}", "facts": facts,
                       "png": base64.b64encode(figure_png(example_figure(examples))).decode("ascii")})
    return panels


def render_page(cells: pd.DataFrame, table: pd.DataFrame, runs: list[dict], figure: bytes | None,
                title: str = "medrobust leaderboard", figures: dict[str, bytes] | None = None,
                examples: list[dict] | None = None) -> str:
    """The HTML page for a store's ``cells()`` frame, its `leaderboard_table` and its ``runs()`` list, with the
    figure's PNG bytes (or None) inlined.

    Every value goes through Jinja2's autoescaping: model labels and error texts are the user's free text.
    """
    failed = cells[cells["status"] == "failed"] if "status" in cells else cells.iloc[0:0]
    comparison, threat_models = threat_model_table(table)
    comparison_columns = tuple(column for column in _CELL_COLUMNS if column[0] != "threat_model") + tuple(
        (threat_model, f"{threat_model}: mean |deviation| (y)", "years_ci") for threat_model in threat_models)
    headline, budgets, source = headline_table(table)
    headline_columns = (("rank", "rank", "rank"), ("model", "model", "text"),
                        ("threat_model", "threat model", "text"), ("objective", "objective", "text"),
                        ("clean_mae", "clean MAE (y)", "years")) + tuple(
        (label, label, "years_ci") for label in budgets) + (("checks", "checks", "checks"),)
    measures = sorted({HEADLINE_LABELS[objective] for objective in headline.get("objective", [])})
    latest = runs[-1] if runs else {"environment": {}, "config": {}}
    environment = jinja2.Environment(loader=jinja2.PackageLoader("medrobust.reports", "templates"), autoescape=True,
                                     undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    return environment.get_template("leaderboard.html.j2").render(
        title=title,
        summary=_summary(cells, table, runs),
        leaderboard=_table(table, LEADERBOARD_COLUMNS),
        headline=_table(headline, headline_columns),
        cards=_table(model_cards(table, headline), MODEL_CARD_COLUMNS) if not table.empty else {"rows": []},
        headline_source=source, headline_standard=headline.attrs.get("standard", ""),
        headline_measures=", ".join(measures),
        age_bins=_table(table, AGE_BIN_COLUMNS),
        certified=_table(table[table["certified_n"].notna()] if "certified_n" in table else table.iloc[0:0],
                         CERTIFIED_COLUMNS),
        threat_models=_table(comparison, comparison_columns),
        failed=_table(failed, _CELL_COLUMNS + (("error", "error", "text"),)),
        figure=base64.b64encode(figure).decode("ascii") if figure is not None else None,
        figures={name: base64.b64encode(png).decode("ascii") for name, png in (figures or {}).items()},
        examples=examples or [],
        environment=_flatten(latest["environment"]),
        config=json.dumps(latest["config"], indent=2, sort_keys=True, default=str) if latest["config"] else "",
    )


# An absolute path inside a text (a checkpoint, a dataset, a factory's file in an error): a "/" at the start or after
# a space, "=", a quote or an opening bracket (so neither "1/2", a URL nor "</b>"), then what a path is made of.
ABSOLUTE_PATH = re.compile(r"(?:^|(?<=[\s='\"(\[{]))/[^\s,;:'\"()\[\]{}<>]+")


def relative_paths(value: object, base: Path) -> object:
    """``value`` with every absolute path in its texts made relative to ``base`` (the run folder), through dicts,
    lists and DataFrames: a page or CSV for a double-blind supplement must not name the author's home folder."""
    if isinstance(value, str):
        return ABSOLUTE_PATH.sub(lambda match: os.path.relpath(match.group(0), base), value)
    if isinstance(value, dict):
        return {key: relative_paths(item, base) for key, item in value.items()}
    if isinstance(value, list):
        return [relative_paths(item, base) for item in value]
    if isinstance(value, pd.DataFrame):
        frame = value.copy()
        for column in frame.columns:
            if not pd.api.types.is_numeric_dtype(frame[column]):  # texts, whatever pandas' string dtype
                frame[column] = frame[column].map(lambda item: relative_paths(item, base))
        return frame
    return value


def merged_stores(run_dirs: list[Path]) -> tuple[pd.DataFrame, list[dict], str]:
    """The cells and runs of several run folders' stores as one: cells are content-addressed, so a cell in two
    stores is one row (the one finished last); runs in the order they started; a label naming several models told
    apart (`distinct_labels`). Each run folder's absolute paths are made relative to it first. Returns (cells,
    runs, the stores' paths for error messages)."""
    frames, runs, sources = [], [], []
    for run_dir in run_dirs:
        with ResultStore(run_dir, create=False) as store:
            cells, store_runs, source = store.cells(), store.runs(), store.path
        base = Path(run_dir).resolve()
        frames.append(relative_paths(cells, base))
        runs.extend(relative_paths(store_runs, base))
        sources.append(str(source))
    cells = pd.concat([frame for frame in frames if not frame.empty] or frames[:1], ignore_index=True)
    if len(run_dirs) > 1 and not cells.empty:
        done_first = cells.assign(_done=cells["status"] == "done").sort_values(
            ["_done", "finished_at"], kind="stable", na_position="first")
        cells = done_first.drop_duplicates("id", keep="last").drop(columns="_done").sort_index(ignore_index=True)
    runs.sort(key=lambda run: str(run.get("started_at")))
    return distinct_labels(cells), runs, ", ".join(sources)


# Spec keys that tell one model (with its data and setting) from another under the same label: two configs sharing
# one run folder, or a label reused for a retrained checkpoint, would otherwise give rows no reader can tell apart.
MODEL_KEYS = ("model_name", "model_source", "checkpoint_sha256", "data_fingerprint", "split", "count",
              "subjects_sha256", "seed", "precision", "batch_size", "brain_mask")


def _short(value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text[:7] if len(text) > 12 else text


def distinct_labels(cells: pd.DataFrame) -> pd.DataFrame:
    """``cells`` with a label that names several models (see MODEL_KEYS) told apart by what differs between them:
    ``cnn3d (count 50)`` and ``cnn3d (count 100)``, ``cnn3d (checkpoint 1a2b3c4)``."""
    keys = [key for key in MODEL_KEYS if key in cells]
    if cells.empty or "model" not in cells or not keys:
        return cells
    cells = cells.copy()
    variants = cells[keys].map(lambda value: json.dumps(value, sort_keys=True, default=str))
    for label, rows in cells.groupby("model", sort=False).groups.items():
        differing = [key for key in keys if variants.loc[rows, key].nunique() > 1]
        for row in rows if differing else []:
            parts = ", ".join(f"{key.removesuffix('_sha256')} {_short(cells.at[row, key])}" for key in differing)
            cells.at[row, "model"] = f"{label} ({parts})"
    return cells


# A text cell a spreadsheet would read as a formula (OWASP's CSV injection): it starts with one of these.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with every text cell that a spreadsheet would evaluate (``=1+1``, ``@SUM(...)``) prefixed with
    a single quote, as OWASP recommends for CSV exports; numbers are left as they are."""
    frame = frame.copy()
    for column in frame.columns:
        if not pd.api.types.is_numeric_dtype(frame[column]):
            frame[column] = frame[column].map(
                lambda value: f"'{value}" if isinstance(value, str) and value.startswith(FORMULA_STARTS) else value)
    return frame


def write_report(run_dir: str | Path | list, out: str | Path | None = None, only: set[str] | None = None) -> Path:
    """Render the results store in ``run_dir`` into ``out`` (default: ``run_dir``); returns the page's path.
    ``run_dir`` may be a list of run folders: their stores are merged (`merged_stores`; ``out`` is then
    required), for a lab's leaderboard built over months. ``only``: the ids of the cells to show (e.g. those a
    config plans), all by default.

    Writes ``leaderboard.html`` (self-contained: CSS, script and figure inline), ``deviation_vs_epsilon.png`` (the
    same figure; removed when no cell is done) and ``results.csv`` (the done cells, in leaderboard order). Every
    absolute path in them is made relative to ``run_dir`` (`relative_paths`). Raises
    MedrobustError when ``run_dir`` holds no store or the output folder cannot be written.
    """
    run_dirs = [Path(folder) for folder in (run_dir if isinstance(run_dir, list) else [run_dir])]
    if not run_dirs or (len(run_dirs) > 1 and out is None):
        raise MedrobustError("several run folders make one page: say where it goes with --out FOLDER")
    cells, runs, source = merged_stores(run_dirs)
    if only is not None and not cells.empty:
        cells = cells[cells["id"].isin(only)].reset_index(drop=True)
    table = leaderboard_table(cells, source)
    figure = deviation_figure(table)
    png = figure_png(figure) if figure is not None else None
    headline, _, _ = headline_table(table)
    figures = {name: figure_png(drawn) for name, drawn in (("robustness", robustness_figure(headline)),
                                                           ("age_bins", age_bin_figure(headline)))
               if drawn is not None}
    folder = Path(out) if out is not None else run_dirs[0]
    page = folder / PAGE_FILENAME
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if png is None:
            (folder / FIGURE_FILENAME).unlink(missing_ok=True)
        else:
            (folder / FIGURE_FILENAME).write_bytes(png)
        spreadsheet_safe(table).to_csv(folder / CSV_FILENAME, index=False)
        title = f"medrobust leaderboard: {', '.join(folder.resolve().name for folder in run_dirs)}"
        page.write_text(render_page(cells, table, runs, png, title, figures, example_panels(headline, run_dirs)),
                        encoding="utf-8")
    except OSError as err:
        raise MedrobustError(f"cannot write the report into {folder} ({err}); choose another output folder") from err
    return page
