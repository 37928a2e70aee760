"""PanWorld: procedural videos whose true motion is known, for training and for measuring motion.

A camera pans over an endless generated landscape, so new content keeps entering the frame; the
caption says the direction and speed ("camera pans left quickly over a snowy forest, a red ball
bounces"). Everything is a pure function of integers:

* the world: a biome's colours over multi-octave value noise whose lattice values are a hash of
  the integer world coordinates and the clip's seed, plus a scatter of features (trees, rocks,
  dunes, flowers) placed by the same hash, so any region of the endless plane renders the same
  whichever frame, clip length or resolution asks for it;
* the camera: an integer velocity in pixels per frame (`slowly` 1, `quickly` 2 by default), so
  frame `t + 1` is frame `t` shifted by exactly that much, and the measured speed of a generated
  video (phase correlation) has an exact reference;
* an optional moving object in screen space (a ball that bounces, a cube that slides, a bird
  that flies), which moves across the camera's motion.

`render_clip(spec)` draws a `ClipSpec`; `sample_spec(rng, ...)` draws a spec (and so its
caption) from the grammar; `PanWorld` is the TFDS builder (array_record, no TensorFlow needed),
generated locally and deterministic by seed.
"""

from __future__ import annotations

import dataclasses
import os
import re

import numpy as np
import tensorflow_datasets as tfds

# The caption grammar: "camera pans {direction} {speed} over {biome}[, {object}]".
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
SPEEDS = {"slowly": 1, "quickly": 2}  # pixels per frame at the dataset's resolution (the default)
# biome -> (low ground, high ground, feature colour, feature density, feature radius in px)
BIOMES = {
  "a snowy forest": ((235, 240, 245), (200, 210, 225), (30, 80, 45), 0.030, 2.5),
  "a sandy desert": ((225, 190, 120), (190, 150, 90), (150, 110, 60), 0.008, 3.5),
  "a green meadow": ((90, 160, 70), (60, 120, 50), (230, 220, 60), 0.040, 1.5),
  "a rocky canyon": ((215, 130, 75), (95, 50, 35), (60, 55, 55), 0.025, 2.5),
}
COLORS = {"red": (220, 40, 40), "blue": (40, 80, 230), "yellow": (240, 220, 40), "white": (250, 250, 250)}
OBJECTS = {"ball": "bounces", "cube": "slides", "bird": "flies"}
_CAPTION = re.compile(
  r"^camera pans (?P<direction>\w+) (?P<speed>\w+) over (?P<biome>a [a-z]+ [a-z]+)(?:, a (?P<color>\w+) (?P<object>\w+) (?P<verb>\w+))?$"
)


@dataclasses.dataclass(frozen=True)
class ClipSpec:
  """One clip: what its caption says, plus where the camera starts and the object's start."""

  direction: str
  speed: str
  biome: str
  color: str | None = None  # the object's colour, None: no object
  obj: str | None = None
  seed: int = 0  # the world's seed (its terrain and features)
  start: tuple[int, int] = (0, 0)  # the camera's top-left corner in world pixels at frame 0
  obj_start: tuple[float, float] = (0.5, 0.5)  # the object's centre, as a fraction of the view
  obj_velocity: tuple[float, float] = (0.9, 1.3)  # the object's velocity, pixels per frame

  @property
  def caption(self) -> str:
    text = f"camera pans {self.direction} {self.speed} over {self.biome}"
    if self.obj is not None:
      text += f", a {self.color} {self.obj} {OBJECTS[self.obj]}"
    return text

  def velocity(self, speeds: dict | None = None) -> tuple[int, int]:
    """The camera's `(dy, dx)` in pixels per frame (the scene moves the opposite way)."""
    dy, dx = DIRECTIONS[self.direction]
    s = (speeds or SPEEDS)[self.speed]
    return dy * s, dx * s


def parse_caption(text: str) -> ClipSpec:
  """The `ClipSpec` (seed and starts at their defaults) of a caption of the grammar; a caption
  outside it is one ValueError that names the word at fault and the choices."""
  m = _CAPTION.match(text.strip().lower())
  if m is None:
    raise ValueError(f"caption {text!r} is not of the form 'camera pans <{'|'.join(DIRECTIONS)}> <{'|'.join(SPEEDS)}> over <biome>[, a <colour> <object> <verb>]'")
  g = m.groupdict()
  for key, table in (("direction", DIRECTIONS), ("speed", SPEEDS), ("biome", BIOMES)):
    if g[key] not in table:
      raise ValueError(f"caption {text!r}: {key} {g[key]!r} is not one of {sorted(table)}")
  if g["object"] is not None:
    if g["color"] not in COLORS:
      raise ValueError(f"caption {text!r}: colour {g['color']!r} is not one of {sorted(COLORS)}")
    if OBJECTS.get(g["object"]) != g["verb"]:
      raise ValueError(f"caption {text!r}: the object must be one of {[f'{o} {v}' for o, v in OBJECTS.items()]}")
  return ClipSpec(g["direction"], g["speed"], g["biome"], g["color"], g["object"])


def all_captions() -> list[str]:
  """Every caption of the grammar (with and without an object), in a fixed order."""
  out = []
  for d in DIRECTIONS:
    for s in SPEEDS:
      for b in BIOMES:
        out.append(ClipSpec(d, s, b).caption)
        for c in COLORS:
          for o in OBJECTS:
            out.append(ClipSpec(d, s, b, c, o).caption)
  return out


def sample_spec(rng: np.random.Generator, object_prob: float = 0.5, world: int = 100_000) -> ClipSpec:
  """A random clip of the grammar: direction, speed, biome, maybe an object, a world seed and a
  camera start anywhere on a `world`-pixel square of the endless plane."""
  has_obj = rng.random() < object_prob
  return ClipSpec(
    direction=str(rng.choice(list(DIRECTIONS))),
    speed=str(rng.choice(list(SPEEDS))),
    biome=str(rng.choice(list(BIOMES))),
    color=str(rng.choice(list(COLORS))) if has_obj else None,
    obj=str(rng.choice(list(OBJECTS))) if has_obj else None,
    seed=int(rng.integers(2**31)),
    start=(int(rng.integers(-world, world)), int(rng.integers(-world, world))),
    obj_start=(float(rng.uniform(0.2, 0.8)), float(rng.uniform(0.2, 0.8))),
    obj_velocity=(float(rng.uniform(-1.5, 1.5)), float(rng.uniform(-1.5, 1.5))),
  )


def spec_of_caption(caption: str, rng: np.random.Generator) -> ClipSpec:
  """A random clip of `caption`: its direction, speed, biome and object, a random world seed,
  camera start and object motion (as `sample_spec` draws them)."""
  base = parse_caption(caption)
  s = sample_spec(rng, object_prob=1.0 if base.obj else 0.0)
  return dataclasses.replace(s, direction=base.direction, speed=base.speed, biome=base.biome, color=base.color, obj=base.obj)


def vocabulary() -> list[str]:
  """The grammar's words (captions are lower case; "," is its own word), sorted."""
  return sorted({w for c in all_captions() for w in c.replace(",", " ,").split()})


def build_tokenizer(path: str, vocab_size: int = 192) -> str:
  """Writes a sentencepiece BPE model trained on every caption of the grammar to `path` (a
  `.model` file `asvd.load_tokenizer` reads, with umT5's special ids: pad 0, eos 1, unk 2) and
  returns the path. With the default size every word of the grammar is one piece (and "," its
  own), other text still tokenizes (by smaller pieces). Deterministic: the same file each time."""
  import io  # noqa: PLC0415

  import sentencepiece as spm  # noqa: PLC0415

  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(all_captions()), model_writer=model, model_type="bpe", vocab_size=vocab_size,
    pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, user_defined_symbols=[","],
    hard_vocab_limit=False, minloglevel=2, num_threads=1,
  )  # fmt: skip
  with open(path, "wb") as f:
    f.write(model.getvalue())
  return path


# ------------------------------------------------------------------------------------------------
# The world: hashed value noise and features on the integer plane.
# ------------------------------------------------------------------------------------------------


def _hash(y: np.ndarray, x: np.ndarray, seed: int, salt: int) -> np.ndarray:
  """A uniform [0, 1) value per integer lattice point (a 64-bit mix of y, x, seed and salt)."""
  h = y.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) ^ x.astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F)
  h ^= np.uint64((seed * 0x165667B19E3779F9 + salt * 0x27D4EB2F165667C5) % 2**64)
  h ^= h >> np.uint64(31)
  h *= np.uint64(0xBF58476D1CE4E5B9)
  h ^= h >> np.uint64(29)
  h *= np.uint64(0x94D049BB133111EB)
  h ^= h >> np.uint64(32)
  return (h >> np.uint64(11)).astype(np.float64) / float(2**53)


def _value_noise(y: np.ndarray, x: np.ndarray, cell: int, seed: int, salt: int) -> np.ndarray:
  """Smooth noise in [0, 1): hashed lattice values every `cell` pixels, smoothstep-interpolated."""
  gy, gx = np.floor_divide(y, cell), np.floor_divide(x, cell)
  fy, fx = (y - gy * cell) / cell, (x - gx * cell) / cell
  sy, sx = fy * fy * (3 - 2 * fy), fx * fx * (3 - 2 * fx)
  v00, v01 = _hash(gy, gx, seed, salt), _hash(gy, gx + 1, seed, salt)
  v10, v11 = _hash(gy + 1, gx, seed, salt), _hash(gy + 1, gx + 1, seed, salt)
  top, bottom = v00 + (v01 - v00) * sx, v10 + (v11 - v10) * sx
  return top + (bottom - top) * sy


def render_world(y: np.ndarray, x: np.ndarray, biome: str, seed: int, scale: float = 1.0, texture: float = 0.3) -> np.ndarray:
  """RGB float32 `[..., 3]` in [0, 255] of the world at integer pixel coordinates `y`, `x`.

  `scale` sizes the world's structures in pixels (1.0 suits views of about 32-64 pixels);
  `texture` is the amplitude of a fine (2-pixel) brightness texture over everything (0: none)."""
  low, high, feat, density, radius = BIOMES[biome]
  y, x = np.asarray(y, np.int64), np.asarray(x, np.int64)
  cells = [max(2, round(c * scale)) for c in (16, 8, 4)]
  h = sum(w * _value_noise(y, x, c, seed, i) for i, (c, w) in enumerate(zip(cells, (0.55, 0.3, 0.15), strict=True)))
  t = np.clip((h - 0.25) / 0.5, 0.0, 1.0)[..., None]
  rgb = np.asarray(low, np.float32) * (1 - t) + np.asarray(high, np.float32) * t
  # Features: at most one per `cell x cell` block, present with probability density * cell^2,
  # a disc of `radius` around a hashed point of the block (checked in the 3x3 neighbourhood).
  cell = max(3, round(6 * scale))
  r = radius * scale
  by, bx = np.floor_divide(y, cell), np.floor_divide(x, cell)
  mask = np.zeros(y.shape, bool)
  for oy in (-1, 0, 1):
    for ox in (-1, 0, 1):
      ny, nx = by + oy, bx + ox
      present = _hash(ny, nx, seed, 10) < density * cell * cell
      cy = ny * cell + _hash(ny, nx, seed, 11) * cell
      cx = nx * cell + _hash(ny, nx, seed, 12) * cell
      mask |= present & ((y - cy) ** 2 + (x - cx) ** 2 <= r * r)
  shade = 1.0 - 0.5 * texture + texture * _value_noise(y, x, 2, seed, 13)[..., None]  # fine texture
  rgb = np.where(mask[..., None], np.asarray(feat, np.float32), rgb) * shade
  return np.clip(rgb, 0, 255).astype(np.float32)


def _draw_object(frame: np.ndarray, spec: ClipSpec, t: int) -> None:
  """Draws the clip's object at frame `t` into `frame` `[H, W, 3]` (in place)."""
  hgt, wid = frame.shape[:2]
  size = max(1.5, 0.09 * min(hgt, wid))
  # Position: a reflection off the view's edges (a ball bounces, a cube slides, a bird flies).
  pos = []
  for k, n in ((0, hgt), (1, wid)):
    lo, hi = size, n - 1 - size
    p = spec.obj_start[k] * (n - 1) + spec.obj_velocity[k] * t
    span = hi - lo
    q = np.mod(p - lo, 2 * span)
    pos.append(lo + (q if q <= span else 2 * span - q))
  cy, cx = pos
  if spec.obj == "bird":  # no bounce vertically: a gentle wave
    cy = spec.obj_start[0] * (hgt - 1) + 0.15 * hgt * np.sin(0.3 * t)
  yy, xx = np.mgrid[0:hgt, 0:wid]
  if spec.obj == "ball":
    m = (yy - cy) ** 2 + (xx - cx) ** 2 <= size * size
  elif spec.obj == "cube":
    m = (np.abs(yy - cy) <= size) & (np.abs(xx - cx) <= size)
  else:  # bird: a flat "v"
    m = (np.abs(yy - cy - 0.5 * np.abs(xx - cx)) <= 0.6) & (np.abs(xx - cx) <= size)
  frame[m] = COLORS[spec.color]


def render_clip(spec: ClipSpec, frames: int, height: int, width: int, *, first: int = 0, speeds: dict | None = None, scale: float = 1.0, texture: float = 0.3) -> np.ndarray:
  """uint8 `[frames, height, width, 3]`: frames `first .. first + frames - 1` of the clip (any
  window of an endless clip renders the same pixels as the whole); `scale`, `texture`: the
  world's look (`render_world`)."""
  dy, dx = spec.velocity(speeds)
  iy, ix = np.mgrid[0:height, 0:width]
  out = np.empty((frames, height, width, 3), np.uint8)
  for k in range(frames):
    t = first + k
    y0, x0 = spec.start[0] + dy * t, spec.start[1] + dx * t
    img = render_world(iy + y0, ix + x0, spec.biome, spec.seed, scale, texture)
    if spec.obj is not None:
      _draw_object(img, spec, t)
    out[k] = np.round(img).astype(np.uint8)
  return out


def _orientation(img: np.ndarray) -> np.ndarray:
  """Unit gradient orientations `(gx + i gy) / |g|` of a grey image (0 where it is flat)."""
  g = np.asarray(img, np.float64)
  g = g.mean(-1) if g.ndim == 3 else g
  gy, gx = np.gradient(g)
  z = gx + 1j * gy
  mag = np.abs(z)
  return np.where(mag > 1e-3 * (mag.max() + 1e-12), z / (mag + 1e-12), 0.0)


def measure_shift(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
  """The `(dy, dx)` translation of the scene from frame `a` to frame `b` (`b[y, x] ~ a[y - dy,
  x - dx]`), to about a tenth of a pixel.

  Orientation correlation (circular cross-correlation of unit gradient orientations, with a
  parabolic fit around the peak): every textured pixel votes with the same weight whatever its
  contrast, so the background's motion wins over a small bright object moving another way. A
  camera panning with velocity `v` moves the scene by `-v` per frame."""
  za, zb = _orientation(a), _orientation(b)
  corr = np.fft.ifft2(np.fft.fft2(zb) * np.conj(np.fft.fft2(za))).real
  py, px = np.unravel_index(np.argmax(corr), corr.shape)
  shift = []
  for axis, p in ((0, py), (1, px)):
    n = corr.shape[axis]
    c = [corr[(p + d) % n, px] if axis == 0 else corr[py, (p + d) % n] for d in (-1, 0, 1)]
    den = c[0] - 2 * c[1] + c[2]
    frac = 0.5 * (c[0] - c[2]) / den if abs(den) > 1e-12 else 0.0
    s_ = p + frac
    shift.append(s_ - n if s_ > n / 2 else s_)
  return shift[0], shift[1]


# ------------------------------------------------------------------------------------------------
# The TFDS builder.
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class PanWorldConfig(tfds.core.BuilderConfig):
  frames: int = 17
  height: int = 32
  width: int = 32
  clips: int = 512
  seed: int = 0
  object_prob: float = 0.5
  scale: float = 1.0  # the world's look (render_world)
  texture: float = 0.3
  speeds: tuple[int, int] = (1, 2)  # the camera's pixels per frame, "slowly" and "quickly"

  def speed_table(self) -> dict[str, int]:
    return dict(zip(SPEEDS, self.speeds, strict=True))


def config_for(
  frames: int, height: int, width: int, clips: int, seed: int, object_prob: float = 0.5, scale: float = 1.0, texture: float = 0.3, speeds: dict | None = None
) -> PanWorldConfig:
  """The builder config of these clips; its name (the dataset's folder) says everything that
  changes the pixels."""
  sp = tuple(int(v) for v in (speeds or SPEEDS).values())
  name = f"f{frames}_h{height}_w{width}_n{clips}_s{seed}_o{round(100 * object_prob)}"
  if (scale, texture) != (1.0, 0.3):
    name += f"_x{scale:g}_t{texture:g}"
  if sp != tuple(SPEEDS.values()):
    name += "_v" + "-".join(map(str, sp))
  return PanWorldConfig(name=name, frames=frames, height=height, width=width, clips=clips, seed=seed, object_prob=object_prob, scale=scale, texture=texture, speeds=sp)


class PanWorld(tfds.core.GeneratorBasedBuilder):
  """PanWorld clips: `video` uint8 `[frames, H, W, 3]`, `caption`, the camera's `velocity`
  `(dy, dx)` in pixels per frame, its `world_seed` and `start`, and `index`: the clip is the
  `index`-th `sample_spec` draw from `np.random.default_rng(config.seed)`."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [config_for(17, 32, 32, 512, 0)]

  def _info(self) -> tfds.core.DatasetInfo:
    c = self.builder_config
    return tfds.core.DatasetInfo(
      builder=self,
      features=tfds.features.FeaturesDict(
        {
          "video": tfds.features.Tensor(shape=(c.frames, c.height, c.width, 3), dtype=np.uint8),
          "caption": tfds.features.Text(),
          "velocity": tfds.features.Tensor(shape=(2,), dtype=np.float32),
          "world_seed": tfds.features.Scalar(dtype=np.int64),
          "start": tfds.features.Tensor(shape=(2,), dtype=np.int64),
          "index": tfds.features.Scalar(dtype=np.int64),  # the clip's draw (TFDS stores them shuffled)
        }
      ),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    c = self.builder_config
    rng = np.random.default_rng(c.seed)
    for i in range(c.clips):
      spec = sample_spec(rng, c.object_prob)
      yield i, {
        "video": render_clip(spec, c.frames, c.height, c.width, speeds=c.speed_table(), scale=c.scale, texture=c.texture),
        "caption": spec.caption,
        "velocity": np.asarray(spec.velocity(c.speed_table()), np.float32),
        "world_seed": spec.seed,
        "start": np.asarray(spec.start, np.int64),
        "index": i,
      }


# ------------------------------------------------------------------------------------------------
# As training data: latents (space-to-depth pixels) and caption embeddings.
# ------------------------------------------------------------------------------------------------


def text_path(config, data_dir: str | None = None):
  """`(tokenizer, encoder)` of PanWorld's text: the grammar's tokenizer (written once to
  `data_dir/panworld/tokenizer.model`, or to a temporary folder) and a umT5-architecture encoder
  of `config.pipeline.text_encoder`'s shape with random, frozen weights from
  `config.pipeline.text_encoder_seed` (distinct captions get distinct embeddings)."""
  if data_dir is None:
    import tempfile  # noqa: PLC0415

    with tempfile.TemporaryDirectory(prefix="asvd-panworld-") as tmp:
      return text_path(config, tmp)  # (the tokenizer holds its model in memory)
  import asvd  # noqa: PLC0415
  from asvd.errors import UsageError  # noqa: PLC0415
  from asvd.models.umt5 import UMT5Config, init_text_encoder  # noqa: PLC0415

  p, m = config.pipeline, config.model
  arch = p.get("text_encoder")
  if arch is None:
    raise UsageError("train.data.name='panworld' needs pipeline.text_encoder: the tiny umT5 architecture of its text path (configs/panworld.py sets one)")
  arch = dict(arch.to_dict() if hasattr(arch, "to_dict") else arch)
  if int(arch.get("dim", -1)) != int(m.text_dim):
    raise UsageError(f"pipeline.text_encoder.dim={arch.get('dim')} must equal model.text_dim={m.text_dim} (the encoder's output is the DiT's text context)")
  folder = os.path.join(data_dir, "panworld")
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, "tokenizer.model")
  if not os.path.exists(path):  # written under a fresh temporary name, renamed into place
    import tempfile  # noqa: PLC0415

    fd, tmp = tempfile.mkstemp(prefix="tokenizer.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
      build_tokenizer(tmp)
      os.replace(tmp, path)
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)
  tok = asvd.load_tokenizer(path, max_length=int(m.text_len))
  enc = init_text_encoder(UMT5Config(**arch), int(p.get("text_encoder_seed", 0)))
  return tok, enc


def embed_prompts(config, prompts: list[str]) -> np.ndarray:
  """float32 `[len(prompts), text_len, text_dim]`: captions of the grammar through PanWorld's text
  path (the context `asvd generate --prompt` gives a PanWorld model); a prompt outside the
  grammar is one ValueError naming the word at fault."""
  from asvd.text.tokenizer import encode_prompts  # noqa: PLC0415

  prompts = [parse_caption(p).caption for p in prompts]  # checked and normalised
  tok, enc = text_path(config)
  return np.asarray(encode_prompts(enc, tok, prompts), np.float32)


def caption_table(config, data_dir: str) -> dict[str, np.ndarray]:
  """`{caption: float32 [text_len, text_dim]}` for every caption of the grammar (one batch)."""
  from asvd.text.tokenizer import encode_prompts  # noqa: PLC0415

  tok, enc = text_path(config, data_dir)
  caps = all_captions()
  emb = np.asarray(encode_prompts(enc, tok, caps), np.float32)
  return dict(zip(caps, emb, strict=True))


class TrainingSource:
  """PanWorld clips as training examples `{"latents": [T, h, w, 3 p^2], "text": [L, D]}` plus
  the clip's `caption`, `velocity` and `index` (random access, what the grain pipeline and the
  trainer's sampler read)."""

  def __init__(self, clips, codec, table: dict[str, np.ndarray]):
    self._clips, self._codec, self._table = clips, codec, table

  def __len__(self) -> int:
    return len(self._clips)

  def __getitem__(self, i):
    ex = self._clips[i]
    caption = ex["caption"].decode() if isinstance(ex["caption"], bytes) else str(ex["caption"])
    px = np.asarray(ex["video"], np.float32)[None] / 127.5 - 1.0
    return {"latents": self._codec.encode(px)[0], "text": self._table[caption], "caption": caption, "velocity": ex["velocity"], "index": ex["index"]}


def world(config) -> dict:
  """`{"scale", "texture", "speeds"}`: the world's look and the camera's speeds (`{"slowly": px,
  "quickly": px}` per frame) of a config's PanWorld data (`train.data.world_*`), as `render_clip`
  takes them; speeds that are not two positive whole pixels are one UsageError."""
  from asvd.errors import UsageError  # noqa: PLC0415

  d = config.train.data
  sp = d.get("world_speeds", tuple(SPEEDS.values()))
  try:
    ok = len(sp) == len(SPEEDS) and all(float(v) == int(v) > 0 for v in sp)
  except (TypeError, ValueError):
    ok = False
  if not ok:
    raise UsageError(f"train.data.world_speeds={sp!r} must be {len(SPEEDS)} positive whole pixels per frame (for {', '.join(map(repr, SPEEDS))}), e.g. (1, 2)")
  speeds = dict(zip(SPEEDS, (int(v) for v in sp), strict=True))
  return {"scale": float(d.get("world_scale", 1.0)), "texture": float(d.get("world_texture", 0.3)), "speeds": speeds}


def training_source(config, latent_hw, data_dir: str) -> TrainingSource:
  """The `train.data.name="panworld"` source: clips of `train.data.frames` frames at
  `latent_hw x pipeline.pixel_patch` pixels (generated once under `data_dir`), encoded by the
  space-to-depth codec, with their captions' embeddings."""
  from asvd.errors import UsageError  # noqa: PLC0415
  from asvd.models import pixel_codec  # noqa: PLC0415

  d, m = config.train.data, config.model
  codec = pixel_codec.from_config(config)
  if codec is None:
    raise UsageError("train.data.name='panworld' trains in pixel space: set pipeline.pixel_patch (e.g. 4: 4x4 pixel patches as 48-channel latents)")
  patch = codec.patch
  if codec.latent_channels != int(m.in_channels):
    raise UsageError(f"pipeline.pixel_patch={patch} gives {codec.latent_channels}-channel latents, model.in_channels={m.in_channels}")
  cfg = config_for(int(d.frames), int(latent_hw[0]) * patch, int(latent_hw[1]) * patch, int(d.clips), int(d.seed), float(d.get("object_prob", 0.5)), **world(config))
  builder = PanWorld(config=cfg, data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare()
  return TrainingSource(builder.as_data_source(split=d.get("split", "train")), codec, caption_table(config, data_dir))


__all__ = [
  "BIOMES", "COLORS", "DIRECTIONS", "OBJECTS", "SPEEDS", "ClipSpec", "PanWorld", "PanWorldConfig", "all_captions",
  "TrainingSource", "build_tokenizer", "caption_table", "config_for", "embed_prompts", "world", "text_path", "training_source", "vocabulary", "measure_shift", "parse_caption", "render_clip", "render_world", "sample_spec", "spec_of_caption",
]  # fmt: skip
