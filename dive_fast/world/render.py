"""Deterministic renderer of the embedded world: small RGB images of objects with attributes.

A scene is a dict of attributes; ``render(scene, size)`` draws it with numpy alone, so the
same scene always gives the same bytes. Object masks come from point-in-shape tests on a
2x supersampled grid (cheap antialiasing).
"""
from __future__ import annotations

import numpy as np

SHAPES = ("circle", "square", "triangle", "diamond", "plus", "cross", "star", "heart",
          "ring", "crescent")
COLOURS = {"red": (0.9, 0.1, 0.1), "green": (0.1, 0.75, 0.2), "blue": (0.15, 0.3, 0.95),
           "yellow": (0.95, 0.9, 0.1), "purple": (0.6, 0.15, 0.8), "orange": (1.0, 0.55, 0.05),
           "pink": (1.0, 0.5, 0.75), "cyan": (0.1, 0.85, 0.9)}
SIZES = {"small": 0.17, "large": 0.28}  # radius as a fraction of the image side
POSITIONS = {"top left": (0.3, 0.3), "top right": (0.7, 0.3),
             "bottom left": (0.3, 0.7), "bottom right": (0.7, 0.7)}
COUNTS = (1, 2, 3)
BACKGROUNDS = ("black", "gray", "striped", "dotted", "checkered")
STYLES = ("photo", "sketch", "textured", "noisy")


def _inside(shape: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Points (x, y), in units of the object radius around its centre, inside the shape."""
    r2 = x * x + y * y
    if shape == "circle":
        return r2 <= 1.0
    if shape == "square":
        return np.maximum(np.abs(x), np.abs(y)) <= 0.8
    if shape == "triangle":
        return (y <= 0.75) & (y >= 2.0 * np.abs(x) - 1.05)
    if shape == "diamond":
        return np.abs(x) + np.abs(y) <= 1.0
    if shape == "plus":
        return ((np.abs(x) <= 0.3) & (np.abs(y) <= 1.0)) | ((np.abs(y) <= 0.3) & (np.abs(x) <= 1.0))
    if shape == "cross":
        c = np.sqrt(0.5)
        return _inside("plus", c * (x + y), c * (y - x))
    if shape == "star":
        theta = np.arctan2(y, x) + np.pi / 2
        return np.sqrt(r2) <= 0.55 + 0.45 * np.cos(5 * theta)
    if shape == "heart":  # (x^2 + y^2 - 1)^3 <= x^2 y^3, point up in image coordinates
        hx, hy = 1.1 * x, -1.1 * y + 0.15
        return (hx * hx + hy * hy - 1) ** 3 <= hx * hx * hy ** 3
    if shape == "ring":
        return (r2 <= 1.0) & (r2 >= 0.36)
    if shape == "crescent":
        return (r2 <= 1.0) & ((x - 0.45) ** 2 + y * y >= 0.56)
    raise ValueError(f"unknown shape {shape!r}")


def _grid(size: int):
    s = 2 * size  # supersampled
    coords = (np.arange(s, dtype=np.float32) + 0.5) / s
    return np.meshgrid(coords, coords, indexing="xy")


_GRIDS: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _background(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    gx, gy = _GRIDS[size]
    base = rng.uniform(0.02, 0.12)
    img = np.full(gx.shape + (3,), base, dtype=np.float32)
    if kind == "gray":
        img[:] = rng.uniform(0.3, 0.42)
    elif kind == "striped":
        period = rng.uniform(0.12, 0.2)
        stripe = (np.floor((gx + gy * rng.uniform(-0.5, 0.5)) / period) % 2).astype(np.float32)
        img += 0.3 * stripe[..., None]
    elif kind == "dotted":
        period = rng.uniform(0.12, 0.18)
        fx, fy = (gx / period) % 1 - 0.5, (gy / period) % 1 - 0.5
        img += 0.35 * ((fx * fx + fy * fy) < 0.06).astype(np.float32)[..., None]
    elif kind == "checkered":
        period = rng.uniform(0.15, 0.25)
        check = ((np.floor(gx / period) + np.floor(gy / period)) % 2).astype(np.float32)
        img += 0.25 * check[..., None]
    elif kind != "black":
        raise ValueError(f"unknown background {kind!r}")
    return img


def _centres(scene: dict, rng: np.random.Generator) -> list[tuple[float, float]]:
    radius = scene["radius"]
    if scene["count"] == 0:  # an empty scene: the background alone
        return []
    if scene["count"] == 1:
        cx, cy = POSITIONS[scene["position"]]
        j = 0.05
        return [(cx + rng.uniform(-j, j), cy + rng.uniform(-j, j))]
    centres: list[tuple[float, float]] = []
    for _ in range(200):  # rejection sampling of non-overlapping centres
        c = tuple(rng.uniform(radius + 0.02, 1 - radius - 0.02, size=2))
        if all((c[0] - o[0]) ** 2 + (c[1] - o[1]) ** 2 > (2.1 * radius) ** 2 for o in centres):
            centres.append(c)
            if len(centres) == scene["count"]:
                break
    return centres


def render(scene: dict, size: int = 32) -> np.ndarray:
    """The scene as a uint8 [size, size, 3] image; deterministic in scene['seed']."""
    if size not in _GRIDS:
        _GRIDS[size] = _grid(size)
    gx, gy = _GRIDS[size]
    rng = np.random.default_rng(scene["seed"])
    style = scene["style"]
    img = _background(scene["background"], size, rng)
    if style == "sketch":
        img[:] = rng.uniform(0.85, 1.0)  # pencil on paper
    colour = np.asarray(COLOURS[scene["colour"]], dtype=np.float32)
    colour = np.clip(colour * rng.uniform(0.85, 1.1), 0, 1)
    radius = scene["radius"]
    for cx, cy in _centres(scene, rng):
        x, y = (gx - cx) / radius, (gy - cy) / radius
        mask = _inside(scene["shape"], x, y)
        if style == "sketch":
            outline = mask & ~_inside(scene["shape"], x / 0.72, y / 0.72)
            img[outline] = colour * 0.55
            continue
        if style == "textured":
            texture = 0.55 + 0.45 * np.sin(
                (gx * rng.uniform(8, 16) + gy * rng.uniform(-8, 8)) / radius * 0.3)
            img[mask] = colour * texture[mask][:, None]
        else:  # photo / noisy: flat colour with a soft light from the top left
            shade = 1.0 - 0.25 * np.clip((x + y) / 2.0, -1, 1)
            img[mask] = np.clip(colour * shade[mask][:, None], 0, 1)
    if style == "noisy":
        img += rng.normal(0, 0.22, size=img.shape).astype(np.float32)
    # 2x2 box downsampling: antialiasing and the final resolution.
    img = img.reshape(size, 2, size, 2, 3).mean(axis=(1, 3))
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
