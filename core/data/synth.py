"""A synthetic ISIC 2018 Task 3 training set: same files, same formats, no patient data.

Seven kinds of lesion-like blobs on skin, told apart by colour, border, texture, pattern and
size, each drawn from overlapping distributions, photographed 1-4 times with a shifted,
rotated, relit view, under hair and sensor noise. A small CNN learns it at 32-64 px, but not
perfectly, so the quickstart and the tests exercise real learning on a laptop CPU.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from concurrent.futures import Executor, ProcessPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from skinclr.data.images import default_workers
from skinclr.data.manifest import GROUPINGS, TRAINING_GT, TRAINING_INPUT
from skinclr.names import CLASSES
from skinclr.data.problems import DataError

MARKER = "skinclr_synth.json"
WIDTH, HEIGHT = 200, 150  # the real images' size
CANVAS = 176  # side of the square on which a lesion is drawn before it is placed in a view
VIEWS_P = (0.45, 0.30, 0.17, 0.08)  # images per lesion: 1, 2, 3, 4
CONFIRM = ("histopathology", "serial imaging showing no change", "single image expert consensus",
           "confocal microscopy with consensus dermoscopy")

# Per class: share of lesions, core and secondary colour (RGB), how much of the secondary colour
# shows, radius (mean, sd; px), border irregularity (mean, sd), edge softness (px),
# texture (amplitude, noise cells), and a class pattern.
PROTOTYPES = {
    "MEL": dict(share=0.14, colour=(88, 58, 48), colour2=(80, 85, 110), mix=0.5, radius=(40, 9),
                irregular=(0.15, 0.05), edge=3.0, texture=(0.22, 9), pattern="dots"),
    "NV": dict(share=0.40, colour=(135, 92, 64), colour2=(105, 70, 50), mix=0.2, radius=(32, 8),
               irregular=(0.06, 0.03), edge=3.0, texture=(0.10, 6), pattern="network"),
    "BCC": dict(share=0.10, colour=(190, 135, 128), colour2=(95, 75, 85), mix=0.25, radius=(33, 8),
                irregular=(0.10, 0.04), edge=4.0, texture=(0.12, 8), pattern="vessels"),
    "AKIEC": dict(share=0.08, colour=(182, 108, 96), colour2=(150, 80, 75), mix=0.3, radius=(35, 9),
                  irregular=(0.12, 0.05), edge=5.0, texture=(0.20, 18), pattern="scales"),
    "BKL": dict(share=0.14, colour=(158, 114, 80), colour2=(118, 84, 60), mix=0.35, radius=(38, 10),
                irregular=(0.09, 0.04), edge=2.0, texture=(0.18, 12), pattern="ridges"),
    "DF": dict(share=0.07, colour=(150, 102, 82), colour2=(222, 196, 182), mix=0.0, radius=(23, 6),
               irregular=(0.05, 0.02), edge=6.0, texture=(0.08, 6), pattern="ring"),
    "VASC": dict(share=0.07, colour=(150, 48, 72), colour2=(92, 30, 58), mix=0.3, radius=(26, 7),
                 irregular=(0.06, 0.03), edge=1.5, texture=(0.08, 6), pattern="lobules"),
}

_YY, _XX = np.mgrid[0:CANVAS, 0:CANVAS].astype(np.float32) - (CANVAS - 1) / 2
_VY, _VX = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
_SCOPE = np.clip((0.98 - np.hypot(_VX - WIDTH / 2, _VY - HEIGHT / 2) / (0.5 * np.hypot(WIDTH, HEIGHT))) / 0.1,
                 0.04, 1)[..., None]  # a contact dermoscope's dark corners


def make_synthetic(out, n: int = 600, seed: int = 0, pool: Executor | None = None) -> Path:
    """Write n images in the official training layout to OUT (kept as is if already written).
    `pool`: worker processes to draw in, started by the caller (default: a process per core,
    started here)."""
    out = Path(out)
    if n < len(CLASSES):
        raise DataError(f"n={n}: a synthetic set needs at least {len(CLASSES)} images, one per class")
    if _matches(out, n, seed):
        return out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out}: {_holds(out)}; choose another folder or delete this one")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _write(tmp, n, seed, pool)
        try:
            os.rename(tmp, out)  # atomic: OUT is either complete or not there
        except OSError:
            if not _matches(out, n, seed):  # a concurrent call may have just written the same set
                raise DataError(f"{out}: {_holds(out)}; choose another folder or delete this one") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _matches(out: Path, n: int, seed: int) -> bool:
    try:
        return json.loads((out / MARKER).read_text()) == {"n": n, "seed": seed}
    except (OSError, ValueError):
        return False


def _holds(out: Path) -> str:
    if not out.is_dir():
        return "is a file"
    try:
        info = json.loads((out / MARKER).read_text())
        return f"already holds a synthetic set with n={info.get('n')}, seed={info.get('seed')}"
    except (OSError, ValueError):
        return "already exists and holds other files"


def _write(folder: Path, n: int, seed: int, pool: Executor | None) -> None:
    rng = np.random.default_rng(seed)
    images = folder / TRAINING_INPUT
    images.mkdir(parents=True)
    classes, views = _plan(rng, n)
    # Views of a lesion are not adjacent ids; each seed names its images (and lesions) apart, so a
    # set of another seed is other images under other ids, as a held-out set is.
    base = 9_000_000 + 100_000 * seed
    names = [f"ISIC_{base + i:07d}" for i in rng.permutation(n)]
    lesions, k = [], 0
    for lesion, (label, count) in enumerate(zip(classes, views)):
        lesions.append((lesion, label, names[k:k + count]))
        k += count
    # Each lesion draws from its own seed, so the images are the same however the lesions are shared out.
    workers = min(default_workers(), len(lesions) // 50) or 1
    jobs = [(images, seed, base, lesions[i::workers]) for i in range(workers)]
    if workers == 1:
        rows = _draw(jobs[0])
    else:
        with nullcontext(pool) if pool else ProcessPoolExecutor(workers) as drawing:
            rows = [row for part in drawing.map(_draw, jobs) for row in part]
    rows.sort()  # by image id
    gt = ["image," + ",".join(CLASSES)]
    gt += [f"{image}," + ",".join("1.0" if c == label else "0.0" for c in range(len(CLASSES)))
           for image, label, *_ in rows]
    (folder / TRAINING_GT).write_text("\n".join(gt) + "\n")
    groups = ["image,lesion_id,diagnosis_confirm_type"]
    groups += [f"{image},{lesion},{confirm}" for image, _, lesion, confirm in rows]
    (folder / GROUPINGS).write_text("\n".join(groups) + "\n")
    (images / "LICENSE.txt").write_text(
        "Synthetic images drawn by skinclr (core/data/synth.py); they show no patient and carry no\n"
        "clinical meaning. Dedicated to the public domain (CC0 1.0).\n")
    (folder / MARKER).write_text(json.dumps({"n": n, "seed": seed}))  # last: marks the set complete


def _draw(job: tuple) -> list[tuple[str, int, str, str]]:
    """Draw and save the images of some lesions: (image, label, lesion id, confirmation) each."""
    images, seed, base, lesions = job
    rows = []
    for lesion, label, names in lesions:
        lesion_rng = np.random.default_rng([seed, lesion])
        confirm = CONFIRM[lesion_rng.choice(len(CONFIRM), p=(0.55, 0.3, 0.1, 0.05))]
        for name, img in zip(names, _render_lesion(lesion_rng, CLASSES[label], len(names))):
            Image.fromarray(img).save(images / f"{name}.jpg", quality=90)
            rows.append((name, label, f"HAM_{base + lesion:07d}", confirm))
    return rows


def _plan(rng: np.random.Generator, n: int) -> tuple[list[int], list[int]]:
    """Class and view count of each lesion: every class at least once, then by share."""
    shares = np.array([PROTOTYPES[c]["share"] for c in CLASSES])
    classes, views, total = [], [], 0
    first = list(rng.permutation(len(CLASSES)))
    while total < n:
        label = first.pop() if first else int(rng.choice(len(CLASSES), p=shares))
        count = min(int(rng.choice(len(VIEWS_P), p=VIEWS_P)) + 1, n - total - len(first))  # leave room
        classes.append(label)
        views.append(count)
        total += count
    return classes, views


def _smooth_noise(rng: np.random.Generator, cells: int, shape=(CANVAS, CANVAS)) -> np.ndarray:
    """Zero-mean, unit-sd noise with features about shape/cells pixels wide."""
    coarse = Image.fromarray(rng.standard_normal((cells, cells)).astype(np.float32), mode="F")
    field = np.asarray(coarse.resize(shape[::-1], Image.Resampling.BICUBIC))
    return (field - field.mean()) / (field.std() + 1e-6)


def _blobs(rng: np.random.Generator, count: int, within: float, size: tuple[float, float], radius: float) -> np.ndarray:
    """Sum of `count` gaussian spots placed inside `within` of the lesion radius."""
    field = np.zeros(_XX.shape, np.float32)
    ang = rng.uniform(0, 2 * np.pi, count)
    dist = radius * within * np.sqrt(rng.uniform(0, 1, count))
    for a, d, s in zip(ang, dist, rng.uniform(*size, count)):
        field += np.exp(-((_XX - d * np.cos(a)) ** 2 + (_YY - d * np.sin(a)) ** 2) / (2 * s * s))
    return np.clip(field, 0, 1)


def _lesion_layer(rng: np.random.Generator, name: str) -> Image.Image:
    """One lesion as an RGBA image (alpha = the lesion's extent), centred on the canvas."""
    p = PROTOTYPES[name]
    radius = float(np.clip(rng.normal(*p["radius"]), 12, 62))
    elong = rng.uniform(0.75, 1.0)
    x, y = _XX / elong, _YY
    r, phi = np.hypot(x, y), np.arctan2(y, x)
    irregular = max(rng.normal(*p["irregular"]), 0.0)
    wobble = sum(rng.normal(0, irregular / k ** 0.5) * np.cos(k * phi + rng.uniform(0, 2 * np.pi))
                 for k in range(2, 9))
    border = radius * np.maximum(1 + wobble, 0.3)
    edge = p["edge"] * rng.uniform(0.6, 1.6)
    alpha = np.clip((border - r) / edge + 0.5, 0, 1)
    rho = r / border

    darkness = np.exp(rng.normal(0, 0.2))  # lesions of one class differ in overall tone...
    colour = np.array(p["colour"]) * darkness * np.exp(rng.normal(0, 0.1, 3))  # ...and hue
    colour2 = np.array(p["colour2"]) * np.exp(rng.normal(0, 0.07, 3))
    mix = np.clip(p["mix"] * rng.uniform(0.5, 1.5), 0, 1) / (1 + np.exp(-3 * _smooth_noise(rng, 5)))
    strength = rng.uniform(0.15, 1.0)  # how clearly the class pattern shows
    pattern = p["pattern"]
    if pattern == "dots":
        mix = np.maximum(mix, strength * _blobs(rng, int(rng.integers(6, 25)), 0.9, (1.5, 3.5), radius))
    elif pattern == "network":
        freq = rng.uniform(0.45, 0.7)
        net = (np.abs(np.sin(_XX * freq + 2 * _smooth_noise(rng, 8))) * np.abs(np.sin(_YY * freq))) < 0.2
        mix = np.maximum(mix, 0.6 * strength * net * (rho < 0.85))
    elif pattern == "ring":
        mix = np.maximum(mix, strength * np.exp(-(rho / rng.uniform(0.35, 0.55)) ** 2))
    elif pattern == "lobules":
        mix = np.maximum(mix, strength * _blobs(rng, int(rng.integers(4, 10)), 0.7, (3, 7), radius))
    rgb = colour * (1 - mix[..., None]) + colour2 * mix[..., None]

    amp, cells = p["texture"]
    rgb *= 1 + amp * rng.uniform(0.6, 1.4) * 0.5 * _smooth_noise(rng, cells)[..., None]
    if pattern == "scales":  # whitish keratin flakes
        flakes = np.clip(_smooth_noise(rng, 30) - 1.2, 0, 1) * strength * (rho < 0.9)
        rgb = rgb * (1 - flakes[..., None]) + np.array([236, 222, 212]) * flakes[..., None]
    elif pattern == "ridges":  # brain-like furrows
        furrows = np.abs(np.sin(4 * _smooth_noise(rng, 7))) < 0.25
        rgb *= 1 - 0.25 * strength * furrows[..., None]

    layer = Image.fromarray(np.dstack([np.clip(rgb, 0, 255), alpha * 255]).astype(np.uint8), mode="RGBA")
    if pattern == "vessels":  # thin branching red lines
        draw = ImageDraw.Draw(layer)
        c = CANVAS / 2
        for _ in range(int(rng.integers(2, 6))):
            pt = c + rng.normal(0, radius * 0.3, 2)
            heading = rng.uniform(0, 2 * np.pi)
            for _ in range(int(rng.integers(3, 7))):
                heading += rng.normal(0, 0.6)
                nxt = pt + rng.uniform(4, 10) * np.array([np.cos(heading), np.sin(heading)])
                draw.line([tuple(pt), tuple(nxt)], fill=(165, 35, 45, int(255 * strength)),
                          width=int(rng.integers(1, 3)))
                pt = nxt
        layer.putalpha(Image.fromarray((alpha * 255).astype(np.uint8)))
    return layer


def _render_lesion(rng: np.random.Generator, name: str, views: int) -> list[np.ndarray]:
    """`views` photographs of one lesion on one patient's skin."""
    layer = _lesion_layer(rng, name)
    skin = np.array([226, 174, 152]) * rng.uniform(0.72, 1.05) * np.exp(rng.normal(0, 0.04, 3))
    mottling = _smooth_noise(rng, 6, (HEIGHT, WIDTH))
    bare = Image.fromarray(np.clip(skin * (1 + 0.04 * mottling[..., None]), 0, 255).astype(np.uint8))
    hairiness = rng.choice([0, 1, 3, 6], p=(0.4, 0.25, 0.2, 0.15))
    scope = rng.random() < 0.3  # dark corners of a contact dermoscope
    centre = np.array([WIDTH / 2, HEIGHT / 2]) + rng.normal(0, 8, 2)
    angle = rng.uniform(0, 360)
    return [_view(rng, layer, bare, hairiness, scope, centre, angle) for _ in range(views)]


def _view(rng, layer, bare, hairiness, scope, centre, angle) -> np.ndarray:
    photo = bare.copy()
    zoom = rng.uniform(0.9, 1.1)
    size = round(CANVAS * zoom)
    moved = layer.rotate(angle + rng.normal(0, 20), resample=Image.Resampling.BILINEAR).resize(
        (size, size), Image.Resampling.BILINEAR)
    x, y = (centre + rng.normal(0, 6, 2) - size / 2).round().astype(int)
    photo.paste(moved, (int(x), int(y)), moved)

    draw = ImageDraw.Draw(photo)
    for _ in range(rng.poisson(hairiness)):
        pt = rng.uniform([0, 0], [WIDTH, HEIGHT])
        heading, bend = rng.uniform(0, 2 * np.pi), rng.normal(0, 0.08)
        shade = tuple(int(v) for v in rng.uniform(25, 70) * np.array([1.0, 0.8, 0.7]))
        width = int(rng.integers(1, 3))
        for _ in range(int(rng.integers(6, 20))):
            heading += bend
            nxt = pt + 8 * np.array([np.cos(heading), np.sin(heading)])
            draw.line([tuple(pt), tuple(nxt)], fill=shade, width=width)
            pt = nxt

    img = np.asarray(photo, dtype=np.float32)
    direction = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(direction) * (_VX - WIDTH / 2) + np.sin(direction) * (_VY - HEIGHT / 2)) / WIDTH
    light = rng.uniform(0.85, 1.1) * (1 + rng.uniform(0, 0.3) * ramp)
    img = img * light[..., None] * np.exp(rng.normal(0, 0.03, 3))
    if scope:
        img *= _SCOPE
    img += rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)
