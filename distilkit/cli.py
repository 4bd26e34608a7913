"""The ``distilkit`` command: ``demo``, ``validate``, ``schema``, ``convert-textbrewer``, ``bench``.

```text
distilkit demo [--out DIR] [--seeds N] [--quick]     distil on scikit-learn's digits, next to a labels-only baseline
distilkit validate SPEC.json                          print the normalised spec, or its problems (exit status 2)
distilkit schema                                      print the JSON Schema of spec files
distilkit convert-textbrewer CONFIG.json [--total-steps N] [-o OUT]
                                                      a TextBrewer DistillationConfig JSON as a distilkit spec JSON
distilkit bench [ARGS...]                             the loss benchmarks (from a clone of the repository)
```

Bad arguments and unreadable or invalid files give one line per problem on stderr (``distilkit <command>: ...``) and
exit status 2, never a traceback. ``main(argv)`` returns the exit status, so the command also runs in-process.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path

PROG = "distilkit"


class UsageError(Exception):
    """Bad command-line arguments (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are raised (one line, reported by :func:`main`) instead of printed with
    the usage and an exit."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message} (see '{self.prog} --help')")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _parser() -> _Parser:
    from . import __version__

    parser = _Parser(prog=PROG, description="Knowledge distillation for PyTorch: command-line tools.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser("demo", help="distil a small MLP on scikit-learn's handwritten digits, next to a "
                          "labels-only baseline (TensorBoard logs and summary.json under --out)",
                          description="Teacher MLP → smaller student by distillation (kd_kl on the logits + a "
                          "projected hidden-feature loss) with labels for a fraction of the training split and the "
                          "teacher's outputs on all of it, against the same student trained on those labels alone; "
                          "held-out accuracy over several seeds.")
    demo.add_argument("--out", default="runs/demo", metavar="DIR",
                      help="directory for the TensorBoard logs and summary.json (default: runs/demo)")
    demo.add_argument("--seeds", type=_positive_int, default=None, metavar="N",
                      help="number of student seeds (default: 3; 1 with --quick)")
    demo.add_argument("--quick", action="store_true", help="a few training steps only (a smoke test)")

    validate = sub.add_parser("validate", help="check a spec file and print it normalised",
                              description="Read a spec file with distilkit.from_config and print it normalised "
                              "(every default written out); on problems print each as '<path>: <message>' and exit "
                              "with status 2.")
    validate.add_argument("spec", metavar="SPEC.json")

    sub.add_parser("schema", help="print the JSON Schema of spec files",
                   description="Print the JSON Schema of distilkit spec files (for editors and validators).")

    convert = sub.add_parser("convert-textbrewer", help="convert a TextBrewer DistillationConfig JSON to a spec file",
                             description="Convert the JSON of a TextBrewer DistillationConfig (its keyword "
                             "arguments) to a distilkit spec file (distilkit.from_textbrewer).")
    convert.add_argument("config", metavar="CONFIG.json")
    convert.add_argument("--total-steps", type=_positive_int, default=None, metavar="N",
                         help="optimizer steps of the whole run (needed by weight schedulers)")
    convert.add_argument("-o", "--output", default=None, metavar="OUT",
                         help="write the spec here instead of to stdout")

    sub.add_parser("bench", help="run the loss benchmarks (from a clone of the repository); arguments are passed on",
                   add_help=False)
    return parser


# ------------------------------------------------------------------------------------------------ commands
def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _fail(command: str, message: str) -> int:
    print(f"{PROG} {command}: {message}", file=sys.stderr)
    return 2


def _config_failure(command: str, source: str, error: Exception) -> int:
    """One line per problem of a ``ConfigError`` (``<file>: <path>: <message>``), else the error as one line."""
    problems = getattr(error, "problems", ())
    if not problems:
        return _fail(command, f"{source}: {_one_line(error)}")
    for where, message in problems:
        print(f"{PROG} {command}: {source}: {where}: {' '.join(message.split())}", file=sys.stderr)
    return 2


def _read_json_file(command: str, name: str) -> tuple[object | None, int]:
    """Parse the JSON file ``name``; ``(value, 0)``, or ``(None, 2)`` after reporting the problem."""
    path = Path(name)
    if not path.is_file():
        return None, _fail(command, f"{name}: no such file" if not path.exists() else f"{name}: not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        return None, _fail(command, f"{name}: cannot read it ({_one_line(error)})")
    try:
        return json.loads(text), 0
    except json.JSONDecodeError as error:
        return None, _fail(command, f"{name}: malformed JSON at line {error.lineno}, column {error.colno}: "
                                    f"{error.msg}")


def _validate(args: argparse.Namespace) -> int:
    import distilkit as dk

    config, status = _read_json_file("validate", args.spec)
    if status:
        return status
    if not isinstance(config, dict):
        return _fail("validate", f"{args.spec}: expected a JSON object (a spec config), got a JSON "
                                 f"{type(config).__name__}")
    try:
        spec = dk.from_config(config)
        text = dk.config.to_config(spec).model_dump_json(indent=2)
    except (ValueError, TypeError) as error:
        return _config_failure("validate", args.spec, error)
    print(text)
    return 0


def _schema(args: argparse.Namespace) -> int:
    from .config import schema

    print(json.dumps(schema(), indent=2))
    return 0


def _convert(args: argparse.Namespace) -> int:
    import distilkit as dk

    config, status = _read_json_file("convert-textbrewer", args.config)
    if status:
        return status
    try:
        spec = dk.from_textbrewer(config, total_steps=args.total_steps)
        text = dk.config.to_config(spec).model_dump_json(indent=2)
    except (ValueError, TypeError) as error:
        return _config_failure("convert-textbrewer", args.config, error)
    if args.output is None:
        print(text)
        return 0
    try:
        Path(args.output).write_text(text + "\n", encoding="utf-8")
    except OSError as error:
        return _fail("convert-textbrewer", f"cannot write {args.output} ({_one_line(error)})")
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


def _demo(args: argparse.Namespace) -> int:
    try:
        import sklearn  # noqa: F401
        import tqdm  # noqa: F401

        from . import demo
    except ImportError as error:
        return _fail("demo", f"needs scikit-learn and tqdm: pip install 'distilkit[demo]' ({_one_line(error)})")
    seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        return _fail("demo", f"--out {args.out}: exists and is not a directory")
    try:
        summary = demo.run(out, seeds=seeds, quick=args.quick)
    except OSError as error:
        return _fail("demo", f"cannot write under {args.out} ({_one_line(error)})")
    print(demo.table(summary))
    print(f"wall time {summary['wall_time_s']:.1f} s; wrote {out / 'summary.json'}; "
          f"view the training curves with: tensorboard --logdir {out}")
    return 0


def _benchmarks_dirs() -> list[Path]:
    """Where a clone's top-level ``benchmarks/`` package may be: the current directory, then the repository root
    next to the installed (editable) package."""
    found = []
    for root in (Path.cwd(), Path(__file__).resolve().parents[1]):
        if (root / "benchmarks" / "__main__.py").is_file() and root not in found:
            found.append(root)
    return found


def _bench(rest: list[str]) -> int:
    roots = _benchmarks_dirs()
    if not roots:
        return _fail("bench", "the benchmarks are not installed with the package: run 'distilkit bench' from a clone "
                              "of the repository (git clone, then pip install -e '.[dev]')")
    root = str(roots[0])
    added = root not in sys.path
    if added:
        sys.path.insert(0, root)
    try:
        module = importlib.import_module("benchmarks.__main__")
    except ImportError as error:
        return _fail("bench", f"cannot import the benchmarks from {root} ({_one_line(error)})")
    finally:
        if added:
            sys.path.remove(root)
    entry = getattr(module, "main", None)
    if not callable(entry):
        return _fail("bench", f"{root}/benchmarks/__main__.py has no main(argv) function")
    try:
        status = entry(rest)
    except SystemExit as exit_:  # an argparse-based benchmark runner exits on --help and on bad arguments
        status = exit_.code
    if status is None:
        return 0
    return status if isinstance(status, int) else 1


_COMMANDS = {"validate": _validate, "schema": _schema, "convert-textbrewer": _convert, "demo": _demo}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``distilkit`` command with ``argv`` (default ``sys.argv[1:]``) and return its exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "bench":  # everything after `bench` belongs to the benchmark runner
            return _bench(argv[1:])
        parser = _parser()
        if not argv:
            parser.print_help(sys.stderr)
            return 2
        try:
            args = parser.parse_args(argv)
        except UsageError as error:
            print(str(error), file=sys.stderr)
            return 2
        except SystemExit as exit_:  # --help and --version
            return exit_.code if isinstance(exit_.code, int) else 0
        if args.command is None:
            parser.print_help(sys.stderr)
            return 2
        return _COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
