"""Plumbing: one command line for every chapter.

Guarantees, the same in every chapter's command:
  - a flag means one thing everywhere (`--run-dir`, `--overwrite`, booleans written true/false),
    and only its full name is accepted: no prefix matching, so `--step` is never read as `--steps`;
  - `--help` says what each flag does, its default and its choices; a config field's flag takes
    its help from the comment beside the field, so the two cannot drift apart;
  - a user's mistake ends the command with one line, `error: ...`, never a traceback: a bad flag
    with exit status 2 (before anything runs), a bad value, a missing file or a run that cannot
    start with status 1; Ctrl-C ends it with status 130.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import inspect
import io
import math
import sys
import textwrap
import tokenize
from collections.abc import Callable, Iterable, Iterator, Mapping


class Refused(RuntimeError):
    """A run or command stopped for a reason the user can act on; the message says what to do."""


class HelpWithDefaults(argparse.HelpFormatter):
    """Each flag's help ends with its default, where it has one worth saying (not a switch's
    False, nor None or "" for "not given")."""

    def _get_help_string(self, action):
        default = action.default
        if (default is None or default is False or default == "" or default is argparse.SUPPRESS
                or "%(default)" in (action.help or "")):
            return action.help
        return f"{action.help} (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the book's rules: no prefix matching, every flag's default in --help, and a
    bad flag reported in one line (not argparse's usage block), exit status 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", HelpWithDefaults)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def one_line(error: BaseException) -> str:
    """An exception as one short line: its type and message, the middle cut out when long
    (orbax puts the cause, e.g. "File too large", at the end)."""
    line = " ".join(str(error).split())
    return f"{type(error).__name__}: {line if len(line) <= 300 else line[:150] + ' ... ' + line[-150:]}"


@contextlib.contextmanager
def user_errors(interrupted: str = "interrupted") -> Iterator[None]:
    """Around a command's work: a ValueError (a bad value), an OSError (a file that is missing,
    unreadable or unwritable) or a `Refused` becomes `error: <message>` and exit status 1;
    Ctrl-C prints `interrupted` and exits with 130. Anything else is a bug, and keeps its
    traceback."""
    try:
        yield
    except (ValueError, Refused) as error:
        sys.exit(f"error: {error}")
    except OSError as error:
        where = f" ({error.filename})" if error.filename else ""
        sys.exit(f"error: {error.strerror or error}{where}")
    except KeyboardInterrupt:
        print(f"\n{interrupted}", file=sys.stderr)
        sys.exit(130)


def progress(message: str) -> None:
    """One line on stderr while a long job works, so that no wait is silent (stdout stays the
    job's own output)."""
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# Values: each flag's text → a value, or argparse's one-line error naming the text
# ------------------------------------------------------------------------------------------------

BOOLEANS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def boolean(text: str) -> bool:
    """true/false, yes/no or 1/0, in any case."""
    if text.lower() not in BOOLEANS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a boolean: write true or false")
    return BOOLEANS[text.lower()]


def integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an int") from None


def finite(text: str) -> float:
    """A finite number: `nan` and `inf` are refused here, before they could train NaNs."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def at_least_one(text: str) -> int:
    """An int >= 1: a step, a count of rows or tokens."""
    value = integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be an int >= 1")
    return value


PARSERS = {"bool": boolean, "int": integer, "float": finite, "str": str}


# ------------------------------------------------------------------------------------------------
# A config's fields, checked when it is built (flags are only one way to make one)
# ------------------------------------------------------------------------------------------------

def int_at_least(low: int) -> Callable[[object], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low


def finite_at_least(low: float, *, above: bool = False) -> Callable[[object], bool]:
    return lambda v: (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                      and (v > low if above else v >= low))


def check_fields(config, rules: Mapping[str, tuple[Callable[[object], bool], str]]) -> None:
    """Raise a ValueError naming the first field of `config` that breaks its rule, e.g.
    "TrainConfig.seed=-1: must be an int from 0 to 2**32 - 1"; `rules` maps a field to
    (its test, what is allowed in words)."""
    for name, (valid, allowed) in rules.items():
        if not valid(getattr(config, name)):
            raise ValueError(f"{type(config).__name__}.{name}={getattr(config, name)!r}: "
                             f"must be {allowed}")


# ------------------------------------------------------------------------------------------------
# Config fields as flags
# ------------------------------------------------------------------------------------------------

def field_comments(cls: type) -> dict[str, str]:
    """{field: the comment at the end of its line} from a dataclass's source, e.g. for
    `seed: int = 0  # model init and data order` → {"seed": "model init and data order"}.
    Comment-only lines right below a field continue its comment."""
    lines = textwrap.dedent(inspect.getsource(cls)).splitlines(keepends=True)
    comments_by_line = {token.start[0]: token.string.lstrip("#").strip()
                        for token in tokenize.generate_tokens(io.StringIO("".join(lines)).readline)
                        if token.type == tokenize.COMMENT}
    comments = {}
    for node in ast.parse("".join(lines)).body[0].body:
        if isinstance(node, ast.AnnAssign) and node.end_lineno in comments_by_line:
            line, text = node.end_lineno + 1, [comments_by_line[node.end_lineno]]
            while line <= len(lines) and lines[line - 1].strip().startswith("#"):
                text.append(comments_by_line[line])
                line += 1
            comments[node.target.id] = " ".join(text)
    return comments


def add_field_flags(group, cls: type, *, prefix: str = "", skip: Iterable[str] = (),
                    choices: Mapping[str, Iterable] | None = None,
                    examples: Mapping[str, Mapping] | None = None) -> None:
    """One `--field-name` flag per field of the dataclass `cls`, stored as `prefix + name` and
    left out of the namespace unless given (so a chosen config's value stays). Its help is the
    field's comment; `examples` maps a label to a {prefix + name: value} record, shown after it
    (e.g. the laptop run's value and OpenMoE-8B's)."""
    choices, examples, comments = dict(choices or {}), dict(examples or {}), field_comments(cls)
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        kind = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", "")
        name = prefix + field.name
        shown = "; ".join(f"{label}: {record[name]!r}" for label, record in examples.items())
        group.add_argument(
            "--" + field.name.replace("_", "-"), dest=name, default=argparse.SUPPRESS,
            type=PARSERS.get(kind, str), choices=choices.get(field.name),
            metavar="{true,false}" if kind == "bool" else None if field.name in choices
            else kind.upper(),
            help=(comments.get(field.name, field.name) + (f" ({shown})" if shown else "")
                  ).replace("%", "%%"))  # argparse formats help with %


def add_config_flags(parser, cls: type, *, skip: Iterable[str] = (),
                     choices: Mapping[str, Iterable] | None = None,
                     examples: Mapping[str, Mapping] | None = None) -> None:
    """Field flags (add_field_flags) for every field of the config class `cls`, in a group of
    their own; a field holding a nested config (e.g. `model`) gets its fields' flags in a second
    group, stored as "model.<name>". `skip` names fields to leave out, nested ones as "model.x"."""
    nested = [f for f in dataclasses.fields(cls) if dataclasses.is_dataclass(f.default)]
    groups = [(cls, "", {f.name for f in nested})] + [(type(f.default), f.name + ".", set()) for f in nested]
    for group_cls, prefix, group_skip in groups:
        group = parser.add_argument_group(f"{prefix.rstrip('.') or 'run'} fields ({group_cls.__name__})")
        add_field_flags(group, group_cls, prefix=prefix, choices=choices, examples=examples,
                        skip=group_skip | {s[len(prefix):] for s in skip if s.startswith(prefix)
                                           and "." not in s[len(prefix):]})


def add_multihost_flags(parser) -> None:
    """The flags that join this process to a multi-host JAX cluster (07's initialize_multihost)."""
    group = parser.add_argument_group("multi-host (one process per host)")
    group.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                       help="the coordinator's address (on a Cloud TPU pod use --multihost-auto)")
    group.add_argument("--num-processes", type=at_least_one, default=None, help="how many hosts")
    group.add_argument("--process-id", type=integer, default=None, help="this host's index, from 0")
    group.add_argument("--multihost-auto", action="store_true",
                       help="on a Cloud TPU pod: discover the hosts automatically")


def add_flags(parser, table: Iterable[tuple]) -> None:
    """Flags from a compact table, one row each: (name, type, default, help) and, optionally, a
    dict of further add_argument options (choices, required, ...). A type of `bool` makes a
    switch (store_true); `boolean` shows its values as {true,false}."""
    for name, kind, default, text, *options in table:
        how = ({"action": "store_true"} if kind is bool else
               {"type": kind, "default": default,
                **({"metavar": "{true,false}"} if kind is boolean else {})})
        parser.add_argument(name, help=text, **{**how, **(options[0] if options else {})})
