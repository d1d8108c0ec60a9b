"""The command line: `data check` lists usable and skipped subjects; bad input is one line and exit code 2."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from medrobust.cli import main


def test_data_check_lists_skipped_subjects_even_when_the_first_image_is_corrupt(bids_dataset: Path) -> None:
    (bids_dataset / "sub-01" / "anat" / "sub-01_T1w.nii.gz").write_bytes(b"not a nifti at all")
    result = CliRunner().invoke(main, ["data", "check", str(bids_dataset), "--quiet"])
    assert result.exit_code == 0, result.output
    summary, *skips = result.stdout.strip().splitlines()
    # sub-02, sub-04 and sub-06 are usable; sub-01 (corrupt), sub-03 (age n/a) and sub-05 (no image) are not.
    assert "3 usable subjects, 3 skipped" in summary
    assert "grid (12, 14, 10)" in summary
    reasons = {line.split(":")[0].removeprefix("skipped "): line for line in skips}
    assert set(reasons) == {"sub-01", "sub-03", "sub-05"}
    assert "not a readable NIfTI" in reasons["sub-01"]


def test_data_check_strict_stops_with_one_line(bids_dataset: Path) -> None:
    result = CliRunner().invoke(main, ["data", "check", str(bids_dataset), "--strict", "--quiet"])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")


def test_data_check_on_a_folder_without_subjects(tmp_path: Path) -> None:
    (tmp_path / "participants.tsv").write_text("participant_id\tage\n")
    result = CliRunner().invoke(main, ["data", "check", str(tmp_path), "--quiet"])
    assert result.exit_code == 2
    assert str(tmp_path) in result.stderr and "no usable subject" in result.stderr


def test_list_names_every_registered_model_and_attack_with_its_facts() -> None:
    import json

    from medrobust.attacks import list_attacks
    from medrobust.models import list_models

    models = CliRunner().invoke(main, ["list", "models", "--json"])
    assert models.exit_code == 0, models.output
    listed = {item["name"]: item for item in json.loads(models.output)}
    assert sorted(listed) == list_models() and listed["hybrid"]["requires"] == ["cnn3d"]
    assert listed["cnn3d"]["parameters"]["input_shape"] == [48, 56, 48]
    attacks = CliRunner().invoke(main, ["list", "attacks", "--json"])
    described = {item["name"]: item for item in json.loads(attacks.output)}
    assert sorted(described) == list_attacks()
    assert described["fgsm"]["role"] == "one-step" and described["universal"]["scope"] == "set"
    assert described["pgd"]["parameters"]["steps"] == 20 and "perturbed" in described["pgd"]["threat_models"]
    text = CliRunner().invoke(main, ["list", "attacks"])
    assert text.exit_code == 0 and text.output.startswith("apgd [linf, l2;")


def test_ctrl_c_is_one_line_and_exit_code_130(monkeypatch, tmp_path) -> None:
    import medrobust.reports.leaderboard as leaderboard

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(leaderboard, "write_report", interrupted)
    monkeypatch.setattr("medrobust.reports.write_report", interrupted)
    result = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert result.exit_code == 130 and "interrupted: what had finished is kept" in result.output
    assert "Traceback" not in result.output and "Aborted" not in result.output


def test_an_out_that_cannot_be_a_folder_is_one_line_and_exit_2(tmp_path, monkeypatch) -> None:
    import shutil
    from pathlib import Path

    fixture = Path(__file__).resolve().parent / "runner" / "fixtures" / "pre_redesign"
    for folder in ("dataset", "models"):
        shutil.copytree(fixture / folder, tmp_path / folder)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("not a folder")
    for out, reason in ((tmp_path / "afile", "File exists"), (tmp_path / "afile" / "sub", "Not a directory")):
        config = tmp_path / "bad.toml"
        config.write_text((fixture / "config.toml").read_text().replace('out = "out"', f'out = "{out}"'))
        result = CliRunner().invoke(main, ["run", str(config), "--quiet", "--no-report"])
        assert result.exit_code == 2 and "cannot be made a run folder" in result.output and reason in result.output
        assert "Traceback" not in result.output


def test_a_dangling_symlink_in_the_dataset_does_not_break_the_plans_key(tmp_path) -> None:
    from medrobust.runner.plan import _stat

    (tmp_path / "link").symlink_to(tmp_path / "gone")
    path, size, mtime = _stat(tmp_path / "link")
    assert path.endswith("link") and size > 0 and mtime > 0
