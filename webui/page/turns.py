"""The chat column: the load line, the chat, the message box, Send / Stop / Regenerate /
Continue, editing or deleting a message, the system prompt and sampling."""

import time
from dataclasses import dataclass
from typing import Any

from moechat.webui.chats import ChatError
from moechat.webui.handlers import chats as hc
from moechat.webui.handlers import turns as ht
from moechat.webui.handlers.context import Context
from moechat.webui.handlers.loading import progress_text
from moechat.webui.handlers.stats import stats_markdown
from moechat.webui.page.common import session_of, user_of

STATS_EVERY_S = 1.0     # while a reply streams, the stats panel is redrawn at most this often


@dataclass
class TurnsPart:
    model_status: Any
    chatbot: Any
    notice: Any
    msg: Any
    send_btn: Any
    stop_btn: Any
    regen_btn: Any
    continue_btn: Any
    sel_index: Any
    edit_box: Any
    save_edit_btn: Any
    delete_msg_btn: Any
    system_prompt: Any
    sampling_specs: list
    sampling_comps: list[Any]


def layout(ctx: Context) -> TurnsPart:
    import gradio as gr

    from moechat.backends.api import SamplingParams
    from moechat.webui import forms

    sampling_specs = forms.fields_of(SamplingParams, skip=("stop",))
    model_status = gr.Markdown(progress_text(ctx.manager), elem_id="model-status")
    chatbot = gr.Chatbot(elem_id="chatbot", height=460, editable="user",
                         placeholder="Load a model, then type a message below.",
                         buttons=["copy"], feedback_options=None)
    notice = gr.Markdown(elem_id="notice")
    with gr.Row():
        msg = gr.Textbox(show_label=False, placeholder="Type a message; Enter sends, Shift+Enter adds a line",
                         lines=1, max_lines=10, scale=5, elem_id="message", submit_btn=False)
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
    return TurnsPart(model_status, chatbot, notice, msg, send_btn, stop_btn, regen_btn, continue_btn, sel_index,
                     edit_box, save_edit_btn, delete_msg_btn, system_prompt, sampling_specs, sampling_comps)


def wire(ctx: Context, part: TurnsPart, chat_id: Any, stats: Any, chat_list: Any) -> None:
    """The chat's events. A turn also redraws ``stats`` and, when it starts a chat, ``chat_list``."""
    import gradio as gr

    from moechat.webui import forms

    turn_outputs = [chat_id, part.chatbot, part.notice, stats, part.msg, chat_list]

    def stream(action, cid, text, index, sys_prompt, values, request):
        user, session = user_of(request), session_of(request)
        sampling = forms.collect(part.sampling_specs, list(values))
        drawn = 0.0
        first = True
        for view in ht.run_turn(ctx, user, session, cid, action, text=text, index=index,
                                sampling=sampling, system_prompt=sys_prompt or ""):
            now = time.monotonic()
            stats_out = gr.skip()
            if view.last:   # drawn with the last state, so the event ends as the notice shows
                stats_out = stats_markdown(ctx)
            elif now - drawn >= STATS_EVERY_S:
                stats_out, drawn = stats_markdown(ctx, view.live), now
            msg_out = gr.skip()
            if first:
                msg_out = "" if (view.accepted and action == "send") else gr.skip()
            list_out = gr.skip()
            if view.new_chat:
                list_out = gr.update(choices=hc.chat_choices(ctx, user), value=view.chat_id)
            first = False
            yield view.chat_id, view.messages, view.notice, stats_out, msg_out, list_out

    # Gradio passes gr.Request / gr.EditData only to positional parameters, so functions with
    # *values take them first.
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

    # trigger_mode "multiple": a send right after a reply ends is taken even if the browser has not
    # yet heard that the last event finished (Gradio's default, "once", drops it silently);
    # run_turn itself refuses a second turn of one session while one runs
    chat_kw = dict(concurrency_limit=None, show_progress="hidden", trigger_mode="multiple")
    sampling = [part.system_prompt] + part.sampling_comps
    part.send_btn.click(on_send, [chat_id, part.msg] + sampling, turn_outputs, **chat_kw)
    part.msg.submit(on_send, [chat_id, part.msg] + sampling, turn_outputs, **chat_kw)
    part.regen_btn.click(on_regenerate, [chat_id] + sampling, turn_outputs, **chat_kw)
    part.continue_btn.click(on_continue, [chat_id] + sampling, turn_outputs, **chat_kw)
    part.save_edit_btn.click(on_save_edit, [chat_id, part.sel_index, part.edit_box] + sampling, turn_outputs,
                             **chat_kw)
    part.chatbot.retry(on_regenerate, [chat_id] + sampling, turn_outputs, **chat_kw)
    part.chatbot.edit(on_native_edit, [chat_id] + sampling, turn_outputs, **chat_kw)

    def on_stop(request: gr.Request):
        line = ht.stop(ctx, session_of(request))
        # the reply's own stream says how it ended; writing "Stopping …" here could land after it
        return line if line == ht.NOTHING_TO_STOP else gr.skip()

    part.stop_btn.click(on_stop, None, part.notice, concurrency_limit=None, show_progress="hidden")

    def on_select(cid, evt: gr.SelectData, request: gr.Request):
        index = evt.index if isinstance(evt.index, int) else evt.index[0]
        found = hc.message_to_edit(ctx, user_of(request), cid, index)
        return found if found is not None else (gr.skip(), gr.skip())

    part.chatbot.select(on_select, [chat_id], [part.sel_index, part.edit_box], show_progress="hidden")

    def on_delete_message(cid, number, request: gr.Request):
        user = user_of(request)
        try:
            line = ht.delete_message(ctx, user, cid, int(number) - 1 if number else None)
        except ChatError as exc:
            return gr.skip(), str(exc)
        return hc.open_chat(ctx, user, cid)[0], line

    part.delete_msg_btn.click(on_delete_message, [chat_id, part.sel_index], [part.chatbot, part.notice],
                              show_progress="hidden")
