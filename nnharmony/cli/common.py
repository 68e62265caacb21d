"""Shared helpers of the command-line entry points."""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from typing import Callable, Iterable, Sequence


#: errors that describe bad input; anything else is a bug and says so
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError)


def _wants_traceback(argv: Iterable[str] | None) -> bool:
    """``--verbose`` on the command line or ``NNHARMONY_DEBUG`` set: show the traceback instead of one line."""
    return bool(os.environ.get("NNHARMONY_DEBUG")) or "--verbose" in (sys.argv[1:] if argv is None else argv)


def _close_progress_bars() -> None:
    """End the lines of open progress bars, so that the error starts a line of its own."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ()) or ()):
        bar.close()


def exit_on_user_error(main: Callable) -> Callable:
    """Every error of a command becomes one line on stderr (exit status 2 for bad input, 1 for anything else)
    instead of a traceback; ``--verbose`` or ``NNHARMONY_DEBUG=1`` shows the traceback."""

    @functools.wraps(main)
    def wrapper(argv: list[str] | None = None, *args, **kwargs):
        try:
            return main(argv, *args, **kwargs)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)
        except Exception as e:  # noqa: BLE001 -- the point: no traceback for the user
            if _wants_traceback(argv):
                raise
            _close_progress_bars()
            if isinstance(e, USER_ERRORS):
                print(f"error: {e}", file=sys.stderr)
                sys.exit(2)
            print(f"error: {type(e).__name__}: {e} (--verbose or NNHARMONY_DEBUG=1 shows the traceback)",
                  file=sys.stderr)
            sys.exit(1)

    return wrapper


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every flag's help ends with its default (unless the help says it, or there is none: None or off); the
    examples of the epilog keep their lines."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or not action.option_strings or not shows_a_default(action):
            return text
        return text + " (default: %(default)s)"


def shows_a_default(action: argparse.Action) -> bool:
    """Whether ``-h`` should name the action's default: not for None, off switches, suppressed or empty lists
    (``0`` is a default: ``0 in (None, False)`` is true in Python, so the test is by identity)."""
    default = action.default
    return not (default is None or default is False or default is argparse.SUPPRESS or default == []
                or isinstance(action, (argparse._HelpAction, argparse._VersionAction)))


def make_parser(prog: str, description: str, examples: Sequence[str] = (), epilog: str | None = None,
                **kwargs) -> argparse.ArgumentParser:
    """An argument parser as every nnharmony command has it: no abbreviated long options (``-d`` must never
    be read as ``-device``), defaults in ``-h``, and examples that run as printed (``epilog``: text after
    them). Subcommands' parsers: :func:`add_subcommand`."""
    text = "examples:\n" + "\n".join(f"  {e}" for e in examples) if examples else None
    if epilog:
        text = f"{text}\n\n{epilog}" if text else epilog
    return argparse.ArgumentParser(prog=prog, description=description, epilog=text, formatter_class=HelpFormatter,
                                   allow_abbrev=False, **kwargs)


def add_subcommand(subparsers, name: str, **kwargs) -> argparse.ArgumentParser:
    """A subcommand's parser with the same rules as :func:`make_parser` (argparse does not pass them on)."""
    return subparsers.add_parser(name, formatter_class=HelpFormatter, allow_abbrev=False, **kwargs)


class _DeprecatedAlias(argparse.Action):
    """An old spelling of a flag, kept for one release: it stores into the new flag's ``dest`` and says so."""

    def __init__(self, option_strings, dest, new: str, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"warning: {option_string} is deprecated and will be removed in the next release; use {self.new}",
              file=sys.stderr)
        setattr(namespace, self.dest, True if self.nargs == 0 else values)


def add_deprecated_alias(parser: argparse.ArgumentParser, old: str, new: str, dest: str, **kwargs) -> None:
    """``old`` keeps working as ``new`` (hidden from ``-h``) with a one-line deprecation warning."""
    parser.add_argument(old, dest=dest, action=_DeprecatedAlias, new=new, default=argparse.SUPPRESS,
                        help=argparse.SUPPRESS, **kwargs)


def add_collection_flags(parser: argparse.ArgumentParser, collection_help: str, default_configuration: str | None,
                         configuration_help: str) -> None:
    """``-d COLLECTION`` (name or id) and ``-c CONFIGURATION`` as nnU-Net's ``-d``/``-c``; the spellings of the
    previous release (``-c``/``--collection`` for the collection, ``-cfg`` for the configuration) are kept for
    one release (:func:`apply_old_collection_flags`)."""
    parser.add_argument("-d", dest="collection", default=None,
                        help=f"{collection_help}: name (Collection900_Synthetic) or id (900); required")
    parser.add_argument("-c", dest="cfg", default=default_configuration, metavar="CONFIGURATION",
                        help=configuration_help)
    add_deprecated_alias(parser, "--collection", "-d COLLECTION", "collection")
    add_deprecated_alias(parser, "-cfg", "-c CONFIGURATION", "old_cfg")


def apply_old_collection_flags(args: argparse.Namespace, collection_exists: Callable[[str], object],
                               default_configuration: str | None = None, required: bool = True) -> None:
    """Before this release ``-c`` was the collection and ``-cfg`` the configuration: ``-c NAME [-cfg CONFIG]``
    without ``-d`` keeps working for one release, with a warning. ``collection_exists`` raises for a value that
    names no collection (then ``-c`` is a configuration and, if ``required``, the missing ``-d`` is refused)."""
    old_cfg = getattr(args, "old_cfg", None)
    if args.collection is None and args.cfg not in (None, default_configuration) or (
            args.collection is None and old_cfg is not None):
        if old_cfg is None and not args.cfg.startswith("Collection"):  # no configuration is named so
            try:
                collection_exists(args.cfg)
            except (FileNotFoundError, ValueError):
                return
        print(f"warning: -c {args.cfg} as the collection is deprecated and will be removed in the next release; "
              f"-c is the configuration, as in nnU-Net: use -d {args.cfg} -c CONFIGURATION", file=sys.stderr)
        args.collection, args.cfg = args.cfg, default_configuration
    if old_cfg is not None:
        if args.cfg not in (None, default_configuration):
            raise ValueError(f"-c {args.cfg} and -cfg {old_cfg} both give the configuration; give only -c")
        args.cfg = old_cfg
    if args.collection is None and required:
        raise ValueError("-d COLLECTION is required (the collection's name or id)")


def parse_fold(value: str) -> int | str:
    """nnU-Net's fold argument: an integer or ``all``."""
    if value == "all":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"fold must be an integer (0-4 for nnU-Net's 5-fold split) or 'all', "
                                         f"got {value!r}") from None


def parse_key_value_pairs(items: Iterable[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"{flag}: expected KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def parse_method_options(items: Iterable[str], flag: str = "--trainer-options") -> dict[str, dict]:
    """``METHOD=JSON`` items -> {method: JSON object} (``nnharmony_benchmark --trainer-options``)."""
    out = {}
    for method, text in parse_key_value_pairs(items, flag).items():
        try:
            out[method] = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{flag} {method}: not valid JSON ({e})") from None
        if not isinstance(out[method], dict):
            raise ValueError(f"{flag} {method}: expected a JSON object")
    return out


def parse_trainer_options(text: str | None) -> dict:
    """``--trainer-options`` JSON object of trainer attributes (empty when not given)."""
    if not text:
        return {}
    try:
        options = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--trainer-options is not valid JSON: {e}") from None
    if not isinstance(options, dict):
        raise ValueError(f"--trainer-options must be a JSON object of trainer attributes, got {text!r}")
    return options
