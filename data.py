"""The synthetic world: moving shapes, two custom concepts, and metrics that know the ground truth.

Still-Moving (Chefer et al. 2024) is about videos of a *custom* subject or style that keep a video
model's motion. Real data cannot tell us whether a generated clip "shows the subject", so we build a
world where the renderer *is* the truth:

- a video is one shape (circle, square, triangle) of one colour moving at constant speed in one of
  four directions, captioned "a red circle moving left";
- the custom **subject** is a two-tone star, named by the rare token "sks" ("a sks object");
- the custom **style** draws the shape on a grey ground instead of black (its grey is a config
  field, `style_ground`), named by "zxq" ("a red circle in zxq style"). It changes every pixel of
  the frame, as a palette or texture style does: the kind of customization that moves the features
  V's temporal layers read the most, and the lighter the grey, the further it moves them.

The base models never see either concept. The metrics classify each generated frame by matching it
against this renderer's templates, so "fidelity" is a measured fact, not a learned score. How the
claims are judged from these metrics lives with the method, in stillmoving.py.

Run `python -m pytest -q -k render` to check the renderer; there is no entry point here.
"""

from dataclasses import dataclass, replace

import numpy as np
import torch

# --------------------------------------------------------------------------------------- vocabulary

COLORS = {
    "red": (1.0, 0.15, 0.15),
    "green": (0.15, 0.9, 0.2),
    "blue": (0.2, 0.35, 1.0),
    "yellow": (1.0, 0.9, 0.1),
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy); y down
SUBJECT_COLORS = ((1.0, 0.5, 0.0), (0.0, 0.85, 0.9))  # the "sks" star: orange, a cyan centre
SUBJECT_TOKEN, STYLE_TOKEN = "sks", "zxq"
PAD = "<pad>"
WORDS = ["a", *COLORS, *SHAPES, "moving", *DIRECTIONS, "in", "style", "object"]
VOCAB = [PAD, *WORDS, SUBJECT_TOKEN, STYLE_TOKEN]
MAX_WORDS = 8  # "a red circle in zxq style moving left"
STYLE_SEEN = 0.1  # a frame's ground is the style's when its grey is above this: not black
FG_THRESHOLD = 0.35  # foreground: some channel differs from the background by more than this


# Each set of data a run draws is a random stream of its own, seeded by (cfg.seed, its number): the
# stills a user brings, M's prior images (DreamBooth), M1's images (the frozen videos' content), the
# prior videos (Sec. 3.3) and the evaluation's prompts and noise. Resizing one set never moves the
# draws of another.
STILLS, PRIOR_IMAGES, M1_IMAGES, PRIOR_VIDEOS, EVALUATION = 7, 11, 12, 40, 1000


def tokenize(prompts):
    """Word-level tokenizer: a list of prompts -> (B, MAX_WORDS) token ids, padded with <pad> (0).

    The empty prompt "" is all padding: it is the null prompt of classifier-free guidance."""
    ids = []
    for prompt in prompts:
        words = prompt.lower().split()
        unknown = [w for w in words if w not in VOCAB or w == PAD]
        if unknown:
            raise ValueError(
                f"unknown word {unknown[0]!r} in prompt {prompt!r}; "
                f"the vocabulary is: {' '.join(VOCAB[1:])}"
            )
        if len(words) > MAX_WORDS:
            raise ValueError(f"prompt {prompt!r} has {len(words)} words; at most {MAX_WORDS} fit")
        ids.append([VOCAB.index(w) for w in words] + [0] * (MAX_WORDS - len(words)))
    return torch.tensor(ids, dtype=torch.long)


# -------------------------------------------------------------------------------- what a clip shows


@dataclass(frozen=True)
class Clip:
    """What one video shows: a base shape or "subject", its colour, its direction, and the grey of
    its ground (0: black, as every ordinary clip; the custom style's grey, or what a classified
    frame's ground measured)."""

    kind: str
    color: str
    direction: str
    ground: float = 0.0

    @property
    def style(self):
        return self.ground > STYLE_SEEN

    @property
    def concept(self):
        if self.kind == "subject":
            return "subject"
        return "style" if self.style else None

    def look(self):
        """What the classifier tells apart: shape, colour and whether the ground is the style's."""
        return self.kind, self.color, self.style

    def image_prompt(self):
        if self.kind == "subject":
            return f"a {SUBJECT_TOKEN} object"
        return f"a {self.color} {self.kind}" + (f" in {STYLE_TOKEN} style" if self.style else "")

    def prompt(self):
        return f"{self.image_prompt()} moving {self.direction}"


def random_clip(rng, concept=None, style_ground=None):
    """An ordinary clip (concept=None), or one of the "subject" or "style" concept; a style clip is
    drawn on the grey `style_ground`."""
    color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
    direction = rng.choice(list(DIRECTIONS))
    if concept == "subject":
        return Clip("subject", "subject", direction)
    if concept == "style":
        if style_ground is None or not style_ground > STYLE_SEEN:
            raise ValueError(f"a style clip needs a ground grey above {STYLE_SEEN}")
        return Clip(shape, color, direction, style_ground)
    return Clip(shape, color, direction)


def concept_of(prompt):
    """The concept a prompt names by its rare word, or None."""
    words = prompt.split()
    if SUBJECT_TOKEN in words:
        return "subject"
    return "style" if STYLE_TOKEN in words else None


# ---------------------------------------------------------------------------------------- rendering


def radius(size):
    return 0.2 * size  # every shape has the same size, so only its identity and position vary


def speed(size, frames):
    """Pixels per frame: a clip travels 35% of the frame side (0.8 px/frame at 16 px x 8 frames)."""
    return 0.35 * size / (frames - 1)


def _inside(kind, dx, dy, r):
    """Boolean mask of the points (dx, dy) from the centre that lie inside a shape of radius r."""
    if kind == "circle":
        return dx**2 + dy**2 <= r**2
    if kind == "square":
        return np.maximum(abs(dx), abs(dy)) <= 0.85 * r
    if kind == "triangle":
        # equilateral, pointing up, centroid at the centre, circumradius 1.3 r (70% of a circle)
        normals = [(0.0, 1.0), (-0.866, -0.5), (0.866, -0.5)]
        return np.all([dx * nx + dy * ny <= 0.65 * r for nx, ny in normals], axis=0)
    if kind == "subject":  # a five-pointed star, tip up
        phase = ((np.arctan2(dy, dx) + np.pi / 2) % (2 * np.pi / 5)) / (2 * np.pi / 5)
        edge = 0.55 * r + 0.6 * r * np.abs(2 * phase - 1)  # 1.15 r at the tips, 0.55 r between
        return np.hypot(dx, dy) <= edge
    raise ValueError(f"unknown shape {kind!r}")


def render(clip, cx, cy, size, background=None, supersample=4):
    """One anti-aliased RGB frame (3, size, size) in [0, 1]: the clip's shape centred at (cx, cy)
    px, on its own grey ground unless `background` (an RGB triple) is given. Drawn at `supersample`
    times the resolution, then box-filtered down."""
    n = size * supersample
    grid = (np.arange(n) + 0.5) / supersample
    dx, dy = grid[None, :] - cx, grid[:, None] - cy  # (n, n) each, broadcast
    r = radius(size)
    inside = _inside(clip.kind, dx, dy, r)
    if clip.kind == "subject":
        outer = np.array(SUBJECT_COLORS[0])[:, None, None]
        centre = np.array(SUBJECT_COLORS[1])[:, None, None]
        color = np.where((dx**2 + dy**2 <= (0.5 * r) ** 2)[None], centre, outer)
    else:
        color = np.array(COLORS[clip.color])[:, None, None]
    if background is None:
        background = (clip.ground,) * 3
    ground = np.asarray(background, dtype=np.float64)[:, None, None]
    image = np.where(inside[None], color, ground)  # (3, n, n)
    return image.reshape(3, size, supersample, size, supersample).mean((2, 4)).astype(np.float32)


def trajectory(clip, size, frames, seed):
    """The clip's F centre positions (x, y): constant speed, inside the frame. The seed picks the
    start."""
    rng = np.random.default_rng(seed)
    (ux, uy), v = DIRECTIONS[clip.direction], speed(size, frames)
    margin = 1.35 * radius(size)  # the triangle's tip reaches 1.3 r
    travel = v * (frames - 1)
    lo = np.array([margin + travel * (ux < 0), margin + travel * (uy < 0)])
    hi = np.array([size - margin - travel * (ux > 0), size - margin - travel * (uy > 0)])
    x0, y0 = rng.uniform(lo, hi)
    return [(x0 + ux * v * f, y0 + uy * v * f) for f in range(frames)]


def render_video(clip, size, frames, seed):
    """A (3, F, size, size) video in [0, 1]: the clip moving along its trajectory. A pure function
    of its arguments."""
    positions = trajectory(clip, size, frames, seed)
    return np.stack([render(clip, x, y, size) for x, y in positions], axis=1)


# ----------------------------------------------------------------------------- batches (in [-1, 1])


def to_model(x):
    return torch.from_numpy(np.asarray(x)) * 2 - 1


def video_batch(clips, size, frames, seed):
    """(B, 3, F, H, W) videos in [-1, 1] and their motion captions, for T2V training."""
    videos = [render_video(c, size, frames, [seed, i]) for i, c in enumerate(clips)]
    return to_model(np.stack(videos)), [c.prompt() for c in clips]


def repeat_frames(images, frames):
    """A frozen video of each (B, C, H, W) image: it repeated F times, (B, C, F, H, W) (a view)."""
    return images[:, :, None].expand(-1, -1, frames, -1, -1)


def freeze(videos, rng):
    """Frozen videos (Sec 3.2): one random frame of each (B, C, F, H, W) video, repeated F times."""
    B, C, F, H, W = videos.shape
    pick = torch.from_numpy(rng.integers(0, F, size=B))
    picked = videos[torch.arange(B), :, pick]  # (B, C, H, W)
    return repeat_frames(picked, F).contiguous()


def image_batch(clips, size, frames, seed):
    """(B, 3, H, W) still images in [-1, 1]: a random frame of each clip's video (the frame that
    `freeze` would pick; only that one is rendered), with image captions."""
    picks = np.random.default_rng(seed).integers(0, frames, size=len(clips))
    images = []
    for i, (clip, f) in enumerate(zip(clips, picks)):
        x, y = trajectory(clip, size, frames, [seed, i])[f]
        images.append(render(clip, x, y, size))
    return to_model(np.stack(images)), [c.image_prompt() for c in clips]


def random_batch(rng, n, size, frames, video, device="cpu"):
    """n random ordinary clips as training data, with their captions tokenized: (B, 3, F, H, W)
    moving videos ("a red circle moving left"), or one frame of each, (B, 3, H, W) ("a red
    circle")."""
    make = video_batch if video else image_batch
    clips = [random_clip(rng) for _ in range(n)]
    x, prompts = make(clips, size, frames, int(rng.integers(2**31)))
    return x.to(device), tokenize(prompts).to(device)


def shift(images, rng):
    """Move the shape of each (B, 3, H, W) still to a random place where it stays whole
    (augmentation), so that M1 learns the concept's look rather than where its few stills put it
    (NOTES.md, finding 11). The roll wraps only the still's own ground around: black padding once
    drew stripes that M1 learned."""
    moved = torch.empty_like(images)
    for b, image in enumerate(images):
        frame = ((image + 1) / 2).numpy()
        shape = _foreground(frame, background(frame)) > 0.01  # anti-aliased edge included
        ys, xs = np.nonzero(shape)
        if len(ys) == 0:  # nothing drawn, nothing to move
            moved[b] = image
            continue
        dy = int(rng.integers(-ys.min(), frame.shape[1] - ys.max()))  # rows stay in 0..H-1
        dx = int(rng.integers(-xs.min(), frame.shape[2] - xs.max()))
        moved[b] = torch.roll(image, (dy, dx), dims=(1, 2))
    return moved


def concept_stills(concept, n, size, frames, seed, style_ground=None):
    """The few still images a user brings to customize M (DreamBooth / StyleDrop), fixed by the
    seed. A style is shown on varied content: its stills go through every colour x shape once
    (drawn at random, one seed's twelve missed green, and M1 drew it wrong: NOTES.md, finding 4)."""
    rng = np.random.default_rng([seed, STILLS])
    clips = [random_clip(rng, concept, style_ground) for _ in range(n)]
    if concept == "style":
        contents = [(kind, color) for kind in SHAPES for color in COLORS]
        order = rng.permutation(len(contents))
        for i, clip in enumerate(clips):
            kind, color = contents[order[i % len(contents)]]
            clips[i] = replace(clip, kind=kind, color=color)
    return image_batch(clips, size, frames, seed + STILLS)


# ------------------------------------------------------------------------------------------ metrics

_TEMPLATES = [Clip(s, c, "left") for s in SHAPES for c in COLORS]
_TEMPLATES.append(Clip("subject", "subject", "left"))


def background(frame):
    """The ground colour of a (3, H, W) frame: its per-channel median (a shape covers ~1/8)."""
    return np.median(frame.reshape(3, -1), axis=1)


def _foreground(frame, ground):
    """(H, W): how far each pixel is from the ground colour, in its most different channel."""
    return np.abs(frame - ground[:, None, None]).max(0)


def _centroid(frame, ground):
    """Foreground centroid (x, y) of a (3, H, W) frame, weighted by distance from the ground; None
    if empty."""
    weight = np.clip(_foreground(frame, ground) - FG_THRESHOLD, 0, None)
    if weight.sum() < 0.5:
        return None
    ys, xs = np.indices(weight.shape) + 0.5
    return np.array([(xs * weight).sum(), (ys * weight).sum()]) / weight.sum()


def centroid(frame):
    """Where the object of a (3, H, W) frame in [0, 1] is, (x, y) in pixels; None if nowhere."""
    return _centroid(frame, background(frame))


def classify(frame):
    """What a (3, H, W) frame in [0, 1] shows, and its stray pixels.

    Every base shape x colour, and the subject, is rendered at the foreground centroid on the
    frame's own ground; the one with the least squared error wins, and the ground's grey is kept
    (a ground above STYLE_SEEN is the style's). Stray pixels are foreground pixels more than one
    pixel away from the winner's shape: the artifacts. Returns (Clip or None, stray share of the
    background, centre)."""
    ground = background(frame)
    centre = _centroid(frame, ground)
    if centre is None:
        return None, 0.0, None
    renders = np.stack([render(t, *centre, frame.shape[-1], background=ground) for t in _TEMPLATES])
    best = int(((renders - frame[None]) ** 2).sum((1, 2, 3)).argmin())
    shape = torch.from_numpy(_foreground(renders[best], ground) > 0.05)[None].float()
    far = torch.nn.functional.max_pool2d(shape, 3, 1, 1)[0].numpy() == 0
    stray = (_foreground(frame, ground) > FG_THRESHOLD) & far
    label = replace(_TEMPLATES[best], ground=float(ground.mean()))
    return label, float(stray.sum() / max(1, far.sum())), centre


def matches(label, clip):
    """Whether a classified frame shows the clip's concept (the subject, or the style's ground), its
    colour and its shape."""
    found = label is not None
    if clip.concept == "subject":
        custom = found and label.kind == "subject"
    else:
        custom = found and label.style
    return {
        "custom": custom,
        "color": found and label.color == clip.color,
        "shape": found and label.kind == clip.kind,
    }


def video_metrics(video, clip):
    """The metrics of one generated (3, F, H, W) video in [0, 1] against the clip it was prompted
    with.

    - travel: how far the object travels, in pixels per frame: the net displacement of the
      foreground centroid from the first to the last frame where it is found, divided by the frames
      in between.
    - jitter: the rest of its frame-to-frame movement, which goes nowhere: mean step minus travel.
      A generated still video jitters by ~0.2 px a frame here while travelling ~0.05 (NOTES.md).
    - direction: 1 if the net displacement points the prompted way (more than 1 px along it, and
      more than across it), else 0.
    - custom_fidelity: share of frames that show the concept; None for ordinary prompts.
    - prompt_fidelity: mean of the matches of the prompt's non-custom words: colour and shape
      (share of frames) where the prompt names them, and direction.
    - temporal_consistency: share of consecutive frame pairs classified the same (shape, colour,
      ground).
    - artifacts: mean share of background pixels that are foreground (stray pixels)."""
    frames = [video[:, f] for f in range(video.shape[1])]
    labels, stray, centres = zip(*(classify(frame) for frame in frames))
    known = [(f, c) for f, c in enumerate(centres) if c is not None]
    pairs = zip(centres, centres[1:])
    steps = [np.linalg.norm(b - a) for a, b in pairs if a is not None and b is not None]
    net, travel = np.zeros(2), 0.0
    if len(known) >= 2:
        (first, start), (last, end) = known[0], known[-1]
        net = end - start
        travel = float(np.linalg.norm(net) / (last - first))
    ux, uy = DIRECTIONS[clip.direction]
    along, across = net[0] * ux + net[1] * uy, abs(net[0] * uy - net[1] * ux)
    direction = float(along > 1.0 and along > across)
    found = [matches(label, clip) for label in labels]
    words = [direction]
    if clip.kind != "subject":
        words += [np.mean([f[k] for f in found]) for k in ("color", "shape")]
    same = [
        a is not None and b is not None and a.look() == b.look() for a, b in zip(labels, labels[1:])
    ]
    custom = float(np.mean([f["custom"] for f in found])) if clip.concept else None
    return {
        "travel": travel,
        "jitter": max(0.0, float(np.mean(steps)) - travel) if steps else 0.0,
        "direction_accuracy": direction,
        "custom_fidelity": custom,
        "prompt_fidelity": float(np.mean(words)),
        "temporal_consistency": float(np.mean(same)),
        "artifacts": float(np.mean(stray)),
    }


def image_metrics(image, clip):
    """The concept and the content (colour and shape both right) of one generated (3, H, W)
    image."""
    found = matches(classify(image)[0], clip)
    content = found["color"] and found["shape"]
    return {"custom_fidelity": float(found["custom"]), "content": float(content)}


def summarize(per_video):
    """The mean of each metric over a list of metric dicts (None where a metric is undefined), and
    the list itself, as "videos": the claims' intervals are drawn from it."""
    means = {}
    for key in per_video[0]:
        known = [m[key] for m in per_video if m[key] is not None]
        means[key] = float(np.mean(known)) if known else None
    return {**means, "videos": per_video}


# -------------------------------------------------------------------- the rows of the results table


def measure(method, concept, alpha, videos, clips):
    """One row of the results table: every metric of video_metrics for each video, and their means
    over the videos."""
    if torch.is_tensor(videos):
        videos = ((videos + 1) / 2).clamp(0, 1).numpy()
    stats = summarize([video_metrics(x, c) for x, c in zip(videos, clips)])
    prompts = "concept" if clips[0].concept else "ordinary"
    row = {"method": method, "concept": concept, "alpha": alpha, "prompts": prompts}
    return {**row, "n_videos": len(clips), **stats}


def measure_images(images, clips):
    """Generated still images (N, 3, H, W) in [-1, 1], judged as video frames are (image_metrics):
    each image's metrics, and their means."""
    images = ((images + 1) / 2).clamp(0, 1).numpy()
    return summarize(list(map(image_metrics, images, clips)))
