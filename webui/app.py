"""The web page: layout and event wiring only. What the buttons do lives in moechat.webui.handlers
(plain functions over the BackendManager and the ChatStore); the settings forms come from
webui.forms; the model-folder list from moechat.webui.models.

No ``from __future__ import annotations`` here: Gradio reads the handlers' annotations
(``gr.Request``, ``gr.SelectData``) at wiring time, and ``gr`` is imported inside build_ui."""

import time
from typing import Any

from moechat.backends.manager import BackendManager
from moechat.webui import handlers as h
from moechat.webui.chats import ChatError

STATS_EVERY_S = 1.0     # while a reply streams, the stats panel is redrawn at most this often
TICK_S = 2.0            # otherwise the status and stats refresh this often


def user_of(request: Any) -> str:
    return (getattr(request, "username", None) or "") if request is not None else ""


def session_of(request: Any) -> str:
    return getattr(request, "session_hash", None) or "anonymous"


def build_ui(manager: BackendManager, options, ctx: h.Context | None = None):
    import gradio as gr
    import pandas as pd

    from moechat.backends.api import SamplingParams
    from moechat.backends.demo import is_demo
    from moechat.webui import forms
    from moechat.webui.models import find_model_folders

    ctx = ctx or h.Context.from_options(manager, options)
    backends = manager.backends()
    names = sorted(backends)
    default_backend = options.backend if options.backend in backends else (
        "transformers" if "transformers" in backends else (names[0] if names else None))
    sampling_specs = forms.fields_of(SamplingParams, skip=("stop",))
    admin_note = f" Only {', '.join(sorted(ctx.admins))} can load or unload models." if ctx.admins else ""

    def folder_choices() -> list[tuple[str, str]]:
        found = [(m.label, m.path) for m in find_model_folders(ctx.models_dir)]
        return [("Built-in demo model (tiny, random weights)", "")] + found

    def speed_frame() -> Any:
        rows = h.speed_history(ctx)
        frame = pd.DataFrame(rows or [], columns=["reply", "tok/s", "backend"])
        return frame.astype({"reply": str, "tok/s": float, "backend": str})

    with gr.Blocks(title="moechat") as blocks:
        chat_id = gr.State(None)
        with gr.Row(equal_height=False):
            # ---- history ----------------------------------------------------------------
            with gr.Column(scale=1, min_width=230):
                gr.Markdown("### Chats")
                new_btn = gr.Button("New chat", elem_id="new-chat", variant="secondary")
                search = gr.Textbox(label="Search chats", placeholder="text in a title or message",
                                    elem_id="search", max_lines=1)
                chat_list = gr.Radio(label="Past chats", choices=[], elem_id="chat-list")
                with gr.Accordion("This chat", open=False, elem_id="chat-tools"):
                    rename_box = gr.Textbox(label="New name", max_lines=1, elem_id="rename-box")
                    rename_btn = gr.Button("Rename", size="sm", elem_id="rename")
                    delete_chat_btn = gr.Button("Delete chat", size="sm", variant="stop", elem_id="delete-chat")
                    with gr.Row():
                        export_md_btn = gr.Button("Export Markdown", size="sm", elem_id="export-md")
                        export_json_btn = gr.Button("Export JSON", size="sm", elem_id="export-json")
                    export_file = gr.File(label="Exported file", interactive=False, elem_id="export-file")
                    import_btn = gr.UploadButton("Import JSON", file_types=[".json"], size="sm", elem_id="import")
                history_note = gr.Markdown(elem_id="history-note")

            # ---- the chat ---------------------------------------------------------------
            with gr.Column(scale=3, min_width=420):
                model_status = gr.Markdown(h.progress_text(manager), elem_id="model-status")
                chatbot = gr.Chatbot(elem_id="chatbot", height=460, editable="user",
                                     placeholder="Load a model, then type a message below.",
                                     buttons=["copy"], feedback_options=None)
                notice = gr.Markdown(elem_id="notice")
                with gr.Row():
                    msg = gr.Textbox(show_label=False, placeholder="Type a message and press Enter",
                                     lines=2, max_lines=10, scale=5, elem_id="message", submit_btn=False)
                    with gr.Column(scale=1, min_width=90):
                        send_btn = gr.Button("Send", variant="primary", elem_id="send")
                        stop_btn = gr.Button("Stop", variant="stop", elem_id="stop")
                with gr.Row():
                    regen_btn = gr.Button("Regenerate", size="sm", elem_id="regenerate")
                    continue_btn = gr.Button("Continue", size="sm", elem_id="continue")
                with gr.Accordion("Edit or delete a message (click it in the chat)", open=False, elem_id="edit-tools"):
                    with gr.Row():
                        sel_index = gr.Number(label="Message number", precision=0, minimum=1, elem_id="message-number")
                        edit_box = gr.Textbox(label="Message text", lines=2, scale=4, elem_id="edit-box")
                    with gr.Row():
                        save_edit_btn = gr.Button("Save and regenerate from here", size="sm", elem_id="save-edit")
                        delete_msg_btn = gr.Button("Delete message", size="sm", elem_id="delete-message")
                with gr.Accordion("System prompt and sampling", open=False, elem_id="sampling"):
                    system_prompt = gr.Textbox(label="System prompt", lines=2, elem_id="system-prompt")
                    sampling_comps = forms.build_components(sampling_specs, elem_prefix="sampling-")

            # ---- backend and stats --------------------------------------------------------
            with gr.Column(scale=2, min_width=300):
                gr.Markdown("### Model" + (f"\n{admin_note}" if admin_note else ""))
                backend = gr.Dropdown(choices=h.backend_choices(manager), value=default_backend,
                                      label="Backend", elem_id="backend")
                backend_info = gr.Markdown(h.backend_help(manager, default_backend), elem_id="backend-info")
                broken = h.broken_plugins_text(manager)
                gr.Markdown(broken, visible=bool(broken), elem_id="broken-plugins")
                folder = gr.Dropdown(choices=folder_choices(), value=options.model or "", allow_custom_value=True,
                                     label="Model folder", elem_id="model-folder",
                                     info="Pick a folder found under the models directory or the Hugging Face "
                                          "cache, or type the path of a model folder.")
                groups: dict[str, Any] = {}
                form_specs: dict[str, list[forms.FieldSpec]] = {}
                form_comps: dict[str, list[Any]] = {}
                for name in names:
                    specs = forms.fields_of(backends[name].cls.Settings)
                    with gr.Group(visible=name == default_backend, elem_id=f"settings-{name}") as grp:
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
                gr.Markdown("### Live stats")
                stats = gr.Markdown(h.stats_markdown(ctx), elem_id="stats")
                speed_plot = gr.BarPlot(speed_frame(), x="reply", y="tok/s", title="tok/s of the last replies",
                                        height=200, elem_id="speed-plot", x_title="reply", y_title="tok/s",
                                        sort="x", y_lim=[0, None])
        timer = gr.Timer(TICK_S)

        all_form_comps = [c for name in names for c in form_comps[name]]

        # Gradio passes gr.Request / gr.EditData only to positional parameters, so handlers with
        # *values take them first.

        # ---- page load and refresh ------------------------------------------------------------
        def on_page_load(request: gr.Request):
            """The person's chats, and the form showing what is loaded now (if anything)."""
            user = user_of(request)
            allowed = h.may_manage(ctx, user)
            manage = gr.update(interactive=allowed)
            out = [gr.update(choices=h.chat_choices(ctx, user), value=None), manage, manage, manage,
                   f"Signed in as **{user}**." if user else "", h.progress_text(manager)]
            loaded, settings = manager.state.backend, manager.state.settings or {}
            if loaded in form_specs and settings:
                model = settings.get("model") or ""
                out += [loaded, "" if is_demo(model) else model]
                for name in names:
                    for spec in form_specs[name]:
                        out.append(forms.to_component(spec, settings.get(spec.name)) if name == loaded
                                   and spec.name in settings else gr.skip())
            else:
                out += [gr.skip(), gr.skip()] + [gr.skip()] * len(all_form_comps)
            return out

        blocks.load(on_page_load, None, [chat_list, load_btn, cancel_btn, unload_btn, history_note, model_status,
                                         backend, folder] + all_form_comps)

        def on_tick():
            return h.progress_text(manager), h.stats_markdown(ctx), speed_frame()

        timer.tick(on_tick, None, [model_status, stats, speed_plot], concurrency_limit=None,
                   show_progress="hidden")

        # ---- backend panel ---------------------------------------------------------------------
        def on_backend(name):
            return [h.backend_help(manager, name)] + [gr.update(visible=n == name) for n in names]

        backend.change(on_backend, backend, [backend_info] + [groups[n] for n in names], show_progress="hidden")

        def on_load(request: gr.Request, name, folder_value, force_value, *values):
            user = user_of(request)
            try:
                settings = forms.collect(form_specs[name], list(values_of(name, values))) if name in form_specs else {}
            except ValueError as exc:
                yield str(exc), gr.skip()
                return
            for line in h.load_steps(ctx, user, name, folder_value, settings, force=bool(force_value)):
                yield line, h.progress_text(manager)

        def values_of(name, values):
            start = 0
            for n in names:
                if n == name:
                    return values[start:start + len(form_comps[n])]
                start += len(form_comps[n])
            return ()

        def on_plan(name, folder_value, *values):
            try:
                settings = forms.collect(form_specs[name], list(values_of(name, values))) if name in form_specs else {}
            except ValueError as exc:
                return str(exc)
            return h.plan_preview(ctx, name, folder_value, settings)

        plan_btn.click(on_plan, [backend, folder] + all_form_comps, plan_view, show_progress="hidden")
        load_btn.click(on_load, [backend, folder, force] + all_form_comps, [load_status, model_status],
                       concurrency_limit=None, show_progress="hidden")

        def on_cancel(request: gr.Request):
            return h.cancel_load(ctx, user_of(request))

        def on_unload(request: gr.Request):
            line = h.unload(ctx, user_of(request))
            return line, h.progress_text(manager)

        cancel_btn.click(on_cancel, None, load_status, concurrency_limit=None, show_progress="hidden")
        unload_btn.click(on_unload, None, [load_status, model_status], concurrency_limit=None,
                         show_progress="hidden")
        folder.focus(lambda: gr.update(choices=folder_choices()), None, folder, show_progress="hidden")

        # ---- the chat ----------------------------------------------------------------------------
        turn_outputs = [chat_id, chatbot, notice, stats, msg, chat_list]

        def stream(action, cid, text, index, sys_prompt, values, request):
            user, session = user_of(request), session_of(request)
            sampling = forms.collect(sampling_specs, list(values))
            drawn = 0.0
            first = True
            for view in h.run_turn(ctx, user, session, cid, action, text=text, index=index,
                                   sampling=sampling, system_prompt=sys_prompt or ""):
                now = time.monotonic()
                stats_out = gr.skip()
                if now - drawn >= STATS_EVERY_S or view.live.get("completion_tokens") is not None:
                    stats_out, drawn = h.stats_markdown(ctx, view.live), now
                msg_out = gr.skip()
                if first:
                    msg_out = "" if (view.accepted and action == "send") else gr.skip()
                list_out = gr.skip()
                if view.new_chat:
                    list_out = gr.update(choices=h.chat_choices(ctx, user), value=view.chat_id)
                first = False
                yield view.chat_id, view.messages, view.notice, stats_out, msg_out, list_out
            yield gr.skip(), gr.skip(), gr.skip(), h.stats_markdown(ctx), gr.skip(), gr.skip()

        def on_send(request: gr.Request, cid, text, sys_prompt, *values):
            yield from stream("send", cid, text or "", None, sys_prompt, values, request)

        def on_regenerate(request: gr.Request, cid, sys_prompt, *values):
            yield from stream("regenerate", cid, "", None, sys_prompt, values, request)

        def on_continue(request: gr.Request, cid, sys_prompt, *values):
            yield from stream("continue", cid, "", None, sys_prompt, values, request)

        def on_save_edit(request: gr.Request, cid, number, text, sys_prompt, *values):
            index = int(number) - 1 if number else None
            yield from stream("edit", cid, text or "", index, sys_prompt, values, request)

        def on_native_edit(evt: gr.EditData, request: gr.Request, cid, sys_prompt, *values):
            index = evt.index if isinstance(evt.index, int) else evt.index[0]
            text = evt.value if isinstance(evt.value, str) else str(evt.value)
            yield from stream("edit", cid, text, index, sys_prompt, values, request)

        chat_kw = dict(concurrency_limit=None, show_progress="hidden")
        send_btn.click(on_send, [chat_id, msg, system_prompt] + sampling_comps, turn_outputs, **chat_kw)
        msg.submit(on_send, [chat_id, msg, system_prompt] + sampling_comps, turn_outputs, **chat_kw)
        regen_btn.click(on_regenerate, [chat_id, system_prompt] + sampling_comps, turn_outputs, **chat_kw)
        continue_btn.click(on_continue, [chat_id, system_prompt] + sampling_comps, turn_outputs, **chat_kw)
        save_edit_btn.click(on_save_edit, [chat_id, sel_index, edit_box, system_prompt] + sampling_comps,
                            turn_outputs, **chat_kw)
        chatbot.retry(on_regenerate, [chat_id, system_prompt] + sampling_comps, turn_outputs, **chat_kw)
        chatbot.edit(on_native_edit, [chat_id, system_prompt] + sampling_comps, turn_outputs, **chat_kw)

        def on_stop(request: gr.Request):
            line = h.stop(ctx, session_of(request))
            # the reply's own stream says how it ended; writing "Stopping …" here could land after it
            return line if line == h.NOTHING_TO_STOP else gr.skip()

        stop_btn.click(on_stop, None, notice, concurrency_limit=None, show_progress="hidden")

        def on_select(cid, evt: gr.SelectData, request: gr.Request):
            if cid is None:
                return gr.skip(), gr.skip()
            index = evt.index if isinstance(evt.index, int) else evt.index[0]
            try:
                msgs = ctx.store.get(int(cid), user_of(request)).messages
            except ChatError:
                return gr.skip(), gr.skip()
            if not 0 <= index < len(msgs):
                return gr.skip(), gr.skip()
            return index + 1, msgs[index].content

        chatbot.select(on_select, [chat_id], [sel_index, edit_box], show_progress="hidden")

        def on_delete_message(cid, number, request: gr.Request):
            user = user_of(request)
            try:
                line = h.delete_message(ctx, user, cid, int(number) - 1 if number else None)
            except ChatError as exc:
                return gr.skip(), str(exc)
            return h.open_chat(ctx, user, cid)[0], line

        delete_msg_btn.click(on_delete_message, [chat_id, sel_index], [chatbot, notice], show_progress="hidden")

        # ---- history -------------------------------------------------------------------------------
        def on_new(request: gr.Request):
            return None, [], "", "", gr.update(value=None)

        new_btn.click(on_new, None, [chat_id, chatbot, notice, system_prompt, chat_list], show_progress="hidden")
        chatbot.clear(on_new, None, [chat_id, chatbot, notice, system_prompt, chat_list], show_progress="hidden")

        def on_search(query, request: gr.Request):
            return gr.update(choices=h.chat_choices(ctx, user_of(request), query))

        search.change(on_search, search, chat_list, show_progress="hidden")

        def on_open(cid, request: gr.Request):
            if cid is None:
                return gr.skip(), gr.skip(), gr.skip(), gr.skip()
            try:
                messages, sys_prompt = h.open_chat(ctx, user_of(request), int(cid))
            except ChatError as exc:
                return gr.skip(), gr.skip(), str(exc), gr.skip()
            return int(cid), messages, "", sys_prompt

        chat_list.input(on_open, chat_list, [chat_id, chatbot, notice, system_prompt], show_progress="hidden")

        def on_rename(cid, title, query, request: gr.Request):
            user = user_of(request)
            try:
                if cid is None:
                    raise ChatError("Open or start a chat first, then rename it.")
                ctx.store.rename(int(cid), user, title or "")
            except ChatError as exc:
                return gr.skip(), str(exc)
            return gr.update(choices=h.chat_choices(ctx, user, query), value=int(cid)), "Renamed."

        rename_btn.click(on_rename, [chat_id, rename_box, search], [chat_list, history_note], show_progress="hidden")

        def on_delete_chat(cid, query, request: gr.Request):
            user = user_of(request)
            if cid is None:
                return gr.skip(), gr.skip(), gr.skip(), "Open a chat first, then delete it."
            try:
                ctx.store.delete(int(cid), user)
            except ChatError as exc:
                return gr.skip(), gr.skip(), gr.skip(), str(exc)
            return None, [], gr.update(choices=h.chat_choices(ctx, user, query), value=None), "Chat deleted."

        delete_chat_btn.click(on_delete_chat, [chat_id, search], [chat_id, chatbot, chat_list, history_note],
                              show_progress="hidden")

        def exporter(fmt):
            def on_export(cid, request: gr.Request):
                try:
                    return h.export_chat(ctx, user_of(request), cid, fmt), ""
                except ChatError as exc:
                    return None, str(exc)
            return on_export

        export_md_btn.click(exporter("md"), chat_id, [export_file, history_note], show_progress="hidden")
        export_json_btn.click(exporter("json"), chat_id, [export_file, history_note], show_progress="hidden")

        def on_import(file, query, request: gr.Request):
            user = user_of(request)
            path = getattr(file, "name", file)
            try:
                cid = h.import_chat(ctx, user, path)
            except ChatError as exc:
                return gr.skip(), gr.skip(), gr.skip(), gr.skip(), str(exc)
            messages, sys_prompt = h.open_chat(ctx, user, cid)
            return (cid, messages, sys_prompt, gr.update(choices=h.chat_choices(ctx, user, query), value=cid),
                    "Imported.")

        import_btn.upload(on_import, [import_btn, search], [chat_id, chatbot, system_prompt, chat_list, history_note],
                          show_progress="hidden")
    blocks.moechat_context = ctx
    return blocks
