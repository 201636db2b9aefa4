"""The `disagg` command: model tiny | serve | worker | epp | bench | status | profile | simulate | plan."""

from __future__ import annotations

import argparse
import sys


def _model(args: argparse.Namespace) -> int:
    from disagg.engine.tiny_model import build_tiny_model

    path = build_tiny_model(args.dir, size=args.size, seed=args.seed)
    print(path)
    return 0


def _serve(argv: list[str]) -> int:
    from disagg.serve import main

    return main(argv)


def _worker(argv: list[str]) -> int:
    from disagg.worker.__main__ import main

    return main(argv)


def _epp(argv: list[str]) -> int:
    from disagg.epp.cli import main

    return main(argv)


def _bench(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: disagg bench {serve,transfer,epp,soak} [options]")
        return 0 if argv else 2
    kind, rest = argv[0], argv[1:]
    if kind == "serve":
        from disagg.bench.serve import main
    elif kind == "transfer":
        from disagg.bench.transfer import main
    elif kind == "epp":
        from disagg.bench.epp import main
    elif kind == "soak":
        from disagg.bench.soak import main
    elif kind == "compare":
        # The research harness is no part of the package: it runs from a checkout.
        print("disagg bench compare moved to `python -m benchmarks.compare` (run from a checkout's root)",
              file=sys.stderr)
        return 2
    else:
        print(f"disagg bench: unknown benchmark {kind!r} (serve, transfer, epp, soak)", file=sys.stderr)
        return 2
    return main(rest)


def _status(argv: list[str]) -> int:
    from disagg.status import main

    return main(argv)


def _profile(argv: list[str]) -> int:
    from disagg.sim.profile import main

    return main(argv)


def _simulate(argv: list[str]) -> int:
    from disagg.sim.simulate import main

    return main(argv)


def _plan(argv: list[str]) -> int:
    from disagg.sim.plan import main

    return main(argv)


# Subcommands with their own argument parsers get the rest of the command line untouched.
_PASSTHROUGH = {"serve": _serve, "worker": _worker, "epp": _epp, "bench": _bench, "status": _status,
                "profile": _profile, "simulate": _simulate, "plan": _plan}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _PASSTHROUGH:
        return _PASSTHROUGH[argv[0]](argv[1:])

    parser = argparse.ArgumentParser(prog="disagg", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    model = sub.add_parser("model", help="build a model")
    model_sub = model.add_subparsers(dest="kind", required=True)
    tiny = model_sub.add_parser("tiny", help="a small seeded random-weight Llama vLLM loads offline")
    tiny.add_argument("dir")
    tiny.add_argument("--size", default="tiny", help="tiny (tests) or bench (~100M parameters)")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=_model)
    for name in _PASSTHROUGH:
        sub.add_parser(name, help=f"see `disagg {name} --help`")
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
