"""Mixture-of-experts kept quantized: one Linear (or QLinear) per expert per projection, and a forward
that runs only the experts the router picked.

transformers 5 fuses the experts of a MoE block into 3-D parameters (`experts.gate_up_proj` [E, 2I, H],
`experts.down_proj` [E, H, I]; gpt-oss transposed, with biases). Quantized checkpoints keep them per
expert (GPTQModel, llm-compressor, transformers 4 + bitsandbytes write `experts.N.gate_proj.weight` and
its companions; GGUF keeps `ffn_*_exps` blocks whose expert N is a contiguous run of rows). `QExperts`
replaces the fused module with `experts.N.{gate_proj,up_proj,down_proj}` children, so each expert
projection is a module the engine fills like any other Linear (a QLinear holding that expert's packed
QTensor, or a plain Linear), and the module names are the per-expert checkpoint names.

The forward has the fused module's signature `(hidden_states, top_k_index, top_k_weights)` and its
numerics: tokens are grouped by the expert they picked (one sort), each picked expert runs its own
projections on its tokens only, and the weighted outputs are added back in expert order, as
transformers' eager loop adds them. An expert no token picked is never touched, so a quantized expert is
dequantized (or runs its packed kernel) only when it is used.
"""
from __future__ import annotations

import torch
from torch import nn

#: gate functions by name: (gate, up) -> activation input of down_proj
GATE_SILU = "act_mul"       # act_fn(gate) * up            (Qwen2/3-MoE, Mixtral, OLMoE, ...)
GATE_GPT_OSS = "gpt_oss"    # clamped SwiGLU with alpha     (gpt-oss)


class ExpertMLP(nn.Module):
    """One expert: gate_proj, up_proj, down_proj (each an nn.Linear until the loader swaps in a QLinear)."""

    def __init__(self, hidden: int, intermediate: int, *, bias: bool, dtype: torch.dtype, device="meta"):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=bias, dtype=dtype, device=device)
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias, dtype=dtype, device=device)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias, dtype=dtype, device=device)


class QExperts(nn.ModuleList):
    """`num_experts` ExpertMLPs; forward(hidden_states [T, H], top_k_index [T, K], top_k_weights [T, K])."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, *, bias: bool = False,
                 gate: str = GATE_SILU, act_fn=None, alpha: float = 1.702, limit: float = 7.0,
                 dtype: torch.dtype = torch.float32, device="meta"):
        super().__init__(ExpertMLP(hidden, intermediate, bias=bias, dtype=dtype, device=device)
                         for _ in range(num_experts))
        if gate not in (GATE_SILU, GATE_GPT_OSS):
            raise ValueError(f"unknown expert gate {gate!r}")
        if gate == GATE_SILU and act_fn is None:
            raise ValueError("an act_mul gate needs act_fn")
        self.num_experts = num_experts
        self.hidden_dim = hidden
        self.intermediate_dim = intermediate
        self.gate = gate
        # kept out of _modules (an activation is an nn.Module): children are the experts, nothing else
        self.__dict__["act_fn"] = act_fn
        self.alpha = alpha
        self.limit = limit
        #: per-expert call counts, when a caller sets it to a list (tests, benchmarks); None costs nothing
        self.calls: list[int] | None = None

    def _activate(self, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        if self.gate == GATE_SILU:
            return self.act_fn(g) * u
        # transformers' GptOssExperts._apply_gate on the de-interleaved halves
        g = g.clamp(min=None, max=self.limit)
        u = u.clamp(min=-self.limit, max=self.limit)
        return (u + 1) * (g * torch.sigmoid(g * self.alpha))

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        mlp = self[e]
        if self.calls is not None:
            self.calls[e] += 1
        return mlp.down_proj(self._activate(mlp.gate_proj(x), mlp.up_proj(x)))

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        k = top_k_index.shape[-1]
        flat = top_k_index.reshape(-1)
        # one stable sort groups the (token, slot) pairs by expert, tokens ascending within each expert
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()  # the one host sync
        tokens, slots = order // k, order % k
        start = 0
        for e, n in enumerate(counts[:self.num_experts]):
            if n == 0:
                continue   # never picked: its weights are not read
            tok, slot = tokens[start:start + n], slots[start:start + n]
            start += n
            y = self.expert_forward(e, hidden_states[tok])
            y = y * top_k_weights[tok, slot, None]
            out.index_add_(0, tok, y.to(out.dtype))
        return out

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden={self.hidden_dim}, "
                f"intermediate={self.intermediate_dim}, gate={self.gate}")
