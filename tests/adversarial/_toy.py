"""A toy diffusion pipeline in plain torch (no diffusers): a denoiser module, a scheduler with
`set_timesteps`, seeded noise per sample, images out. It has what the harness's probes look at
(`pipe.unet`, `pipe.scheduler`, `pipe.config`) and starts in a fraction of the time of the tiny
zoo, so each attack can be shown in its own sandboxed child quickly. The attack files of this
folder are appended to this source to make a candidate (test_adversarial.py)."""

import numpy as np
import torch
from PIL import Image


class ToyScheduler:
    def __init__(self):
        self.num_inference_steps = None
        self.timesteps = None

    def set_timesteps(self, num_inference_steps, device=None):
        self.num_inference_steps = num_inference_steps
        self.timesteps = torch.linspace(999, 0, num_inference_steps).long()

    def step(self, eps, t, x):
        return x - 0.1 * eps


class ToyDenoiser(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_in = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.conv_out = torch.nn.Conv2d(16, 3, 3, padding=1)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)

    def forward(self, x, t):
        return self.conv_out(torch.tanh(self.conv_in(x) + t.float().view(-1, 1, 1, 1) / 1000.0))


class ToyPipeline:
    def __init__(self):
        self.unet = ToyDenoiser().eval()
        self.scheduler = ToyScheduler()
        self.config = {"_name_or_path": "toy/toy-diffusion"}

    def noise(self, seeds, height, width):
        return torch.stack([torch.randn(3, height, width, generator=torch.Generator().manual_seed(s)) for s in seeds])

    def denoise(self, x, steps, skip=1):
        self.scheduler.set_timesteps(steps)
        with torch.no_grad():
            for i, t in enumerate(self.scheduler.timesteps):
                if i % skip == 0:
                    eps = self.unet(x, t.expand(x.shape[0]))
                x = self.scheduler.step(eps, t, x)
        return x

    def to_images(self, x):
        arr = ((x.clamp(-1, 1) + 1) * 127.5).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        return [Image.fromarray(np.ascontiguousarray(a)) for a in arr]

    def __call__(self, seeds, height, width, steps):
        return self.to_images(self.denoise(self.noise(seeds, height, width), steps))


def load_pipeline(device, dtype):
    return ToyPipeline()


def generate(pipe, batch):
    return pipe(batch["seeds"], batch["height"], batch["width"], batch["num_inference_steps"])
