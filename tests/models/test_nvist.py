"""NViST (zoo/nvist.py, zoo/mae.py) and its multi-view data (zoo/tasks/novel_view_synthesis.py)."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import zoo
from zoo import layers, nvist
from zoo.tasks import novel_view_synthesis as multiview


def params_of(module) -> int:
    return sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(module, nnx.Param)))


def test_reference_parameter_counts():
    model = zoo.create_model("nvist", abstract=True)
    assert params_of(model.decoder) == 129_514_368
    assert params_of(model.encoder) == 85_115_136
    assert params_of(model.renderer) == 10_755
    assert params_of(model) == 214_640_259
    assert model.encoder.num_patches == 576 and model.decoder.num_tokens == 816


def test_mae_sincos_code_matches_the_formula():
    code = layers.sincos_2d(3, 2, 8, mae_frequencies=True, cls_token=True)
    assert code.shape == (7, 8) and not code[0].any()
    omega = 1.0 / 10000 ** (np.arange(2) / 2.0)
    row, col = 2, 1  # token 2 * 2 + 1 = 5 -> row 5 after the cls row
    expected = np.concatenate([np.sin(col * omega), np.cos(col * omega),
                               np.sin(row * omega), np.cos(row * omega)])
    np.testing.assert_allclose(code[1 + row * 2 + col], expected, rtol=1e-6)


def test_mae_masking_and_loss():
    model = zoo.create_model("mae_vit_b5", rngs=nnx.Rngs(0), image_size=(20, 10), embed_dim=16,
                             depth=1, num_heads=2, decoder_dim=16, decoder_depth=1,
                             decoder_heads=2)
    images = jax.random.normal(jax.random.key(0), (2, 20, 10, 3))
    pred, mask = nnx.jit(lambda m: m(images, rng=jax.random.key(1)))(model)
    assert pred.shape == (2, 8, 75)
    np.testing.assert_array_equal(np.asarray(mask.sum(1)), [6.0, 6.0])  # 75% of 8 masked
    tokens, keep = nnx.jit(lambda e: e(images, mask_ratio=0.75, rng=jax.random.key(1)))(
            model.encoder)
    assert tokens.shape == (2, 3, 16) and keep.shape == (2, 2)
    loss = nnx.jit(lambda m: m.loss(images, jax.random.key(2)))(model)
    grads = nnx.jit(nnx.grad(lambda m: m.loss(images, jax.random.key(2))))(model)
    assert np.isfinite(float(loss)) and float(loss) > 0
    assert np.abs(np.asarray(grads.decoder_pred.kernel[...])).max() > 0
    np.testing.assert_array_equal(np.asarray(model.patchify(images)[0, 0]),
                                  np.asarray(images[0, :5, :5].reshape(-1)))


def test_camera_encoding_layout():
    params = jnp.asarray([[1.5, 0.75]])
    code = np.asarray(nvist.camera_encoding(params, 4))[0]
    assert code.shape == (18,)
    angles = np.concatenate([1.5 * 2.0 ** np.arange(4) * np.pi, 0.75 * 2.0 ** np.arange(4)
                             * np.pi])
    np.testing.assert_allclose(code, np.concatenate([[1.5, 0.75], np.sin(angles),
                                                     np.cos(angles)]), rtol=1e-5, atol=1e-6)


def small_decoder():
    return nvist.NViSTDecoder(num_image_tokens=12, dim=16, depth=2, num_heads=2, resolution=6,
                              patch_size=3, channels=8, rngs=nnx.Rngs(0))


def test_decoder_heads_write_their_own_plane_and_line():
    decoder = small_decoder()
    call = nnx.jit(lambda d, f, c: d(f, c))
    features = jax.random.normal(jax.random.key(0), (2, 13, 16))
    camera = jnp.asarray([[1.3, 1.2], [1.1, 1.0]])
    planes, lines = call(decoder, features, camera)
    assert planes.shape == (3, 2, 6, 6, 8) and lines.shape == (3, 2, 6, 1, 8)
    for j in range(3):
        head = decoder.matrix_heads[j]
        head.bias.set_value(head.bias[...] + 1.0)
        p2, l2 = call(decoder, features, camera)
        head.bias.set_value(head.bias[...] - 1.0)
        changed = np.abs(np.asarray(p2 - planes)).max(axis=(1, 2, 3, 4))
        np.testing.assert_allclose(changed, np.eye(3)[j], atol=1e-6)
        np.testing.assert_array_equal(np.asarray(l2), np.asarray(lines))
    # Matrix token t of plane 0 fills the 3x3 patch at (row t // 2, column t % 2).
    head = decoder.matrix_heads[0]
    before = call(decoder, features, camera)[0]
    kernel = head.kernel[...]
    head.kernel.set_value(kernel * 0)
    head.bias.set_value(jnp.zeros_like(head.bias[...]))
    zeroed = call(decoder, features, camera)[0]
    assert not np.abs(np.asarray(zeroed[0])).any() and np.abs(np.asarray(before[0])).max() > 0


def test_cross_blocks_see_the_image_and_self_blocks_do_not():
    decoder = small_decoder()
    camera = jnp.asarray([[1.3, 1.2]])
    a = jax.random.normal(jax.random.key(0), (1, 13, 16))
    b = a.at[:, 1:].add(jax.random.normal(jax.random.key(3), (1, 12, 16)))  # image tokens
    assert np.abs(np.asarray(decoder(a, camera)[0] - decoder(b, camera)[0])).max() > 1e-4
    x = jax.random.normal(jax.random.key(1), (1, 9, 16))
    c = jax.random.normal(jax.random.key(2), (1, 16))
    block = decoder.blocks[1]  # odd: self-attention, norm_k / norm_v unused
    out = block(x, c)
    block.norm_k.scale.set_value(block.norm_k.scale[...] * 3)
    np.testing.assert_allclose(np.asarray(block(x, c)), np.asarray(out), atol=1e-6)


def test_renderer_density_from_constant_fields_and_zero_padding():
    renderer = nvist.Renderer(channels=8, sigma_channels=2, num_samples=8, aabb=0.8,
                              near_far=(0.0, 2.0), rngs=nnx.Rngs(0))
    planes = jnp.full((3, 1, 4, 4, 8), 0.5)
    lines = jnp.full((3, 1, 4, 1, 8), 2.0)
    inside = jnp.asarray([[[0.1, -0.2, 0.3], [0.0, 0.0, 0.0]]]) / 0.8
    sigma, rgb = renderer.field(inside, jnp.ones((1, 2, 3)) / math.sqrt(3), planes, lines)
    np.testing.assert_allclose(np.asarray(sigma), 3 * 2 * 0.5 * 2.0, rtol=1e-6)
    assert rgb.shape == (1, 2, 3) and float(rgb.min()) > 0 and float(rgb.max()) < 1
    outside = jnp.asarray([[[1.5, 0.0, 0.0]]])  # beyond the box: zero padding
    assert float(renderer.field(outside, jnp.ones((1, 1, 3)), planes, lines)[0][0, 0]) == 0.0


def test_compositing_and_distortion_loss_match_direct_formulas():
    renderer = nvist.Renderer(channels=8, sigma_channels=2, num_samples=6,
                              near_far=(0.5, 2.0), rngs=nnx.Rngs(0))
    edges, mids = renderer.sample_depths()
    np.testing.assert_allclose(np.asarray(edges), np.linspace(0.5, 2.0, 7), rtol=1e-6)
    jittered, _ = renderer.sample_depths(jax.random.key(0))
    step = (np.asarray(jittered) - np.linspace(0.5, 2.0, 7))
    assert step[-1] == 0 and np.all((step[:-1] >= 0) & (step[:-1] <= 0.25 + 1e-6))
    rng = np.random.default_rng(0)
    w = rng.uniform(0, 0.3, (4, 6))
    m = np.sort(rng.uniform(0, 1, (4, 6)), axis=1)
    s = rng.uniform(0.05, 0.2, (4, 6))
    # eff_distloss's O(N) form (Sun et al.): bi-directional term via prefix sums.
    w_cum, wm_cum = np.cumsum(w, 1), np.cumsum(w * m, 1)
    bi = 2 * (w[:, 1:] * m[:, 1:] * w_cum[:, :-1] - w[:, 1:] * wm_cum[:, :-1]).sum(1)
    uni = (w ** 2 * s).sum(1) / 3
    np.testing.assert_allclose(float(nvist.distortion_loss(jnp.asarray(w), jnp.asarray(m),
                                                           jnp.asarray(s))),
                               np.mean(bi + uni), rtol=1e-5)


def test_full_model_renders_and_grads_are_finite():
    model = zoo.create_model("nvist_small", rngs=nnx.Rngs(0), image_size=(20, 10),
                             encoder_depth=1, decoder_depth=2, resolution=6, num_samples=8)
    images = jax.random.normal(jax.random.key(0), (2, 20, 10, 3))
    camera = jnp.asarray([[1.3, 1.2], [1.3, 1.2]])
    origins, dirs = multiview.pixel_rays(np.eye(4) @ np.diag([1, 1, 1, 1.0]), 24.0, 4, 4)
    rays_o = jnp.asarray(origins - [0, 0, 1.3], jnp.float32)[None].repeat(2, 0)
    rays_d = jnp.asarray(dirs, jnp.float32)[None].repeat(2, 0)

    def loss(m):
        out = m(images, camera, rays_o, rays_d, rng=jax.random.key(1))
        return jnp.mean(out["rgb"] ** 2) + out["distloss"]

    out = nnx.jit(lambda m: m(images, camera, rays_o, rays_d))(model)
    assert out["rgb"].shape == (2, 16, 3) and out["weights"].shape == (2, 16, 8)
    assert float(out["weights"].sum(-1).max()) <= 1.0 + 1e-5
    grads = jax.tree.leaves(nnx.state(nnx.jit(nnx.grad(loss))(model)))
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)


def test_relative_pose_puts_the_input_camera_at_identity():
    c2w = multiview.look_at(np.array([0.6, -0.9, 0.7]))
    other = multiview.look_at(np.array([-1.0, 0.4, 0.5]))
    poses, d = multiview.relative_poses(c2w, np.stack([c2w, other]))
    np.testing.assert_allclose(poses[0][:3, :3], np.eye(3), atol=1e-9)
    np.testing.assert_allclose(poses[0][:3, 3], [0, 0, -d], atol=1e-9)
    # The world origin (both cameras look at it) stays on both cameras' optical axes.
    for pose in poses:
        to_origin = -pose[:3, 3]
        assert np.dot(to_origin / np.linalg.norm(to_origin), pose[:3, 2]) > 0.9999


def test_generated_scenes_are_deterministic_and_round_trip_through_the_folder_format(
        tmp_path):
    a = multiview.generate_scenes(3, 3, 16, 12, seed=5)
    b = multiview.generate_scenes(3, 3, 16, 12, seed=5)
    np.testing.assert_array_equal(a[1]["images"], b[1]["images"])
    assert a[0]["images"].std() > 10  # not blank
    multiview.write_multiview_dataset(str(tmp_path), "train", a)
    read = multiview.read_scene(str(tmp_path / "train" / "scene_0001"), 16, 12)
    np.testing.assert_array_equal(read["images"], a[1]["images"])
    np.testing.assert_allclose(read["c2w"], a[1]["c2w"], atol=1e-6)
    prepare = multiview.PrepareViews(16, 12, 2, 8)
    x, y = prepare(a[1], None), prepare(read, None)
    for key in x:
        np.testing.assert_allclose(x[key], y[key], atol=1e-5, err_msg=key)
    assert x["rays_o"].shape == (16, 3) and x["view_rgb"].shape == (16, 12, 3)


def test_ssim_properties():
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.uniform(0, 1, (2, 16, 16, 3)), jnp.float32)
    np.testing.assert_allclose(np.asarray(multiview.ssim(a, a)), 1.0, atol=1e-5)
    noisy = jnp.clip(a + 0.2 * rng.standard_normal(a.shape), 0, 1)
    s1, s2 = multiview.ssim(a, noisy), multiview.ssim(noisy, a)
    np.testing.assert_allclose(np.asarray(s1), np.asarray(s2), rtol=1e-5)
    assert float(s1.max()) < 0.9
    assert float(multiview.psnr(jnp.asarray(0.01))) == pytest.approx(20.0)


def load_fixture():
    import json
    import os
    path = os.path.join(os.path.dirname(__file__), "..", "fixtures", "nvist_small_random.npz")
    data = np.load(path)
    state = {k[len("state/"):]: data[k] for k in data.files if k.startswith("state/")}
    return data, state, json.loads(str(data["spec"]))


def official_model(state, spec, **kw):
    from zoo import convert
    return convert.from_nvist_official(
            state, image_size=tuple(spec["image_size"]), encoder_heads=spec["encoder_heads"],
            decoder_heads=spec["decoder_heads"], num_samples=spec["num_samples"],
            near_far=tuple(spec["near_far"]), **kw)


def test_official_weights_reproduce_the_reference_field_and_render():
    from zoo.training import image_ops
    data, state, spec = load_fixture()
    model = official_model(state, spec)
    # The reference normalises [0, 1] images with ImageNet statistics inside its encoder; our
    # pipeline hands the encoder normalised images.
    images = (data["images"] * 255.0 - image_ops.IMAGENET_MEAN) / image_ops.IMAGENET_STD
    run = nnx.jit(lambda m, *a: (m.radiance_field(*a[:2]), m(*a)))
    (planes, lines), out = run(model, jnp.asarray(images), jnp.asarray(data["camera_params"]),
                               jnp.asarray(data["rays_o"]), jnp.asarray(data["rays_d"]))
    np.testing.assert_allclose(np.asarray(planes), data["planes"].transpose(0, 1, 3, 4, 2),
                               atol=1e-4)
    np.testing.assert_allclose(np.asarray(lines), data["lines"].transpose(0, 1, 3, 4, 2),
                               atol=1e-4)
    np.testing.assert_allclose(np.asarray(out["rgb"]), data["rgb"], atol=1e-4)
    np.testing.assert_allclose(np.asarray(out["depth"]), data["depth"], atol=1e-4)
    assert float(out["distloss"]) == pytest.approx(float(data["distloss"]), rel=1e-4)


def test_official_converter_errors():
    _, state, spec = load_fixture()
    with pytest.raises(ValueError, match="not an official NViST Model checkpoint"):
        official_model({k: v for k, v in state.items() if k != "decoder.output_token"}, spec)
    with pytest.raises(ValueError, match="differs from the fixed sin-cos code"):
        official_model(state, spec | {"image_size": [10, 20]})
    with pytest.raises(ValueError, match="read from the state_dict"):
        official_model(state, spec, resolution=12)
    extra = dict(state, **{"renderer.extra.weight": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="does not map"):
        official_model(extra, spec)
