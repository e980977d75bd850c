"""The page: a side panel of controls, the source and target slice views, the results table. Layout only: every
action calls a method of :class:`~.app.WebApp`."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .app import WebApp

# the heatmap's colour bar: Slicer's Iron table, black -> purple -> red -> yellow -> white
IRON_GRADIENT = "linear-gradient(to right, #000000, #5a0a8c, #c8143c, #f57d0a, #fadc32, #ffffff)"


def _upload_handler(trigger_ok: str, trigger_refuse: str) -> str:
    """A file input's change handler: a file over the size limit is refused before anything is sent.

    (One expression, not an arrow function: Vue would take a leading arrow function for the handler itself.)
    """
    big = "Array.from($event.target.files || []).find(f => f.size > max_upload_bytes)"
    return (f"{big} ? trigger('{trigger_refuse}', [{big}.name, {big}.size]) : "
            f"(($event.target.files || []).length ? trigger('{trigger_ok}', [$event.target.files]) : null)")


def build_ui(app: WebApp):
    from trame.widgets import html
    from trame_vuetify.ui.vuetify3 import SinglePageWithDrawerLayout
    from trame_vuetify.widgets import vuetify3 as v

    server = app.server
    server.trigger("upload_volume")(lambda files: app.upload(files, "volume"))
    server.trigger("upload_landmarks")(lambda files: app.upload(files, "landmarks"))
    server.trigger("refuse_upload")(app.refuse_upload)
    server.trigger("export_matches")(app.export)

    with SinglePageWithDrawerLayout(server, full_height=True) as layout:
        layout.title.set_text("SAMEmbedding web")
        layout.root.theme = "dark"
        with layout.toolbar:
            v.VSpacer()
            with v.VBtnToggle(v_model=("orientation",), mandatory=True, density="compact", id="orientation"):
                for o in ("Axial", "Coronal", "Sagittal"):
                    v.VBtn(o, value=o, id=f"orientation-{o.lower()}")
            v.VSpacer(style="max-width: 16px")
            for preset in app.state.wl_presets:
                v.VBtn(preset, density="compact", variant="outlined", classes="mx-1",
                       id=f"wl-{preset.replace(' ', '-')}", click=(app.window_level, f"['{preset}']"))
            html.Span("{{ window_level ? `W ${window_level[0]} L ${window_level[1]}` : '' }}", classes="text-caption ml-2",
                      id="window-level", raw_attrs=[':data-wl="JSON.stringify(window_level)"'])

        with layout.drawer as drawer:
            drawer.width = 380
            with html.Div(classes="pa-3 d-flex flex-column", style="gap: 8px"):
                html.Div("Volumes", classes="text-subtitle-2")
                with html.Div(classes="d-flex"):
                    v.VTextField(v_model=("path_text",), label="Path on the server (image, DICOM folder, landmarks)",
                                 density="compact", hide_details=True, id="path-text")
                    v.VBtn("Open", click=app.open_path, density="compact", classes="ml-1", id="open-path")
                v.VFileInput(label="Upload images", density="compact", hide_details=True, multiple=True,
                             id="upload-volume", change=_upload_handler("upload_volume", "refuse_upload"))
                v.VFileInput(label="Upload landmarks (.mrk.json, .fcsv, CSV)", density="compact", hide_details=True,
                             id="upload-landmarks", change=_upload_handler("upload_landmarks", "refuse_upload"))
                v.VSelect(label="Source", v_model=("source_id",), items=("volumes",), density="compact",
                          hide_details=True, id="source-select")
                v.VSelect(label="Targets", v_model=("target_ids",), items=("volumes.filter(x => x.value != source_id)",),
                          multiple=True, chips=True, density="compact", hide_details=True, id="targets-select")
                v.VSelect(label="Target shown", v_model=("shown_target_id",),
                          items=("volumes.filter(x => target_ids.includes(x.value))",), density="compact",
                          hide_details=True, id="shown-target-select")
                html.Div("Landmarks", classes="text-subtitle-2 mt-2")
                v.VSwitch(v_model=("placing",), label="Place landmarks (click in the source view)",
                          color="primary", density="compact", hide_details=True, id="place-switch")
                with html.Div(classes="d-flex", style="gap: 4px"):
                    v.VBtn("Propagate all", click=app.propagate, disabled=("busy || !landmarks.length",),
                           density="compact", id="propagate")
                    v.VBtn("Cancel", click=app.cancel, v_show="cancellable", density="compact", color="warning",
                           id="cancel")
                v.VProgressLinear(v_show="busy", model_value=("progress",), height=8, color="primary",
                                  indeterminate=("progress <= 0",), id="progress")
                html.Div("{{ progress_text }}", v_show="busy", classes="text-caption", id="progress-text")
                html.Div("Heatmap", classes="text-subtitle-2 mt-2")
                v.VSwitch(v_model=("show_heatmap",), label="Similarity heatmap over the target",
                          color="primary", density="compact", hide_details=True, id="heatmap-switch")
                v.VSlider(v_model=("heatmap_opacity",), min=0, max=1, step=0.05, label="Opacity",
                          density="compact", hide_details=True, id="heatmap-opacity")
                with html.Div(v_show="show_heatmap && heatmap_range", id="colour-bar"):
                    html.Div(style=f"height: 12px; background: {IRON_GRADIENT}; border-radius: 2px")
                    with html.Div(classes="d-flex justify-space-between text-caption"):
                        html.Span("{{ heatmap_range ? heatmap_range[0].toFixed(2) : '' }}")
                        html.Span("cosine similarity")
                        html.Span("{{ heatmap_range ? heatmap_range[1].toFixed(2) : '' }}")
                html.Div("Model", classes="text-subtitle-2 mt-2")
                with html.Div(classes="d-flex", style="gap: 4px"):
                    v.VSelect(label="Model", v_model=("model",), items=("models",), density="compact",
                              hide_details=True, id="model-select")
                    v.VSelect(label="Device", v_model=("device",), items=("devices",), density="compact",
                              hide_details=True, style="max-width: 110px", id="device-select")
                html.Div("{{ engine }}", classes="text-caption", id="engine")
                html.Div("Export", classes="text-subtitle-2 mt-2")
                with html.Div(classes="d-flex", style="gap: 4px"):
                    v.VSelect(v_model=("export_format",), items=("export_formats",), density="compact",
                              hide_details=True, id="export-format")
                    v.VBtn("Download", density="compact", disabled=("!rows.length",), id="export",
                           click="utils.download(export_name, trigger('export_matches'), 'application/octet-stream')")

        with layout.content:
            with html.Div(classes="d-flex flex-column", style="height: calc(100vh - 64px)"):
                v.VAlert(text=("status",), type=("status_error ? 'error' : 'info'",), density="compact",
                         variant="tonal", classes="ma-1", id="status", style="flex: 0 0 auto", raw_attrs=[':data-error="status_error"'])
                with html.Div(classes="d-flex", style="flex: 1 1 auto; min-height: 300px"):
                    app.layout_manager.initialize_layout_grid(layout)
                with html.Div(classes="d-flex text-caption px-2", style="flex: 0 0 auto"):
                    for key, name in (("source_centre", "Source"), ("target_centre", "Target")):
                        html.Div(f"{{{{ {key} ? `{name} view centre: R ${{{key}[0].toFixed(1)}}, "
                                 f"A ${{{key}[1].toFixed(1)}}, S ${{{key}[2].toFixed(1)}} mm` : '' }}}}",
                                 style="flex: 1 1 0", id=key.replace("_", "-"),
                                 raw_attrs=[f':data-ras="JSON.stringify({key})"'])
                with html.Div(style="flex: 0 0 24vh; overflow-y: auto", classes="px-2"):  # fixed: views keep their size
                    with v.VTable(density="compact", id="results"):
                        with html.Thead(), html.Tr():
                            for name in ("label", "target", "position (RAS mm)", "score", "confident",
                                         "round trip (mm)"):
                                html.Th(name)
                        with html.Tbody():
                            with html.Tr(v_for="(row, i) in rows", key="i", click=(app.select_row, "[i]"),
                                         classes="result-row", style="cursor: pointer",
                                         raw_attrs=[':data-ras="JSON.stringify(row.ras)"',
                                                    ':data-target="row.target"']):
                                html.Td("{{ row.label }}")
                                html.Td("{{ row.target }}")
                                html.Td("{{ row.position }}")
                                html.Td("{{ row.score === null ? '' : row.score.toFixed(3) }}")
                                html.Td("{{ row.confident ? 'yes' : 'no' }}",
                                        style=("{color: row.confident ? '#33d94d' : '#ff7319'}",))
                                html.Td("{{ row.roundtrip === null ? '' : row.roundtrip.toFixed(1) }}")
                    with html.Div(classes="text-caption", id="landmarks"):
                        html.Span("Landmarks: ")
                        html.Span("{{ lm.label }} ", v_for="(lm, j) in landmarks", key="j", classes="landmark",
                                  raw_attrs=[':data-ras="JSON.stringify(lm.ras)"'])
    return layout
