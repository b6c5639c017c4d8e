"""Parse YAML (or JSON, a subset of it) while keeping the line of every key, so errors can point into the file."""
from __future__ import annotations

from typing import Any

import yaml

from netshrink.errors import NetshrinkError

Path_ = tuple[Any, ...]


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (YAML would silently keep the last one)."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise NetshrinkError(f"key '{key}' appears twice in one mapping (first on line {seen[key]})",
                                 where=f"line {key_node.start_mark.line + 1}")
        seen[key] = key_node.start_mark.line + 1
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _walk(node: yaml.Node, path: Path_, lines: dict[Path_, int]) -> None:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            _walk(value_node, path + (key,), lines)
            lines[path + (key,)] = key_node.start_mark.line + 1  # the key's own line reads best in errors
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _walk(item, path + (index,), lines)


def load_with_lines(text: str, source: str) -> tuple[Any, dict[Path_, int]]:
    """The parsed document and a map from key path (('stages', 0, 'prune', 'sparsity')) to 1-based line number."""
    try:
        node = yaml.compose(text, Loader=_UniqueKeyLoader)
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (SafeLoader subclass)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        raise NetshrinkError(f"not valid YAML/JSON: {exc.problem}", where=f"{source}{line}") from None
    except NetshrinkError as exc:
        raise NetshrinkError(exc.what, where=f"{source}:{exc.where.removeprefix('line ')}") from None
    lines: dict[Path_, int] = {}
    if node is not None:
        _walk(node, (), lines)
    return data, lines


def line_of(lines: dict[Path_, int], path: Path_) -> int | None:
    """Line of `path`, or of its nearest ancestor present in the file (a missing key points at its parent)."""
    path = tuple(path)
    while path:
        if path in lines:
            return lines[path]
        path = path[:-1]
    return lines.get(())
