"""The model panel: backend, model folder, the backend's settings form, Will it fit?, Load,
Cancel load, Unload. Loading and unloading are admin actions when admins are named."""

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from moechat.webui.handlers import loading as hl
from moechat.webui.handlers.context import Context, may_manage
from moechat.webui.page.common import user_of


@dataclass
class LoadingPart:
    backend: Any
    backend_info: Any
    folder: Any
    force: Any
    plan_btn: Any
    load_btn: Any
    cancel_btn: Any
    unload_btn: Any
    plan_view: Any
    load_status: Any
    names: list[str] = field(default_factory=list)
    groups: dict[str, Any] = field(default_factory=dict)
    form_specs: dict[str, list] = field(default_factory=dict)
    form_comps: dict[str, list[Any]] = field(default_factory=dict)

    @property
    def all_form_comps(self) -> list[Any]:
        return [c for name in self.names for c in self.form_comps[name]]

    def settings_of(self, name: str, values: Sequence[Any]) -> dict[str, Any]:
        """The settings of backend ``name`` from the values of every form's components (in
        ``all_form_comps`` order); a sentence (ValueError) when one cannot be read."""
        from moechat.webui import forms
        if name not in self.form_specs:
            return {}
        start = 0
        for n in self.names:
            if n == name:
                return forms.collect(self.form_specs[n], list(values[start:start + len(self.form_comps[n])]))
            start += len(self.form_comps[n])
        return {}


def folder_choices(ctx: Context) -> list[tuple[str, str]]:
    from moechat.webui.models import find_model_folders
    suffixes = ctx.manager.plugins.model_file_suffixes()
    found = [(m.label, m.path) for m in find_model_folders(ctx.models_dir, file_suffixes=suffixes)]
    return [("Built-in demo model (tiny, random weights)", "")] + found


def default_backend(ctx: Context, options: Any) -> str | None:
    backends = ctx.manager.backends()
    names = sorted(backends)
    return options.backend if options.backend in backends else (
        "transformers" if "transformers" in backends else (names[0] if names else None))


def layout(ctx: Context, options: Any) -> LoadingPart:
    import gradio as gr

    from moechat.webui import forms

    manager = ctx.manager
    backends = manager.backends()
    chosen = default_backend(ctx, options)
    admin_note = f" Only {', '.join(sorted(ctx.admins))} can load, unload or plan models." if ctx.admins else ""
    gr.Markdown("### Model" + (f"\n{admin_note}" if admin_note else ""))
    backend = gr.Dropdown(choices=hl.backend_choices(manager), value=chosen, label="Backend", elem_id="backend")
    backend_info = gr.Markdown(hl.backend_help(manager, chosen), elem_id="backend-info")
    broken = hl.broken_plugins_text(manager)
    gr.Markdown(broken, visible=bool(broken), elem_id="broken-plugins")
    folder = gr.Dropdown(choices=folder_choices(ctx), value=options.model or "", allow_custom_value=True,
                         label="Model folder", elem_id="model-folder",
                         info="Pick a folder (or a model file such as .gguf) found under the models "
                              "directory or the Hugging Face cache, or type its path in one of them.")
    names = sorted(backends)
    groups: dict[str, Any] = {}
    form_specs: dict[str, list[forms.FieldSpec]] = {}
    form_comps: dict[str, list[Any]] = {}
    for name in names:
        specs = forms.fields_of(backends[name].cls.Settings)
        with gr.Group(visible=name == chosen, elem_id=f"settings-{name}") as grp:
            comps = forms.build_components(specs, elem_prefix=f"setting-{name}-")
        groups[name], form_specs[name], form_comps[name] = grp, specs, comps
    force = gr.Checkbox(False, label="Load anyway", elem_id="force-load",
                        info="Load even when the memory plan says it will not fit.")
    with gr.Row():
        plan_btn = gr.Button("Will it fit?", elem_id="check-plan")
        load_btn = gr.Button("Load", variant="primary", elem_id="load")
        cancel_btn = gr.Button("Cancel load", elem_id="cancel-load")
        unload_btn = gr.Button("Unload", elem_id="unload")
    plan_view = gr.Markdown(elem_id="plan-preview")
    load_status = gr.Markdown(elem_id="load-status")
    return LoadingPart(backend, backend_info, folder, force, plan_btn, load_btn, cancel_btn, unload_btn,
                       plan_view, load_status, names, groups, form_specs, form_comps)


def wire(ctx: Context, blocks: Any, part: LoadingPart, model_status: Any) -> None:
    """The panel's events; ``model_status`` is the load line above the chat."""
    import gradio as gr

    from moechat.backends.demo import is_demo
    from moechat.webui import forms

    manager = ctx.manager
    names, all_form_comps = part.names, part.all_form_comps

    # Gradio passes gr.Request only to positional parameters, so functions with *values take it first.
    def on_page_load(request: gr.Request):
        """Load buttons for those who may use them, and the form showing what is loaded now."""
        manage = gr.update(interactive=may_manage(ctx, user_of(request)))
        out = [manage, manage, manage, manage, hl.progress_text(manager)]
        loaded, settings = manager.state.backend, manager.state.settings or {}
        if loaded in part.form_specs and settings:
            model = settings.get("model") or ""
            out += [loaded, "" if is_demo(model) else model]
            for name in names:
                for spec in part.form_specs[name]:
                    out.append(forms.to_component(spec, settings.get(spec.name)) if name == loaded
                               and spec.name in settings else gr.skip())
        else:
            out += [gr.skip(), gr.skip()] + [gr.skip()] * len(all_form_comps)
        return out

    blocks.load(on_page_load, None, [part.load_btn, part.cancel_btn, part.unload_btn, part.plan_btn, model_status,
                                     part.backend, part.folder] + all_form_comps)

    def on_backend(name):
        return [hl.backend_help(manager, name)] + [gr.update(visible=n == name) for n in names]

    part.backend.change(on_backend, part.backend, [part.backend_info] + [part.groups[n] for n in names],
                        show_progress="hidden")

    def on_plan(request: gr.Request, name, folder_value, *values):
        try:
            settings = part.settings_of(name, values)
        except ValueError as exc:
            return str(exc)
        return hl.plan_preview(ctx, user_of(request), name, folder_value, settings)

    def on_load(request: gr.Request, name, folder_value, force_value, *values):
        try:
            settings = part.settings_of(name, values)
        except ValueError as exc:
            yield str(exc), gr.skip()
            return
        for line in hl.load_steps(ctx, user_of(request), name, folder_value, settings, force=bool(force_value)):
            yield line, hl.progress_text(manager)

    def on_cancel(request: gr.Request):
        line = hl.cancel_load(ctx, user_of(request))
        # the load's own stream says how it ended; "Cancelling …" written here could land after it
        return gr.skip() if line == hl.CANCELLING else line

    def on_unload(request: gr.Request):
        return hl.unload(ctx, user_of(request)), hl.progress_text(manager)

    part.plan_btn.click(on_plan, [part.backend, part.folder] + all_form_comps, part.plan_view,
                        show_progress="hidden")
    part.load_btn.click(on_load, [part.backend, part.folder, part.force] + all_form_comps,
                        [part.load_status, model_status], concurrency_limit=None, show_progress="hidden")
    part.cancel_btn.click(on_cancel, None, part.load_status, concurrency_limit=None, show_progress="hidden")
    part.unload_btn.click(on_unload, None, [part.load_status, model_status], concurrency_limit=None,
                          show_progress="hidden")
    part.folder.focus(lambda: gr.update(choices=folder_choices(ctx)), None, part.folder, show_progress="hidden")
