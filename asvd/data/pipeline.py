"""The training input pipeline: a TFDS data source read by grain, resumable.

`make_iterator(config.train.data, batch_size, seed)` prepares the dataset once (stored under
`data_dir`), then reads it with grain: per-process shard (`jax.process_index()` of
`jax.process_count()`), seeded shuffle, endless repeat, batches with `drop_remainder`. The
iterator's `get_state()` is saved with every checkpoint and `set_state()` resumes the exact
stream.
"""

from __future__ import annotations

import os

from asvd.errors import UsageError


def _quiet_tfds():
  import tensorflow_datasets as tfds  # noqa: PLC0415

  tfds.disable_progress_bar()
  from absl import flags, logging  # noqa: PLC0415

  logging.set_verbosity(logging.ERROR)  # tfds warns about every custom builder config

  if not flags.FLAGS.is_parsed():  # grain reads absl flags (google/grain#1355)
    flags.FLAGS.mark_as_parsed()


def data_source(config, latent_hw, data_dir: str):
  """The TFDS data source named by `config.train.data.name` (generated on first use).

  `synthetic_pan`: procedural panning clips (asvd/data/synthetic.py). `panworld`: procedural
  pixel pans with captions (asvd/data/panworld.py; pixel space, `pipeline.pixel_patch`, and a
  tiny text encoder, `pipeline.text_encoder`). `video_folder`: your
  videos + captions, encoded once (asvd/data/video_folder.py). Any other name: a TFDS dataset
  already prepared as array_record in `data_dir`.
  """
  _quiet_tfds()
  data_cfg, model_cfg = config.train.data, config.model
  name = data_cfg.name
  if name == "synthetic_pan":
    from asvd.data import synthetic  # noqa: PLC0415

    cfg = synthetic.config_for(
      int(data_cfg.frames), int(latent_hw[0]), int(latent_hw[1]), int(model_cfg.in_channels),
      int(model_cfg.text_len), int(model_cfg.text_dim), int(data_cfg.clips), int(data_cfg.seed),
    )  # fmt: skip
    builder = synthetic.SyntheticPan(config=cfg, data_dir=data_dir, file_format="array_record")
  elif name == "panworld":
    from asvd.data import panworld  # noqa: PLC0415

    return panworld.training_source(config, latent_hw, data_dir)
  elif name == "video_folder":
    from asvd.data import video_folder  # noqa: PLC0415

    if not data_cfg.folder or not data_cfg.weights:
      raise UsageError("train.data.name='video_folder' needs train.data.folder (videos + captions) and train.data.weights (the Wan2.1 folder)")
    cfg = video_folder.config_for(data_cfg, model_cfg, latent_hw, config)
    builder = video_folder.VideoFolder(config=cfg, data_dir=data_dir, file_format="array_record")
  else:
    import tensorflow_datasets as tfds  # noqa: PLC0415

    try:
      builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    except Exception as e:  # noqa: BLE001  (tfds raises several types for unknown names)
      raise UsageError(f"train.data.name={name!r}: no such TFDS dataset in {data_dir} ({e})") from e
  builder.download_and_prepare()
  return builder.as_data_source(split=data_cfg.get("split", "train"))


def make_iterator(config, latent_hw, *, batch_size: int, seed: int, data_dir: str, warmup: int = 0, process_index=None, process_count=None):
  """An endless, resumable grain iterator of batches `{"latents": [B, T, h, w, C], "text": [B, L, D]}`.

  `batch_size` is this process's share of the global batch. Every process walks the same
  shuffled stream, and process `i` of `n` takes every n-th block of `batch_size` examples
  starting at block `i`, so the global batch (the processes' blocks in process order) is the
  same for any number of processes: a run reproduces across topologies. With `warmup` > 0 the
  first `warmup` batches are PanWorld's field pans (`asvd.data.pan_fields`, the teacher's
  motion warm-up), then the data; one iterator state covers both.
  """
  import grain  # noqa: PLC0415
  import jax  # noqa: PLC0415

  src = data_source(config, latent_hw, os.path.abspath(os.path.expanduser(data_dir)))
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  ds = grain.MapDataset.source(src)
  if len(ds) < batch_size * pc:
    raise UsageError(f"train.data: {len(ds)} examples, fewer than the global train.batch_size={batch_size * pc}")
  ds = ds.shuffle(seed=seed).repeat().map(_fields).batch(batch_size, drop_remainder=True)[pi::pc]
  if warmup > 0:
    from asvd.data import pan_fields  # noqa: PLC0415

    ws = grain.MapDataset.source(pan_fields.warmup_source(config, latent_hw, os.path.abspath(os.path.expanduser(data_dir))))
    ws = ws.shuffle(seed=seed + 1).repeat().map(_fields).batch(batch_size, drop_remainder=True)[pi::pc][: int(warmup)]
    ds = grain.MapDataset.concatenate([ws, ds])
  return iter(ds.to_iter_dataset())


def _fields(ex):
  import numpy as np  # noqa: PLC0415

  return {"latents": np.asarray(ex["latents"], np.float32), "text": np.asarray(ex["text"], np.float32)}


__all__ = ["make_iterator", "data_source"]
