"""MkDocs hook: the pages generated from the code at every build, so they cannot drift from it.

- `reference/params.md`: for each section of `ladd.config.Params` (the sections `ladd.params` reads params.yaml
  into), one table of every field: its dotted key, its type as written in the source, its default, its value in
  params.yaml, and its description, taken from the field's trailing `# comment` and the comment lines right above it
  (read with `ast` and `tokenize`; params.yaml's comment where the code has none). A field whose type is itself a
  dataclass is expanded into its own keys (`section.field.key`). Then the keys params.inpaint.yaml changes and the
  `distill.preset` values of `ladd/presets.py`. Replaces the marker `<!-- params-reference -->`.
- `<!-- stage-graph -->` on any page: dvc.yaml's stages with what `ladd/cli.py` calls for each, the ladd modules each
  imports (dvc.yaml's code deps), and what each reads and writes.
- CONTRIBUTING.md and CHANGELOG.md (repository root) as the pages `contributing.md` and `changelog.md`.

Importing `ladd.config` is light (numpy; no torch). `tests/test_docs.py` calls `params_reference_markdown` and
`reference_keys` to check the page covers every key of the params files and every config field.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import io
import re
import sys
import tokenize
import types
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MARKER = "<!-- params-reference -->"
PAGE = "reference/params.md"
STAGE_MARKER = "<!-- stage-graph -->"  # on any page: the stage table generated from dvc.yaml
ROOT_PAGES = {"contributing.md": "CONTRIBUTING.md", "changelog.md": "CHANGELOG.md"}
_README_REF = re.compile(r"\s*\((see )?README[^)]*\)")  # pointers into the README of the time


class Row(typing.NamedTuple):
    key: str  # dotted params.yaml key, e.g. distill.lr_g
    type: str  # the annotation as written in the source
    default: str  # YAML spelling of the default ("required" when there is none)
    description: str


def _config_module(root: Path):
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module("ladd.config")


def _comments(source: str) -> tuple[dict[int, str], set[int]]:
    """Comment text by line number, and the lines that hold nothing but a comment."""
    comments, alone, code_lines = {}, set(), set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            code_lines.update(range(tok.start[0], tok.end[0] + 1))
    alone = {line for line in comments if line not in code_lines}
    return comments, alone


def _class_fields(path: str, class_name: str) -> dict[str, tuple[str, str]]:
    """name -> (annotation source, description) for the annotated fields of `class_name` in the file at `path`."""
    source = Path(path).read_text()
    comments, alone = _comments(source)
    tree = ast.parse(source)
    out = {}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.ClassDef) and node.name == class_name):
            continue
        for stmt in node.body:
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            above, line = [], stmt.lineno - 1
            while line in alone:  # the comment block right above the field
                above.insert(0, comments[line])
                line -= 1
            trailing = [
                comments[n] for n in range(stmt.lineno, stmt.end_lineno + 1) if n in comments and n not in alone
            ]
            text = " ".join(part for part in (" ".join(above), " ".join(trailing)) if part)
            out[stmt.target.id] = (
                ast.get_source_segment(source, stmt.annotation) or ast.unparse(stmt.annotation),
                text,
            )
        break
    return out


def _yaml(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    if isinstance(value, str):
        return value if value and re.fullmatch(r"[\w./@:+-][\w ./@:+-]*", value) else repr(value)
    return repr(value)


def _dataclass_of(hint):
    """The dataclass a field's type names (also inside `X | None`), or None."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = inner[0] if len(inner) == 1 else None
    return hint if isinstance(hint, type) and dataclasses.is_dataclass(hint) else None


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _rows(cls: type, prefix: str) -> list[Row]:
    hints = typing.get_type_hints(cls)
    source = _class_fields(inspect.getsourcefile(cls), cls.__name__)
    rows = []
    for f in dataclasses.fields(cls):
        annotation, description = source.get(f.name, (str(hints[f.name]), ""))
        default = _default(f)
        nested = _dataclass_of(hints[f.name])
        if nested is not None:
            shown = "its own keys, below" if default is not None else "null"
            rows.append(Row(f"{prefix}.{f.name}", annotation, shown, description))
            rows += _rows(nested, f"{prefix}.{f.name}")
            continue
        shown = "required" if default is dataclasses.MISSING else _yaml(default)
        rows.append(Row(f"{prefix}.{f.name}", annotation, shown, description))
    return rows


def sections(root: Path = ROOT) -> list[tuple[str, type]]:
    """(params.yaml section, config dataclass) in the order of `ladd.config.Params` (what `ladd.params` reads)."""
    config = _config_module(root)
    hints = typing.get_type_hints(config.Params)
    return [(f.name, hints[f.name]) for f in dataclasses.fields(config.Params)]


def reference_rows(root: Path = ROOT) -> dict[str, list[Row]]:
    """Every params.yaml key, by section."""
    return {name: _rows(cls, name) for name, cls in sections(root)}


def reference_keys(root: Path = ROOT) -> set[str]:
    return {row.key for rows in reference_rows(root).values() for row in rows}


def _stage_readers(root: Path) -> dict[str, str]:
    """section -> the dvc.yaml stages that list it (or some of its keys) under `params`, as Markdown."""
    import yaml

    found: dict[str, dict[str, list[str]]] = {}
    stages = (yaml.safe_load((root / "dvc.yaml").read_text()) or {}).get("stages", {})
    for stage, spec in stages.items():
        for entry in spec.get("params", []) or []:
            for name in entry if isinstance(entry, dict) else [entry]:
                section, _, key = str(name).partition(".")
                keys = found.setdefault(section, {}).setdefault(stage, [])
                if key:
                    keys.append(f"`{name}`")
    return {
        section: ", ".join(f"`{stage}`" + (f" ({', '.join(keys)})" if keys else "") for stage, keys in by.items())
        for section, by in found.items()
    }


def flatten(tree, prefix: str = "") -> dict:
    """A params file's nested mappings as {dotted key: value}; lists and scalars are values (leaves)."""
    out = {}
    for key, value in (tree or {}).items():
        dotted = f"{prefix}{key}"
        out[dotted] = value
        if isinstance(value, dict):
            out.update(flatten(value, f"{dotted}."))
    return out


def yaml_comments(path: Path) -> dict[str, str]:
    """dotted key -> the trailing comment of its line in a params file (PyYAML drops comments)."""
    out: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    for line in path.read_text().splitlines():
        m = re.match(r"^(\s*)([A-Za-z_][\w-]*):(.*)$", line)
        if not m:
            continue
        indent = len(m.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        key = ".".join([k for _, k in stack] + [m.group(2)])
        out[key] = m.group(3).partition(" #")[2].strip()
        stack.append((indent, m.group(2)))
    return out


def _params_file(root: Path, name: str) -> dict:
    import yaml

    path = root / name
    return flatten(yaml.safe_load(path.read_text())) if path.is_file() else {}


def _cell(text: str) -> str:
    text = _README_REF.sub("", text).strip()
    return text.replace("|", "\\|") if text else ""


def _code(text: str) -> str:
    return f"`{text}`"  # Python-Markdown's tables keep a `|` inside a code span in its cell


def params_reference_markdown(root: Path = ROOT) -> str:
    """The generated part of the reference page: one section and table per params.yaml section."""
    readers = _stage_readers(root)
    params = _params_file(root, "params.yaml")
    comments = yaml_comments(root / "params.yaml") if (root / "params.yaml").is_file() else {}
    out = []
    for name, cls in sections(root):
        out.append(f"## `{name}`\n")
        doc = inspect.getdoc(cls)
        if doc and not doc.startswith(f"{cls.__name__}("):  # a written docstring, not the dataclass signature
            out.append(" ".join(doc.split("\n\n")[0].split()) + "\n")
        stages = readers.get(name)
        out.append(
            f"`{cls.__name__}` in `{Path(inspect.getsourcefile(cls)).relative_to(root).as_posix()}`. "
            + (
                f"Read by the dvc.yaml stages {stages}."
                if stages
                else "No dvc.yaml stage lists it as a param; every `ladd` command reads it."
            )
            + "\n"
        )
        out.append("| key | type | default | params.yaml | description |")  # params.yaml: its value there
        out.append("|---|---|---|---|---|")
        for row in _rows(cls, name):
            value = params.get(row.key)
            if row.key not in params or isinstance(value, dict):
                shown = ""
            else:
                shown = "same" if _yaml(value) == row.default else _code(_yaml(value))
            description = _cell(row.description or comments.get(row.key, ""))
            out.append(f"| {_code(row.key)} | {_code(row.type)} | {_code(row.default)} | {shown} | {description} |")
        out.append("")
    inpaint = _params_file(root, "params.inpaint.yaml")
    changed = [k for k, v in inpaint.items() if not isinstance(v, dict) and params.get(k, object()) != v]
    if changed:
        out.append("## `params.inpaint.yaml`\n")
        out.append("The inpainting run's params file is `params.yaml` with these values changed:\n")
        out.append("| key | params.yaml | params.inpaint.yaml |")
        out.append("|---|---|---|")
        out += [f"| {_code(k)} | {_code(_yaml(params.get(k)))} | {_code(_yaml(inpaint[k]))} |" for k in changed]
        out.append("")
    return "\n".join(out)


def _paths(entries, values: dict) -> list[str]:
    """dvc.yaml deps/outs/metrics/plots entries (strings or {path: options}) with ${...} resolved from params.yaml."""
    out = []
    for entry in entries or []:
        for path in entry if isinstance(entry, dict) else [entry]:
            out.append(re.sub(r"\$\{([^}]+)\}", lambda m: str(values.get(m.group(1), m.group(0))), str(path)))
    return out


def stage_entries(root: Path = ROOT) -> dict[str, list[str]]:
    """stage -> the functions its `run_<stage>` in ladd/cli.py imports (what `ladd <stage>` calls), read with ast."""
    tree = ast.parse((root / "ladd" / "cli.py").read_text())
    functions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    entries: dict[str, list[str]] = {}
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None
        if isinstance(target, ast.Name) and target.id == "STAGES" and isinstance(node.value, ast.Dict):
            for key, value in zip(node.value.keys, node.value.values):
                function = functions.get(value.id) if isinstance(value, ast.Name) else None
                imports = [n for n in ast.walk(function) if isinstance(n, ast.ImportFrom)] if function else []
                entries[key.value] = [f"{n.module}.{a.name}" for n in imports for a in n.names]
    return entries


def stage_graph_markdown(root: Path = ROOT) -> str:
    """dvc.yaml's stages in order: the command, the ladd modules only that stage's command imports (beyond those
    every stage loads), what it reads and what it writes; paths resolved from params.yaml."""
    import yaml

    values = _params_file(root, "params.yaml")
    stages = (yaml.safe_load((root / "dvc.yaml").read_text()) or {}).get("stages", {})
    code = {
        name: {d for d in _paths(spec.get("deps"), values) if d.startswith("ladd/")} for name, spec in stages.items()
    }
    shared = set.intersection(*code.values()) if code else set()
    entries = stage_entries(root)
    out = [
        "| stage | command | calls (`ladd/cli.py`) | ladd modules it imports (beyond every stage's) | reads | writes |",
        "|---|---|---|---|---|---|",
    ]
    for name, spec in stages.items():
        own = ", ".join(f"`{m.removeprefix('ladd/').removesuffix('.py')}`" for m in sorted(code[name] - shared))
        reads = ", ".join(f"`{d}`" for d in _paths(spec.get("deps"), values) if not d.startswith("ladd/")) or "–"
        writes = [*_paths(spec.get("outs"), values), *_paths(spec.get("metrics"), values)]
        writes = ", ".join(f"`{w}`" for w in writes + _paths(spec.get("plots"), values))
        calls = ", ".join(f"`{e}`" for e in entries.get(name, []))
        out.append(f"| `{name}` | `{spec.get('cmd', '')}` | {calls} | {own} | {reads} | {writes} |")
    common = ", ".join(f"`{m.removeprefix('ladd/').removesuffix('.py')}`" for m in sorted(shared))
    out.append(f"\nEvery stage also loads {common} (the modules `ladd/cli.py` imports for every command).\n")
    return "\n".join(out)


def _presets_markdown(root: Path) -> str:
    """`distill.preset` values: each preset's settings and the comment above it in ladd/presets.py."""
    presets = _config_module(root).DISTILL_PRESETS
    source = (root / "ladd" / "presets.py").read_text()
    comments, alone = _comments(source)
    notes = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Dict):
            for key in node.keys:
                if isinstance(key, ast.Constant) and key.value in presets:
                    above, line = [], key.lineno - 1
                    while line in alone:
                        above.insert(0, comments[line])
                        line -= 1
                    notes[key.value] = " ".join(above)
    out = [
        "## `distill.preset` values\n",
        "Each preset replaces the `distill` keys it names (from `ladd/presets.py`).\n",
        "| preset | what it is | settings |",
        "|---|---|---|",
    ]
    for name, settings in presets.items():
        shown = ", ".join(f"{k}: {_yaml(v)}" for k, v in settings.items())
        out.append(f"| {_code(name)} | {_cell(notes.get(name, ''))} | {_code(shown)} |")
    return "\n".join(out) + "\n"


# --- MkDocs events ------------------------------------------------------------------------------------------------


def on_files(files, config):
    from mkdocs.structure.files import File

    for page, source in ROOT_PAGES.items():
        path = ROOT / source
        if path.is_file() and files.get_file_from_path(page) is None:
            files.append(File.generated(config, page, content=path.read_text()))
    return files


def on_page_markdown(markdown, page, config, files):
    if page.file.src_uri == PAGE and MARKER in markdown:
        markdown = markdown.replace(MARKER, params_reference_markdown(ROOT) + "\n" + _presets_markdown(ROOT))
    if STAGE_MARKER in markdown:
        markdown = markdown.replace(STAGE_MARKER, stage_graph_markdown(ROOT))
    return markdown
