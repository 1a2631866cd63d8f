"""The error of moe-offload's own int4 conversion, and what each option costs at decode.

    python bench/quant_error.py [--rows 512] [--cols 2048] [--matrices 4] [--seed 0] [--json OUT]

For weights shaped like Qwen3-Next's experts ([512, 2048] per projection) drawn from three
distributions (Gaussian; Student-t with 4 degrees of freedom, heavy tails; Student-t plus a few
outlier input columns and rows, as trained checkpoints have), it quantizes each with
round-to-nearest (scale = max |w| / 7, the first quantizer: ``quant.int4_quantize_rtn``) and with
the least-squares scale search (``quant.int4_quantize``) at groups 128, 64 and 32, and prints a
markdown table: the weight MSE relative to the weights' mean square, the relative output error
||x W'^T - x W^T|| / ||x W^T|| for Gaussian x, and the decode cost predicted from the bytes
(decode is memory-bound on expert bytes: bf16 scales add 2/G bytes per weight to the 0.5 of the
int4 payload, ``plan.expert_bytes``). It also measures the conversion time per GB of bf16 experts
on this machine. docs/moe-offload.md has the table and how it was made.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from moechat.backends import synthetic
from moechat.backends.moe_offload import plan, quant
from moechat.backends.shapes import shapes

# Qwen3-Next-80B-A3B's expert shapes: an expert's gate/up matrix is [INTERMEDIATE, HIDDEN]
_EIGHTY_B = shapes(synthetic.config("synthetic:qwen3-next-80b-a3b"))
HIDDEN, INTERMEDIATE = _EIGHTY_B.hidden, _EIGHTY_B.expert_intermediate

GROUPS = (128, 64, 32)
QUANTIZERS = {"nearest": quant.int4_quantize_rtn, "search": quant.int4_quantize}
DISTRIBUTIONS = ("gaussian", "student-t", "student-t+outliers")


def weights(kind: str, rows: int, cols: int, seed: int) -> torch.Tensor:
    """Random weights of std about 0.02 (as Qwen3-Next's experts are), [rows, cols] float32.
    ``student-t+outliers``: Student-t (4 degrees of freedom), then 8 input columns scaled by 8
    and 2 rows by 4: the outlier features and rows of trained checkpoints."""
    g = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        return torch.randn(rows, cols, generator=g) * 0.02
    # Student-t(4) = N / sqrt(chi2_4 / 4), chi2_4 = the sum of 4 squared normals
    chi2 = (torch.randn(4, rows, cols, generator=g) ** 2).sum(0)
    w = torch.randn(rows, cols, generator=g) / (chi2 / 4).sqrt() * 0.02 / 2**0.5
    if kind == "student-t+outliers":
        w[:, torch.randperm(cols, generator=g)[:8]] *= 8
        w[torch.randperm(rows, generator=g)[:2]] *= 4
    elif kind != "student-t":
        raise ValueError(f"unknown distribution {kind!r}")
    return w


def decode_cost(group: int, hidden: int = HIDDEN, intermediate: int = INTERMEDIATE) -> float:
    """Extra expert bytes over the int4 payload at this group, as a fraction: decode's predicted cost."""
    n = 3 * hidden * intermediate
    return plan.expert_bytes("int4", hidden, intermediate, group) / (n / 2) - 1


def errors(w: torch.Tensor, x: torch.Tensor, quantizer: str, group: int) -> tuple[float, float]:
    """(weight MSE / mean square of w, relative output error of x @ W^T)."""
    q, s = QUANTIZERS[quantizer](w, group)
    d = quant.int4_dequantize(q, s, torch.float32)
    y = x @ w.T
    return (((d - w) ** 2).mean() / (w**2).mean()).item(), ((x @ d.T - y).norm() / y.norm()).item()


def seconds_per_gb(rows: int, cols: int, matrices: int, rounds: int = 9) -> dict[str, float]:
    """Conversion time per GB of bf16 experts (2 bytes a weight) of every (quantizer, group), on
    this machine's threads: the best of ``rounds`` rounds, each timing every option once in turn,
    so that other work on a shared machine slows none of them more than the others."""
    ws = [weights("student-t+outliers", rows, cols, 100 + i).to(torch.bfloat16) for i in range(matrices)]
    options = [(name, group) for name in QUANTIZERS for group in GROUPS]
    best = {f"{name}-g{group}": float("inf") for name, group in options}
    for name, group in options:                # warm-up
        QUANTIZERS[name](ws[0], group)
    for _ in range(rounds):
        for name, group in options:
            t0 = time.perf_counter()
            for w in ws:
                QUANTIZERS[name](w, group)
            key = f"{name}-g{group}"
            best[key] = min(best[key], time.perf_counter() - t0)
    return {k: v / (matrices * rows * cols * 2 / 1e9) for k, v in best.items()}


def measure(rows: int = INTERMEDIATE, cols: int = HIDDEN, matrices: int = 4, seed: int = 0) -> dict:
    """Every (distribution, quantizer, group): errors averaged over ``matrices`` matrices; and
    the conversion cost per GB of each (quantizer, group)."""
    x = torch.randn(64, cols, generator=torch.Generator().manual_seed(seed + 1000))
    rows_out = []
    for dist in DISTRIBUTIONS:
        ws = [weights(dist, rows, cols, seed + i) for i in range(matrices)]
        for name in QUANTIZERS:
            for group in GROUPS:
                e = [errors(w, x, name, group) for w in ws]
                rows_out.append({"weights": dist, "quantizer": name, "group": group,
                                 "weight_mse_rel": sum(a for a, _ in e) / len(e),
                                 "output_err_rel": sum(b for _, b in e) / len(e),
                                 "decode_cost": decode_cost(group)})
    cost = seconds_per_gb(rows, cols, matrices)
    return {"rows": rows_out, "seconds_per_gb": cost, "threads": torch.get_num_threads(),
            "shape": [rows, cols], "matrices": matrices}


def table(result: dict) -> str:
    lines = ["| weights | quantizer | group | weight MSE (rel.) | output error (rel.) | predicted decode cost | "
             "conversion s/GB |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        s = result["seconds_per_gb"][f"{r['quantizer']}-g{r['group']}"]
        lines.append(f"| {r['weights']} | {r['quantizer']} | {r['group']} | {r['weight_mse_rel']:.5f} | "
                     f"{r['output_err_rel']:.4f} | +{100 * r['decode_cost']:.2f} % | {s:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=INTERMEDIATE)
    ap.add_argument("--cols", type=int, default=HIDDEN)
    ap.add_argument("--matrices", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    a = ap.parse_args(argv)
    result = measure(a.rows, a.cols, a.matrices, a.seed)
    print(table(result))
    print(f"\n{result['threads']} torch threads; conversion of {a.matrices} [{a.rows}, {a.cols}] bf16 matrices, "
          "the best of 9 rounds")
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
