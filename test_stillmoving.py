"""The specification of stillmoving, as fast CPU tests: adapter invariants first, then the schedule,
the synthetic world and its metrics, the recipe's invariants, and the failure modes a user can hit.

    python -m pytest -q
"""

import copy
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import data
import lora
import stillmoving
import train
from lora import MOTION, SPATIAL
from train import PRESETS, Diffusion, Run
from unet3d import Attention, UNet, inflate, is_adapter, is_temporal, t2i_state_dict

CPU = torch.device("cpu")
QUICK = PRESETS["quick"]
HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="session", autouse=True)
def store(tmp_path_factory):
    """Every test's stages go to a store of the test session's own, never the user's cache; the
    subprocesses the tests start inherit it."""
    path = str(tmp_path_factory.mktemp("store"))
    before = os.environ.get("STILLMOVING_STORE")
    os.environ["STILLMOVING_STORE"] = path
    yield path
    if before is None:
        del os.environ["STILLMOVING_STORE"]
    else:
        os.environ["STILLMOVING_STORE"] = before


def tiny(size=8, frames=4):
    torch.manual_seed(0)
    m = UNet(
        len(data.VOCAB), size, data.MAX_WORDS, ch=8, mults=(1, 2), text_dim=16, max_frames=frames
    )
    return m, inflate(m)


def inputs(B=2, frames=4, size=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 3, frames, size, size, generator=g)
    return (
        x,
        torch.tensor([10, 700])[:B],
        data.tokenize(["a red circle moving left", "a sks object"][:B]),
    )


def randomize_up(model, kind):
    with torch.no_grad():
        for m in lora.adapters(model, kind):
            m.A_up.normal_(0, 0.5)


# ---------------------------------------------------------------------------------------- inflation


def test_fresh_v_equals_m_frame_by_frame():
    m, v = tiny()
    x, t, tok = inputs()
    per_frame = torch.stack([m(x[:, :, f], t, tok) for f in range(x.shape[2])], dim=2)
    assert torch.allclose(v(x, t, tok), per_frame, atol=1e-5)
    # the equality comes from the zero proj_out: break it and the test must see it
    with torch.no_grad():
        v.mid.temporal.proj_out.weight.normal_()
    assert not torch.allclose(v(x, t, tok), per_frame, atol=1e-3)


def test_inflation_leaves_m_untouched_and_parts_separate_by_name():
    m, _ = tiny()
    before = copy.deepcopy(m.state_dict())
    v = inflate(m)
    assert (
        all(torch.equal(before[k], t) for k, t in m.state_dict().items())
        and before.keys() == m.state_dict().keys()
    )
    temporal = [n for n, _ in v.named_parameters() if is_temporal(n)]
    assert temporal and set(t2i_state_dict(v)) == set(m.state_dict())
    assert v.temporal_blocks() and all(
        (b.temporal is not None) == (b.attn is not None) for b in v.blocks()
    )


def test_frozen_video_gives_identical_frames_through_the_spatial_path():
    m, _ = tiny()
    x, t, tok = inputs()
    frozen = data.freeze(x, np.random.default_rng(0))
    out = m(frozen, t, tok)
    assert torch.allclose(out, out[:, :, :1].expand_as(out), atol=1e-6)
    assert not torch.allclose(m(x, t, tok)[:, :, 0], m(x, t, tok)[:, :, 1], atol=1e-3)


def test_temporal_layers_know_where_and_when_each_feature_is():
    """A uniform feature map (the same at every pixel of every frame) must still get a temporal
    output that depends on the pixel and the frame: that is what lets "moving left" put the object
    on the right early and on the left late. Without the space-time code every pixel and
    frame would look alike."""
    _, v = tiny()
    module = v.mid.temporal
    with torch.no_grad():
        module.proj_out.weight.normal_(0, 0.1)
        x = (
            torch.ones(4, module.proj_in.in_features, 4, 4)
            + torch.randn(module.proj_in.in_features)[None, :, None, None]
        )
        # (F, H, W), one channel
        out = (module(x, v.text(data.tokenize(["a red circle moving left"])), frames=4) - x)[:, 0]
    assert out.std(dim=0).min() > 1e-4  # frames differ, at every pixel
    assert out.flatten(1).std(dim=1).min() > 1e-4  # pixels differ, in every frame


def test_sequences_sharing_a_context_attend_as_if_each_had_its_own_copy():
    # 3 sequences a context
    attn, x, context = Attention(16, context_dim=8), torch.randn(6, 5, 16), torch.randn(2, 3, 8)
    one_by_one = torch.cat([attn(x[i : i + 1], context[i // 3 : i // 3 + 1]) for i in range(6)])
    assert torch.allclose(attn(x, context), one_by_one, atol=1e-6)


def test_shape_errors_are_clear():
    m, v = tiny()
    x, t, tok = inputs()
    with pytest.raises(ValueError, match="frame-position code"):
        v(torch.randn(2, 3, 5, 8, 8), t, tok)
    with pytest.raises(ValueError, match="H = W = 8"):
        v(torch.randn(2, 3, 4, 16, 16), t, tok)


# ----------------------------------------------------------------------------------------- adapters


def test_motion_adapter_is_a_no_op_until_trained_and_at_alpha_zero():
    _, v = tiny()
    x, t, tok = inputs()
    base = v(x, t, tok)
    lora.add_motion_adapter(v, rank=2)
    # Q, K, V of every temporal layer
    assert len(lora.adapters(v, MOTION)) == 3 * len(v.temporal_blocks())
    assert torch.allclose(v(x, t, tok), base, atol=1e-6)
    with torch.no_grad():
        for block in v.temporal_blocks():
            block.temporal.proj_out.weight.normal_(0, 0.1)  # let the temporal layers matter
    base = lora.set_scale(v, 0.0)(x, t, tok)
    randomize_up(v, MOTION)
    assert torch.equal(v(x, t, tok), base)  # exactly, not approximately
    plus, minus = lora.set_scale(v, 1.0)(x, t, tok), lora.set_scale(v, -1.0)(x, t, tok)
    assert not torch.allclose(plus, base, atol=1e-4) and not torch.allclose(minus, base, atol=1e-4)
    # Eq. 1 is linear in alpha: at each projection, alpha = -1 moves the output the other way
    layer = lora.adapters(v, MOTION)[0]
    features = torch.randn(5, layer.base.in_features)
    lora.set_scale(v, 1.0)
    up = layer(features) - layer.base(features)
    lora.set_scale(v, -1.0)
    down = layer(features) - layer.base(features)
    assert up.abs().max() > 1e-3 and torch.allclose(up, -down, atol=1e-6)


def test_spatial_adapter_starts_as_identity_and_removal_restores_the_model():
    _, v = tiny()
    x, t, tok = inputs()
    base, keys = v(x, t, tok), set(v.state_dict())
    lora.add_motion_adapter(lora.add_spatial_adapters(v, rank=2), rank=2)
    assert torch.allclose(v(x, t, tok), base, atol=1e-6)
    feature = torch.randn(3, v.temporal_blocks()[0].channels, 4, 4)
    assert torch.equal(v.temporal_blocks()[0].adapter(feature), feature)
    randomize_up(v, SPATIAL)
    assert not torch.allclose(v(x, t, tok), base, atol=1e-4)
    lora.remove_adapters(v)
    assert set(v.state_dict()) == keys and not lora.adapters(v)
    assert torch.allclose(v(x, t, tok), base, atol=1e-6)


def test_each_spatial_adapter_sits_right_before_its_temporal_module():
    """Sec. 3.3: the adapter reads the injected block's output, and the temporal module reads the
    adapter's output, in every block with a temporal module (and nowhere else)."""
    _, v = tiny()
    lora.add_spatial_adapters(v, rank=2)
    randomize_up(v, SPATIAL)
    seen = {}
    for i, block in enumerate(v.blocks()):
        if block.temporal is None:
            assert isinstance(block.adapter, torch.nn.Identity)
            continue
        assert isinstance(block.adapter, lora.SpatialAdapter)
        block.adapter.register_forward_hook(lambda m, a, out, i=i: seen.setdefault(("out", i), out))
        block.temporal.register_forward_hook(
            lambda m, a, out, i=i: seen.setdefault(("in", i), a[0])
        )
    v(*inputs())
    blocks = [i for i, block in enumerate(v.blocks()) if block.temporal is not None]
    assert blocks and all(torch.equal(seen["out", i], seen["in", i]) for i in blocks)


def test_alpha_is_a_runtime_number_that_never_touches_the_weights():
    """Scaling, eval() and any number of forward passes leave every weight as it was (no merge
    behind our back, no merges piling up), and removal gives the exact model back."""
    _, v = tiny()
    x, t, tok = inputs()
    before = {k: w.clone() for k, w in v.state_dict().items()}
    base = v(x, t, tok)
    lora.add_motion_adapter(v, rank=2)
    randomize_up(v, MOTION)
    for alpha in (1.0, -0.7, 0.0, 1.0):
        lora.set_scale(v, alpha).eval()(x, t, tok)
    lora.remove_adapters(v, MOTION)
    after = v.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in after)
    assert torch.equal(v(x, t, tok), base)


def test_adapter_state_dicts_hold_only_adapters_and_round_trip(tmp_path):
    _, v = tiny()
    lora.add_spatial_adapters(lora.add_motion_adapter(v, rank=2), rank=3)
    randomize_up(v, MOTION)
    motion = lora.adapter_state_dict(v, MOTION)
    assert motion and all(is_adapter(k) and ".temporal.attn1." in k for k in motion)
    assert all(is_adapter(k) and ".adapter." in k for k in lora.adapter_state_dict(v, SPATIAL))
    train.save_file(motion, str(tmp_path / "motion.pt"))
    loaded = train.load_file(str(tmp_path / "motion.pt"), "")
    _, fresh = tiny()
    lora.load_adapter(lora.add_motion_adapter(fresh, rank=2), loaded, MOTION)
    assert all(torch.equal(motion[k], w) for k, w in lora.adapter_state_dict(fresh, MOTION).items())
    with pytest.raises(ValueError, match="motion adapter: the saved tensors do not fit"):
        lora.load_adapter(
            lora.add_motion_adapter(tiny()[1], rank=2), {"x.A_up": torch.zeros(1)}, MOTION
        )


def test_scale_must_be_finite():
    _, v = tiny()
    lora.add_motion_adapter(v, rank=2)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite"):
            lora.set_scale(v, bad)


# --------------------------------------------------------------------------------------------- DDPM


def test_schedule():
    d = Diffusion(CPU)
    assert d.betas[0].item() == pytest.approx(1e-4) and d.betas[-1].item() == pytest.approx(0.02)
    assert (d.alpha_bar[1:] < d.alpha_bar[:-1]).all()
    x0, eps = torch.rand(4096, 3) * 2 - 1, torch.randn(4096, 3)
    assert (d.q_sample(x0, torch.zeros(4096, dtype=torch.long), eps) - x0).abs().max() < 0.05
    xT = d.q_sample(x0, torch.full((4096,), 999), eps)
    assert abs(xT.mean().item()) < 0.03 and abs(xT.std().item() - 1) < 0.03


def test_an_exact_prediction_gives_back_the_true_noise():
    d = Diffusion(CPU)
    x0, eps = torch.rand(2, 3, 8, 8) * 2 - 1, torch.randn(2, 3, 8, 8)
    t = 700
    xt = d.q_sample(x0, torch.full((2,), t), eps)
    a, s = d.sqrt_ab[t], d.sqrt_1m_ab[t]

    def exact(x, tt, tok):  # the true v, for the cond and the uncond halves alike
        return (a * eps - s * x0).repeat(2, 1, 1, 1)

    tokens = data.tokenize(["a red circle"] * 2)
    assert torch.allclose(d.eps(exact, xt, t, tokens, guidance=3.0), eps, atol=1e-5)
    wrong = d.eps(lambda x, tt, tok: (s * eps - a * x0).repeat(2, 1, 1, 1), xt, t, tokens, 3.0)
    assert not torch.allclose(wrong, eps, atol=1e-2)  # v's coefficients swapped: caught


def test_ddim_recomputes_eps_from_the_clamped_x0():
    """Each DDIM step must be x_{t-1} = sqrt(ab_prev) x0_c + sqrt(1 - ab_prev) eps_c, where x0_c is
    the clamped x_0 estimate and eps_c = (x_t - sqrt(ab) x0_c) / sqrt(1 - ab) the noise it implies.
    Keeping the unclamped eps sends what the clamp cut off back into x_{t-1}, with the opposite
    sign under guidance: it once made V move the wrong way."""
    d, seen = Diffusion(CPU), []

    def model(x, t, tokens):  # the guided x_0 estimate of this fake leaves [-1, 1] at every step
        seen.append(x[: len(x) // 2].clone())  # the x_t it was called with (the conditional half)
        return 0.3 * x + 0.5 * (tokens.sum(1) > 0).float().view(-1, 1, 1, 1, 1)

    tokens = data.tokenize(["a red circle moving left"] * 2)
    steps, guidance = 4, 3.0
    final = d.sample(
        model, (2, 3, 2, 4, 4), tokens, steps, guidance, torch.Generator().manual_seed(0)
    )
    ts = torch.linspace(d.T - 1, 0, steps).round().long().tolist()
    clamped_somewhere = False
    for i, t in enumerate(ts):
        x = seen[i]
        ab = d.alpha_bar[t]
        ab_prev = d.alpha_bar[ts[i + 1]] if i + 1 < steps else torch.tensor(1.0)
        eps = d.eps(model, x, t, tokens, guidance)
        seen.pop()  # that call was ours, not the sampler's
        x0 = (x - (1 - ab).sqrt() * eps) / ab.sqrt()
        clamped_somewhere |= bool((x0.abs() > 1).any())
        x0_c = x0.clamp(-1, 1)
        eps_c = (x - ab.sqrt() * x0_c) / (1 - ab).sqrt()
        expected = ab_prev.sqrt() * x0_c + (1 - ab_prev).sqrt() * eps_c
        got = seen[i + 1] if i + 1 < steps else final
        assert torch.allclose(got, expected, atol=1e-5), f"step {i} (t = {t})"
        # the old sampler's x_{t-1}, with the unclamped eps, is measurably different
        if i + 1 < steps:
            assert not torch.allclose(
                got, ab_prev.sqrt() * x0_c + (1 - ab_prev).sqrt() * eps, atol=1e-3
            )
    assert clamped_somewhere


def test_the_cuda_bf16_autocast_path_runs_the_unet_in_bf16_and_keeps_fp32_weights(monkeypatch):
    """CI has no GPU: run the loss and the guided sampler under the bf16 autocast that CUDA gets.
    The UNet must then compute in bf16 (its output is bf16), while its weights, their gradients and
    the sampled videos stay fp32."""
    monkeypatch.setattr(
        train, "autocast", lambda device: torch.autocast("cpu", dtype=torch.bfloat16)
    )
    (_, v), d, (x, _, tokens) = tiny(), Diffusion(CPU), inputs()
    outputs = []
    v.register_forward_hook(lambda module, args, out: outputs.append(out.dtype))
    loss = d.loss(v, x.clamp(-1, 1), tokens, torch.Generator().manual_seed(0))
    loss.backward()
    assert outputs == [torch.bfloat16] and torch.isfinite(loss)
    grads = [p.grad for p in v.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 for g in grads)
    videos = d.sample(
        v, x.shape, tokens, steps=3, guidance=3.0, gen=torch.Generator().manual_seed(0)
    )
    assert outputs[1:] == [torch.bfloat16] * 3  # one guided call per sampler step
    assert videos.dtype == torch.float32 and torch.isfinite(videos).all()


def test_training_lowers_the_loss(tmp_path):
    cfg = train.Config(
        preset="quick", size=8, ch=8, text_dim=16, frames=4, max_frames=4, ema=0.0, ckpt_every=10**6
    )
    run = Run(cfg, str(tmp_path), CPU, store=str(tmp_path / "store"))
    m, _ = tiny()
    x, _ = data.image_batch([data.random_clip(np.random.default_rng(i)) for i in range(8)], 8, 4, 0)
    tok = data.tokenize(["a red circle"] * 8)

    def fixed():  # the loss at one fixed noise and timestep draw
        return run.diffusion.loss(m, x, tok, torch.Generator().manual_seed(0), drop_text=0)

    def loss(rng, gen):
        return run.diffusion.loss(m, x, tok, gen)

    before = fixed().item()
    train.train_loop(run, "t2i", m, list(m.parameters()), loss, 200, 3e-3)
    assert fixed().item() < 0.5 * before


def test_nan_loss_names_the_stage_and_step(tmp_path):
    run = Run(train.Config(preset="quick"), str(tmp_path), CPU, store=str(tmp_path / "store"))
    m, _ = tiny()
    with pytest.raises(train.TrainingError, match="'t2v'.*step 0"):
        train.train_loop(
            run,
            "t2v",
            m,
            list(m.parameters()),
            lambda rng, gen: m.conv_in.weight.sum() * float("nan"),
            3,
            1e-3,
        )


# ------------------------------------------------------------------------------ the synthetic world


def test_renderer_is_deterministic_and_videos_move_at_the_set_speed():
    clip = data.Clip("triangle", "blue", "up")
    a, b = data.render_video(clip, 16, 8, 3), data.render_video(clip, 16, 8, 3)
    assert np.array_equal(a, b) and not np.array_equal(a, data.render_video(clip, 16, 8, 4))
    centres = np.array([data.classify(a[:, f])[2] for f in range(8)])
    # per frame; single steps jitter by the 1/4 px supersampling grid
    velocity = (centres[-1] - centres[0]) / 7
    assert np.allclose(velocity, [0, -data.speed(16, 8)], atol=0.03)
    frozen = data.freeze(torch.from_numpy(a)[None], np.random.default_rng(0))[0].numpy()
    assert data.video_metrics(frozen, clip)["travel"] < 1e-6


def test_an_object_that_jitters_in_place_does_not_travel():
    """An object that jitters in place does not travel; one that glides steadily does not jitter."""
    clip = data.Clip("circle", "red", "right")
    # +-0.6 px, 8 frames
    shaky = np.stack([data.render(clip, 8 + 0.6 * (-1) ** f, 8, 16) for f in range(8)], axis=1)
    glide = np.stack([data.render(clip, 5 + 0.8 * f, 8, 16) for f in range(8)], axis=1)
    still, moving = data.video_metrics(shaky, clip), data.video_metrics(glide, clip)
    # steps of 1.2 px that end where they began
    assert still["travel"] < 0.2 and still["jitter"] > 0.9
    assert abs(moving["travel"] - 0.8) < 0.05 and moving["jitter"] < 0.05


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_renders_videos_that_stay_in_the_frame(preset):
    cfg = PRESETS[preset]
    for seed, direction in enumerate(data.DIRECTIONS):
        video = data.render_video(
            data.Clip("subject", "subject", direction), cfg.size, cfg.frames, seed
        )
        assert video.shape == (3, cfg.frames, cfg.size, cfg.size)
        # the whole star in every frame: nothing cut off at the border
        visible = video.max(0).sum((1, 2))
        # anti-aliasing alone moves it by up to 4%
        assert np.allclose(visible, visible[0], rtol=0.06)


def test_shifted_stills_keep_the_whole_shape_on_their_own_ground_and_go_anywhere():
    """Augmentation moves each still's shape to a random place where it stays whole. Every pixel is
    kept (a roll of the still's own ground: black padding once drew stripes that M1 learned as part
    of the style), the shape is not cut at the border nor wrapped around it, and it travels farther
    than the 2 px that let M1 memorise where its stills put it (NOTES.md, finding 11)."""

    def box_and_centre(image):
        frame = ((image + 1) / 2).numpy()
        ground = data.background(frame)
        ys, xs = np.nonzero(data._foreground(frame, ground) > 0.01)
        return (ys.max() - ys.min(), xs.max() - xs.min()), data._centroid(frame, ground)

    for concept in ("style", "subject"):
        stills, _ = data.concept_stills(concept, 12, 16, 8, 0, QUICK.style_ground)
        farthest = 0.0
        for seed in range(6):
            shifted = data.shift(stills, np.random.default_rng(seed))
            assert torch.equal(
                shifted.flatten(1).sort(dim=1).values, stills.flatten(1).sort(dim=1).values
            )
            for before, after in zip(stills, shifted):
                (box, centre), (moved_box, moved_centre) = (
                    box_and_centre(before),
                    box_and_centre(after),
                )
                assert moved_box == box  # a shape wrapped round the border would span the frame
                farthest = max(farthest, float(np.abs(moved_centre - centre).max()))
        assert farthest > 3


def test_style_stills_show_every_colour_and_shape():
    """A style is shown on varied content: 12 stills are each colour x shape once, whatever the
    seed, and the images carry what the prompts say. (Drawn at random, seed 1's stills had no green
    shape, and M1 drew green shapes wrongly in the style.)"""
    for seed in range(3):
        stills, prompts = data.concept_stills("style", 12, 16, 8, seed, QUICK.style_ground)
        contents = {tuple(p.split()[1:3]) for p in prompts}
        assert contents == {(color, shape) for color in data.COLORS for shape in data.SHAPES}
        for image, prompt in zip(((stills + 1) / 2).numpy(), prompts):
            label = data.classify(image)[0]
            assert (label.color, label.kind, label.style) == (
                prompt.split()[1],
                prompt.split()[2],
                True,
            )
    _, subject = data.concept_stills("subject", 12, 16, 8, seed=0)
    assert set(subject) == {"a sks object"}


@pytest.mark.parametrize("ground", [0.2, 0.4, 0.6, 0.85])
def test_the_style_is_recognised_on_any_grey_ground_and_black_is_not_the_style(ground):
    """The classifier tells the style by its ground differing from black, whatever its grey: every
    colour and shape of the style's stills is read right, on the style's ground."""
    stills, prompts = data.concept_stills("style", 12, 16, 8, 0, ground)
    for image, prompt in zip(((stills + 1) / 2).numpy(), prompts):
        label = data.classify(image)[0]
        assert (label.color, label.kind, label.style) == (*prompt.split()[1:3], True), prompt
        assert abs(label.ground - ground) < 0.01
    black = data.render_video(data.Clip("circle", "red", "left"), 16, 8, seed=0)[:, 0]
    assert not data.classify(black)[0].style
    with pytest.raises(ValueError, match="style_ground=0.1"):
        train.Config(style_ground=0.1)


def test_tokenizer_rejects_unknown_words_with_the_vocabulary():
    with pytest.raises(ValueError, match="unknown word 'purple'.*the vocabulary is: a red"):
        data.tokenize(["a purple circle"])
    assert data.tokenize([""]).sum() == 0  # the null prompt is all padding


@pytest.mark.parametrize("concept", [None, "subject", "style"])
def test_metrics_score_real_videos_ideal_and_corrupted_ones_worse(concept):
    rng = np.random.default_rng(5)
    clips = [data.random_clip(rng, concept, QUICK.style_ground) for _ in range(8)]
    real = [data.render_video(c, 16, 8, i) for i, c in enumerate(clips)]
    ideal = data.summarize([data.video_metrics(v, c) for v, c in zip(real, clips)])
    assert (
        ideal["direction_accuracy"] == 1
        and ideal["prompt_fidelity"] == 1
        and ideal["temporal_consistency"] == 1
    )
    assert ideal["artifacts"] == 0 and abs(ideal["travel"] - data.speed(16, 8)) < 0.1
    assert ideal["custom_fidelity"] == (None if concept is None else 1)

    # 10% of pixels get a random colour
    def speckle(v, i):
        lit = np.random.default_rng(i + 9).random(v.shape[1:]) < 0.1
        return np.where(lit, np.random.default_rng(i).uniform(0, 1, v.shape), v)

    noisy = [speckle(v, i) for i, v in enumerate(real)]
    worse = data.summarize([data.video_metrics(v, c) for v, c in zip(noisy, clips)])
    assert worse["artifacts"] > 0.02
    other = (
        data.Clip("square", "green", "left")
        if concept != "style"
        else data.Clip("circle", "red", "left")
    )
    # the wrong thing, shown perfectly
    swapped = [data.render_video(other, 16, 8, i) for i in range(8)]
    swapped = data.summarize([data.video_metrics(v, c) for v, c in zip(swapped, clips)])
    assert swapped["prompt_fidelity"] < 1 and (concept is None or swapped["custom_fidelity"] == 0)


# ---------------------------------------------------------------------------- stages and the recipe


def claim_rows(changes=()):
    """A results table whose answers are known: 32 videos a row, every row healthy and alike (V's
    numbers), except where `changes` gives a row's metric, as (method, concept, metric) -> one
    value for every video, or a list of per-video values."""
    keys = ("travel", "jitter", "direction_accuracy", "custom_fidelity", "prompt_fidelity")
    keys += ("temporal_consistency", "artifacts")
    healthy = dict(zip(keys, (0.8, 0.05, 1.0, 1.0, 1.0, 1.0, 0.0)))
    table = {
        ("motion_adapter", None, 1.0, "ordinary"): {"travel": 0.05},
        ("motion_adapter", None, -1.0, "ordinary"): {"travel": 1.0},
        ("base_t2v", None, None, "ordinary"): {},
    }
    for c in stillmoving.CONCEPTS:
        table["naive_injection", c, None, "concept"] = {"jitter": 1.5}  # it jitters
        table["naive_injection", c, 1.0, "concept"] = {
            "travel": 0.05,
            "jitter": 0.1,
        }  # switched off
        table["still_moving", c, None, "concept"] = {}
        table["still_moving", c, None, "ordinary"] = {}
        table["no_motion_adapter", c, None, "concept"] = {"travel": 0.2}  # it froze
        table["no_prior_preservation", c, None, "ordinary"] = {"prompt_fidelity": 0.5}
    for (method, concept, *alpha, key), value in dict(changes).items():
        for (*head, prompts), changed in table.items():
            wanted = [method, concept, *(alpha or [None])]
            if head == wanted and prompts == ("concept" if concept else "ordinary"):
                changed[key] = value
    rows = []
    for (method, concept, alpha, prompts), changed in table.items():
        values = {**healthy, **changed}
        spread = {k: np.broadcast_to(v, 32) for k, v in values.items()}
        videos = [{k: float(spread[k][i]) for k in keys} for i in range(32)]
        head = {"method": method, "concept": concept, "alpha": alpha, "prompts": prompts}
        means = {k: float(np.mean(spread[k])) for k in keys}
        rows.append({**head, "n_videos": 32, **means, "videos": videos})
    m1_image = {"custom_fidelity": 1.0, "videos": [{"custom_fidelity": 1.0}] * 32}
    params = {"unet": 1000, "motion_adapter": 10, "spatial_adapter": 10}
    return rows, params, dict.fromkeys(stillmoving.CONCEPTS, m1_image)


def verdicts(changes=()):
    claims = stillmoving.check_claims(*claim_rows(changes))
    return {c["id"]: c["verdict"] for c in claims}


def test_every_claim_of_a_table_whose_answers_are_known_holds():
    found = verdicts()
    assert len(found) == 19 and set(found.values()) == {"HOLDS"}, found


def test_a_bar_holds_far_inside_fails_far_outside_and_straddled_is_inconclusive():
    """C4b: the ablation's travel at most 50% of V's. 25% HOLDS, 100% FAILS; videos that travel
    0 or 0.8 at random around a mean of 0.4 (50%) cannot tell, whatever the verdict wanted."""
    key = ("no_motion_adapter", "style", "travel")
    assert verdicts({key: 0.2})["C4b_style"] == "HOLDS"
    assert verdicts({key: 0.8})["C4b_style"] == "FAILS"
    half = np.random.default_rng(0).permutation([0.0, 0.8] * 16)
    assert verdicts({key: half})["C4b_style"] == "INCONCLUSIVE"


def test_a_comparison_is_inconclusive_when_its_interval_contains_zero_and_fails_the_other_way():
    """C3a_style: naive injection no worse than V on any symptom cannot show that it breaks the
    style; better than V on every symptom, it FAILS. C3b: Still-Moving worse on one symptom
    FAILS, whatever it repairs."""
    same = verdicts({("naive_injection", "style", "jitter"): 0.05})
    assert same["C3a_style"] == "INCONCLUSIVE" and same["C3b_style"] == "INCONCLUSIVE"
    better = {("naive_injection", "style", "jitter"): 0.0}  # calmer than V's 0.05
    better["naive_injection", "style", "artifacts"] = -0.01  # and fewer stray pixels, etc.
    better["naive_injection", "style", "temporal_consistency"] = 1.01
    better["naive_injection", "style", "custom_fidelity"] = 1.01
    assert verdicts(better)["C3a_style"] == "FAILS"
    hurt = verdicts({("still_moving", "subject", "artifacts"): 0.02})
    assert hurt["C3b_subject"] == "FAILS" and hurt["C3b_style"] == "HOLDS"


def test_the_switch_on_the_customized_model_needs_both_stillness_and_calm():
    """C1b: at alpha = 1 the injected model travels at most 25% of V's and jitters at most 0.5
    px/frame. Either missed over its whole interval FAILS; both met HOLDS; a jitter straddling
    0.5 leaves it open."""
    leak = verdicts({("naive_injection", "style", 1.0, "travel"): 0.8})
    assert leak["C1b_style"] == "FAILS" and leak["C1b_subject"] == "HOLDS"
    assert verdicts({("naive_injection", "style", 1.0, "jitter"): 4.5})["C1b_style"] == "FAILS"
    shaky = np.random.default_rng(0).permutation([0.0, 1.0] * 16)  # 0.5 px/frame on average
    found = verdicts({("naive_injection", "style", 1.0, "jitter"): shaky})
    assert found["C1b_style"] == "INCONCLUSIVE"


def test_pairing_narrows_the_interval_of_a_difference_between_rows_that_share_their_noise():
    """Two rows sampled from the same seeds share each video's noise: resampled together, their
    difference is sharp; resampled apart, the noise they share hides it."""
    rng = np.random.default_rng(0)
    shared = rng.normal(0, 0.5, 32)  # what the seed of video i does to both rows
    a, b = shared + 0.1 + rng.normal(0, 0.02, 32), shared
    _, low, high = stillmoving.interval(a, b, stillmoving.difference, paired=True)
    _, low_apart, high_apart = stillmoving.interval(a, b, stillmoving.difference, paired=False)
    assert low > 0 and low_apart < 0 < high_apart
    assert high - low < 0.2 * (high_apart - low_apart)


def test_the_same_seed_gives_the_same_verdicts_and_intervals():
    noisy = {("still_moving", "style", "travel"): np.random.default_rng(1).uniform(0, 1.6, 32)}
    first, again = (stillmoving.check_claims(*claim_rows(noisy)) for _ in range(2))
    assert first == again


def test_each_ablation_changes_exactly_one_thing():
    reference = stillmoving.VARIANTS["still_moving"]
    for name, variant in stillmoving.VARIANTS.items():
        assert variant.keys() == reference.keys(), name
        changed = [key for key in reference if variant[key] != reference[key]]
        assert len(changed) == (0 if name == "still_moving" else 1), name


def test_test_time_still_moving_has_spatial_adapters_and_no_motion_adapter(quick_run):
    """Sec. 3.3: at test time the motion adapter is removed and the spatial adapters stay; the
    model a row samples is the recipe's own test-time model. Naive injection has no spatial
    adapter, and at alpha = 1 it carries the motion adapter."""
    _, _, parts = quick_run
    x, t, tok = inputs(frames=QUICK.frames, size=QUICK.size)
    for concept in stillmoving.CONCEPTS:
        model = stillmoving.build(parts, "still_moving", concept)
        spatial = lora.adapters(model, SPATIAL)
        assert len(spatial) == len(model.temporal_blocks()) and not lora.adapters(model, MOTION)
        with torch.no_grad():
            assert torch.equal(model(x, t, tok), parts["models"][concept](x, t, tok))
        naive = stillmoving.build(parts, "naive_injection", concept, alpha=1.0)
        assert lora.adapters(naive, MOTION) and not lora.adapters(naive, SPATIAL)
    with pytest.raises(ValueError, match="unknown method 'still_movin'"):
        stillmoving.build(parts, "still_movin", "style")


def test_stage_reuse_and_a_changed_field_remakes_the_stage(tmp_path):
    calls = []

    def make():
        calls.append(1)
        return {"w": torch.ones(2)}

    store = str(tmp_path / "store")
    first = Run(QUICK, str(tmp_path / "a"), CPU, store=store).stage("t2i", make)
    elsewhere = Run(QUICK, str(tmp_path / "b"), CPU, store=store).stage("t2i", make)
    assert torch.equal(first["w"], torch.ones(2)) and torch.equal(elsewhere["w"], torch.ones(2))
    assert len(calls) == 1  # reused, whatever folder the run writes to
    wider_config = train.Config(**{**QUICK.__dict__, "ch": 24})
    with pytest.raises(train.ConfigMismatch, match="ch=16 .now 24."):
        Run(wider_config, str(tmp_path / "c"), CPU, make=False, store=store).stage("t2i", make)
    assert len(calls) == 1  # sampling never trains
    wider = Run(wider_config, str(tmp_path / "c"), CPU, store=store)
    wider.stage("t2i", make)
    assert len(calls) == 2  # a recipe makes it, beside the first
    assert len(glob.glob(os.path.join(store, "t2i", "*.pt"))) == 2
    Run(QUICK, str(tmp_path / "a"), CPU, store=store, fresh=True).stage("t2i", make)
    assert len(calls) == 3  # --fresh makes this config's stage again
    with pytest.raises(ValueError, match="unknown stage 'demo'"):
        wider.stage("demo", make)


def remade(folder, **changes):
    """The stages whose signature a config change alters: those a re-run makes again."""
    before = Run(QUICK, str(folder), CPU, store=str(folder))
    after = Run(train.Config(**{**QUICK.__dict__, **changes}), str(folder), CPU, store=str(folder))
    stages = [*train.STAGES]
    for concept in stillmoving.CONCEPTS:
        stages += [f"spatial_{concept}_{variant}" for variant in stillmoving.VARIANTS]
    return {s for s in stages if before.signature(s) != after.signature(s)}


def test_a_changed_field_remakes_exactly_the_stages_that_read_it(tmp_path):
    spatial = {f"spatial_{c}_{v}" for c in ("subject", "style") for v in stillmoving.VARIANTS}
    style_spatial = {s for s in spatial if "_style_" in s}
    assert remade(tmp_path, spatial_rank=4) == spatial
    assert remade(tmp_path, style_steps=7) == {"custom_style", "m1_images_style"} | style_spatial
    assert remade(tmp_path, motion_steps=7) == {"motion_adapter"} | spatial
    assert remade(tmp_path, t2v_steps=7) == {"t2v", "motion_adapter"} | spatial
    assert remade(tmp_path, seed=1) == set(train.STAGES) | spatial  # everything
    assert remade(tmp_path, image_batch=4) == set(train.STAGES) | spatial  # M is below everything
    m1_stages = set(train.STAGES) - {"t2i", "t2v", "motion_adapter"}
    assert remade(tmp_path, custom_batch=4) == m1_stages | spatial  # M and V kept
    assert remade(tmp_path, m1_text_encoder=True) == m1_stages | spatial
    assert remade(tmp_path, n_prior_images=2) == m1_stages | spatial
    assert remade(tmp_path, n_m1_images=2) == {"m1_images_subject", "m1_images_style"} | spatial
    assert remade(tmp_path, sample_steps=5) == m1_stages | spatial  # M1 learns from M's samples
    assert remade(tmp_path, eval_videos=8, ckpt_every=3, preset="other") == set()


def snapshot(*folders):
    """Every file under the folders, with its bytes."""
    found = {}
    for folder in folders:
        for path in glob.glob(os.path.join(folder, "**", "*"), recursive=True):
            if os.path.isfile(path):
                found[path] = open(path, "rb").read()
    return found


def test_other_runs_reuse_m_v_and_m1_and_leave_every_earlier_stage_and_result_untouched(
    quick_run, store, tmp_path
):
    """`--set spatial_rank=2` makes only the spatial adapters, from the earlier run's M, V and M1
    (no copy); it and `--seed 1` change no file the earlier run made, and a run of another config
    into the earlier run's folder is refused."""
    run, results, _ = quick_run
    before = snapshot(run.dir, store)
    narrow = train.Config(**{**QUICK.__dict__, "spatial_rank": 2})
    found = stillmoving.main(narrow, str(tmp_path / stillmoving.run_name(narrow)), CPU)
    made = {stage for stage, how in found["stages"].items() if not how["reused"]}
    assert made == {f"spatial_{c}_{v}" for c in ("subject", "style") for v in stillmoving.VARIANTS}
    assert found["stages"]["t2i"]["file"] == results["stages"]["t2i"]["file"]
    assert found["params"]["spatial_adapter"] < results["params"]["spatial_adapter"]
    seed_1 = train.Config(**{**QUICK.__dict__, "seed": 1})
    assert stillmoving.run_name(seed_1) == "quick-seed1"
    stillmoving.main(seed_1, str(tmp_path / stillmoving.run_name(seed_1)), CPU)
    after = snapshot(run.dir, store)
    assert all(after[path] == content for path, content in before.items())
    with pytest.raises(train.ConfigMismatch, match="holds a run of another config .seed=0"):
        stillmoving.main(seed_1, run.dir, CPU)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("quick") / "run")
    results = stillmoving.main(QUICK, out, CPU)
    run = Run(QUICK, out, CPU)
    return run, results, stillmoving.recipe(run)


def test_quick_run_writes_every_output(quick_run):
    run, results, _ = quick_run
    for name, frames in (
        ("figure.gif", QUICK.frames),
        ("alpha_dial.gif", QUICK.frames),
        ("figure.png", 1),
        ("alpha_dial.png", 1),
    ):
        with Image.open(os.path.join(run.dir, name)) as im:
            assert getattr(im, "n_frames", 1) == frames
            assert im.width <= 2000
    with open(os.path.join(run.dir, "config.json")) as f:
        assert train.Config(**{**json.load(f), "mults": QUICK.mults}) == QUICK
    with open(os.path.join(run.dir, "results.json")) as f:
        saved = json.load(f)
    assert set(saved) >= {
        "preset",
        "device",
        "seed",
        "resolution",
        "frames",
        "stages",
        "total_seconds",
        "params",
        "m1_images",
        "rows",
        "claims",
    }
    methods = {(r["method"], r["concept"], r["alpha"]) for r in saved["rows"]}
    assert all(
        (method, concept, None) in methods
        for concept in ("subject", "style")
        for method in (
            "real",
            "naive_injection",
            "still_moving",
            "no_motion_adapter",
            "no_prior_preservation",
        )
    )
    assert {a for m, _, a in methods if m == "motion_adapter"} == {1.0, 0.5, 0.0, -0.5, -1.0}
    assert all(r["n_videos"] == QUICK.eval_videos for r in saved["rows"])
    assert {c["id"][:2] for c in saved["claims"]} == {"C1", "C2", "C3", "C4", "C5", "C6", "C7"}
    table = open(os.path.join(run.dir, "results.md")).read()
    found = [c["verdict"] for c in saved["claims"]]
    assert set(found) <= {"HOLDS", "INCONCLUSIVE", "FAILS"}
    counts = ", ".join(f"{found.count(v)} {v}" for v in ("HOLDS", "INCONCLUSIVE", "FAILS"))
    assert f"Claims: {counts}." in table
    assert all(f"| {c['id']}: {c['text']} | {c['verdict']} |" in table for c in saved["claims"])
    assert all(len(r["videos"]) == r["n_videos"] for r in saved["rows"])
    sizes = {stage: os.path.getsize(made["file"]) for stage, made in saved["stages"].items()}
    assert sizes["motion_adapter"] < sizes["t2v"] / 5  # adapters are small files of their own
    assert sizes["spatial_subject_still_moving"] < sizes["t2v"] / 5
    assert set(saved["stages"]["t2v"]) == {"file", "seconds", "threads", "device", "reused"}
    assert not os.path.exists(os.path.join(run.dir, "ckpt"))  # stages live in the store


def trained_model(monkeypatch, train, *inputs):
    """Run a stage's training function, and return the model its train_loop trained (the function
    itself returns only the adapter tensors the stage keeps) and those tensors."""
    seen, real = [], stillmoving.train_loop

    def spy(*args):
        seen.append(real(*args))
        return seen[-1]

    monkeypatch.setattr(stillmoving, "train_loop", spy)
    kept = train(*inputs)
    return seen[0], kept


def test_motion_adapter_at_alpha_zero_is_exactly_v_after_training(quick_run, monkeypatch):
    run, _, parts = quick_run
    run = Run(run.cfg, run.dir + "_motion", CPU)
    model, kept = trained_model(monkeypatch, stillmoving.train_motion_adapter, run, parts["v"])
    assert kept.keys() == lora.adapter_state_dict(model, MOTION).keys()
    assert all(m.A_up.abs().max() > 0 for m in lora.adapters(model, MOTION))
    x, t, tok = inputs(frames=QUICK.frames, size=QUICK.size)
    with torch.no_grad():
        assert torch.equal(lora.set_scale(model, 0.0)(x, t, tok), parts["v"](x, t, tok))
        assert not torch.allclose(
            lora.set_scale(model, 1.0)(x, t, tok), parts["v"](x, t, tok), atol=1e-5
        )


def test_spatial_training_changes_only_the_spatial_adapters(quick_run, monkeypatch):
    run, _, parts = quick_run
    run = Run(run.cfg, run.dir + "_spatial", CPU)
    v, m1 = parts["v"], parts["m1s"]["subject"]
    inputs_ = (run, v, m1, parts["motion_adapter"], parts["generated"]["subject"], "subject")
    model, kept = trained_model(monkeypatch, stillmoving.train_spatial_adapters, *inputs_)
    assert kept.keys() == lora.adapter_state_dict(model, SPATIAL).keys()
    expected = stillmoving.inject(v, m1).state_dict()
    for k, t in model.state_dict().items():
        if is_adapter(k) and ".adapter." in k:
            continue
        ref = parts["motion_adapter"][k] if is_adapter(k) else expected[k.replace(".base.", ".")]
        # V's temporal weights, M1's injected weights, the motion adapter
        assert torch.equal(t, ref), k
    assert all(m.A_up.abs().max() > 0 for m in lora.adapters(model, SPATIAL))


def test_customized_unet_differs_from_m_while_its_text_encoder_and_v_temporal_are_unchanged(
    quick_run,
):
    _, _, parts = quick_run
    m, v, m1 = parts["m"], parts["v"], parts["m1s"]["style"]
    naive = stillmoving.inject(v, m1)
    changed = [k for k, t in t2i_state_dict(naive).items() if not torch.equal(t, m.state_dict()[k])]
    assert len(changed) > 10 and not any(k.startswith("text.") for k in changed)
    assert all(
        torch.equal(t, v.state_dict()[k]) for k, t in naive.state_dict().items() if is_temporal(k)
    )


# ------------------------------------------------------------------------------------------- sweeps


def stored(store, stage):
    return glob.glob(os.path.join(store, stage, "*[0-9a-f].pt"))  # finished stages, no partials


def test_a_sweep_makes_only_the_stages_that_differ_writes_its_table_and_resumes(
    tmp_path, monkeypatch, capsys
):
    """spatial_steps over 5 and 8 on seeds 0 and 1: M, V, M1 and the motion adapter once per seed,
    the spatial adapters once per run. Killed after two runs, it finishes the other two only."""
    store, out = str(tmp_path / "store"), str(tmp_path / "runs" / "sweep")
    monkeypatch.setenv("STILLMOVING_STORE", store)
    real_main, calls = stillmoving.main, []

    def killed_after_two(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 3:
            raise KeyboardInterrupt  # as a kill would stop it
        return real_main(*args, **kwargs)

    monkeypatch.setattr(stillmoving, "main", killed_after_two)
    sweep = ["sweep", "--preset", "quick", "--set", "spatial_steps=5,8", "--seeds", "0,1"]
    with pytest.raises(KeyboardInterrupt):
        stillmoving.cli(sweep + ["--out", out, "--workers", "1"])
    monkeypatch.setattr(stillmoving, "main", real_main)
    before = snapshot(store, *calls[:2])
    stillmoving.cli(sweep + ["--out", out, "--workers", "1"])
    assert "4 runs, 2 finished before" in capsys.readouterr().out
    after = snapshot(store, *calls[:2])
    assert all(after[path] == content for path, content in before.items())
    for stage in train.STAGES:
        assert len(stored(store, stage)) == 2, stage  # one per seed
    for concept in stillmoving.CONCEPTS:
        for variant in stillmoving.VARIANTS:
            assert len(stored(store, f"spatial_{concept}_{variant}")) == 4  # one per run
    table = open(os.path.join(out, "sweep.md")).read()
    assert "| 5 | 2 |" in table and "| 8 | 2 |" in table  # each value's counts over its 2 seeds
    assert "| 8 | 1 | C4b_style |" in table
    assert "| C6 | H H | H H |" in table  # a claim's verdicts by value, a letter per seed
    folders = sorted(os.listdir(tmp_path / "runs"))
    assert folders == ["quick-seed0", "quick-seed0-spatial_steps=8", "quick-seed1"] + [
        "quick-seed1-spatial_steps=8",
        "sweep",
    ]
    with Image.open(os.path.join(out, "sweep.png")) as im:
        assert im.width <= 2000 and im.height <= 2000


def test_runs_side_by_side_that_share_m_make_it_once(tmp_path, monkeypatch):
    """Two worker processes start two runs of one seed at once: one makes each shared stage while
    the other waits for it, then reuses it."""
    store = str(tmp_path / "store")
    monkeypatch.setenv("STILLMOVING_STORE", store)
    out = tmp_path / "runs" / "sweep"
    stillmoving.sweep(QUICK, ["spatial_steps=5,8"], [0], CPU, str(out), workers=2)
    assert len(stored(store, "t2i")) == 1 and len(stored(store, "t2v")) == 1
    made = []
    for folder in ("quick-seed0", "quick-seed0-spatial_steps=8"):
        results = json.loads((tmp_path / "runs" / folder / "results.json").read_text())
        made.append(not results["stages"]["t2i"]["reused"])
        assert results["stages"]["t2i"]["threads"] == 1  # a worker's one thread
    assert sorted(made) == [False, True]


def test_bad_sweep_arguments_get_one_line_errors(capsys):
    sweep = ["sweep", "--preset", "quick", "--seeds", "0", "--set"]
    assert "KEY=VALUE with KEY one of" in cli_error(sweep + ["colour=red,blue"], capsys)
    assert "spatial_rank takes a whole number" in cli_error(sweep + ["spatial_rank=2,b"], capsys)
    assert "no values" in cli_error(sweep + ["spatial_rank=,"], capsys)
    assert "varies one field" in cli_error(sweep + ["spatial_rank=2,4", "guidance=1,3"], capsys)
    assert "whole numbers" in cli_error(["sweep", "--preset", "quick", "--seeds", "0,x"], capsys)
    assert "no seeds" in cli_error(["sweep", "--preset", "quick", "--seeds", ","], capsys)
    assert "at least 1" in cli_error(["sweep", "--preset", "quick", "--workers", "-2"], capsys)


# -------------------------------------------------------------------------------------- reliability


def cli_error(argv, capsys):
    """Run the real command line in-process; return its one-line error message."""
    with pytest.raises(SystemExit) as exit_:
        stillmoving.cli(argv)
    message = (
        str(exit_.value.code) if not isinstance(exit_.value.code, int) else capsys.readouterr().err
    )
    assert exit_.value.code != 0 and message.strip()
    return message


def test_bad_input_gets_one_line_errors(quick_run, capsys, tmp_path):
    run_dir = quick_run[0].dir
    sample = ["sample", "--run", run_dir, "--out", str(tmp_path / "c.gif"), "--prompt"]
    assert (
        "unknown word 'purple'" in (message := cli_error(sample + ["a purple sks object"], capsys))
        and "vocabulary" in message
    )
    assert "prompt is empty" in cli_error(sample + ["  "], capsys)
    assert "finite" in cli_error(sample + ["a sks object moving left", "--alpha", "nan"], capsys)
    assert "not a run folder" in cli_error(
        ["sample", "--run", str(tmp_path), "--prompt", "a sks object"], capsys
    )
    assert "invalid choice: 'huge'" in cli_error(["--preset", "huge"], capsys)
    assert "unknown device 'tpu'" in cli_error(["--device", "tpu"], capsys)
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in cli_error(["--device", "cuda"], capsys)
    (tmp_path / "file").write_text("")
    assert "cannot write the folder" in cli_error(
        ["--preset", "quick", "--out", str(tmp_path / "file" / "run")], capsys
    )
    assert "max_frames=16" in cli_error(
        ["--preset", "quick", "--out", str(tmp_path / "r"), "--set", "frames=40"], capsys
    )
    assert "KEY=VALUE" in cli_error(["--preset", "quick", "--set", "colour=red"], capsys)
    assert "spatial_rank takes a whole number" in cli_error(
        ["--preset", "quick", "--set", "spatial_rank=abc"], capsys
    )


def test_run_folders_made_by_an_older_version_are_refused(quick_run, capsys, tmp_path):
    shutil.copytree(quick_run[0].dir, tmp_path / "old")
    with open(tmp_path / "old" / "config.json") as f:
        config = json.load(f)
    config["adapter_lr"] = 1e-3  # a field this code renamed (motion_lr, spatial_lr)
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    sample = ["sample", "--run", str(tmp_path / "old"), "--prompt", "a sks object moving left"]
    message = cli_error(sample, capsys)
    assert "no longer has (adapter_lr)" in message and "--fresh" in message
    os.remove(tmp_path / "old" / "config.json")
    assert "not a run folder (no config.json)" in cli_error(sample, capsys)
    os.makedirs(tmp_path / "older" / "ckpt")  # stages kept in the run folder: the older layout
    message = cli_error(["--preset", "quick", "--out", str(tmp_path / "older")], capsys)
    assert "older version" in message and "store" in message
    assert os.path.isdir(tmp_path / "older" / "ckpt")  # refused, and nothing deleted


def test_sample_refuses_a_stage_made_with_another_config(quick_run, capsys, tmp_path):
    """Sampling never trains: a stage whose signature does not match config.json is an error."""
    shutil.copytree(quick_run[0].dir, tmp_path / "run")
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    (tmp_path / "run" / "config.json").write_text(json.dumps({**config, "motion_rank": 2}))
    sample = ["sample", "--run", str(tmp_path / "run"), "--prompt", "a sks object moving left"]
    assert "motion_rank=4 (now 2)" in cli_error(sample, capsys)


def test_set_reads_numbers_tuples_and_truth_values():
    args = stillmoving.parse(["--set", "spatial_lr=0.01", "mults=1,2,2", "m1_text_encoder=True"])
    cfg = stillmoving.config_from(args)
    assert cfg.mults == (1, 2, 2) and cfg.spatial_lr == 0.01 and cfg.m1_text_encoder is True
    with pytest.raises(ValueError, match="m1_text_encoder takes true or false"):
        stillmoving.config_from(stillmoving.parse(["--set", "m1_text_encoder=1"]))


def test_one_default_preset_on_every_device(capsys):
    assert stillmoving.config_from(stillmoving.parse([])) == PRESETS["small"]
    with pytest.raises(SystemExit):
        stillmoving.parse(["--help"])
    assert "small (the default on every device" in " ".join(capsys.readouterr().out.split())
    assert set(PRESETS) == {"small", "quick"}


def test_the_figure_draws_each_video_path(tmp_path):
    """A cell's trail spans the object's travel: across the frame for a moving video, a spot for a
    still one (a frozen video), so that a reader sees which row moves without the animation."""
    size, frames, cell = 16, 8, 128
    moving = data.render_video(data.Clip("square", "red", "left"), size, frames, seed=0)
    still = data.repeat_frames(torch.from_numpy(moving[:, 0])[None], frames)[0].numpy()
    stillmoving.save_figure(
        str(tmp_path / "fig"), [[moving, still]], ["row"], ["moving", "still"], "t"
    )
    picture = np.asarray(Image.open(tmp_path / "fig.png").convert("RGB")).astype(int)
    trail = np.abs(picture - np.array(stillmoving.TRAIL)).sum(-1) < 30  # the trail's own colour
    columns = np.nonzero(trail.any(0))[0]
    left_cell = columns[columns < columns.min() + cell]
    right_cell = columns[columns >= columns.min() + cell]
    travel = data.speed(size, frames) * (frames - 1) * (cell // size)  # in figure pixels
    assert abs((left_cell.max() - left_cell.min()) - travel) < 14  # ring and dot add ~10 px
    assert right_cell.max() - right_cell.min() <= 12  # a ring round a dot
    with Image.open(tmp_path / "fig.gif") as gif:
        assert gif.n_frames == frames and gif.size == (picture.shape[1], picture.shape[0])


def test_a_one_cell_figure_keeps_its_legend_inside_the_picture(tmp_path):
    """`sample` draws one cell: the picture must be wide enough for its title and legend."""
    video = data.render_video(data.Clip("square", "red", "left"), 16, 8, seed=0)
    path = str(tmp_path / "clip")
    stillmoving.save_figure(path, [[video]], ["stillmoving"], ["a red square moving left"], "t")
    picture = np.asarray(Image.open(path + ".png").convert("RGB"))
    ink = np.nonzero((picture < 200).any(-1).any(0))[0]  # the columns anything is drawn in
    assert ink.max() < picture.shape[1] - 4


def test_sample_command_writes_a_clip(quick_run, tmp_path):
    out = tmp_path / "clip.gif"
    stillmoving.cli(
        [
            "sample",
            "--run",
            quick_run[0].dir,
            "--prompt",
            "a sks object moving left",
            "--alpha",
            "-1",
            "--out",
            str(out),
        ]
    )
    with Image.open(out) as im:
        assert im.n_frames == QUICK.frames


def test_pickled_payload_and_truncated_checkpoints_are_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    evil = tmp_path / "evil.pt"
    torch.save({"state": Payload()}, evil)
    with pytest.raises(train.CheckpointError, match="refused, it could run code.*re-make"):
        train.load_file(str(evil), "Run again to re-make it.")
    run = Run(QUICK, str(tmp_path), CPU, store=str(tmp_path / "store"))
    good = tmp_path / "good.pt"
    train.save_file({"w": torch.randn(1000)}, str(good))
    os.makedirs(os.path.dirname(run.path("t2v")))
    with open(run.path("t2v"), "wb") as f:
        f.write(good.read_bytes()[:300])
    with pytest.raises(train.CheckpointError, match="truncated or corrupt.*stage 't2v'"):
        run.stage("t2v", lambda: {})


def quick_command(tmp_path, *args):
    """The command line of a quick run into tmp_path/run, and an environment whose store is
    tmp_path/store: a store of its own, so that every stage is made."""
    argv = [sys.executable, os.path.join(HERE, "stillmoving.py"), "--preset", "quick"]
    env = {**os.environ, "STILLMOVING_STORE": str(tmp_path / "store")}
    return argv + ["--out", str(tmp_path / "run"), *args], env


def test_killed_run_resumes_and_reuses_finished_stages(tmp_path):
    argv, env = quick_command(tmp_path, "--set", "t2v_steps=300")
    partials = str(tmp_path / "store" / "t2v" / "*.partial.pt")
    proc = subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=HERE, env=env
    )
    deadline = time.time() + 120
    while not glob.glob(partials) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stored = glob.glob(str(tmp_path / "store" / "t2v" / "*.pt"))
    assert glob.glob(partials) and stored == glob.glob(partials)  # no finished t2v yet
    again = subprocess.run(argv, capture_output=True, text=True, cwd=HERE, timeout=300, env=env)
    log = again.stdout + again.stderr
    assert again.returncode == 0 and "[t2i] reused" in log and "[t2v] resuming at step" in log, log[
        -2000:
    ]
    assert os.path.exists(tmp_path / "run" / "results.json") and not glob.glob(partials)


def test_a_run_logged_to_a_file_prints_a_line_per_stage_not_progress_bars(tmp_path):
    argv, env = quick_command(tmp_path)
    out = subprocess.run(argv, capture_output=True, text=True, cwd=HERE, timeout=300, env=env)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-2000:]
    assert "\r" not in log and "it/s" not in log  # no bar redraws
    for stage in train.STAGES:
        assert f"[{stage}] made in" in log


def test_same_seed_gives_identical_metrics(quick_run, tmp_path):
    again = stillmoving.main(QUICK, str(tmp_path / "again"), CPU, store=str(tmp_path / "store"))
    assert not any(how["reused"] for how in again["stages"].values())  # every stage made again
    assert again["rows"] == quick_run[1]["rows"]


def test_a_stage_made_after_reused_stages_is_the_one_an_uninterrupted_run_makes(
    quick_run, tmp_path
):
    """The spatial adapters' random init must not depend on whether the motion adapter was trained
    in this process or reused from disk (it once did: a resumed run got other adapters, and other
    numbers)."""
    run, results, _ = quick_run
    for stage, how in results["stages"].items():
        if not stage.startswith("spatial_"):
            os.makedirs(tmp_path / "store" / stage)
            shutil.copy(how["file"], tmp_path / "store" / stage)
    torch.randn(7)  # whatever ran before in this process
    again = stillmoving.main(QUICK, str(tmp_path / "run"), CPU, store=str(tmp_path / "store"))
    assert again["rows"] == results["rows"]


def test_bench_reports_numbers_that_agree_with_each_other():
    """The MFU is the achieved FLOP/s over the matmul peak, and the achieved FLOP/s is the step's
    FLOPs over its time: each number printed is checked against the others it comes from."""
    out = subprocess.run(
        [sys.executable, os.path.join(HERE, "train.py"), "bench", "--preset", "quick"]
        + ["--device", "cpu"],
        capture_output=True,
        text=True,
        cwd=HERE,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "USDT" not in out.stdout + out.stderr  # no profiler chatter
    number = r"([\d.]+)"
    ms = float(re.search(rf"train: {number} ms/step", out.stdout).group(1))
    flop, achieved = re.search(
        rf"{number} GFLOP/step, {number} GFLOP/s achieved", out.stdout
    ).groups()
    peak = float(re.search(rf"matmul peak: {number} GFLOP/s", out.stdout).group(1))
    mfu = float(re.search(rf"MFU {number}", out.stdout).group(1))
    assert float(achieved) == pytest.approx(float(flop) / (ms / 1000), rel=0.02)
    assert 0 < mfu < 1 and mfu == pytest.approx(float(achieved) / peak, rel=0.02, abs=0.002)
