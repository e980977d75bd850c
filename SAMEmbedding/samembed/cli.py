"""The ``samembed`` command line."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .errors import InputError, SamEmbedError


def _cmd_train(args) -> int:
    from .training.config import load_config
    from .training.train import Trainer

    cfg = load_config(args.config, args.set)
    if args.arch:
        cfg.arch = args.arch
    if args.objective:
        cfg.objective = args.objective
    if args.data:
        cfg.data = args.data
    if args.out:
        cfg.out_dir = args.out
    if args.iterations:
        cfg.iterations = args.iterations
    final = Trainer(cfg, progress=not args.quiet).run(resume=args.resume)
    print(f"wrote {final}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="samembed", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="self-supervised training")
    t.add_argument("--config", help="YAML or TOML config file")
    t.add_argument("--arch", choices=["sam-lite", "sam-lite-2d", "sam-official"])
    t.add_argument("--objective")
    t.add_argument("--data", nargs="+")
    t.add_argument("--out")
    t.add_argument("--iterations", type=int)
    t.add_argument("--resume")
    t.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=_cmd_train)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SamEmbedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
