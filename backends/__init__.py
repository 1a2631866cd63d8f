"""moechat backends: the plugin API, the backend manager and the built-in backends.

Importing this package is cheap: it imports no torch, transformers, vllm or bitsandbytes.
"""

from moechat.backends.api import (
    Backend,
    BackendError,
    BackendSettings,
    BackendUnavailable,
    Cancelled,
    Chunk,
    GenerateRequest,
    MemoryItem,
    MemoryPlan,
    Message,
    Probe,
    PlanDoesNotFit,
    Progress,
    PromptTooLong,
    SamplingParams,
    SettingsInvalid,
    probe_modules,
)
from moechat.backends.hookspecs import hookimpl

__all__ = [
    "Backend", "BackendError", "BackendSettings", "BackendUnavailable", "Cancelled", "Chunk",
    "GenerateRequest", "MemoryItem", "MemoryPlan", "Message", "PlanDoesNotFit", "Probe", "Progress",
    "PromptTooLong", "SamplingParams", "SettingsInvalid", "hookimpl", "probe_modules",
]
