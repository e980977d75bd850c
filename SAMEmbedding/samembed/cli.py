"""The ``samembed`` command line: ``match``, ``embed``, ``info``, ``train``, ``propagate``, ``evaluate``, ``make-suites``.

Exit codes: 0 success, 2 bad input (message names the file and the problem), 1 internal error
(``propagate``: 3 when some scans failed, listed in failures.csv).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from .errors import DeviceUnavailableError, InputError, SamEmbedError

log = logging.getLogger("samembed")


class _Progress:
    """A tqdm bar that appears only for work longer than about a second."""

    def __init__(self, total: int, desc: str, enabled: bool = True) -> None:
        self.total, self.desc, self.enabled = total, desc, enabled
        self.bar = None
        self.t0 = time.time()

    def update(self, done: int, total: int, message: str = "") -> None:
        if not self.enabled:
            return
        if self.bar is None and time.time() - self.t0 > 1.0:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=self.desc, dynamic_ncols=True, file=sys.stderr)
        if self.bar is not None:
            self.bar.n = done
            self.bar.set_postfix_str(Path(message).name if message else "")
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _make_matcher(args):
    from .api import Matcher

    device = args.device
    if device == "auto":
        import torch

        if not torch.cuda.is_available():
            log.info("no CUDA device: running on the CPU")
    return Matcher(model=args.model, device=device, cache_dir=getattr(args, "cache_dir", None),
                   modality=getattr(args, "modality", "auto"), spacing_mm=getattr(args, "spacing", None))


#: ``samembed match`` flags -> :class:`~samembed.options.MatchOptions` fields (the help and the default of each
#: come from the dataclass, so every option is reachable and each default is declared once)
_OPTION_FLAGS: dict[str, tuple[str, dict]] = {
    "prior_window_mm": ("--prior-window", {"type": float, "metavar": "MM"}),
    "global_window_mm": ("--global-window", {"type": float, "metavar": "MM"}),
    "search_body": ("--body-mask", {"action": argparse.BooleanOptionalAction}),
    "box_lps_mm": ("--box", {"type": float, "nargs": 6, "metavar": ("X0", "Y0", "Z0", "X1", "Y1", "Z1")}),
    "refine": ("--refine", {"action": argparse.BooleanOptionalAction}),
    "refine_window_mm": ("--refine-window", {"type": float, "metavar": "MM"}),
    "consistency": ("--consistency", {"action": argparse.BooleanOptionalAction}),
    "consistency_inlier_mm": ("--consistency-inlier", {"type": float, "metavar": "MM"}),
    "consistency_window_mm": ("--consistency-window", {"type": float, "metavar": "MM"}),
    "polish": ("--polish", {"action": argparse.BooleanOptionalAction}),
    "polish_min_ncc": ("--polish-min-ncc", {"type": float, "metavar": "NCC"}),
    "polish_levels": ("--polish-levels", {"type": lambda text: _parse_levels(text), "metavar": "S,T,W;..."}),
    "roundtrip_tolerance_mm": ("--roundtrip-tolerance", {"type": float, "metavar": "MM"}),
}


def _parse_levels(text: str) -> tuple:
    """``"2,16,8;1,10,2"`` -> ((2, 16, 8), (1, 10, 2))."""
    try:
        return tuple(tuple(float(v) for v in level.split(",")) for level in text.split(";") if level.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give levels as step,template,search;... in mm") from None


def _add_match_options(p: argparse.ArgumentParser) -> None:
    from .options import MatchOptions

    g = p.add_argument_group("search options (see samembed.MatchOptions)")
    for name, (flag, kw) in _OPTION_FLAGS.items():
        g.add_argument(flag, dest=name, default=argparse.SUPPRESS, help=MatchOptions.help(name), **kw)


def match_options_from_args(args, **extra):
    """The :class:`~samembed.options.MatchOptions` of parsed ``match`` flags (unset flags keep the defaults)."""
    from .options import MatchOptions

    values = {name: getattr(args, name) for name in _OPTION_FLAGS if hasattr(args, name)}
    values.update(extra)
    return MatchOptions.from_mapping(values)


def _cmd_match(args) -> int:
    from .api import as_image
    from .io import PointList, check_writable, read_points, write_image, write_points, write_text_atomic

    options = match_options_from_args(args, heatmap=bool(args.heatmap_dir))  # bad options: before any file is made
    points = read_points(args.points, ras=args.ras)
    source = as_image(args.source, spacing_mm=args.spacing)
    targets = [as_image(t, spacing_mm=args.spacing) for t in args.targets]
    out = Path(args.out)
    folder_out = out.is_dir() or str(args.out).endswith(("/", "\\"))
    if folder_out:
        out.mkdir(parents=True, exist_ok=True)
    else:
        check_writable(out)
    if args.heatmap_dir:
        Path(args.heatmap_dir).mkdir(parents=True, exist_ok=True)
    matcher = _make_matcher(args)
    bar = _Progress(len(targets), "matching", not args.quiet)
    try:
        res = matcher.match(source, points.points_lps_mm, targets, points.labels, options, mask=args.mask,
                            progress=bar.update, target_names=[str(t) for t in args.targets])
    finally:
        bar.close()
    if folder_out:
        for ti, name in enumerate(res.targets):
            ms = res.for_target(ti)
            stem = Path(name).name.split(".")[0]
            pl = PointList([m.label for m in ms], [m.point_lps_mm for m in ms],
                           [f"score={m.score:.3f}; confident={str(m.confident).lower()}"
                            + ("; rematched=true" if m.rematched else "")
                            + (f"; polished=true; ncc={m.ncc:.3f}" if m.polished else "") for m in ms])
            write_points(pl, out / f"{stem}.mrk.json", ras=args.ras)
    else:
        lines = ["target,label,x,y,z,score,confident"]
        for r in res.rows(ras=args.ras):
            lines.append(f"{r['target']},{r['label']},{r['x']:.3f},{r['y']:.3f},{r['z']:.3f},{r['score']:.4f},{str(r['confident']).lower()}")
        write_text_atomic(out, "\n".join(lines) + "\n")
    if args.heatmap_dir:
        for (ti, label), img in res.heatmaps.items():
            stem = Path(res.targets[ti]).name.split(".")[0]
            safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in label)
            write_image(img, Path(args.heatmap_dir) / f"{stem}_{safe}_heatmap.nii.gz")
    if not args.quiet:
        for r in res.rows(ras=args.ras):
            frame = "RAS" if args.ras else "LPS"
            print(f"{Path(r['target']).name}\t{r['label']}\t({r['x']:.1f}, {r['y']:.1f}, {r['z']:.1f}) mm {frame}\t"
                  f"score {r['score']:.3f}\t{'confident' if r['confident'] else 'NOT confident'}")
        print(f"wrote {out} in {res.timings['total_s']:.1f} s")
    return 0


def _cmd_embed(args) -> int:
    from .api import as_image

    if not args.cache_dir:
        raise InputError("samembed embed needs --cache-dir DIR to store the embeddings")
    Path(args.cache_dir).mkdir(parents=True, exist_ok=True)
    matcher = _make_matcher(args)
    bar = _Progress(len(args.images), "embedding", not args.quiet)
    for n, path in enumerate(args.images):
        t0 = time.time()
        maps = matcher.embed(as_image(path, spacing_mm=args.spacing))
        bar.update(n + 1, len(args.images), str(path))
        if not args.quiet:
            print(f"{path}: local {tuple(maps.local.shape)}, global {tuple(maps.global_.shape)}, {time.time() - t0:.1f} s")
        matcher.clear_cache()
    bar.close()
    return 0


def _cmd_info(args) -> int:
    import platform

    import SimpleITK as sitk
    import torch

    from . import __version__
    from .models import models_dir, registry

    print(f"samembed {__version__}  python {platform.python_version()}  torch {torch.__version__}  "
          f"SimpleITK {sitk.Version.VersionString()}")
    cuda = torch.cuda.is_available()
    print(f"device: {'cuda (' + torch.cuda.get_device_name(0) + ')' if cuda else 'cpu'}; threads {torch.get_num_threads()}")
    print(f"models ({models_dir() / 'models.json'}):")
    for m in registry().get("models", []):
        avail = "available" if m.get("file") and (models_dir() / m["file"]).is_file() else "not on this machine"
        print(f"  {m['name']:<18} {m.get('architecture', '?'):<14} {m.get('spacing_mm', '?')} mm  {avail}"
              + (f"  - {m.get('note')}" if avail != "available" and m.get("note") else ""))
    print("  random:<arch>      seeded random weights for smoke tests (sam-lite, sam-lite-2d, sam-official)")
    return 0


def _cmd_train(args) -> int:
    from .training.config import load_config
    from .training.train import Trainer

    cfg = load_config(args.config, args.set)
    for key in ("arch", "objective", "data", "iterations"):
        if getattr(args, key):
            setattr(cfg, key, getattr(args, key))
    if args.out:
        cfg.out_dir = args.out
    final = Trainer(cfg, progress=not args.quiet).run(resume=args.resume)
    print(f"wrote {final}")
    return 0


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default", help="model name (see `samembed info`), checkpoint path, or random:<arch>")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--cache-dir", help="on-disk embedding cache folder")
    p.add_argument("--modality", default="auto", choices=["auto", "ct", "mri", "xray"])
    p.add_argument("--spacing", type=float, help="pixel spacing (mm) for 2D files that carry none (PNG/JPEG)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``samembed`` command."""
    p = argparse.ArgumentParser(prog="samembed", description="SAM anatomical embeddings: match points across medical images.")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("match", help="match points from a source image into target images")
    m.add_argument("source")
    m.add_argument("targets", nargs="+", metavar="TARGET")
    m.add_argument("--points", required=True, help="CSV (label,x,y,z), .fcsv or .mrk.json")
    m.add_argument("--out", required=True, help="CSV file, or a folder for one .mrk.json per target")
    m.add_argument("--heatmap-dir", help="write each point's similarity map per target (target geometry)")
    m.add_argument("--ras", action="store_true", help="CSV points in and out are RAS (Slicer) instead of LPS")
    m.add_argument("--mask", help="search only where this image (target space) is non-zero")
    _add_match_options(m)
    _add_common(m)
    m.set_defaults(func=_cmd_match)

    e = sub.add_parser("embed", help="pre-compute embeddings into a cache folder")
    e.add_argument("images", nargs="+", metavar="IMAGE")
    _add_common(e)
    e.set_defaults(func=_cmd_embed)

    i = sub.add_parser("info", help="models, device and versions")
    i.set_defaults(func=_cmd_info)

    t = sub.add_parser("train", help="self-supervised training (SAM and related objectives)")
    t.add_argument("--config", help="YAML or TOML config file")
    t.add_argument("--arch", choices=["sam-lite", "sam-lite-2d", "sam-official"])
    t.add_argument("--objective", help="sam, or a weighted sum such as sam+isimed:0.5")
    t.add_argument("--data", nargs="+", help="folders (recursive), list files or images")
    t.add_argument("--out", help="output folder")
    t.add_argument("--iterations", type=int)
    t.add_argument("--resume", nargs="?", const="auto", metavar="CHECKPOINT",
                   help="continue a run: from CHECKPOINT, or (no value) from the run folder's last.pt when it exists, "
                        "else start anew (from the config's init_from weights, if set)")
    t.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config settings")
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=_cmd_train)

    from .propagate.cli import add_parser as add_propagate_parser  # dask is imported only when it runs

    add_propagate_parser(sub)

    try:
        from .evaluation.cli import add_parsers
    except ImportError:  # evaluation tools not installed
        pass
    else:
        add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    try:
        return int(args.func(args) or 0)
    except DeviceUnavailableError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SamEmbedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - last resort: one line, not a traceback
        if getattr(args, "verbose", False):
            raise
        print(f"internal error: {type(e).__name__}: {e} (run with -v for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
