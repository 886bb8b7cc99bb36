"""The PyTorch peer: eager mode, torch.optim.Adam, zero_grad(set_to_none=True)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from common import (
    AE_ADAM,
    AE_HIDDEN,
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


def _mlp(sizes: list[int], hidden_act: Callable[[], nn.Module], out_act: nn.Module | None) -> nn.Sequential:
    """Linear layers between `sizes`, `hidden_act()` after each hidden one, `out_act` at the end."""
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(hidden_act())
    if out_act is not None:
        layers.append(out_act)
    return nn.Sequential(*layers)


def _leaky() -> nn.Module:
    return nn.LeakyReLU(LEAKY_SLOPE)


def _adam(params: Iterable[nn.Parameter], hp: tuple[float, float, float, float]) -> torch.optim.Adam:
    lr, b1, b2, eps = hp
    return torch.optim.Adam(params, lr=lr, betas=(b1, b2), eps=eps)


def _autoencoder(args: Args, data: list[torch.Tensor]) -> Trainer:
    hidden = [scaled(u, args.width) for u in AE_HIDDEN]
    model = _mlp([FLAT, *hidden, FLAT], nn.ReLU, nn.Sigmoid())
    opt = _adam(model.parameters(), AE_ADAM)

    def step(i: int) -> torch.Tensor:
        x = data[i % len(data)]
        opt.zero_grad(set_to_none=True)
        loss = F.mse_loss(model(x), x)
        loss.backward()
        opt.step()
        return loss

    return Trainer(step, lambda loss: loss.item(), torch.__version__, "eager")


def _gan_nets(args: Args) -> tuple[nn.Module, nn.Module]:
    if args.workload == "mlp_gan":
        g = _mlp([LATENT, *(scaled(u, args.width) for u in GAN_G_HIDDEN), FLAT], _leaky, nn.Tanh())
        d = _mlp([FLAT, *(scaled(u, args.width) for u in GAN_D_HIDDEN), 1], _leaky, None)
        return g, d
    w = scaled(DCGAN_BASE, args.width)
    s = IMAGE_SIDE // 4
    g = nn.Sequential(
        nn.Linear(LATENT, 2 * w * s * s, bias=False),
        nn.Unflatten(1, (2 * w, s, s)),
        nn.BatchNorm2d(2 * w),
        nn.ReLU(),
        nn.ConvTranspose2d(2 * w, w, 4, 2, 1, bias=False),
        nn.BatchNorm2d(w),
        nn.ReLU(),
        nn.ConvTranspose2d(w, 1, 4, 2, 1, bias=False),
        nn.Tanh(),
    )
    d = nn.Sequential(
        nn.Conv2d(1, w, 4, 2, 1, bias=False),
        nn.LeakyReLU(LEAKY_SLOPE),
        nn.Conv2d(w, 2 * w, 4, 2, 1, bias=False),
        nn.BatchNorm2d(2 * w),
        nn.LeakyReLU(LEAKY_SLOPE),
        nn.Flatten(),
        nn.Linear(2 * w * s * s, 1, bias=False),
    )
    return g, d


def _gan(args: Args, data: list[torch.Tensor]) -> Trainer:
    g, d = _gan_nets(args)
    opt_g = _adam(g.parameters(), GAN_ADAM)
    opt_d = _adam(d.parameters(), GAN_ADAM)
    ones = torch.ones(args.batch, 1)
    zeros = torch.zeros(args.batch, 1)
    d_params = list(d.parameters())

    def step(i: int) -> torch.Tensor:
        real = data[i % len(data)]
        # Discriminator: real -> 1, detached fakes from fresh z -> 0.
        fake = g(torch.randn(args.batch, LATENT)).detach()
        opt_d.zero_grad(set_to_none=True)
        d_loss = F.binary_cross_entropy_with_logits(d(real), ones) + F.binary_cross_entropy_with_logits(d(fake), zeros)
        d_loss.backward()
        opt_d.step()
        # Generator (non-saturating): fresh z, fakes -> 1; D's weights need no gradient here.
        for p in d_params:
            p.requires_grad_(False)
        opt_g.zero_grad(set_to_none=True)
        g_loss = F.binary_cross_entropy_with_logits(d(g(torch.randn(args.batch, LATENT))), ones)
        g_loss.backward()
        opt_g.step()
        for p in d_params:
            p.requires_grad_(True)
        return g_loss

    notes = "eager, NCHW" if args.workload == "dcgan" else "eager"
    return Trainer(step, lambda loss: loss.item(), torch.__version__, notes)


def build(args: Args) -> Trainer:
    """Builds the workload in PyTorch on `args.threads` intra-op threads and one inter-op thread."""
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    torch.manual_seed(0)
    data = [torch.from_numpy(b) for b in batches(synthetic_data(args.workload), args.batch)]
    if args.workload == "autoencoder":
        return _autoencoder(args, data)
    return _gan(args, data)
