"""The README speaks the truth: its results table is the committed results file, its Python example
runs, and it points to nothing outside the repository."""
import json
import pathlib
import re

import pytest
import torch

from collat.model import CoLLAT
from tests.helpers import model_config

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
ROW_NAMES = {  # README row label -> key in results.json
    "zero-shot top-1, seen classes (30)": "seen top-1",
    "same, noisy audio": None,  # resolved against the row above
    "zero-shot top-1, held-out classes (6)": "held-out top-1",
    "mixture mAP (2–3 sources)": "mixture mAP",
}


def table_rows(after: str) -> list[list[str]]:
    """The first markdown table after the heading or sentence `after`, as cells (header excluded)."""
    block = []
    for line in README[README.index(after):].splitlines()[1:]:
        if line.startswith("|"):
            block.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif block:
            break
    assert block, f"no table after {after!r}"
    return block[2:]


def test_the_default_run_table_is_the_committed_results_file():
    results = json.loads((ROOT / "docs/results/default_run.json").read_text())
    rows, last_key = table_rows("## What you get"), None
    assert len(rows) == 6
    for label, untrained, trained, chance in rows:
        key = ROW_NAMES[label] or last_key + " noisy"
        last_key = ROW_NAMES[label] or last_key
        assert untrained == f"{results['untrained'][key]:.3f}", label
        assert trained == f"{results['trained'][key]:.3f}", label
        expected_chance = results["chance"].get(key.replace(" noisy", ""))
        assert chance == (f"{expected_chance:.3f}" if expected_chance is not None else "–"), label
    minutes, seconds = divmod(round(results["run"]["wall_seconds"]), 60)
    assert f"{minutes} min {seconds:02d} s wall" in README
    assert results["train_config"]["steps"] == 180 and "180 steps of batch 32" in README


def test_the_ablation_table_is_the_committed_results_file():
    results = json.loads((ROOT / "docs/results/ablation.json").read_text())
    rows = table_rows("The paper's loss ablation")
    by_row = {row["row"]: row for row in results["summary"]}
    assert [r[0] for r in rows] == list(by_row)
    for cells in rows:
        row = by_row[cells[0]]
        assert cells[1:] == [row["cells"][column] for column in results["columns"]], cells[0]


def test_the_python_example_runs(tmp_path, monkeypatch):
    torch.manual_seed(0)
    folder = tmp_path / "runs" / "collat" / "checkpoint"
    CoLLAT(model_config()).save_pretrained(str(folder))
    example = re.search(r"## Using a model\n\n```python\n(.*?)```", README, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(example, "README.md", "exec"), scope)  # noqa: S102 - the README's own example
    assert scope["z_audio"].shape[0] == 2 and scope["h_at"].shape[0] == 2
    scores = scope["model"].zero_shot(scope["waves"], labels=scope["labels"])
    assert torch.allclose(scores.sum(-1), torch.ones(2), atol=1e-5)


@pytest.mark.parametrize("path", ["README.md", "docs/design.md", "docs/performance.md", "docs/results/README.md",
                                  "collat/configs/README.md"])
def test_documents_point_only_inside_the_repository(path):
    text = (ROOT / path).read_text()
    assert "../shared" not in text and "DESIGN.md" not in text
    for target in re.findall(r"\]\(([^)#]+)\)", text):
        if not target.startswith("http"):
            assert (ROOT / path).parent.joinpath(target).exists(), f"{path} links to a missing {target}"
