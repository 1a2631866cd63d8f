"""The contract suite against every built-in backend that runs on this machine, and the fake plugin."""

from moechat.backends.testing import BackendContract


class TestTransformers(BackendContract):
    backend = "transformers"


class TestBnb4(BackendContract):
    backend = "transformers-bnb4"


class TestFakePlugin(BackendContract):
    backend = "fake"
    uses_model_folder = False
    settings = {"delay_s": 0.01}
