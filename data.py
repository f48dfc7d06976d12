"""The synthetic world: moving shapes, two custom concepts, and metrics that know the ground truth.

Still-Moving (Chefer et al. 2024) is about videos of a *custom* subject or style that keep a video
model's motion. Real data cannot tell us whether a generated clip "shows the subject", so we build a
world where the renderer *is* the truth:

- a video is one shape (circle, square, triangle) of one colour moving at constant speed in one of four
  directions, captioned "a red circle moving left";
- the custom **subject** is a two-tone star, named by the rare token "sks" ("a sks object");
- the custom **style** draws the shape on a light grey ground instead of black, named by "zxq" ("a red
  circle in zxq style"). It changes every pixel of the frame, as a palette or texture style does, which is
  the kind of customization that moves the features V's temporal layers read the most (PAPER.md).

The base models never see either concept. The metrics at the bottom classify each generated frame by
matching it against this renderer's templates, so "fidelity" is a measured fact, not a learned score.

Run `python -m pytest -q -k render` to check the renderer; there is no entry point here.
"""
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image

# ----------------------------------------------------------------------------- vocabulary

COLORS = {"red": (1.0, 0.15, 0.15), "green": (0.15, 0.9, 0.2), "blue": (0.2, 0.35, 1.0), "yellow": (1.0, 0.9, 0.1)}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy), y points down
SUBJECT_COLORS = ((1.0, 0.5, 0.0), (0.0, 0.85, 0.9))  # the two tones of the "sks" star: orange, cyan centre
SUBJECT_TOKEN, STYLE_TOKEN = "sks", "zxq"
PAD = "<pad>"
VOCAB = [PAD, "a", *COLORS, *SHAPES, "moving", *DIRECTIONS, "in", "style", "object", SUBJECT_TOKEN, STYLE_TOKEN]
MAX_WORDS = 8  # "a red circle in zxq style moving left"
STYLE_BACKGROUND = (0.85, 0.85, 0.85)  # the custom style's ground; every other clip is drawn on black
FG_THRESHOLD = 0.35  # a pixel is foreground when some channel differs from the background by more than this


def tokenize(prompts):
    """Word-level tokenizer: a list of prompts -> (B, MAX_WORDS) token ids, padded with <pad> (id 0).

    The empty prompt "" is all padding: it is the null prompt of classifier-free guidance."""
    ids = []
    for prompt in prompts:
        words = prompt.lower().split()
        unknown = [w for w in words if w not in VOCAB or w == PAD]
        if unknown:
            raise ValueError(f"unknown word {unknown[0]!r} in prompt {prompt!r}; "
                             f"the vocabulary is: {' '.join(VOCAB[1:])}")
        if len(words) > MAX_WORDS:
            raise ValueError(f"prompt {prompt!r} has {len(words)} words; at most {MAX_WORDS} fit")
        ids.append([VOCAB.index(w) for w in words] + [0] * (MAX_WORDS - len(words)))
    return torch.tensor(ids, dtype=torch.long)


# ----------------------------------------------------------------------------- what a clip shows


@dataclass(frozen=True)
class Clip:
    """What one video shows. kind is a base shape or "subject"; style=True is the custom style."""
    kind: str
    color: str
    direction: str
    style: bool = False

    @property
    def concept(self):
        return "subject" if self.kind == "subject" else "style" if self.style else None

    def image_prompt(self):
        if self.kind == "subject":
            return f"a {SUBJECT_TOKEN} object"
        return f"a {self.color} {self.kind}" + (f" in {STYLE_TOKEN} style" if self.style else "")

    def prompt(self):
        return f"{self.image_prompt()} moving {self.direction}"


def random_clip(rng, concept=None):
    """An ordinary clip (concept=None), or one of the "subject" or "style" concept."""
    color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
    direction = rng.choice(list(DIRECTIONS))
    if concept == "subject":
        return Clip("subject", "subject", direction)
    return Clip(shape, color, direction, style=concept == "style")


# ----------------------------------------------------------------------------- rendering


def radius(size):
    return 0.2 * size  # every shape has the same size, so only its identity and position vary


def speed(size, frames):
    """Pixels per frame: a clip travels 35% of the frame side (0.8 px/frame at 16 px x 8 frames)."""
    return 0.35 * size / (frames - 1)


def _inside(kind, dx, dy, r):
    """Boolean mask of the points (dx, dy) from the centre that lie inside a shape of radius r."""
    if kind == "circle":
        return dx ** 2 + dy ** 2 <= r ** 2
    if kind == "square":
        return np.maximum(abs(dx), abs(dy)) <= 0.85 * r
    if kind == "triangle":  # equilateral, pointing up, centroid at the centre, circumradius 1.3 r (area ~ a circle's 70%)
        normals = [(0.0, 1.0), (-0.866, -0.5), (0.866, -0.5)]
        return np.all([dx * nx + dy * ny <= 0.65 * r for nx, ny in normals], axis=0)
    if kind == "subject":  # a five-pointed star, tip up
        phase = ((np.arctan2(dy, dx) + np.pi / 2) % (2 * np.pi / 5)) / (2 * np.pi / 5)
        edge = 0.55 * r + 0.6 * r * np.abs(2 * phase - 1)  # 1.15 r at the tips, 0.55 r between them
        return np.hypot(dx, dy) <= edge
    raise ValueError(f"unknown shape {kind!r}")


def render(clip, cx, cy, size, background=None, supersample=4):
    """One anti-aliased RGB frame (3, size, size) in [0, 1]: the clip's shape centred at (cx, cy) px, on
    its own ground (light for the style, else black) unless `background` (an RGB triple) is given.

    Drawn at `supersample` times the resolution, then box-filtered down."""
    n = size * supersample
    grid = (np.arange(n) + 0.5) / supersample
    dx, dy = grid[None, :] - cx, grid[:, None] - cy  # (n, n) each, broadcast
    r = radius(size)
    inside = _inside(clip.kind, dx, dy, r)
    if clip.kind == "subject":
        outer, centre = np.array(SUBJECT_COLORS[0]), np.array(SUBJECT_COLORS[1])
        color = np.where((dx ** 2 + dy ** 2 <= (0.5 * r) ** 2)[None], centre[:, None, None], outer[:, None, None])
    else:
        color = np.array(COLORS[clip.color])[:, None, None]
    if background is None:
        background = STYLE_BACKGROUND if clip.style else (0.0, 0.0, 0.0)
    image = np.where(inside[None], color, np.asarray(background, dtype=np.float64)[:, None, None])  # (3, n, n)
    return image.reshape(3, size, supersample, size, supersample).mean((2, 4)).astype(np.float32)


def trajectory(clip, size, frames, seed):
    """The clip's F centre positions (x, y): constant speed, inside the frame. The seed picks the start."""
    rng = np.random.default_rng(seed)
    (ux, uy), v, margin = DIRECTIONS[clip.direction], speed(size, frames), 1.35 * radius(size)  # the triangle's tip reaches 1.3 r
    travel = v * (frames - 1)
    lo = np.array([margin + travel * (ux < 0), margin + travel * (uy < 0)])
    hi = np.array([size - margin - travel * (ux > 0), size - margin - travel * (uy > 0)])
    x0, y0 = rng.uniform(lo, hi)
    return [(x0 + ux * v * f, y0 + uy * v * f) for f in range(frames)]


def render_video(clip, size, frames, seed):
    """A (3, F, size, size) video in [0, 1]: the clip moving along its trajectory. A pure function of
    its arguments."""
    return np.stack([render(clip, x, y, size) for x, y in trajectory(clip, size, frames, seed)], axis=1)


# ----------------------------------------------------------------------------- batches (model space is [-1, 1])


def to_model(x):
    return torch.from_numpy(np.asarray(x)) * 2 - 1


def video_batch(clips, size, frames, seed):
    """(B, 3, F, H, W) videos in [-1, 1] and their motion captions, for T2V training."""
    videos = [render_video(c, size, frames, [seed, i]) for i, c in enumerate(clips)]
    return to_model(np.stack(videos)), [c.prompt() for c in clips]


def repeat_frames(images, frames):
    """A frozen video of each (B, C, H, W) image: the image repeated F times, (B, C, F, H, W) (a view)."""
    return images[:, :, None].expand(-1, -1, frames, -1, -1)


def freeze(videos, rng):
    """Frozen videos (Sec 3.2): one random frame of each (B, C, F, H, W) video, repeated F times."""
    B, C, F, H, W = videos.shape
    pick = torch.from_numpy(rng.integers(0, F, size=B))
    return repeat_frames(videos[torch.arange(B), :, pick], F).contiguous()  # the picked frames are (B, C, H, W)


def image_batch(clips, size, frames, seed):
    """(B, 3, H, W) still images in [-1, 1]: a random frame of each clip's video (the frame that
    `freeze` would pick; only that one is rendered), with image captions."""
    picks = np.random.default_rng(seed).integers(0, frames, size=len(clips))
    images = [render(c, *trajectory(c, size, frames, [seed, i])[f], size) for i, (c, f) in enumerate(zip(clips, picks))]
    return to_model(np.stack(images)), [c.image_prompt() for c in clips]


def random_batch(rng, n, size, frames, video, device="cpu"):
    """n random ordinary clips as training data, with their captions tokenized: (B, 3, F, H, W) moving
    videos ("a red circle moving left"), or one frame of each, (B, 3, H, W) ("a red circle")."""
    make = video_batch if video else image_batch
    x, prompts = make([random_clip(rng) for _ in range(n)], size, frames, int(rng.integers(2 ** 31)))
    return x.to(device), tokenize(prompts).to(device)


def shift(images, rng):
    """Move the shape of each (B, 3, H, W) still to a random place where it stays whole (augmentation), so that
    M1 learns the concept's look rather than where its few stills put it. The roll wraps only the still's own
    ground around, pixels within 0.01 of it (light or black: black padding once drew stripes that M1 learned).
    With shifts of at most 2 px, the style's M1 drew each colour x shape where its one still had it, and the
    videos made with M1 stayed there (README, finding 11)."""
    moved = torch.empty_like(images)
    for b, image in enumerate(images):
        frame = ((image + 1) / 2).numpy()
        ys, xs = np.nonzero(_foreground(frame, background(frame)) > 0.01)  # the shape, anti-aliased edge included
        if len(ys) == 0:  # nothing drawn, nothing to move
            moved[b] = image
            continue
        dy = int(rng.integers(-ys.min(), frame.shape[1] - ys.max()))  # the shape's rows stay in 0..H-1
        dx = int(rng.integers(-xs.min(), frame.shape[2] - xs.max()))
        moved[b] = torch.roll(image, (dy, dx), dims=(1, 2))
    return moved


def concept_stills(concept, n, size, frames, seed):
    """The few still images a user brings to customize M (DreamBooth / StyleDrop): fixed by the seed.

    A style is shown on varied content: its stills go through every colour x shape in a seed-fixed order
    (12 stills: each once). Drawn at random instead, seed 1's twelve had no green shape and no red square,
    and only 0.53 of M1's style images had the prompted colour and shape (README, finding 4)."""
    rng = np.random.default_rng([seed, 7])
    clips = [random_clip(rng, concept) for _ in range(n)]
    if concept == "style":
        contents = [(kind, color) for kind in SHAPES for color in COLORS]
        order = rng.permutation(len(contents))
        for i, clip in enumerate(clips):
            kind, color = contents[order[i % len(contents)]]
            clips[i] = replace(clip, kind=kind, color=color)
    return image_batch(clips, size, frames, seed + 7)


# ----------------------------------------------------------------------------- metrics

_TEMPLATES = [Clip(s, c, "left") for s in SHAPES for c in COLORS] + [Clip("subject", "subject", "left")]


def background(frame):
    """The ground colour of a (3, H, W) frame: its per-channel median (a shape covers ~1/8 of the frame)."""
    return np.median(frame.reshape(3, -1), axis=1)


def _foreground(frame, ground):
    """(H, W): how far each pixel is from the ground colour, in its most different channel."""
    return np.abs(frame - ground[:, None, None]).max(0)


def _centroid(frame, ground):
    """Foreground centroid (x, y) of a (3, H, W) frame, weighted by distance from the ground; None if empty."""
    weight = np.clip(_foreground(frame, ground) - FG_THRESHOLD, 0, None)
    if weight.sum() < 0.5:
        return None
    ys, xs = np.indices(weight.shape) + 0.5
    return np.array([(xs * weight).sum(), (ys * weight).sum()]) / weight.sum()


def classify(frame):
    """What a (3, H, W) frame in [0, 1] shows, and its stray pixels.

    Every base shape x colour, and the subject, is rendered at the foreground centroid on the frame's
    own ground; the one with the least squared error wins, and a light ground marks the style. Stray
    pixels are foreground pixels more than one pixel away from the winner's shape: the artifacts.
    Returns (Clip or None, stray share of the background, centre)."""
    ground = background(frame)
    centre = _centroid(frame, ground)
    if centre is None:
        return None, 0.0, None
    renders = np.stack([render(t, *centre, frame.shape[-1], background=ground) for t in _TEMPLATES])
    best = int(((renders - frame[None]) ** 2).sum((1, 2, 3)).argmin())
    shape = torch.from_numpy(_foreground(renders[best], ground) > 0.05)[None].float()
    far = torch.nn.functional.max_pool2d(shape, 3, 1, 1)[0].numpy() == 0
    stray = (_foreground(frame, ground) > FG_THRESHOLD) & far
    label = replace(_TEMPLATES[best], style=bool(ground.mean() > 0.5))
    return label, float(stray.sum() / max(1, far.sum())), centre


def matches(label, clip):
    """Whether a classified frame shows the clip's concept (the subject, or the style's light ground),
    its colour and its shape."""
    found = label is not None
    return {"custom": found and (label.kind == "subject" if clip.concept == "subject" else label.style),
            "color": found and label.color == clip.color, "shape": found and label.kind == clip.kind}


def video_metrics(video, clip):
    """The metrics of one generated (3, F, H, W) video in [0, 1] against the clip it was prompted with.

    - motion: how far the object travels, in pixels per frame: the net displacement of the foreground
      centroid from the first to the last frame where it is found, divided by the frames in between.
    - jitter: the rest of its frame-to-frame movement, which goes nowhere: mean step minus motion. A
      generated still video wobbles by ~0.2 px a frame here while travelling ~0.05 (README).
    - direction: 1 if the net displacement points the prompted way (more than 1 px along it, and more
      than across it), else 0.
    - custom_fidelity: share of frames that show the concept; None for ordinary prompts.
    - prompt_fidelity: mean of the matches of the prompt's non-custom words: colour and shape (share of
      frames) where the prompt names them, and direction.
    - temporal_consistency: share of consecutive frame pairs classified the same (shape, colour, ground).
    - artifacts: mean share of background pixels that are foreground (stray pixels)."""
    frames = [video[:, f] for f in range(video.shape[1])]
    labels, stray, centres = zip(*(classify(f) for f in frames))
    known = [(f, c) for f, c in enumerate(centres) if c is not None]
    steps = [np.linalg.norm(b - a) for a, b in zip(centres, centres[1:]) if a is not None and b is not None]
    net = known[-1][1] - known[0][1] if len(known) >= 2 else np.zeros(2)
    travel = float(np.linalg.norm(net) / (known[-1][0] - known[0][0])) if len(known) >= 2 else 0.0
    (ux, uy) = DIRECTIONS[clip.direction]
    along, across = net[0] * ux + net[1] * uy, abs(net[0] * uy - net[1] * ux)
    direction = float(along > 1.0 and along > across)
    found = [matches(l, clip) for l in labels]
    words = [direction] + ([] if clip.kind == "subject" else [np.mean([f[k] for f in found]) for k in ("color", "shape")])
    return {"motion": travel, "jitter": max(0.0, float(np.mean(steps)) - travel) if steps else 0.0, "direction_accuracy": direction,
            "custom_fidelity": float(np.mean([f["custom"] for f in found])) if clip.concept else None,
            "prompt_fidelity": float(np.mean(words)),
            "temporal_consistency": float(np.mean([a is not None and a == b for a, b in zip(labels, labels[1:])])),
            "artifacts": float(np.mean(stray))}


def image_metrics(image, clip):
    """The concept and the content (colour and shape both right) of one generated (3, H, W) image."""
    found = matches(classify(image)[0], clip)
    return {"custom_fidelity": float(found["custom"]), "content": float(found["color"] and found["shape"])}


def summarize(per_video, seed=0, resamples=1000):
    """Mean and bootstrap 95% interval (over videos) of each metric in a list of video_metrics dicts."""
    rng, out, ci = np.random.default_rng(seed), {}, {}
    for key in per_video[0]:
        if per_video[0][key] is None:
            out[key] = None
            continue
        values = np.array([m[key] for m in per_video], dtype=np.float64)
        means = values[rng.integers(0, len(values), (resamples, len(values)))].mean(1)
        out[key] = float(values.mean())
        ci[key] = [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]
    return {**out, "ci95": ci}


# ----------------------------------------------------------------------------- pictures and tables


def save_gif(path, grid, scale=4, fps=6):
    """Write a (rows, cols, 3, F, H, W) grid of videos in [0, 1] as an animated GIF, upscaled nearest."""
    frames = [Image.fromarray(_tile(grid[:, :, :, f], scale)) for f in range(grid.shape[3])]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=int(1000 / fps), loop=0)


def save_strip(path, grid, scale=4):
    """Write a (rows, cols, 3, F, H, W) grid as one PNG: each video's frames side by side (a filmstrip)."""
    rows, cols, C, F, H, W = grid.shape
    strip = grid.transpose(0, 1, 3, 2, 4, 5).reshape(rows, cols * F, C, H, W)  # frames become columns
    Image.fromarray(_tile(strip, scale)).save(path)


def _tile(images, scale, pad=1):
    """(rows, cols, 3, H, W) in [0, 1] -> one uint8 (H', W', 3) picture with grey gutters."""
    rows, cols, C, H, W = images.shape
    canvas = np.full((rows * (H + pad) + pad, cols * (W + pad) + pad, 3), 0.3, dtype=np.float32)
    for i in range(rows):
        for j in range(cols):
            y, x = pad + i * (H + pad), pad + j * (W + pad)
            canvas[y:y + H, x:x + W] = np.asarray(images[i, j]).transpose(1, 2, 0)
    canvas = canvas.repeat(scale, 0).repeat(scale, 1)
    return (np.clip(canvas, 0, 1) * 255).astype(np.uint8)


def results_markdown(results):
    """results.md: every row of the results table, the denoising gap, M1's own images and the claims."""
    keys = ("motion", "jitter", "direction_accuracy", "custom_fidelity", "prompt_fidelity", "temporal_consistency", "artifacts")
    lines = ["| method | concept | alpha | prompts | n | " + " | ".join(keys) + " |", "|---" * (5 + len(keys)) + "|"]
    for r in results["rows"]:
        cells = ["-" if r[k] is None else f"{r[k]:.3f}" for k in keys]
        lines.append(f"| {r['method']} | {r['concept'] or '-'} | {'-' if r['alpha'] is None else r['alpha']} | "
                     f"{r['prompts']} | {r['n_videos']} | " + " | ".join(cells) + " |")
    gaps, concepts = results["denoising_gap"], list(results["m1_images"])
    lines += ["", "Denoising gap: the diffusion loss at t = 100, 300, 500, 700, 900, with the same noise for every model "
              "(lower is better). *frozen*: frozen videos of M1's images, motion adapter at alpha = 1, what the spatial "
              "adapters train on. *moving*: real moving videos of the concept, alpha = 0, what the user wants; no model "
              "trains on them.", "", "| concept | videos | model | t=100 | t=300 | t=500 | t=700 | t=900 |", "|---" * 8 + "|"]
    notes = []
    for c in concepts:
        for videos, losses in gaps[c].items():
            lines += [f"| {c} | {videos.split('_')[0]} | {model} | " + " | ".join(f"{x:.4f}" for x in loss) + " |"
                      for model, loss in losses.items()]
        change = lambda g, ts: 100 * (sum(g["still_moving"][ts]) / sum(g["naive_injection"][ts]) - 1)
        frozen, moving = gaps[c]["frozen_alpha_1"], gaps[c]["moving_alpha_0"]
        notes.append(f"- {c}: the spatial adapters change naive injection's loss by {change(frozen, slice(0, 3)):+.1f}% at "
                     f"t <= 500 and {change(frozen, slice(3, 5)):+.1f}% at t >= 700 on frozen videos (what they train on), "
                     f"and by {change(moving, slice(0, 3)):+.1f}% and {change(moving, slice(3, 5)):+.1f}% on moving videos.")
    m1 = results["m1_images"]
    lines += ["", *notes, "", "M1's own images (custom_fidelity, content): " +
              ", ".join(f"{c} {m1[c]['custom_fidelity']:.3f}, {m1[c]['content']:.3f}" for c in concepts)]
    lines += ["", "| claim | verdict | evidence |", "|---|---|---|"]
    lines += [f"| {c['id']}: {c['text']} | {'HOLDS' if c['holds'] else 'FAILS'} | {c['evidence']} |" for c in results["claims"]]
    return "\n".join(lines) + "\n"
