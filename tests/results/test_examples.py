"""The adversarial examples kept beside the store: the median and the worst subject's mid-slices, written by the
runner and drawn on the page."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from medrobust.results.examples import VIEWS, ExampleCollector, mid_slices, read_examples, write_examples

FIXTURE = Path(__file__).resolve().parents[1] / "runner" / "fixtures" / "pre_redesign" / "dataset"


def test_the_collector_keeps_the_median_and_the_worst_subject_with_their_three_views(tmp_path: Path) -> None:
    images = torch.arange(5 * 4 * 6 * 8, dtype=torch.float32).view(5, 1, 4, 6, 8)
    views = mid_slices(images)
    assert [view.shape for view in views] == [(5, 4, 6), (5, 4, 8), (5, 6, 8)]
    assert np.array_equal(views[0][2], images[2, 0, :, :, 4].numpy())
    collector = ExampleCollector()
    rows = [{"subject": f"s{i}", "deviation": d, "true_age": 40.0, "clean_prediction": 40.0,
             "adversarial_prediction": 40.0 + d, "linf": 0.1, "psnr": 50.0, "ssim": 0.999}
            for i, d in enumerate([0.5, -3.0, 1.0, 2.0, 0.1])]
    collector.add(rows[:3], images[:3], images[:3] + 1)
    collector.add(rows[3:], images[3:], images[3:] + 1)
    chosen = collector.chosen()
    assert [(example["which"], example["row"]["subject"]) for example in chosen] == [("median", "s2"),
                                                                                      ("worst", "s1")]
    assert mid_slices(torch.zeros(2, 1, 4, 4)) is None  # 2D images: nothing to keep
    write_examples(tmp_path, "cell", chosen)
    read = read_examples(tmp_path, "cell")
    assert [example["subject"] for example in read] == ["s2", "s1"] and set(read[1]["views"]) == set(VIEWS)
    clean, attacked = read[1]["views"]["axial"]
    assert np.array_equal(attacked - clean, np.ones_like(clean))
    assert read_examples(tmp_path, "another") == []


def test_a_run_keeps_its_examples_and_the_page_shows_them(tmp_path: Path) -> None:
    from torch import nn

    import medrobust

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0)) / 64)

        def forward(self, x):
            return 40.0 + (x * self.w).flatten(1).sum(dim=1)

    shutil.copytree(FIXTURE, tmp_path / "dataset")
    result = medrobust.evaluate(Net(), tmp_path / "dataset", input_shape=(16, 16, 16), voxel_size=(1, 1, 1),
                                split="train", count=3, attacks=["fgsm"], budgets=[{"norm": "linf", "epsilon": 0.01}],
                                batch_size=2, out=tmp_path / "run", progress=False)
    (cell_id,) = result.cells["id"]
    examples = read_examples(tmp_path / "run", cell_id)
    assert [example["which"] for example in examples] == ["median", "worst"]
    worst = result.samples.loc[result.samples["deviation"].abs().idxmax(), "subject"]
    assert examples[1]["subject"] == worst
    page = result.page.read_text()
    assert "<h2>Adversarial examples</h2>" in page and f"worst subject {worst}" in page
