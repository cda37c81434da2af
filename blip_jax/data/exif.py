"""EXIF orientation from JPEG header bytes (no full decode): TF's decoders ignore EXIF."""
from __future__ import annotations

import struct


def jpeg_orientation(data: bytes) -> int:
  """The EXIF orientation tag (1..8) of a JPEG; 1 when absent, unreadable or not a JPEG."""
  if len(data) < 4 or data[:2] != b"\xff\xd8":
    return 1
  i, n = 2, len(data)
  while i + 4 <= n:
    if data[i] != 0xFF:
      return 1
    marker = data[i + 1]
    if marker in (0xD9, 0xDA):  # end of image / start of scan: no EXIF before pixels
      return 1
    if 0xD0 <= marker <= 0xD7 or marker == 0x01:
      i += 2
      continue
    seg_len = struct.unpack(">H", data[i + 2:i + 4])[0]
    if marker == 0xE1 and data[i + 4:i + 10] == b"Exif\x00\x00":
      return _tiff_orientation(data[i + 10:i + 2 + seg_len])
    i += 2 + seg_len
  return 1


def _tiff_orientation(t: bytes) -> int:
  try:
    endian = {b"II": "<", b"MM": ">"}[t[:2]]
    ifd = struct.unpack(endian + "I", t[4:8])[0]
    count = struct.unpack(endian + "H", t[ifd:ifd + 2])[0]
    for k in range(count):
      e = ifd + 2 + 12 * k
      tag, typ = struct.unpack(endian + "HH", t[e:e + 4])
      if tag == 0x0112:
        short = typ == 3
        v = struct.unpack(endian + ("H" if short else "I"), t[e + 8:e + (10 if short else 12)])[0]
        return int(v) if 1 <= v <= 8 else 1
  except (KeyError, struct.error, IndexError):
    pass
  return 1
