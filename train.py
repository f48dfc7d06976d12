"""DDPM, one training loop for every stage, the stages and their store, and the models the paper
starts from: M, V and M1.

- `Config` and `PRESETS`: the one config mechanism (a dataclass per preset; `--set` overrides it).
- `Diffusion`: the noise schedule, the loss (Ho et al. 2020, Algorithm 1) and one sampler,
  deterministic DDIM (Song et al. 2021, Eq. 12 with eta = 0).
- `Run`: one run: its folder (results, figures) and the store of finished stages (`STAGES`), where
  a stage is kept under the config fields it reads and reused by every run that shares them.
- `train_loop`: the single loop every stage uses (progress bar, EMA, NaN guard, resumable).
- `base_models`: M, V (M inflated; only its temporal layers trained, as AnimateDiff does) and M1.
- `bench`: where a training step of V stands against this machine's matmul peak.

    python train.py bench [--preset small] [--device auto|cpu|cuda]
"""

import contextlib
import copy
import hashlib
import json
import os
import pickle
import time
import zipfile
import zlib
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

try:
    import fcntl  # POSIX file locks: runs side by side share the store safely
except ImportError:  # Windows: no locks, so run one process at a time there
    fcntl = None

import data
from unet3d import UNet, inflate, is_temporal

# ------------------------------------------------------------------------------------ where it runs


def pick_device(name="auto"):
    if name not in ("auto", "cpu", "cuda"):
        raise ValueError(f"unknown device {name!r}; use auto, cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but no CUDA GPU is available")
    use_cuda = name in ("auto", "cuda") and torch.cuda.is_available()
    device = torch.device("cuda" if use_cuda else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return device


def autocast(device):
    """bf16 autocast on CUDA; full fp32 on CPU (where bf16 is slow and changes results)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def bar(iterable, **kwargs):
    """A tqdm progress bar on a terminal; nothing when the output goes to a file (disable=None),
    where the stages' one-line reports are the log."""
    return tqdm(iterable, disable=None, dynamic_ncols=True, leave=False, **kwargs)


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


# ------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class Config:
    preset: str = "small"  # the preset it started from (the run folder's name begins with it)
    seed: int = 0  # every stage's randomness and every data stream's (data.py)
    size: int = 16  # frame side in pixels
    frames: int = 8  # frames per video
    ch: int = 32  # UNet base width
    mults: tuple = (1, 2)  # width multiplier per resolution level
    text_dim: int = 64  # width of the text encoder's tokens
    max_frames: int = 16  # length of the temporal position code
    image_batch: int = 32  # images per T2I step (M); 64 drew no better (NOTES.md)
    video_batch: int = 8  # videos per T2V / adapter step
    lr: float = 1e-3  # learning rate of M and of V's temporal layers
    t2i_steps: int = 1500  # M's training steps
    t2v_steps: int = 1500  # V's training steps (its temporal layers only)
    # the grey of the custom style's ground (every other clip: black): the lightest at which the
    # motion adapter's switch was not refuted on the customized model and naive injection still
    # broke the style (NOTES.md, the style's shift)
    style_ground: float = 0.4
    custom_batch: int = 64  # images per customization step: half stills, half prior images
    subject_steps: int = 600  # the subject's M1: one object to learn
    style_steps: int = 1000  # the style's M1: twelve contents on a new ground (NOTES.md)
    custom_lr: float = 1e-3  # learning rate of both M1s
    # M1 fine-tunes its UNet alone and keeps M's text encoder (true: every T2I weight); judged on
    # fresh seeds (NOTES.md, M1 with M's text encoder frozen)
    m1_text_encoder: bool = False
    n_stills: int = 12  # still images per concept
    motion_steps: int = 500  # the motion adapter's training steps
    # each training of spatial adapters (Still-Moving, each ablation): at 300 the ablation without
    # the motion adapter was still learning stillness (NOTES.md, where the ablation freezes)
    spatial_steps: int = 450
    motion_lr: float = 1e-3  # the motion adapter's learning rate
    spatial_lr: float = 3e-3  # the spatial adapters': rank 16 and 3e-3 chosen by a sweep (NOTES.md)
    motion_rank: int = 4  # r of the motion adapter's A_down (C x r) and A_up (r x d_k)
    spatial_rank: int = 16  # r of each spatial adapter's A_down (C x r) and A_up (r x C)
    n_prior_videos: int = 40  # ordinary real videos for prior preservation (Sec. 3.3)
    n_prior_images: int = 32  # images M generates for M1's prior preservation (DreamBooth)
    n_m1_images: int = 32  # images M1 generates: the content of the frozen videos (Sec. 3.3)
    sample_steps: int = 10  # DDIM steps; 20 drew the same verdicts, 6 worse ones (NOTES.md)
    guidance: float = 3.0  # classifier-free guidance scale
    eval_videos: int = 64  # videos per row: intervals 0.7 as wide as at 32 (NOTES.md)
    sample_batch: int = 8  # prompts sampled at once; on CPU 8 beat 64 (NOTES.md)
    ema: float = 0.995  # EMA decay of trained weights; 0 turns it off
    ckpt_every: int = 100  # steps between resumable checkpoints

    def __post_init__(self):
        """Refuse a config that could only fail later, deep inside a stage."""
        if not 2 <= self.frames <= self.max_frames:
            raise ValueError(
                f"frames={self.frames}: a video needs at least 2 frames and at most "
                f"the frame-position code's max_frames={self.max_frames}"
            )
        levels = 2 ** (len(self.mults) - 1)
        if not 8 <= self.size <= 128 or self.size % levels:
            raise ValueError(f"size={self.size} must be 8..128 px and divisible by {levels}")
        if not 2 * data.STYLE_SEEN <= self.style_ground <= 1:
            raise ValueError(
                f"style_ground={self.style_ground}: the metrics tell the style's ground from "
                f"black above {data.STYLE_SEEN}, so it is a grey from {2 * data.STYLE_SEEN} to 1"
            )
        counts = (self.image_batch, self.custom_batch, self.video_batch, self.eval_videos)
        counts += (self.n_stills, self.n_prior_images, self.n_m1_images)
        counts += (self.sample_steps, self.sample_batch)
        if min(counts) < 1:
            raise ValueError("batch sizes, sample counts and sampler steps must be at least 1")


PRESETS = {
    # a smoke test of every stage: seconds, and numbers that mean nothing
    "quick": Config(
        preset="quick",
        frames=4,
        ch=16,
        text_dim=32,
        image_batch=8,
        custom_batch=8,
        video_batch=2,
        t2i_steps=20,
        t2v_steps=10,
        subject_steps=5,
        style_steps=5,
        n_stills=4,
        motion_steps=5,
        spatial_steps=5,
        n_prior_videos=4,
        n_prior_images=4,
        n_m1_images=4,
        sample_steps=3,
        eval_videos=4,
        ckpt_every=5,
    ),
    # the default on every device: every claim in the README is measured on it
    "small": Config(),
}


def override(cfg, items):
    """cfg with `--set KEY=VALUE` items applied, each value read as the field's type."""
    known = [f.name for f in fields(cfg)]
    changes = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in known or not value:
            raise ValueError(
                f"--set {item!r}: expected KEY=VALUE with KEY one of {', '.join(known)}"
            )
        kind = type(getattr(cfg, key))
        try:
            if kind is tuple:
                changes[key] = tuple(int(v) for v in value.split(","))
            elif kind is bool:
                if value.lower() not in ("true", "false"):
                    raise ValueError(value)
                changes[key] = value.lower() == "true"
            else:
                changes[key] = kind(value)
        except ValueError:
            what = {tuple: "whole numbers, comma-separated", int: "a whole number"}
            what[bool] = "true or false"
            what = what.get(kind, f"a {kind.__name__}")
            raise ValueError(f"--set {item!r}: {key} takes {what}") from None
    return replace(cfg, **changes)


def differences(saved, ours):
    """The fields whose values differ between two signatures or configs (dicts), as
    "field=saved (now ours)"."""
    return [f"{k}={saved.get(k)!r} (now {v!r})" for k, v in ours.items() if saved.get(k) != v]


def saved_config(run_dir):
    """The config a run folder was made with (its config.json), or a one-line error."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path):
        raise ValueError(
            f"{run_dir} is not a run folder (no config.json); "
            f"make one with `python stillmoving.py --out {run_dir}`"
        )
    remake = f"re-make it with `python stillmoving.py --fresh --out {run_dir}`"
    with open(path) as f:
        saved = json.load(f)
    gone = sorted(set(saved) - {f.name for f in fields(Config)})
    if gone:
        raise ConfigMismatch(
            f"{run_dir} was made with config fields this code no longer has "
            f"({', '.join(gone)}); {remake}"
        )
    types = {name: type(value) for name, value in asdict(Config()).items()}  # JSON lists: tuples
    return Config(**{key: types[key](value) for key, value in saved.items()})


# --------------------------------------------------------------------------------------------- DDPM


class Diffusion:
    """Linear beta schedule 1e-4 -> 0.02 over T = 1000 steps (Ho et al. 2020, Sec. 4), precomputed
    in float64 and stored in float32. The UNet predicts v = sqrt(ab) eps - sqrt(1 - ab) x_0
    (Salimans & Ho 2022) rather than the noise eps itself (Ho et al.): with eps, V's videos
    flickered (NOTES.md)."""

    def __init__(self, device, T=1000, beta_1=1e-4, beta_T=0.02):
        self.T = T
        betas = torch.linspace(beta_1, beta_T, T, dtype=torch.float64)  # beta_t
        alpha_bar = torch.cumprod(1 - betas, dim=0)  # \bar\alpha_t = prod_s (1 - beta_s)
        self.betas = betas.float().to(device)
        self.alpha_bar = alpha_bar.float().to(device)
        self.sqrt_ab = alpha_bar.sqrt().float().to(device)  # \sqrt{\bar\alpha_t}
        self.sqrt_1m_ab = (1 - alpha_bar).sqrt().float().to(device)  # \sqrt{1 - \bar\alpha_t}

    @staticmethod
    def at(schedule, t, x):
        """schedule[t], one value per batch item, shaped to broadcast over x."""
        return schedule[t].view((-1,) + (1,) * (x.dim() - 1))

    def q_sample(self, x0, t, eps):
        """x_t ~ q(x_t | x_0) = N(sqrt(ab_t) x_0, (1 - ab_t) I)  (Ho et al. Eq. 4)."""
        return self.at(self.sqrt_ab, t, x0) * x0 + self.at(self.sqrt_1m_ab, t, x0) * eps

    def target(self, x0, t, eps):
        """What the UNet is trained to predict: v = sqrt(ab_t) eps - sqrt(1 - ab_t) x_0."""
        return self.at(self.sqrt_ab, t, x0) * eps - self.at(self.sqrt_1m_ab, t, x0) * x0

    def loss(self, model, x0, tokens, gen, drop_text=0.1):
        """Alg. 1 with the v target: || v - v_theta(x_t, t, c) ||^2. The text is dropped 10% of the
        time so the same model also learns the unconditional prediction."""
        B = x0.shape[0]
        t = torch.randint(0, self.T, (B,), device=x0.device, generator=gen)  # Alg. 1 line 3
        eps = torch.randn(x0.shape, device=x0.device, generator=gen)  # Alg. 1 line 4
        drop = torch.rand(B, device=x0.device, generator=gen) < drop_text
        tokens = torch.where(drop[:, None], torch.zeros_like(tokens), tokens)  # null prompt: <pad>s
        with autocast(x0.device):
            pred = model(self.q_sample(x0, t, eps), t, tokens)
        return F.mse_loss(pred.float(), self.target(x0, t, eps))  # Alg. 1 line 5

    def eps(self, model, x, t, tokens, guidance):
        """The guided noise estimate eps_u + w (eps_c - eps_u) (classifier-free guidance), both
        halves in one batch, from the guided v: eps = sqrt(1 - ab) x_t + sqrt(ab) v."""
        B = x.shape[0]
        timesteps = torch.full((2 * B,), t, device=x.device)
        with autocast(x.device):
            both = model(
                torch.cat([x, x]), timesteps, torch.cat([tokens, torch.zeros_like(tokens)])
            )
        cond, uncond = both.float().chunk(2)  # the conditional half first
        v = uncond + guidance * (cond - uncond)
        return self.sqrt_1m_ab[t] * x + self.sqrt_ab[t] * v

    @torch.no_grad()
    def sample(self, model, shape, tokens, steps, guidance, gen):
        """Deterministic DDIM (Song et al. Eq. 12, eta = 0) on `steps` evenly spaced timesteps.

        The predicted x_0 is clamped to the data range [-1, 1], and eps is then *recomputed* from
        the clamped x_0 (diffusers' `use_clipped_model_output`). Keeping the unclamped eps instead
        is a real bug under guidance: the guided x_0 often leaves [-1, 1], and what the clamp cuts
        off returns through eps with the opposite sign; at high noise sqrt(1 - ab_prev) ~ 1, so that
        eps term rules x_{t-1}. Measured here: it turned a V that had learned the direction word
        into one that moved the wrong way (NOTES.md)."""
        device = tokens.device
        ts = torch.linspace(self.T - 1, 0, steps).round().long().tolist()
        x = torch.randn(shape, device=device, generator=gen)  # x_T ~ N(0, I)
        for i, t in enumerate(ts):
            ab = self.alpha_bar[t]
            last = i + 1 == steps
            ab_prev = self.alpha_bar.new_tensor(1.0) if last else self.alpha_bar[ts[i + 1]]
            eps = self.eps(model, x, t, tokens, guidance)
            x0 = ((x - (1 - ab).sqrt() * eps) / ab.sqrt()).clamp(-1, 1)  # predicted x_0, clamped
            eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()  # the eps that this x_0 implies
            x = ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * eps  # Song et al. Eq. 12, sigma = 0
        return x


def generate(model, diffusion, prompts, cfg, seed, video=True):
    """Sample one image or video per prompt, cfg.sample_batch prompts at a time:
    (N, 3, [F,] H, W) in [-1, 1]."""
    device = next(model.parameters()).device
    gen = torch.Generator(device).manual_seed(seed)
    model.eval()
    frames = (cfg.frames,) if video else ()
    out = []
    for i in bar(range(0, len(prompts), cfg.sample_batch), desc="sampling"):
        tokens = data.tokenize(prompts[i : i + cfg.sample_batch]).to(device)
        shape = (len(tokens), 3, *frames, cfg.size, cfg.size)
        out.append(
            diffusion.sample(model, shape, tokens, cfg.sample_steps, cfg.guidance, gen).cpu()
        )
    return torch.cat(out)


# ----------------------------------------------------------------------- the stages and their store

# What each stage is made from: the config fields it reads itself, and the stages it is built on.
# A stage's signature is its own fields plus those of every stage below it, so a changed field
# re-makes exactly the stages that depend on it (`--set spatial_rank=4` keeps M, V and the M1s).
SAMPLER = ("sample_steps", "guidance", "sample_batch")
CUSTOM = ("custom_batch", "custom_lr", "m1_text_encoder", "n_stills", "n_prior_images")
CUSTOM += SAMPLER  # M1's prior images are M's samples
M_FIELDS = ("seed", "size", "frames", "ch", "mults", "text_dim", "max_frames", "ema")
STAGES = {
    "t2i": (M_FIELDS + ("lr", "image_batch", "t2i_steps"), ()),
    "t2v": (("video_batch", "t2v_steps"), ("t2i",)),
    "custom_subject": (CUSTOM + ("subject_steps",), ("t2i",)),
    "custom_style": (CUSTOM + ("style_steps", "style_ground"), ("t2i",)),
    "motion_adapter": (("motion_rank", "motion_steps", "motion_lr"), ("t2v",)),
    "m1_images_subject": (("n_m1_images", *SAMPLER), ("custom_subject",)),
    "m1_images_style": (("n_m1_images", *SAMPLER), ("custom_style",)),
}
SPATIAL_FIELDS = ("spatial_rank", "spatial_steps", "spatial_lr", "n_prior_videos")


def stage_inputs(stage):
    """(config fields, stages) that `stage` is made from, spatial_<concept>_<variant> included."""
    if stage.startswith("spatial_"):
        concept = stage.split("_")[1]
        below = ("t2v", f"custom_{concept}", "motion_adapter", f"m1_images_{concept}")
        return SPATIAL_FIELDS, below
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; the stages are {', '.join(STAGES)}, spatial_*")
    return STAGES[stage]


def store_dir():
    """Where finished stages are kept, shared by every run on this machine: $STILLMOVING_STORE if
    set, else the user's cache, $XDG_CACHE_HOME/stillmoving (by default ~/.cache/stillmoving)."""
    if os.environ.get("STILLMOVING_STORE"):
        return os.environ["STILLMOVING_STORE"]
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "stillmoving")


@contextlib.contextmanager
def exclusive(path):
    """Hold an exclusive lock on the file `path` for the block, so that of two runs side by side
    that need one stage, one makes it while the other waits and then reuses it. The OS drops the
    lock when its process dies, so a killed run never blocks the next."""
    with open(path, "a") as f:
        if fcntl is not None:
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


class Run:
    """One run of the recipe: its config, its folder (config.json, results, figures), the device,
    the diffusion every stage shares, and the store of finished stages.

    The store (`store_dir`) keeps every stage under its signature (`stage_inputs`):
    <store>/<stage>/<hash of the signature>.pt, with how it was made (seconds, threads, device).
    A run reuses a stage whose signature matches whatever folder made it, and never deletes or
    overwrites a stage of another signature. A Run with make=False (sampling) never trains, and a
    stage the store lacks is an error; fresh=True makes this config's stages again."""

    def __init__(self, cfg, out, device, make=True, fresh=False, store=None):
        self.cfg, self.dir, self.device, self.make, self.fresh = cfg, out, device, make, fresh
        self.store = store or store_dir()
        self.diffusion = Diffusion(device)
        self.made = {}  # per stage used: its file, seconds, threads, device, and whether reused
        old = os.path.join(out, "ckpt")
        if os.path.isdir(old):
            raise ConfigMismatch(
                f"{out} was made by an older version that kept its stages in {old}, which this "
                f"version does not read (stages now live in the store, {self.store}): "
                f"give another --out, or delete {out}"
            )
        for folder in (out, self.store):
            try:
                os.makedirs(folder, exist_ok=True)
            except OSError as e:
                raise ValueError(f"cannot write the folder {folder!r}: {e.strerror}") from None

    def signature(self, stage):
        """The config fields `stage` depends on, with their values, its own and its inputs'."""
        fields_read, below = stage_inputs(stage)
        signed = {}
        for other in below:
            signed.update(self.signature(other))
        for field in fields_read:
            value = getattr(self.cfg, field)
            signed[field] = list(value) if isinstance(value, tuple) else value
        return signed

    def path(self, stage, suffix=".pt"):
        """The stage's file in the store; suffix ".partial.pt" is its resumable checkpoint."""
        signed = json.dumps(self.signature(stage), sort_keys=True).encode()
        key = hashlib.sha256(signed).hexdigest()[:16]
        return os.path.join(self.store, stage, key + suffix)

    def load(self, stage, suffix=".pt"):
        """The stage's stored file (or checkpoint), or None if the store has none."""
        path = self.path(stage, suffix)
        if not os.path.exists(path):
            return None
        return load_file(path, f"Delete it to make the stage again (stage {stage!r}).")

    def missing(self, stage):
        """Why the store has no `stage` for this config: the fields in which the nearest stored one
        differs, as "field=stored (now ours)"."""
        ours, folder = self.signature(stage), os.path.dirname(self.path(stage))
        stored = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
        nearest = None
        for name in stored:
            if name.endswith(".partial.pt") or not name.endswith(".pt"):
                continue
            changed = differences(
                load_file(os.path.join(folder, name), "Delete it.")["config"], ours
            )
            if nearest is None or len(changed) < len(nearest):
                nearest = changed
        return f"made with {', '.join(nearest[:4])}" if nearest else "not made yet"

    def stage(self, name, make):
        """Return stage `name`'s state: from the store if it holds one with this signature, else
        made by make() and stored."""
        path = self.path(name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with exclusive(self.path(name, ".lock")):
            if self.fresh:
                for suffix in (".pt", ".partial.pt"):
                    if os.path.exists(self.path(name, suffix)):
                        os.remove(self.path(name, suffix))
            stored = self.load(name)
            if stored is not None:
                how = {k: stored.get(k) for k in ("seconds", "threads", "device")}
                self.made[name] = {"file": path, **how, "reused": True}
                tqdm.write(f"[{name}] reused {path}")
                return stored["state"]
            if not self.make:
                raise ConfigMismatch(
                    f"stage {name!r} for {self.dir}'s config is {self.missing(name)}; finish the "
                    f"run with `python stillmoving.py --preset {self.cfg.preset} --out {self.dir}`"
                )
            start = time.time()
            # an adapter's random init: the same whether the stages before it were made or reused
            torch.manual_seed(zlib.crc32(f"{self.cfg.seed}/{name}".encode()))
            state = make()
            how = {"seconds": round(time.time() - start, 2), "threads": torch.get_num_threads()}
            how["device"] = str(self.device)
            save_file({"config": self.signature(name), "state": state, **how}, path)
            if os.path.exists(self.path(name, ".partial.pt")):
                os.remove(self.path(name, ".partial.pt"))
        self.made[name] = {"file": path, **how, "reused": False}
        tqdm.write(f"[{name}] made in {how['seconds']:.0f} s: {path}")
        return state


# -------------------------------------------------------------------------------- one training loop


class TrainingError(RuntimeError):
    pass


def train_loop(run, stage, model, params, loss_fn, steps, lr):
    """AdamW on `params` for `steps` steps of loss_fn(rng, gen), resumable: every ckpt_every steps
    the trainable tensors, optimizer, EMA and step go to the stage's checkpoint in the store
    (<key>.partial.pt beside the stage's file). At the end the EMA weights (if enabled) replace
    the trained ones."""
    cfg, device = run.cfg, run.device
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True)  # one kernel for all
    ema = [p.detach().clone() for p in params]
    partial = run.path(stage, ".partial.pt")
    start = 0
    saved = run.load(stage, ".partial.pt")
    if saved is not None:
        with torch.no_grad():
            for live, kept in zip([*params, *ema], [*saved["params"], *saved["ema"]]):
                live.copy_(kept)
        opt.load_state_dict(saved["opt"])
        start = saved["step"]
        tqdm.write(f"[{stage}] resuming at step {start} from {partial}")
    model.train()
    progress = bar(range(start, steps), desc=stage, initial=start, total=steps)
    for step in progress:
        # (seed, stage, step) alone decide a step's randomness: a resumed run repeats what it missed
        rng = np.random.default_rng([cfg.seed, zlib.crc32(stage.encode()), step])
        gen = torch.Generator(device).manual_seed(int(rng.integers(2**62)))
        loss = loss_fn(rng, gen)
        if not torch.isfinite(loss):
            kept = "no checkpoint was written yet"
            if os.path.exists(partial):
                kept = f"the last good checkpoint is kept at {partial}"
            raise TrainingError(
                f"stage {stage!r}: the loss became {loss.item()} at step {step}; {kept}"
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(cfg.ema, (1 + step) / (10 + step))  # warm-up: a young EMA must not lag far
        with torch.no_grad():
            for e, p in zip(ema, params):
                e.lerp_(p.detach(), 1 - decay)
        progress.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % cfg.ckpt_every == 0 and step + 1 < steps:
            checkpoint = {
                "config": run.signature(stage),
                "step": step + 1,
                "opt": opt.state_dict(),
                "params": [p.detach().cpu() for p in params],
                "ema": [e.cpu() for e in ema],
            }
            save_file(checkpoint, partial)
    if cfg.ema > 0:
        with torch.no_grad():
            for p, e in zip(params, ema):
                p.copy_(e)
    if steps > start:
        tqdm.write(f"[{stage}] {steps} steps, final loss {loss.item():.4f}")
    return model


# ---------------------------------------------------------------------------------- the base models


def new_unet(cfg):
    vocab = len(data.VOCAB)
    return UNet(vocab, cfg.size, data.MAX_WORDS, cfg.ch, cfg.mults, cfg.text_dim, cfg.max_frames)


def base_models(run):
    """M, V and the two M1s, trained or reused. Returns (M, V, {concept: M1}) on run.device."""
    cfg, dev, diffusion = run.cfg, run.device, run.diffusion
    torch.manual_seed(cfg.seed)
    m = new_unet(cfg).to(dev)
    v = inflate(m)  # its temporal init comes right after M's, from the same seed

    def train_m():  # M: every weight, on single frames with image captions
        def loss(rng, gen):
            images, tokens = data.random_batch(
                rng, cfg.image_batch, cfg.size, cfg.frames, False, dev
            )
            return diffusion.loss(m, images, tokens, gen)

        train_loop(run, "t2i", m, list(m.parameters()), loss, cfg.t2i_steps, cfg.lr)
        return m.state_dict()

    m.load_state_dict(run.stage("t2i", train_m))
    v.load_state_dict(m.state_dict(), strict=False)  # V's T2I part is M, frozen from here on

    def train_v():  # V: only the temporal layers, on moving videos (AnimateDiff)
        v.requires_grad_(False)
        params = [p for name, p in v.named_parameters() if is_temporal(name)]
        for p in params:
            p.requires_grad_(True)

        def loss(rng, gen):
            videos, tokens = data.random_batch(
                rng, cfg.video_batch, cfg.size, cfg.frames, True, dev
            )
            return diffusion.loss(v, videos, tokens, gen)

        train_loop(run, "t2v", v, params, loss, cfg.t2v_steps, cfg.lr)
        return {k: t for k, t in v.state_dict().items() if is_temporal(k)}

    v.load_state_dict(run.stage("t2v", train_v), strict=False)
    v.requires_grad_(False)
    m1s = {concept: customize(run, m, concept) for concept in ("subject", "style")}
    return m, v, m1s


def customize(run, m, concept):
    """M1: a copy of M with its UNet fine-tuned (its text encoder too if cfg.m1_text_encoder) on
    cfg.n_stills still images of the concept (DreamBooth / StyleDrop), with prior preservation on
    images *generated by M* for ordinary prompts (DreamBooth Eq. 2)."""
    cfg, dev, diffusion = run.cfg, run.device, run.diffusion
    m1 = copy.deepcopy(m)

    def train_m1():
        stills, prompts = data.concept_stills(
            concept, cfg.n_stills, cfg.size, cfg.frames, cfg.seed, cfg.style_ground
        )
        rng = np.random.default_rng([cfg.seed, data.PRIOR_IMAGES])
        prior_prompts = [data.random_clip(rng).image_prompt() for _ in range(cfg.n_prior_images)]
        seed = cfg.seed + data.PRIOR_IMAGES
        prior = generate(m, diffusion, prior_prompts, cfg, seed, video=False)  # M's own images
        half = cfg.custom_batch // 2

        def loss(rng, gen):
            i = rng.integers(0, len(stills), half)
            j = rng.integers(0, len(prior), half)
            x = torch.cat([data.shift(stills[i], rng), prior[j]]).to(dev)
            captions = [prompts[k] for k in i] + [prior_prompts[k] for k in j]
            return diffusion.loss(m1, x, data.tokenize(captions).to(dev), gen)

        steps = cfg.style_steps if concept == "style" else cfg.subject_steps
        m1.text.requires_grad_(cfg.m1_text_encoder)  # off: the UNet alone, a common variant
        params = [p for p in m1.parameters() if p.requires_grad]
        train_loop(run, f"custom_{concept}", m1, params, loss, steps, cfg.custom_lr)
        return m1.state_dict()

    m1.load_state_dict(run.stage(f"custom_{concept}", train_m1))
    return m1.requires_grad_(False)


# ---------------------------------------------------------------------------- how fast it runs here


def bench(cfg, device, steps=10):
    """Where V's training step stands against this machine: its time and FLOPs (FlopCounterMode)
    against the same-process matmul peak at 2048^3 (8192^3 on CUDA), so that achieved / peak
    (MFU) means something on any machine. Returns the MFU."""
    cuda = device.type == "cuda"
    torch.manual_seed(cfg.seed)
    v = inflate(new_unet(cfg)).to(device)
    diffusion = Diffusion(device)
    rng = np.random.default_rng(cfg.seed)
    x, tokens = data.random_batch(rng, cfg.video_batch, cfg.size, cfg.frames, True, device)
    gen = torch.Generator(device).manual_seed(0)
    opt = torch.optim.AdamW(v.parameters(), lr=1e-4)

    def timed(fn, repeats=1):  # seconds per call, the device synchronised before and after
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        if cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / repeats

    def step():
        opt.zero_grad(set_to_none=True)
        diffusion.loss(v, x, tokens, gen).backward()
        opt.step()

    timed(step, 3)  # warm-up
    seconds = timed(step, steps)
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    n = 8192 if cuda else 2048
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16 if cuda else torch.float32)
    timed(lambda: a @ a, 2)  # warm-up
    peak = 2 * n**3 / timed(lambda: a @ a, 10)
    parameters = sum(p.numel() for p in v.parameters())
    achieved = flops / seconds
    print(
        f"preset {cfg.preset} on {device} ({torch.get_num_threads()} threads): V at {cfg.size}px "
        f"x {cfg.frames} frames, batch {cfg.video_batch} videos, {parameters} parameters\n"
        f"train: {seconds * 1000:.4g} ms/step; "
        f"{cfg.video_batch * cfg.frames / seconds:.0f} frames/s; "
        f"{flops / 1e9:.4g} GFLOP/step, {achieved / 1e9:.4g} GFLOP/s achieved\n"
        f"matmul peak: {peak / 1e9:.4g} GFLOP/s at {n}^3\n"
        f"MFU {achieved / peak:.3f}"
    )
    return achieved / peak


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="python train.py bench: V's training step here")
    parser.add_argument("command", choices=["bench"])
    parser.add_argument("--preset", choices=list(PRESETS), default="small")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    try:
        bench(PRESETS[args.preset], pick_device(args.device))
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
