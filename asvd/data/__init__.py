"""Datasets: TFDS builders (array_record, no TensorFlow at run time) and grain pipelines."""
