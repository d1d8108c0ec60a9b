"""``medrobust export``: a run's results as a paper needs them, from its store (nothing here runs an attack).

Into one folder: the headline table and the budget pivot as LaTeX (booktabs) and Markdown, the figure as PNG, SVG
and PDF, the per-subject rows as CSV, and one JSON record per model in RobustBench's spirit (model, threat model,
clean and robust metrics, evaluation settings, environment). Every user text is escaped for where it goes, and no
absolute path is written (they are made relative to the run folder).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pandas as pd

from medrobust.errors import MedrobustError
from medrobust.reports.leaderboard import (
    HEADLINE_LABELS,
    at_budget,
    budget_label,
    budgets_of,
    deviation_figure,
    headline_table,
    leaderboard_table,
    literal_text,
    merged_stores,
    relative_paths,
    spreadsheet_safe,
)
from medrobust.results.store import ResultStore

# LaTeX's special characters, each as text mode writes it literally.
_LATEX = {"\\": r"\textbackslash{}", "{": r"\{", "}": r"\}", "$": r"\$", "&": r"\&", "#": r"\#", "^": r"\^{}",
          "_": r"\_", "~": r"\textasciitilde{}", "%": r"\%", "<": r"\textless{}", ">": r"\textgreater{}"}
_LATEX_PATTERN = re.compile("|".join(re.escape(char) for char in _LATEX))
FIGURE_FORMATS = ("png", "svg", "pdf")


def latex_escape(text: object) -> str:
    """``text`` as LaTeX text mode prints it literally (labels are the user's free text)."""
    return _LATEX_PATTERN.sub(lambda match: _LATEX[match.group(0)], str(text))


def markdown_escape(text: object) -> str:
    """``text`` safe inside a Markdown table cell: pipes, backslashes, emphasis and HTML characters escaped."""
    text = re.sub(r"([\\|*_`\[\]<>#])", r"\\\1", str(text))
    return text.replace("\n", " ")


def _number(value: object) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"


def _rows(frame: pd.DataFrame, columns: list[tuple[str, str]], with_interval: bool) -> list[list[str]]:
    """Each row of ``frame`` as texts: text columns as they are, numbers to two decimals, with an interval
    [low, high] from ``<column>_ci_low``/``_ci_high`` where ``with_interval`` and the row has one."""
    rows = []
    for _, row in frame.iterrows():
        texts = []
        for column, kind in columns:
            value = row.get(column)
            if kind == "text":
                texts.append(str(value))
                continue
            text = _number(value)
            low, high = row.get(f"{column}_ci_low"), row.get(f"{column}_ci_high")
            if with_interval and text != "–" and low is not None and not pd.isna(low) and not pd.isna(high):
                text += f" [{low:.2f}, {high:.2f}]"
            texts.append(text)
        rows.append(texts)
    return rows


def latex_table(headers: list[str], rows: list[list[str]], caption: str) -> str:
    """A booktabs tabular, every cell escaped."""
    spec = "l" * sum(1 for _ in headers)
    lines = [r"\begin{table}[t]", r"\centering", f"\\caption{{{latex_escape(caption)}}}",
             f"\\begin{{tabular}}{{{spec}}}", r"\toprule", " & ".join(latex_escape(h) for h in headers) + r" \\",
             r"\midrule"]
    lines += [" & ".join(latex_escape(cell) for cell in row) + r" \\" for row in rows]
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(markdown_escape(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(markdown_escape(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def pivot_table(table: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Mean |deviation| per model, threat model, objective and attack (rows) at each budget (columns), as the
    README's tables: from a `leaderboard_table`."""
    budgets = budgets_of(table)
    labels = [budget_label(*budget) for budget in budgets]
    rows = []
    for key, group in table.groupby(["model", "threat_model", "objective", "attack"], sort=False):
        row = dict(zip(("model", "threat_model", "objective", "attack"), key, strict=True))
        for (norm, unit, epsilon), label in zip(budgets, labels, strict=True):
            at = at_budget(group, (norm, unit, epsilon))
            if not at.empty:
                row[label] = at["mean_abs_deviation"].mean()
                for suffix in ("_ci_low", "_ci_high"):
                    if f"mean_abs_deviation{suffix}" in at:
                        row[f"{label}{suffix}"] = at[f"mean_abs_deviation{suffix}"].iloc[0]
        rows.append(row)
    return pd.DataFrame.from_records(rows), labels


def model_records(table: pd.DataFrame, headline: pd.DataFrame, budgets: list[str], source: str,
                  runs: list[dict]) -> dict[str, dict]:
    """One record per model: what it is, its clean and worst-case numbers per threat model and objective, how they
    were measured (attack, subjects, seed), and the latest run's environment."""
    environment = runs[-1]["environment"] if runs else {}
    records: dict[str, dict] = {}
    for _, row in headline.iterrows():
        model_cells = table[table["model"] == row["model"]]
        first = model_cells.iloc[0]
        record = records.setdefault(str(row["model"]), {
            "model": str(row["model"]), "architecture": str(first.get("model_name", "")),
            "source": str(first.get("checkpoint", "")), "weights_sha256": first.get("checkpoint_sha256"),
            "evaluation": {"worst_case_over": source, "split": first.get("split"), "subjects": int(first["n"])
                           if "n" in first and not pd.isna(first["n"]) else None, "seed": first.get("seed"),
                           "attacks": sorted(set(model_cells["attack"]))},
            "results": [], "environment": environment})
        measure = HEADLINE_LABELS[row["objective"]]
        record["results"].append({
            "threat_model": row["threat_model"], "objective": row["objective"], "measure": measure,
            "clean_mae": row["clean_mae"], "rank": int(row["rank"]),
            "worst_case": {label: row[label] for label in budgets if label in row and not pd.isna(row[label])},
            "reliability": row["checks"] or "passed"})
    return records


def export(run_dirs: list[Path], folder: Path) -> list[Path]:
    """Write the export set of the stores in ``run_dirs`` (merged, as `medrobust report` merges them) into
    ``folder``; returns the files written."""
    cells, runs, source_text = merged_stores(run_dirs)
    table = leaderboard_table(cells, source_text)
    if table.empty:
        raise MedrobustError(f"{source_text}: no finished cell to export; run `medrobust run` first")
    headline, budgets, source = headline_table(table)
    pivot, pivot_budgets = pivot_table(table)
    written: list[Path] = []
    try:
        folder.mkdir(parents=True, exist_ok=True)

        def write(name: str, text: str) -> None:
            (folder / name).write_text(text, encoding="utf-8")
            written.append(folder / name)

        headers = ["rank", "model", "threat model", "objective", "clean MAE (y)"] + budgets + ["checks"]
        columns = [("rank", "text"), ("model", "text"), ("threat_model", "text"), ("objective", "text"),
                   ("clean_mae", "years")] + [(label, "years") for label in budgets]
        rows = [texts + ["flagged" if checks else "ok"] for texts, checks in
                zip(_rows(headline, columns, True), headline["checks"], strict=True)]
        caption = (f"Worst case over {'the ensemble, per subject' if source == 'ensemble' else 'the attacks'} "
                   f"at each budget, years; [95 % bootstrap interval]; ranked at {headline.attrs['standard']}.")
        write("headline.tex", latex_table(headers, rows, caption))
        write("headline.md", markdown_table(headers, rows))
        pivot_headers = ["model", "threat model", "objective", "attack"] + pivot_budgets
        pivot_columns = [("model", "text"), ("threat_model", "text"), ("objective", "text"), ("attack", "text")] + [
            (label, "years") for label in pivot_budgets]
        pivot_rows = _rows(pivot, pivot_columns, False)
        write("pivot.tex", latex_table(pivot_headers, pivot_rows, "Mean |deviation| in years per attack and budget."))
        write("pivot.md", markdown_table(pivot_headers, pivot_rows))
        figure = deviation_figure(table)
        if figure is not None:
            literal_text(figure)
            for extension in FIGURE_FORMATS:
                path = folder / f"deviation_vs_epsilon.{extension}"
                figure.savefig(path, format=extension, dpi=200)
                written.append(path)
        samples = []
        for run_dir in run_dirs:
            with ResultStore(run_dir, create=False) as store:
                samples.append(store.samples())
        per_subject = pd.concat(samples, ignore_index=True).drop_duplicates(["cell_id", "subject"])
        spreadsheet_safe(per_subject).to_csv(folder / "samples.csv", index=False)
        written.append(folder / "samples.csv")
        models = folder / "models"
        models.mkdir(exist_ok=True)
        for label, record in model_records(table, headline, budgets, source, runs).items():
            safe = re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("._")[:80] or "model"
            path, number = models / f"{safe}.json", 1
            while path in written:  # two labels that make the same file name
                number += 1
                path = models / f"{safe}-{number}.json"
            path.write_text(json.dumps(relative_paths(record, folder.resolve()), indent=2, default=str) + "\n")
            written.append(path)
    except OSError as err:
        raise MedrobustError(f"cannot write the export into {folder} ({err}); choose another folder") from err
    return written
