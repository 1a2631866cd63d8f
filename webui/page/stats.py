"""The live stats section: the stats table and the speed chart, refreshed by the page's timer."""

from dataclasses import dataclass
from typing import Any

from moechat.webui.handlers import stats as hs
from moechat.webui.handlers.context import Context
from moechat.webui.handlers.loading import progress_text

TICK_S = 2.0            # the status and stats refresh this often when no reply streams


@dataclass
class StatsPart:
    stats: Any
    speed_plot: Any


def speed_frame(ctx: Context) -> Any:
    import pandas as pd
    rows = hs.speed_history(ctx)
    frame = pd.DataFrame(rows or [], columns=["reply", "tok/s", "backend"])
    return frame.astype({"reply": str, "tok/s": float, "backend": str})


def layout(ctx: Context) -> StatsPart:
    import gradio as gr
    gr.Markdown("### Live stats")
    stats = gr.Markdown(hs.stats_markdown(ctx), elem_id="stats")
    speed_plot = gr.BarPlot(speed_frame(ctx), x="reply", y="tok/s", title="tok/s of the last replies",
                            height=200, elem_id="speed-plot", x_title="reply", y_title="tok/s",
                            sort="x", y_lim=[0, None])
    return StatsPart(stats, speed_plot)


def wire(ctx: Context, part: StatsPart, model_status: Any) -> None:
    """Every ``TICK_S`` the load line, the stats and the chart are redrawn."""
    import gradio as gr
    timer = gr.Timer(TICK_S)

    def on_tick():
        return progress_text(ctx.manager), hs.stats_markdown(ctx), speed_frame(ctx)

    timer.tick(on_tick, None, [model_status, part.stats, part.speed_plot], concurrency_limit=None,
               show_progress="hidden")
