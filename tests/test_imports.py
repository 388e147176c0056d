"""The package's import graph has no cycles: every module-to-module import, lazy ones inside functions included,
read from the source with ast. Also: one activation table, read back correctly from modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

from fff_moe_plugin.activations import NAMES, activation_fn, activation_module, activation_name

ROOT = Path(__file__).resolve().parent.parent / "fff_moe_plugin"


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (``from .x import y`` counts as x.y when that is a module)."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in modules else module for a in node.names]
            for t in targets:
                while t not in modules and "." in t:
                    t = t.rpartition(".")[0]
                if t in modules and t != name:
                    deps.add(t)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_package_has_no_import_cycles():
    graph = import_graph()
    assert "fff_moe_plugin.fff" in graph and "fff_moe_plugin.block" in graph["fff_moe_plugin.fff"]
    assert cycles(graph) == []


def test_the_core_imports_no_framework():
    graph = import_graph()
    # the integrations, the DeepSpeed door (fff_moe_plugin.deepspeed) and the commands import frameworks lazily
    doors = (".integrations", ".commands", ".experiments")
    core = [m for m in graph if not any(d in m for d in doors) and m != "fff_moe_plugin.deepspeed"]
    assert "fff_moe_plugin.fff" in core and "fff_moe_plugin.ops.grouped" in core
    for module in core:
        source = _modules()[module].read_text(encoding="utf-8")
        for framework in ("deepspeed", "fairseq", "tutel"):
            assert f"import {framework}" not in source and f"from {framework}" not in source, (module, framework)


@pytest.mark.parametrize("name", NAMES)
def test_activation_table_round_trips(name):
    module = activation_module(name)
    assert activation_name(module) == name
    x = torch.linspace(-3, 3, 13)
    torch.testing.assert_close(module(x), activation_fn(name)(x))


def test_an_activation_with_no_name_is_not_mistaken_for_one():
    assert activation_name(nn.GELU(approximate="tanh")) is None
    assert activation_name(nn.LeakyReLU()) is None
    with pytest.raises(ValueError, match="activation 'swish' is not known: must be one of relu"):
        activation_fn("swish")


def test_the_kernels_import_only_the_tree_math_and_the_activations():
    graph = import_graph()
    allowed = {"fff_moe_plugin.tree", "fff_moe_plugin.activations"}
    ops = [m for m in graph if m.startswith("fff_moe_plugin.ops")]
    assert "fff_moe_plugin.ops.inference" in ops
    for module in ops:
        outside = {d for d in graph[module] if not d.startswith("fff_moe_plugin.ops")} - allowed
        # the package's __init__ is imported on the way to any module of it: a parent package is no dependency
        outside.discard("fff_moe_plugin")
        assert not outside, (module, outside)


def test_fairseq_reaches_the_backends_only_through_the_expert_parallel_interface():
    graph = import_graph()
    fairseq = [m for m in graph if m.startswith("fff_moe_plugin.integrations.fairseq")]
    for module in fairseq:
        backends = {d for d in graph[module] if d.startswith(("fff_moe_plugin.integrations.deepspeed.",
                                                              "fff_moe_plugin.integrations.tutel"))}
        # the one place that builds a backend's layer by name
        if module == "fff_moe_plugin.integrations.fairseq.sharded":
            assert backends <= {"fff_moe_plugin.integrations.deepspeed.layer", "fff_moe_plugin.integrations.tutel"}
        else:
            assert not backends, (module, backends)
    for module in [m for m in graph if m.startswith("fff_moe_plugin.integrations.deepspeed")]:
        assert not any("fairseq" in d for d in graph[module]), module
