from moechat.backends.testing import BackendContract, contract_model_dir  # noqa: F401  (a fixture)


class TestMyBackend(BackendContract):
    backend = "my-backend"
    uses_model_folder = False
    settings = {"delay_s": 0.01}   # so Stop, pressed after two tokens, lands mid-reply
    refused_settings = {"max_reply_tokens": 10_000}
