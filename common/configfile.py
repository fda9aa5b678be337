"""The config-file convention of both programs: YAML, validated once and strictly with msgspec, each
error naming the file, the line and (inside a named list entry) the entity."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, TypeVar

import msgspec
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError

T = TypeVar("T")


class ConfigError(Exception):
    """One or more problems in a config file, each with its file and line."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such file"]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([f"{path}: cannot read: {e}"]) from None


def parse_yaml(path: Path, text: str) -> tuple[Any, Any]:
    """YAML text → (plain data, the ruamel node tree that knows every line)."""
    yaml = YAML(typ="rt")
    yaml.allow_duplicate_keys = False
    try:
        tree = yaml.load(text)
    except MarkedYAMLError as e:
        mark = e.problem_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError([f"{path}{line}: not valid YAML: {e.problem}"]) from None
    except Exception as e:  # ruamel raises several unrelated types for duplicate keys and the like
        raise ConfigError([f"{path}: not valid YAML: {e}"]) from None
    return plain(tree), tree


def read_yaml(path: Path) -> tuple[Any, Any]:
    return parse_yaml(path, read_text(path))


def plain(node: Any) -> Any:
    if isinstance(node, dict):
        return {str(k): plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [plain(v) for v in node]
    # ruamel's round-trip scalars (ScalarFloat, ScalarInt, ...) subclass the builtins; msgspec wants the builtins.
    for t in (bool, int, float, str):
        if isinstance(node, t):
            return t(node)
    return node


_STEP_RE = re.compile(r"\.([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]")


def line_of(tree: Any, jsonpath: str) -> int | None:
    """The 1-based line of ``$.devices[2].unit`` in a ruamel tree, or of its nearest parent."""
    node, line = tree, None
    for key, idx in _STEP_RE.findall(jsonpath.removeprefix("$")):
        if isinstance(node, CommentedMap) and key and key in node:
            line = node.lc.key(key)[0] + 1
            node = node[key]
        elif isinstance(node, CommentedSeq) and idx and int(idx) < len(node):
            line = node.lc.item(int(idx))[0] + 1
            node = node[int(idx)]
        else:
            break
    if line is None and hasattr(tree, "lc"):
        line = tree.lc.line + 1
    return line


def entity_of(data: Any, jsonpath: str) -> str:
    """``devices[2] (panel-3)`` for a path inside a named list entry, else ''."""
    m = re.match(r"\$\.([a-z_]+)\[(\d+)\]", jsonpath)
    if not m or not isinstance(data, dict):
        return ""
    items = data.get(m.group(1))
    i = int(m.group(2))
    if isinstance(items, list) and i < len(items) and isinstance(items[i], dict) and "name" in items[i]:
        return f"{m.group(1)}[{i}] ({items[i]['name']})"
    return ""


def convert_strict(path: Path, cls: type[T], data: Any, tree: Any) -> T:
    """msgspec.convert with its error turned into ``file:line: entity: message (at $.path)``."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}:1: the top level must be a mapping of settings"])
    try:
        return msgspec.convert(data, cls, strict=True)
    except msgspec.ValidationError as e:
        msg = str(e)
        where = msg.rsplit(" - at `", 1)
        jp = where[1].rstrip("`") if len(where) == 2 else "$"
        # For "unknown field" errors msgspec points at the parent; name the field's own line.
        unknown = re.search(r"unknown field `([^`]+)`", msg)
        if unknown:
            jp = f"{jp}.{unknown.group(1)}"
        line = line_of(tree, jp)
        loc = f"{path}:{line}" if line else str(path)
        entity = entity_of(data, jp)
        raise ConfigError([f"{loc}: {entity + ': ' if entity else ''}{where[0]} (at {jp})"]) from None


def read_secret(path: str) -> str:
    """Read a secret file, refusing one that others can read (it must be mode 0600 or stricter)."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise ConfigError([f"{path}: cannot read secret: {e.strerror}"]) from None
    if st.st_mode & 0o077:
        raise ConfigError([f"{path}: secret file must not be readable by group or others (chmod 600)"])
    return Path(path).read_text(encoding="utf-8").strip()
