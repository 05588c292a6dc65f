"""The code's shape, checked: imports point only down the floors ARCHITECTURE.md describes, and ksm_core stays
pure PyTorch. Reads the source with ast (imports inside functions count too); starts nothing."""
from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: pipeline/'s floors, lowest first; a module imports only from its own floor or below (ARCHITECTURE.md)
FLOORS: dict[str, int] = {
    "pipeline": 0, "pipeline.errors": 0, "pipeline.config": 0, "pipeline.redact": 0,
    "pipeline.data": 1, "pipeline.tracking": 1, "pipeline.store": 1, "pipeline.probes": 1, "pipeline.present": 1,
    "pipeline.report": 1, "pipeline.params": 1, "pipeline.runtime": 1, "pipeline.claims": 1, "pipeline.served": 1,
    "pipeline.jobs": 2, "pipeline.backbone_dp": 2,
    "pipeline.orchestrate": 3, "pipeline.evaluate": 3, "pipeline.compare": 3, "pipeline.follow": 3,
    "pipeline.export": 3,
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
