"""The code's shape, checked: imports point only down the floors ARCHITECTURE.md describes (or along a floor,
never in a circle), and ksm_core stays pure PyTorch. Reads the source with ast (imports inside functions count
too); starts nothing."""
from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: pipeline/'s floors, lowest first; a module imports only from its own floor or below (ARCHITECTURE.md)
FLOORS: dict[str, int] = {
    "pipeline": 0, "pipeline.errors": 0, "pipeline.config": 0, "pipeline.validation": 0, "pipeline.redact": 0, "pipeline.records": 0,
    "pipeline.data": 1, "pipeline.tracking": 1, "pipeline.store": 1, "pipeline.probes": 1, "pipeline.present": 1,
    "pipeline.report": 1, "pipeline.params": 1, "pipeline.runtime": 1, "pipeline.claims": 1, "pipeline.served": 1,
    "pipeline.served_model": 1,
    "pipeline.identity": 1, "pipeline.worker": 1, "pipeline.unlogged": 1, "pipeline.compare_report": 1, "pipeline.ledger": 1,
    "pipeline.jobs": 2, "pipeline.backbone_dp": 2, "pipeline.lineage": 2,
    "pipeline.fanout": 3, "pipeline.export": 3, "pipeline.sequence": 3, "pipeline.evaluate": 3, "pipeline.compare": 3,
    "pipeline.chain": 3,
    "pipeline.follow": 3,
    "pipeline.tune": 4,
}


def floor_of(module: str) -> int:
    """The floor of a module: its own entry, else its package's (pipeline.data.loader -> pipeline.data)."""
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in FLOORS and (i > 1 or len(parts) == 1):
            return FLOORS[".".join(parts[:i])]
    raise KeyError(module)


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    return imports_in(path.read_text(), module_name(path), path.name == "__init__.py")


def imports_in(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the source, relative ones resolved."""
    package = module if is_package else module.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
                # `from . import outputs` names a module, not an attribute
                out += [(node.lineno, mod if node.module else f"{mod}.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, node.module or ""))
    return out


PIPELINE_FILES = sorted((ROOT / "pipeline").rglob("*.py"))


@pytest.mark.parametrize("path", PIPELINE_FILES, ids=[str(p.relative_to(ROOT)) for p in PIPELINE_FILES])
def test_pipeline_imports_only_its_own_floor_or_below(path):
    me = module_name(path)
    mine = floor_of(me)  # a KeyError here: a new module needs its floor in FLOORS (and in ARCHITECTURE.md)
    upward = [f"line {line}: {mod} (floor {floor_of(mod)})" for line, mod in imports_of(path)
              if mod.split(".")[0] == "pipeline" and floor_of(mod) > mine]
    assert not upward, f"{me} (floor {mine}) imports from a higher floor: {upward}"


def import_graph(files: list[Path]) -> dict[str, set[str]]:
    """module -> the pipeline modules it imports at any level, each resolved to the file that defines it
    (``from .data.manifest import is_local``: pipeline.data.manifest; ``from .jobs import task_job``: pipeline.jobs)."""
    known = {module_name(p) for p in files}

    def resolve(mod: str) -> str:
        parts = mod.split(".")
        return next((".".join(parts[:i]) for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in known), mod)

    return {module_name(p): {resolve(mod) for _, mod in imports_of(p) if mod.split(".")[0] == "pipeline"}
            - {module_name(p)} for p in files}


def reaches(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module ``start`` imports, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def same_floor_cycles(graph: dict[str, set[str]]) -> list[str]:
    """The imports of a same-floor module that imports the importer back, directly or transitively."""
    return sorted(f"{a} -> {b} -> ... -> {a}" for a, deps in graph.items() for b in deps
                  if floor_of(a) == floor_of(b) and a in reaches(graph, b))


def test_no_module_imports_a_same_floor_module_that_imports_it_back():
    """Same-floor imports are allowed only one way: a module may import one of its floor only if that one does not
    import it back, directly or transitively (imports inside functions count)."""
    cycles = same_floor_cycles(import_graph(PIPELINE_FILES))
    assert not cycles, cycles


def test_the_cycle_check_sees_a_cycle():
    """The walker itself: a function-level import that closes a loop through a third module is found."""
    src = {"pipeline.sequence": "from .export import export_after_sequence\nfrom .lineage import open_inputs\n",
           "pipeline.export": "def run_export():\n    from .fanout import fan_out\n",
           "pipeline.fanout": "def f():\n    from . import sequence\n",
           "pipeline.lineage": ""}
    graph = {m: {mod for _, mod in imports_in(s, m, is_package=False)} for m, s in src.items()}
    assert graph["pipeline.fanout"] == {"pipeline.sequence"}
    assert same_floor_cycles(graph) == ["pipeline.export -> pipeline.fanout -> ... -> pipeline.export",
                                        "pipeline.fanout -> pipeline.sequence -> ... -> pipeline.fanout",
                                        "pipeline.sequence -> pipeline.export -> ... -> pipeline.sequence"]


@pytest.mark.parametrize("path", sorted((ROOT / "ksm_core").glob("*.py")), ids=lambda p: p.name)
def test_ksm_core_is_pure_pytorch(path):
    banned = {"pipeline", "ray", "mlflow", "hydra", "omegaconf", "webdataset"}
    found = [f"line {line}: {mod}" for line, mod in imports_of(path) if mod.split(".")[0] in banned]
    assert not found, f"ksm_core/{path.name} imports {found}"


def test_the_floor_check_sees_a_violation():
    """The walker itself: upward imports inside a function, written relatively, are found and placed."""
    src = "def f():\n    from ..tune.driver import run_tune\n    from .. import jobs\n"
    found = [m for _, m in imports_in(src, "pipeline.data.loader", is_package=False)]
    assert found == ["pipeline.tune.driver", "pipeline.jobs"]
    assert floor_of("pipeline.tune.driver") == 4 and floor_of("pipeline.jobs") == 2 > floor_of("pipeline.data.loader")


def test_nothing_in_the_project_points_outside_it():
    """Docs and code name no file outside the repository (a user who clones it has nothing else)."""
    skip = {"outputs", "data", "mlartifacts", "__pycache__"}
    # the team folder beside a checkout, spelled in pieces so that this guard does not itself name it
    team = "shared"
    outside = (f"../{team}", f"{team}/DESIGN")
    hits = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if (d == ".ci" or not d.startswith(".")) and d not in skip]  # not .git, .venv, outputs
        for name in files:
            p = Path(folder) / name
            if p.suffix in (".py", ".md", ".sh", ".yaml", ".toml", "") and p != Path(__file__):
                text = p.read_text(errors="replace")
                if any(needle in text for needle in outside):
                    hits.append(str(p.relative_to(ROOT)))
    assert not hits, hits


def test_log_is_defined_once():
    """``Log`` (where a message for the user goes) is ``errors.Log`` everywhere: no other module defines its own
    alias, and no ``log`` parameter spells the type out another way."""
    defined, spelled = [], []
    for path in PIPELINE_FILES:
        for n in ast.walk(ast.parse(path.read_text())):
            targets = n.targets if isinstance(n, ast.Assign) else [n.target] if isinstance(n, ast.AnnAssign) else []
            if any(isinstance(t, ast.Name) and t.id == "Log" for t in targets):
                defined.append(module_name(path))
            if isinstance(n, ast.arg) and n.arg == "log" and n.annotation is not None and "Log" not in {
                    x.id for x in ast.walk(n.annotation) if isinstance(x, ast.Name)}:  # Log, or Log | None
                spelled.append(f"{module_name(path)} line {n.lineno}: log: {ast.unparse(n.annotation)}")
    assert defined == ["pipeline.errors"] and not spelled, (defined, spelled)
