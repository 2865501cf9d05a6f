"""Each benchmark owns one marked section of benchmarks/README.md and rewrites only that."""

from __future__ import annotations

from pathlib import Path

README = Path(__file__).resolve().parent / "README.md"


def write_section(name: str, text: str, readme: Path = README) -> None:
    """Replace the section between `<!-- name:start -->` and `<!-- name:end -->` (appended when absent)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    section = f"{start}\n{text.strip(chr(10))}\n{end}"
    current = readme.read_text() if readme.exists() else "# Benchmarks\n\nDated results; each script owns its section.\n"
    if start in current and end in current:
        head, rest = current.split(start, 1)
        current = head + section + rest.split(end, 1)[1]
    else:
        current = current.rstrip("\n") + "\n\n" + section + "\n"
    readme.write_text(current)
