"""The README's fenced code blocks, for the tests that check them against CI and run them."""

from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def fenced_blocks(text: str, language: str) -> list[str]:
    """The contents of every ```language block of ``text``, in order (other blocks skipped)."""
    blocks, inside, current = [], False, []
    for line in text.splitlines():
        if line.strip().startswith("```"):
            if inside:
                blocks.append("\n".join(current))
                current = []
            inside = not inside and line.strip() == f"```{language}"
            continue
        if inside:
            current.append(line)
    return blocks
