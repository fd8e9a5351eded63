"""The ``attnswap`` command: parse arguments into a command's config and call one public function.

Every command takes ``--config FILE.yaml`` and ``--key value`` (or ``--key=value``) overrides for any
field of its config dataclass. User mistakes print ``error: …`` on stderr and exit with code 2; each command checks
its inputs and output folder before any work (``attnswap.validate``, through ``attnswap.config`` and
``attnswap.runs``). A command that writes a folder holds that folder's lock while it runs (``attnswap.runs``), so a
second one on the same ``--out`` is refused. SIGTERM is Ctrl-C: the command cleans up and exits 130. Nothing else
reaches the user as a traceback: running out of memory is an error line (exit 2), a bug is one line naming it (exit 1;
``ATTNSWAP_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from attnswap.errors import AttnswapError

# command -> (module, config class, function, name of the field that takes positional arguments)
COMMANDS: dict[str, tuple[str, str, str, str | None]] = {
    "swap": ("attnswap.hf.saved", "SwapConfig", "swap_to_disk", None),
    "distill": ("attnswap.train.distill", "DistillConfig", "distill", None),
    "eval": ("attnswap.measure.evaluate", "EvalConfig", "evaluate", None),
    "generate": ("attnswap.measure.generate", "GenerateConfig", "generate_side_by_side", None),
    "bench": ("attnswap.measure.bench", "BenchConfig", "bench", None),
    "bench-kernel": ("attnswap.measure.bench_kernel", "KernelBenchConfig", "bench_kernel", None),
    "bench-generate": ("attnswap.measure.bench_generate", "GenerateBenchConfig", "bench_generate", None),
    "harden": ("attnswap.measure.harden", "HardenConfig", "harden_model", None),
    "plan": ("attnswap.measure.plan", "PlanConfig", "plan", None),
    "recall": ("attnswap.measure.recall", "RecallConfig", "recall", None),
    "report": ("attnswap.report.build", "ReportConfig", "report", "run_dirs"),
    "run": ("attnswap.pipeline", "RunConfig", "run", "config"),
}

USAGE = """usage: attnswap COMMAND [--config FILE.yaml] [--key value ...]

commands:
  variants       list the attention variants and their parameters
  swap           swap a model's attention and save the result
  distill        train the swapped attention against the original model (KL distillation)
  eval           perplexity, KL, agreement, attention MSE, gradient cosine, edge cases
  generate       generations of the original and swapped models side by side
  bench          whole-model time and memory against sequence length
  bench-kernel   attention-kernel time and memory against sequence length
  bench-generate decode tokens/s, prefill and memory against HF sdpa and StaticCache + compile
  harden         harden a distilled mixture: surviving candidates, density, the hardened model, its speed
  plan           which layers (or a duo's heads) to make cheap within a cost budget
  recall         passkey, copy at a distance, associative recall, loss by position: each swap beside its teacher
  report         an HTML + markdown report from run folders
  run            the whole pipeline from one YAML config

'attnswap COMMAND --help' lists a command's keys and defaults. A config file with a top-level 'runs:' list
runs each entry in turn, into OUT/NAME; '--runs A,B' picks some.

exit codes: 0 done; 2 refused (one 'error: ...' line: a bad value, a damaged file, a busy --out);
130 interrupted (Ctrl-C or SIGTERM: distill checkpoints first, continue it with --resume true)."""


def list_variants() -> str:
    from attnswap.variants import VARIANTS

    lines = []
    for name, cls in sorted(VARIANTS.items()):
        params = ", ".join(f"{f.name}={_default(f)}" for f in dataclasses.fields(cls.Params)) or "(no parameters)"
        lines.append(f"{name:<11} {cls.summary}\n{'':<11} {params}")
    return "\n".join(lines)


def parse_overrides(argv: list[str], positional_field: str | None) -> tuple[str | None, dict[str, Any]]:
    config_file, overrides, positional = None, {}, []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            if positional_field is None:
                raise AttnswapError(f"unexpected argument {arg!r}; options look like --key value")
            positional.append(arg)
            i += 1
            continue
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise AttnswapError(f"option --{key} needs a value")
            value, i = argv[i + 1], i + 1
        i += 1
        if key == "config":
            config_file = value
        else:
            overrides[key.replace("-", "_")] = value
    if positional and positional_field == "config":  # `attnswap run FILE.yaml`
        if config_file is not None or len(positional) > 1:
            raise AttnswapError("give one config file, either as the argument or with --config")
        config_file = positional[0]
    elif positional:
        overrides[positional_field] = positional
    return config_file, overrides


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    try:
        if command == "variants":
            print(list_variants())
            return 0
        if command not in COMMANDS:
            raise AttnswapError(f"unknown command '{command}'; choose from: variants, {', '.join(COMMANDS)}")
        module_name, config_name, function_name, positional_field = COMMANDS[command]
        module = importlib.import_module(module_name)
        config_cls = getattr(module, config_name)
        if any(a in ("-h", "--help") for a in rest):
            print(f"usage: attnswap {command} [--config FILE.yaml] [--key value ...]\n\nkeys (default):")
            for f in dataclasses.fields(config_cls):
                print(f"  --{f.name.replace('_', '-'):<24} {_default(f)}")
            return 0
        from attnswap.config import load_runs

        config_file, overrides = parse_overrides(rest, positional_field)
        with sigterm_interrupts():
            for config in load_runs(config_cls, config_file, overrides):  # one config unless the file lists runs
                getattr(module, function_name)(config)
        return 0
    except AttnswapError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except MemoryError as exc:  # torch.OutOfMemoryError included
        detail = str(exc).splitlines()[0][:160] if str(exc) else "the allocation failed"
        print(f"error: out of memory ({detail}); use a smaller batch_size, length or model", file=sys.stderr)
        return 2
    except Exception as exc:
        if os.environ.get("ATTNSWAP_DEBUG"):
            raise
        where = exc.__traceback__
        while where is not None and where.tb_next is not None:
            where = where.tb_next
        place = f" at {Path(where.tb_frame.f_code.co_filename).name}:{where.tb_lineno}" if where else ""
        detail = str(exc).splitlines()[0][:200] if str(exc) else ""
        print(f"error: internal error {type(exc).__name__}{place}: {detail} (a bug in attnswap; ATTNSWAP_DEBUG=1 "
              "shows the traceback)", file=sys.stderr)
        return 1


@contextlib.contextmanager
def sigterm_interrupts():
    """SIGTERM raises KeyboardInterrupt, as Ctrl-C does: every command cleans up (temporary files, locks) and exits
    130. distill installs its own handler for its loop (checkpoint first) and puts this one back after.

    Python runs a signal's handler wherever the main thread is, a finaliser (``__del__``, a weakref callback)
    included, and a KeyboardInterrupt raised there is printed as "Exception ignored" and dropped. The unraisable hook
    takes that one silently and has a timer thread deliver the signal again a moment later, once the finaliser is
    done (and again, should that one land in a finaliser too); a command that ends first is interrupted as it ends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    last = {"signal": signal.SIGINT}
    swallowed: list[threading.Timer] = []

    def interrupt(number, _frame):
        last["signal"] = number
        raise KeyboardInterrupt

    main_thread = threading.main_thread().ident

    def deliver_again():
        swallowed.clear()
        signal.pthread_kill(main_thread, last["signal"])  # a real signal: it also wakes a blocking call

    previous_hook = sys.unraisablehook

    def redeliver_swallowed(unraisable):
        if not isinstance(unraisable.exc_value, KeyboardInterrupt):
            previous_hook(unraisable)
            return
        # Delivering it from here would run the handler inside this hook, which drops it again.
        timer = threading.Timer(0.01, deliver_again)
        timer.daemon = True
        swallowed.append(timer)
        timer.start()

    previous = signal.signal(signal.SIGTERM, interrupt)
    sys.unraisablehook = redeliver_swallowed
    try:
        yield
        if swallowed:
            raise KeyboardInterrupt
    finally:
        signal.signal(signal.SIGTERM, previous)
        sys.unraisablehook = previous_hook
        for timer in list(swallowed):
            timer.cancel()


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return "(required)"


if __name__ == "__main__":
    sys.exit(main())
