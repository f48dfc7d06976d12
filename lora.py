"""The adapter math of Still-Moving (paper Secs. 3.2 and 3.3), and the files a run keeps.

- Motion adapter (Sec. 3.2): a LoRA on the temporal self-attention projections W_Q, W_K, W_V,
      W~ = W + alpha * A_down @ A_up,   A_down: C x r (random),  A_up: r x d_k (zero).
  alpha is a *runtime* number: alpha = 0 skips the branch, so it is exactly the base model; negative
  alpha works. Merging the adapter into W is explicit (`merge_lora`) and undone by `unmerge_lora`.
- Spatial adapter (Sec. 3.3): after each injected T2I block, over channels,
      Adapter(X) = X (I + A_down @ A_up),   A_down: C x r (random),  A_up: r x C (zero).
- The same LoRA class also serves as the optional LoRA customization of M (train.py).

Helpers follow loralib: add, remove, set the scale, mark only adapters trainable, adapter-only state
dicts. Files are written atomically and read with `torch.load(..., weights_only=True)`. A run folder
(`RunFolder`) keeps one file per stage, signed with the config fields the stage was made from, and
the results table (`results_markdown`).
"""

import math
import os
import pickle
import time
import zipfile
import zlib

import torch
import torch.nn as nn
from tqdm import tqdm

# --------------------------------------------------------------------------------- the two adapters


class LoRALinear(nn.Module):
    """An nn.Linear plus a low-rank residual: x W~ = x W + alpha * (x A_down) A_up (Eq. 1). The base
    layer is frozen by `mark_only_adapters_trainable`, not here."""

    def __init__(self, base, rank, kind):
        super().__init__()
        self.base, self.kind, self.alpha, self.merged = base, kind, 1.0, False
        device = base.weight.device
        self.A_down = nn.Parameter(torch.randn(base.in_features, rank, device=device) / rank)
        self.A_up = nn.Parameter(torch.zeros(rank, base.out_features, device=device))  # a no-op

    def delta(self):
        """alpha * A_down @ A_up, transposed to nn.Linear's (out, in) weight layout."""
        return self.alpha * (self.A_down @ self.A_up).T

    def forward(self, x):
        y = self.base(x)
        if self.alpha == 0 or self.merged:  # alpha = 0 is exactly the base layer, not "nearly"
            return y
        return y + self.alpha * ((x @ self.A_down) @ self.A_up)  # W~ = W + alpha A_down A_up


class SpatialAdapter(nn.Module):
    """Adapter(X) = X (I + A_down @ A_up) (Eq. 2), acting on the channels of a (N, C, H, W) map."""

    kind = "spatial"

    def __init__(self, channels, rank, device=None):
        super().__init__()
        self.A_down = nn.Parameter(torch.randn(channels, rank, device=device) / rank)
        self.A_up = nn.Parameter(torch.zeros(rank, channels, device=device))  # the identity at init

    def forward(self, x):
        low = torch.einsum("nchw,cr->nrhw", x, self.A_down)  # X A_down, per pixel
        return x + torch.einsum("nrhw,rc->nchw", low, self.A_up)  # X + X A_down A_up


# ------------------------------------------------------------------------------- add, scale, remove

MOTION, SPATIAL, CUSTOM = "motion", "spatial", "custom"


def add_lora(model, rank, kind, where):
    """Wrap every nn.Linear whose qualified name satisfies `where(name)` in a LoRALinear."""
    linears = [name for name, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    targets = [name for name in linears if where(name)]
    for name in targets:
        parent, child = _parent(model, name)
        setattr(parent, child, LoRALinear(getattr(parent, child), rank, kind))
    return len(targets)


NOT_INFLATED = "this model has no temporal layers: inflate it (unet3d.inflate) before adding {}"


def is_temporal_qkv(name):
    """W_Q, W_K, W_V of a temporal self-attention: where the motion adapter goes."""
    return ".temporal.attn1.to_" in name and name[-1] in "qkv"


def add_motion_adapter(model, rank):
    """The motion adapter: a LoRA on W_Q, W_K, W_V of every temporal self-attention (Sec. 3.2)."""
    n = add_lora(model, rank, MOTION, is_temporal_qkv)
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
    found = [m for m in model.modules() if isinstance(m, (LoRALinear, SpatialAdapter))]
    return [m for m in found if kind in (None, m.kind)]


def set_scale(model, alpha, kind=MOTION):
    """Set alpha on every adapter of this kind. Negative values are allowed (more motion,
    Sec. 3.2)."""
    alpha = float(alpha)
    if not math.isfinite(alpha):
        raise ValueError(f"the adapter scale must be a finite number, got {alpha}")
    for m in adapters(model, kind):
        if m.merged:
            raise RuntimeError("unmerge the adapter (lora.unmerge_lora) before changing its scale")
        m.alpha = alpha
    return model


def remove_adapters(model, kind=None):
    """Take adapters out, giving back the original module tree (a LoRA -> its base Linear, a
    spatial adapter -> Identity).

    An unmerged LoRA leaves W exactly as it was; a merged one leaves its delta folded into W (that
    is what merging is for: M1 customized by LoRA becomes a plain T2I model this way)."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, (LoRALinear, SpatialAdapter)) and kind in (None, mod.kind):
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


@torch.no_grad()
def merge_lora(model, kind):
    """Fold alpha * A_down A_up into W, explicitly. The forward then skips the branch."""
    for m in adapters(model, kind):
        if not m.merged:
            m.base.weight += m.delta()
            m.merged = True


@torch.no_grad()
def unmerge_lora(model, kind):
    """Subtract what merge_lora added: the round trip gives W back (to float rounding)."""
    for m in adapters(model, kind):
        if m.merged:
            m.base.weight -= m.delta()
            m.merged = False


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


def load_adapter_state_dict(model, state, kind):
    """Load an adapter_state_dict into a model that has adapters of this kind, checking keys."""
    expected = set(adapter_state_dict(model, kind))
    if set(state) != expected:
        missing, extra = sorted(expected - set(state))[:3], sorted(set(state) - expected)[:3]
        raise ValueError(
            f"{kind} adapter does not fit this model (missing {missing}, unexpected {extra}); "
            "was it made with another config?"
        )
    model.load_state_dict(state, strict=False)
    return model


def rank_of(state):
    """The rank r of a saved adapter, read off its A_down (C x r)."""
    return next(t for k, t in state.items() if k.endswith("A_down")).shape[-1]


def load_adapter(model, state, kind):
    """load_adapter_state_dict, with the saved tensors moved to the model's device first."""
    device = next(model.parameters()).device
    on_device = {k: t.to(device) for k, t in state.items()}
    return load_adapter_state_dict(model, on_device, kind)


def with_motion_adapter(model, state, alpha):
    """model + the trained motion adapter at scale alpha (1: static, 0: V, < 0: more motion)."""
    model = load_adapter(add_motion_adapter(model, rank_of(state)), state, MOTION)
    return set_scale(model, alpha)


# -------------------------------------------------------------------------------------------- files


class CheckpointError(RuntimeError):
    pass


class ConfigMismatch(ValueError):
    pass


def _write_atomically(path, write):
    """Write with `write(file)` to a temporary file, fsync it, then os.replace it onto `path`: a
    kill never leaves half a file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_file(obj, path):
    """A checkpoint (tensors and plain data), written atomically."""
    _write_atomically(path, lambda f: torch.save(obj, f))


def save_text(path, text):
    """A text file (results, a run's config), written atomically."""
    _write_atomically(path, lambda f: f.write(text.encode()))


def load_file(path, remedy):
    """torch.load with weights_only=True: tensors and plain data only, never code.

    `remedy` says what re-makes the file; it is part of every error message."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path} holds more than tensors (refused, it could run code): "
            f"{str(e).splitlines()[0]}. {remedy}"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(
            f"{path} is truncated or corrupt ({str(e).splitlines()[0]}). {remedy}"
        ) from None


# --------------------------------------------------------------------------- a run folder of stages


class RunFolder:
    """A run folder: config.json, ckpt/<stage>.pt per finished stage, samples/, results.

    Each stage's file is signed with the config fields it was made from: its own and those of the
    stages below it, as `stage_inputs(stage)` -> (fields, stages below) says. A stage on disk is
    reused when its signature matches, and made again when a field it depends on has changed."""

    def __init__(self, cfg, out, device, stage_inputs):
        self.cfg, self.dir, self.device = cfg, out, device
        self.stage_inputs = stage_inputs
        self.seconds = {}  # per stage, made or reused
        try:
            os.makedirs(os.path.join(out, "ckpt"), exist_ok=True)
            os.makedirs(os.path.join(out, "samples"), exist_ok=True)
        except OSError as e:
            raise ValueError(f"cannot write the output folder {out!r}: {e.strerror}") from None

    def path(self, stage):
        return os.path.join(self.dir, "ckpt", f"{stage}.pt")

    def signature(self, stage):
        """The config fields `stage` depends on, with their values, its own and its inputs'."""
        fields, below = self.stage_inputs(stage)
        signed = {}
        for other in below:
            signed.update(self.signature(other))
        for field in fields:
            value = getattr(self.cfg, field)
            signed[field] = list(value) if isinstance(value, tuple) else value
        return signed

    def read(self, path, stage, remedy):
        """The checkpoint of `stage` at `path`, and the fields of the stage's signature whose saved
        value differs from this config's, as "field=saved (now ours)"."""
        state = load_file(path, remedy)
        saved, ours = state.get("config", {}), self.signature(stage)
        changed = [
            f"{k}={saved.get(k)!r} (now {v!r})" for k, v in ours.items() if saved.get(k) != v
        ]
        return state, changed

    def load(self, path, stage):
        """Load a checkpoint of `stage`, refusing one made from other config values."""
        remake = f"re-run `python stillmoving.py --out {self.dir}` to re-make stage {stage!r}"
        state, changed = self.read(path, stage, f"Delete it and {remake}.")
        if changed:
            raise ConfigMismatch(
                f"{path} was made with another config: {', '.join(changed[:4])}; "
                f"with this config, {remake}"
            )
        return state

    def saved(self, stage, path):
        """The checkpoint at `path` if it exists and was made from this config's values of the
        stage's fields; else None, saying which field changed."""
        if not os.path.exists(path):
            return None
        remedy = f"Delete it, or start over with --fresh (stage {stage!r})."
        state, changed = self.read(path, stage, remedy)
        if changed:
            tqdm.write(f"[{stage}] made with {', '.join(changed[:4])}: making it again")
            return None
        return state

    def stage(self, name, make):
        """Return stage `name`'s saved state, making (and saving) it first unless it is on disk and
        was made from the same config fields."""
        path = self.path(name)
        state = self.saved(name, path)
        if state is not None:
            self.seconds[name] = state["seconds"]
            tqdm.write(f"[{name}] reused {path}")
            return state["state"]
        start = time.time()
        # an adapter's random init: the same whether the stages before it were made or reused
        torch.manual_seed(zlib.crc32(f"{self.cfg.seed}/{name}".encode()))
        state = make()
        self.seconds[name] = round(time.time() - start, 2)
        signed = {"config": self.signature(name), "state": state, "seconds": self.seconds[name]}
        save_file(signed, path)
        if os.path.exists(self.path(f"{name}.partial")):
            os.remove(self.path(f"{name}.partial"))
        return state


# -------------------------------------------------------------------------------- the results table


def results_markdown(results):
    """results.md: every row of the results table, the denoising gap, M1's own images and the
    claims."""
    keys = ("motion", "jitter", "direction_accuracy", "custom_fidelity", "prompt_fidelity")
    keys += ("temporal_consistency", "artifacts")
    lines = ["| method | concept | alpha | prompts | n | " + " | ".join(keys) + " |"]
    lines.append("|---" * (5 + len(keys)) + "|")
    for r in results["rows"]:
        cells = ["-" if r[k] is None else f"{r[k]:.3f}" for k in keys]
        alpha = "-" if r["alpha"] is None else r["alpha"]
        head = (
            f"| {r['method']} | {r['concept'] or '-'} | {alpha} | {r['prompts']} | {r['n_videos']}"
        )
        lines.append(f"{head} | " + " | ".join(cells) + " |")
    gaps, concepts = results["denoising_gap"], list(results["m1_images"])
    lines += [
        "",
        "Denoising gap: the diffusion loss at t = 100, 300, 500, 700, 900, with the same noise "
        "for every model (lower is better). *frozen*: frozen videos of M1's images, motion adapter "
        "at alpha = 1, what the spatial adapters train on. *moving*: real moving videos of the "
        "concept, alpha = 0, what the user wants; no model trains on them.",
        "",
        "| concept | videos | model | t=100 | t=300 | t=500 | t=700 | t=900 |",
        "|---" * 8 + "|",
    ]
    notes = []
    for c in concepts:
        for videos, losses in gaps[c].items():
            for model, loss in losses.items():
                numbers = " | ".join(f"{x:.4f}" for x in loss)
                lines.append(f"| {c} | {videos.split('_')[0]} | {model} | {numbers} |")
        frozen = _change(gaps[c]["frozen_alpha_1"])
        moving = _change(gaps[c]["moving_alpha_0"])
        notes.append(
            f"- {c}: the spatial adapters change naive injection's loss by {frozen[0]:+.1f}% at "
            f"t <= 500 and {frozen[1]:+.1f}% at t >= 700 on frozen videos (what they train on), "
            f"and by {moving[0]:+.1f}% and {moving[1]:+.1f}% on moving videos."
        )
    m1 = results["m1_images"]
    scores = [f"{c} {m1[c]['custom_fidelity']:.3f}, {m1[c]['content']:.3f}" for c in concepts]
    lines += ["", *notes, "", "M1's own images (custom_fidelity, content): " + ", ".join(scores)]
    lines += ["", "| claim | verdict | evidence |", "|---|---|---|"]
    for c in results["claims"]:
        verdict = "HOLDS" if c["holds"] else "FAILS"
        lines.append(f"| {c['id']}: {c['text']} | {verdict} | {c['evidence']} |")
    if results.get("c3_before_jitter"):
        lines += ["", "For the record, C3 as it was judged before jitter joined its symptoms:", ""]
        for c in results["c3_before_jitter"]:
            verdict = "HOLDS" if c["holds"] else "FAILS"
            lines.append(f"- {c['id']}: {verdict} ({c['evidence']})")
    return "\n".join(lines) + "\n"


def _change(gap):
    """Still-Moving's loss against naive injection's, in %, at t <= 500 and at t >= 700."""
    sm, naive = gap["still_moving"], gap["naive_injection"]
    low = 100 * (sum(sm[0:3]) / sum(naive[0:3]) - 1)
    high = 100 * (sum(sm[3:5]) / sum(naive[3:5]) - 1)
    return low, high
