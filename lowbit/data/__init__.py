"""Bundled data: text corpora (evaluation: Wikipedia; calibration: news) and a photo set.

Evaluation and calibration text are kept apart: evaluate on ``wikipedia_text()``, calibrate on
``calibration_batches(..., corpus="news")``.
"""

from lowbit.data.calibration import calibration_set
from lowbit.data.images import (
    View,
    calibration_photo_paths,
    calibration_views,
    imagenet_views,
    load_image,
    photo_paths,
    view_grid,
)
from lowbit.data.text import (
    CORPORA,
    calibration_batches,
    corpus_text,
    news_text,
    token_windows,
    wikipedia_text,
)

__all__ = [
    "calibration_set",
    "calibration_views",
    "calibration_photo_paths",
    "CORPORA",
    "View",
    "calibration_batches",
    "corpus_text",
    "imagenet_views",
    "load_image",
    "news_text",
    "photo_paths",
    "token_windows",
    "view_grid",
    "wikipedia_text",
]
