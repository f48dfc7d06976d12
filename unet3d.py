"""The T2I UNet M, its inflation into the video UNet V (paper Sec. 3.1), and a tiny text encoder.

Layouts, as in AnimateDiff / lucidrains' video diffusion:
- a video is (B, C, F, H, W);
- spatial layers fold frames into the batch, (B*F, C, H, W), so every frame is seen exactly as the
  image model would see it (GroupNorm is per frame: it never pools over frames);
- temporal layers fold pixels into the batch, (B*H*W, F, C), and attend across frames.

`inflate(M)` returns V: a copy of M with a temporal module after every block with spatial
attention. The temporal module's proj_out starts at zero, so a fresh V equals M frame by frame
(pinned by a test).

Parameter names separate the parts: `.temporal.` marks V's temporal layers, `A_down`/`A_up` the
adapters (lora.py), and everything else is the T2I model (UNet + text encoder).
"""

import copy
import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# ------------------------------------------------------------------------------------------ helpers


def sinusoidal(positions, dim):
    """Transformer sinusoidal code (Vaswani et al. Sec. 3.5): (N,) positions -> (N, dim)."""
    steps = torch.arange(dim // 2, device=positions.device) / (dim // 2)
    freqs = torch.exp(-math.log(10000) * steps)
    angles = positions.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


@functools.lru_cache(maxsize=None)  # a pure function of its arguments: made once per shape
def space_time_code(frames, H, W, C, device):
    """A fixed code of where each row of the temporal layout (B*H*W, F, C) sits: sinusoidal codes of
    the frame (C/2 channels), the column x and the row y (C/4 each). (H*W, F, C).

    Without it a pixel's features cannot say where they lie nor which frame they are, so V cannot
    learn that "moving left" puts the object on the right early and on the left late: it moved, but
    in a random direction (NOTES.md, "What the toy taught us")."""
    rows, columns = torch.arange(H, device=device), torch.arange(W, device=device)
    ys, xs = torch.meshgrid(rows, columns, indexing="ij")
    x_code, y_code = sinusoidal(xs.flatten(), C // 4), sinusoidal(ys.flatten(), C // 4)
    pixel = torch.cat([x_code, y_code], dim=1)  # (H*W, C/2)
    frame = sinusoidal(torch.arange(frames, device=device), C // 2)  # (F, C/2)
    pixel_code = pixel[:, None].expand(-1, frames, -1)  # (H*W, F, C/2): the same in every frame
    frame_code = frame[None].expand(H * W, -1, -1)  # (H*W, F, C/2): the same at every pixel
    return torch.cat([pixel_code, frame_code], dim=2)


def groups(channels):
    return min(8, channels // 4)


class Attention(nn.Module):
    """Multi-head attention with separate Q, K, V projections (so adapters can wrap each one), in
    heads of `head_dim` channels: over 8 frames, small heads cost overhead, not FLOPs (NOTES.md).

    x is (N, T, C); context is (M, S, D), with M dividing N. The N // M consecutive sequences of x
    that share one context (the frames of a video, or its pixels) are attended as one sequence of
    queries: the same result, without copying K and V N // M times."""

    def __init__(self, dim, context_dim=None, head_dim=32):
        super().__init__()
        self.heads = max(1, dim // head_dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x, context=None):
        N, T, C = x.shape
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        heads = [z.view(len(context), -1, self.heads, C // self.heads) for z in (q, k, v)]
        q, k, v = (z.transpose(1, 2) for z in heads)  # (M, h, ., C/h)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(N, T, C))


class FeedForward(nn.Sequential):
    def __init__(self, dim, mult=2):
        super().__init__(nn.Linear(dim, dim * mult), nn.GELU(), nn.Linear(dim * mult, dim))


# ------------------------------------------------------------------------------------- text encoder


class TextEncoder(nn.Module):
    """Token embeddings + learned positions + pre-norm transformer layers: (B, L) ids ->
    (B, L, D)."""

    def __init__(self, vocab_size, dim, max_len, layers=1):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.pos = nn.Parameter(torch.randn(max_len, dim) * 0.02)
        self.layers = nn.ModuleList()
        for _ in range(layers):
            layer = dict(ln1=nn.LayerNorm(dim), attn=Attention(dim))
            layer.update(ln2=nn.LayerNorm(dim), ff=FeedForward(dim))
            self.layers.append(nn.ModuleDict(layer))
        self.ln_out = nn.LayerNorm(dim)

    def forward(self, tokens):
        h = self.embed(tokens) + self.pos[: tokens.shape[1]]  # (B, L, D)
        for layer in self.layers:
            h = h + layer.attn(layer.ln1(h))
            h = h + layer.ff(layer.ln2(h))
        return self.ln_out(h)


# ----------------------------------------------------------------------------- spatial (T2I) layers


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the timestep embedding added in between.
    x: (B*F, C, H, W)."""

    def __init__(self, cin, cout, temb_dim):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups(cin), cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(temb_dim, cout)
        self.norm2 = nn.GroupNorm(groups(cout), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(F.silu(temb))[:, :, None, None]
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class SpatialTransformer(nn.Module):
    """Per-frame self-attention over pixels, then cross-attention to the text, then feed-forward."""

    def __init__(self, ch, text_dim):
        super().__init__()
        self.norm, self.proj_in = nn.GroupNorm(groups(ch), ch), nn.Linear(ch, ch)
        self.ln1, self.attn1 = nn.LayerNorm(ch), Attention(ch)
        self.ln2, self.attn2 = nn.LayerNorm(ch), Attention(ch, text_dim)
        self.ln3, self.ff = nn.LayerNorm(ch), FeedForward(ch)
        self.proj_out = nn.Linear(ch, ch)

    def forward(self, x, context):
        N, C, H, W = x.shape  # N = B*F
        h = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))  # (B*F, H*W, C)
        h = h + self.attn1(self.ln1(h))
        h = h + self.attn2(self.ln2(h), context)
        h = h + self.ff(self.ln3(h))
        return x + self.proj_out(h).transpose(1, 2).reshape(N, C, H, W)


# -------------------------------------------------------------------------- temporal layer (V only)


class TemporalModule(nn.Module):
    """AnimateDiff's motion module, normalised per frame, with its own view of the text and of
    space and time.

    norm -> + space-time code -> proj_in -> self-attention over frames (sinusoidal frame code added
    to its input, as AnimateDiff does) -> cross-attention to the text (so the prompt can steer the
    direction) -> feed-forward -> proj_out (zero at init) -> residual. The motion adapter (lora.py)
    wraps attn1's to_q, to_k and to_v."""

    def __init__(self, ch, text_dim, max_frames):
        super().__init__()
        self.norm, self.proj_in = nn.GroupNorm(groups(ch), ch), nn.Linear(ch, ch)
        self.register_buffer("pos", sinusoidal(torch.arange(max_frames), ch), persistent=False)
        self.ln1, self.attn1 = nn.LayerNorm(ch), Attention(ch)
        self.ln2, self.attn2 = nn.LayerNorm(ch), Attention(ch, text_dim)
        self.ln3, self.ff = nn.LayerNorm(ch), FeedForward(ch)
        self.proj_out = nn.Linear(ch, ch)
        nn.init.zeros_(self.proj_out.weight)  # a fresh V is M, frame by frame
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x, context, frames):
        BF, C, H, W = x.shape
        B = BF // frames
        h = self.norm(x)  # per frame: GroupNorm on (B*F, C, H, W)
        h = h.view(B, frames, C, H * W).permute(0, 3, 1, 2).reshape(B, H * W, frames, C)
        h = h + space_time_code(frames, H, W, C, x.device)  # (B, H*W, F, C)
        h = self.proj_in(h.reshape(B * H * W, frames, C))  # (B*H*W, F, C)
        h = h + self.attn1(self.ln1(h) + self.pos[:frames])
        h = h + self.attn2(self.ln2(h), context)
        h = h + self.ff(self.ln3(h))
        h = self.proj_out(h)
        h = h.view(B, H * W, frames, C).permute(0, 2, 3, 1)  # (B, F, C, H*W)
        h = h.reshape(BF, C, H, W)  # back to (B*F, C, H, W)
        return x + h


# ----------------------------------------------------------------------------------------- the UNet


class Block(nn.Module):
    """One spatial block of M (ResBlock, then attention at low resolution), plus two empty slots:
    `adapter`, for the spatial adapter of Sec. 3.3, and `temporal`, filled by inflation
    (Sec. 3.1)."""

    def __init__(self, cin, cout, temb_dim, text_dim, attention):
        super().__init__()
        self.res = ResBlock(cin, cout, temb_dim)
        self.attn = SpatialTransformer(cout, text_dim) if attention else None
        self.adapter = nn.Identity()
        self.temporal = None
        self.channels = cout

    def forward(self, x, temb, context, frames):
        x = self.res(x, temb)
        if self.attn is not None:
            x = self.attn(x, context)
        x = self.adapter(x)  # X (I + A_down A_up), once adapters are added
        if self.temporal is not None:
            x = self.temporal(x, context, frames)
        return x


class UNet(nn.Module):
    """The denoising UNet (it predicts v: train.Diffusion). It is M (images) until `inflate`
    gives it temporal modules (V)."""

    def __init__(self, vocab, size, max_words, ch=32, mults=(1, 2), text_dim=64, max_frames=16):
        super().__init__()
        self.size, self.ch, self.max_frames, self.text_dim = size, ch, max_frames, text_dim
        if size % 2 ** (len(mults) - 1):
            raise ValueError(
                f"size {size} must be divisible by {2 ** (len(mults) - 1)} for {len(mults)} levels"
            )
        temb = 4 * ch
        self.text = TextEncoder(vocab, text_dim, max_words)
        self.time_mlp = nn.Sequential(nn.Linear(ch, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        chans, last = [ch * m for m in mults], len(mults) - 1
        self.down, self.downsample, c = nn.ModuleList(), nn.ModuleList(), ch
        for i, cout in enumerate(chans):
            # attention (and so, in V, a temporal module) only below full resolution
            self.down.append(Block(c, cout, temb, text_dim, attention=i > 0))
            if i < last:
                self.downsample.append(nn.Conv2d(cout, cout, 3, stride=2, padding=1))
            else:
                self.downsample.append(nn.Identity())
            c = cout
        self.mid = Block(c, c, temb, text_dim, attention=True)
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for i, cout in reversed(list(enumerate(chans))):
            self.up.append(Block(c + cout, cout, temb, text_dim, attention=i > 0))
            if i > 0:
                double = nn.Conv2d(cout, cout, 3, padding=1)
                self.upsample.append(nn.Sequential(nn.Upsample(scale_factor=2), double))
            else:
                self.upsample.append(nn.Identity())
            c = cout
        self.norm_out, self.conv_out = nn.GroupNorm(groups(c), c), nn.Conv2d(c, 3, 3, padding=1)

    def blocks(self):
        return [*self.down, self.mid, *self.up]

    def temporal_blocks(self):
        """The blocks with a temporal module: none in M; in V, those with spatial attention."""
        return [block for block in self.blocks() if block.temporal is not None]

    def check(self, x, t, tokens):
        """One shape check at the door, with a message a user can act on."""
        if x.dim() != 5 or x.shape[1] != 3 or x.shape[-2:] != (self.size, self.size):
            raise ValueError(
                f"expected a (B, 3, H, W) image or (B, 3, F, H, W) video with H = W = {self.size}, "
                f"got {tuple(x.shape)}"
            )
        if x.shape[2] > self.max_frames:
            raise ValueError(
                f"{x.shape[2]} frames, but the frame-position code covers at most {self.max_frames}"
            )
        if t.shape != (x.shape[0],) or tokens.dim() != 2 or tokens.shape[0] != x.shape[0]:
            raise ValueError(
                f"t must be (B,) and tokens (B, L) with B = {x.shape[0]}; "
                f"got {tuple(t.shape)} and {tuple(tokens.shape)}"
            )

    def forward(self, x, t, tokens):
        """x: (B, 3, H, W) or (B, 3, F, H, W); t: (B,) timesteps; tokens: (B, L). Returns the
        prediction (v: train.Diffusion), shaped as x."""
        image = x.dim() == 4
        if image:
            x = x[:, :, None]
        self.check(x, t, tokens)
        B, C, Fr, H, W = x.shape
        h = x.transpose(1, 2).reshape(B * Fr, C, H, W)  # (B*F, C, H, W): frames into the batch
        temb = self.time_mlp(sinusoidal(t, self.ch)).repeat_interleave(Fr, dim=0)  # (B*F, 4ch)
        context = self.text(tokens)  # (B, L, D), shared by the frames (and pixels) of each video
        h, skips = self.conv_in(h), []
        for block, down in zip(self.down, self.downsample):
            h = block(h, temb, context, Fr)
            skips.append(h)
            h = down(h)
        h = self.mid(h, temb, context, Fr)
        for block, up in zip(self.up, self.upsample):
            h = up(block(torch.cat([h, skips.pop()], dim=1), temb, context, Fr))
        out = self.conv_out(F.silu(self.norm_out(h)))
        out = out.view(B, Fr, C, H, W).transpose(1, 2)  # (B, 3, F, H, W)
        return out[:, :, 0] if image else out


def inflate(m):
    """V from M (Sec. 3.1): a copy with a temporal module after each block that has spatial
    attention, i.e. below full resolution. M is untouched. (Temporal modules at full resolution too
    cost a third of V's training step here, and V moved as well without them: NOTES.md,
    Performance.)"""
    v = copy.deepcopy(m)
    device = next(m.parameters()).device
    for block in v.blocks():
        if block.attn is not None:
            block.temporal = TemporalModule(block.channels, v.text_dim, v.max_frames).to(device)
    return v


def is_temporal(name):
    return ".temporal." in name


def is_adapter(name):
    return "A_down" in name or "A_up" in name


def t2i_state_dict(model):
    """The T2I part (spatial UNet + text encoder) of M, M1 or V: what "injection" copies."""
    state = model.state_dict()
    return {k: v for k, v in state.items() if not is_temporal(k) and not is_adapter(k)}
