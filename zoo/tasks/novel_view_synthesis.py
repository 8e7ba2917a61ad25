"""Novel-view synthesis: multi-view data (generated and on disk) and the
"novel_view_synthesis" task (NViST, zoo/nvist.py).

Dataset format on disk (`data.source = "multiview_folder"`): one folder per scene,
`{data.path}/{split}/{scene}/transforms.json` next to the scene's images:

    {"fx": 120.0, "fy": 120.0, "cx": 45.0, "cy": 80.0,      # pixels, of the stored images
     "near": 0.4, "far": 2.2,                               # optional, informative
     "frames": [{"file": "000.png", "c2w": [[...], [...], [...], [0, 0, 0, 1]]}, ...]}

c2w is camera-to-world in the OpenCV convention (x right, y down, z forward), as NViST's
MVImgNet/COLMAP loaders produce; all views of a scene share the intrinsics. Images are resized
to (data.image_size, data.image_width) (H x W; the intrinsics scale with them).
`write_multiview_dataset` writes this format (the tests use it on generated scenes). The folder
may be in a bucket (`gs://...`, through zoo.storage); its scene folders are then listed once per
run (zoo/training/sources.py `cached_listing`: fingerprint the scene folder names, cache in
<workdir>/data_listing/).

The embedded default (`data.source = "generated_multiview"`): `views.num_scenes` scenes (and an
eighth as many for eval) of one or two Lambert-shaded, striped spheres inside [-0.6, 0.6]^3 on
black, seen by `views.views_per_scene` cameras at distance 1.3 looking at the origin from random
directions of the upper hemisphere; focal = 1.2 * image height. Deterministic per split.

An example (NViST's relative-pose convention, `get_inverse_pose`): one input view and
`views.target_views` other views of the same scene (random at training; views 0 | 1.. at eval).
Poses are re-expressed in the frame where the input camera has identity rotation and sits at
(0, 0, -d), d = its distance to the world origin. camera_params = [d, focal_y / H]. Per target
view `views.rays_per_view` random pixels give rays and colours (training); the first target
view is also given whole (rays and image) for PSNR/SSIM and images. These per-example counts
are the task's own config subtree `config.views` (`NovelViewSynthesisTask.default_config`);
the image size stays in `config.data` (data.image_size is the height, data.image_width the
width, 0 = square).

Task: loss = MSE(rendered, target colours) + 0.001 * distortion loss (NViST's weights; LPIPS is
not used: it would need VGG weights). Eval renders the whole first target view of each
held-out example: PSNR (from the per-image MSE, averaged over images) and SSIM (Gaussian
window 11, sigma 1.5, on [0, 1] colours, averaged over channels and images).
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from zoo import storage
from zoo.training import image_ops
from zoo.training import sources as data_sources
from zoo.training.errors import ConfigError
from zoo.training.tasks import Task, register_task

TASK = "novel_view_synthesis"
SOURCES = ("generated_multiview", "multiview_folder")
DISTORTION_WEIGHT = 0.001
CAMERA_DISTANCE = 1.3
FOCAL_PER_HEIGHT = 1.2
NEAR_FAR = (0.4, 2.2)


# ================================================================================================
# Scenes
# ================================================================================================

def look_at(position: np.ndarray) -> np.ndarray:
    """OpenCV c2w for a camera at `position` looking at the origin (y down ~ world -z)."""
    forward = -position / np.linalg.norm(position)
    up = np.array([0.0, 0.0, 1.0])
    if abs(forward @ up) > 0.99:
        up = np.array([0.0, 1.0, 0.0])
    right = np.cross(forward, up)
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, down, forward, position
    return c2w


def pixel_rays(c2w: np.ndarray, focal: float, height: int, width: int, cx=None, cy=None):
    """(origins [H*W, 3], directions [H*W, 3]) through pixel centres, OpenCV intrinsics."""
    cx = width / 2 if cx is None else cx
    cy = height / 2 if cy is None else cy
    v, u = np.meshgrid(np.arange(height) + 0.5, np.arange(width) + 0.5, indexing="ij")
    dirs = np.stack([(u - cx) / focal, (v - cy) / focal, np.ones_like(u)], -1).reshape(-1, 3)
    dirs = dirs @ c2w[:3, :3].T
    return np.broadcast_to(c2w[:3, 3], dirs.shape).copy(), dirs


def render_spheres(spheres, c2w, focal, height, width) -> np.ndarray:
    """Ray-traced [H, W, 3] uint8 image of Lambert spheres with stripes, black background."""
    origins, dirs = pixel_rays(c2w, focal, height, width)
    dirs = dirs / np.linalg.norm(dirs, axis=1, keepdims=True)
    depth = np.full(len(dirs), np.inf)
    colour = np.zeros((len(dirs), 3))
    light = np.array([0.4, -0.5, 0.75])
    light /= np.linalg.norm(light)
    for centre, radius, albedo, stripes in spheres:
        oc = origins - centre
        b = np.sum(oc * dirs, axis=1)
        disc = b * b - (np.sum(oc * oc, axis=1) - radius * radius)
        hit = disc > 0
        t = np.where(hit, -b - np.sqrt(np.maximum(disc, 0)), np.inf)
        closer = hit & (t > 0) & (t < depth)
        normal = (origins + np.where(closer, t, 0.0)[:, None] * dirs - centre) / radius
        shade = 0.35 + 0.65 * np.clip(normal @ light, 0, 1)
        band = 0.55 + 0.45 * (np.sin(stripes * np.pi * normal[:, 2]) > 0)
        colour = np.where(closer[:, None], albedo * (shade * band)[:, None], colour)
        depth = np.where(closer, t, depth)
    return (np.clip(colour, 0, 1).reshape(height, width, 3) * 255).round().astype(np.uint8)


def generate_scenes(num_scenes: int, views: int, height: int, width: int, seed: int):
    """Deterministic list of scenes {"images": [V,H,W,3] uint8, "c2w": [V,4,4], "focal"}."""
    rng = np.random.default_rng(seed)
    focal = FOCAL_PER_HEIGHT * height
    scenes = []
    for _ in range(num_scenes):
        spheres = []
        for _ in range(rng.integers(1, 3)):
            radius = rng.uniform(0.22, 0.38)
            centre = rng.uniform(-0.6 + radius, 0.6 - radius, 3) * 0.6
            spheres.append((centre, radius, rng.uniform(0.25, 1.0, 3), rng.integers(2, 6)))
        c2ws, images = [], []
        for _ in range(views):
            direction = rng.normal(size=3)
            direction[2] = abs(direction[2]) + 0.2  # upper hemisphere
            c2w = look_at(CAMERA_DISTANCE * direction / np.linalg.norm(direction))
            c2ws.append(c2w)
            images.append(render_spheres(spheres, c2w, focal, height, width))
        scenes.append({"images": np.stack(images), "c2w": np.stack(c2ws).astype(np.float32),
                       "fx": focal, "fy": focal, "cx": width / 2, "cy": height / 2})
    return scenes


def write_multiview_dataset(path: str, split: str, scenes) -> None:
    """Writes scenes in the on-disk format of the module docstring."""
    from PIL import Image

    for i, scene in enumerate(scenes):
        folder = storage.join(path, split, f"scene_{i:04d}")
        storage.makedirs(folder)
        frames = []
        for v, (image, c2w) in enumerate(zip(scene["images"], scene["c2w"])):
            name = f"{v:03d}.png"
            encoded = io.BytesIO()
            Image.fromarray(image).save(encoded, format="PNG")
            storage.write_bytes(storage.join(folder, name), encoded.getvalue())
            frames.append({"file": name, "c2w": np.asarray(c2w).tolist()})
        meta = {k: float(scene[k]) for k in ("fx", "fy", "cx", "cy")}
        meta.update(near=NEAR_FAR[0], far=NEAR_FAR[1], frames=frames)
        storage.write_text(storage.join(folder, "transforms.json"), json.dumps(meta))


def read_scene(folder: str, height: int, width: int) -> dict[str, Any]:
    from PIL import Image

    path = storage.join(folder, "transforms.json")
    try:
        meta = json.loads(storage.read_text(path))
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: cannot read the scene description ({error})") from None
    missing = [k for k in ("fx", "fy", "cx", "cy", "frames") if k not in meta]
    if missing:
        raise ValueError(f"{path} lacks {missing}")
    images, c2ws = [], []
    scale = None
    for frame in meta["frames"]:
        encoded = storage.read_bytes(storage.join(folder, frame["file"]))
        image = Image.open(io.BytesIO(encoded)).convert("RGB")
        scale = (height / image.size[1], width / image.size[0])
        images.append(np.asarray(image.resize((width, height), Image.BILINEAR)))
        c2w = np.asarray(frame["c2w"], np.float32)
        if c2w.shape != (4, 4):
            raise ValueError(f"{path}: frame {frame['file']} c2w must be 4x4, got {c2w.shape}")
        c2ws.append(c2w)
    if len(images) < 2:
        raise ValueError(f"{path}: a scene needs at least 2 views, got {len(images)}")
    return {"images": np.stack(images), "c2w": np.stack(c2ws),
            "fx": meta["fx"] * scale[1], "fy": meta["fy"] * scale[0],
            "cx": meta["cx"] * scale[1], "cy": meta["cy"] * scale[0]}


class SceneSource:
    """Random-access scenes of one split (len + getitem), as the grain pipeline reads them."""

    def __init__(self, scenes=None, folders=None, height=0, width=0):
        self.scenes, self.folders = scenes, folders
        self.height, self.width = height, width

    def __len__(self):
        return len(self.scenes) if self.scenes is not None else len(self.folders)

    def __getitem__(self, index):
        if self.scenes is not None:
            return self.scenes[index]
        return read_scene(self.folders[index], self.height, self.width)


def _image_shape(config) -> tuple[int, int]:
    height = int(config.data.image_size)
    return height, int(config.data.image_width) or height


def open_split(config, split: str) -> SceneSource:
    d, v = config.data, config.views
    height, width = _image_shape(config)
    if d.source == "generated_multiview":
        is_eval = split == d.eval_split
        count = max(v.num_scenes // 8, 1) if is_eval else v.num_scenes
        return SceneSource(scenes=generate_scenes(count, v.views_per_scene, height, width,
                                                  seed=1 + int(is_eval)))
    root = storage.join(os.path.expanduser(d.path), split)
    if not storage.isdir(root):
        raise ValueError(f"config.data.path={d.path!r}: no split folder {root}")
    if storage.is_remote(root):
        folders = _bucket_scene_folders(root)
    else:
        folders = sorted(os.path.join(root, name) for name in os.listdir(root)
                         if os.path.isfile(os.path.join(root, name, "transforms.json")))
    if not folders:
        raise ValueError(f"{root} has no scene folders with a transforms.json")
    return SceneSource(folders=folders, height=height, width=width)


def _bucket_scene_folders(root: str) -> list[str]:
    """The scene folders (with a transforms.json) of a split folder in a bucket, sorted: checked
    in parallel once per run (fingerprint: the folder names)."""
    names = data_sources.bucket_subfolders(root)

    def make():
        has_scene = data_sources.parallel_map(
                lambda name: storage.isfile(storage.join(root, name, "transforms.json")), names)
        return [name for name, found in zip(names, has_scene) if found]

    return data_sources.cached_listing("multiview_folder", root, names, make,
                                       lambda listing: [storage.join(root, n) for n in listing])


def _check_data(config) -> None:
    d, v = config.data, config.views
    if d.source not in SOURCES:
        raise ValueError(f"config.data.source={d.source!r} is invalid for task {TASK!r}; "
                         f"allowed: {SOURCES}")
    if v.target_views < 1 or v.views_per_scene < v.target_views + 1:
        raise ValueError(f"config.views.target_views={v.target_views} needs >= 1 and "
                         f"config.views.views_per_scene={v.views_per_scene} >= target_views + 1")
    if v.rays_per_view < 1:
        raise ValueError(f"config.views.rays_per_view={v.rays_per_view} must be >= 1")
    if d.source == "generated_multiview" and v.num_scenes < 1:
        raise ValueError(f"config.views.num_scenes={v.num_scenes} must be >= 1")


def orbit_pose(theta: float, distance: float) -> np.ndarray:
    """c2w (OpenCV) of the input camera rotated by theta about the y axis through the origin
    (the input camera in NViST's frame sits at (0, 0, -distance) with identity rotation)."""
    c, s = math.cos(theta), math.sin(theta)
    rotation = np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])
    pose = np.eye(4)
    pose[:3, :3] = rotation
    pose[:3, 3] = rotation @ np.array([0.0, 0.0, -distance])
    return pose


def relative_poses(c2w_input: np.ndarray, c2ws: np.ndarray) -> tuple[np.ndarray, float]:
    """NViST's frame: input camera -> identity rotation at (0, 0, -d). Returns (poses, d)."""
    distance = float(np.linalg.norm(c2w_input[:3, 3]))
    to_new = np.eye(4)
    to_new[2, 3] = -distance
    transform = to_new @ np.linalg.inv(c2w_input)
    return np.einsum("ij,vjk->vik", transform, c2ws), distance


@dataclasses.dataclass(frozen=True)
class PrepareViews:
    height: int
    width: int
    target_views: int
    rays_per_view: int

    def __call__(self, raw: Mapping[str, Any], rng) -> dict[str, np.ndarray]:
        images, c2ws = raw["images"], np.asarray(raw["c2w"], np.float64)
        views = len(images)
        if views < self.target_views + 1:
            raise ValueError(f"a scene has {views} views; the config needs target_views + 1 = "
                             f"{self.target_views + 1}")
        order = rng.permutation(views) if rng is not None else np.arange(views)
        chosen = order[:self.target_views + 1]
        poses, distance = relative_poses(c2ws[chosen[0]], c2ws[chosen[1:]])
        h, w = self.height, self.width
        ray_o, ray_d, colours = [], [], []
        full = None
        for k, pose in enumerate(poses):
            origins, dirs = pixel_rays(pose, raw["fx"], h, w, raw["cx"], raw["cy"])
            if raw["fx"] != raw["fy"]:
                dirs[:, 1] *= raw["fx"] / raw["fy"]
            pixels = images[chosen[1 + k]].reshape(-1, 3).astype(np.float32) / 255.0
            if k == 0:
                full = (origins, dirs, pixels.reshape(h, w, 3))
            pick = (rng.choice(h * w, self.rays_per_view, replace=False) if rng is not None
                    else np.linspace(0, h * w - 1, self.rays_per_view).astype(int))
            ray_o.append(origins[pick])
            ray_d.append(dirs[pick])
            colours.append(pixels[pick])
        normalised = image_ops.normalise(images[chosen[0]])
        f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
        return {"image": f32(normalised), "camera_params": f32([distance, raw["fy"] / h]),
                "rays_o": f32(np.concatenate(ray_o)), "rays_d": f32(np.concatenate(ray_d)),
                "rgb": f32(np.concatenate(colours)), "view_rays_o": f32(full[0]),
                "view_rays_d": f32(full[1]), "view_rgb": f32(full[2])}


def _example_spec(config):
    h, w = _image_shape(config)
    n = int(config.views.target_views) * int(config.views.rays_per_view)
    return {"image": ((h, w, 3), np.float32), "camera_params": ((2,), np.float32),
            "rays_o": ((n, 3), np.float32), "rays_d": ((n, 3), np.float32),
            "rgb": ((n, 3), np.float32), "view_rays_o": ((h * w, 3), np.float32),
            "view_rays_d": ((h * w, 3), np.float32), "view_rgb": ((h, w, 3), np.float32)}



# ================================================================================================
# Metrics and the task
# ================================================================================================

def psnr(mse: jax.Array) -> jax.Array:
    return -10.0 * jnp.log10(jnp.maximum(mse, 1e-10))


def ssim(a: jax.Array, b: jax.Array, window: int = 11, sigma: float = 1.5) -> jax.Array:
    """Mean SSIM per image of [B, H, W, C] images in [0, 1] (Wang et al. 2004 constants,
    Gaussian window, 'valid' filtering as skimage/torchmetrics with gaussian_weights)."""
    x = jnp.arange(window) - (window - 1) / 2
    g = jnp.exp(-x ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    win = min(window, a.shape[1], a.shape[2])
    g = g[(window - win) // 2:(window - win) // 2 + win]
    g = g / g.sum()

    def blur(t):  # separable Gaussian, valid padding, per channel
        t = jnp.moveaxis(t, -1, 1)  # B, C, H, W
        t = jax.vmap(jax.vmap(lambda m: jax.scipy.signal.convolve2d(
                m, g[:, None] * g[None, :], mode="valid")))(t)
        return t

    c1, c2 = 0.01 ** 2, 0.03 ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a ** 2
    var_b = blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1)
                                                     * (var_a + var_b + c2))
    return jnp.mean(s, axis=(1, 2, 3))


@register_task(TASK)
class NovelViewSynthesisTask(Task):
    """Photometric + distortion loss; eval PSNR/SSIM of a whole held-out view (docstring)."""

    sources = SOURCES
    config_key = "views"

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        c = ml_collections.ConfigDict()
        c.views_per_scene = 6  # generated_multiview: views rendered per scene
        c.num_scenes = 64  # generated_multiview: train scenes (eval: an eighth)
        c.target_views = 4  # views an example renders besides its input view
        c.rays_per_view = 64  # random pixels per target view and training example
        return c

    def check_data(self, config) -> None:
        _check_data(config)

    def open_split(self, config, split: str) -> SceneSource:
        return open_split(config, split)

    def make_preparer(self, config) -> PrepareViews:
        return PrepareViews(*_image_shape(config), int(config.views.target_views),
                            int(config.views.rays_per_view))

    def example_spec(self, config) -> dict[str, tuple[tuple[int, ...], Any]]:
        return _example_spec(config)

    def __init__(self, config):
        super().__init__(config)
        self.height, self.width = _image_shape(config)
        self.rays = int(config.views.target_views) * int(config.views.rays_per_view)

    def check_config(self, config) -> None:
        size = config.model.overrides.get("image_size")
        if size is not None and tuple(size) != _image_shape(config):
            raise ConfigError(f"config.model.overrides.image_size={tuple(size)} must equal "
                              f"(data.image_size, data.image_width or data.image_size) = "
                              f"{_image_shape(config)}")

    def input_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
        f32 = jnp.float32
        return {"images": jax.ShapeDtypeStruct((batch_size, self.height, self.width, 3), f32),
                "camera_params": jax.ShapeDtypeStruct((batch_size, 2), f32),
                "rays_o": jax.ShapeDtypeStruct((batch_size, self.rays, 3), f32),
                "rays_d": jax.ShapeDtypeStruct((batch_size, self.rays, 3), f32)}

    def loss_and_metrics(self, model, batch, rngs, train):
        key = rngs.sample() if (rngs is not None and train) else None
        out = model(batch["image"], batch["camera_params"], batch["rays_o"], batch["rays_d"],
                    rng=key, train=train, rngs=rngs)
        mse = jnp.mean(jnp.square(out["rgb"].astype(jnp.float32) - batch["rgb"]))
        loss = mse + DISTORTION_WEIGHT * out["distloss"]
        return loss, {"psnr": psnr(mse), "distloss": out["distloss"]}

    def render_view(self, model, batch):
        out = model(batch["image"], batch["camera_params"], batch["view_rays_o"],
                    batch["view_rays_d"])
        return out["rgb"].reshape(-1, self.height, self.width, 3).astype(jnp.float32)

    # --- samples: held-out views and an orbit (render.py) -----------------------------------

    sample_options = ("num_examples", "orbit", "image", "distance", "focal")

    def check_sample_options(self, *, num_examples: int = 4, orbit: int = 8, **_) -> None:
        if num_examples < 1:
            raise ValueError(f"--num_examples={num_examples} must be >= 1")
        if orbit < 0:
            raise ValueError(f"--orbit={orbit} must be >= 0 (0 = no orbit)")

    def write_samples(self, model, workdir: str, step: int, *, num_examples: int = 4,
                      orbit: int = 8, image: str | None = None, distance: float = 1.3,
                      focal: float = 0.0) -> dict[str, Any]:
        """views_<step>.png: input | target | rendered target for the first `num_examples`
        held-out examples (with their PSNR and SSIM); orbit_<step>.png: `orbit` views on a
        circle about the vertical axis through the input camera, from the first held-out
        input or from the image file `image` (resized to the model's input; `distance` and
        `focal`, in pixels of the resized image, give its camera; focal 0 = 1.2 * H)."""
        self.check_sample_options(num_examples=num_examples, orbit=orbit)
        config, h, w = self.config, self.height, self.width
        source = self.open_split(config, config.data.eval_split)
        prepare = self.make_preparer(config)
        examples = [prepare(source[i], None) for i in range(min(num_examples, len(source)))]
        batch = {k: jnp.asarray(np.stack([e[k] for e in examples])) for k in examples[0]}
        render = jax.jit(lambda m, img, cam, ro, rd: m(img, cam, ro, rd)["rgb"])
        rendered = jnp.clip(jax.jit(self.render_view)(model, batch), 0, 1)
        scores = {"psnr": [float(v) for v in psnr(jnp.mean(
                          jnp.square(rendered - batch["view_rgb"]), axis=(1, 2, 3)))],
                  "ssim": [float(v) for v in ssim(rendered, batch["view_rgb"])]}
        to_uint8 = image_ops.unit_to_uint8
        rows = [[to_uint8(image_ops.unnormalise(batch["image"][i])),
                 to_uint8(batch["view_rgb"][i]), to_uint8(rendered[i])]
                for i in range(len(examples))]
        views_path = storage.join(workdir, f"views_{step}.png")
        image_ops.save_png(image_ops.image_grid(rows), views_path)
        result = {"step": step, "views": views_path, **scores}
        if orbit == 0:
            return result
        if image:
            from PIL import Image  # only for a user's image file

            pixels = np.asarray(Image.open(image).convert("RGB").resize((w, h)), np.float32)
            normalised = image_ops.normalise(pixels)
            focal = focal or FOCAL_PER_HEIGHT * h
            camera = np.asarray([distance, focal / h], np.float32)
            input_view = to_uint8(pixels / 255.0)
        else:
            normalised = np.asarray(batch["image"][0])
            camera = np.asarray(batch["camera_params"][0])
            distance = float(camera[0])
            focal = float(camera[1]) * h
            input_view = rows[0][0]
        frames = []
        for k in range(orbit):
            origins, dirs = pixel_rays(orbit_pose(2 * math.pi * k / orbit, distance), focal, h, w)
            frame = render(model, jnp.asarray(normalised)[None], jnp.asarray(camera)[None],
                           jnp.asarray(origins, jnp.float32)[None],
                           jnp.asarray(dirs, jnp.float32)[None])
            frames.append(to_uint8(frame.reshape(h, w, 3)))
        orbit_path = storage.join(workdir, f"orbit_{step}.png")
        image_ops.save_png(image_ops.image_grid([[input_view] + frames]), orbit_path)
        result["orbit"] = orbit_path
        return result

    def eval_sums(self, model, batch):
        rendered = jnp.clip(self.render_view(model, batch), 0.0, 1.0)
        target = batch["view_rgb"]
        mse = jnp.mean(jnp.square(rendered - target), axis=(1, 2, 3))
        mask = batch["mask"].astype(jnp.float32)
        # Padding examples are all zeros (zero ray directions render NaN): select, not scale.
        real = mask > 0
        keep = lambda v: jnp.sum(jnp.where(real, v, 0.0))  # noqa: E731
        return {"count": jnp.sum(mask), "loss": keep(mse), "psnr": keep(psnr(mse)),
                "ssim": keep(ssim(rendered, target))}

    def finalize_eval(self, sums: Mapping[str, float]) -> dict[str, Any]:
        if sums["count"] <= 0:
            raise ValueError("the eval split produced no examples (sum of masks is 0)")
        n = sums["count"]
        return {"loss": sums["loss"] / n, "psnr": sums["psnr"] / n, "ssim": sums["ssim"] / n,
                "count": int(round(n))}
