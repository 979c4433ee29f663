"""Imports point one way (README "Architecture"): api -> dispatch -> {engines, mesh} ->
{protocol, routing}.  mesh/ knows dispatch's request types, never the dispatcher or api/;
nothing but the composition root imports api/."""

import ast
from pathlib import Path

import pytest

import rbee_p2p

ROOT = Path(rbee_p2p.__file__).parent

# package -> modules of rbee_p2p it must never import
RULES = {
    "mesh": ("api", "dispatch.dispatcher", "dispatch.local", "node", "cli", "tenancy"),
    "dispatch": ("api", "mesh", "node", "cli"),
    "engines": ("api", "dispatch", "mesh", "node", "cli", "tenancy"),
    "tenancy": ("api", "mesh", "node", "cli"),
    "store": ("api", "dispatch", "mesh", "engines", "node", "cli"),
    "protocol": ("api", "dispatch", "mesh", "engines", "node", "cli", "tenancy", "store"),
    "routing": ("api", "dispatch", "mesh", "engines", "node", "cli", "tenancy", "store"),
}


def imported(path: Path, source: str | None = None) -> list[tuple[int, str]]:
    """(line, absolute module under rbee_p2p) for each import in ``path``."""
    package = path.relative_to(ROOT).with_suffix("").parts[:-1]
    out = []
    for node in ast.walk(ast.parse(source or path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[:len(package) - node.level + 1])
                module = ".".join([*base, *(node.module.split(".") if node.module else [])])
                names = [module] + [f"{module}.{a.name}" for a in node.names]
            elif node.module and node.module.startswith("rbee_p2p."):
                names = [node.module.removeprefix("rbee_p2p.")]
            else:
                continue
            out += [(node.lineno, n) for n in names]
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name.removeprefix("rbee_p2p.")) for a in node.names
                    if a.name.startswith("rbee_p2p.")]
    return out


def breaks(path: Path, banned: tuple[str, ...], source: str | None = None) -> list[str]:
    return [f"{path.relative_to(ROOT)}:{line} imports {name}"
            for line, name in imported(path, source)
            if any(name == b or name.startswith(b + ".") for b in banned)]


@pytest.mark.parametrize("package", sorted(RULES))
def test_imports_point_one_way(package):
    found = [b for path in sorted((ROOT / package).rglob("*.py"))
             for b in breaks(path, RULES[package])]
    assert found == []


def test_only_the_composition_root_imports_the_http_layer():
    users = {str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py")
             if not p.is_relative_to(ROOT / "api") and breaks(p, ("api",))}
    assert users == {"node.py"}


def test_the_checker_sees_relative_and_absolute_imports():
    source = ("from ..api.schemas import Call\nfrom ..dispatch import dispatcher\n"
              "import rbee_p2p.api.app\nfrom ..dispatch.request import Request\n")
    found = breaks(ROOT / "mesh" / "probe.py", RULES["mesh"], source)
    assert {f.split(" ")[0] for f in found} == {"mesh/probe.py:1", "mesh/probe.py:2",
                                                "mesh/probe.py:3"}
