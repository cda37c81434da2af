"""The evaluation sets of the downstream tasks, read from their annotation files (the official
data/coco_karpathy_dataset.py, nocaps_dataset.py, vqa_dataset.py, nlvr_dataset.py,
video_dataset.py formats): caption sets, VQA questions and answer lists, NLVR2 pairs, retrieval
galleries. Each reader checks the entries' shape (blip_jax.data.annotations) and resolves image
paths with the one rule there; a file of the wrong shape fails naming the entry."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

import numpy as np

from blip_jax import fs
from blip_jax.data.annotations import caption_groups, check_entries, image_path, read_entries
from blip_jax.metrics.caption import image_id_of, read_coco_references
from blip_jax.tokenizers import pre_caption, pre_question


def _unique_entries(annotations, task: str, id_key: str, **check):
  """(place, id, entry) of every entry, each checked for what the task reads; the id is the entry's
  `id_key`, else its place in the files; an id that appears twice fails."""
  entries = read_entries(annotations)
  check_entries(entries, task, str(annotations), **check)
  seen = set()
  for n, e in enumerate(entries):
    i = e.get(id_key, n)
    if i in seen:
      raise ValueError(f"{annotations}: {id_key} {i!r} appears twice")
    seen.add(i)
    yield n, i, e


# ---- captioning (COCO Karpathy, NoCaps) -------------------------------------------------------
@dataclasses.dataclass
class CaptionSet:
  """The images of an evaluation split, their ids and (when known) their reference captions."""
  paths: list
  image_ids: list
  references: Optional[dict]  # {image_id: [captions]}, None when the split has none (NoCaps)


def read_caption_set(annotations: str, image_root: str = "", gt: str = "") -> CaptionSet:
  """A Karpathy-style split ([{"image", "caption": [..]}], entries of one image merged), or images
  alone ([{"image", "img_id"}], NoCaps). Image ids: the entry's "image_id" / "img_id", else the
  number in the file name (the official code's rule). References: the entries' captions, or a
  COCO-format file `gt` (e.g. coco_karpathy_test_gt.json), which must cover every image."""
  groups = caption_groups(read_entries(annotations), "image", annotations, captions_required=False)
  paths, ids, refs, seen = [], [], {}, {}
  for g in groups:
    i = image_id_of(g)
    if i in seen:
      raise ValueError(f"{annotations}: image id {i!r} names two images ({seen[i]}, {g['image']})")
    seen[i] = g["image"]
    paths.append(image_path(g["image"], image_root))
    ids.append(i)
    if g["texts"]:
      refs[i] = g["texts"]
  if gt:
    refs = read_coco_references(gt)
    missing = [i for i in ids if i not in refs]
    if missing:
      raise ValueError(f"{gt}: no references for {len(missing)} of the {len(ids)} images, e.g. image ids "
                       f"{missing[:3]} (the annotations' ids: the 'image_id' field or the file name's number)")
    refs = {i: refs[i] for i in ids}
  elif refs and len(refs) != len(ids):
    raise ValueError(f"{annotations}: {len(ids) - len(refs)} images have no 'caption'; give references for all "
                     "or none (then pass --gt)")
  return CaptionSet(paths, ids, refs or None)


# ---- VQA -------------------------------------------------------------------------------------
@dataclasses.dataclass
class Question:
  question_id: object
  question: str  # after pre_question
  path: str
  answers: Optional[list]  # human answers (None: unknown, e.g. test-dev)
  answer_type: Optional[str] = None


def _human_answers(e: dict):
  """An entry's reference answers: "answers" (strings, or VQA's {"answer": ...} dicts), else
  "answer" (a list, or one string)."""
  for key in ("answers", "answer"):
    a = e.get(key)
    if isinstance(a, list) and a:
      return [x["answer"] if isinstance(x, dict) else str(x) for x in a]
    if isinstance(a, str) and a:
      return [a]
  return None


def read_questions(annotations, image_root: str = "") -> tuple[list, list]:
  """(questions, skipped): the entries of one or more VQA annotation files; skipped are
  (question_id, reason) of empty questions."""
  out, skipped = [], []
  for n, qid, e in _unique_entries(annotations, "vqa", "question_id"):
    q = pre_question(e["question"]) if isinstance(e["question"], str) else ""
    if not q.strip():
      skipped.append((qid, f"empty question {e['question']!r}"))
      continue
    out.append(Question(qid, q, image_path(e["image"], image_root), _human_answers(e), e.get("answer_type")))
  return out, skipped


def read_answer_list(path: str) -> list:
  """answer_list.json: a non-empty JSON list of strings."""
  try:
    answers = json.loads(fs.read_text(path))
  except (OSError, ValueError) as e:
    raise ValueError(f"{path}: cannot read the answer list ({e})") from None
  if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip() for a in answers):
    raise ValueError(f"{path}: the answer list must be a non-empty JSON list of non-empty strings")
  return answers


# ---- NLVR2 -----------------------------------------------------------------------------------
NLVR_MAX_WORDS = 40  # official nlvr_dataset: pre_caption(sentence, 40)


@dataclasses.dataclass
class Pair:
  example_id: object
  sentence: str  # after pre_caption(s, 40)
  paths: tuple  # (left image, right image)
  label: Optional[int]  # 1: the sentence is true of the pair; None: unknown


def _label(value, where: str) -> Optional[int]:
  if value is None:
    return None
  if isinstance(value, bool):
    return int(value)
  if str(value) in ("True", "False"):
    return int(str(value) == "True")
  raise ValueError(f"{where}: label {value!r} is neither 'True' nor 'False'")


def read_pairs(annotations, image_root: str = "") -> tuple[list, list]:
  """(pairs, skipped): the entries of one or more NLVR2 annotation files; skipped are
  (example_id, reason) of sentences left empty by pre_caption."""
  out, skipped = [], []
  for n, eid, e in _unique_entries(annotations, "nlvr", "identifier", labels=False):
    sentence = pre_caption(e["sentence"], NLVR_MAX_WORDS) if isinstance(e["sentence"], str) else ""
    if not sentence:
      skipped.append((eid, f"empty sentence {e['sentence']!r}"))
      continue
    paths = tuple(image_path(p, image_root) for p in e["images"])
    out.append(Pair(eid, sentence, paths, _label(e.get("label"), f"entry {n}")))
  return out, skipped


# ---- retrieval ---------------------------------------------------------------------------------
@dataclasses.dataclass
class Gallery:
  """Images (or videos) and their captions: text t belongs to item txt2img[t]."""
  items: list  # file paths
  texts: list
  txt2img: np.ndarray
  img2txt: list
  video: bool = False

  def first(self, n: int) -> "Gallery":
    """The first n items with their captions (re-indexed)."""
    t = [t for i in range(n) for t in self.img2txt[i]]
    new = {old: j for j, old in enumerate(t)}
    return Gallery(self.items[:n], [self.texts[x] for x in t], self.txt2img[t],
                   [[new[x] for x in self.img2txt[i]] for i in range(n)], self.video)


def read_gallery(annotations: str, root: str = "", *, video: bool = False) -> Gallery:
  """Karpathy-style eval JSON ([{"image", "caption": [..] | str}]: entries of one image are merged),
  or with video=True the MSRVTT JSON lines ({"clip_name", "caption"}; videos at ROOT/clip_name.mp4).
  A file of the wrong shape fails here, naming the entry and what is missing."""
  key = "clip_name" if video else "image"
  groups = caption_groups(read_entries(annotations), key, annotations)
  items, texts, txt2img, img2txt = [], [], [], []
  for i, g in enumerate(groups):
    items.append(os.path.join(root, str(g[key]) + ".mp4") if video else image_path(g[key], root))
    img2txt.append(list(range(len(texts), len(texts) + len(g["texts"]))))
    texts += g["texts"]
    txt2img += [i] * len(g["texts"])
  return Gallery(items, texts, np.asarray(txt2img, np.int64), img2txt, video)
