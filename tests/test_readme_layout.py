"""The README's layout block names every package and top-level module under src/fedmarket."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _layout_block() -> str:
    text = (REPO / "README.md").read_text()
    match = re.search(r"```\nsrc/fedmarket/\n(.*?)```", text, re.S)
    assert match, "README has no layout block starting with src/fedmarket/"
    return match.group(1)


def test_readme_layout_names_every_package_and_module():
    block = _layout_block()
    src = REPO / "src" / "fedmarket"
    names = [f"{p.name}/" for p in src.iterdir() if (p / "__init__.py").is_file()]
    names += [p.name for p in src.glob("*.py") if p.name not in {"__init__.py", "__main__.py"}]
    missing = [n for n in sorted(names) if not re.search(rf"(?<![\w/]){re.escape(n)}", block)]
    assert not missing, f"README layout does not name: {', '.join(missing)}"


def test_readme_layout_names_nothing_that_does_not_exist():
    block = _layout_block()
    src = REPO / "src" / "fedmarket"
    for name in re.findall(r"\b([a-z_]+\.py)\b", block):
        assert list(src.rglob(name)), f"README layout names {name}, which is not under src/fedmarket"
    for name in re.findall(r"(?m)^  ([a-z_]+)/", block):
        assert (src / name).is_dir(), f"README layout names {name}/, which is not under src/fedmarket"
