"""Video files for retrieval (MSRVTT): frames sampled as the official code does (official
data/video_dataset.py), decoded by PyAV (FFmpeg), an optional dependency (pip install -e .[video])."""
from __future__ import annotations

import numpy as np
from PIL import Image


def read_video(path: str, frames: int, size: int) -> np.ndarray:
  """`frames` frames of a video sampled as the official (indices np.arange(0, n, n / frames)),
  each resized (bicubic) to size x size: uint8 [frames, size, size, 3]. PyAV (FFmpeg) decodes."""
  import av  # noqa: PLC0415  (optional: only video retrieval needs it)
  with av.open(path) as container:
    stream = container.streams.video[0]
    n = stream.frames
    if n <= 0:  # some containers do not record the count: count by decoding
      n = sum(1 for _ in container.decode(stream))
      container.seek(0)
    if n <= 0:
      raise ValueError("no frames")
    want = np.arange(0, n, n / frames).astype(int)[:frames]
    wanted, picked = set(want.tolist()), {}
    for i, frame in enumerate(container.decode(stream)):
      if i in wanted:
        picked[i] = frame.to_image().convert("RGB").resize((size, size), Image.BICUBIC)
      if i >= want[-1]:
        break
  missing = [int(i) for i in want if i not in picked]
  if missing:
    raise ValueError(f"frames {missing} of {n} could not be decoded")
  return np.stack([np.asarray(picked[int(i)]) for i in want])
