"""protocol/ and routing/ stay sans-I/O: no I/O libraries, no clock."""

import ast
from pathlib import Path

import pytest

import rbee_p2p

ROOT = Path(rbee_p2p.__file__).parent
PURE = ["protocol", "routing"]
FORBIDDEN_MODULES = {
    "trio", "libp2p", "socket", "asyncio", "anyio", "quart", "quart_trio", "hypercorn",
    "zeroconf", "llama_cpp", "torch", "diffusers", "selectors", "ssl", "http", "urllib",
    "subprocess", "threading", "multiprocessing", "time", "datetime", "random", "pathlib",
    "shutil", "tempfile", "io_uring", "requests", "httpx",
}
FORBIDDEN_CALLS = {"open", "input", "print"}


def pure_files():
    for package in PURE:
        yield from sorted((ROOT / package).rglob("*.py"))


def violations(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        for name in names:
            if name.split(".")[0] in FORBIDDEN_MODULES:
                found.append(f"{path.name}:{node.lineno} imports {name}")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            if node.func.id in FORBIDDEN_CALLS or node.func.id == "__import__":
                found.append(f"{path.name}:{node.lineno} calls {node.func.id}()")
        if isinstance(node, ast.Attribute) and node.attr in {"time", "monotonic", "now",
                                                            "utcnow", "perf_counter"}:
            found.append(f"{path.name}:{node.lineno} reads the clock (.{node.attr})")
    return found


@pytest.mark.parametrize("path", list(pure_files()), ids=lambda p: str(p.relative_to(ROOT)))
def test_pure_packages_do_no_io(path):
    assert violations(path) == []


def test_the_checker_catches_violations(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import trio\nfrom libp2p.host import x\nimport time\nt = time.time()\n"
                   "import datetime\nd = datetime.datetime.now()\nopen('f')\n")
    found = violations(bad)
    assert len(found) == 7, found
