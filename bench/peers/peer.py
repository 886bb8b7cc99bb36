"""One speed measurement of a Python peer in this process; prints one JSON record (the contract with
`nash bench speed`) as the last line of stdout.

    python peer.py --framework tensorflow|jax|pytorch --workload autoencoder|mlp_gan|dcgan \
        --threads N --batch B --width X --warmup K --steps S --repeats R
"""

from __future__ import annotations

import importlib
import sys

from common import Trainer, configure_thread_env, emit, measure, parse_args, record

MODULES = {"tensorflow": "tf_peer", "jax": "jax_peer", "pytorch": "torch_peer"}


def main() -> int:
    args = parse_args()
    configure_thread_env(args.threads)  # before the framework is imported
    try:
        module = importlib.import_module(MODULES[args.framework])
    except ImportError as e:
        print(f"error: {args.framework} is not importable ({e}); run bench/setup-venv.sh", file=sys.stderr)
        return 3
    trainer: Trainer = module.build(args)
    rates = measure(trainer, args)
    emit(record(args, trainer, rates))
    return 0


if __name__ == "__main__":
    sys.exit(main())
