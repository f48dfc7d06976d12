"""The adapter math of Still-Moving (paper Secs. 3.2 and 3.3), and nothing else.

- Motion adapter (Sec. 3.2): a LoRA on the temporal self-attention projections W_Q, W_K, W_V,
      W~ = W + alpha * A_down @ A_up,   A_down: C x r (random),  A_up: r x d_k (zero).
  alpha is a *runtime* number, never merged into W: alpha = 0 skips the branch, so it is exactly
  the base model, and negative alpha works.
- Spatial adapter (Sec. 3.3): after each injected T2I block, over channels,
      Adapter(X) = X (I + A_down @ A_up),   A_down: C x r (random),  A_up: r x C (zero).

Helpers follow loralib: add, remove, set the scale, mark only adapters trainable, adapter-only state
dicts (a file of kilobytes). The tests in test_stillmoving.py are this file's specification.
"""

import math

import torch
import torch.nn as nn

# --------------------------------------------------------------------------------- the two adapters


class LoRALinear(nn.Module):
    """The motion adapter on one projection: an nn.Linear plus a low-rank residual,
    x W~ = x W + alpha * (x A_down) A_up (Eq. 1). The base layer is frozen by
    `mark_only_adapters_trainable`, not here."""

    def __init__(self, base, rank):
        super().__init__()
        self.base, self.alpha = base, 1.0
        device = base.weight.device
        self.A_down = nn.Parameter(torch.randn(base.in_features, rank, device=device) / rank)
        self.A_up = nn.Parameter(torch.zeros(rank, base.out_features, device=device))  # a no-op

    def forward(self, x):
        y = self.base(x)
        if self.alpha == 0:  # alpha = 0 is exactly the base layer, not "nearly"
            return y
        return y + self.alpha * ((x @ self.A_down) @ self.A_up)  # W~ = W + alpha A_down A_up


class SpatialAdapter(nn.Module):
    """Adapter(X) = X (I + A_down @ A_up) (Eq. 2), acting on the channels of a (N, C, H, W) map."""

    def __init__(self, channels, rank, device=None):
        super().__init__()
        self.A_down = nn.Parameter(torch.randn(channels, rank, device=device) / rank)
        self.A_up = nn.Parameter(torch.zeros(rank, channels, device=device))  # the identity at init

    def forward(self, x):
        low = torch.einsum("nchw,cr->nrhw", x, self.A_down)  # X A_down, per pixel
        return x + torch.einsum("nrhw,rc->nchw", low, self.A_up)  # X + X A_down A_up


# ------------------------------------------------------------------------------- add, scale, remove

MOTION, SPATIAL = "motion adapter", "spatial adapters"
KINDS = {MOTION: LoRALinear, SPATIAL: SpatialAdapter}  # an adapter's kind is its class


def add_lora(model, rank, where):
    """Wrap every nn.Linear whose qualified name satisfies `where(name)` in a LoRALinear."""
    linears = [name for name, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    targets = [name for name in linears if where(name)]
    for name in targets:
        parent, child = _parent(model, name)
        setattr(parent, child, LoRALinear(getattr(parent, child), rank))
    return len(targets)


NOT_INFLATED = "this model has no temporal layers: inflate it (unet3d.inflate) before adding {}"


def is_temporal_qkv(name):
    """W_Q, W_K, W_V of a temporal self-attention: where the motion adapter goes."""
    return ".temporal.attn1.to_" in name and name[-1] in "qkv"


def add_motion_adapter(model, rank):
    """The motion adapter: a LoRA on W_Q, W_K, W_V of every temporal self-attention (Sec. 3.2)."""
    n = add_lora(model, rank, is_temporal_qkv)
    if n == 0:
        raise ValueError(NOT_INFLATED.format("a motion adapter"))
    return model


def add_spatial_adapters(model, rank):
    """A spatial adapter after each T2I block that feeds a temporal module, before that module
    (Sec. 3.3)."""
    device = next(model.parameters()).device
    if not model.temporal_blocks():
        raise ValueError(NOT_INFLATED.format("spatial adapters"))
    for block in model.temporal_blocks():
        block.adapter = SpatialAdapter(block.channels, rank, device)
    return model


def adapters(model, kind=None):
    """The adapter modules of one kind (MOTION or SPATIAL), or of both."""
    wanted = tuple(KINDS.values()) if kind is None else KINDS[kind]
    return [m for m in model.modules() if isinstance(m, wanted)]


def set_scale(model, alpha):
    """Set the motion adapter's alpha (the spatial adapters have no scale). Negative values are
    allowed (more motion, Sec. 3.2)."""
    alpha = float(alpha)
    if not math.isfinite(alpha):
        raise ValueError(f"the adapter scale must be a finite number, got {alpha}")
    for m in adapters(model, MOTION):
        m.alpha = alpha
    return model


def remove_adapters(model, kind=None):
    """Take adapters out, giving back the original module tree (a LoRA -> its base Linear, a
    spatial adapter -> Identity): W is exactly as it was, as alpha never touched it."""
    chosen = {id(m) for m in adapters(model, kind)}
    for name, mod in list(model.named_modules()):
        if id(mod) in chosen:
            parent, child = _parent(model, name)
            setattr(parent, child, mod.base if isinstance(mod, LoRALinear) else nn.Identity())
    return model


def mark_only_adapters_trainable(model, kind):
    """requires_grad on this kind's A_down / A_up only; everything else is frozen. Returns them."""
    model.requires_grad_(False)
    params = [p for m in adapters(model, kind) for p in (m.A_down, m.A_up)]
    for p in params:
        p.requires_grad_(True)
    return params


def _parent(model, name):
    parent, _, child = name.rpartition(".")
    return model.get_submodule(parent), child


# ------------------------------------------------------------------------------ adapter state dicts


def adapter_state_dict(model, kind):
    """Only this kind's adapter tensors: a file of kilobytes, not the model's megabytes."""
    chosen = {id(m) for m in adapters(model, kind)}
    names = {name for name, m in model.named_modules() if id(m) in chosen}
    state = model.state_dict()
    return {k: v.detach().clone() for k, v in state.items() if k.rpartition(".")[0] in names}


def load_adapter(model, state, kind):
    """Load an adapter_state_dict into a model that has adapters of this kind, checking its keys
    and moving its tensors to the model's device."""
    expected = set(adapter_state_dict(model, kind))
    if set(state) != expected:
        missing, extra = sorted(expected - set(state))[:3], sorted(set(state) - expected)[:3]
        raise ValueError(
            f"{kind}: the saved tensors do not fit this model (missing {missing}, "
            f"unexpected {extra}); was it made with another config?"
        )
    device = next(model.parameters()).device
    model.load_state_dict({k: t.to(device) for k, t in state.items()}, strict=False)
    return model


def rank_of(state):
    """The rank r of a saved adapter, read off its A_down (C x r)."""
    return next(t for k, t in state.items() if k.endswith("A_down")).shape[-1]


def with_motion_adapter(model, state, alpha):
    """model + the trained motion adapter at scale alpha (1: static, 0: V, < 0: more motion)."""
    model = load_adapter(add_motion_adapter(model, rank_of(state)), state, MOTION)
    return set_scale(model, alpha)
