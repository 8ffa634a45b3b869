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


SCRIPTS = ("benign_memorization", "masc_decode", "toy_capacity")


def readme_commands():
    """(script, argv) of every `python <script>.py ...` in the README's code blocks (lines joined
    at a trailing backslash) and inline code, up to a comment or a shell operator."""
    parts = re.split(r"^```[a-z]*\n", (ROOT / "README.md").read_text(), flags=re.M)
    pattern = r"python (%s)\.py((?: [^\s#;|&>`]+)*)" % "|".join(SCRIPTS)
    found = []
    for i, part in enumerate(parts):  # odd parts are code blocks
        lines = (part.replace("\\\n", " ").splitlines() if i % 2
                 else re.findall(r"`([^`]*)`", part.replace("\n", " ")))
        for line in lines:
            found += [(m[1], m[2].split()) for m in re.finditer(pattern, re.sub(" +", " ", line))]
    return found


def parsers():
    import importlib
    return {name: importlib.import_module(name).build_parser() for name in SCRIPTS}


def test_every_readme_command_parses():
    """A renamed flag or a changed value syntax leaves a README command that the script refuses.
    Commands with placeholders ($1, <name>, ..., --seed S) are left out."""
    commands = readme_commands()
    runnable = [(s, argv) for s, argv in commands if argv != ["--help"] and not any(
        re.search(r"[$<]|\.\.\.", a) or re.fullmatch("[A-Z]", a) for a in argv)]
    assert len(runnable) >= 30 and {s for s, _ in runnable} == set(SCRIPTS)
    by_script = parsers()
    for script, argv in runnable:
        try:
            by_script[script].parse_args(argv)
        except SystemExit:
            raise AssertionError(f"README: python {script}.py {' '.join(argv)}") from None


def test_every_flag_is_in_the_readme_and_every_readme_flag_exists():
    """Each flag of a script is documented; each flag the README names belongs to a script, to a
    tool in tests/ or to SLURM's sbatch."""
    script_flags = {f for p in parsers().values() for a in p._actions for f in a.option_strings
                    if f.startswith("--")}
    # the tools only: test files also quote flags that exist nowhere (to see them refused)
    tools = "".join(p.read_text() for p in (ROOT / "tests").glob("*.py")
                    if not p.name.startswith(("test_", "conftest")))
    tool_flags = set(re.findall(r"\"(--[a-z0-9-]+)\"", tools))  # their argparse flags
    slurm = {"--array", "--gres", "--requeue", "--time"}
    named = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", (ROOT / "README.md").read_text()))
    assert script_flags - named == set()
    assert named - script_flags - tool_flags - slurm == set()
