"""The package's structure (docs/architecture.md): dependencies point down, no import cycles (imports inside
functions included), one small training loop, and no process-environment changes on import."""

import ast
import os
import subprocess
import sys

from tests.helpers.launch import REPO_ROOT

PACKAGE = os.path.join(REPO_ROOT, "megadoremi")
LOWER = ("doremi", "data", "model", "distributed", "utils")


def module_files() -> dict[str, str]:
    modules = {}
    for directory, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                module = os.path.relpath(path[:-3], REPO_ROOT).replace(os.sep, ".")
                modules[module.removesuffix(".__init__")] = path
    return modules


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports anywhere in its source (top level or inside functions)."""
    modules = module_files()

    def resolve(name):
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    edges = {}
    for module, path in modules.items():
        package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(open(path).read(), path)):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                names = [f"{base}.{alias.name}" for alias in node.names] + [base]
            for name in names:
                target = resolve(name) if name.startswith("megadoremi") else None
                if target and target != module and not module.startswith(target + "."):
                    targets.add(target)
        edges[module] = targets
    return edges


def test_lower_layers_never_import_train():
    upward = [f"{module} -> {target}" for module, targets in import_graph().items() for target in targets
              if module.split(".")[1:2] and module.split(".")[1] in LOWER and target.startswith("megadoremi.train")]
    assert upward == []


def test_no_import_cycles():
    edges = import_graph()
    cycles, state = [], {}

    def visit(module, path):
        state[module] = "active"
        for target in sorted(edges[module]):
            if state.get(target) == "active":
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_the_graph_sees_function_level_imports():
    # The check above would be vacuous if imports inside functions were missed: the trainer imports the doremi
    # package only through train.build, and the workflow imports preprocessing inside a method.
    edges = import_graph()
    assert "megadoremi.doremi.proxy" in edges["megadoremi.train.build"]
    assert "megadoremi.data.preprocess_mpi" in edges["megadoremi.workflow"]


def test_trainer_is_one_small_loop():
    with open(os.path.join(PACKAGE, "train", "trainer.py")) as handle:
        assert len(handle.readlines()) < 300


def test_importing_the_package_leaves_the_environment_alone():
    script = ("import os; before = dict(os.environ); import megadoremi, megadoremi.train.trainer, "
              "megadoremi.workflow; assert dict(os.environ) == before, set(os.environ.items()) ^ set(before.items())")
    env = {key: value for key, value in os.environ.items() if key != "TORCH_EXTENSIONS_DIR"}
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
