"""Command-line values: numbers YAML 1.1 reads as strings, and a resume that would ignore --set."""

from __future__ import annotations

from fedmarket.cli import _parse_value, main


def test_scientific_numbers_are_numbers() -> None:
    assert _parse_value("1e-3") == 0.001 and _parse_value("2E5") == 200000.0
    assert _parse_value("0.5") == 0.5 and _parse_value("3") == 3
    assert _parse_value("deepfm") == "deepfm" and _parse_value("[64, 32]") == [64, 32]


def test_resume_refuses_config_changes(tmp_path, capsys) -> None:
    (tmp_path / "config.yaml").write_text("name: x\n")
    assert main(["run", "--resume", str(tmp_path), "--set", "train.lr=1e-3"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "['train.lr'] cannot change it" in err[0]
