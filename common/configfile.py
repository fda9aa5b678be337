"""The config-file convention of both programs: YAML, validated once and strictly with msgspec, each
error naming the file, the line and (inside a named list entry) the entity."""

from __future__ import annotations

import copy
import difflib
import os
import re
from collections.abc import Iterable
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
    except UnicodeDecodeError as e:
        raw = path.read_bytes()
        line = raw.count(b"\n", 0, e.start) + 1
        raise ConfigError(
            [
                f"{path}:{line}: not UTF-8 text (byte {raw[e.start]:#04x}): save the file as UTF-8 (an editor's "
                "'UTF-8' encoding; a Chinese Windows editor may save GBK)"
            ]
        ) from None
    except OSError as e:
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
        hint = _hint(cls, parse_path(jp), where[0])
        raise ConfigError([f"{loc}: {entity + ': ' if entity else ''}{where[0]} (at {jp}){hint}"]) from None


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``"; did you mean 'fence'?"`` when one of ``choices`` is close to ``word``, else ''."""
    close = difflib.get_close_matches(word, [c for c in choices if c != word], n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


Step = str | int


def parse_path(jsonpath: str) -> list[Step]:
    """``$.devices[2].unit`` → ``["devices", 2, "unit"]``."""
    return [key or int(idx) for key, idx in _STEP_RE.findall(jsonpath.removeprefix("$"))]


def format_path(steps: Iterable[Step]) -> str:
    return "$" + "".join(f"[{s}]" if isinstance(s, int) else f".{s}" for s in steps)


class Remap:
    """Where the entries of a repaired copy of a config were in the file: entries dropped from a list shift
    the ones after them, and every problem must still name the line the installer sees."""

    def __init__(self) -> None:
        self._lists: dict[tuple[Step, ...], list[int]] = {}
        self.dropped: dict[str, set[str]] = {}  # top-level list -> names of the entries dropped from it
        self.taken_out: set[tuple[Step, ...]] = set()  # keys taken out, as paths in the file

    def original(self, steps: Iterable[Step]) -> list[Step]:
        out: list[Step] = []
        for s in steps:
            if isinstance(s, int):
                m = self._lists.get(tuple(out))
                s = m[s] if m is not None and s < len(m) else s
            out.append(s)
        return out

    def jsonpath(self, jsonpath: str) -> str:
        return format_path(self.original(parse_path(jsonpath)))

    def name(self, jsonpath: str, name: str) -> str:
        """``devices[1] (p2)`` with the index it has in the file."""
        steps = parse_path(jsonpath)
        orig = self.original(steps)
        for i, s in enumerate(steps):
            if isinstance(s, int) and i and isinstance(steps[i - 1], str) and orig[i] != s:
                name = name.replace(f"{steps[i - 1]}[{s}]", f"{steps[i - 1]}[{orig[i]}]", 1)
        return name

    def drop(self, container: list[Any], list_steps: list[Step], index: int) -> None:
        key = tuple(self.original(list_steps))
        m = self._lists.setdefault(key, list(range(len(container))))
        del m[index]
        item = container.pop(index)
        if isinstance(item, dict) and isinstance(item.get("name"), str) and key and isinstance(key[0], str):
            self.dropped.setdefault(key[0], set()).add(item["name"])

    def dropped_names(self, kind: str | None = None) -> set[str]:
        """Names of the entries dropped from ``kind`` (``"buses"``), or from every list."""
        if kind is not None:
            return self.dropped.get(kind, set())
        return set().union(*self.dropped.values())


def echoes(problem: str, data: Any, remap: Remap) -> bool:
    """Whether a cross-check ``problem`` of a repaired config only repeats an error already reported: it names
    an entry dropped for its own error (``bus 'fence' is not defined``), or a key taken out of its entry
    (``a modbus-tcp bus needs 'host' and 'port'`` once a bad ``port`` was taken out)."""
    if any(f"{n!r} is not defined" in problem for n in remap.dropped_names()):
        return True
    for steps in remap.taken_out:
        if len(steps) >= 3 and isinstance(steps[-1], str):
            entity = entity_of(data, format_path(steps[:2]))
            if entity and f": {entity}: " in problem and f"{steps[-1]!r}" in problem:
                return True
    return False


def _type_at(cls: type, steps: Iterable[Step]) -> Any:
    """The msgspec type found by following ``steps`` from ``cls`` (None where they leave the schema)."""
    from msgspec import inspect as mi

    t: Any = mi.type_info(cls)

    def unwrap(t: Any, want: type) -> Any:
        while True:
            if isinstance(t, mi.Metadata):
                t = t.type
            elif isinstance(t, mi.UnionType):
                t = next((x for x in t.types if isinstance(x, want | mi.Metadata)), None)
            else:
                return t if isinstance(t, want) else None

    for s in steps:
        if isinstance(s, int):
            t = unwrap(t, mi.ListType)
            t = t.item_type if t is not None else None
        else:
            t = unwrap(t, mi.StructType)
            t = next((f.type for f in t.fields if f.encode_name == s), None) if t is not None else None
        if t is None:
            return None
    return t


def _hint(cls: type, steps: list[Step], message: str) -> str:
    """A "did you mean" for a misspelt key or a misspelt choice; "quote it" for digits where text is wanted."""
    from msgspec import inspect as mi

    if re.match(r"Expected `str[^`]*`, got `(int|float)`", message):
        return "; quote it ('0101', not 0101: unquoted, digits are read as a number and leading zeros are lost)"

    unknown = re.search(r"unknown field `([^`]+)`", message)
    if unknown:
        parent = _type_at(cls, steps[:-1])
        while isinstance(parent, mi.Metadata | mi.UnionType):
            parent = (
                parent.type
                if isinstance(parent, mi.Metadata)
                else next((x for x in parent.types if not isinstance(x, mi.NoneType)), None)
            )
        if isinstance(parent, mi.StructType):
            return did_you_mean(unknown.group(1), [f.encode_name for f in parent.fields])
        return ""
    enum = re.match(r"Invalid enum value '([^']*)'", message)
    if enum:
        t = _type_at(cls, steps)
        while isinstance(t, mi.Metadata | mi.UnionType):
            t = (
                t.type
                if isinstance(t, mi.Metadata)
                else next((x for x in t.types if isinstance(x, mi.LiteralType)), None)
            )
        if isinstance(t, mi.LiteralType):
            return did_you_mean(enum.group(1), [str(v) for v in t.values])
    return ""


def _stand_in(t: Any) -> Any:
    """A value of type ``t`` for a missing top-level setting (already reported), or None."""
    from msgspec import inspect as mi

    while isinstance(t, mi.Metadata):
        t = t.type
    if isinstance(t, mi.StrType):
        return "x"
    if isinstance(t, mi.LiteralType) and t.values:
        return t.values[0]
    return None


def convert_all(
    path: Path, cls: type[T], data: Any, tree: Any, *, limit: int = 100
) -> tuple[T | None, list[str], Remap]:
    """Like :func:`convert_strict`, but every problem of the file in one run: after each error the offending
    key is taken out (an entry that cannot stand without it is dropped, and :class:`Remap` keeps the lines
    right) and the rest is validated again. Returns the config (None if the file cannot be repaired far
    enough to build one), the problems (``file:line: entity: message (at $.path)``, a "did you mean" where a
    key or a choice is misspelt) and the remap, for cross-checks of the repaired config."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}:1: the top level must be a mapping of settings"])
    work = copy.deepcopy(data)
    remap = Remap()
    problems: list[str] = []
    taken_out = remap.taken_out
    for _ in range(limit * 4):
        try:
            return msgspec.convert(work, cls, strict=True), problems, remap
        except msgspec.ValidationError as e:
            parts = str(e).rsplit(" - at `", 1)
            message = parts[0]
            steps = parse_path(parts[1].rstrip("`")) if len(parts) == 2 else []
            unknown = re.search(r"unknown field `([^`]+)`", message)
            missing = re.match(r"Object missing required field `([^`]+)`", message)
            if unknown:
                steps.append(unknown.group(1))
            if not (missing and tuple(remap.original([*steps, missing.group(1)])) in taken_out):
                jp = format_path(remap.original(steps))
                line = line_of(tree, jp) or 1
                entity = entity_of(data, jp)
                problems.append(
                    f"{path}:{line}: {entity + ': ' if entity else ''}{message} (at {jp}){_hint(cls, steps, message)}"
                )
            if len(problems) >= limit:
                return None, problems, remap
            if not steps:
                # Nothing to drop at the top: a stand-in for a missing setting lets the rest be checked.
                stand_in = _stand_in(_type_at(cls, [missing.group(1)])) if missing else None
                if stand_in is None:
                    return None, problems, remap
                work[missing.group(1)] = stand_in  # type: ignore[union-attr]
                continue
            parent: Any = work
            for s in steps[:-1]:
                parent = parent[s]
            last = steps[-1]
            if isinstance(parent, dict) and last in parent:
                taken_out.add(tuple(remap.original(steps)))
                del parent[last]
            elif isinstance(parent, list) and isinstance(last, int) and last < len(parent):
                remap.drop(parent, steps[:-1], last)
            else:
                return None, problems, remap
    return None, problems, remap


def read_secret(path: str | os.PathLike[str]) -> str:
    """Read a secret file, refusing one that others can read (it must be mode 0600 or stricter). Each problem is a
    :class:`ConfigError` that says what to do: a misspelt name (and the close one beside it), a file this user may
    not read (and who this user is: a check run as root says nothing of the service's own user), a file too open."""
    p = Path(path)
    try:
        st = p.stat()
        if st.st_mode & 0o077:
            raise ConfigError([f"{p}: secret file must not be readable by group or others (chmod 600)"])
        return p.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise ConfigError([f"{p}: no such file{_sibling_hint(p)}"]) from None
    except PermissionError:
        raise ConfigError([f"{p}: cannot read secret: permission denied {_as_user()}"]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([f"{p}: cannot read secret: {getattr(e, 'strerror', None) or e}"]) from None


def current_user() -> str:
    """The name of the user this process runs as (its uid where it has no name)."""
    import pwd

    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def _as_user() -> str:
    """``(as user nobody): ...``: who could not read a file, and what the service's user needs."""
    return (
        f"(as user {current_user()}): the service's user must be able to read it and search its folders (the "
        "services run as gatehouse: sudo chown gatehouse: FILE), and a check must run as that user (sudo -u gatehouse "
        "...)"
    )


def _sibling_hint(p: Path) -> str:
    """``; did you mean '/etc/gatehouse/secrets/mqtt.password'?`` for a misspelt file name, or a missing folder."""
    try:
        names = os.listdir(p.parent)
    except FileNotFoundError:
        return f" (nor its folder {p.parent})"
    except OSError:
        return ""
    close = difflib.get_close_matches(p.name, names, n=1, cutoff=0.6)
    return f"; did you mean {str(p.parent / close[0])!r}?" if close else ""


def write_secret(path: Path, data: bytes) -> None:
    """Write a secret file of mode 0600 atomically (a new file beside it, fsynced, then renamed over it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(fd, 0o600)  # whatever the umask, and over a stale part file's mode
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
