"""The leaderboard report: page, figure and CSV rendered from a synthetic results store, escaping, no external
resources, the empty and the missing store, and (where a browser is installed) sorting in a real browser."""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medrobust.errors import MedrobustError
from medrobust.reports import deviation_figure, format_epsilon, leaderboard_table, write_report
from medrobust.reports.leaderboard import format_ssim, threat_model_table
from medrobust.results.metrics import cell_metrics
from medrobust.results.store import ResultStore
from medrobust.vocabulary import AGE_BIN_LABELS

XSS = "<script>alert(1)</script>"
MODELS = {"cnn3d": "cnn3d", XSS: "hybrid"}  # label -> registered architecture
ATTACKS = ("fgsm", "pgd")
EPSILONS = {"linf": (1e-4, 5e-4, 1e-2), "l2": (0.5, 2.0)}
FAILURE = "RuntimeError: CUDA out of memory <b>boom</b> & more"
ENVIRONMENT = {"python": "3.11.2", "device_name": "test CPU", "git_commit": "abc123",
               "packages": {"torch": "2.3.0", "numpy": "1.26.4"}}
CONFIG = {"seed": 0, "dataset": {"path": "runs/demo/data", "builtin": True}}


def _cell(model: str, attack: str, norm: str, epsilon: float, seed: int, threat_model: str = "fixed",
          image_metrics: bool = True) -> tuple[dict, dict, list[dict]]:
    """Spec, metrics (from `cell_metrics`) and per-subject rows of one cell, with ages in every age bin; with
    ``image_metrics`` the rows carry l0, PSNR and SSIM (the first subject's image left unchanged)."""
    rng = np.random.default_rng(seed)
    true_age = np.array([8.0, 12.0, 20.0, 30.0, 45.0, 58.0, 70.0, 85.0])
    clean = true_age + rng.normal(0, 4, true_age.size)
    # Up to ~20 years at the largest epsilon of a norm, the CNN moving twice as far as the hybrid (as in the paper).
    shift = 5 * epsilon / max(EPSILONS.get(norm, [epsilon])) * (2 if MODELS.get(model, model) == "cnn3d" else 1)
    adversarial = clean + shift * (1 + rng.random(true_age.size))
    linf = np.full(true_age.size, epsilon)
    l2 = linf * 30
    columns = {"true_age": true_age, "clean_prediction": clean, "adversarial_prediction": adversarial,
               "deviation": adversarial - clean, "linf": linf, "l2": l2, "linf_rel": linf, "l2_rel": l2}
    if image_metrics:
        columns["l0"] = np.where(np.arange(true_age.size) == 0, 0, 1000 + rng.integers(0, 100, true_age.size))
        columns["psnr"] = np.where(columns["l0"] == 0, math.inf, -20 * np.log10(epsilon) + rng.normal(0, 1, 8))
        columns["ssim"] = np.where(columns["l0"] == 0, 1.0, 1 - epsilon * rng.uniform(0.5, 1.5, 8))
    metrics = {**cell_metrics(*(columns[key] for key in ("true_age", "clean_prediction", "adversarial_prediction",
                                                         "linf", "l2", "linf_rel", "l2_rel")),
                              **{key: columns[key] for key in ("l0", "psnr", "ssim") if key in columns}),
               "forward": 8, "backward": 8, "steps": 4, "attack_seconds": 0.5}
    spec = {"model": model, "model_name": MODELS.get(model, model),
            "checkpoint": f"runs/demo/models/{MODELS.get(model, model)}", "attack": attack,
            # An attack's params name its threat model too, as `Attack.params()` does.
            "params": {"steps": 4 if attack == "pgd" else 1, "threat_model": threat_model}, "norm": norm,
            "epsilon": epsilon, "unit": "range", "objective": "older", "threat_model": threat_model, "split": "test",
            "count": 8, "seed": 0, "device": "cpu"}
    samples = [{"subject": f"sub-{i:02d}", **{key: values[i].item() for key, values in columns.items()}}
               for i in range(true_age.size)]
    return spec, metrics, samples


def _leaderboard_order(cells: list[tuple[str, str, str, float]]) -> list[tuple[str, str, str, float]]:
    """(model, attack, norm, epsilon) in the leaderboard's order: norms l-inf, l2, l0 as in the paper."""
    return sorted(cells, key=lambda cell: (cell[0], cell[1], ("linf", "l2", "l0").index(cell[2]), cell[3]))


def _grid() -> list[tuple[str, str, str, float]]:
    """(model, attack, norm, epsilon) of every done cell, in reverse so that the report's sorting must order them."""
    grid = [(model, attack, norm, epsilon) for model in MODELS for attack in ATTACKS
            for norm, epsilons in EPSILONS.items() for epsilon in epsilons]
    return grid[::-1]


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory) -> Path:
    """A store with 2 models x 2 attacks x 2 norms x 2-3 epsilons done cells and one failed cell."""
    run_dir = tmp_path_factory.mktemp("run")
    with ResultStore(run_dir) as store:
        run_id = store.start_run(CONFIG, ENVIRONMENT)
        for seed, (model, attack, norm, epsilon) in enumerate(_grid()):
            spec, metrics, samples = _cell(model, attack, norm, epsilon, seed)
            store.write_cell(f"cell{seed:02d}", run_id, spec, metrics, samples, seconds=1.5 + seed)
        spec, _, _ = _cell("cnn3d", "pgd", "linf", 0.1, 99)
        store.write_cell("failed", run_id, spec, {}, [], seconds=0.2, status="failed", error=FAILURE)
        store.finish_run(run_id)
    return run_dir


@pytest.fixture(scope="module")
def report(store_dir, tmp_path_factory) -> Path:
    return write_report(store_dir, tmp_path_factory.mktemp("report"))


class _Tables(HTMLParser):
    """The rows of every <table id=...> of a page: lists of (text, data-value) per cell."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[tuple[str, str | None]]]] = {}
        self._table: str | None = None
        self._cell: list[str] | None = None
        self._value: str | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table" and "id" in attrs:
            self._table = attrs["id"]
            self.tables[self._table] = []
        elif tag == "tr" and self._table:
            self.tables[self._table].append([])
        elif tag == "td" and self._table:
            self._cell, self._value = [], attrs.get("data-value")

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = None
        elif tag == "td" and self._cell is not None:
            self.tables[self._table][-1].append(("".join(self._cell).strip(), self._value))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _tables(page: str) -> dict[str, list[list[tuple[str, str | None]]]]:
    parser = _Tables()
    parser.feed(page)
    return {name: [row for row in rows if row] for name, rows in parser.tables.items()}  # drop the header rows


def test_page_lists_every_done_cell_in_leaderboard_order(report):
    tables = _tables(report.read_text())
    rows = tables["leaderboard"]
    assert len(rows) == len(_grid()) == len(tables["age-bins"])
    shown = [(row[0][0], row[1][0], row[2][0], float(row[3][1])) for row in rows]
    assert shown == _leaderboard_order(_grid())
    assert shown[0][2] == "linf"  # l-inf first, as in the paper and the figure, not alphabetically after l2
    for row, (_, _, _, epsilon) in zip(rows, shown, strict=True):
        assert row[3][0] == f"{format_epsilon(epsilon)} (range)"
        # Every number carries its raw value for sorting, whatever its display.
        assert all(value is not None and not math.isnan(float(value)) for _, value in row[6:-1])
        assert row[-1][0] == "ok"  # the reliability checks: this store has no flagged cell


def test_intervals_psnr_and_ssim_are_shown(report, store_dir):
    rows = _tables(report.read_text())["leaderboard"]
    with ResultStore(store_dir, create=False) as store:
        table = leaderboard_table(store.cells())
    assert len(rows) == len(table)
    for row, (_, cell) in zip(rows, table.iterrows(), strict=True):
        for index, key in ((7, "adversarial_mae"), (8, "mean_abs_deviation")):
            text, value = row[index]
            low, high = cell[f"{key}_ci_low"], cell[f"{key}_ci_high"]
            assert text == f"{cell[key]:.2f} [{low:.2f}, {high:.2f}]"
            assert float(value) == pytest.approx(cell[key]) and low <= cell[key] <= high
        assert row[10] == (f"{cell['mean_psnr']:.1f}", repr(cell["mean_psnr"]))
        assert row[11] == (format_ssim(cell["mean_ssim"]), repr(cell["mean_ssim"]))
    # The unchanged first subject of every cell (PSNR +inf) is counted apart, not averaged into the PSNR.
    assert (table["n_unchanged"] == 1).all() and np.isfinite(table["mean_psnr"]).all()


def test_psnr_and_ssim_hover_with_the_median_and_the_unchanged_images(report, store_dir):
    page = report.read_text()
    with ResultStore(store_dir, create=False) as store:
        cell = leaderboard_table(store.cells()).iloc[0]
    assert (f'title="median {cell["median_psnr"]:.1f}; 1 of 8 images unchanged (PSNR infinite, left out of the '
            f'mean)">{cell["mean_psnr"]:.1f}</td>') in page
    assert f'title="median {format_ssim(cell["median_ssim"])}">{format_ssim(cell["mean_ssim"])}</td>' in page


def test_a_cell_whose_images_are_all_unchanged_shows_an_infinite_psnr(tmp_path):
    with ResultStore(tmp_path) as store:
        spec, _, samples = _cell("cnn3d", "fgsm", "linf", 0.0, 0, image_metrics=False)
        columns = {key: [sample[key] for sample in samples] for key in samples[0]}
        metrics = cell_metrics(*(columns[key] for key in ("true_age", "clean_prediction", "adversarial_prediction",
                                                          "linf", "l2", "linf_rel", "l2_rel")),
                               l0=[0] * 8, psnr=[math.inf] * 8, ssim=[1.0] * 8)
        store.write_cell("cell", store.start_run({}, {}), spec, metrics, samples, seconds=1.0)
    row = _tables(write_report(tmp_path).read_text())["leaderboard"][0]
    assert row[10][0] == "∞" and float(row[10][1]) > 1e300
    assert row[11][0] == "1"


def test_a_cell_without_intervals_or_image_metrics_shows_its_point_estimates(tmp_path):
    with ResultStore(tmp_path) as store:
        spec, metrics, samples = _cell("cnn3d", "fgsm", "linf", 1e-3, 0, image_metrics=False)
        metrics = {key: value for key, value in metrics.items() if "_ci_" not in key}  # a store from before them
        store.write_cell("cell", store.start_run({}, {}), spec, metrics, samples, seconds=1.0)
    row = _tables(write_report(tmp_path).read_text())["leaderboard"][0]
    assert row[8][0] == f"{metrics['mean_abs_deviation']:.2f}"
    assert row[10][0] == row[11][0] == "–"


def test_norms_sort_linf_l2_l0_then_others():
    spec, metrics, _ = _cell("cnn3d", "fgsm", "linf", 1e-3, 0)
    norms = ["l2", "l1", "l0", "linf", "l2", "linf"]
    cells = pd.DataFrame([{**spec, **metrics, "norm": norm, "epsilon": float(index), "status": "done",
                           "id": f"cell{index}"} for index, norm in enumerate(norms)])
    table = leaderboard_table(cells)
    assert list(zip(table["norm"], table["epsilon"], strict=True)) == [
        ("linf", 3.0), ("linf", 5.0), ("l2", 0.0), ("l2", 4.0), ("l0", 2.0), ("l1", 1.0)]


def test_threat_models_side_by_side(tmp_path):
    threat_models = ("recomputed", "fixed", "perturbed")
    with ResultStore(tmp_path) as store:
        run_id = store.start_run({}, {})
        written = {}
        for seed, threat_model in enumerate(threat_models):
            spec, metrics, samples = _cell("hybrid", "pgd", "linf", 1e-3, seed, threat_model=threat_model)
            store.write_cell(f"hybrid-{threat_model}", run_id, spec, metrics, samples, seconds=1.0)
            written[threat_model] = metrics
        spec, metrics, samples = _cell("cnn3d", "pgd", "linf", 1e-3, 7)
        store.write_cell("cnn3d-fixed", run_id, spec, metrics, samples, seconds=1.0)
        written["cnn3d"] = metrics
    tables = _tables(write_report(tmp_path).read_text())
    # The leaderboard names each cell's threat model.
    assert sorted(row[4][0] for row in tables["leaderboard"]) == ["fixed", "fixed", "perturbed", "recomputed"]
    side = tables["threat-models"]
    assert [row[0][0] for row in side] == ["cnn3d", "hybrid"]
    # model, attack, norm, epsilon, objective, then fixed, perturbed, recomputed.
    assert [cell[0] for cell in side[0][5:]] == [_interval(written["cnn3d"]), "–", "–"]
    assert [cell[0] for cell in side[1][5:]] == [_interval(written[t]) for t in ("fixed", "perturbed", "recomputed")]
    assert [float(cell[1]) for cell in side[1][5:]] == [written[t]["mean_abs_deviation"]
                                                        for t in ("fixed", "perturbed", "recomputed")]


def _interval(metrics: dict) -> str:
    return (f"{metrics['mean_abs_deviation']:.2f} [{metrics['mean_abs_deviation_ci_low']:.2f}, "
            f"{metrics['mean_abs_deviation_ci_high']:.2f}]")


def test_one_threat_model_needs_no_side_by_side_table(report):
    assert "threat-models" not in _tables(report.read_text())
    table, threat_models = threat_model_table(pd.DataFrame({"threat_model": ["fixed"], "model": ["cnn3d"]}))
    assert table.empty and threat_models == ["fixed"]


def test_the_same_cell_twice_gets_two_rows_rather_than_an_average():
    first, _, _ = _cell("hybrid", "pgd", "linf", 1e-3, 0)
    cells = pd.DataFrame([{**first, "mean_abs_deviation": value, "threat_model": threat_model}
                          for value, threat_model in ((1.0, "fixed"), (2.0, "fixed"), (3.0, "perturbed"))])
    table, threat_models = threat_model_table(cells)
    assert threat_models == ["fixed", "perturbed"]
    assert table["fixed"].tolist() == [1.0, 2.0]
    assert table["perturbed"].tolist()[0] == 3.0 and math.isnan(table["perturbed"].tolist()[1])


def test_ssim_format_keeps_two_digits_of_one_minus_ssim():
    assert [format_ssim(v) for v in (0.98, 0.99912, 0.9999955, 1.0, 0.5)] == \
        ["0.980", "0.99912", "0.9999955", "1", "0.500"]


def test_epsilon_and_number_formats():
    assert [format_epsilon(e) for e in (5e-4, 1.5e-3, 1e-4, 0.01, 0.5, 2.0, 0.0)] == \
        ["5e-04", "1.5e-03", "1e-04", "0.01", "0.5", "2", "0"]


def test_page_is_self_contained(report):
    page = report.read_text()
    references = re.findall(r"""\b(?:src|href)\s*=\s*["']?([^"'\s>]*)""", page, flags=re.IGNORECASE)
    assert references, "the page embeds its figure"
    # Every src/href is a data: URI: none is http(s) or protocol-relative ("//host/...").
    assert all(reference.startswith("data:") for reference in references), references
    assert "http://" not in page and "https://" not in page
    assert "<link" not in page and "@import" not in page


def test_user_text_is_escaped(report):
    page = report.read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<script>alert" not in page
    assert "RuntimeError: CUDA out of memory &lt;b&gt;boom&lt;/b&gt; &amp; more" in page
    assert "<b>boom" not in page


def test_failed_cell_environment_and_config_are_shown(report):
    page = report.read_text()
    assert "Failed cells" in page and "1 failed" in page and f"{len(_grid())} cells done" in page
    assert "8 subjects per cell from the test split" in page
    assert "packages.torch" in page and "2.3.0" in page and "abc123" in page
    assert json.dumps(CONFIG, indent=2, sort_keys=True).replace('"', "&#34;") in page


def test_csv_has_one_row_per_done_cell(report, store_dir):
    csv = pd.read_csv(report.parent / "results.csv")
    assert len(csv) == len(_grid())
    for column in ("id", "model", "model_name", "attack", "params", "norm", "epsilon", "unit", "threat_model",
                   "objective", "clean_mae", "adversarial_mae", "mean_abs_deviation", "abs_mean_deviation_lt15",
                   "success_5y", "mean_linf_rel", "seconds", "adversarial_mae_ci_low", "mean_abs_deviation_ci_high",
                   "mean_psnr", "median_ssim", "mean_l0", "n_unchanged"):
        assert column in csv.columns, column
    assert "status" not in csv.columns and "error" not in csv.columns
    assert list(zip(csv.model, csv.attack, csv.norm, csv.epsilon, strict=True)) == _leaderboard_order(_grid())
    with ResultStore(store_dir, create=False) as store:
        cells = store.cells().set_index("id")
    for _, row in csv.iterrows():
        stored = cells.loc[row["id"]]
        assert json.loads(row["params"]) == stored["params"]
        for column in ("clean_mae", "adversarial_mae", "mean_abs_deviation", "success_5y", "seconds"):
            assert row[column] == pytest.approx(stored[column])


def test_figure_is_written_and_embedded(report):
    png = (report.parent / "deviation_vs_epsilon.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert "data:image/png;base64," in report.read_text()


def test_figure_panels_axes_and_lines(store_dir):
    with ResultStore(store_dir, create=False) as store:
        figure = deviation_figure(leaderboard_table(store.cells()))
    panels = [ax for ax in figure.axes if ax.get_visible()]
    assert sorted(ax.get_title() for ax in panels) == ["fgsm, l2", "fgsm, linf", "pgd, l2", "pgd, linf"]
    for ax in panels:
        assert ax.get_xlabel() == "epsilon (fraction of image range)"
        assert ax.get_xscale() == "log"  # every epsilon > 0
        norm = ax.get_title().split(", ")[1]
        assert list(ax.get_xticks()) == pytest.approx(EPSILONS[norm])  # ticks at the budgets
        assert len([line for line in ax.get_lines() if len(line.get_xdata())]) == len(MODELS)
    assert sorted(text.get_text() for text in figure.legends[0].get_texts()) == sorted(MODELS)


def test_attacks_of_their_own_norms_are_laid_out_in_reading_order(tmp_path):
    # bim under l-inf, cw under l2, l0 under l0 (as Li et al.'s grid): no empty panels, l-inf first, l0 in voxels.
    with ResultStore(tmp_path) as store:
        run_id = store.start_run({}, {})
        for number, (attack, norm, epsilon) in enumerate([("bim", "linf", 1e-3), ("cw", "l2", 1.0),
                                                          ("l0", "l0", 8.0), ("apgd", "linf", 1e-3)]):
            spec, metrics, samples = _cell("cnn3d", attack, norm, epsilon, number)
            if norm == "l0":
                spec["unit"] = "abs"
            store.write_cell(f"cell{number}", run_id, spec, metrics, samples, seconds=1.0)
        figure = deviation_figure(leaderboard_table(store.cells()))
    panels = [ax for ax in figure.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["apgd, linf", "bim, linf", "cw, l2", "l0, l0"]
    assert len(figure.axes) == 6 and panels == figure.axes[:4]  # three to a row, no gaps
    assert panels[3].get_xlabel() == "epsilon (voxels)"


def test_single_epsilon_still_draws_points(tmp_path):
    with ResultStore(tmp_path) as store:
        run_id = store.start_run({}, {})
        for seed, model in enumerate(MODELS):
            spec, metrics, samples = _cell(model, "fgsm", "linf", 1e-3, seed)
            store.write_cell(f"cell{seed}", run_id, spec, metrics, samples, seconds=1.0)
        figure = deviation_figure(leaderboard_table(store.cells()))
    lines = figure.axes[0].get_lines()
    assert all(line.get_marker() not in (None, "None", "") for line in lines if len(line.get_xdata()))
    assert figure.axes[0].get_xscale() == "linear"


def test_empty_store_says_no_results(tmp_path):
    ResultStore(tmp_path).close()
    (tmp_path / "deviation_vs_epsilon.png").write_bytes(b"stale")
    page = write_report(tmp_path)
    assert page == tmp_path / "leaderboard.html"
    text = page.read_text()
    assert "No results yet" in text and "data:image/png" not in text and "0 cells done, 0 failed" in text
    assert not (tmp_path / "deviation_vs_epsilon.png").exists()
    assert pd.read_csv(tmp_path / "results.csv").empty


def test_missing_store_is_a_medrobust_error(tmp_path):
    with pytest.raises(MedrobustError, match="results.sqlite"):
        write_report(tmp_path / "nowhere")


def test_store_without_a_spec_field_is_a_medrobust_error(tmp_path):
    with ResultStore(tmp_path) as store:
        spec, metrics, samples = _cell("cnn3d", "fgsm", "linf", 1e-3, 0)
        del spec["threat_model"]
        store.write_cell("cell", store.start_run({}, {}), spec, metrics, samples, seconds=1.0)
    with pytest.raises(MedrobustError, match="results.sqlite.*'threat_model'"):
        write_report(tmp_path)


def _browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (optional)")
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("no chromium on PATH (apt-get install chromium; optional)")
    return sync_api, chromium


@pytest.fixture(scope="module")
def browsed(report):
    """The demo-like page as a reader sees it in headless Chromium at 1280 px: every request it made, its console
    errors and dialogs, and the page object, the details of every cell opened. Screenshots go to
    $MEDROBUST_SCREENSHOTS (CI keeps them) or next to the page."""
    import os

    sync_api, chromium = _browser()
    shots = Path(os.environ.get("MEDROBUST_SCREENSHOTS") or report.parent)
    shots.mkdir(parents=True, exist_ok=True)
    seen = {"requests": [], "errors": [], "dialogs": []}
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("request", lambda request: seen["requests"].append(request.url))
            page.on("console", lambda message: message.type == "error" and seen["errors"].append(message.text))
            page.on("pageerror", lambda error: seen["errors"].append(str(error)))
            page.on("dialog", lambda dialog: (seen["dialogs"].append(dialog.message), dialog.dismiss()))
            page.goto(report.resolve().as_uri())
            page.screenshot(path=str(shots / "leaderboard-top.png"))
            seen["overflow_closed"] = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
            page.click("#cells > summary")
            seen["overflow_open"] = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
            page.screenshot(path=str(shots / "leaderboard-full.png"), full_page=True)
            yield page, seen
        finally:
            browser.close()


def test_the_page_loads_from_disk_alone_without_errors_or_dialogs_and_fits_1280_px(browsed):
    page, seen = browsed
    assert seen["requests"] and all(url.startswith(("file:", "data:")) for url in seen["requests"]), seen["requests"]
    assert seen["errors"] == [] and seen["dialogs"] == []  # the <script> label stays text
    assert page.locator("#headline").count() == 1
    assert seen["overflow_closed"] <= 0 and seen["overflow_open"] <= 0  # wide tables scroll in their own box


def test_the_headline_ranks_as_the_store_says_in_a_browser(browsed):
    page, _ = browsed
    ranks = page.locator("#headline tbody tr td:first-child").all_inner_texts()
    assert ranks == [str(number) for number in range(1, len(ranks) + 1)] and len(ranks) >= 2
    headers = page.locator("#headline thead th").all_inner_texts()
    standard = max(i for i, header in enumerate(headers) if header.startswith("linf"))
    values = page.locator("#headline tbody tr").evaluate_all(
        f"rows => rows.map(row => parseFloat(row.cells[{standard}].dataset.value))")
    assert values == sorted(values)  # the most robust first


def test_clicking_a_numeric_header_sorts_and_reverses_and_the_filter_keeps_matching_rows(browsed):
    page, _ = browsed
    header = page.locator("#leaderboard thead th", has_text="mean |deviation|")
    values = "rows => rows.map(row => parseFloat(row.cells[8].dataset.value))"
    header.click()
    ascending = page.locator("#leaderboard tbody tr").evaluate_all(values)
    header.click()
    descending = page.locator("#leaderboard tbody tr").evaluate_all(values)
    assert ascending == sorted(ascending) and descending == sorted(ascending, reverse=True)
    page.fill("input.filter", "pgd l2")
    shown = page.locator("#leaderboard tbody tr:not([hidden])").all_inner_texts()
    assert shown and all("pgd" in row and "l2" in row for row in shown)
    assert page.locator("#leaderboard tbody tr[hidden]").count() > 0
    page.fill("input.filter", "")
    assert page.locator("#leaderboard tbody tr[hidden]").count() == 0


# ---------------------------------------------------------------- the headline: the worst case per model


def _headline_cells(with_ensemble: bool = True) -> pd.DataFrame:
    """Done cells of three models at two l-inf budgets: pgd and (optionally) the ensemble; the ensemble is the
    worst case, and model 'b' is the most robust, 'c' the least."""
    rows = []
    shifts = {"a": 2.0, "b": 1.0, "c": 4.0}
    for model, shift in shifts.items():
        for epsilon in (1e-3, 2e-3):
            for attack, factor in (("pgd", 0.8), ("ensemble", 1.0)):
                if attack == "ensemble" and not with_ensemble:
                    continue
                value = shift * factor * epsilon / 1e-3
                rows.append({"id": f"{model}{attack}{epsilon}", "status": "done", "model": model, "model_name": model,
                             "attack": attack, "norm": "linf", "unit": "range", "epsilon": epsilon,
                             "threat_model": "fixed", "objective": "older", "clean_mae": 4.0 + shift,
                             "mean_deviation": value, "mean_abs_deviation": value, "params": {},
                             "reliability": ["black-box: weaker than the black-box square; suggests masking"]
                             if (model, attack, epsilon) == ("c", "pgd", 1e-3) else []})
    return leaderboard_table(pd.DataFrame(rows))


def test_the_headline_ranks_models_by_the_ensembles_worst_case_at_the_standard_budget() -> None:
    from medrobust.reports.leaderboard import headline_table

    roles = {"pgd": ("iterative", "batch"), "ensemble": ("ensemble", "batch")}
    headline, budgets, source = headline_table(_headline_cells(), roles)
    assert source == "ensemble" and budgets == ["linf 1e-03 of range", "linf 2e-03 of range"]
    assert list(headline["model"]) == ["b", "a", "c"] and list(headline["rank"]) == [1, 2, 3]
    assert list(headline["linf 2e-03 of range"]) == [2.0, 4.0, 8.0]  # the ensemble's, not pgd's 0.8 of it
    assert headline.attrs["standard"] == "linf 2e-03 of range"
    flagged = headline.set_index("model")["checks"]
    assert flagged["c"].startswith("pgd linf 1e-03 of range: black-box") and flagged["a"] == ""
    # Without an ensemble: the strongest attack's mean, and the page says it is the weaker bound.
    fallback, _, source = headline_table(_headline_cells(with_ensemble=False), roles)
    assert source == "strongest attack" and list(fallback["linf 2e-03 of range"]) == [1.6, 3.2, 6.4]


def test_the_page_opens_on_the_headline_and_folds_the_cells_away(tmp_path: Path) -> None:
    from medrobust.reports.leaderboard import render_page

    table = _headline_cells()
    page = render_page(table.assign(status="done"), table, [], None)
    assert page.index("Headline: the worst case per model") < page.index('<details id="cells">')
    assert page.index('<details id="cells">') < page.index('id="leaderboard"')
    assert "worst case (worst-case shift up (y)) over the ensemble" in page
    assert 'class="filter"' in page and "flagged: black-box" in page


def test_a_label_that_looks_like_mathtext_is_drawn_literally() -> None:
    # A model label with "$\nosuchmacro$" made `medrobust report` die in matplotlib's mathtext parser.
    from medrobust.reports.leaderboard import figure_png

    table = _headline_cells()
    label = r"$\nosuchmacro$ {x} \ <b>"
    table["model"] = table["model"].replace("a", label)
    figure = deviation_figure(table)
    assert figure_png(figure).startswith(b"\x89PNG")
    legend = [text.get_text() for legend in figure.legends for text in legend.get_texts()]
    assert label in legend


def test_no_absolute_path_reaches_the_page_or_the_csv(tmp_path: Path) -> None:
    from medrobust.reports.leaderboard import relative_paths

    run = tmp_path / "lab" / "run"
    text = f"factory {tmp_path}/lab/net.py:net with weights {tmp_path}/lab/net.pt; 1/2 of https://example.org/x"
    assert relative_paths(text, run) == ("factory ../net.py:net with weights ../net.pt; 1/2 of "
                                         "https://example.org/x")
    spec, metrics, samples = _cell("cnn3d", "fgsm", "linf", 1e-3, 0)
    spec.update(checkpoint=f"factory {tmp_path}/lab/net.py:net", dataset=str(tmp_path / "lab" / "dataset"))
    with ResultStore(run) as store:
        run_id = store.start_run({"dataset": {"path": str(tmp_path / "lab" / "dataset")}}, ENVIRONMENT)
        store.write_cell("c1", run_id, spec, metrics, samples, 1.0)
        store.finish_run(run_id)
    page = write_report(run)
    for written in (page, run / "results.csv"):
        assert str(tmp_path) not in written.read_text(), written.name
    assert "../dataset" in page.read_text()


def test_several_runs_make_one_page_and_a_cell_in_two_stores_is_one_row(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from medrobust.cli import main

    shared = _cell("cnn3d", "fgsm", "linf", 1e-3, 0)
    owns = {"spring": _cell("cnn3d", "pgd", "linf", 1e-3, 1), "autumn": _cell(XSS, "pgd", "l2", 0.5, 2)}
    for folder, own in owns.items():
        with ResultStore(tmp_path / folder) as store:
            run_id = store.start_run(CONFIG, ENVIRONMENT)
            store.write_cell("shared", run_id, *shared, 1.0)
            store.write_cell(f"{folder}-own", run_id, *own, 1.0)
            store.finish_run(run_id)
    result = CliRunner().invoke(main, ["report", str(tmp_path / "spring"), str(tmp_path / "autumn"), "--out",
                                       str(tmp_path / "lab")])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "lab" / "results.csv")
    assert sorted(table["id"]) == ["autumn-own", "shared", "spring-own"]
    missing_out = CliRunner().invoke(main, ["report", str(tmp_path / "spring"), str(tmp_path / "autumn")])
    assert missing_out.exit_code == 2 and "--out FOLDER" in missing_out.output


def test_export_writes_the_papers_set_with_every_label_escaped(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from medrobust.cli import main

    label = r"$\weird$ {x} 50% & <b>_"
    with ResultStore(tmp_path / "run") as store:
        run_id = store.start_run(CONFIG, ENVIRONMENT)
        for number, (model, attack) in enumerate([("cnn3d", "ensemble"), (label, "ensemble"), ("cnn3d", "pgd")]):
            spec, metrics, samples = _cell(model, attack, "linf", 1e-3, number)
            store.write_cell(f"c{number}", run_id, spec, metrics, samples, 1.0)
        store.finish_run(run_id)
    result = CliRunner().invoke(main, ["export", str(tmp_path / "run"), "--to", str(tmp_path / "paper")])
    assert result.exit_code == 0, result.output
    paper = tmp_path / "paper"
    for name in ("headline.tex", "headline.md", "pivot.tex", "pivot.md", "samples.csv", "deviation_vs_epsilon.png",
                 "deviation_vs_epsilon.svg", "deviation_vs_epsilon.pdf"):
        assert (paper / name).stat().st_size > 0, name
    latex = (paper / "headline.tex").read_text()
    assert r"\$\textbackslash{}weird\$ \{x\} 50\% \& \textless{}b\textgreater{}\_" in latex
    assert r"\toprule" in latex and "worst case over the ensemble".lower() in latex.lower()
    assert r"\$\textbackslash{}weird" in (paper / "pivot.tex").read_text()
    assert "\\<b\\>" in (paper / "headline.md").read_text()
    records = sorted((paper / "models").glob("*.json"))
    assert len(records) == 2
    record = json.loads(records[0].read_text())
    assert {"model", "architecture", "evaluation", "results", "environment"} <= set(record)
    assert record["results"][0]["worst_case"] and record["evaluation"]["worst_case_over"] == "ensemble"
    empty = CliRunner().invoke(main, ["export", str(tmp_path / "nowhere"), "--to", str(tmp_path / "x")])
    assert empty.exit_code == 2 and "holds no results store" in empty.output


def test_the_robustness_curves_and_the_papers_age_bin_figure_are_on_the_page(report, store_dir) -> None:
    from medrobust.reports.leaderboard import age_bin_figure, headline_table, robustness_figure

    text = report.read_text()
    assert "Robustness curves" in text and "Deviation by true age at the standard budget" in text
    with ResultStore(store_dir, create=False) as store:
        headline, _, _ = headline_table(leaderboard_table(store.cells()))
    curves, bins = robustness_figure(headline), age_bin_figure(headline)
    assert [ax.get_title() for ax in curves.axes] == ["linf, objective older", "l2, objective older"]
    assert len(bins.axes) == 1 and [t.get_text() for t in bins.axes[0].get_xticklabels()] == list(AGE_BIN_LABELS)


def test_report_can_keep_only_the_cells_a_config_plans(store_dir, tmp_path: Path) -> None:
    with ResultStore(store_dir, create=False) as store:
        ids = list(store.cells()["id"])
    page = write_report(store_dir, tmp_path / "some", only=set(ids[:3]))
    assert len(pd.read_csv(page.parent / "results.csv")) == len([i for i in ids[:3] if i != "failed"])


def test_a_model_card_says_what_the_model_is_how_it_was_trained_and_where_it_ranks() -> None:
    from medrobust.reports.leaderboard import headline_table, model_cards

    table = _headline_cells()
    card = {"parameters": 123456, "input_shape": [48, 56, 48], "voxel_size": [3.5, 3.5, 3.5],
            "normalization": "zscore_brain", "features": 0, "uses_image": True,
            "training": {"epochs": 30, "best_epoch": 12, "seed": 0, "loss": "l1", "best_val_mae": 4.25},
            "test_metrics": {"mae": 4.5, "r": 0.97, "n": 100}}
    table["model_card"] = json.dumps(card)
    table["checkpoint_sha256"] = "c673d3c8801db922185d0348"
    headline, _, _ = headline_table(table, {"pgd": ("iterative", "batch"), "ensemble": ("ensemble", "batch")})
    cards = model_cards(table, headline).set_index("model")
    assert cards.loc["b", "parameters"] == 123456 and cards.loc["b", "weights"] == "c673d3c8801d"
    assert cards.loc["b", "input"] == "48x56x48 at 3.5x3.5x3.5 mm, zscore_brain"
    assert cards.loc["b", "trained"] == "30 epochs (best 12), loss l1, seed 0, val MAE 4.25 y"
    assert cards.loc["b", "test_mae"] == 4.5
    assert cards.loc["b", "results"] == "fixed (older): rank 1, 2.00 y at linf 2e-03 of range"


def test_a_label_a_spreadsheet_would_evaluate_reaches_the_csv_neutralised(tmp_path: Path) -> None:
    spec, metrics, samples = _cell("=1+1", "fgsm", "linf", 1e-3, 0)
    samples[0]["subject"] = "@SUM(A1:A9)"
    with ResultStore(tmp_path / "run") as store:
        run_id = store.start_run(CONFIG, ENVIRONMENT)
        store.write_cell("c1", run_id, spec, metrics, samples, 1.0)
        store.finish_run(run_id)
    write_report(tmp_path / "run")
    table = pd.read_csv(tmp_path / "run" / "results.csv")
    assert table.loc[0, "model"] == "'=1+1" and table.loc[0, "mean_deviation"] > 0  # numbers untouched
    from medrobust.reports.export import export

    export([tmp_path / "run"], tmp_path / "paper")
    assert "'@SUM(A1:A9)" in (tmp_path / "paper" / "samples.csv").read_text()


def test_two_configs_sharing_a_run_folder_give_rows_a_reader_can_tell_apart(tmp_path: Path) -> None:
    # Two configs with one out folder, both labelling their model "cnn3d": one attacked 8 subjects with one
    # checkpoint, the other 8 with a retrained one. The page must not show two rows named alike.
    with ResultStore(tmp_path) as store:
        run = store.start_run(CONFIG, ENVIRONMENT)
        for number, checkpoint in enumerate(("1a2b3c4d5e6f7a8b", "9f8e7d6c5b4a3f2e")):
            spec, metrics, samples = _cell("cnn3d", "pgd", "linf", 1e-3, number)
            store.write_cell(f"c{number}", run, {**spec, "checkpoint_sha256": checkpoint}, metrics, samples, 1.0)
        spec, metrics, samples = _cell("hybrid", "pgd", "linf", 1e-3, 5)
        store.write_cell("c9", run, spec, metrics, samples, 1.0)
    write_report(tmp_path)
    with (tmp_path / "results.csv").open() as handle:
        labels = sorted(row["model"] for row in csv.DictReader(handle))
    assert labels == ["cnn3d (checkpoint 1a2b3c4)", "cnn3d (checkpoint 9f8e7d6)", "hybrid"]
