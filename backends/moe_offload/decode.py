"""The decode step of Qwen3-Next, one token at a time over static buffers.

transformers' modules are written for any sequence length and a growing cache; at batch 1 and one
token their Python and kernel launches cost about 3.35 ms per layer (docs/facts.md), 160 ms per
token for 48 layers. This step does the same arithmetic with the model's own parameters (no copies) and
state that never moves: the KV cache is preallocated for ``max_context`` positions, the Gated
DeltaNet conv and recurrent states are updated in place, and the position is a device tensor. So
the whole step has fixed shapes and addresses, and on a GPU it is captured once as a CUDA graph and
replayed per token with no Python in the loop and no host sync.

Routed experts are the one part that depends on the data. ``routed`` is either

* ``DeviceExperts`` (GPU, int4): a device table maps each (layer, expert) to its cache slot or -1;
  a Triton kernel (``kernels.py``) reads each selected expert's int4 bytes from its cache slot or,
  on a miss, straight from pinned host memory over PCIe. No host sync, so it lives in the graph.
  Between tokens the host adjusts the cache (``CachePolicy``).
* the layer's ``OffloadedExperts`` module (CPU, or no Triton): eager, one host sync per layer.

Prefill stays with transformers' modules (long sequences are what they are good at); ``load_cache``
then copies the prompt's state into the static buffers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen3-Next's zero-centred RMSNorm: ``x / rms(x) * (1 + w)`` in float32."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * (1.0 + weight.float())).to(x.dtype)


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


@dataclass
class _Layer:
    kind: str                 # "linear_attention" or "full_attention"
    module: Any               # the decoder layer (parameters are read from it)
    moe: int | None           # index into the MoE layers, None for a dense MLP
    state: int                # index into this kind's static state
    proj_in: Any = None       # fused step: in_proj_qkvz and in_proj_ba (or q, k, v) as one matrix
    proj_moe: Any = None      # fused step: shared expert gate/up, router, shared-expert gate as one


def stack_projections(mods: list[Any]) -> torch.Tensor | None:
    """One weight matrix for several bias-free linears that read the same input: their weights
    become row views of it (no second copy), so one GEMV serves all. Built once per model."""
    if any(getattr(m, "bias", None) is not None for m in mods):
        return None
    first = mods[0].weight
    fused = getattr(mods[0], "_moe_offload_stack", None)
    if fused is not None and first.data_ptr() == fused.data_ptr():
        return fused
    w = torch.cat([m.weight.detach() for m in mods])
    row = 0
    for m in mods:
        n = m.weight.shape[0]
        m.weight.data = w[row:row + n]
        row += n
    mods[0]._moe_offload_stack = w
    return w


class Qwen3NextDecoder:
    """One decode token through the whole model. ``token`` and ``pos`` are device tensors the
    caller fills; ``step()`` returns the logits [vocab] and advances ``pos``."""

    @staticmethod
    def supports(config: Any) -> bool:
        """The step (and its kernels) hard-code SiLU, as Qwen3-Next's config has it."""
        return config.hidden_act == "silu"

    def __init__(self, model: Any, config: Any, max_context: int,
                 routed: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                 moe_layers: tuple[int, ...], fused: bool = False):
        self.model, self.config, self.routed = model, config, routed
        self.max_context = max_context
        emb = model.model.embed_tokens.weight
        self.device, self.dtype = emb.device, emb.dtype
        self.eps = config.rms_norm_eps
        c = config
        self.nk, self.nv = c.linear_num_key_heads, c.linear_num_value_heads
        self.dk, self.dv = c.linear_key_head_dim, c.linear_value_head_dim
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.n_heads, self.n_kv = c.num_attention_heads, c.num_key_value_heads
        self.top_k, self.norm_topk = c.num_experts_per_tok, c.norm_topk_prob
        moe_index = {layer: i for i, layer in enumerate(moe_layers)}
        self.layers: list[_Layer] = []
        counts = {"linear_attention": 0, "full_attention": 0}
        for i, layer in enumerate(model.model.layers):
            kind = c.layer_types[i]
            self.layers.append(_Layer(kind, layer, moe_index.get(i), counts[kind]))
            counts[kind] += 1
        dev, dt = self.device, self.dtype
        conv_dim = 2 * self.nk * self.dk + self.nv * self.dv
        self.conv = torch.zeros(counts["linear_attention"], conv_dim, c.linear_conv_kernel_dim, device=dev, dtype=dt)
        self.recurrent = torch.zeros(counts["linear_attention"], self.nv, self.dk, self.dv, device=dev,
                                     dtype=torch.float32)
        self.keys = torch.zeros(counts["full_attention"], self.n_kv, max_context, self.head_dim, device=dev, dtype=dt)
        self.values = torch.zeros_like(self.keys)
        self.positions = torch.arange(max_context, device=dev)
        self.token = torch.zeros(1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        # the routing of the last step, read by the cache policy between tokens
        self.routing = torch.zeros(max(len(moe_layers), 1), self.top_k, dtype=torch.long, device=dev)
        # Benchmarks only: route every token to top_k experts drawn uniformly at random (with the
        # model's weights for them), a cache's worst case. Set before the step is captured.
        self.uniform_routing = False
        # fused: the Triton kernels of kernels.py for norms, Gated DeltaNet, routing and the MoE
        # output (``routed`` must then be a DeviceExperts); else plain torch ops throughout
        self.kernels = None
        if fused:
            from moechat.backends.moe_offload import kernels
            self.kernels = kernels
            self.hidden = torch.zeros(c.hidden_size, device=dev, dtype=dt)     # the residual stream
            self.normed = torch.zeros_like(self.hidden)
            self.conv_out = torch.zeros(conv_dim, device=dev, dtype=dt)
            self.gdn_out = torch.zeros(self.nv * self.dv, device=dev, dtype=dt)
            self.ids = torch.zeros(self.top_k, dtype=torch.long, device=dev)
            self.weights = torch.zeros(self.top_k, device=dev, dtype=dt)
            self.q = torch.zeros(self.n_heads * self.head_dim, device=dev, dtype=dt)
            self.attn_part = torch.zeros(self.n_heads, kernels.ATTN_SPLITS, self.head_dim + 2, device=dev,
                                         dtype=torch.float32)
            self.attn_out = torch.zeros_like(self.q)
            with torch.no_grad():
                for layer in self.layers:       # fewer, larger GEMVs: launches dominate at batch 1
                    mod = layer.module
                    if layer.kind == "linear_attention":
                        a = mod.linear_attn
                        layer.proj_in = stack_projections([a.in_proj_qkvz, a.in_proj_ba])
                    else:
                        a = mod.self_attn
                        layer.proj_in = stack_projections([a.q_proj, a.k_proj, a.v_proj])
                    if layer.moe is not None:
                        mlp = mod.mlp
                        layer.proj_moe = stack_projections([mlp.shared_expert.gate_proj, mlp.shared_expert.up_proj,
                                                            mlp.gate, mlp.shared_expert_gate])

    # ---- state ---------------------------------------------------------------------------------
    def load_cache(self, cache: Any, length: int) -> None:
        """Take the state transformers' prefill left in ``cache`` (a DynamicCache)."""
        if length >= self.max_context:
            raise ValueError(f"the prompt has {length} tokens; the decoder holds {self.max_context}")
        with torch.no_grad():
            for i, layer in enumerate(self.layers):
                st = cache.layers[i]
                if layer.kind == "linear_attention":
                    conv = st.conv_states[0]
                    self.conv[layer.state].copy_(conv[0, :, -self.conv.shape[-1]:])
                    self.recurrent[layer.state].copy_(st.recurrent_states[0][0])
                else:
                    self.keys[layer.state, :, :length].copy_(st.keys[0, :, :length])
                    self.values[layer.state, :, :length].copy_(st.values[0, :, :length])
            self.pos.fill_(length)

    # ---- the step --------------------------------------------------------------------------------
    def step(self) -> torch.Tensor:
        if self.kernels is not None:
            return self._fused_step()
        m = self.model.model
        h = F.embedding(self.token, m.embed_tokens.weight)[0]
        for i, layer in enumerate(self.layers):
            mod = layer.module
            x = rms_norm(h, mod.input_layernorm.weight, self.eps)
            if layer.kind == "linear_attention":
                x = self._delta_net(mod.linear_attn, layer.state, x)
            else:
                x = self._attention(mod.self_attn, layer.state, x)
            h = h + x
            x = rms_norm(h, mod.post_attention_layernorm.weight, self.eps)
            h = h + (self._moe(mod.mlp, layer.moe, x) if layer.moe is not None else _mlp(mod.mlp, x))
        h = rms_norm(h, m.norm.weight, self.eps)
        logits = F.linear(h, self.model.lm_head.weight)
        self.pos.add_(1)
        return logits

    def _fused_step(self) -> torch.Tensor:
        """``step`` with the fused kernels: the residual stream and the normed input are static
        buffers updated in place, about a dozen launches per Gated DeltaNet layer instead of ~100."""
        k, m, eps = self.kernels, self.model.model, self.eps
        h, x = self.hidden, self.normed
        h.copy_(F.embedding(self.token, m.embed_tokens.weight)[0])
        rope = None
        for layer in self.layers:
            mod = layer.module
            k.add_rms_norm(h, None, mod.input_layernorm.weight, eps, x)
            if layer.kind == "linear_attention":
                attn = mod.linear_attn
                if layer.proj_in is not None:
                    both = F.linear(x, layer.proj_in)
                    qkvz, ba = both.split([attn.in_proj_qkvz.weight.shape[0], attn.in_proj_ba.weight.shape[0]])
                else:
                    qkvz = F.linear(x, attn.in_proj_qkvz.weight)
                    ba = F.linear(x, attn.in_proj_ba.weight)
                k.gated_delta_step(qkvz, ba, self.conv[layer.state], attn.conv1d.weight, attn.A_log, attn.dt_bias,
                                   self.recurrent[layer.state], attn.norm.weight, attn.norm.variance_epsilon,
                                   self.nk, self.dk, self.dv, self.conv_out, self.gdn_out)
                mixed = F.linear(self.gdn_out, attn.out_proj.weight)
            elif layer.proj_in is not None:
                if rope is None:        # every attention layer of a token shares its position's angles
                    rope = self.rope_angles(x)
                mixed = self._fused_attention(layer, x, rope)
            else:       # projections with biases
                mixed = self._attention(mod.self_attn, layer.state, x)
            k.add_rms_norm(h, mixed, mod.post_attention_layernorm.weight, eps, x)
            if layer.moe is None:
                h.add_(_mlp(mod.mlp, x))
                continue
            mlp = mod.mlp
            se = mlp.shared_expert
            if layer.proj_moe is not None:
                inter = se.gate_proj.weight.shape[0]
                out = F.linear(x, layer.proj_moe)
                logits, shared_gate = out[2 * inter:].split([mlp.gate.weight.shape[0], 1])
                # the shared expert's gate and up; combine computes its activation and down projection
                shared, down = out[:2 * inter], se.down_proj.weight
            else:
                shared, down = _mlp(se, x), None
                shared_gate = F.linear(x, mlp.shared_expert_gate.weight)
                logits = F.linear(x, mlp.gate.weight)
            noise = torch.rand(mlp.gate.weight.shape[0], device=x.device) if self.uniform_routing else None
            k.route(logits, self.top_k, self.norm_topk, self.ids, self.weights, self.routing[layer.moe], noise)
            y = self.routed.experts_out(layer.moe, x, self.ids, self.weights)
            k.combine(h, y, self.weights, shared, shared_gate, self.routed.cpu_out(layer.moe), down=down)
        k.add_rms_norm(h, None, m.norm.weight, eps, x)
        logits = F.linear(x, self.model.lm_head.weight)
        self.pos.add_(1)
        return logits

    def rope_angles(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of this step's position (the model's rotary embedding), flat."""
        cos, sin = self.model.model.rotary_emb(x, self.pos.view(1, 1))
        return cos.view(-1), sin.view(-1)

    def _fused_attention(self, layer: _Layer, x: torch.Tensor,
                         rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """``_attention`` with the fused kernels, for q, k and v stacked in ``layer.proj_in``."""
        attn = layer.module.self_attn
        self.kernels.attention_decode(F.linear(x, layer.proj_in), attn.q_norm.weight, attn.k_norm.weight, *rope,
                                      self.pos, self.keys[layer.state], self.values[layer.state], self.eps,
                                      attn.scaling, self.q, self.attn_part, self.attn_out)
        return F.linear(self.attn_out, attn.o_proj.weight)

    def _delta_net(self, attn: Any, s: int, x: torch.Tensor) -> torch.Tensor:
        nk, nv, dk, dv = self.nk, self.nv, self.dk, self.dv
        r = nv // nk
        qkvz = F.linear(x, attn.in_proj_qkvz.weight).view(nk, 2 * dk + 2 * r * dv)
        ba = F.linear(x, attn.in_proj_ba.weight).view(nk, 2 * r)
        q, k, v, z = torch.split(qkvz, [dk, dk, r * dv, r * dv], dim=-1)
        b, a = ba[:, :r].reshape(nv), ba[:, r:].reshape(nv)
        mixed = torch.cat((q.reshape(-1), k.reshape(-1), v.reshape(-1)))
        # causal conv1d over the last kernel-size inputs, the state shifted in place
        conv = self.conv[s]
        conv.copy_(torch.cat((conv[:, 1:], mixed[:, None]), dim=1))
        mixed = F.silu((conv.float() * attn.conv1d.weight[:, 0].float()).sum(-1)).to(x.dtype)
        q, k, v = torch.split(mixed, [nk * dk, nk * dk, nv * dv])
        beta = torch.sigmoid(b).float()
        g = -attn.A_log.float().exp() * F.softplus(a.float() + attn.dt_bias)
        q = l2norm(q.view(nk, dk).float()).repeat_interleave(r, dim=0) * dk ** -0.5
        k = l2norm(k.view(nk, dk).float()).repeat_interleave(r, dim=0)
        state = self.recurrent[s]                                   # [nv, dk, dv], float32
        state.mul_(g.exp()[:, None, None])
        kv_mem = torch.bmm(k[:, None, :], state)[:, 0]              # [nv, dv]
        delta = (v.view(nv, dv).float() - kv_mem) * beta[:, None]
        state.baddbmm_(k[:, :, None], delta[:, None, :])
        o = torch.bmm(q[:, None, :], state)[:, 0].to(x.dtype)       # [nv, dv]
        # gated RMSNorm: norm(o) * w, times silu(z)
        of = o.float()
        o = (of * torch.rsqrt(of.pow(2).mean(-1, keepdim=True) + attn.norm.variance_epsilon)).to(x.dtype)
        o = (attn.norm.weight * o) * F.silu(z.reshape(nv, dv).float())
        return F.linear(o.to(x.dtype).reshape(-1), attn.out_proj.weight)

    def _attention(self, attn: Any, s: int, x: torch.Tensor) -> torch.Tensor:
        hd, nh, nkv = self.head_dim, self.n_heads, self.n_kv
        qg = F.linear(x, attn.q_proj.weight, attn.q_proj.bias).view(nh, 2 * hd)
        q, gate = qg[:, :hd], qg[:, hd:].reshape(-1)
        q = rms_norm(q, attn.q_norm.weight, self.eps)
        k = rms_norm(F.linear(x, attn.k_proj.weight, attn.k_proj.bias).view(nkv, hd), attn.k_norm.weight, self.eps)
        v = F.linear(x, attn.v_proj.weight, attn.v_proj.bias).view(nkv, hd)
        cos, sin = self.rope_angles(x)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        keys, values = self.keys[s], self.values[s]
        keys.index_copy_(1, self.pos, k[:, None])
        values.index_copy_(1, self.pos, v[:, None])
        scores = torch.matmul(q.view(nkv, nh // nkv, hd), keys.transpose(1, 2)) * attn.scaling
        scores = scores.masked_fill((self.positions > self.pos)[None, None, :], float("-inf"))
        p = torch.softmax(scores.float(), dim=-1).to(x.dtype)
        o = torch.matmul(p, values).reshape(-1)                     # [nh * hd]
        o = o * torch.sigmoid(gate)
        return F.linear(o, attn.o_proj.weight, attn.o_proj.bias)

    def _moe(self, mlp: Any, moe: int, x: torch.Tensor) -> torch.Tensor:
        shared = _mlp(mlp.shared_expert, x) * torch.sigmoid(F.linear(x, mlp.shared_expert_gate.weight))
        logits = F.linear(x, mlp.gate.weight)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float)
        w, ids = torch.topk(probs, self.top_k)
        if self.uniform_routing:
            ids = torch.rand(probs.shape, device=probs.device).topk(self.top_k).indices
            w = probs.gather(0, ids)
        if self.norm_topk:
            w = w / w.sum()
        self.routing[moe].copy_(ids)
        return self.routed(moe, x, ids, w.to(logits.dtype)) + shared


def _mlp(mlp: Any, x: torch.Tensor) -> torch.Tensor:
    return F.linear(F.silu(F.linear(x, mlp.gate_proj.weight)) * F.linear(x, mlp.up_proj.weight), mlp.down_proj.weight)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on the first ``len(cos)`` dims of each head (the rest pass through)."""
    n = cos.shape[-1]
    rot, rest = x[..., :n], x[..., n:]
    half = n // 2
    rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    return torch.cat((rot * cos + rotated * sin, rest), dim=-1)


class GraphedStep:
    """``decoder.step`` captured once as a CUDA graph; ``run()`` replays it."""

    def __init__(self, decoder: Qwen3NextDecoder, warmup: int = 2):
        self.decoder = decoder
        pos, token = decoder.pos.clone(), decoder.token.clone()
        stream = torch.cuda.Stream(decoder.device)
        stream.wait_stream(torch.cuda.current_stream(decoder.device))
        hybrid = getattr(decoder.routed, "hybrid", None)
        with torch.cuda.stream(stream), (hybrid.paused() if hybrid is not None else contextlib.nullcontext()):
            for _ in range(warmup):     # compile kernels, set up cuBLAS, outside the capture
                decoder.step()
        torch.cuda.current_stream(decoder.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = decoder.step()
        decoder.pos.copy_(pos)
        decoder.token.copy_(token)

    def run(self) -> torch.Tensor:
        self.graph.replay()
        return self.logits
