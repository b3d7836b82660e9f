"""CI runs exactly what the README tells users to run."""

from readme_blocks import README, fenced_blocks

ROOT = README.parent


def _bash_blocks(text: str) -> list[str]:
    return [block.strip() for block in fenced_blocks(text, "bash")]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("**Run the tests**", 1)[1]
    test_command = _bash_blocks(section)[0]
    assert "pytest" in test_command and "torch==2.13.0" in test_command
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines


def test_readme_main_job_command_exists():
    readme = (ROOT / "README.md").read_text()
    command = _bash_blocks(readme.split("**Run the main job**", 1)[1])[0]
    script = command.split("python ")[-1].strip()
    assert (ROOT / script).is_file()
