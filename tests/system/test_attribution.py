"""Optional: docs/ATTRIBUTION.md, run as written (torch, scikit-learn, matplotlib; skipped without them).

The page's Python blocks run in order in one namespace in a fresh directory; then the sketched
scores of the digits model's stride-2 layer (``--sketch 32,32``, 145 x 32 per-sample gradients)
must rank the training images as the exact ones do: a median Spearman correlation of at least
0.6 over the 5 misclassified test images of highest loss.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

DOC = Path(__file__).resolve().parents[2] / "docs" / "ATTRIBUTION.md"


def test_page_runs_and_the_sketch_ranks_as_the_exact_scores(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "attribution_doc"}
    blocks = re.findall(r"^```python\n(.*?)^```", DOC.read_text(), flags=re.S | re.M)
    assert len(blocks) == 5
    for index, block in enumerate(blocks):
        exec(compile(block, f"{DOC.name} python block {index}", "exec"), namespace)
    assert (tmp_path / "influence.png").stat().st_size > 1000
    wrong, exact, sketched = namespace["wrong"], namespace["exact"], namespace["sketched"]
    assert exact.shape == sketched.shape == (1500, len(wrong)) and len(wrong) >= 5
    assert len(namespace["top"]) == 6

    cnn, images, labels = namespace["cnn"], namespace["images"], namespace["labels"]
    with torch.no_grad():
        losses = torch.nn.functional.cross_entropy(cnn(images[wrong]), labels[wrong], reduction="none").numpy()
    hardest = np.argsort(-losses)[:5]
    spearman = np.asarray(namespace["spearman"])[hardest]
    assert np.median(spearman) >= 0.6, spearman
