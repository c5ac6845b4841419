"""``pneumoscan train --data-card FILE``: the model card states the facts of the given data card
(config key ``data.card``), and a missing or malformed card is one error before any training."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import yaml

from conftest import CliResult
from pneumoscan.config import TrainConfig


def test_data_card_flag_reaches_the_model_card(tmp_path: Path, cli: Callable[..., CliResult], xray_dir: Path) -> None:
    card = tmp_path / "clinic.yaml"
    card.write_text(yaml.safe_dump({"name": "Clinic Z CXR", "source": "Clinic Z PACS export", "license": "CC BY 4.0",
                                    "population": "adults aged 30-70"}), encoding="utf-8")
    run = tmp_path / "run"
    r = cli("train", "--data", xray_dir, "--model", "seed_cnn", "--epochs", "1", "--batch-size", "8", "--no-progress",
            "--seed", "0", "--data-card", card, "--out", run)
    assert r.code == 0, r.err
    assert TrainConfig.from_yaml(run / "config.yaml").data.card == str(card)
    text = (run / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert "Clinic Z CXR" in text and "Clinic Z PACS export" in text and "adults aged 30-70" in text and "`clinic.yaml`" in text
    assert "license: cc-by-4.0" in text


def test_missing_or_malformed_data_card_fails_before_training(tmp_path: Path, cli: Callable[..., CliResult], xray_dir: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n", encoding="utf-8")
    for card, words in ((tmp_path / "missing.yaml", "data card not found"), (bad, "not valid YAML")):
        r = cli("train", "--data", xray_dir, "--model", "seed_cnn", "--epochs", "1", "--data-card", card, "--out", tmp_path / "run")
        assert r.code == 1 and words in r.err, r.err
        assert not (tmp_path / "run" / "last.pt").exists()
