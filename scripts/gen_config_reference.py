"""The configuration reference (docs/reference/config.md), generated from the dataclasses of
``src/fedmarket/config.py``: every section, key, type and default, with the comment written above the key
(and the one after it on the same line).

The documentation site renders this page at build time (``scripts/mkdocs_hooks.py``), so it always follows
config.py; tests/test_docs_site.py checks that every key of the config dataclasses is on it. To read it
without building the site:

    .venv/bin/python scripts/gen_config_reference.py            # print the page
    .venv/bin/python scripts/gen_config_reference.py --out FILE  # write it

config.py is read as source (``ast``), not imported, so this needs neither the package nor torch.
"""

from __future__ import annotations

import argparse
import ast
import io
import re
import sys
import tokenize
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG_PY = ROOT / "src" / "fedmarket" / "config.py"
ROOT_CLASS = "ExperimentConfig"


@dataclass
class Field:
    name: str
    type: str
    default: str  # YAML spelling of the default, "" for a nested section
    comment: str
    section: str | None  # the dataclass of a nested section
    rule: str = ""  # what validation accepts, from the class's ConfigError messages


@dataclass
class Section:
    name: str
    doc: str
    fields: list[Field]


def _comments(source: str) -> dict[int, str]:
    """Line number → the text of the comment on that line (without ``#``)."""
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            out[tok.start[0]] = tok.string.lstrip("#").strip()
    return out


def _is_dataclass(node: ast.ClassDef) -> bool:
    for dec in node.decorator_list:
        target = dec.func if isinstance(dec, ast.Call) else dec
        name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")
        if name == "dataclass":
            return True
    return False


def _yaml(node: ast.expr, source: str) -> str:
    """A default value as it would be written in a YAML config."""
    try:
        value = ast.literal_eval(node)
    except ValueError:
        return ast.get_source_segment(source, node) or ""
    return _yaml_value(value, ast.get_source_segment(source, node) or "")


def _yaml_value(value: object, text: str = "") -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, int):
        return text.replace("_", "") if text else str(value)
    if isinstance(value, float):
        text = text.replace("_", "") if text else repr(value)
        mantissa, e, exponent = text.lower().partition("e")
        if e and "." not in mantissa:  # YAML 1.1 (PyYAML) reads 1e-5 as a string, 1.0e-5 as a number
            text = f"{mantissa}.0e{exponent}"
        return text
    if isinstance(value, list):
        return "[" + ", ".join(_yaml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml_value(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _default(node: ast.expr | None, source: str, classes: set[str]) -> tuple[str, str | None]:
    """(YAML default, nested dataclass name or None) of a field's right-hand side."""
    if node is None:
        return "(required)", None
    if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "field":
        for kw in node.keywords:
            if kw.arg == "default":
                return _yaml(kw.value, source), None
            if kw.arg == "default_factory":
                factory = kw.value
                if isinstance(factory, ast.Lambda):
                    return _yaml(factory.body, source), None
                name = getattr(factory, "id", "")
                if name in classes:
                    return "", name
                return {"dict": "{}", "list": "[]", "set": "[]", "tuple": "[]"}.get(name, f"{name}()"), None
        return "(required)", None
    return _yaml(node, source), None


_RULE = re.compile(r"^(?:\{prefix\}\.)?(\w+) ((?:must|needs) .*?)(?:, got \{.*)?$")


def _message(node: ast.expr, loop: dict[str, str], constants: dict[str, object]) -> str | None:
    """The text of a constant or f-string message, ``{prefix}`` kept, loop variables and module constants
    (``{list(MATMUL_CHOICES)}``) filled in."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if not isinstance(node, ast.JoinedStr):
        return None
    parts = []
    for value in node.values:
        if isinstance(value, ast.Constant):
            parts.append(str(value.value))
        elif isinstance(value.value, ast.Name) and value.value.id in loop:
            parts.append(loop[value.value.id])
        elif isinstance(value.value, ast.Name) and value.value.id == "prefix":
            parts.append("{prefix}")
        elif _constant(value.value, constants) is not None:
            parts.append(repr(_constant(value.value, constants)))
        else:
            parts.append("{" + ast.unparse(value.value) + "}")
    return "".join(parts)


def _constant(node: ast.expr, constants: dict[str, object]) -> object | None:
    """The value of a module constant ``NAME`` or ``list(NAME)``, else None."""
    if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "list" and len(node.args) == 1:
        value = _constant(node.args[0], constants)
        return list(value) if isinstance(value, tuple | list) else None
    if isinstance(node, ast.Name):
        return constants.get(node.id)
    return None


def _module_constants(tree: ast.Module) -> dict[str, object]:
    out = {}
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            try:
                out[stmt.targets[0].id] = ast.literal_eval(stmt.value)
            except ValueError:
                pass
    return out


def _rules(cls: ast.ClassDef, constants: dict[str, object]) -> dict[str, list[str]]:
    """Field name → what the class's validation requires of it (from its ConfigError messages and its
    ``_positive`` checks)."""
    rules: dict[str, list[str]] = {}

    def visit(node: ast.AST, loop: dict[str, str]) -> None:
        if isinstance(node, ast.For) and isinstance(node.target, ast.Name):
            try:
                values = ast.literal_eval(node.iter)
            except ValueError:
                values = None
            if isinstance(values, tuple | list) and all(isinstance(v, str) for v in values):
                for v in values:
                    for child in node.body:
                        visit(child, {**loop, node.target.id: v})
                return
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.args:
            if node.func.id == "ConfigError":
                text = _message(node.args[0], loop, constants)
                match = _RULE.match(text) if text else None
                if match:
                    rule = match.group(2).replace("{prefix}.", "")
                    rules.setdefault(match.group(1), []).append(rule)
            elif node.func.id == "_positive" and len(node.args) == 2:
                text = _message(node.args[1], loop, constants)
                if text and text.startswith("{prefix}."):
                    rules.setdefault(text.removeprefix("{prefix}."), []).append("must be a finite number > 0")
        for child in ast.iter_child_nodes(node):
            visit(child, loop)

    for stmt in cls.body:
        if isinstance(stmt, ast.FunctionDef):
            visit(stmt, {})
    return rules


def parse(path: Path = CONFIG_PY) -> dict[str, tuple[str, list[Field]]]:
    """Every dataclass of ``path``: name → (docstring, fields in order)."""
    source = path.read_text()
    tree = ast.parse(source)
    comments = _comments(source)
    lines = source.splitlines()
    nodes = [n for n in tree.body if isinstance(n, ast.ClassDef) and _is_dataclass(n)]
    names = {n.name for n in nodes}
    constants = _module_constants(tree)
    out = {}
    for node in nodes:
        fields = []
        rules = _rules(node, constants)
        for stmt in node.body:
            if not isinstance(stmt, ast.AnnAssign) or not isinstance(stmt.target, ast.Name):
                continue
            above = []
            line = stmt.lineno - 1
            while line >= 1 and lines[line - 1].strip().startswith("#"):
                above.insert(0, comments.get(line, ""))
                line -= 1
            inline = [comments[n] for n in range(stmt.lineno, stmt.end_lineno + 1) if n in comments]
            default, section = _default(stmt.value, source, names)
            fields.append(
                Field(
                    name=stmt.target.id,
                    type=ast.get_source_segment(source, stmt.annotation) or "",
                    default=default,
                    comment=" ".join(above + inline),
                    section=section,
                    rule="; ".join(dict.fromkeys(rules.get(stmt.target.id, []))),
                )
            )
        out[node.name] = (ast.get_docstring(node) or "", fields)
    return out


def sections(path: Path = CONFIG_PY) -> list[Section]:
    """The config's sections in file order of the root class: the top-level keys first, then one section per
    nested dataclass (recursively, dotted names)."""
    classes = parse(path)
    result: list[Section] = []

    def walk(cls: str, prefix: str) -> None:
        doc, fields = classes[cls]
        plain = [f for f in fields if f.section is None]
        result.append(Section(prefix or "top level", doc, plain))
        for f in fields:
            if f.section is not None:
                walk(f.section, f"{prefix}.{f.name}" if prefix else f.name)

    walk(ROOT_CLASS, "")
    return result


def _cell(text: str) -> str:
    """Text for a table cell: one line, ``|`` escaped outside code spans (inside them it does not split)."""
    parts = " ".join(text.split()).split("`")
    return "`".join(part if i % 2 else part.replace("|", "\\|") for i, part in enumerate(parts))


def render(path: Path = CONFIG_PY) -> str:
    secs = sections(path)
    out = [
        "# Configuration reference",
        "",
        "<!-- Generated from src/fedmarket/config.py by scripts/gen_config_reference.py; do not edit. -->",
        "",
        "An experiment is one YAML file; every key below is optional and takes the default shown. "
        "Configs are validated on load: an unknown key or a bad value is an error that names the key "
        "(`train.lr must be > 0, got -1.0`). Any key can be overridden on the command line with "
        "`--set section.key=value` (for example `--set train.lr=0.001`).",
        "",
        "`method.options` and `dataset.options` are checked by the method and the dataset loader "
        "themselves (`fedmarket methods` lists the methods; the method pages give their options).",
        "",
        "This page is generated from the dataclasses in `src/fedmarket/config.py`: descriptions are the "
        "comments written at each key there, and *checked on load* is what the config's validation "
        "requires (its error messages).",
        "",
        "Sections: " + ", ".join(f"[`{s.name}`](#{_anchor(s.name)})" for s in secs[1:]) + ".",
        "",
    ]
    for sec in secs:
        out.append(f"## `{sec.name}`" if sec.name != "top level" else "## Top level")
        out.append("")
        if sec.doc:
            out += [" ".join(sec.doc.split()), ""]
        if sec.name != "top level":
            parts = sec.name.split(".")
            out += ["```yaml"] + [f"{'  ' * i}{part}:" for i, part in enumerate(parts)]
            out += [f"{'  ' * len(parts)}{f.name}: {f.default}" for f in sec.fields]
            out += ["```", ""]
        out += ["| key | type | default | description | checked on load |", "|---|---|---|---|---|"]
        for f in sec.fields:
            key = f"{sec.name}.{f.name}" if sec.name != "top level" else f.name
            out.append(
                f"| `{key}` | {_cell(f'`{f.type}`')} | {_cell(f'`{f.default}`')} | {_cell(f.comment)} | {_cell(f.rule)} |"
            )
        out.append("")
    return "\n".join(out)


def _anchor(name: str) -> str:
    return name.replace(".", "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the page here (default: print it)")
    args = parser.parse_args(argv)
    text = render()
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
