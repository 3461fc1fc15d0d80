"""The validation loss: the diffusion loss on held-out images at fixed noise and fixed timesteps, so two runs
(or two steps of one run) are compared on the same numbers, not on a fresh draw.

Each held-out image i is encoded once (the posterior mean, no sampling), noised with noise seeded by i alone
(not by --seed: runs with different seeds are comparable) at K timesteps spread over the schedule,
t_k = (2k + 1) T / 2K, and the plain loss (no min-SNR weighting, no noise offset, no caption dropout) is
averaged over images and timesteps.
"""

import random
from dataclasses import replace

import torch

from ldm_cli.diffusion.conditioning import cat
from ldm_cli.train.batches import Batches
from ldm_cli.train.loss import diffusion_loss

TIMESTEPS = 4


class ValidationLoss:
    def __init__(self, cfg, examples: list, encoders, cached):
        self.examples = examples
        # centre crops, no flips: the held-out pixels never change
        self.batches = Batches(replace(cfg, random_crop=False, random_flip=False), examples, encoders, cached, 1, 0)

    @torch.no_grad()
    def __call__(self, unet, schedule, accelerator) -> float:
        n = schedule.num_train_timesteps
        t = torch.tensor([(2 * k + 1) * n // (2 * TIMESTEPS) for k in range(TIMESTEPS)])
        total = 0.0
        was_training = unet.training
        unet.eval()
        for i, e in enumerate(self.examples):
            moments, context = self.batches.encode([e], [e.caption], random.Random(0))
            mean = torch.chunk(moments, 2, dim=1)[0] * self.batches.scaling_factor
            with accelerator.autocast():
                loss = diffusion_loss(unet, schedule, mean.repeat(TIMESTEPS, 1, 1, 1), cat([context] * TIMESTEPS),
                                      torch.Generator().manual_seed(i), timesteps=t)
            total += float(loss)
        unet.train(was_training)
        return total / len(self.examples)
