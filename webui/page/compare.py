"""The Compare view: presets saved from the model panel, one prompt (or the open chat) run
through each in turn, progress, the results side by side, Cancel, past runs and export."""

from dataclasses import dataclass
from typing import Any

from moechat.webui import compare as cmp
from moechat.webui.handlers import compare as hcmp
from moechat.webui.handlers.context import Context, may_manage
from moechat.webui.page.common import user_of
from moechat.webui.page.loading import LoadingPart


@dataclass
class ComparePart:
    presets: Any
    preset_name: Any
    save_btn: Any
    delete_btn: Any
    preset_note: Any
    prompt: Any
    use_chat: Any
    max_new_tokens: Any
    temperature: Any
    after: Any
    run_btn: Any
    cancel_btn: Any
    progress: Any
    results: Any
    run_id: Any
    history: Any
    export_md_btn: Any
    export_json_btn: Any
    export_file: Any


def layout(ctx: Context) -> ComparePart:
    import gradio as gr

    with gr.Accordion("Compare backends on one prompt", open=False, elem_id="compare"):
        gr.Markdown("Each preset (a backend, a model folder and its settings) is loaded in turn, gets the "
                    "same prompt, and is unloaded; the results appear side by side. Greedy sampling "
                    "(temperature 0) keeps outputs comparable. Save the model panel's choice as a preset below.")
        with gr.Row():
            presets = gr.Dropdown(choices=hcmp.preset_choices(ctx), multiselect=True, label="Presets to compare",
                                  elem_id="compare-presets", scale=3)
            preset_name = gr.Textbox(label="Preset name", max_lines=1, elem_id="compare-preset-name", scale=1,
                                     placeholder="e.g. moe-offload-24gb")
            with gr.Column(scale=1, min_width=160):
                save_btn = gr.Button("Save the model panel as a preset", size="sm", elem_id="compare-save-preset")
                delete_btn = gr.Button("Delete chosen presets", size="sm", elem_id="compare-delete-preset")
        preset_note = gr.Markdown(elem_id="compare-preset-note")
        with gr.Row():
            prompt = gr.Textbox(label="Prompt", lines=2, scale=4, elem_id="compare-prompt")
            with gr.Column(scale=1, min_width=180):
                use_chat = gr.Checkbox(False, label="Use the open chat instead", elem_id="compare-use-chat")
                max_new_tokens = gr.Number(64, label="Max new tokens", precision=0, minimum=1,
                                           elem_id="compare-max-tokens")
                temperature = gr.Number(0.0, label="Temperature (0: greedy)", minimum=0, elem_id="compare-temperature")
        with gr.Row():
            after = gr.Dropdown(choices=hcmp.after_choices(ctx), value=cmp.AFTER_PREVIOUS, label="Afterwards, load",
                                elem_id="compare-after", scale=2)
            run_btn = gr.Button("Run comparison", variant="primary", elem_id="compare-run", scale=1)
            cancel_btn = gr.Button("Cancel", variant="stop", elem_id="compare-cancel", scale=1)
        progress = gr.Markdown(elem_id="compare-progress")
        results = gr.HTML(elem_id="compare-results")
        run_id = gr.State(None)
        with gr.Row():
            history = gr.Dropdown(choices=[], label="Past comparisons", elem_id="compare-history", scale=3)
            export_md_btn = gr.Button("Export Markdown", size="sm", elem_id="compare-export-md", scale=1)
            export_json_btn = gr.Button("Export JSON", size="sm", elem_id="compare-export-json", scale=1)
        export_file = gr.File(label="Exported comparison", interactive=False, elem_id="compare-export-file")
    return ComparePart(presets, preset_name, save_btn, delete_btn, preset_note, prompt, use_chat, max_new_tokens,
                       temperature, after, run_btn, cancel_btn, progress, results, run_id, history,
                       export_md_btn, export_json_btn, export_file)


def wire(ctx: Context, blocks: Any, part: ComparePart, loading: LoadingPart, chat_id: Any) -> None:
    """The view's events; a preset is saved from ``loading``'s backend, folder and form, and
    "Use the open chat" reads ``chat_id``."""
    import gradio as gr

    hidden = dict(show_progress="hidden")

    def lists(user: str, run_value: Any = None) -> tuple[Any, Any, Any]:
        return (gr.update(choices=hcmp.preset_choices(ctx)), gr.update(choices=hcmp.after_choices(ctx)),
                gr.update(choices=hcmp.run_choices(ctx, user), value=run_value))

    def on_page_load(request: gr.Request):
        """The lists, and the buttons that load models for those who may load (as Load)."""
        manage = gr.update(interactive=may_manage(ctx, user_of(request)))
        return lists(user_of(request)) + (manage,) * 4

    blocks.load(on_page_load, None, [part.presets, part.after, part.history, part.run_btn, part.cancel_btn,
                                     part.save_btn, part.delete_btn])

    def on_save(request: gr.Request, name, backend, folder, *values):
        try:
            settings = loading.settings_of(backend, values)
        except ValueError as exc:
            return (str(exc),) + (gr.skip(),) * 2
        line = hcmp.save_preset(ctx, user_of(request), name, backend, folder, settings)
        return (line,) + lists(user_of(request))[:2]

    part.save_btn.click(on_save, [part.preset_name, loading.backend, loading.folder] + loading.all_form_comps,
                        [part.preset_note, part.presets, part.after], **hidden)

    def on_delete(names, request: gr.Request):
        line = hcmp.delete_preset(ctx, user_of(request), names)
        return (line, gr.update(choices=hcmp.preset_choices(ctx), value=[]),
                gr.update(choices=hcmp.after_choices(ctx)))

    part.delete_btn.click(on_delete, part.presets, [part.preset_note, part.presets, part.after], **hidden)

    def on_run(names, prompt, use_chat, max_tokens, temperature, after, cid, request: gr.Request):
        user = user_of(request)
        last = None
        for line, run in hcmp.run_compare(ctx, user, names, prompt, chat_id=cid, use_chat=bool(use_chat),
                                          max_new_tokens=max_tokens, temperature=temperature, after=after):
            last = run
            yield line, hcmp.results_html(run) if run is not None else gr.skip(), gr.skip(), gr.skip()
        if last is not None and last.id is not None:
            yield gr.skip(), gr.skip(), last.id, lists(user, last.id)[2]

    part.run_btn.click(on_run, [part.presets, part.prompt, part.use_chat, part.max_new_tokens, part.temperature,
                                part.after, chat_id], [part.progress, part.results, part.run_id, part.history],
                       concurrency_limit=None, **hidden)

    def on_cancel(request: gr.Request):
        return hcmp.cancel_compare(ctx, user_of(request))

    part.cancel_btn.click(on_cancel, None, part.progress, concurrency_limit=None, **hidden)

    def on_history(run_value, request: gr.Request):
        try:
            run = hcmp.open_run(ctx, user_of(request), run_value)
        except cmp.CompareError as exc:
            return str(exc), gr.skip(), gr.skip()
        return hcmp.progress_text(run), hcmp.results_html(run), run.id

    part.history.input(on_history, part.history, [part.progress, part.results, part.run_id], **hidden)

    def exporter(fmt):
        def on_export(run_value, request: gr.Request):
            try:
                return hcmp.export_run(ctx, user_of(request), run_value, fmt), gr.skip()
            except cmp.CompareError as exc:
                return None, str(exc)
        return on_export

    part.export_md_btn.click(exporter("md"), part.run_id, [part.export_file, part.progress], **hidden)
    part.export_json_btn.click(exporter("json"), part.run_id, [part.export_file, part.progress], **hidden)
