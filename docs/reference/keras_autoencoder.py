"""The reference dense autoencoder in TensorFlow/Keras, trained on Fashion-MNIST with the same settings as
examples/fashion_autoencoder.toml, for docs/results.md.

    python3 -m venv /tmp/kerasvenv && /tmp/kerasvenv/bin/pip install tensorflow-cpu
    /tmp/kerasvenv/bin/python docs/reference/keras_autoencoder.py --epochs 5 --seeds 0 1 2

Reads the IDX files of Debian's `dataset-fashion-mnist` package (no download). Settings: 784-128-64-16 ReLU
encoder, 16-64-784 decoder (ReLU, sigmoid output), Glorot-uniform weights and zero biases (Keras defaults, also set
in the nash pipeline), MSE, Adam(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8 as in nash/PyTorch), batch 64,
pixels scaled to [0, 1], shuffled every epoch. Prints the test-set MSE after the last epoch, one line per seed.
"""

import argparse
import gzip
import os
import struct
import time

import numpy as np


def read_idx(path):
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    _zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return np.frombuffer(data[4 + 4 * ndim :], dtype=np.uint8).reshape(dims)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    x_train = read_idx(os.path.join(args.dir, "train-images-idx3-ubyte.gz")).reshape(-1, 784).astype("float32") / 255.0
    x_test = read_idx(os.path.join(args.dir, "t10k-images-idx3-ubyte.gz")).reshape(-1, 784).astype("float32") / 255.0

    for seed in args.seeds:
        tf.keras.utils.set_random_seed(seed)
        inputs = tf.keras.Input(shape=(784,))
        h = tf.keras.layers.Dense(128, activation="relu")(inputs)
        h = tf.keras.layers.Dense(64, activation="relu")(h)
        code = tf.keras.layers.Dense(16, activation="relu")(h)
        h = tf.keras.layers.Dense(64, activation="relu")(code)
        outputs = tf.keras.layers.Dense(784, activation="sigmoid")(h)
        model = tf.keras.Model(inputs, outputs)
        model.compile(
            optimizer=tf.keras.optimizers.Adam(learning_rate=1e-3, beta_1=0.9, beta_2=0.999, epsilon=1e-8),
            loss="mse",
        )
        start = time.time()
        model.fit(x_train, x_train, epochs=args.epochs, batch_size=args.batch_size, shuffle=True, verbose=0)
        elapsed = time.time() - start
        test_mse = model.evaluate(x_test, x_test, batch_size=1000, verbose=0)
        steps = args.epochs * (len(x_train) // args.batch_size + (len(x_train) % args.batch_size > 0))
        print(f"keras seed={seed} epochs={args.epochs} test_mse={test_mse:.6f} steps_per_s={steps / elapsed:.1f}")


if __name__ == "__main__":
    main()
