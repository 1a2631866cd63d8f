"""Shared fixtures: a private data dir for every test session and the tiny models."""

from __future__ import annotations

import os

import pytest

from moechat.backends.testing import contract_model_dir  # noqa: F401  (session fixture)

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The machines that run these tests have no GPU: Triton kernels run in its interpreter (numpy).
# It is read when triton is imported, so it is set before anything imports it.
os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session", autouse=True)
def moechat_home(tmp_path_factory):
    """MOECHAT_HOME for the whole session, so no test touches the user's data dir."""
    home = tmp_path_factory.mktemp("moechat-home")
    os.environ["MOECHAT_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Tiny Qwen3-Next, Qwen3-MoE and Llama folders, built once."""
    from moechat.backends.demo import build_tiny_model
    root = tmp_path_factory.mktemp("tiny-models")
    return {fam: build_tiny_model(root / fam, fam, seed=1) for fam in ("qwen3_next", "qwen3_moe", "llama")}


@pytest.fixture
def plugins():
    """A fresh plugin manager for one test."""
    from moechat.backends.plugins import get_plugin_manager
    return get_plugin_manager()
