"""The trame application: a trame-slicer scene and two slice views, a :class:`~.session.MatchSession`, the page.

:class:`WebApp` binds the page's state to the session (app logic in :mod:`.session`, layout in :mod:`.ui`,
security in :mod:`.security`). :func:`run` is what ``samembed web`` calls.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from samembed import InputError
from samembed.stopping import stop_on_hang_up

from .security import DataRoot, UploadFolder, limit_websocket_messages, new_token, token_middleware
from .session import EXPORT_FORMATS, WINDOW_LEVEL_PRESETS, MatchSession

log = logging.getLogger(__name__)

LANDMARK_SUFFIXES = (".mrk.json", ".fcsv", ".csv")
POLL_SECONDS = 0.1


@dataclass
class WebOptions:
    """The command line of ``samembed web``."""

    images: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = 8080
    base_path: str = "/"
    data_root: list[str] = field(default_factory=list)
    max_upload_mb: float = 512.0
    model: str = "default"
    device: str = "auto"
    cache_dir: str | None = None
    token: str | None = None
    """The access token every request needs (security.py); generated when None."""
    idle_timeout_s: float = 0.0
    """Stop the server once no page has been connected for this long (0: never)."""


def _registered_models(chosen: str = "default") -> list[str]:
    """The registered models with shipped weights, ``default`` first, and the one chosen on the command line."""
    from samembed.registry import registry

    names = [m["name"] for m in registry().get("models", []) if m.get("name") and m.get("file")]
    names = names if "default" in names else ["default", *names]
    return names if chosen in names else [*names, chosen]


#: vtkSlicerVolumesLogic's loading option "single file": the file alone, never a series of its numbered neighbours
SINGLE_FILE = 4


def single_file_loader(io_manager):
    """``io_manager.load_volumes`` (trame-slicer's), but each file other than DICOM read alone: Slicer's archetype
    reader, without its single-file option, took ``hand_3150.nii.gz`` with ``hand_3151.nii.gz`` beside it for a
    series, so a one-slice radiograph loaded as two slices stacked, or not at all (a review). DICOM series go to
    trame-slicer's own reader."""
    from slicer import vtkSlicerVolumesLogic
    from trame_slicer.core.volumes_reader import VolumesReader
    from vtkmodules.vtkCommonCore import vtkStringArray

    def load(paths):
        paths = [str(p) for p in (paths if isinstance(paths, (list, tuple)) else [paths])]
        if VolumesReader.contains_dcm_volume(paths):
            return io_manager.load_volumes(paths)
        nodes = []
        for path in paths:
            logic = vtkSlicerVolumesLogic()
            logic.SetMRMLApplicationLogic(io_manager.app_logic)
            logic.SetMRMLScene(io_manager.scene)
            nodes.append(logic.AddArchetypeVolume(path, Path(path).name, SINGLE_FILE, vtkStringArray()))
        return [n for n in nodes if n is not None]

    return load


class WebApp:
    """The page and its server."""

    def __init__(self, options: WebOptions, server=None) -> None:
        from trame.app import get_server
        from trame_slicer.core import LayoutManager, SlicerApp
        from trame_slicer.rca_view import register_rca_factories
        from trame_slicer.views import Layout, LayoutDirection, ViewLayoutDefinition, ViewProps, ViewType

        self.options = options
        if not options.token:
            options.token = new_token()
        roots = options.data_root or sorted({str(Path(p).resolve().parent) for p in options.images})
        self.data_root = DataRoot(roots)
        self.uploads = UploadFolder(int(options.max_upload_mb * 1e6))
        self.server = server or get_server(client_type="vue3")
        self.state, self.ctrl = self.server.state, self.server.controller

        self.slicer = SlicerApp()
        register_rca_factories(self.slicer.view_manager, self.server, slice_view_ui_f=lambda *_: None)
        self.layout_manager = LayoutManager(self.slicer.scene, self.slicer.view_manager, self.server)

        def slice_view(tag: str, color: str, group: int):
            return ViewLayoutDefinition(tag, ViewType.SLICE_VIEW,
                                        ViewProps(label=tag, orientation="Axial", color=color, group=group))

        self.layout_manager.register_layout("SAM", Layout(LayoutDirection.Horizontal, [
            slice_view("Source", "#3A7BD5", 0), slice_view("Target", "#2E9D5B", 1)]))
        self.layout_manager.set_layout("SAM")
        views = {v.get_singleton_tag(): v for v in self.slicer.view_manager.get_slice_views()}
        markups = self.slicer.markups_logic
        self.session = MatchSession(
            self.slicer.scene, single_file_loader(self.slicer.io_manager),
            place=lambda node: markups.place_node(node, persistent=True), stop_placing=markups.disable_place_mode,
            source_view=views["Source"], target_view=views["Target"], cache_dir=options.cache_dir)
        self.session.parameters.model, self.session.parameters.device = options.model, options.device

        self._init_state()
        from .ui import build_ui

        self.ui = build_ui(self)
        self.ctrl.on_server_ready.add(self._on_ready)
        self.ctrl.on_server_bind.add(self._on_bind)
        for image in options.images:
            self._guard(lambda image=image: self.session.load_volume(self.data_root.resolve(image)))
        self.push()

    # -- state -------------------------------------------------------------------------------
    def _init_state(self) -> None:
        s = self.state
        s.update({
            "volumes": [], "source_id": None, "target_ids": [], "shown_target_id": None, "path_text": "",
            "orientation": "Axial", "wl_presets": list(WINDOW_LEVEL_PRESETS), "placing": False,
            "show_heatmap": False, "heatmap_opacity": 0.5, "heatmap_range": None,
            "rows": [], "landmarks": [], "status": "Load a source and a target volume, then place landmarks.",
            "status_error": False, "busy": False, "cancellable": False, "progress": 0, "progress_text": "",
            "models": _registered_models(self.options.model), "model": self.options.model,
            "devices": ["auto", "cpu", "cuda"], "device": self.options.device, "engine": "",
            "source_centre": None, "target_centre": None, "window_level": None,
            "export_formats": list(EXPORT_FORMATS), "export_format": ".mrk.json",
            "export_name": "SAM matches.mrk.json", "max_upload_bytes": self.uploads.max_bytes,
        })
        s.change("source_id")(self._on_source)
        s.change("target_ids")(self._on_targets)
        s.change("shown_target_id")(self._on_shown_target)
        s.change("orientation")(lambda orientation, **_: self._guard(lambda: self.session.set_orientation(orientation)))
        s.change("show_heatmap")(lambda show_heatmap, **_: self._guard(lambda: self.session.set_heatmap(show_heatmap)))
        s.change("heatmap_opacity")(lambda heatmap_opacity, **_: self._guard(
            lambda: self.session.set_heatmap_opacity(heatmap_opacity)))
        s.change("model", "device")(lambda model, device, **_: self._guard(lambda: self._set_model(model, device)))
        s.change("placing")(lambda placing, **_: self._guard(lambda: self.session.set_placing(placing)))
        s.change("export_format")(lambda **_: self._update_export_name())

    def _set_model(self, model: str, device: str) -> None:
        """The page's model and device, among those it offers: a page could name any path, and the server read it
        as a checkpoint, outside the data folders (a review); a refused choice is put back."""
        offered = _registered_models(self.options.model)
        if str(model) not in offered or str(device) not in ("auto", "cpu", "cuda"):
            self.state.model, self.state.device = self.session.parameters.model, self.session.parameters.device
            raise InputError(f"model {model!r} on {device!r}: not one this server offers ({', '.join(offered)})")
        self.session.set_model(model, device)

    def _node(self, node_id):
        return self.slicer.scene.GetNodeByID(node_id) if node_id else None

    def _on_source(self, source_id, **_):
        node = self._node(source_id)
        if node is not None and node is not self.session.parameters.sourceVolume:
            self._guard(lambda: self.session.set_source(node))

    def _on_targets(self, target_ids, **_):
        nodes = [self._node(i) for i in target_ids or []]
        if [n.GetID() for n in self.session.parameters.targetVolumes] != [n.GetID() for n in nodes if n]:
            self._guard(lambda: self.session.set_targets(nodes))

    def _on_shown_target(self, shown_target_id, **_):
        node = self._node(shown_target_id)
        if node is not None and node is not self.session.shown_target:
            self._guard(lambda: self.session.show_target(node))

    def _update_export_name(self) -> None:
        fmt = self.state.export_format
        several = len(self.session.logic.outputPointLists(self.session.points)) > 1 and fmt != ".csv"
        self.state.export_name = "SAM matches.zip" if several else f"SAM matches{fmt}"

    def push(self) -> None:
        """Copy what the session shows into the page's state."""
        sess, p = self.session, self.session.parameters
        with self.state:
            self.state.volumes = [{"title": n.GetName(), "value": n.GetID()} for n in sess.volumes()]
            self.state.source_id = p.sourceVolume.GetID() if p.sourceVolume else None
            self.state.target_ids = [n.GetID() for n in p.targetVolumes]
            self.state.shown_target_id = sess.shown_target.GetID() if sess.shown_target else None
            self.state.rows = sess.rows()
            self.state.landmarks = sess.landmarks()
            self.state.status = sess.status or self.state.status
            self.state.status_error = sess.status_is_error
            self.state.busy, self.state.cancellable = sess.busy, sess.cancellable
            done, total, phase = sess.progress or (0, 0, "")
            self.state.progress = 100.0 * done / total if total else 0
            self.state.progress_text = phase
            self.state.heatmap_range = sess.heatmap_range()
            self.state.placing = sess.placing
            self.state.model, self.state.device = p.model, p.device  # a refused choice goes back
            self.state.engine = sess.engine()
            self.state.update(sess.view_state())
            self._update_export_name()

    def _guard(self, action):
        """Run a page action; bad input becomes a message in the page, the server keeps running."""
        try:
            return action()
        except InputError as e:
            self.session._status(str(e), True)
        except Exception as e:  # noqa: BLE001 - any failure is shown, never crashes the server
            log.exception("SAMEmbedding web: action failed")
            self.session._status(f"Error: {type(e).__name__}: {e}", True)
        finally:
            self.push()
        return None

    # -- actions (bound in ui.py) --------------------------------------------------------------
    def open_path(self) -> None:
        def action():
            path = self.data_root.resolve(self.state.path_text)
            self._load(path, path.name, landmarks=path.name.lower().endswith(LANDMARK_SUFFIXES))

        self._guard(action)

    def upload(self, files, kind: str = "volume") -> None:
        from trame.app.file_upload import ClientFile

        def action():
            for raw in files or []:
                f = ClientFile(raw)
                self.uploads.check_size(f.name, int(raw.get("size") or 0))
                path = self.uploads.save(f.name, f.content)
                try:
                    self._load(path, f.name, landmarks=kind == "landmarks")
                except BaseException:  # refused (not an image, the wrong dimension ...): its copy goes now
                    self.uploads.discard(path)
                    raise

        self._guard(action)

    def _load(self, path, name: str, landmarks: bool) -> None:
        """Load a landmark file onto the source or a volume; the status line says what was loaded (or, for a
        volume, why it cannot be matched: the session's message is kept)."""
        if landmarks:
            n = self.session.load_landmarks(path)
            self.session._status(f"Loaded {n} landmark(s) from {name}")
        else:
            self.session.load_volume(path, name)

    def refuse_upload(self, name: str, size: int) -> None:
        """The page found a file over the limit before sending it: say so."""
        self._guard(lambda: self.uploads.check_size(str(name), int(size)))

    def window_level(self, preset: str) -> None:
        self._guard(lambda: self.session.apply_window_level(preset))

    def propagate(self) -> None:
        self._guard(self.session.propagate_all)

    def cancel(self) -> None:
        self._guard(self.session.cancel)

    def select_row(self, index: int) -> None:
        self._guard(lambda: self.session.select_row(int(index)))

    def export(self):
        exported = self._guard(lambda: self.session.export(self.state.export_format))
        return self.server.protocol.addAttachment(exported[1]) if exported else None

    # -- server ------------------------------------------------------------------------------
    async def _poll_forever(self) -> None:
        while True:
            try:
                self.session.poll()
                if (self.session.take_changes() or self.state.busy != self.session.busy
                        or self.state.cancellable != self.session.cancellable):
                    self.push()
                else:  # the views moved (scrolled, panned, window/level dragged): only their numbers
                    view = self.session.view_state()
                    changed = {k: v for k, v in view.items() if self.state[k] != v}
                    if changed:
                        with self.state:
                            self.state.update(changed)
            except Exception:  # noqa: BLE001 - the loop must survive a failing callback
                log.exception("SAMEmbedding web: polling failed")
            await asyncio.sleep(POLL_SECONDS)

    def _on_bind(self, wslink_server) -> None:
        wslink_server.app.middlewares.append(token_middleware(  # loopback too (security.py)
            self.options.token, check_origin=not base_prefix(self.options.base_path)))
        serve_under_base_path(wslink_server.app, wslink_server.config, self.options.base_path)

    def _on_ready(self, **_) -> None:
        asyncio.get_event_loop().create_task(self._poll_forever())
        print(f"SAMEmbedding web: {self.url()}", flush=True)

    def url(self) -> str:
        host = self.options.host
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else (f"[{host}]" if ":" in host else host)
        base = base_prefix(self.options.base_path) + "/"
        return f"http://{shown}:{self.server.port}{base}?token={self.options.token}"

    def start(self) -> None:
        # wslink stops a server 300 s after its last page closed (or after its start, with none), which lost every
        # landmark and match without a word (a review): only when --idle-timeout asks, and then it says so
        self.server.start(host=self.options.host, port=self.options.port, open_browser=False,
                          show_connection_info=False, exec_mode="main", timeout=int(self.options.idle_timeout_s))
        if self.options.idle_timeout_s:
            print(f"SAMEmbedding web: stopped, no page connected for {self.options.idle_timeout_s:g} s "
                  "(--idle-timeout)", flush=True)

    def close(self) -> None:
        self.session.close()
        self.uploads.cleanup()


def base_prefix(base_path: str) -> str:
    """``"/sam/"`` -> ``"/sam"``; ``"/"`` or ``""`` -> ``""``."""
    parts = [p for p in str(base_path or "").split("/") if p]
    return "/" + "/".join(parts) if parts else ""


def serve_under_base_path(aio_app, config: dict, base_path: str) -> None:
    """Serve the page, its files and its websocket under ``base_path`` as well as at the root.

    Behind a reverse proxy that passes ``/sam/...`` on unchanged, the server itself must answer ``/sam/``,
    ``/sam/index.html``, ``/sam/assets/...`` and the websocket ``/sam/ws``; behind one that strips the prefix, the
    root routes answer. The page needs nothing else: trame's page loads its files by relative URLs and opens its
    websocket at ``<the page's folder>/ws``.

    Args:
        aio_app: wslink's ``aiohttp.web.Application`` (before it starts: its static routes are added at start).
        config: wslink's server configuration (``"ws"``: websocket routes, ``"static"``: URL -> folder).
        base_path: e.g. ``"/sam/"``; ``"/"`` adds nothing.
    """
    from aiohttp import web

    prefix = base_prefix(base_path)
    if not prefix:
        return
    ws_paths = {"/" + str(route).strip("/") for route in config.get("ws", {})}
    routes = []
    for route in list(aio_app.router.routes()):
        path = route.resource.canonical if route.resource is not None else None
        if route.method == "GET" and path in ws_paths:
            routes.append(web.get(prefix + path, route.handler))

    async def to_index(request):
        query = f"?{request.query_string}" if request.query_string else ""
        raise web.HTTPFound(f"{prefix}/index.html{query}")

    routes += [web.get(prefix, to_index), web.get(prefix + "/", to_index)]
    for route, folder in sorted(config.get("static", {}).items(), reverse=True):  # longer URLs first
        sub = "/" + str(route).strip("/")
        routes.append(web.static(prefix + ("" if sub == "/" else sub), folder, append_version=True))
    aio_app.add_routes(routes)


def run(options: WebOptions) -> int:
    """Start the server (blocks until it stops); prints the URL, with its access token (:class:`WebApp` makes one
    when ``options`` has none)."""
    # one websocket message carries one uploaded file: allow the upload limit, and nothing much larger
    largest = int(options.max_upload_mb * 1e6 * 1.4) + (1 << 20)
    os.environ.setdefault("TRAME_WS_MAX_MSG_SIZE", str(largest))
    limit_websocket_messages(largest)  # refused before its memory is set aside, not after it arrived
    for name in ("trame", "trame_client", "trame_server", "wslink", "aiohttp"):
        logging.getLogger(name).setLevel(logging.WARNING)
    sys.argv = sys.argv[:1]  # trame parses the command line too; ours is parsed already
    app = WebApp(options)
    # SIGHUP as Ctrl-C: the uploads' folder (an uploaded patient file) goes with the clean-up (a review)
    with stop_on_hang_up():
        try:
            app.start()
        finally:
            app.close()
    return 0

