"""A PyTorch model of TAEHV's reference architecture, written from its description
(madebyollin/taehv: `nn.Sequential` decoder/encoder of 2D convs, MemBlocks fed their input one
frame earlier with zeros before the first, TGrow/TPool as 1x1 convs plus NCHW reshapes), used as
the independent side of the TAEHV tests and to write `.pth` files in the published key layout."""

import torch
from torch import nn


def conv(n_in, n_out, **kw):
  return nn.Conv2d(n_in, n_out, 3, padding=1, **kw)


class Clamp(nn.Module):
  def forward(self, x):
    return torch.tanh(x / 3) * 3


class Mem(nn.Module):
  def __init__(self, n):
    super().__init__()
    self.conv = nn.Sequential(conv(2 * n, n), nn.ReLU(), conv(n, n), nn.ReLU(), conv(n, n))

  def forward(self, x, past):
    return torch.relu(self.conv(torch.cat([x, past], 1)) + x)


class Grow(nn.Module):
  def __init__(self, n, s):
    super().__init__()
    self.s, self.conv = s, nn.Conv2d(n, n * s, 1, bias=False)

  def forward(self, x):
    c = x.shape[1]
    return self.conv(x).reshape(-1, c, *x.shape[2:])


class Pool(nn.Module):
  def __init__(self, n, s):
    super().__init__()
    self.s, self.conv = s, nn.Conv2d(n * s, n, 1, bias=False)

  def forward(self, x):
    return self.conv(x.reshape(-1, self.s * x.shape[1], *x.shape[2:]))


class Ref(nn.Module):
  def __init__(self, c):
    super().__init__()
    n, e = c.decoder_channels, c.encoder_channels
    dec = [Clamp(), conv(c.latent_channels, n[0]), nn.ReLU()]
    for i in range(3):
      dec += [Mem(n[i]), Mem(n[i]), Mem(n[i]), nn.Upsample(scale_factor=2), Grow(n[i], 2 if c.decoder_time_upscale[i] else 1), conv(n[i], n[i + 1], bias=False)]
    self.decoder = nn.Sequential(*dec, nn.ReLU(), conv(n[3], 3))
    enc = [conv(3, e), nn.ReLU()]
    for i in range(3):
      enc += [Pool(e, 2 if c.encoder_time_downscale[i] else 1), conv(e, e, stride=2, bias=False), Mem(e), Mem(e), Mem(e)]
    self.encoder = nn.Sequential(*enc, conv(e, c.latent_channels))

  @staticmethod
  def apply(seq, x):  # x [N, T, C, H, W]
    n = x.shape[0]
    x = x.reshape(-1, *x.shape[2:])
    for b in seq:
      if isinstance(b, Mem):
        t = x.shape[0] // n
        xt = x.reshape(n, t, *x.shape[1:])
        past = torch.cat([torch.zeros_like(xt[:, :1]), xt[:, :-1]], 1).reshape(x.shape)
        x = b(x, past)
      else:
        x = b(x)
    return x.reshape(n, -1, *x.shape[1:])

  def decode(self, z):  # NTCHW latents -> NTCHW pixels in [0, 1]
    return self.apply(self.decoder, z)[:, 3:].clamp(0, 1)

  def encode(self, x):  # NTCHW pixels in [0, 1], T a multiple of 4
    return self.apply(self.encoder, x)
