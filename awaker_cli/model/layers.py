"""The adapter layers: a LoRA linear, a LoRA-MoE linear and the bank of all routers.

Both linears subclass nn.Linear and keep the base `weight`/`bias` under their usual names, so the
base tensors keep their checkpoint keys. Adapter weights are stacked: lora_A [slots, r, in] and
lora_B [slots, out, r] with the global expert in the last slot. Every computation goes through
`awaker_cli.kernels`, which picks Triton or the torch reference.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..errors import AwakerError
from .routing import Routing, RoutingState


def _init_lora_A(t: torch.Tensor):
    # peft's choice: A like a default nn.Linear (kaiming-uniform, a=sqrt(5)), B zero -> adapter starts at 0.
    bound = 1.0 / math.sqrt(t.shape[-1])
    with torch.no_grad():
        t.uniform_(-bound, bound)


class _AdaptedLinear(nn.Linear):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight = base.weight  # shared, not copied
        self.bias = base.bias
        # A quantized base (bitsandbytes Linear4bit / Linear8bitLt of an `awaker export`) holds a packed
        # weight only it can multiply with: keep it as a child that computes the base output.
        self.base_layer = None if base.weight.is_floating_point() else base
        self.rank = rank
        self.scaling = alpha / rank
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def _new(self, *shape, dtype=None) -> nn.Parameter:
        if dtype is None and self.base_layer is not None:
            raise ValueError("adapters on a quantized base need an explicit float dtype")
        return nn.Parameter(torch.empty(*shape, device=self.weight.device, dtype=dtype or self.weight.dtype))

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.base_layer is not None:
            return self.base_layer(x)
        return F.linear(x, self.weight, self.bias)


class LoRALinear(_AdaptedLinear):
    """y = W x + b + scaling · B A x (a plain LoRA; q/k/v by default)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, dtype=None):
        super().__init__(base, rank, alpha, dropout)
        self.lora_A = self._new(rank, self.in_features, dtype=dtype)
        self.lora_B = self._new(self.out_features, rank, dtype=dtype)
        self.merged = False
        _init_lora_A(self.lora_A)
        nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_forward(x)
        if self.merged:
            return y
        # One "expert" with weight 1 for all tokens: the same kernels as the MoE layers.
        x3, y3 = x.reshape(1, -1, x.shape[-1]), y.reshape(1, -1, y.shape[-1])
        ids = torch.zeros(1, 1, dtype=torch.long, device=x.device)
        ones = torch.ones(1, 1, dtype=torch.float32, device=x.device)
        out = kernels.lora_moe(y3, self.lora_dropout(x3), self.lora_A[None], self.lora_B[None], ids, ones, None,
                               self.scaling)
        return out.reshape(y.shape)

    @torch.no_grad()
    def merge_(self):
        """Fold the adapter into the base weight (inference): W += scaling · B A, computed in fp32."""
        if self.base_layer is not None:
            raise AwakerError("cannot merge a LoRA into a quantized base weight (merge before `awaker export`)")
        if not self.merged:
            delta = (self.lora_B.float() @ self.lora_A.float()) * self.scaling
            self.weight.copy_((self.weight.float() + delta).to(self.weight.dtype))
            self.merged = True


class MoELoRALinear(_AdaptedLinear):
    """y = W x + b + scaling · (Σ w_e · B_e A_e x + w_g · B_g A_g x), routed once per sequence.

    The weights w come from the model's RoutingState (router `router_index`), already in the combine
    mode; the global expert, when present, is the last slot.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, num_experts: int, global_expert: bool,
                 router_index: int, state: RoutingState, dropout: float = 0.0, dtype=None):
        super().__init__(base, rank, alpha, dropout)
        slots = num_experts + (1 if global_expert else 0)
        self.num_experts = num_experts
        self.global_expert = global_expert
        self.router_index = router_index
        self.routing_state = state
        self.lora_A = self._new(slots, rank, self.in_features, dtype=dtype)
        self.lora_B = self._new(slots, self.out_features, rank, dtype=dtype)
        _init_lora_A(self.lora_A)
        nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_forward(x)
        routing = self.routing_state.routing_for(x.shape[0])
        ids, weights, gw, plan = routing.for_router(self.router_index, self.lora_A.shape[0])
        return kernels.lora_moe(y, self.lora_dropout(x), self.lora_A, self.lora_B, ids, weights, gw, self.scaling,
                                plan=plan)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, rank={self.rank}, experts={self.num_experts}, "
                f"global_expert={self.global_expert}, router={self.router_index}")


class RouterBank(nn.Module):
    """Every router of the model, stacked: RMSNorm weight [R, H], gate Linear [R, E, H] + bias [R, E]."""

    def __init__(self, num_routers: int, hidden: int, num_experts: int, *, eps: float, temperature: float,
                 top_k: int, noise_std: float, combine: str, global_expert: bool, device=None, dtype=None):
        super().__init__()
        self.norm_weight = nn.Parameter(torch.ones(num_routers, hidden, device=device, dtype=dtype))
        self.gate_weight = nn.Parameter(torch.empty(num_routers, num_experts, hidden, device=device, dtype=dtype))
        self.gate_bias = nn.Parameter(torch.empty(num_routers, num_experts, device=device, dtype=dtype))
        bound = 1.0 / math.sqrt(hidden)  # nn.Linear's default init, as the release's w_gate
        with torch.no_grad():
            self.gate_weight.uniform_(-bound, bound)
            self.gate_bias.uniform_(-bound, bound)
        self.eps, self.temperature, self.top_k = eps, temperature, top_k
        self.noise_std, self.combine, self.global_expert = noise_std, combine, global_expert

    def forward(self, span_mean: torch.Tensor) -> Routing:
        """span_mean [B, H] -> the Routing of all routers; noise on the logits only in training."""
        noise = None
        if self.training and self.noise_std > 0:
            shape = (span_mean.shape[0], *self.gate_bias.shape)
            noise = torch.randn(shape, device=span_mean.device) * self.noise_std
        ids, probs = kernels.route(span_mean.to(self.gate_weight.dtype), self.norm_weight, self.gate_weight,
                                   self.gate_bias, eps=self.eps, temperature=self.temperature,
                                   top_k=self.top_k, noise=noise)
        return Routing.from_probs(ids, probs, self.combine, self.global_expert)
