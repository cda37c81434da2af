"""VQA accuracy as the official VQA evaluation API computes it (vqaEval.py of the VQA v2 toolkit,
which EvalAI's test-dev / test-std server and LAVIS use).

Per question with human answers a_1..a_n (n = 10 in VQA v2): the predicted answer (newlines and
tabs to spaces, stripped, then punctuation, digits, articles and contractions normalised) scores
the mean over the n leave-one-out subsets of min(#matching answers in the subset / 3, 1). The human
answers are normalised too, but, as in the official code, only their punctuation and only when the
annotators disagree (the official quirk: `len(set(gtAnswers)) > 1`). Results are percentages, as
the official code prints them (78.25), overall and per answer type.

A question with a single reference answer (VG-QA, or a file of consensus answers) has no
leave-one-out subset that could match (the official formula gives it 0), so it is scored by exact
match after the same normalisation of both sides and reported apart (`exact_match`).
"""
from __future__ import annotations

import re
from collections import Counter, defaultdict

# vqaEval.py's tables, restated as data
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # (sic: the official lookbehind is written as a lookahead)
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")


def normalize_punctuation(text: str) -> str:
  """vqaEval.processPunctuation: a mark next to a space (or any text with a digit,digit comma) is
  deleted, otherwise replaced by a space; periods not followed by a digit are deleted (the
  official passes re.UNICODE as `count`, 32 replacements at most)."""
  out = text
  for p in PUNCTUATION:
    if (p + " " in text or " " + p in text) or _COMMA_BETWEEN_DIGITS.search(text) is not None:
      out = out.replace(p, "")
    else:
      out = out.replace(p, " ")
  return _PERIOD.sub("", out, count=int(re.UNICODE))


def normalize_digits_articles(text: str) -> str:
  """vqaEval.processDigitArticle: lowercase, number words to digits, articles dropped,
  contractions restored."""
  words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
  words = [w for w in words if w not in ARTICLES]
  return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(text: str) -> str:
  """The normalisation of a predicted answer."""
  text = text.replace("\n", " ").replace("\t", " ").strip()
  return normalize_digits_articles(normalize_punctuation(text))


def question_accuracy(prediction: str, answers: list) -> float:
  """One question's VQA accuracy in [0, 1] against its human answers (n >= 2)."""
  pred = normalize_answer(prediction)
  gts = [a.replace("\n", " ").replace("\t", " ").strip() for a in answers]
  if len(set(gts)) > 1:
    gts = [normalize_punctuation(a) for a in gts]
  accs = []
  for i in range(len(gts)):
    matches = sum(1 for j, a in enumerate(gts) if j != i and a == pred)
    accs.append(min(1.0, matches / 3.0))
  return sum(accs) / len(accs)


def exact_match(prediction: str, answer: str) -> float:
  return float(normalize_answer(prediction) == normalize_answer(answer))


def answer_type_of(answers: list) -> str:
  """VQA's answer types from the most common answer (for files without `answer_type`): 'yes/no',
  'number' or 'other'."""
  top = normalize_answer(Counter(answers).most_common(1)[0][0])
  if top in ("yes", "no"):
    return "yes/no"
  return "number" if top.replace(".", "", 1).isdigit() else "other"


def vqa_accuracy(predictions: dict, references: dict, answer_types: dict | None = None) -> dict:
  """predictions {question_id: answer}; references {question_id: [human answers]}; answer_types
  {question_id: type} (default: answer_type_of). Questions without a prediction count as wrong.

  Returns {"overall": %, "perAnswerType": {type: %}, "questions": n, "per_question": {qid: %}} for
  the questions with several human answers, and "exact_match" (%), "exact_match_questions" for
  those with one.
  """
  answer_types = answer_types or {}
  per, by_type, exact = {}, defaultdict(list), {}
  for qid, answers in references.items():
    pred = predictions.get(qid, "")
    if len(answers) >= 2:
      acc = 100.0 * question_accuracy(pred, answers)
      per[qid] = acc
      by_type[answer_types.get(qid) or answer_type_of(answers)].append(acc)
    elif len(answers) == 1:
      exact[qid] = 100.0 * exact_match(pred, answers[0])
  out = {"questions": len(per)}
  if per:
    out["overall"] = sum(per.values()) / len(per)
    out["perAnswerType"] = {t: sum(v) / len(v) for t, v in sorted(by_type.items())}
  if exact:
    out["exact_match"] = sum(exact.values()) / len(exact)
    out["exact_match_questions"] = len(exact)
  out["per_question"] = {**per, **exact}
  return out
