"""The README's "Copying a piece" snippets run as written, from the repository root, each with
fresh globals (as a user pastes them), in one interpreter so that torch is imported once."""
import json
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]

RUNNER = """
import json, sys, traceback
for index, code in enumerate(json.loads(sys.stdin.read())):
    try:
        exec(compile(code, f"<README snippet {index}>", "exec"), {"__name__": "__main__"})
    except Exception:
        traceback.print_exc()
        sys.exit(f"README snippet {index} failed")
"""


def copying_snippets():
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Copying a piece", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_every_script_has_a_piece_to_copy_and_every_piece_checks_itself():
    snippets = copying_snippets()
    joined = "\n".join(snippets)
    for script in ("benign_memorization", "masc_decode", "toy_capacity"):
        assert f"from {script} import" in joined, script
    assert len(snippets) >= 6 and all("assert" in code for code in snippets)


def test_every_snippet_runs_as_written():
    proc = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps(copying_snippets()),
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
