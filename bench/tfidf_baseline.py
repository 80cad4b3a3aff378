"""The classical baseline of a JSONL classification set: TF-IDF features and logistic
regression (scikit-learn), on the split fourfold uses (the last 10% of the records is
validation), with word 1-2-grams and with character 1-4-grams; the regularization C is chosen by
5-fold cross-validation on the training records.

  python -m bench.tfidf_baseline --data=runs/stdlib_order.jsonl

Prints each feature set's validation accuracy; the last line is
`tfidf_baseline words=<accuracy> chars=<accuracy> majority=<accuracy> n=<validation rows>`.
"""

from __future__ import annotations

import json

import numpy as np
from absl import app, flags
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegressionCV

FLAGS = flags.FLAGS
flags.DEFINE_string("data", None, "JSONL file of {text_field, label_field} records")
flags.DEFINE_string("text_field", "text", "the text key")
flags.DEFINE_string("label_field", "label", "the label key")

HELD_OUT_FRACTION = 10  # as train/data/sources.py: the last 1/10 of the records validates
FEATURES = {
  "words": dict(analyzer="word", ngram_range=(1, 2), token_pattern=r"\S+", sublinear_tf=True),
  "chars": dict(analyzer="char", ngram_range=(1, 4), sublinear_tf=True),
}


def split(path: str, text_field: str, label_field: str):
  """(train texts, train labels, validation texts, validation labels) as fourfold splits."""
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  cut = len(rows) - len(rows) // HELD_OUT_FRACTION
  texts = [r[text_field] for r in rows]
  labels = np.array([r[label_field] for r in rows])
  return texts[:cut], labels[:cut], texts[cut:], labels[cut:]


def accuracy(features: dict, x_train, y_train, x_val, y_val) -> float:
  vectorizer = TfidfVectorizer(**features)
  model = LogisticRegressionCV(Cs=[0.1, 1.0, 10.0, 100.0], cv=5, max_iter=2000)  # C by 5-fold CV
  model.fit(vectorizer.fit_transform(x_train), y_train)
  return float((model.predict(vectorizer.transform(x_val)) == y_val).mean())


def main(argv) -> None:
  del argv
  x_train, y_train, x_val, y_val = split(FLAGS.data, FLAGS.text_field, FLAGS.label_field)
  scores = {name: accuracy(f, x_train, y_train, x_val, y_val) for name, f in FEATURES.items()}
  majority = float((y_val == np.bincount(y_train).argmax()).mean())
  for name, score in scores.items():
    print(f"tf-idf {name} + logistic regression: validation accuracy {score:.4f}")
  words, chars = scores["words"], scores["chars"]
  print(
    f"tfidf_baseline words={words:.4f} chars={chars:.4f} majority={majority:.4f} n={len(y_val)}"
  )


if __name__ == "__main__":
  flags.mark_flag_as_required("data")
  app.run(main)
