"""The TensorFlow peer: Keras layers, the whole train step in one tf.function, Keras Adam."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

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

#: tf.function(jit_compile=...) by default: XLA was the faster setting on every workload at 1 thread, batch 64
#: (TF 2.21: autoencoder +15-30%, mlp_gan +5-25%, dcgan +25-70%); `--tf-jit-compile off` measures the other.
JIT_COMPILE_DEFAULT = True


def _adam(hp: tuple[float, float, float, float]) -> keras.optimizers.Adam:
    lr, b1, b2, eps = hp
    return keras.optimizers.Adam(learning_rate=lr, beta_1=b1, beta_2=b2, epsilon=eps)


def _dense_stack(inputs: int, units: list[int], leaky: bool, out_act: str | None) -> keras.Sequential:
    """Dense layers of `units`, LeakyReLU(0.2) (`leaky`) or ReLU after each but the last, `out_act` on the last."""
    layers: list[keras.layers.Layer] = [keras.Input(shape=(inputs,))]
    for n in units[:-1]:
        layers.append(keras.layers.Dense(n))
        layers.append(keras.layers.LeakyReLU(LEAKY_SLOPE) if leaky else keras.layers.ReLU())
    layers.append(keras.layers.Dense(units[-1], activation=out_act))
    return keras.Sequential(layers)


def _bn() -> keras.layers.Layer:
    # PyTorch's running-average momentum 0.1 is Keras's 0.9.
    return keras.layers.BatchNormalization(momentum=1.0 - BN_MOMENTUM, epsilon=BN_EPS)


def _dcgan_nets(width: float) -> tuple[keras.Model, keras.Model]:
    """The 28x28 DCGAN, channel-last (NHWC: TensorFlow's CPU convolutions are channel-last)."""
    w = scaled(DCGAN_BASE, width)
    s = IMAGE_SIDE // 4
    g = keras.Sequential(
        [
            keras.Input(shape=(LATENT,)),
            keras.layers.Dense(2 * w * s * s, use_bias=False),
            keras.layers.Reshape((s, s, 2 * w)),
            _bn(),
            keras.layers.ReLU(),
            keras.layers.Conv2DTranspose(w, 4, strides=2, padding="same", use_bias=False),
            _bn(),
            keras.layers.ReLU(),
            keras.layers.Conv2DTranspose(1, 4, strides=2, padding="same", use_bias=False, activation="tanh"),
        ]
    )
    d = keras.Sequential(
        [
            keras.Input(shape=(IMAGE_SIDE, IMAGE_SIDE, 1)),
            keras.layers.Conv2D(w, 4, strides=2, padding="same", use_bias=False),
            keras.layers.LeakyReLU(LEAKY_SLOPE),
            keras.layers.Conv2D(2 * w, 4, strides=2, padding="same", use_bias=False),
            _bn(),
            keras.layers.LeakyReLU(LEAKY_SLOPE),
            keras.layers.Flatten(),
            keras.layers.Dense(1, use_bias=False),
        ]
    )
    return g, d


def _autoencoder(args: Args, jit: bool) -> tf.types.experimental.PolymorphicFunction:
    hidden = [scaled(u, args.width) for u in AE_HIDDEN]
    model = _dense_stack(FLAT, [*hidden, FLAT], False, "sigmoid")
    opt = _adam(AE_ADAM)
    opt.build(model.trainable_variables)

    @tf.function(jit_compile=jit)
    def step(x: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x, training=True) - x))
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    return step


def _gan(args: Args, jit: bool) -> tf.types.experimental.PolymorphicFunction:
    if args.workload == "mlp_gan":
        g = _dense_stack(LATENT, [*(scaled(u, args.width) for u in GAN_G_HIDDEN), FLAT], True, "tanh")
        d = _dense_stack(FLAT, [*(scaled(u, args.width) for u in GAN_D_HIDDEN), 1], True, None)
    else:
        g, d = _dcgan_nets(args.width)
    opt_g, opt_d = _adam(GAN_ADAM), _adam(GAN_ADAM)
    opt_g.build(g.trainable_variables)
    opt_d.build(d.trainable_variables)
    rng = tf.random.Generator.from_seed(0)
    bce = keras.losses.BinaryCrossentropy(from_logits=True)
    ones = tf.ones((args.batch, 1))
    zeros = tf.zeros((args.batch, 1))

    @tf.function(jit_compile=jit)
    def step(real: tf.Tensor) -> tf.Tensor:
        # Discriminator: real -> 1, fakes from fresh z (no gradient into G) -> 0.
        fake = tf.stop_gradient(g(rng.normal((args.batch, LATENT)), training=True))
        with tf.GradientTape() as tape:
            d_loss = bce(ones, d(real, training=True)) + bce(zeros, d(fake, training=True))
        opt_d.apply_gradients(zip(tape.gradient(d_loss, d.trainable_variables), d.trainable_variables))
        # Generator (non-saturating): fresh z, fakes -> 1.
        with tf.GradientTape() as tape:
            g_loss = bce(ones, d(g(rng.normal((args.batch, LATENT)), training=True), training=True))
        opt_g.apply_gradients(zip(tape.gradient(g_loss, g.trainable_variables), g.trainable_variables))
        return g_loss

    return step


def build(args: Args) -> Trainer:
    """Builds the workload in TensorFlow on `args.threads` intra-op threads and one inter-op thread."""
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    keras.utils.set_random_seed(0)
    host = synthetic_data(args.workload)
    if args.workload == "dcgan":
        host = np.ascontiguousarray(host.transpose(0, 2, 3, 1))  # NCHW -> NHWC
    data = [tf.constant(b) for b in batches(host, args.batch)]
    jit = JIT_COMPILE_DEFAULT if args.tf_jit_compile == "default" else args.tf_jit_compile == "on"
    make = _autoencoder if args.workload == "autoencoder" else _gan
    step = make(args, jit)
    layout = ", NHWC" if args.workload == "dcgan" else ""
    return Trainer(
        step=lambda i: step(data[i % len(data)]),
        sync=lambda loss: float(loss.numpy()),
        version=tf.__version__,
        notes=f"tf.function jit_compile={jit}, keras {keras.__version__}{layout}",
    )
