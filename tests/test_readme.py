"""CI runs the README's test command: keep .ci/run and the README in step."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(*parts):
    with open(os.path.join(ROOT, *parts)) as f:
        return f.read()


def test_ci_runs_the_readme_test_command():
    readme = _read("README.md")
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    test_commands = [b.strip() for b in blocks if b.strip().endswith("python -m pytest tests")]
    assert len(test_commands) == 1, "the README must show exactly one test command"
    assert test_commands[0] in _read(".ci", "run")
