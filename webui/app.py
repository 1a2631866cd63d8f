"""The web page: layout and event wiring only. The logic lives in webui.handlers and backends."""

from __future__ import annotations

from backends.manager import BackendManager


def build_ui(manager: BackendManager, options):
    import gradio as gr

    from backends.api import GenerateRequest, Message

    names = sorted(manager.backends())

    def status_text():
        s = manager.state
        if s.status == "ready":
            demo = " This is the built-in demo model: its replies are noise. Give a model folder to chat for real." \
                if s.model and s.model.path.endswith("demo-model") else ""
            return f"Loaded {s.model.path} with {s.backend}.{demo}"
        if s.status == "loading":
            return f"Loading with {s.backend}: {s.progress.stage if s.progress else ''}"
        if s.status == "failed":
            return f"Load failed: {s.error}"
        return "Nothing is loaded."

    def load(backend, folder):
        try:
            manager.load(backend, {"model": folder or ""})
        except Exception as exc:
            return f"Load failed: {exc}"
        return status_text()

    def chat(message, history):
        msgs = [Message(role=m["role"], content=m["content"]) for m in history] + [Message(role="user", content=message)]
        text = ""
        for ev in manager.generate(GenerateRequest(messages=msgs)):
            if ev.kind == "chunk":
                text += ev.text
                yield text
            elif ev.kind == "done" and ev.error:
                yield text + f"\n\n[{ev.error}]"

    with gr.Blocks(title="moechat") as blocks:
        gr.Markdown("# moechat")
        with gr.Row():
            backend = gr.Dropdown(names, value="transformers" if "transformers" in names else None, label="Backend")
            folder = gr.Textbox(label="Model folder", placeholder="empty: the demo model")
            load_btn = gr.Button("Load")
        status = gr.Markdown(status_text())
        load_btn.click(load, [backend, folder], status)
        gr.ChatInterface(chat)
        blocks.load(status_text, None, status)
    return blocks
