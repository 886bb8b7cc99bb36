"""The JAX peer: pure-JAX models, optax Adam, the whole step (parameters and optimizer state in, donated)
in one jax.jit."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import optax

from common import (
    AE_ADAM,
    AE_HIDDEN,
    BN_EPS,
    BN_MOMENTUM,
    DCGAN_BASE,
    FLAT,
    GAN_ADAM,
    GAN_D_HIDDEN,
    GAN_G_HIDDEN,
    IMAGE_SIDE,
    LATENT,
    LEAKY_SLOPE,
    Args,
    Trainer,
    batches,
    scaled,
    synthetic_data,
)

Params = Any
Key = jax.Array


def _uniform(key: Key, shape: tuple[int, ...], fan_in: int) -> jax.Array:
    """PyTorch's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def _dense_params(key: Key, sizes: list[int]) -> list[dict[str, jax.Array]]:
    """Weights [in, out] and biases of dense layers between `sizes`."""
    layers = []
    for fan_in, fan_out in itertools.pairwise(sizes):
        key, kw, kb = jax.random.split(key, 3)
        layers.append({"w": _uniform(kw, (fan_in, fan_out), fan_in), "b": _uniform(kb, (fan_out,), fan_in)})
    return layers


def _mlp(layers: list[dict[str, jax.Array]], x: jax.Array, act: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """Dense layers with `act` after each hidden one; the output is raw."""
    for i, layer in enumerate(layers):
        x = x @ layer["w"] + layer["b"]
        if i < len(layers) - 1:
            x = act(x)
    return x


def _leaky(x: jax.Array) -> jax.Array:
    return jax.nn.leaky_relu(x, LEAKY_SLOPE)


def _adam(hp: tuple[float, float, float, float]) -> optax.GradientTransformation:
    lr, b1, b2, eps = hp
    return optax.adam(lr, b1=b1, b2=b2, eps=eps)


def _autoencoder(args: Args, data: list[jax.Array]) -> Trainer:
    sizes = [FLAT, *(scaled(u, args.width) for u in AE_HIDDEN), FLAT]
    params = _dense_params(jax.random.PRNGKey(0), sizes)
    opt = _adam(AE_ADAM)
    state = {"params": params, "opt": opt.init(params)}

    def loss_fn(p: Params, x: jax.Array) -> jax.Array:
        return jnp.mean(jnp.square(jax.nn.sigmoid(_mlp(p, x, jax.nn.relu)) - x))

    @partial(jax.jit, donate_argnums=0)
    def train_step(s: dict[str, Any], x: jax.Array) -> tuple[dict[str, Any], jax.Array]:
        loss, grads = jax.value_and_grad(loss_fn)(s["params"], x)
        updates, opt_state = opt.update(grads, s["opt"], s["params"])
        return {"params": optax.apply_updates(s["params"], updates), "opt": opt_state}, loss

    return _trainer(train_step, state, data, "jax.jit whole step, donated state")


# --- the 28x28 DCGAN (NCHW, OIHW kernels, as nash and PyTorch) -------------------------------------------

_CONV_DIMS = ("NCHW", "OIHW", "NCHW")


def _conv(x: jax.Array, k: jax.Array) -> jax.Array:
    """Conv2d(k4, s2, p1), no bias."""
    return jax.lax.conv_general_dilated(x, k, (2, 2), ((1, 1), (1, 1)), dimension_numbers=_CONV_DIMS)


def _conv_transpose(x: jax.Array, k: jax.Array) -> jax.Array:
    """ConvTranspose2d(k4, s2, p1), no bias: a stride-1 convolution of the 2x-dilated input padded by k-1-p."""
    return jax.lax.conv_general_dilated(
        x, k, (1, 1), ((2, 2), (2, 2)), lhs_dilation=(2, 2), dimension_numbers=_CONV_DIMS
    )


def _batch_norm(
    x: jax.Array, p: dict[str, jax.Array], stats: dict[str, jax.Array]
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Training-mode BatchNorm2d: normalises with the batch's statistics and updates the running ones."""
    mean = jnp.mean(x, axis=(0, 2, 3))
    var = jnp.var(x, axis=(0, 2, 3))
    n = x.size / x.shape[1]
    new_stats = {
        "mean": (1 - BN_MOMENTUM) * stats["mean"] + BN_MOMENTUM * mean,
        "var": (1 - BN_MOMENTUM) * stats["var"] + BN_MOMENTUM * var * n / (n - 1),
    }
    inv = jax.lax.rsqrt(var + BN_EPS) * p["scale"]
    y = (x - mean[None, :, None, None]) * inv[None, :, None, None] + p["shift"][None, :, None, None]
    return y, new_stats


def _bn_params(c: int) -> dict[str, jax.Array]:
    return {"scale": jnp.ones((c,)), "shift": jnp.zeros((c,))}


def _bn_stats(c: int) -> dict[str, jax.Array]:
    return {"mean": jnp.zeros((c,)), "var": jnp.ones((c,))}


def _dcgan_init(key: Key, width: float) -> tuple[Params, Params, dict[str, Any]]:
    w = scaled(DCGAN_BASE, width)
    s = IMAGE_SIDE // 4
    k = jax.random.split(key, 6)
    g = {
        "fc": _uniform(k[0], (LATENT, 2 * w * s * s), LATENT),
        "bn0": _bn_params(2 * w),
        "ct1": _uniform(k[1], (w, 2 * w, 4, 4), 2 * w * 16),
        "bn1": _bn_params(w),
        "ct2": _uniform(k[2], (1, w, 4, 4), w * 16),
    }
    d = {
        "c1": _uniform(k[3], (w, 1, 4, 4), 16),
        "c2": _uniform(k[4], (2 * w, w, 4, 4), w * 16),
        "bn2": _bn_params(2 * w),
        "fc": _uniform(k[5], (2 * w * s * s, 1), 2 * w * s * s),
    }
    stats = {"g0": _bn_stats(2 * w), "g1": _bn_stats(w), "d2": _bn_stats(2 * w)}
    return g, d, stats


def _dcgan_g(p: Params, z: jax.Array, stats: dict[str, Any]) -> tuple[jax.Array, dict[str, Any]]:
    s = IMAGE_SIDE // 4
    x = (z @ p["fc"]).reshape(z.shape[0], -1, s, s)
    x, g0 = _batch_norm(x, p["bn0"], stats["g0"])
    x, g1 = _batch_norm(_conv_transpose(jax.nn.relu(x), p["ct1"]), p["bn1"], stats["g1"])
    x = jnp.tanh(_conv_transpose(jax.nn.relu(x), p["ct2"]))
    return x, {**stats, "g0": g0, "g1": g1}


def _dcgan_d(p: Params, x: jax.Array, stats: dict[str, Any]) -> tuple[jax.Array, dict[str, Any]]:
    x = _leaky(_conv(x, p["c1"]))
    x, d2 = _batch_norm(_conv(x, p["c2"]), p["bn2"], stats["d2"])
    x = _leaky(x).reshape(x.shape[0], -1)
    return x @ p["fc"], {**stats, "d2": d2}


def _mlp_gan_init(key: Key, width: float) -> tuple[Params, Params, dict[str, Any]]:
    kg, kd = jax.random.split(key)
    g = _dense_params(kg, [LATENT, *(scaled(u, width) for u in GAN_G_HIDDEN), FLAT])
    d = _dense_params(kd, [FLAT, *(scaled(u, width) for u in GAN_D_HIDDEN), 1])
    return g, d, {}


def _mlp_gan_g(p: Params, z: jax.Array, stats: dict[str, Any]) -> tuple[jax.Array, dict[str, Any]]:
    return jnp.tanh(_mlp(p, z, _leaky)), stats


def _mlp_gan_d(p: Params, x: jax.Array, stats: dict[str, Any]) -> tuple[jax.Array, dict[str, Any]]:
    return _mlp(p, x, _leaky), stats


def _gan(args: Args, data: list[jax.Array]) -> Trainer:
    if args.workload == "mlp_gan":
        init, gen, disc = _mlp_gan_init, _mlp_gan_g, _mlp_gan_d
    else:
        init, gen, disc = _dcgan_init, _dcgan_g, _dcgan_d
    key, init_key = jax.random.split(jax.random.PRNGKey(0))
    g, d, stats = init(init_key, args.width)
    opt_g, opt_d = _adam(GAN_ADAM), _adam(GAN_ADAM)
    state = {"g": g, "d": d, "opt_g": opt_g.init(g), "opt_d": opt_d.init(d), "stats": stats, "key": key}
    bce = optax.sigmoid_binary_cross_entropy

    def d_loss_fn(d: Params, g: Params, stats: dict[str, Any], real: jax.Array, z: jax.Array):
        fake, stats = gen(g, z, stats)
        fake = jax.lax.stop_gradient(fake)
        real_logit, stats = disc(d, real, stats)
        fake_logit, stats = disc(d, fake, stats)
        loss = jnp.mean(bce(real_logit, jnp.ones_like(real_logit))) + jnp.mean(
            bce(fake_logit, jnp.zeros_like(fake_logit))
        )
        return loss, stats

    def g_loss_fn(g: Params, d: Params, stats: dict[str, Any], z: jax.Array):
        fake, stats = gen(g, z, stats)
        logit, stats = disc(d, fake, stats)
        return jnp.mean(bce(logit, jnp.ones_like(logit))), stats

    @partial(jax.jit, donate_argnums=0)
    def train_step(s: dict[str, Any], real: jax.Array) -> tuple[dict[str, Any], jax.Array]:
        key, kd, kg = jax.random.split(s["key"], 3)
        z_d = jax.random.normal(kd, (real.shape[0], LATENT))
        (_, stats), grads = jax.value_and_grad(d_loss_fn, has_aux=True)(s["d"], s["g"], s["stats"], real, z_d)
        updates, opt_d_state = opt_d.update(grads, s["opt_d"], s["d"])
        d_new = optax.apply_updates(s["d"], updates)
        z_g = jax.random.normal(kg, (real.shape[0], LATENT))
        (g_loss, stats), grads = jax.value_and_grad(g_loss_fn, has_aux=True)(s["g"], d_new, stats, z_g)
        updates, opt_g_state = opt_g.update(grads, s["opt_g"], s["g"])
        g_new = optax.apply_updates(s["g"], updates)
        new = {"g": g_new, "d": d_new, "opt_g": opt_g_state, "opt_d": opt_d_state, "stats": stats, "key": key}
        return new, g_loss

    layout = ", NCHW" if args.workload == "dcgan" else ""
    return _trainer(train_step, state, data, f"jax.jit whole D+G step, donated state{layout}")


def _trainer(
    train_step: Callable[[dict[str, Any], jax.Array], tuple[dict[str, Any], jax.Array]],
    state: dict[str, Any],
    data: list[jax.Array],
    notes: str,
) -> Trainer:
    """Wraps a jitted step that threads its state through (the donated state is replaced each step)."""
    holder = [state]

    def step(i: int) -> jax.Array:
        holder[0], loss = train_step(holder[0], data[i % len(data)])
        return loss

    def sync(loss: jax.Array) -> float:
        return float(loss.block_until_ready())

    return Trainer(step, sync, f"{jax.__version__} (optax {optax.__version__})", notes)


def build(args: Args) -> Trainer:
    """Builds the workload in JAX (threads are set through XLA_FLAGS before the import, see common)."""
    data = [jnp.asarray(b) for b in batches(synthetic_data(args.workload), args.batch)]
    if args.workload == "autoencoder":
        return _autoencoder(args, data)
    return _gan(args, data)
