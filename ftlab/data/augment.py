"""Train-time augmentation in JAX: a pure function of a PRNG key, so runs replay exactly.

Images are float NHWC batches; each image draws its own angle, flips and shifts. Brightness
and noise are in pixel-value units (0.1 = 10% of a [0, 1] range), and nothing is clipped, so
apply it to [0, 1] images before normalisation or clip afterwards.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.scipy.ndimage import map_coordinates

from ftlab.schema import AugmentConfig


def rotate(images: jax.Array, angles_deg: jax.Array) -> jax.Array:
    """Rotate each NHWC image counter-clockwise (as np.rot90) about its centre.

    Bilinear (order=1); pixels from outside the image repeat the nearest edge.
    """
    _, h, w, _ = images.shape
    yy, xx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32),
                          indexing="ij")
    cy, cx = (h - 1) / 2, (w - 1) / 2
    dy, dx = yy - cy, xx - cx

    def one(img: jax.Array, deg: jax.Array) -> jax.Array:
        cos, sin = jnp.cos(jnp.deg2rad(deg)), jnp.sin(jnp.deg2rad(deg))
        coords = [cos * dy + sin * dx + cy, -sin * dy + cos * dx + cx]
        sample = lambda ch: map_coordinates(ch, coords, order=1, mode="nearest")
        return jax.vmap(sample, in_axes=2, out_axes=2)(img)

    return jax.vmap(one)(images, angles_deg).astype(images.dtype)


def _flip(key: jax.Array, images: jax.Array, axis: int) -> jax.Array:
    """Flip each image along `axis` with probability 1/2."""
    coin = jax.random.bernoulli(key, 0.5, (images.shape[0], 1, 1, 1))
    return jnp.where(coin, jnp.flip(images, axis), images)


def _uniform(key: jax.Array, n: int, half_width: float) -> jax.Array:
    """n draws from U(-half_width, half_width), shaped to broadcast over NHWC."""
    return jax.random.uniform(key, (n, 1, 1, 1), minval=-half_width, maxval=half_width)


@dataclasses.dataclass(frozen=True)
class ImageAugment:
    """Random rotation, flips, contrast, brightness and gaussian noise; zero strengths and
    False flips make it the identity.

    Attributes:
      rotate_deg: angle drawn from U(-rotate_deg, rotate_deg).
      hflip / vflip: flip left-right / up-down with probability 1/2.
      brightness: additive shift from U(-brightness, brightness).
      contrast: factor from U(1 - contrast, 1 + contrast) about each image's mean.
      noise: std of additive gaussian noise.
    """
    rotate_deg: float = 10.0
    hflip: bool = True
    vflip: bool = True
    brightness: float = 0.1
    contrast: float = 0.1
    noise: float = 0.0

    def __call__(self, key: jax.Array, images: jax.Array) -> jax.Array:
        """Augmented copy of float NHWC `images`; jittable, same key -> same output."""
        k_rot, k_h, k_v, k_con, k_bri, k_noise = jax.random.split(key, 6)
        n = images.shape[0]
        x = images
        if self.rotate_deg:
            x = rotate(x, _uniform(k_rot, n, self.rotate_deg)[:, 0, 0, 0])
        if self.hflip:
            x = _flip(k_h, x, 2)
        if self.vflip:
            x = _flip(k_v, x, 1)
        if self.contrast:
            mean = x.mean(axis=(1, 2, 3), keepdims=True)
            x = (x - mean) * (1 + _uniform(k_con, n, self.contrast)) + mean
        if self.brightness:
            x = x + _uniform(k_bri, n, self.brightness)
        if self.noise:
            x = x + self.noise * jax.random.normal(k_noise, x.shape)
        return x.astype(images.dtype)


def token_dropout(key: jax.Array, input_ids: jax.Array, attention_mask: jax.Array,
                  rate: float, mask_id: int, keep_ids: tuple[int, ...] = (),
                  pad_id: int = 0) -> jax.Array:
    """Replace each real token with `mask_id` (e.g. [MASK] or [UNK]) with probability `rate`.

    Padding (attention_mask 0 or pad_id) and special tokens in `keep_ids` (e.g. CLS, SEP) are
    never replaced; rate 0 returns the ids unchanged. Jittable with keep_ids static.
    """
    eligible = (attention_mask > 0) & (input_ids != pad_id)
    if keep_ids:
        eligible &= ~jnp.isin(input_ids, jnp.asarray(keep_ids, input_ids.dtype))
    drop = jax.random.bernoulli(key, rate, input_ids.shape) & eligible
    return jnp.where(drop, jnp.asarray(mask_id, input_ids.dtype), input_ids)


def augment_fn(cfg: AugmentConfig, special_tokens: dict | None):
    """(key, batch) -> batch with images augmented (0-255 scale) and/or token dropout;
    None when augmentation is off."""
    if not cfg.active:
        return None
    image = ImageAugment(**{f.name: getattr(cfg, f.name) for f in
                            dataclasses.fields(ImageAugment)}) if cfg.image else None

    def apply(key, batch):
        img_key, tok_key = jax.random.split(key)
        out = dict(batch)
        if image is not None:
            img = batch["image"].astype(jnp.float32) / 255.0
            out["image"] = jnp.clip(image(img_key, img), 0.0, 1.0) * 255.0
        if cfg.token_dropout:
            s = special_tokens
            out["input_ids"] = token_dropout(tok_key, batch["input_ids"], batch["attention_mask"],
                                             cfg.token_dropout, s["mask"], s["keep"], s["pad"])
        return out

    return apply
