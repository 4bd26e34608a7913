"""The ``distilkit`` command: ``demo``, ``doctor``, ``validate``, ``schema``, ``convert-textbrewer``, ``bench``.

```text
distilkit demo [--out DIR] [--seeds N] [--quick]     distil on scikit-learn's digits, next to a labels-only baseline
distilkit demo lm [--out DIR] [--seeds N] [--quick]  distil a GPT-2 on Python's own documentation five ways (labels
                                                      only, dense / fused / top-k cache KD, on-policy GKD)
distilkit doctor [--no-compile] [--timeout S]         torch, devices, compilers, the CPU kernel, torch.compile: a
                                                      short report to paste into a bug report
distilkit validate SPEC.json|-                        print the normalised spec, or its problems (exit status 2);
                                                      '-' reads standard input
distilkit schema                                      print the JSON Schema of spec files
distilkit convert-textbrewer CONFIG.json|- [--total-steps N] [-o OUT]
                                                      a TextBrewer DistillationConfig JSON as a distilkit spec JSON
distilkit bench [ARGS...]                             the loss benchmarks (from a clone of the repository)
```

Bad arguments give one line on stderr (``distilkit <command>: ...``) followed by that command's usage, and exit
status 2; unreadable or invalid files give one line per problem, ``distilkit <command>: <file>: <path>: <message>``
(``<stdin>`` for ``-``; ``<root>`` for the whole file), and exit status 2; never a traceback. Files are read by the
same loader as ``dk.from_config`` / ``dk.from_textbrewer`` (no key twice, nesting at most 64 deep, numbers within
float32's range, options within their ranges). ``main(argv)`` returns the exit status, so the command also runs
in-process. Only the chosen command imports torch (``--help`` and argument errors stay fast).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

PROG = "distilkit"


class UsageError(Exception):
    """Bad command-line arguments (exit status 2); ``usage`` is the usage of the command that was given them."""

    def __init__(self, message: str, usage: str = "") -> None:
        super().__init__(message)
        self.usage = usage


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are raised (reported by :func:`main`: one line, then this parser's usage)
    instead of printed with an exit. ``commands`` maps each subcommand to its parser."""

    commands: dict[str, _Parser]

    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message} (see '{self.prog} --help')", self.format_usage())

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        """As ``ArgumentParser.parse_args``, but arguments that no parser recognised are reported by the
        subcommand they were given to (its usage, not the top-level one)."""
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            owner = getattr(self, "commands", {}).get(getattr(parsed, "command", None), self)
            owner.error(f"unrecognized arguments: {' '.join(extra)}")
        return parsed


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _parser() -> _Parser:
    from . import __version__

    parser = _Parser(prog=PROG, description="Knowledge distillation for PyTorch: command-line tools.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser("demo", help="distil a small MLP on scikit-learn's handwritten digits next to a "
                          "labels-only baseline ('demo lm': a GPT-2 on Python's own documentation, five ways); a new "
                          "run folder under --out: summary.json, curves.png, TensorBoard logs",
                          description="digits (the default): teacher MLP → smaller student by distillation (kd_kl on "
                          "the logits + a projected hidden-feature loss) with labels for a fraction of the training "
                          "split and the teacher's outputs on all of it, against the same student trained on those "
                          "labels alone; held-out accuracy over several seeds. lm: a byte-level BPE tokenizer and a "
                          "teacher GPT-2 trained on Python's help topics and standard-library docstrings (no "
                          "download), then students trained on labels only, by dense, fused and top-k-cache KD, and "
                          "on-policy (GKD); held-out perplexity and tokens per second over several seeds.")
    demo.add_argument("which", nargs="?", choices=("digits", "lm"), default="digits",
                      help="digits (default) or lm")
    demo.add_argument("--out", default=None, metavar="DIR",
                      help="each run writes its TensorBoard logs, summary.json and curves.png into a new folder "
                      "DIR/<date>-<time> (default DIR: runs/demo, runs/demo-lm for lm)")
    demo.add_argument("--seeds", type=_positive_int, default=None, metavar="N",
                      help="number of student seeds (default: 3; 1 with --quick)")
    demo.add_argument("--quick", action="store_true",
                      help="a few training steps only (lm: tiny models): a smoke test whose numbers mean nothing")

    doctor = sub.add_parser("doctor", help="report torch, the devices, the C compiler, the CPU kernel and whether "
                            "torch.compile works here (paste it into bug reports)",
                            description="Print a short report of this installation: distilkit, Python and torch "
                            "versions, the devices, the C and C++ compilers, the CPU kernel's status and why, its "
                            "cache directory, and whether torch.compile works here (a tiny function compiled in a "
                            "fresh process).")
    doctor.add_argument("--no-compile", action="store_true", help="skip the torch.compile check")
    doctor.add_argument("--timeout", type=_positive_float, default=300.0, metavar="S",
                        help="give up the torch.compile check after S seconds (default: 300)")

    validate = sub.add_parser("validate", help="check a spec file and print it normalised",
                              description="Read a spec file with distilkit.from_config and print it normalised "
                              "(every default written out); on problems print each as '<file>: <path>: <message>' "
                              "and exit with status 2. Checks the options' ranges too (temperature in [1e-4, 100], "
                              "beta and alpha in [0, 1], ...), schedules at every step.")
    validate.add_argument("spec", metavar="SPEC.json", help="the spec file; '-' reads standard input")

    sub.add_parser("schema", help="print the JSON Schema of spec files",
                   description="Print the JSON Schema of distilkit spec files (for editors and validators).")

    convert = sub.add_parser("convert-textbrewer", help="convert a TextBrewer DistillationConfig JSON to a spec file",
                             description="Convert the JSON of a TextBrewer DistillationConfig (its keyword "
                             "arguments) to a distilkit spec file (distilkit.from_textbrewer).")
    convert.add_argument("config", metavar="CONFIG.json", help="the TextBrewer config; '-' reads standard input")
    convert.add_argument("--total-steps", type=_positive_int, default=None, metavar="N",
                         help="optimizer steps of the whole run (needed by weight schedulers)")
    convert.add_argument("-o", "--output", default=None, metavar="OUT",
                         help="write the spec here instead of to stdout")

    cache = sub.add_parser("cache", help="inspect a teacher cache written by dk.cache",
                           description="Commands on teacher caches (dk.cache).")
    cache_sub = cache.add_subparsers(dest="cache_command", metavar="CACHE_COMMAND", required=True)
    info = cache_sub.add_parser("info", help="what a cache holds: its kind, examples and positions, the top-k's kept "
                                "probability mass (mean and percentiles), bytes per position",
                                description="Print what the teacher cache in DIR holds: its kind and version, "
                                "examples and positions, for a top-k cache the distribution of the probability mass "
                                "its top k keep, and its size in bytes per position.")
    info.add_argument("dir", metavar="DIR", help="the cache directory")
    info.add_argument("--json", action="store_true", help="print the information as JSON")

    sub.add_parser("bench", help="run the loss benchmarks (from a clone of the repository); arguments are passed on",
                   add_help=False)
    parser.commands = dict(sub.choices)
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


def _read_text(command: str, name: str) -> tuple[str | None, str, int]:
    """``(text, shown name, 0)`` of the file ``name`` (``-``: standard input), or ``(None, name, 2)`` after reporting
    why it cannot be read."""
    if name == "-":
        stream = getattr(sys.stdin, "buffer", None)
        try:
            data = stream.read() if stream is not None else sys.stdin.read()
            return (data.decode("utf-8") if isinstance(data, bytes) else data), "<stdin>", 0
        except (OSError, UnicodeDecodeError) as error:
            return None, "<stdin>", _fail(command, f"<stdin>: cannot read it ({_one_line(error)})")
    path = Path(name)
    if not path.is_file():
        return None, name, _fail(command, f"{name}: no such file" if not path.exists() else f"{name}: not a file")
    try:
        return path.read_text(encoding="utf-8"), name, 0
    except (OSError, UnicodeDecodeError) as error:
        return None, name, _fail(command, f"{name}: cannot read it ({_one_line(error)})")


def _load_and_build(command: str, name: str, api: str, build) -> tuple[object | None, str, int]:
    """Read ``name``, load it as :func:`distilkit.config._json.load` does and ``build(loaded)``: ``(result, shown
    name, 0)``, or ``(None, shown name, status)`` after printing one line per problem."""
    from .config._json import parse

    text, shown, status = _read_text(command, name)
    if text is None:
        return None, shown, status
    try:
        return build(parse(text, api, None)), shown, 0
    except (ValueError, TypeError) as error:  # ConfigError: one line per problem
        return None, shown, _config_failure(command, shown, error)
    except Exception as error:  # not expected: one line all the same, never a traceback
        print(f"{PROG} {command}: {shown}: internal error, please report it: {type(error).__name__}: "
              f"{_one_line(error)}", file=sys.stderr)
        return None, shown, 1


def _validate(args: argparse.Namespace) -> int:
    import distilkit as dk
    from distilkit.config._convert import build

    spec, shown, status = _load_and_build("validate", args.spec, "from_config", build)
    if status:
        return status
    try:
        text = dk.config.to_config(spec).model_dump_json(indent=2)
    except (ValueError, TypeError) as error:
        return _config_failure("validate", shown, error)
    print(text)
    return 0


def _schema(args: argparse.Namespace) -> int:
    from .config import schema

    print(json.dumps(schema(), indent=2))
    return 0


def _convert(args: argparse.Namespace) -> int:
    import distilkit as dk
    from distilkit.config._textbrewer import build

    spec, shown, status = _load_and_build("convert-textbrewer", args.config, "from_textbrewer",
                                          lambda loaded: build(loaded, args.total_steps))
    if status:
        return status
    try:
        text = dk.config.to_config(spec).model_dump_json(indent=2)
    except (ValueError, TypeError) as error:
        return _config_failure("convert-textbrewer", shown, error)
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
        import tqdm  # noqa: F401

        if args.which == "lm":
            import tokenizers  # noqa: F401
            import transformers  # noqa: F401

            from . import demo_lm as chosen
        else:
            import sklearn  # noqa: F401

            from . import demo as chosen
        from .demo import new_run_dir
    except ImportError as error:
        needs = "transformers, tokenizers" if args.which == "lm" else "scikit-learn"
        return _fail("demo", f"needs {needs} and tqdm: pip install 'distilkit[demo]' ({_one_line(error)})")
    seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    parent = Path(args.out if args.out is not None else "runs/demo" + ("-lm" if args.which == "lm" else ""))
    if parent.exists() and not parent.is_dir():
        return _fail("demo", f"--out {parent}: exists and is not a directory")
    try:
        out = new_run_dir(parent, quick=args.quick)
        summary = chosen.run(out, seeds=seeds, quick=args.quick)
    except OSError as error:
        return _fail("demo", f"cannot write under {parent} ({_one_line(error)})")
    print(chosen.table(summary))
    written = ["summary.json", *([summary["plot"]] if summary["plot"] else []), "TensorBoard logs"]
    print(f"wrote {out}{os.sep}: {', '.join(written)}; compare runs with: tensorboard --logdir {parent}")
    if not summary["plot"]:
        print(f"no plot: {summary['plot_note']}")
    elapsed = time.perf_counter() - getattr(args, "started", time.perf_counter())
    print(f"took {elapsed:.1f} s in all ({summary['wall_time_s']:.1f} s of data, training and evaluation) on "
          f"{summary['machine']}")
    return 0


# ------------------------------------------------------------------------------------------------ doctor
_COMPILE_PROBE = """
import torch
def f(x):
    return torch.softmax(x * 2.0, dim=-1).sum(-1) + x.exp().mean()
x = torch.randn(4, 8)
torch.testing.assert_close(torch.compile(f, fullgraph=True)(x), f(x))
print("compiled ok")
"""


def _compile_probe(timeout: float, code: str = _COMPILE_PROBE) -> str:
    """Whether ``code`` (by default a tiny ``torch.compile(fullgraph=True)`` on the CPU) runs in a fresh Python
    process within ``timeout`` seconds and prints ``compiled ok``; the process and its children are killed after."""
    env = {**os.environ, "TORCHINDUCTOR_COMPILE_THREADS": "1"}  # no pool of compile workers to leave behind
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(process)
        process.communicate()
        return f"unknown: no answer within {timeout:g} s (a first compilation can take minutes on a small CPU; " \
               "raise --timeout)"
    elapsed = time.perf_counter() - start
    if process.returncode == 0 and stdout.strip().endswith("compiled ok"):
        return f"works (a tiny function compiled and ran in {elapsed:.1f} s, in a fresh process)"
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    why = lines[-1] if lines else f"exit status {process.returncode}"
    return f"fails: {why[:300]}"


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (OSError, AttributeError):  # gone already, or no process groups (Windows)
        process.kill()


def _first_line(command: list[str]) -> str:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as error:
        return f"cannot run it ({_one_line(error)})"
    lines = (result.stdout or result.stderr).strip().splitlines()
    return lines[0] if lines else f"exit status {result.returncode}"


def _compiler(variable: str, names: tuple[str, ...]) -> str:
    """``$variable``, else the first of ``names`` on the PATH, with the first line of its ``--version``."""
    chosen = os.environ.get(variable)
    source = f"${variable}" if chosen else "PATH"
    path = shutil.which(chosen) if chosen else next(filter(None, map(shutil.which, names)), None)
    if path is None and chosen:
        return f"none found (${variable}={chosen} is not an executable on the PATH)"
    if path is None:
        return f"none found (${variable} is unset and none of {', '.join(names)} is on the PATH)"
    return f"{path} (from {source}): {_first_line([path, '--version'])}"


def _versions(names: Sequence[str]) -> str:
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in names:
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            found.append(f"{name} -")
    return ", ".join(found)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def doctor_report(*, compile_check: bool = True, timeout: float = 300.0) -> Iterator[tuple[str, str]]:
    """The ``distilkit doctor`` report as ``(label, text)`` pairs, computed one after the other (the torch.compile
    check, the slowest, last)."""
    from . import __version__

    yield "distilkit", f"{__version__} ({Path(__file__).resolve().parent})"
    yield "python", f"{platform.python_version()} ({platform.python_implementation()}) on {platform.platform()}"
    import torch

    yield "torch", f"{torch.__version__}; CUDA build: {torch.version.cuda or 'none'}; {torch.__file__}"
    devices = [f"cpu: {_cpu_name()}, {os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch threads"]
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        devices.append(f"cuda: {len(names)} ({', '.join(names)})")
    else:
        devices.append("cuda: not available")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append("mps: available")
    yield "devices", "; ".join(devices)
    yield "C compiler", _compiler("CC", ("cc", "gcc"))
    yield "C++ compiler", _compiler("CXX", ("c++", "g++", "clang++")) + " (torch.compile on the CPU needs it)"
    from .losses import _cpu_kernel

    with warnings.catch_warnings():  # an unavailable kernel warns; here the report says it
        warnings.simplefilter("ignore", RuntimeWarning)
        status = _cpu_kernel.status()  # builds the kernel on first use, as the losses would
        library = _cpu_kernel.library()
    if library is not None:
        yield "CPU kernel", f"{status}: the chunked logit divergences and fused_linear_kd use it for float32 CPU logits"
        yield "kernel cache", str(getattr(library, "_name", "?"))
    else:
        yield "CPU kernel", f"not used ({status}): the chunked logit divergences run their torch chunk loop instead"
        yield "kernel cache", " or ".join(str(d) for d in _cpu_kernel._cache_dirs())
    from .backends import report

    yield "gradient reuse", f"{report()['reuse_gradient_memory']} (on with DISTILKIT_REUSE_GRAD=1 or inside " \
                            "dk.backends.reuse_gradient_memory())"
    settings = [f"{k}={v}" for k, v in sorted(os.environ.items())
                if k.startswith(("DISTILKIT_", "TORCHINDUCTOR_", "TORCH_COMPILE")) or k in ("CC", "CXX")]
    yield "environment", ", ".join(settings) or "no DISTILKIT_*, TORCHINDUCTOR_*, CC or CXX variables set"
    yield "packages", _versions(("numpy", "einops", "pydantic", "tensorboard", "scikit-learn", "matplotlib",
                                 "transformers", "textbrewer"))
    yield "torch.compile", _compile_probe(timeout) if compile_check else "not checked (--no-compile)"


def _doctor(args: argparse.Namespace) -> int:
    width = len("gradient reuse") + 2
    for label, text in doctor_report(compile_check=not args.no_compile, timeout=args.timeout):
        print(f"{label + ':':<{width}}{text}", flush=True)
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


def _cache(args: argparse.Namespace) -> int:
    from . import cache

    try:
        info = cache.info(args.dir)
    except (OSError, cache.CacheError) as error:
        return _fail(f"cache {args.cache_command}", f"{args.dir}: {_one_line(error)}")
    print(json.dumps(info, indent=1) if args.json else cache.format_info(info))
    return 0


_COMMANDS = {"validate": _validate, "schema": _schema, "convert-textbrewer": _convert, "demo": _demo,
             "doctor": _doctor, "cache": _cache}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``distilkit`` command with ``argv`` (default ``sys.argv[1:]``) and return its exit status."""
    started = time.perf_counter()
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
            print(error.usage.rstrip(), file=sys.stderr)
            return 2
        except SystemExit as exit_:  # --help and --version
            return exit_.code if isinstance(exit_.code, int) else 0
        if args.command is None:
            parser.print_help(sys.stderr)
            return 2
        args.started = started
        return _COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
