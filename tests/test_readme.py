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


def test_every_design_citation_names_a_section_of_docs_design_md():
    sections = set(re.findall(r"^## (\d+)\. ", _read("docs", "design.md"), re.M))
    cited = {}
    for folder in ("afd_fast", "csrc", "tests", "benchmarks"):
        for base, _, files in os.walk(os.path.join(ROOT, folder)):
            for name in files:
                if name.endswith((".py", ".h", ".cpp", ".cu", ".sh")):
                    text = _read(base, name)
                    old = re.search(r"DESIGN(\.md)? §", text)  # the design document outside the repository
                    assert old is None, f"{name}: cite docs/design.md"
                    for group in re.findall(r"docs/design\.md ((?:§\d+(?:, )?)+)", text):
                        cited.setdefault(name, set()).update(re.findall(r"§(\d+)", group))
    assert cited, "no citations found"
    missing = {name: s - sections for name, s in cited.items() if s - sections}
    assert not missing, f"sections cited but absent from docs/design.md: {missing}"
