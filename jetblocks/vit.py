"""The Vision Transformer that computes a Jet coupling's bias and scale from its half.

Per coupling (the reference's ``DNN``): ``Linear(d_in -> E)`` + a learned position
embedding ``[1, N, E]`` (+ an optional zero-initialised cross-attention to a context
``[B, M, C_ctx]``) + ``depth`` pre-LN encoder blocks (``x += MHA(LN(x)); x += MLP(LN(x))``)
+ a final LayerNorm + a zero-initialised ``Linear(E -> d_out)``. Initialisers follow the
reference (Flax): ``Dense`` kernels are LeCun-normal (truncated), attention and MLP kernels
Xavier-uniform (each of the fused query, key and value kernels on its own), MLP biases
``N(0, 1e-6)``, other biases zero, LayerNorm eps ``1e-6``.

Attention runs on one of :data:`ATTENTION_BACKENDS` (the same function, up to rounding):

- ``"sdpa"`` (the default of the modules here):
  ``torch.nn.functional.scaled_dot_product_attention``, which picks PyTorch's fused flash /
  memory-efficient kernels where it can.
- ``"math"``: the plain ``softmax(q k^T / sqrt(d)) v`` in matmuls, softmax in float32.
- ``"xformers"``: ``xformers.ops.memory_efficient_attention`` (``pip install jetblocks[gpu]``),
  CUDA tensors only. Asking for it where xformers is not installed raises ``ImportError``
  when the module is built; calling it on non-CUDA tensors raises ``RuntimeError``.
- ``"auto"`` (``JetConfig``'s default): decided on every call (a model built on the CPU and
  moved to a GPU picks the GPU's kernel): xformers for CUDA tensors (float16, bfloat16,
  float32) when it is installed, SDPA otherwise. :func:`jetblocks.acceleration.accelerate`
  adds the CPU rules measured here (math attention for half-precision CPU tensors and in
  compiled float32 training).
"""

from __future__ import annotations

import importlib.util
import math

import einops
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .validation import Choice, Shape

__all__ = [
    "ATTENTION_BACKENDS",
    "LAYER_NORM_EPS",
    "Attention",
    "EncoderBlock",
    "ViTConditioner",
    "dense",
    "lecun_normal_",
    "math_attention",
    "xformers_attention",
    "xformers_available",
]

LAYER_NORM_EPS = 1e-6
# Flax truncates its normal initialisers at 2 std and rescales so the variance is kept.
_TRUNCATED_NORMAL_STD = 0.87962566103423978
ATTENTION_BACKENDS = ("sdpa", "math", "xformers", "auto")
ATTENTION_BACKEND = Choice(ATTENTION_BACKENDS)


def math_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """``softmax(q k^T / sqrt(d)) v`` for ``[B, H, N, d]``; the softmax runs in float32 or wider."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    wide = torch.promote_types(scores.dtype, torch.float32)
    return scores.to(wide).softmax(dim=-1).to(v.dtype) @ v


def xformers_available() -> bool:
    """Whether ``xformers.ops.memory_efficient_attention`` can be imported."""
    if importlib.util.find_spec("xformers") is None:
        return False
    try:
        from xformers.ops import memory_efficient_attention  # noqa: F401
    except ImportError:
        return False
    return True


def xformers_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """xformers' memory-efficient attention for ``[B, H, N, d]`` tensors (CUDA ones)."""
    from xformers.ops import memory_efficient_attention

    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # xformers wants [B, N, H, d]
    return memory_efficient_attention(q, k, v).transpose(1, 2)


# x * sigmoid(x * (a + b x^2)) is tanh-GELU: (1 + tanh(u)) / 2 = sigmoid(2u), with


def lecun_normal_(weight: Tensor) -> Tensor:
    """Flax's default kernel init: truncated normal with variance ``1 / fan_in``."""
    std = math.sqrt(1.0 / weight.shape[1]) / _TRUNCATED_NORMAL_STD
    return nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)


def dense(d_in: int, d_out: int) -> nn.Linear:
    """An ``nn.Linear`` initialised like Flax's ``nn.Dense`` (LeCun-normal kernel, zero bias)."""
    layer = nn.Linear(d_in, d_out)
    lecun_normal_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class Attention(nn.Module):
    """Multi-head dot-product attention with biased query/key/value/out projections.

    Self-attention (``source_dim=None``) projects ``x`` ``[B, N, E]`` once, by ``qkv``
    (``Linear(E, 3E)``: the query, key and value projections stacked by rows, as
    ``jetblocks.integrations.big_vision.FUSED_PROJECTIONS`` says). Cross-attention takes
    queries from ``x`` (``query``) and keys and values from ``forward``'s ``source``
    ``[B, M, source_dim]`` (``kv``,
    ``Linear(source_dim, 2E)``). ``backend`` is one of :data:`ATTENTION_BACKENDS` (see the
    module docstring).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        source_dim: int | None = None,
        backend: str = "sdpa",
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"emb_dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.backend = ATTENTION_BACKEND.check(backend, "Attention: backend")
        self._xformers = backend in ("xformers", "auto") and xformers_available()
        if backend == "xformers" and not self._xformers:
            raise ImportError(
                "attention_backend='xformers' needs the xformers package (GPU only): "
                "`pip install jetblocks[gpu]`, or use attention_backend='sdpa' or 'auto'"
            )
        self.cross = source_dim is not None
        if self.cross:
            self.query = nn.Linear(dim, dim)
            self.kv = nn.Linear(source_dim, 2 * dim)
        else:
            self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        for layer in self.children():
            nn.init.zeros_(layer.bias)

    def projection_weights(self) -> tuple[Tensor, Tensor, Tensor]:
        """The query, key and value weights ``[E, in]`` (views of the fused ones), to
        initialise each as its own kernel."""
        if self.cross:
            return self.query.weight, *self.kv.weight.chunk(2)
        return self.qkv.weight.chunk(3)

    def _projections(self, x: Tensor, source: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """``q, k, v`` as ``[B, H, N, d]``: one matmul for self-attention, two for cross."""
        if self.cross != (source is not None):
            raise ValueError(
                "cross-attention needs a source" if self.cross else "self-attention takes no source"
            )
        split = "b n (k h d) -> k b h n d"
        if source is None:
            return einops.rearrange(self.qkv(x), split, k=3, h=self.num_heads).unbind(0)
        q = einops.rearrange(self.query(x), "b n (h d) -> b h n d", h=self.num_heads)
        return q, *einops.rearrange(self.kv(source), split, k=2, h=self.num_heads).unbind(0)

    def auto_backend(self, q: Tensor) -> str:
        """The backend ``"auto"`` runs ``q`` on: xformers for CUDA tensors where it is
        installed, else SDPA."""
        return "xformers" if self._xformers and q.is_cuda else "sdpa"

    def forward(self, x: Tensor, source: Tensor | None = None) -> Tensor:
        q, k, v = self._projections(x, source)
        backend = self.auto_backend(q) if self.backend == "auto" else self.backend
        if backend == "xformers" and not q.is_cuda:
            raise RuntimeError(
                f"attention_backend='xformers' runs on CUDA tensors only, got {q.device.type}; "
                "use attention_backend='sdpa', or 'auto' to fall back to it off the GPU"
            )
        if backend == "xformers" and q.dtype != torch.float64:
            attended = xformers_attention(q, k, v)
        elif backend == "math":
            attended = math_attention(q, k, v)
        else:
            attended = F.scaled_dot_product_attention(q, k, v)
        return self.out(einops.rearrange(attended, "b h n d -> b n (h d)"))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, backend={self.backend!r}"


class EncoderBlock(nn.Module):
    """Pre-LN transformer block: ``x += MHA(LN(x)); x += MLP(LN(x))``, MLP width ``4E``."""

    def __init__(self, dim: int, num_heads: int, attention_backend: str = "sdpa") -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attention = Attention(dim, num_heads, backend=attention_backend)
        self.mlp_norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        gelu = nn.GELU(approximate="tanh")  # the reference's (Flax's default)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), gelu, nn.Linear(4 * dim, dim))
        attention_kernels = (*self.attention.projection_weights(), self.attention.out.weight)
        for weight in (*attention_kernels, self.mlp[0].weight, self.mlp[2].weight):
            nn.init.xavier_uniform_(weight)
        for layer in (self.mlp[0], self.mlp[2]):
            nn.init.normal_(layer.bias, std=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attention(self.attention_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class ViTConditioner(nn.Module):
    """Maps a coupling's conditioning half ``[B, N, d_in]`` to ``[B, N, d_out]``.

    With ``context_dim`` set, ``forward(x, context)`` also cross-attends to a context
    ``[B, M, context_dim]`` right after the position embedding; that attention's output
    projection starts at zero, so a conditioned coupling starts as the identity too.
    ``attention_backend`` selects the attention kernel of every attention layer.
    """

    def __init__(
        self,
        *,
        d_in: int,
        d_out: int,
        num_tokens: int,
        emb_dim: int,
        depth: int,
        num_heads: int,
        context_dim: int | None = None,
        attention_backend: str = "sdpa",
    ) -> None:
        super().__init__()
        self.num_tokens, self.d_in, self.context_dim = num_tokens, d_in, context_dim
        self.init_proj = dense(d_in, emb_dim)
        self.posemb = nn.Parameter(torch.randn(1, num_tokens, emb_dim) / math.sqrt(emb_dim))
        self.cross_attention = None
        if context_dim is not None:
            self.cross_attention = Attention(
                emb_dim, num_heads, source_dim=context_dim, backend=attention_backend
            )
            for weight in self.cross_attention.projection_weights():
                lecun_normal_(weight)
            nn.init.zeros_(self.cross_attention.out.weight)
        self.blocks = nn.ModuleList(
            EncoderBlock(emb_dim, num_heads, attention_backend) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(emb_dim, eps=LAYER_NORM_EPS)
        self.final_proj = nn.Linear(emb_dim, d_out)
        nn.init.zeros_(self.final_proj.weight)
        nn.init.zeros_(self.final_proj.bias)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        Shape(("B", self.num_tokens, self.d_in)).check(x, "ViTConditioner")
        h = self.init_proj(x) + self.posemb
        if self.cross_attention is not None:
            if context is None:
                raise ValueError(
                    f"this conditioner was built with context_dim={self.context_dim}; "
                    "pass a context of shape [B, M, context_dim]"
                )
            # x.shape[0], not len(x): len() makes an int of a traced batch size (torch.export)
            Shape((x.shape[0], "M", self.context_dim)).check(context, "ViTConditioner", "context")
            h = h + self.cross_attention(h, context.to(h.dtype))
        elif context is not None:
            raise ValueError("a context was given but this conditioner has context_dim=None")
        for block in self.blocks:
            h = block(h)
        return self.final_proj(self.norm(h))
