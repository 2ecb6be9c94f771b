"""The walls between the parts of `research/`, checked on the source (README: "Where each contract lives"):

- no import cycle anywhere, counting imports inside functions too (a cycle dodged by a local import is
  still a cycle);
- the task readers of research/data import the shared split types (research/data/split.py), never each other;
  the objectives, the train step, evaluation and the attacks import no task reader: they read the `Batch`
  (and a split's own methods);
- nothing outside a model file sniffs the model family (sys.modules, inspect.signature, hasattr on a config):
  the family record says what a family provides.
"""

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "research"
READERS = {"research.data.classification", "research.data.tagging", "research.data.lm", "research.data.dialogue",
           "research.data.spurious"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str) -> set[str]:
    """The research modules `name` imports, anywhere in the file (`from a import b` is module a.b when that
    is a module, else a)."""
    out = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("research")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("research"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in MODULES else node.module)
    return out - {name}


def test_there_is_no_import_cycle():
    graph = {name: imports_of(name) & set(MODULES) for name in MODULES}
    state: dict[str, str] = {}  # "open" while on the stack, "done" after

    def visit(name: str, stack: list[str]) -> None:
        state[name] = "open"
        for dep in sorted(graph[name]):
            if state.get(dep) == "open":
                cycle = stack[stack.index(dep):] + [dep] if dep in stack else [name, dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, [*stack, dep])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert len(state) == len(MODULES) > 30  # every module visited


def test_task_readers_share_only_the_split_module():
    for reader in READERS:
        others = {m for m in imports_of(reader) if m.startswith("research.data.")} - {"research.data.split"}
        assert others <= {"research.data.spurious"} and (others == set() or reader.endswith("classification")), \
            f"{reader} imports {sorted(others)}: readers share research/data/split.py, not each other"


@pytest.mark.parametrize("consumer", ["research.objectives.supervised", "research.objectives.adversarial",
                                      "research.objectives.invariance", "research.objectives.counterfactual",
                                      "research.attacks", "research.sharding", "research.batch",
                                      "research.evaluate"])
def test_batch_consumers_import_no_task_reader(consumer):
    assert not imports_of(consumer) & READERS, f"{consumer} imports a task reader: it should read the Batch"


def test_nothing_sniffs_the_model_family():
    sniffing = re.compile(r"sys\.modules|inspect\.signature|hasattr\([^,]*config\b")  # hasattr(model.config, ...
    # research/metrics.py hides torch from tensorboardX's import (it costs seconds and we log floats): its
    # sys.modules lines name torch, which is not a model family.
    found = [f"{name}: {line.strip()}" for name, path in MODULES.items()
             for line in path.read_text().splitlines() if sniffing.search(line)
             and not (name == "research.metrics" and '"torch"' in line)]
    assert not found, "ask the family record (research/models/family.py) instead:\n" + "\n".join(found)
