"""The README's "Copying a piece" snippets run as written, from the repository root, each in a
fresh interpreter (as a user pastes them), on the CPU tensors they build."""
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def copying_snippets():
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Copying a piece", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_every_script_has_a_piece_to_copy():
    joined = "\n".join(copying_snippets())
    for script in ("benign_memorization", "masc_decode", "toy_capacity"):
        assert f"from {script} import" in joined, script


@pytest.mark.parametrize("index", range(len(copying_snippets())))
def test_snippet_runs_as_written(index):
    code = copying_snippets()[index]
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"snippet {index}:\n{code}\n{proc.stderr}"
    assert "assert" in code  # each snippet checks its own result, so it can fail
