"""The import graph, read from the source with ast: one way, srpo <- data <- models <- metrics <- checkpoint <- train;
metrics <- evaluate / judge <- experiments, benchmarks; no cycle; srpo.py on torch and the standard library alone."""
import ast
import glob
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECT = ("srpo", "data", "models", "metrics", "checkpoint", "train", "answers", "judge_prompts", "judge", "evaluate")
# What each module may import from the project: only what lies below it.
ALLOWED = {
    "srpo": set(),
    "data": {"srpo"},
    "models": {"srpo", "data"},
    "metrics": {"srpo", "data", "models"},
    "checkpoint": {"srpo", "data", "models", "metrics"},
    "train": {"srpo", "data", "models", "metrics", "checkpoint"},
    "answers": {"srpo", "data", "models", "metrics"},
    "judge_prompts": {"srpo", "data", "models", "metrics"},
    "judge": {"srpo", "data", "models", "metrics", "answers", "judge_prompts"},
    "evaluate": {"srpo", "data", "models", "metrics", "answers", "judge_prompts", "judge"},  # the CLI
}
TOP = {"experiments", "benchmarks"}  # may import any module above; nothing imports them


def imported(path):
    """Top-level names of every module that a file imports (at any depth of its code)."""
    with open(path, encoding="utf-8") as fh:
        tree = ast.parse(fh.read(), path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def graph():
    """{module: project modules it imports} of the top-level modules, experiments/ and benchmarks/."""
    edges = {name: imported(os.path.join(ROOT, name + ".py")) & (set(PROJECT) | TOP) for name in PROJECT}
    for folder in TOP:
        for path in glob.glob(os.path.join(ROOT, folder, "*.py")):
            edges[os.path.relpath(path, ROOT)] = imported(path) & (set(PROJECT) | TOP)
    return edges


def test_imports_go_one_way_only():
    for module, deps in graph().items():
        # experiments/, benchmarks/: any module below them, and their own package
        allowed = ALLOWED[module] if module in ALLOWED else set(PROJECT) | {os.path.dirname(module)}
        assert deps <= allowed, f"{module} imports {sorted(deps - allowed)}, which lie above it or beside it"


def find_cycle(edges):
    """An import cycle of the graph {module: imported modules} as [a, b, ..., a], or None (depth-first search)."""
    state = {}

    def visit(node, path):
        if state.get(node) == "open":
            return path + [node]
        if state.get(node) == "done":
            return None
        state[node] = "open"
        for dep in edges.get(node, ()):
            found = visit(dep, path + [node])
            if found:
                return found
        state[node] = "done"
        return None

    for node in edges:
        cycle = visit(node, [])
        if cycle:
            return cycle
    return None


def test_no_import_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checks_can_fail(tmp_path):
    """The cycle finder and the one-way rule catch a planted upward import."""
    path = tmp_path / "metrics.py"
    path.write_text("import train\nfrom evaluate import main\nimport experiments.cli\n")
    assert imported(path) == {"train", "evaluate", "experiments"}
    assert not imported(path) <= ALLOWED["metrics"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_srpo_imports_torch_and_the_standard_library_only():
    stdlib = set(sys.stdlib_module_names)
    outside = {name for name in imported(os.path.join(ROOT, "srpo.py")) if name not in stdlib}
    assert outside == {"torch"}
