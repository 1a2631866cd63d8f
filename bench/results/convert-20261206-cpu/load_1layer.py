"""Load a checkpoint folder on the CPU through build.load_engine; print each stage's seconds and the host peak."""
import json, sys, time, resource
import torch
from moechat.backends.moe_offload.build import load_engine
from moechat.backends.moe_offload.engine import Options
stages = []
def progress(p):
    if not stages or stages[-1][1] != p.stage:
        stages.append((time.perf_counter(), p.stage))
t0 = time.perf_counter()
eng = load_engine(sys.argv[1], Options(expert_format="int4", device="cpu", dtype=torch.float32, cache_dir=sys.argv[2]), progress)
end = time.perf_counter()
b = [t for t, _ in stages[1:]] + [end]
print(json.dumps({"stages": {s: round(e - t, 2) for (t, s), e in zip(stages, b)}, "total": round(end - t0, 2),
                  "peak_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
                  "store_gb": round(eng.store.total_bytes() / 1e9, 2)}))
