"""Each dvc.yaml stage's code dependencies: the `ladd` modules its command runs, found by following every
`ladd` import (at any depth, inside functions too) from the stage's entry in `ladd/cli.py`.

    python scripts/stage_deps.py          # rewrite the code lines of every stage's deps in dvc.yaml
    python scripts/stage_deps.py --check  # exit 1 naming each stage whose listed code differs

A stage's entry is what `ladd <stage>` executes: cli.py itself, its top-level imports, the imports inside
`main` and `_main` (shared by every stage) and those inside the stage's function in `STAGES`. Package
`__init__.py` files count: importing a module runs them.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = "ladd/cli.py"
SHARED_FUNCTIONS = ("main", "_main")  # run for every stage
CODE_LINE = re.compile(r"^      - ladd/\S+\.py\s*$")


def _module_file(root: Path, name: str) -> str | None:
    """The repository path of module `name` (a package's __init__.py), or None when it is not ladd's."""
    base = root / Path(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path.relative_to(root).as_posix()
    return None


def _annotations_only(nodes) -> set[int]:
    """The ids of the nodes under `if TYPE_CHECKING:`: imports for type annotations, which never run."""
    skip = set()
    for node in (n for top in nodes for n in ast.walk(top)):
        test = getattr(node, "test", None)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in (getattr(test, "id", None), getattr(test, "attr", None)):
            skip |= {id(n) for statement in node.body for n in ast.walk(statement)}
    return skip


def _imports(root: Path, nodes) -> set[str]:
    """The ladd module files imported anywhere under `nodes` (`from ladd.x import y` counts ladd/x/y.py when
    y is a module, else ladd/x.py), but for type annotations alone."""
    found, skip = set(), _annotations_only(nodes)
    for node in (n for top in nodes for n in ast.walk(top)):
        if id(node) in skip:
            continue
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [
                f"{node.module}.{a.name}" if _module_file(root, f"{node.module}.{a.name}") else node.module
                for a in node.names
            ]
        for name in names:
            if name == "ladd" or name.startswith("ladd."):
                parts = name.split(".")  # the packages above it run too
                found |= {f for i in range(1, len(parts) + 1) if (f := _module_file(root, ".".join(parts[:i])))}
    return found


def closure(root: Path, files: set[str]) -> set[str]:
    """`files` and every ladd module file they import, directly or not."""
    seen, todo = set(), list(files)
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo += _imports(root, [ast.parse((root / path).read_text(), path)]) - seen
    return seen


def stage_code(root: Path = ROOT) -> dict[str, list[str]]:
    """Stage name -> the sorted repository paths of the ladd code its command runs."""
    tree = ast.parse((root / CLI).read_text(), CLI)
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    registry = next(
        n.value
        for n in tree.body
        if isinstance(n, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "STAGES" for t in n.targets)
    )
    top_level = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    shared = _imports(root, top_level + [functions[f] for f in SHARED_FUNCTIONS])
    stages = {}
    for key, value in zip(registry.keys, registry.values):  # cli.py's other functions are other stages'
        stages[key.value] = sorted({CLI} | closure(root, shared | _imports(root, [functions[value.id]])))
    return stages


def listed_code(dvc_yaml: str) -> dict[str, list[str]]:
    """Stage name -> the ladd code paths dvc.yaml lists in its deps."""
    import yaml

    stages = yaml.safe_load(dvc_yaml)["stages"]
    return {
        name: sorted(d for d in stage.get("deps", []) if isinstance(d, str) and d.startswith("ladd/"))
        for name, stage in stages.items()
    }


def rewrite(dvc_yaml: str, code: dict[str, list[str]]) -> str:
    """dvc.yaml with each stage's code lines (the `- ladd/...py` lines opening its deps) replaced by `code`;
    everything else, comments included, kept as it is."""
    lines, out, stage, in_deps = dvc_yaml.splitlines(keepends=True), [], None, False
    for line in lines:
        if m := re.match(r"^  (\w+):\s*$", line):
            stage = m.group(1)
        if CODE_LINE.match(line) and in_deps:
            continue
        out.append(line)
        in_deps = line.strip() == "deps:"
        if in_deps and stage in code:
            out += [f"      - {path}\n" for path in code[stage]]
    return "".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare only; exit 1 when dvc.yaml differs")
    ap.add_argument("--root", type=Path, default=ROOT)
    args = ap.parse_args()
    path = args.root / "dvc.yaml"
    text, code = path.read_text(), stage_code(args.root)
    listed = listed_code(text)
    wrong = {
        s: (sorted(set(code[s]) - set(listed.get(s, []))), sorted(set(listed.get(s, [])) - set(code[s])))
        for s in code
        if code[s] != listed.get(s, [])
    }
    if args.check:
        for s, (missing, extra) in wrong.items():
            print(
                f"{path}: stage {s}: "
                + "; ".join(
                    p
                    for p in (
                        f"missing {', '.join(missing)}" if missing else "",
                        f"not imported {', '.join(extra)}" if extra else "",
                    )
                    if p
                )
                + " (run python scripts/stage_deps.py)",
                file=sys.stderr,
            )
        return 1 if wrong else 0
    if wrong:
        path.write_text(rewrite(text, code))
        print(f"{path}: code deps of {', '.join(wrong)} rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
