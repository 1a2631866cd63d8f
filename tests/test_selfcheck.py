"""The output self-check, through a real backend in a real worker process.

A tiny Llama is first trained for a few seconds on the paragraph the check scores (the start of
the demo corpus), so it knows it: the check passes. The same model with every weight tensor shuffled is
garbage: the check fails and says so. A backend that cannot score text is reported unchecked.
"""

from __future__ import annotations

import math

import pytest

from moechat.backends import selfcheck
from moechat.backends.api import BackendError
from moechat.backends.manager import BackendManager
from moechat.backends.plugins import get_plugin_manager

TRAIN_STEPS = 100


@pytest.fixture(scope="module")
def trained_and_scrambled(tmp_path_factory):
    """(folder of a tiny Llama trained on the paragraph, folder of it with shuffled weights)."""
    from moechat.backends.demo import build_selfcheck_models
    return build_selfcheck_models(tmp_path_factory.mktemp("selfcheck-models"), steps=TRAIN_STEPS)


@pytest.fixture(scope="module")
def manager(tmp_path_factory):
    mgr = BackendManager(get_plugin_manager(), tmp_path_factory.mktemp("selfcheck-home"))
    yield mgr
    mgr.close()


def test_a_model_that_knows_the_paragraph_passes(manager, trained_and_scrambled):
    trained, _ = trained_and_scrambled
    manager.load("transformers", {"model": str(trained), "device": "cpu"})
    result = selfcheck.check_loaded(manager)
    assert result.passed is True, result.message
    assert result.vocab_size == 384
    assert result.perplexity < result.limit < 384
    assert result.message.startswith("Output self-check passed")


def test_the_same_model_with_scrambled_weights_fails(manager, trained_and_scrambled):
    _, scrambled = trained_and_scrambled
    manager.load("transformers", {"model": str(scrambled), "device": "cpu"})
    result = selfcheck.check_loaded(manager)
    assert result.passed is False and result.wrong_output
    assert result.perplexity > result.vocab_size / 2  # no better than guessing
    assert "producing wrong output" in result.message and "Do not trust its replies" in result.message


def test_a_backend_that_cannot_score_text_is_reported_unchecked(manager):
    manager.load("fake", {})
    result = selfcheck.check_loaded(manager)
    assert result.passed is None and not result.wrong_output
    assert "was not self-checked" in result.message


def test_no_model_loaded_says_so(tmp_path):
    mgr = BackendManager(get_plugin_manager(), tmp_path)
    try:
        with pytest.raises(BackendError, match="No model is loaded"):
            mgr.perplexity(selfcheck.PARAGRAPH)
    finally:
        mgr.close()


def test_limits_and_the_verdict_on_edge_values():
    assert selfcheck.limit_for(384) == pytest.approx(math.sqrt(384))
    assert selfcheck.limit_for(151936) == selfcheck.MAX_PERPLEXITY
    assert selfcheck.limit_for(None) == selfcheck.MAX_PERPLEXITY
    assert selfcheck.judge(float("nan"), 1000).passed is False
    assert "not a number" in selfcheck.judge(float("nan"), 1000).message
    assert selfcheck.judge(float("inf"), None).passed is False
    assert selfcheck.judge(8.0, 151936).passed is True
    assert selfcheck.judge(5000.0, 151936).passed is False


def test_the_paragraph_is_plain_english_from_the_demo_corpus():
    from moechat.backends.demo import CORPUS
    assert selfcheck.PARAGRAPH.startswith("The quick brown fox")
    assert selfcheck.PARAGRAPH.endswith("Paris is the capital of France.")
    assert all(word in CORPUS for word in selfcheck.PARAGRAPH.split())
