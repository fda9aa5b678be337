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
    _check_tree(path, tree)
    return plain(tree), tree


def read_yaml(path: Path) -> tuple[Any, Any]:
    return parse_yaml(path, read_text(path))


#: Most nodes a config may hold once its aliases are expanded: far above any real site, far below what a
#: few lines of nested aliases can build ("billion laughs").
MAX_NODES = 500_000
#: Deepest nesting of mappings and lists a config may have.
MAX_DEPTH = 64


def _check_tree(path: Path, tree: Any) -> None:
    """Refuse what YAML allows but no config needs before anything walks the tree: an alias that holds
    itself, aliases that expand past :data:`MAX_NODES`, nesting past :data:`MAX_DEPTH`, and NUL characters
    (no path, name or label can hold one). Shared (aliased) nodes are counted without walking them again."""
    sizes: dict[int, int] = {}
    open_ids: set[int] = set()

    def fail(line: int | None, what: str) -> ConfigError:
        return ConfigError([f"{path}:{line or 1}: {what}"])

    def size(node: Any, depth: int, line: int | None) -> int:
        if isinstance(node, str):
            if "\x00" in node:
                raise fail(line, "a NUL character in a value")
            return 1
        if not isinstance(node, dict | list):
            return 1
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_ids:
            raise fail(line, "an alias refers to a node that contains it")
        if depth > MAX_DEPTH:
            raise fail(line, f"nested deeper than {MAX_DEPTH} levels")
        open_ids.add(key)
        lc = getattr(node, "lc", None)
        here = lc.line + 1 if lc is not None and lc.line is not None else line
        lines = getattr(lc, "data", None) or {}
        n = 1
        for k, v in node.items() if isinstance(node, dict) else enumerate(node):
            pos = lines.get(k)
            at = pos[0] + 1 if pos else here
            if isinstance(k, str) and "\x00" in k:
                raise fail(at, "a NUL character in a key")
            n += size(v, depth + 1, at)
            if n > MAX_NODES:
                raise fail(here, f"more than {MAX_NODES} values once aliases are expanded")
        open_ids.discard(key)
        sizes[key] = n
        return n

    size(tree, 0, 1)


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
        step: str | int
        if isinstance(node, CommentedMap) and key and key in node:
            step = key
        elif isinstance(node, CommentedSeq) and idx and int(idx) < len(node):
            step = int(idx)
        else:
            break
        # A key brought in by a merge (``<<: *base``) has no position in this mapping: keep the parent's.
        pos = (getattr(node.lc, "data", None) or {}).get(step)
        if pos:
            line = pos[0] + 1
        node = node[step]
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
        line = line_of(tree, jp) or 1  # an empty file has no lines: its error is on line 1
        loc = f"{path}:{line}"
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
