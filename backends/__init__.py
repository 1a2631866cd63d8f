"""moechat backends: the plugin API, the backend manager and the built-in backends.

Importing this package is cheap: it imports no torch, transformers, vllm or bitsandbytes.
"""

from moechat.backends.api import (
    Backend,
    BackendError,
    BackendSettings,
    Chunk,
    GenerateRequest,
    MemoryItem,
    MemoryPlan,
    Message,
    Probe,
    Progress,
    SamplingParams,
    probe_modules,
)
from moechat.backends.hookspecs import hookimpl

__all__ = [
    "Backend", "BackendError", "BackendSettings", "Chunk", "GenerateRequest", "MemoryItem",
    "MemoryPlan", "Message", "Probe", "Progress", "SamplingParams", "hookimpl", "probe_modules",
]
