"""moe-offload passes the backend contract suite (real manager, real worker process)."""

import tempfile

from moechat.backends.testing import BackendContract


class TestMoeOffload(BackendContract):
    backend = "moe-offload"
    # int4 experts with a group that fits the tiny widths; converted experts go to a temp folder
    settings = {"device": "cpu", "expert_format": "int4", "int4_group_size": 16,
                "cache_dir": tempfile.mkdtemp(prefix="moe-offload-contract-")}
