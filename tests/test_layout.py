"""The package's layers: the import graph has no cycle and points downwards (serving <- core <- steps <-
integrations and the top level), and importing the config loads no serving code."""

import ast
import subprocess
import sys
from pathlib import Path

import bt_trl

PACKAGE = Path(bt_trl.__file__).parent
LAYERS = ("serving", "core", "steps", "integrations")


def module_imports() -> dict[str, set[str]]:
    """Each bt_trl module and the bt_trl modules it imports at module level."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ["bt_trl", *path.relative_to(PACKAGE).with_suffix("").parts]
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in modules.items():
        imported = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("bt_trl"):
                for alias in node.names:
                    submodule = f"{node.module}.{alias.name}"
                    imported.add(submodule if submodule in modules else node.module)
            elif isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names if alias.name in modules}
        graph[name] = imported - {name, "bt_trl"}
    return graph


def test_import_graph_has_no_cycle_and_points_down():
    graph = module_imports()
    assert graph["bt_trl.trainer"] and graph["bt_trl.core.runner"]  # the parse found imports

    def layer(module: str) -> int:
        part = module.split(".")[1] if module.count(".") else ""
        return LAYERS.index(part) if part in LAYERS else len(LAYERS)

    upward = [(m, d) for m, deps in graph.items() for d in deps if layer(m) < len(LAYERS) and layer(d) > layer(m)
              and d not in ("bt_trl.config", "bt_trl.tasks")]
    assert not upward, upward

    visiting, done = [], set()

    def visit(module: str) -> None:
        assert module not in visiting, f"import cycle: {' -> '.join(visiting[visiting.index(module):] + [module])}"
        if module in done:
            return
        visiting.append(module)
        for dependency in graph.get(module, ()):
            visit(dependency)
        visiting.pop()
        done.add(module)

    for module in graph:
        visit(module)


def test_importing_the_config_loads_no_serving_code():
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, bt_trl.config; print(' '.join(sorted(sys.modules)))"],
        capture_output=True, text=True, check=True).stdout.split()
    serving = [m for m in loaded if m.startswith(("bt_trl.serving.engine", "bt_trl.serving.structured",
                                                  "bt_trl.serving.vllm", "llguidance", "vllm", "bt_trl.trainer",
                                                  "dspy"))]
    assert "bt_trl.config" in loaded and not serving, serving
