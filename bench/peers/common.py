"""What every Python peer shares: the command line, the synthetic data, the timing protocol and the
JSON record of one measurement (the contract with `nash bench speed`, see bench/README.md)."""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

FRAMEWORKS = ("tensorflow", "jax", "pytorch")
WORKLOADS = ("autoencoder", "mlp_gan", "dcgan")

#: Samples in the fixed host data set, cycled through in batches.
DATA_SAMPLES = 1024
#: Seed of the data generator (the models use each framework's own default init).
DATA_SEED = 0
IMAGE_SIDE = 28
FLAT = IMAGE_SIDE * IMAGE_SIDE
LATENT = 100

# Hidden widths at width multiplier 1 (see the workloads in bench/README.md).
AE_HIDDEN = (128, 64, 16, 64)
GAN_G_HIDDEN = (128, 256, 512)
GAN_D_HIDDEN = (256, 512)
DCGAN_BASE = 64

# Optimizer hyperparameters: (learning rate, beta1, beta2, eps).
AE_ADAM = (1e-3, 0.9, 0.999, 1e-8)
GAN_ADAM = (2e-4, 0.5, 0.999, 1e-8)
LEAKY_SLOPE = 0.2
#: Batch-norm epsilon and running-average momentum in PyTorch's convention.
BN_EPS = 1e-5
BN_MOMENTUM = 0.1


@dataclass(frozen=True)
class Args:
    """One measurement's settings."""

    framework: str
    workload: str
    threads: int
    batch: int
    width: float
    warmup: int
    steps: int
    repeats: int
    tf_jit_compile: str


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> Args:
    """Parses and checks the peer's command line."""
    p = argparse.ArgumentParser(description="One speed measurement of a Python peer; prints one JSON record.")
    p.add_argument("--framework", required=True, choices=FRAMEWORKS)
    p.add_argument("--workload", required=True, choices=WORKLOADS)
    p.add_argument("--threads", type=_positive_int, default=1)
    p.add_argument("--batch", type=_positive_int, default=64)
    p.add_argument("--width", type=_positive_float, default=1.0, help="hidden-width multiplier")
    p.add_argument("--warmup", type=_non_negative_int, default=10)
    p.add_argument("--steps", type=_positive_int, default=200, help="steps per timed run")
    p.add_argument("--repeats", type=_positive_int, default=5)
    p.add_argument(
        "--tf-jit-compile",
        choices=("default", "on", "off"),
        default="default",
        help="tensorflow only: tf.function(jit_compile=...); default on (the faster, see tf_peer.py)",
    )
    ns = p.parse_args(argv)
    if ns.batch > DATA_SAMPLES:
        p.error(f"--batch must be at most {DATA_SAMPLES} (the size of the synthetic data set), got {ns.batch}")
    return Args(**vars(ns))


def scaled(units: int, width: float) -> int:
    """A hidden width times the width multiplier, at least 1."""
    return max(1, round(units * width))


def synthetic_data(workload: str) -> np.ndarray:
    """The fixed host data set: uniform [0, 1) flat vectors for the autoencoder, uniform [-1, 1) for the
    GANs (flat for mlp_gan, NCHW [n, 1, 28, 28] for dcgan)."""
    rng = np.random.default_rng(DATA_SEED)
    if workload == "autoencoder":
        return rng.random((DATA_SAMPLES, FLAT), dtype=np.float32)
    data = (rng.random((DATA_SAMPLES, FLAT), dtype=np.float32) * 2.0 - 1.0).astype(np.float32)
    if workload == "dcgan":
        return data.reshape(DATA_SAMPLES, 1, IMAGE_SIDE, IMAGE_SIDE)
    return data


def batches(data: np.ndarray, batch: int) -> list[np.ndarray]:
    """The data cut into whole, contiguous batches (cycled through by the step loop)."""
    return [np.ascontiguousarray(data[i : i + batch]) for i in range(0, len(data) - batch + 1, batch)]


def configure_thread_env(threads: int) -> None:
    """Environment settings that must precede the framework's import (OpenMP / Eigen / XLA pools)."""
    n = str(threads)
    os.environ["OMP_NUM_THREADS"] = n
    os.environ["MKL_NUM_THREADS"] = n
    os.environ["OPENBLAS_NUM_THREADS"] = n
    os.environ["TF_NUM_INTRAOP_THREADS"] = n
    os.environ["TF_NUM_INTEROP_THREADS"] = "1"
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    multi = "true" if threads > 1 else "false"
    os.environ["XLA_FLAGS"] = f"--xla_cpu_multi_thread_eigen={multi} intra_op_parallelism_threads={n}"
    os.environ["JAX_PLATFORMS"] = "cpu"


@dataclass
class Trainer:
    """A built workload: `step(batch_index)` runs one training step and returns a loss handle; `sync(handle)`
    waits for it and reads it back as a float."""

    step: Callable[[int], Any]
    sync: Callable[[Any], float]
    version: str
    notes: str


def measure(trainer: Trainer, args: Args) -> list[float]:
    """The timing protocol: `warmup` untimed steps (including any compilation), then `repeats` runs of
    `steps` steps, each timed with a monotonic clock up to the read-back of its last loss. Returns steps/s
    per run. Raises if a loss is not finite (a broken model must not pass for a fast one)."""
    step, sync = trainer.step, trainer.sync
    i = 0
    if args.warmup:
        handle = None
        for _ in range(args.warmup):
            handle = step(i)
            i += 1
        _check_finite(sync(handle))
    rates = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for _ in range(args.steps):
            handle = step(i)
            i += 1
        loss = sync(handle)
        elapsed = time.perf_counter() - start
        _check_finite(loss)
        rates.append(args.steps / elapsed)
    return rates


def _check_finite(loss: float) -> None:
    if not np.isfinite(loss):
        raise RuntimeError(f"the training loss is not finite ({loss}); the measurement is void")


def peak_rss_mb() -> float:
    """Peak resident set of this process in MB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def record(args: Args, trainer: Trainer, rates: list[float]) -> dict[str, Any]:
    """The contract's JSON object for one measurement."""
    return {
        "framework": args.framework,
        "version": trainer.version,
        "workload": args.workload,
        "threads": args.threads,
        "batch": args.batch,
        "width": args.width,
        "warmup": args.warmup,
        "steps": args.steps,
        "steps_per_s": [round(r, 3) for r in rates],
        "min": round(min(rates), 3),
        "median": round(statistics.median(rates), 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "notes": trainer.notes,
    }


def emit(obj: dict[str, Any]) -> None:
    """Prints the record as the last line of stdout."""
    print(json.dumps(obj), flush=True)
