"""The chat list column: New chat, search, past chats, and for the open chat rename, delete,
export and import."""

from dataclasses import dataclass
from typing import Any

from moechat.webui.chats import ChatError
from moechat.webui.handlers import chats as hc
from moechat.webui.handlers.context import Context
from moechat.webui.page.common import user_of


@dataclass
class ChatsPart:
    new_btn: Any
    search: Any
    chat_list: Any
    rename_box: Any
    rename_btn: Any
    delete_chat_btn: Any
    export_md_btn: Any
    export_json_btn: Any
    export_file: Any
    import_btn: Any
    history_note: Any


def layout(ctx: Context) -> ChatsPart:
    import gradio as gr

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
    return ChatsPart(new_btn, search, chat_list, rename_box, rename_btn, delete_chat_btn, export_md_btn,
                     export_json_btn, export_file, import_btn, history_note)


def wire(ctx: Context, blocks: Any, part: ChatsPart, chat_id: Any, chatbot: Any, notice: Any,
         system_prompt: Any) -> None:
    """The list's events; opening a chat fills ``chatbot`` and ``system_prompt``, a sentence goes
    to ``notice`` or the list's own note."""
    import gradio as gr

    hidden = dict(show_progress="hidden")

    def on_page_load(request: gr.Request):
        """The person's chats, and who is signed in."""
        user = user_of(request)
        return (gr.update(choices=hc.chat_choices(ctx, user), value=None),
                f"Signed in as **{user}**." if user else "")

    blocks.load(on_page_load, None, [part.chat_list, part.history_note])

    def on_new(request: gr.Request):
        return None, [], "", "", gr.update(value=None)

    new_outputs = [chat_id, chatbot, notice, system_prompt, part.chat_list]
    part.new_btn.click(on_new, None, new_outputs, **hidden)
    chatbot.clear(on_new, None, new_outputs, **hidden)

    def on_search(query, request: gr.Request):
        return gr.update(choices=hc.chat_choices(ctx, user_of(request), query))

    part.search.change(on_search, part.search, part.chat_list, **hidden)

    def on_open(cid, request: gr.Request):
        if cid is None:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        try:
            messages, sys_prompt = hc.open_chat(ctx, user_of(request), int(cid))
        except ChatError as exc:
            return gr.skip(), gr.skip(), str(exc), gr.skip()
        return int(cid), messages, "", sys_prompt

    part.chat_list.input(on_open, part.chat_list, [chat_id, chatbot, notice, system_prompt], **hidden)

    def on_rename(cid, title, query, request: gr.Request):
        user = user_of(request)
        try:
            hc.rename_chat(ctx, user, cid, title)
        except ChatError as exc:
            return gr.skip(), str(exc)
        return gr.update(choices=hc.chat_choices(ctx, user, query), value=int(cid)), "Renamed."

    part.rename_btn.click(on_rename, [chat_id, part.rename_box, part.search], [part.chat_list, part.history_note],
                          **hidden)

    def on_delete_chat(cid, query, request: gr.Request):
        user = user_of(request)
        try:
            hc.delete_chat(ctx, user, cid)
        except ChatError as exc:
            return gr.skip(), gr.skip(), gr.skip(), str(exc)
        return None, [], gr.update(choices=hc.chat_choices(ctx, user, query), value=None), "Chat deleted."

    part.delete_chat_btn.click(on_delete_chat, [chat_id, part.search],
                               [chat_id, chatbot, part.chat_list, part.history_note], **hidden)

    def exporter(fmt):
        def on_export(cid, request: gr.Request):
            try:
                return hc.export_chat(ctx, user_of(request), cid, fmt), ""
            except ChatError as exc:
                return None, str(exc)
        return on_export

    part.export_md_btn.click(exporter("md"), chat_id, [part.export_file, part.history_note], **hidden)
    part.export_json_btn.click(exporter("json"), chat_id, [part.export_file, part.history_note], **hidden)

    def on_import(file, query, request: gr.Request):
        user = user_of(request)
        path = getattr(file, "name", file)
        try:
            cid = hc.import_chat(ctx, user, path)
        except ChatError as exc:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), str(exc)
        messages, sys_prompt = hc.open_chat(ctx, user, cid)
        return (cid, messages, sys_prompt, gr.update(choices=hc.chat_choices(ctx, user, query), value=cid),
                "Imported.")

    part.import_btn.upload(on_import, [part.import_btn, part.search],
                           [chat_id, chatbot, system_prompt, part.chat_list, part.history_note], **hidden)
