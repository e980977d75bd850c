"""The training loop behind ``samembed train``: SAM two-view contrastive learning on CPU or GPU.

Seeded and deterministic on CPU; checkpoints every N iterations and ``--resume``; progress bar; CSV log
and loss-curve PNG; DistributedDataParallel under ``torchrun`` (gloo on CPU, nccl on GPU).
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from ..io import check_is_folder
from ..models import save_checkpoint
from ..networks import build_network
from ..preprocess import PreprocessConfig
from ..progress import CountProgress
from ..stopping import StopBetweenSteps
from .config import TrainConfig
from .data import data_found, find_volumes, load_cached, prepare_cache_of
from .losses import local_loss, multi_positive_info_nce
from .objectives import parse_objective
from .pairs import (  # noqa: F401 (re-exported)
    BODY_THRESHOLD,
    NOTHING_TO_LEARN,
    inside_view,
    map_positions_mm,
    pair_points,
    sample_at,
)
from .record import Chunk, clipped_words, started_utc, this_command, write_training_record
from .sampling import augment, random_body_point, sample_view
from .semantic import SemanticBatch

log = logging.getLogger(__name__)

#: weight-name prefixes of ``sam-lite``'s two branches (``init_global_from``, ``freeze_global``)
LOCAL_PREFIX, GLOBAL_PREFIX = "l_", "g_"


def body_threshold(mapped: np.ndarray, modality: str) -> float:
    """Mapped intensity above which a training voxel counts as body: -500 HU for CT; for MRI and radiographs
    (no physical scale) the 5th percentile of the volume, as :func:`samembed.preprocess.body_mask` uses."""
    if modality == "ct":
        return BODY_THRESHOLD
    return float(np.percentile(np.asarray(mapped, dtype=np.float32), 5.0))


class TwoBranch(nn.Module):
    """Wraps a network so that one ``forward`` call runs both branches (needed by DDP)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, local_x: torch.Tensor, global_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc = F.normalize(self.net.forward_local(local_x), dim=1)
        glob = F.normalize(self.net.forward_global_pooled(global_x), dim=1)
        return loc, glob


@contextlib.contextmanager
def _torch_settings_kept() -> Iterator[None]:
    """torch's thread count, deterministic mode and CPU random state put back after the block."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    rng = torch.random.get_rng_state()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.random.set_rng_state(rng)


class Trainer:
    """Runs SAM training for a :class:`TrainConfig`; see :meth:`run`."""

    def __init__(self, cfg: TrainConfig, base_dir: Path | None = None, progress: bool = True) -> None:
        self.cfg = cfg
        self.base = base_dir or Path.cwd()
        self.show_progress = progress
        self.rank = int(os.environ.get("RANK", "0"))
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() else torch.device("cpu")
        self.out = Path(cfg.out_dir)
        self.prep = PreprocessConfig(spacing_mm=float(cfg.spacing_mm), fill=cfg.fill)

    # ------------------------------------------------------------------ data
    def load_data(self) -> None:
        cfg = self.cfg
        paths = find_volumes(cfg.data, cfg.exclude, self.base)
        if not paths:  # each data entry named, with what it held (the message named none of them)
            raise InputError(f"no training volumes found: {data_found(cfg.data, cfg.exclude, self.base)}; check "
                             "`data` and `exclude` in the config")
        cache = Path(cfg.cache_dir)
        if self.rank == 0:
            bar = _bar(len(paths), "preprocess", self.show_progress)
            prepared = prepare_cache_of(paths, cache, self.prep, cfg.modality,
                                        progress=lambda n, t, name: bar.update(1) if bar else None,
                                        pixel_spacing_mm=cfg.pixel_spacing_mm)
            if bar:
                bar.close()
        if self.world > 1:
            torch.distributed.barrier()
        if self.rank != 0:
            prepared = prepare_cache_of(paths, cache, self.prep, cfg.modality, pixel_spacing_mm=cfg.pixel_spacing_mm)
        files = [npy for _, npy in prepared]
        self.volumes = []
        #: each volume's fill, the value inference pads it with (the preprocessing's; its minimum in a cache entry
        #: written before the fill was stored): the views' outside (it was the minimum, about air, also with fill zero)
        self._fills = []
        for f in files:
            v = load_cached(f)
            self.volumes.append((v.name, torch.from_numpy(np.array(v.array, dtype=np.float16)), v.spacing_mm,
                                 body_threshold(v.array, v.modality)))
            self._fills.append(v.fill_value)
        self.sources = [str(p) for p, _ in prepared]  # what it trains on (the skipped ones were listed too)
        if not self.volumes:
            raise InputError(f"none of the {len(paths)} training images found could be read or prepared (the warnings "
                             "above say why each was skipped); check `data`, `modality` and `spacing_mm`")
        log.info("training on %d volumes (%d found)", len(self.volumes), len(paths))
        if any(name == "semantic" for name, _ in parse_objective(cfg.objective)):
            self._load_labels(paths, files)

    def _load_labels(self, paths: list[Path], files: list[Path]) -> None:
        """Label maps of the training volumes (the ``semantic`` objective): found by ``semantic_labels``
        among the training images only (never an excluded one), cached on each volume's grid."""
        import json

        from .labels import cache_labels, find_label_maps, load_labels
        from .semantic import SemanticSampler, SemanticSettings

        cfg = self.cfg
        if not cfg.semantic_labels:
            raise InputError("the semantic objective needs label maps: set semantic_labels in the config")
        maps = {img.resolve(): found for img, found in find_label_maps(paths, cfg.semantic_labels, cfg.exclude,
                                                                        self.base).items()}
        labelled, used = [], []
        for index, f in enumerate(files):
            # the sidecar names the source as the run that cached it saw it (another base folder, perhaps)
            src = Path(json.loads(f.with_suffix(".json").read_text(encoding="utf-8"))["source"]).resolve()
            if src not in maps:
                continue
            label_path, rule = maps[src]
            if self.rank == 0:
                npy = cache_labels(f, label_path, self.prep, cfg.modality, cfg.pixel_spacing_mm)
            if self.world > 1:
                torch.distributed.barrier()
            if self.rank != 0:
                npy = cache_labels(f, label_path, self.prep, cfg.modality, cfg.pixel_spacing_mm)
            if npy is not None:
                volume = load_labels(npy, rule, index, self.volumes[index][2], cfg.seed)
                if not volume.organs:  # (a map in the wrong place, or of other labels, than its rule says)
                    log.warning("label map %s holds none of the organs its rule names on its image's grid: not used",
                                label_path)
                    continue
                labelled.append(volume)
                used.append(str(src))
        self.semantic_settings = SemanticSettings.from_config(cfg)
        self.semantic_sampler = SemanticSampler(labelled)
        self.labelled_sources = sorted(used)  # (the images whose label maps were used, not every one found)
        log.info("semantic objective: %d labelled volumes, %d organs", len(labelled), len(self.semantic_sampler.organ_id))

    def _fill(self, index: int) -> float | None:
        """Volume ``index``'s fill as inference pads it (None: not known, its minimum is used)."""
        fills = getattr(self, "_fills", None)
        return fills[index] if fills and index < len(fills) else None

    # -------------------------------------------------------------- sampling
    def _views(self, rng: np.random.Generator, vol: torch.Tensor, sp: float, threshold: float = BODY_THRESHOLD,
               fill: float | None = None):
        """Two (local, global) views of a volume (see :meth:`_view_at`); ``fill``: its value outside the volume, as
        inference pads it (default: its minimum)."""
        cfg = self.cfg
        arr = vol.float()[None, None]
        d = arr.dim() - 2
        pool = F.avg_pool3d if d == 3 else F.avg_pool2d
        pooled = pool(arr, 4, ceil_mode=True)
        body = random_body_point(vol.numpy(), rng, threshold) * sp
        fill = float(arr.min()) if fill is None else float(fill)
        centres = [body + rng.uniform(-cfg.centre_jitter_mm, cfg.centre_jitter_mm, d)]
        if rng.random() < cfg.overlap_p:
            centres.append(body + rng.uniform(-cfg.centre_jitter_mm, cfg.centre_jitter_mm, d))
        else:
            centres.append(random_body_point(vol.numpy(), rng, threshold) * sp)
        return [self._view_at(rng, arr, pooled, c, sp, fill, threshold) for c in centres]

    def _view_at(self, rng: np.random.Generator, arr: torch.Tensor, pooled: torch.Tensor, c: np.ndarray, sp: float,
                 fill: float, threshold: float):
        """One (local, global) view centred at ``c`` (mm): random scale and rotation, global jitter, augmentation."""
        cfg = self.cfg
        d = arr.dim() - 2
        s = float(rng.uniform(*cfg.scale_range))
        ang = float(rng.uniform(-cfg.rotation_deg, cfg.rotation_deg)) if cfg.rotation_deg else 0.0
        lv = sample_view(arr, c, cfg.local_size, sp * s, sp, fill, ang)
        lv.body_threshold = threshold  # anchors are kept where view A is above it (pair_points)
        gc = c + rng.uniform(-cfg.global_jitter_mm, cfg.global_jitter_mm, d)
        gv = sample_view(pooled, gc, cfg.global_size, 4 * sp * s, 4 * sp, fill, ang, first_voxel_mm=1.5 * sp)
        lv.image = augment(lv.image, rng, cfg.noise_std, cfg.blur_p, tuple(cfg.blur_sigma), cfg.contrast, cfg.gamma)
        gv.image = augment(gv.image, rng, cfg.noise_std, cfg.blur_p * 0.5, tuple(cfg.blur_sigma), cfg.contrast, cfg.gamma)
        return lv, gv

    def _semantic_views(self, rng: np.random.Generator) -> tuple[list, list]:
        """The semantic objective's pairs of patients for one iteration: (draws, views), views as in
        :meth:`_views` (empty without the objective)."""
        sampler = getattr(self, "semantic_sampler", None)
        if sampler is None:
            return [], []
        cfg = self.cfg
        draws, views = [], []
        for _ in range(self.semantic_settings.pairs):
            draw = sampler.draw(rng)
            pair = []
            for index, centre in ((draw.a, draw.centre_a_mm), (draw.b, draw.centre_b_mm)):
                _, vol, sp, threshold = self.volumes[index]
                arr = vol.float()[None, None]
                pool = F.avg_pool3d if arr.dim() == 5 else F.avg_pool2d
                c = centre + rng.uniform(-cfg.centre_jitter_mm, cfg.centre_jitter_mm, arr.dim() - 2)
                fill = self._fill(index)
                pair.append(self._view_at(rng, arr, pool(arr, 4, ceil_mode=True), c, sp,
                                          float(arr.min()) if fill is None else fill, threshold))
            draws.append(draw)
            views.append(pair)
        return draws, views

    # ------------------------------------------------------------------ loss
    def sam_loss(self, views, loc, glob, gen: torch.Generator, rng: np.random.Generator) -> tuple[torch.Tensor, dict]:
        """SAM loss over a batch. ``views[b] = [(localA, globalA), (localB, globalB)]``; maps are stacked
        as [A0, B0, A1, B1, ...]."""
        cfg = self.cfg
        loc_terms, glob_anchor, glob_cands, glob_owner, glob_pos = [], [], [], [], []
        B = len(views)
        for b in range(B):
            pp = pair_points(self, views, loc, glob, b, gen, rng)
            if pp is None:
                continue
            P, a_loc, p_loc, a_glob, p_glob = pp
            (la, ga), (lb, gb) = views[b]
            ma, mb = loc[2 * b], loc[2 * b + 1]
            gma, gmb = glob[2 * b], glob[2 * b + 1]
            # local loss, both directions
            for (_m_src, a_l, a_g, p_l, view_b, m_b, gv_b, gm_b) in (
                (ma, a_loc, a_glob, p_loc, lb, mb, gb, gmb),
                (mb, p_loc, p_glob, a_loc, la, ma, ga, gma),
            ):
                qb = map_positions_mm(view_b, m_b.shape[1:])
                cand_loc = m_b.reshape(m_b.shape[0], -1).T
                cand_glob = sample_at(gm_b, gv_b.mm_to_norm(qb, ()))
                dist = torch.cdist(P, qb)
                loc_terms.append(local_loss(a_l, p_l, a_g, cand_loc, cand_glob, dist, cfg.tau, cfg.local_ignore_mm,
                                            cfg.num_hard, cfg.num_negatives, gen, cfg.pruner_threshold))
            # global candidates from view B: the anchors' positions plus random positions in B's global view
            n_rand = cfg.global_candidates
            lo = gb.start_mm
            hi = gb.start_mm + gb.step_mm * (torch.tensor(gb.image.shape[1:], dtype=torch.float32) - 1)
            R = gb.to_world(lo + (hi - lo) * torch.rand((n_rand, len(lo)), generator=gen))
            Q = torch.cat([P, R])
            glob_anchor.append((a_glob, P, b))
            glob_cands.append(torch.cat([p_glob, sample_at(gmb, gb.mm_to_norm(R, ()))]))
            glob_pos.append(Q)
            glob_owner.append(torch.full((len(Q),), b))
        stats = {}
        if not loc_terms:
            zero = loc.sum() * 0 + glob.sum() * 0
            return zero, {"local": 0.0, "global": 0.0, NOTHING_TO_LEARN: True}
        l_local = torch.stack(loc_terms).mean()
        cands = torch.cat(glob_cands)
        cpos = torch.cat(glob_pos)
        owner = torch.cat(glob_owner)
        g_terms = []
        for a_glob, P, b in glob_anchor:
            same = owner == b
            dist = torch.cdist(P, cpos)
            positive = same[None] & (dist < cfg.global_positive_mm)
            valid = torch.ones_like(positive) if cfg.global_cross_volume else same[None].expand_as(positive)
            g_terms.append(multi_positive_info_nce(a_glob, cands, positive, cfg.tau, valid))
        l_global = torch.stack(g_terms).mean()
        stats["local"], stats["global"] = float(l_local.detach()), float(l_global.detach())
        return l_local + cfg.global_weight * l_global, stats

    # ------------------------------------------------------------------- run
    def run(self, resume: str | None = None) -> Path:
        """Train; return the path of the final checkpoint. torch's thread count, deterministic mode and global random
        state, which the run sets, are as they were afterwards (a notebook goes on as before)."""
        with _torch_settings_kept():
            self._check_before_data()
            # before any data is prepared: a run folder in use is named at once; --resume auto without a last.pt
            # starts anew, and replaced a finished run's model and log without a word (a review)
            if resume is None or (resume == "auto" and not (self.out / "last.pt").is_file()):
                self._refuse_replacing_a_run(resumed=resume is not None)
            with self._run_folder_lock():
                return self._run(resume)

    def _run(self, resume: str | None) -> Path:
        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(int(cfg.threads))
        if self.world > 1 and not torch.distributed.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            torch.distributed.init_process_group(backend)
        torch.manual_seed(cfg.seed)
        torch.use_deterministic_algorithms(True, warn_only=True)
        # the checkpoint a run resumes from, or starts from, is checked before the data are prepared (minutes on
        # real data): a refused resume or a missing init_from was said only after them
        resume = self._resolve_resume(resume)
        ck = self._resume_checkpoint(resume) if resume else None
        if resume and not _same_path(Path(resume).parent, self.out):  # another folder's checkpoint, continued here
            self._refuse_replacing_a_run(resumed_from=resume)
        if not resume:
            for setting in ("init_from", "init_global_from"):
                self._check_weights_source(setting, getattr(cfg, setting))
        if not getattr(self, "volumes", None):
            self.load_data()
        if ck is not None and ck.get("training_files") is not None:
            self._say_changed_data(resume, ck["training_files"])
        net = build_network(cfg.arch, cfg.net_config).to(self.device)
        model: nn.Module = TwoBranch(net)
        if self.world > 1:
            model = nn.parallel.DistributedDataParallel(model)
        if cfg.freeze_global:  # the global branch learns nothing: no gradients, no optimiser state for it
            for name, p in net.named_parameters():
                if name.startswith(GLOBAL_PREFIX):
                    p.requires_grad_(False)
        opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=cfg.lr,
                                weight_decay=cfg.weight_decay)
        start = 0
        rng = np.random.default_rng([cfg.seed, self.rank])
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + self.rank)
        cpu_before = 0.0  # CPU seconds spent by earlier processes of this run (resumed chunks)
        clock_before = 0.0  # seconds of the run's clock (time_clock) spent by them: its time limit and schedule go on
        if resume:
            net.load_state_dict(ck["state_dict"])
            opt.load_state_dict(ck["optimizer"])
            start = int(ck["iteration"])
            saved_by = len(ck["rng_numpy"]) if isinstance(ck["rng_numpy"], list) else 1
            if self._any_process(isinstance(ck["rng_numpy"], list) and self.rank >= saved_by):  # every process stops
                raise InputError(f"{resume}: saved by a run of {saved_by} process(es); resume it with at most that "
                                 f"many (this run has {self.world})")
            rng.bit_generator.state = ck["rng_numpy"][self.rank] if isinstance(ck["rng_numpy"], list) else ck["rng_numpy"]
            gen.set_state(ck["rng_torch"][self.rank] if isinstance(ck["rng_torch"], list) else ck["rng_torch"])
            cpu_before = float(ck.get("cpu_seconds_total", 0.0))
            clock_before = float(ck.get("clock_seconds", 0.0))
            if "adam_bank" in ck:
                self._adam_bank = ck["adam_bank"]
            self._chunks = [Chunk.from_dict(c) for c in ck.get("chunks", [])]
            log.info("resumed from %s at iteration %d (%.2f CPU-hours so far)", resume, start, cpu_before / 3600)
            finished = self._finished_already(resume, ck, start, clock_before)
            if finished is not None:
                return finished
        elif cfg.init_from:
            if cfg.init_global_from:
                self._init_weights(net, cfg.init_from, branch=LOCAL_PREFIX)
                self._init_weights(net, cfg.init_global_from, branch=GLOBAL_PREFIX)
            else:
                self._init_weights(net, cfg.init_from)
        self._cpu_before = cpu_before
        if not resume:
            self._chunks = []
        self._chunk_begun = (started_utc(), this_command(), start, time.time())  # this process's chunk of the run
        self.out.mkdir(parents=True, exist_ok=True)
        log_path = self.out / "train_log.csv"
        # the semantic objective's two parts get columns of their own (at the end: readers of the others are unchanged)
        extra = ["semantic_local", "semantic_global"] if getattr(self, "semantic_sampler", None) else []
        if any(name == "distill" for name, _ in parse_objective(cfg.objective)):
            extra += ["distill_local", "distill_global"]
            extra += ["relational_local", "relational_global"] if cfg.distill_relational_weight else []
        if self.rank == 0 and (not resume or not log_path.exists()):
            log_path.write_text(",".join(["iteration,loss,local,global,lr,seconds,cpu_seconds", *extra]) + "\n",
                                encoding="utf-8")
        elif self.rank == 0:  # rows after the checkpoint (a run killed between checkpoints) are done again: not twice
            _cut_log(log_path, start)
        def sched(it: int) -> float:
            """Warm-up then cosine decay over the iterations (or over the time limit, if it comes first and
            ``schedule_by_time`` is set; that makes the run depend on machine speed)."""
            frac = min(it, cfg.iterations) / cfg.iterations
            if cfg.schedule_by_time and cfg.time_limit_min:
                frac = max(frac, min(1.0, (clock() - t0) / (cfg.time_limit_min * 60)))
            self._progress = frac  # fraction of the run done; curricula (Adam's levels) follow it
            return lr_factor(it, cfg.warmup, frac)

        bar = _bar(cfg.iterations, "train", self.show_progress and self.rank == 0, initial=start)
        # "cpu" budgets process CPU time (all threads), so runs that share a machine get equal compute
        clock = time.process_time if cfg.time_clock == "cpu" else time.time
        t0, wall0 = clock() - clock_before, time.time()
        self._clock_seconds = lambda: clock() - t0
        net.train()
        if cfg.freeze_global:  # its batch norms keep their statistics too
            for name, module in net.named_children():
                if name.startswith(GLOBAL_PREFIX):
                    module.eval()
        done = start
        idle = 0  # iterations without a term to learn from (no step taken)
        stopped_by = None  # why the run ended before its iterations (the time limit)
        # Ctrl-C or SIGTERM (a session's end, a batch system's limit) stops the run between iterations, with a
        # resume checkpoint of the last one: nothing is lost, and --resume auto goes on as if never stopped
        with StopBetweenSteps() as stopping:
            saved = False
            for it in range(start, cfg.iterations):
                for g in opt.param_groups:
                    g["lr"] = cfg.lr * sched(it)
                picks = rng.choice(len(self.volumes), size=min(cfg.batch_volumes, len(self.volumes)), replace=False)
                views = [self._views(rng, *self.volumes[i][1:], fill=self._fill(i)) for i in picks]
                draws, sem_views = self._semantic_views(rng)  # extra views of the semantic objective, same forward pass
                lx = torch.stack([v[0].image for pair in views + sem_views for v in pair]).to(self.device)
                gx = torch.stack([v[1].image for pair in views + sem_views for v in pair]).to(self.device)
                loc, glob = model(lx, gx)
                loc, glob = loc.cpu(), glob.cpu()
                n = 2 * len(views)
                self._iteration = it
                self._semantic_batch = SemanticBatch(draws, sem_views, loc[n:], glob[n:]) if sem_views else None
                loss, stats = self.compute_loss(views, loc[:n], glob[:n], gen, rng)
                if self._any_process(not torch.isfinite(loss)):  # a diverged run's weights are NaN: not a result
                    raise self._diverged(f"the loss is {loss.item()} at iteration {it + 1}", "lower lr, now "
                                         f"{cfg.lr:g}, or check the data")
                # a batch without a single term (no view pair overlapping on the body): no step, and no loss in the
                # log (AdamW's step would still decay the weights and move them by its old momentum)
                learns = self._any_process(not stats.pop(NOTHING_TO_LEARN, False))
                opt.zero_grad(set_to_none=True)
                if learns:
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
                    opt.step()
                else:
                    idle += 1
                    loss = torch.tensor(float("nan"))
                    stats = {k: float("nan") for k in ("local", "global", *extra)}
                    if idle == 1:
                        log.warning("iteration %d drew no view pair that overlaps on the body: no step taken (logged "
                                    "as nan). Check that the training images hold a body (body_threshold)", it + 1)
                # a finite loss can still take a step to non-finite weights (an infinite lr): they are never saved
                if self._any_process(not _all_finite(net)):  # (the batch norms' statistics too: buffers)
                    raise self._diverged(f"the weights are not finite after iteration {it + 1}",
                                         f"lower lr, now {cfg.lr:g}")
                done = it + 1
                if self.rank == 0:
                    with log_path.open("a", encoding="utf-8") as fh:
                        fh.write(f"{done},{loss.item():.5f},{stats.get('local', 0):.5f},{stats.get('global', 0):.5f},"
                                 f"{opt.param_groups[0]['lr']:.6g},{time.time() - wall0:.1f},{cpu_before + time.process_time():.1f}"
                                 + "".join(f",{stats.get(k, 0):.5f}" for k in extra) + "\n")
                    if bar:
                        bar.set_postfix(loss=f"{loss.item():.3f}", loc=f"{stats.get('local', 0):.3f}", glob=f"{stats.get('global', 0):.3f}")
                        bar.update(1)
                saved = done % cfg.checkpoint_every == 0 or done == cfg.iterations
                if saved:  # (every process: each one's random states go into it)
                    self._save_resume(net, opt, done, rng, gen)
                if self.rank == 0 and cfg.snapshot_every and done % cfg.snapshot_every == 0:
                    (self.out / "snapshots").mkdir(parents=True, exist_ok=True)
                    save_checkpoint(self.out / "snapshots" / f"it_{done:06d}.pt", net, self.prep, name=cfg.name,
                                    train_config=cfg.to_dict(), iteration=done,
                                    extra={"cpu_seconds_total": cpu_before + time.process_time(),
                                           "training_sources": [str(f) for f in getattr(self, "sources", [])]},
                                    half=True)
                if done < cfg.iterations and self._stop_requested(stopping):  # Ctrl-C or SIGTERM during the
                    # iteration (in any process of the run): it finished; saved, then every process stops
                    if not saved:
                        self._save_resume(net, opt, done, rng, gen)
                    if self.rank == 0:
                        log.warning("stopped after iteration %d: --resume auto goes on from %s", done, self.out / "last.pt")
                    if bar:
                        bar.close()
                    stopping.stop()
                # every process leaves at the same iteration (their clocks differ: one that left alone would leave
                # the others waiting in the next gradient reduction)
                if cfg.time_limit_min and self._any_process(clock() - t0 > cfg.time_limit_min * 60):
                    log.warning("time limit of %g min (%s clock) reached at iteration %d", cfg.time_limit_min, cfg.time_clock, done)
                    stopped_by = f"its time limit of {cfg.time_limit_min:g} min ({cfg.time_clock} clock)"
                    if not saved:
                        self._save_resume(net, opt, done, rng, gen)
                    break
        if bar:
            bar.close()
        if idle == done - start >= MIN_IDLE_REFUSED:  # not one step: the "model" would be its starting weights
            raise InputError(f"none of the {idle} iterations drew a view pair that overlaps on the body, so no step "
                             f"was taken and no model is written: the views (local_size {cfg.local_size}, "
                             f"global_size {cfg.global_size} voxels) may be too small for the network, or the images "
                             "hold no body")
        if idle and self.rank == 0:
            log.warning("%d of the %d iterations of this run drew no view pair overlapping on the body: no step was "
                        "taken for them", idle, done - start)
        final = self.out / f"{cfg.name}.pt"
        if self.rank == 0:
            net.eval()
            chunks = self._chunks + [self._chunk(done)]
            save_checkpoint(final, net, self.prep, name=cfg.name, train_config=cfg.to_dict(), iteration=done,
                            extra={"training_volumes": [v[0] for v in self.volumes],
                                   "training_sources": [str(f) for f in getattr(self, "sources", [])],
                                   "wall_seconds": time.time() - wall0,
                                   "wall_seconds_total": sum(c.wall_s for c in chunks),
                                   "cpu_seconds": time.process_time(),
                                   "cpu_seconds_total": self._cpu_before + time.process_time(),
                                   "chunks": [c.as_dict() for c in chunks]},
                            half=cfg.half_weights)
            plot_loss_curve(log_path, self.out / "loss_curve.png")
            write_training_record(self.out / f"{cfg.name}.md", final, cfg.to_dict(), chunks,
                                  [str(f) for f in getattr(self, "sources", [])], log_path, cfg.iterations, stopped_by)
        if self.world > 1:
            torch.distributed.barrier()
        return final

    def _finished_already(self, resume: str, ck: dict, start: int, clock_before: float) -> Path | None:
        """Checks of a resumed run against its length: a checkpoint past ``iterations`` is refused; a run that is
        done (all its iterations, or its time limit used up) is not run again, and its final model, when there, is
        returned as it is (a resume rewrote it, with its wall time 0); a changed ``iterations`` is said with the
        learning rate it moves (the cosine schedule spans the iterations). None: go on."""
        cfg = self.cfg
        if start > cfg.iterations:
            raise InputError(f"{resume}: the run is at iteration {start}, past iterations {cfg.iterations}; give "
                             f"--iterations {start} or more to go on")
        final = self.out / f"{cfg.name}.pt"
        used_up = bool(cfg.time_limit_min) and clock_before >= cfg.time_limit_min * 60
        if start == cfg.iterations or used_up:
            why = (f"all its {cfg.iterations} iterations are done" if start == cfg.iterations else
                   f"its time limit of {cfg.time_limit_min:g} min ({cfg.time_clock} clock) is used up, at iteration "
                   f"{start}")
            go_on = "--iterations" if start == cfg.iterations else "--set time_limit_min=..."
            if final.is_file():
                log.warning("%s: the run is finished (%s): nothing to do; %s is left as it is. Give a larger %s to "
                            "go on", resume, why, final, go_on)
                return final
            log.warning("%s: the run is finished (%s); writing its final model, which is missing", resume, why)
        before = int((ck.get("train_config") or {}).get("iterations") or cfg.iterations)
        if before != cfg.iterations and 0 < start < cfg.iterations:
            def lr_at(iterations: int) -> float:
                return cfg.lr * lr_factor(start, cfg.warmup, min(start, iterations) / iterations)

            log.warning("iterations %d -> %d: the learning rate's cosine schedule spans the iterations, so it goes "
                        "from %.3g to %.3g at iteration %d", before, cfg.iterations, lr_at(before), lr_at(cfg.iterations),
                        start + 1)
        return None

    def _say_changed_data(self, resume: str, before: list[str]) -> None:
        """Warn when the training files (by name: a run may resume on another machine, its data elsewhere) differ
        from those of the checkpoint ``resume``: the run goes on with them, and its draws differ from an
        uninterrupted run's (a third volume added went on silently: a review)."""
        now = _file_names(getattr(self, "sources", []))
        added, gone = sorted(set(now) - set(before)), sorted(set(before) - set(now))
        if added or gone:
            log.warning("%s: the training files differ from the checkpoint's (%s): the run goes on with the %d found "
                        "now, and its draws differ from an uninterrupted run's; restore the data, or start a new run "
                        "(init_from: the checkpoint) to keep the two apart", resume,
                        "; ".join(part for part in (
                            f"{len(added)} added, e.g. {added[0]}" if added else "",
                            f"{len(gone)} gone, e.g. {gone[0]}" if gone else "") if part), len(now))

    def _chunk(self, done: int) -> Chunk:
        """This process's chunk of the run, up to iteration ``done`` (the training record's, :mod:`.record`)."""
        began, command, first, wall0 = self._chunk_begun
        return Chunk(began, command, first, done, time.time() - wall0, time.process_time())

    def _stop_requested(self, stopping: StopBetweenSteps) -> bool:
        """Whether the run stops after this iteration: a signal noted in this process, or, with several processes
        (DistributedDataParallel), in any of them (each must leave at the same iteration, or the others would wait in
        the next gradient reduction for ever)."""
        return self._any_process(stopping.requested is not None)

    def _any_process(self, flag: bool) -> bool:
        """``flag`` of this process, or with several processes whether it holds in any of them (a collective: every
        process calls it at the same point)."""
        if self.world > 1:
            t = torch.tensor([int(bool(flag))])
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            return bool(t.item())
        return bool(flag)

    def compute_loss(self, views, loc, glob, gen, rng):
        """The configured objective (``sam`` or a weighted combination, see :mod:`.objectives`)."""
        from .objectives import combined_loss

        return combined_loss(self, views, loc, glob, gen, rng)

    def _save_resume(self, net, opt, done, rng, gen) -> None:
        """Write ``last.pt`` (the first process; every process calls it: with several, each one's random states are
        gathered into it, so that each resumes its own draws)."""
        numpy_states, torch_states = rng.bit_generator.state, gen.get_state()
        if self.world > 1:
            both = [None] * self.world
            torch.distributed.all_gather_object(both, (numpy_states, torch_states))
            numpy_states, torch_states = [b[0] for b in both], [b[1] for b in both]
        if self.rank != 0:
            return
        extra = {"optimizer": opt.state_dict(), "rng_numpy": numpy_states, "rng_torch": torch_states,
                 "cpu_seconds_total": self._cpu_before + time.process_time(), "clock_seconds": self._clock_seconds(),
                 "chunks": [c.as_dict() for c in self._chunks + [self._chunk(done)]],
                 "training_files": _file_names(getattr(self, "sources", []))}
        if getattr(self, "_adam_bank", None) is not None:  # the adam objective's memory: a resume goes on with it
            extra["adam_bank"] = self._adam_bank
        save_checkpoint(self.out / "last.pt", net, self.prep, name=self.cfg.name, train_config=self.cfg.to_dict(),
                        iteration=done, extra=extra)

    #: settings a resumed run may change: how long it runs and how it writes, not what it learns
    RESUMABLE_CHANGES = frozenset({"iterations", "time_limit_min", "checkpoint_every", "snapshot_every", "threads",
                                   "out_dir", "cache_dir", "name", "half_weights"})

    def _resume_checkpoint(self, path: str) -> dict:
        """The resume checkpoint ``path``, checked: readable, a ``last.pt`` (weights, optimiser and random states),
        and of this run's settings (:data:`RESUMABLE_CHANGES` aside). :class:`InputError` names what is wrong."""
        try:
            ck = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a truncated or foreign file: torch's words, the file named
            words = clipped_words(str(e), 300)  # (cut at a word, and said so: it stopped mid-sentence at 200)
            raise InputError(f"{path}: not a readable training checkpoint ({words}); resume from another last.pt, "
                             "or start a new run in another folder") from None
        if not isinstance(ck, dict) or not {"state_dict", "optimizer", "iteration", "rng_torch"} <= set(ck):
            raise InputError(f"{path}: not a resume checkpoint (a run folder's last.pt, with the optimiser's state); "
                             "final or snapshot weights start a new run with init_from instead")
        before = ck.get("train_config") or {}
        now = self.cfg.to_dict()
        changed = sorted(k for k in now if k in before and not _same_setting(before[k], now[k])
                         and k not in self.RESUMABLE_CHANGES)
        if changed:
            what = "; ".join(f"{k}: {before[k]!r} -> {now[k]!r}" for k in changed[:6])
            raise InputError(f"{path}: was trained with other settings ({what}); a resumed run must learn what it "
                             "started with. Start a new run in another folder (init_from: this checkpoint keeps its "
                             "weights), or restore the settings")
        return ck

    def _check_before_data(self) -> None:
        """What can be wrong besides the data, found before the data are prepared (minutes on real data): the
        objective, the network, and the run and cache folders."""
        cfg = self.cfg
        parse_objective(cfg.objective)
        try:
            build_network(cfg.arch, cfg.net_config)
        except InputError:
            raise
        except (TypeError, ValueError, KeyError) as e:
            raise InputError(f"net_config {cfg.net_config} does not fit arch {cfg.arch}: {e}") from None
        for name, folder in (("out_dir", self.out), ("cache_dir", Path(cfg.cache_dir))):
            check_is_folder(name, folder)
        if any(name == "distill" for name, _ in parse_objective(cfg.objective)):
            self.distill_teacher()  # a missing or unfit teacher, said before the data (it failed at iteration 1)

    def _run_folder_lock(self):
        """Hold ``out_dir/.lock`` for the run (the first process of it): a second run started into the same
        folder is refused at once, instead of interleaving its log and checkpoints with this one's."""
        if self.rank != 0:
            return contextlib.nullcontext()
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks here
            return contextlib.nullcontext()

        @contextlib.contextmanager
        def held():
            made = not self.out.exists()
            self.out.mkdir(parents=True, exist_ok=True)
            try:
                with open(self.out / ".lock", "a+b") as fh:
                    try:
                        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        raise InputError(f"{self.out}: another training run is using this folder; wait for it to "
                                         "end, or give another --out") from None
                    _remove_unfinished_writes(self.out)  # (no other run writes here: a killed one's)
                    yield
            finally:
                # a run refused before it wrote anything leaves no folder of its lock alone (a review)
                if made and [p.name for p in self.out.iterdir()] == [".lock"]:
                    with contextlib.suppress(OSError):
                        (self.out / ".lock").unlink()
                        self.out.rmdir()

        return held()

    def _refuse_replacing_a_run(self, resumed: bool = False, resumed_from: str | None = None) -> None:
        """A new run (no ``--resume``, or ``--resume auto`` without a ``last.pt``: ``resumed``), or another folder's
        checkpoint continued here (``resumed_from``), into a folder that holds a run's log or checkpoints would
        replace them: raise :class:`~samembed.errors.InputError` naming what is there, before anything is written.
        A log of its header alone (a run that failed at its first iteration) is no run."""
        held = [p.name for p in (self.out / "train_log.csv", self.out / "last.pt", self.out / f"{self.cfg.name}.pt",
                                 self.out / "snapshots") if p.exists() and not _header_alone(p)]
        if held and resumed_from:  # another run's checkpoint, continued into this folder: its files mixed with these
            raise InputError(f"{self.out}: holds a training run ({', '.join(held)}), and --resume {resumed_from} is "
                             "another folder's checkpoint: continuing it here would mix the two runs' logs and "
                             "checkpoints; give an --out of its own (nothing was changed)")
        if held and resumed:
            raise InputError(f"{self.out}: --resume auto finds no last.pt to continue from, and the folder holds a "
                             f"training run ({', '.join(held)}), which a new run would replace; move those away to "
                             "start anew, or give another --out (nothing was changed)")
        if held:
            raise InputError(f"{self.out}: already holds a training run ({', '.join(held)}); pass --resume to "
                             "continue it, or give another --out (nothing was changed)")

    def _resolve_resume(self, resume: str | None) -> str | None:
        """``"auto"``: the run folder's ``last.pt`` when it exists, else None (a fresh start, or ``init_from``)."""
        if resume != "auto":
            if resume and not Path(resume).is_file():
                raise InputError(f"{resume}: no checkpoint to resume from (use --resume auto to start fresh when "
                                 "the run folder has none)")
            return resume
        last = self.out / "last.pt"
        if last.is_file():
            return str(last)
        log.info("%s has no last.pt: starting a new run%s", self.out,
                 f" from {self.cfg.init_from}" if self.cfg.init_from else "")
        return None

    def _diverged(self, what: str, advice: str) -> InputError:
        """The error of a run that diverged (``what`` happened): what to do, and the checkpoint the run folder
        keeps (saved before it)."""
        last = self.out / "last.pt"
        return InputError(f"{what}: training diverged ({advice}); the run folder keeps its last checkpoint"
                          + (f" ({last}, finite: to go on with other settings, start a new run in another --out with "
                             f"init_from: {last})" if last.exists() else ""))

    @staticmethod
    def _check_weights_source(setting: str, source: str | None) -> None:
        """:class:`InputError` naming ``setting`` when ``source`` (a checkpoint path or registered model name) names
        neither: found before the data are prepared, not after."""
        if not source:
            return
        from ..registry import find_entry

        if find_entry(str(source)) is None and not Path(source).is_file():
            raise InputError(f"{setting}: {source}: no such checkpoint file or registered model (a relative path is "
                             f"relative to the folder the command runs in, {Path.cwd()})")

    def _init_weights(self, net: nn.Module, source: str, branch: str = "") -> None:
        """Load the network weights of a checkpoint path or registered model name: of the same architecture, or,
        for a narrower ``net_config`` of ``sam-lite``, its most used channels (:mod:`.slim`). With ``branch`` (a
        weight-name prefix, :data:`LOCAL_PREFIX` or :data:`GLOBAL_PREFIX`), that branch's weights only."""
        from ..models import load_model

        loaded = load_model(source)
        state = {k: v.float() if v.is_floating_point() else v for k, v in loaded.net.state_dict().items()}
        ours = net.state_dict()
        mine = [k for k in ours if k.startswith(branch)]
        what = f"the {'local' if branch == LOCAL_PREFIX else 'global'} branch's weights" if branch else "the weights"
        if set(mine) <= state.keys() and any(state[k].shape != ours[k].shape for k in mine):
            from .slim import slim_state_dict

            state = slim_state_dict(loaded.net.float(), net)
            log.info("initialised %s from %s, slimmed to this network's widths", what, source)
        else:
            log.info("initialised %s from %s", what, source)
        missing = [k for k in mine if k not in state]
        if missing:
            raise InputError(f"{source}: has no weights {', '.join(missing[:3])} for {what} of this network "
                             f"({self.cfg.arch}, net_config {dict(self.cfg.net_config or {})})")
        unused = [k for k in state if k.startswith(branch) and k not in ours]
        if unused:
            from ..networks.lite import LOCAL_16MM_WEIGHTS

            if getattr(net, "local_levels", None) != 2 or not all(k.startswith(LOCAL_16MM_WEIGHTS) for k in unused):
                raise InputError(f"{source}: its weights {', '.join(unused[:3])} have no place in this network "
                                 f"({self.cfg.arch}, net_config {dict(self.cfg.net_config or {})}); start it from a "
                                 "model of the same architecture")
            log.info("%s: its local 16 mm level is left out (this network's local branch has two levels)", source)
        net.load_state_dict({**ours, **{k: state[k] for k in mine}})

    def distill_teacher(self) -> nn.Module:
        """The distill objective's teacher network (loaded once, frozen; see :mod:`.distill`)."""
        if getattr(self, "_teacher", None) is None:
            from .distill import DistillSettings, load_teacher

            self.distill_settings = DistillSettings.from_config(self.cfg)
            self._teacher = load_teacher(self.distill_settings, build_network(self.cfg.arch, self.cfg.net_config),
                                         self.prep).to(self.device)
        return self._teacher


def _same_setting(before, now) -> bool:
    """Whether a checkpoint's setting ``before`` is ``now``'s, as settings were written before they were checked:
    ``"1e-3"`` (YAML's string) is 0.001, and ``"pt_1*"`` is ``["pt_1*"]``."""
    if before == now:
        return True
    if before is None and now in ([], {}):  # a YAML key left empty, stored as null
        return True
    if isinstance(before, str) and isinstance(now, list):
        return [before] == now
    if isinstance(before, str) and isinstance(now, (int, float)) and not isinstance(now, bool):
        try:
            return float(before) == float(now)
        except ValueError:
            return False
    return False


def lr_factor(it: int, warmup: int, frac: float) -> float:
    """The learning rate's factor at iteration ``it`` (0-based): a linear warm-up over ``warmup`` iterations, then a
    cosine decay over the run, ``frac`` of which is done."""
    return min(1.0, (it + 1) / max(1, warmup)) * 0.5 * (1 + math.cos(math.pi * frac))


#: a run whose every iteration (this many at least) took no step is refused: its model would be its starting weights
#: (one or two such iterations happen by chance with small views)
MIN_IDLE_REFUSED = 3


def _remove_unfinished_writes(out: Path) -> None:
    """Remove the temporary files of checkpoint and log writes (:func:`samembed.io.atomic_path`: ``.NAME.XXXX.tmp.pt``)
    that a killed run left in the run folder ``out`` and its ``snapshots``: never read, each as large as a
    checkpoint (a review found one after a kill -9 during a save). Call it holding the folder's lock."""
    for folder in (out, out / "snapshots"):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            if p.name.startswith(".") and ".tmp" in p.name and p.is_file():
                with contextlib.suppress(OSError):
                    p.unlink()
                    log.info("removed %s, a write that a stopped run did not finish", p)


def _file_names(paths: list[str]) -> list[str]:
    """The sorted file names of ``paths`` (what a resume compares: the folders may move between machines)."""
    return sorted(Path(p).name for p in paths)


def _all_finite(net: nn.Module) -> bool:
    """Whether every floating tensor of ``net``'s state (weights, and buffers such as batch norms' running
    statistics) is finite: what a checkpoint would hold."""
    return all(bool(torch.isfinite(t).all()) for t in net.state_dict().values() if t.is_floating_point())


def _same_path(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether ``a`` and ``b`` name the same file or folder (links followed; a missing one by its absolute path)."""
    return os.path.realpath(a) == os.path.realpath(b)


def _header_alone(path: Path) -> bool:
    """Whether ``path`` is a training log of its header alone (no iteration logged: a run that stopped at its
    first iteration)."""
    if path.name != "train_log.csv" or not path.is_file():
        return False
    with path.open(encoding="utf-8", errors="replace") as fh:
        return sum(1 for line in fh if line.strip()) <= 1


def _cut_log(log_csv: Path, iteration: int) -> None:
    """Keep the log's header and its rows up to ``iteration`` (the resume checkpoint's), atomically."""
    from ..io import write_text_atomic

    lines = log_csv.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = lines[:1] + [ln for ln in lines[1:] if ln.split(",", 1)[0].isdigit() and int(ln.split(",", 1)[0]) <= iteration]
    if len(kept) != len(lines):
        log.info("%s: %d row(s) after iteration %d (not in the checkpoint) are done again", log_csv,
                 len(lines) - len(kept), iteration)
        write_text_atomic(log_csv, "".join(kept))


def _bar(total: int, desc: str, show: bool, initial: int = 0) -> CountProgress | None:
    """A count on stderr: a bar on a terminal, a line every few seconds in a log (:class:`~samembed.progress.CountProgress`)."""
    if not show:
        return None
    return CountProgress(total, desc, initial=initial)


def plot_loss_curve(log_csv: Path, png: Path) -> None:
    """Plot loss (and its local/global parts) against iteration from the CSV log."""
    from ..figures import matplotlib_config_dir

    matplotlib_config_dir()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with log_csv.open(encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        return
    it = np.array([float(r["iteration"]) for r in rows])
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in ("loss", "local", "global"):
        y = np.array([float(r[key]) for r in rows])
        keep = np.isfinite(y)  # iterations without a step are logged as nan
        if not keep.any():
            continue
        y, x = y[keep], it[keep]
        k = max(1, len(y) // 50)
        smooth = np.convolve(y, np.ones(k) / k, mode="valid")
        ax.plot(x[k - 1:], smooth, label=key)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (moving average)")
    if ax.lines:
        ax.legend()
    else:  # (an empty plot, with matplotlib's warning of a legend without lines, said nothing of why)
        ax.text(0.5, 0.5, f"no step in {len(rows)} iteration(s): each logged nan\n(its views met nowhere on the body)",
                transform=ax.transAxes, ha="center", va="center")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    from ..io import atomic_path

    with atomic_path(png) as tmp:  # its suffix is the picture's: matplotlib picks the format from it
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
