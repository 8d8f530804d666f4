"""Smoke test of bench.load on a tiny shape: it writes its JSON and markdown with every loader's ratio."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ is not an installed package

from bench import load  # noqa: E402


def test_load_benchmark_writes_its_results(tmp_path):
    payload = load.main(f"--bert-shape 2,16,4,24 --repeats 2 --warmup 0 --out {tmp_path}".split())
    saved = json.loads((tmp_path / "load.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(payload["rows"]))
    assert [row["loader"] for row in saved["rows"]] == list(load.loaders(tmp_path, tmp_path))
    assert saved["rows"][0]["ratio"] == 1.0 and all(len(row["seconds"]) == 2 for row in saved["rows"])
    assert saved["settings"]["structure"] == [[2, 2], [12, 12]]
    assert isinstance(saved["targets"]["pruned_at_most_1.5x_unpruned"], bool)
    assert "| loader |" in (tmp_path / "load.md").read_text()
