"""The web page: its parts put together. Each part (moechat.webui.page.loading, .turns, .stats,
.chats) lays out its column or section and wires its own events to the plain functions in
moechat.webui.handlers; this module only places them and hands each the components of the others
it writes to."""

from typing import Any

from moechat.backends.manager import BackendManager
from moechat.webui.handlers.context import Context


def build_ui(manager: BackendManager, options: Any, ctx: Context | None = None):
    import gradio as gr

    from moechat.webui.page import chats, compare, loading, stats, turns

    ctx = ctx or Context.from_options(manager, options)
    with gr.Blocks(title="moechat") as blocks:
        chat_id = gr.State(None)
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=230):
                chats_part = chats.layout(ctx)
            with gr.Column(scale=3, min_width=420):
                turns_part = turns.layout(ctx)
            with gr.Column(scale=2, min_width=300):
                loading_part = loading.layout(ctx, options)
                stats_part = stats.layout(ctx)
        compare_part = compare.layout(ctx)
        loading.wire(ctx, blocks, loading_part, turns_part.model_status)
        stats.wire(ctx, stats_part, turns_part.model_status)
        turns.wire(ctx, turns_part, chat_id, stats_part.stats, chats_part.chat_list)
        chats.wire(ctx, blocks, chats_part, chat_id, turns_part.chatbot, turns_part.notice,
                   turns_part.system_prompt)
        compare.wire(ctx, blocks, compare_part, loading_part, chat_id)
    blocks.moechat_context = ctx
    return blocks
