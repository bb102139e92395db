"""One-line messages for what the command line and the experiment YAMLs got wrong: an unknown option or key
(with the closest valid names, and the YAML file and line that hold it), and a value a configured class
refuses (with the config key that set it)."""
from __future__ import annotations

import difflib
import importlib
import inspect
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from lit_score.cli.config import DEFAULTS_KEY, resolve_config

CLASS_OPTION = re.compile(r"Problem with given class_path '([^']+)':\s*\n\s*Option '([^']+)' is not accepted")
PARSER_KEY = re.compile(r'Parser key "([^"]+)"')
TOP_LEVEL_KEY = re.compile(r"(?:Subcommand '[^']+' does not accept option|Option) '([^']+)'"
                           r"(?: is not accepted)?")
GROUP_KEY = re.compile(r"Group '([^']+)' does not accept option '([^']+)'")
UNRECOGNIZED = re.compile(r"unrecognized arguments: (.*)")
NESTED_ARG = re.compile(r"NestedArg\(key='([^']+)'")
SUBCOMMANDS = ("fit", "validate", "test", "predict")
INVALID_CHOICE = re.compile(r"argument (\w+): invalid choice: '([^']*)' \(choose from (.*)\)")


def closest(name: str, candidates: Sequence[str], n: int = 3) -> list[str]:
    """Up to ``n`` of ``candidates`` closest to the dotted ``name``: first its siblings (same parent) by their
    last part, else ``name`` with each part replaced by the closest one known at that place."""
    parent, _, leaf = name.rpartition(".")
    siblings: dict[str, str] = {}
    for c in candidates:
        c_parent, _, c_leaf = c.rpartition(".")
        if c_parent == parent:
            siblings.setdefault(c_leaf, c)
    found = _best(leaf, list(siblings), n)
    if found:
        return [siblings[m] for m in found]
    corrected = _corrected(name, candidates)
    return [corrected] if corrected else difflib.get_close_matches(name, list(candidates), n, 0.75)


def _best(word: str, words: Sequence[str], n: int, cutoff: float = 0.6, margin: float = 0.1) -> list[str]:
    """Up to ``n`` of ``words`` as close to ``word`` as the closest, give or take ``margin``."""
    scored = sorted(((difflib.SequenceMatcher(None, word, w).ratio(), w) for w in words), reverse=True)
    scored = [(r, w) for r, w in scored if r >= cutoff]
    return [w for r, w in scored[:n] if r >= scored[0][0] - margin]


def _corrected(name: str, candidates: Sequence[str]) -> str | None:
    following: dict[tuple[str, ...], set[str]] = {}
    for c in candidates:
        parts = c.split(".")
        for i, part in enumerate(parts):
            following.setdefault(tuple(parts[:i]), set()).add(part)
    parts, out = name.split("."), []
    for i, part in enumerate(parts):
        known = following.get(tuple(out))
        if not known:  # deeper than the parser knows (a class's own arguments): kept as given
            out += parts[i:]
            break
        if part not in known:
            match = difflib.get_close_matches(part, sorted(known), 1, 0.6)
            if not match:
                return None
            part = match[0]
        out.append(part)
    return ".".join(out) if out != parts else None


def parser_keys(parser: Any) -> list[str]:
    """The dotted keys (``model.lr``) a jsonargparse parser accepts."""
    skip = {"help", "config", "print_config", "subcommand"}
    return sorted({a.dest for a in parser._actions
                   if a.dest and a.dest not in skip and not a.dest.startswith("_") and a.option_strings
                   and not a.dest.endswith(".help")})


def class_arguments(class_path: str) -> list[str]:
    """The names of the arguments of the class at ``class_path`` (those jsonargparse reads through ``**kwargs``
    too); empty when it cannot be imported."""
    try:
        module, _, name = class_path.rpartition(".")
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return []
    try:
        from jsonargparse._parameter_resolvers import get_signature_parameters

        return [p.name for p in get_signature_parameters(cls)]
    except Exception:  # noqa: BLE001 - a private helper of jsonargparse; inspect's view is enough
        return [p for p in inspect.signature(cls).parameters if p not in ("self", "args", "kwargs")]


def config_files(argv: Sequence[str]) -> list[Path]:
    """The experiment YAMLs that ``--config`` / ``-c`` name in ``argv`` (files and packaged names, not inline
    documents), the last first, each before the files of its ``defaults`` list."""
    named = [b for a, b in zip(argv, argv[1:]) if a in ("-c", "--config")]
    named += [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    files: list[Path] = []
    for value in reversed(named):
        try:
            path = resolve_config(value)
        except Exception:  # noqa: BLE001 - reported elsewhere; here only a hint is looked for
            path = None
        if path is not None:
            files += _with_defaults(path, ())
    return list(dict.fromkeys(files))


def _with_defaults(path: Path, seen: tuple[Path, ...]) -> list[Path]:
    if path in seen or not path.is_file():
        return []
    try:
        content = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return [path]
    defaults = content.get(DEFAULTS_KEY) if isinstance(content, dict) else None
    defaults = [defaults] if isinstance(defaults, str) else defaults if isinstance(defaults, list) else []
    found = [path]
    for d in reversed(defaults):
        if isinstance(d, str):
            found += _with_defaults(path.parent / d, (*seen, path))
    return found


def find_key(files: Sequence[Path], key: str) -> tuple[Path, int, str | None] | None:
    """The first of ``files`` that sets the dotted ``key``, the line, and the value written there (None for a
    mapping or list): ``init_args`` levels and list items in between may be left out of ``key``, and a
    subcommand section (``fit:``) may hold it."""
    parts = key.split(".")
    for path in files:
        try:
            root = yaml.compose(path.read_text())
        except (OSError, yaml.YAMLError):
            continue
        for line, value in _lines_of(root, parts, top=True):
            return path, line, value.value if isinstance(value, yaml.ScalarNode) else None
    return None


def _lines_of(node: Any, parts: list[str], top: bool = False) -> Iterator[tuple[int, Any]]:
    if parts[0] == "init_args" and len(parts) > 1:
        yield from _lines_of(node, parts[1:])
    if isinstance(node, yaml.SequenceNode):
        items = node.value
        if parts[0].isdigit():
            index = int(parts[0])
            if index < len(items):
                yield from [(items[index].start_mark.line + 1, items[index])] if len(parts) == 1 else \
                    _lines_of(items[index], parts[1:])
            return
        for item in items:
            yield from _lines_of(item, parts)
        return
    if not isinstance(node, yaml.MappingNode):
        return
    for key_node, value in node.value:
        name = key_node.value
        if name == parts[0]:
            yield from [(key_node.start_mark.line + 1, value)] if len(parts) == 1 else _lines_of(value, parts[1:])
        elif name == "init_args" or (top and name in SUBCOMMANDS):
            yield from _lines_of(value, parts)


def _given_on_command_line(args: Sequence[str], key: str, leaf: str) -> str | None:
    """The option of ``args`` (outside ``--config``) that sets ``leaf`` under ``key``, if any."""
    for i, arg in enumerate(args):
        if i and args[i - 1] in ("-c", "--config"):
            continue
        name = arg.split("=", 1)[0]
        if name.startswith(f"--{key}.") and name.rsplit(".", 1)[-1] == leaf:
            return name
    return None


def _did_you_mean(names: Sequence[str]) -> str:
    return f"; did you mean {' or '.join(names)}?" if names else ""


def _where(files: Sequence[Path], key: str) -> str:
    found = find_key(files, key)
    return f" in {found[0]}, line {found[1]}" if found else ""


def set_at(files: Sequence[Path], args: Sequence[str], key: str) -> str:
    """Where ``key`` got its value, as a suffix: nothing when the command line sets it; else the YAML file and
    line that do (and the interpolation written there)."""
    options = {a.split("=", 1)[0] for a in args if a.startswith("--")}
    short = key.replace(".init_args.", ".")
    if f"--{key}" in options or f"--{short}" in options:
        return ""
    found = find_key(files, key)
    if found is None:
        return ""
    path, line, value = found
    written = f"{value} in " if value and "${" in value else ""
    return f" (set by {written}{path}, line {line})"


def unknown_option_message(message: str, parser: Any, args: Sequence[str], files: Sequence[Path],
                           help_command: str = "lit-score fit --help") -> str:
    """The one-line form of jsonargparse's parse error ``message``: for an unknown option or key, its closest
    valid names and, for a YAML key, the file and line; else the message on one line."""
    keys = parser_keys(parser)
    class_option = CLASS_OPTION.findall(message)
    parser_key = PARSER_KEY.search(message)
    if class_option and parser_key:
        class_path, option = class_option[-1]
        section = parser_key.group(1)
        suggestions = _best(option, class_arguments(class_path), 3)
        given = _given_on_command_line(args, section, option)
        if given is not None:
            prefix = given[: -len(option)]
            return (f"unknown option {given}: {class_path} has no argument {option!r}"
                    f"{_did_you_mean([prefix + s for s in suggestions])}")
        key = f"{section}.init_args.{option}"
        return (f"unknown key {key}{_where(files, key)}: {class_path} has no argument {option!r}"
                f"{_did_you_mean([f'{section}.init_args.{s}' for s in suggestions])}")
    nested = NESTED_ARG.search(message)
    if nested and parser_key:
        section = parser_key.group(1)
        return (f"--{section}.init_args.{nested.group(1)} is given, but {section} names no class to take it: "
                f"give --{section} CLASS_NAME before it (or a class_path in the YAML)")
    unrecognized = UNRECOGNIZED.match(message)
    if unrecognized:
        options = [a.split("=", 1)[0] for a in unrecognized.group(1).split() if a.startswith("-")]
        if options:
            problems = [f"unknown option {o}{_did_you_mean(closest(o, ['--' + k for k in keys]))}" for o in options]
            return "; ".join(problems) + ("" if any("did you mean" in p for p in problems)
                                          else f" (the options: {help_command})")
    choice = INVALID_CHOICE.search(message)
    if choice:
        choices = re.findall(r"'([^']*)'", choice.group(3))
        return (f"{choice.group(1)} {choice.group(2)!r} is not one of {', '.join(choices)}"
                f"{_did_you_mean(difflib.get_close_matches(choice.group(2), choices, 1, 0.5))}")
    group = GROUP_KEY.search(message)
    top_level = TOP_LEVEL_KEY.search(message)
    if (group or top_level) and "Problem with given class_path" not in message:
        key = ".".join(group.groups()) if group else top_level.group(1)
        return f"unknown key {key}{_where(files, key)}{_did_you_mean(closest(key, keys))}"
    text = one_line(message)
    value_error = re.match(r'Parser key "([^"]+)": (.*)', text)
    if value_error:
        key = value_error.group(1)
        return f"{key}: {value_error.group(2)}{set_at(files, args, key)}"
    return text


def one_line(message: str) -> str:
    """``message`` (jsonargparse's, over several indented lines) on one line, without the lines that list
    the union's subtypes and the given value's type."""
    lines = [line.strip() for line in message.splitlines()]
    kept = [line for line in lines if line and not line.startswith(("Subtypes:", "Given value type:", "Errors:"))]
    return re.sub(r"\s+", " ", " ".join(kept)).strip()


def class_key(config: Any, cls: type, subcommand: str | None = None) -> tuple[str, bool] | None:
    """Where the parsed ``config`` configures ``cls``: the dotted key and whether its arguments sit under
    ``init_args`` there (a class given by ``class_path``), or None."""
    import lightning as L

    data = config.as_dict() if hasattr(config, "as_dict") else config
    if subcommand and isinstance(data, dict) and isinstance(data.get(subcommand), dict):
        data = data[subcommand]
    for key, class_path in _class_paths(data, ""):
        if _resolves_to(class_path, cls):
            return key, True
    for base, key in ((L.LightningModule, "model"), (L.LightningDataModule, "data")):
        if issubclass(cls, base) and isinstance(data, dict) and key in data:
            return key, False
    return None


def _class_paths(node: Any, prefix: str) -> Iterator[tuple[str, str]]:
    if isinstance(node, dict):
        if isinstance(node.get("class_path"), str):
            yield prefix, node["class_path"]
        for k, v in node.items():
            yield from _class_paths(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _class_paths(v, f"{prefix}.{i}")


def _resolves_to(class_path: str, cls: type) -> bool:
    if class_path == f"{cls.__module__}.{cls.__qualname__}":
        return True
    if class_path.rpartition(".")[2] != cls.__name__:
        return False
    try:
        module, _, name = class_path.rpartition(".")
        return getattr(importlib.import_module(module), name) is cls
    except (ImportError, AttributeError, ValueError):
        return False


def rejected_value_message(cls: type, err: BaseException, config: Any, subcommand: str | None = None,
                           keyed_only: bool = False, args: Sequence[str] = (),
                           files: Sequence[Path] = ()) -> str | None:
    """One line for a value ``cls`` refused while the config was instantiated: the config key of the argument
    (when the message starts with its name) or of the class, the message, the class, and the YAML file and line
    that set the value (unless ``args``, the command line, did). With ``keyed_only``, None unless the message
    names an argument."""
    text = " ".join(str(err).split())
    class_path = f"{cls.__module__}.{cls.__qualname__}"
    where = class_key(config, cls, subcommand) if config is not None else None
    first = re.match(r"[A-Za-z_]\w*", text)
    if where is not None and first and first.group(0) in class_arguments(class_path):
        key = f"{where[0]}{'.init_args' if where[1] else ''}.{first.group(0)}"
        return f"{where[0]}{'.init_args' if where[1] else ''}.{text} ({class_path}){set_at(files, args, key)}"
    if keyed_only:
        return None
    return f"{where[0]} ({class_path}): {text}" if where is not None else f"{class_path}: {text}"


def original_argv() -> list[str]:
    """The command line as the user typed it to ``lit-score`` or ``lit-score-eval`` (``sys.argv`` may hold the
    expanded one); ``sys.argv`` when the process is something else (e.g. a test runner calling the CLI)."""
    orig = list(getattr(sys, "orig_argv", []) or [])
    if not any("lit-score" in a or "lit_score" in a for a in orig[:3]):
        return list(sys.argv[1:])
    return orig[1:]
