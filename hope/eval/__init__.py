"""Evaluation suites: zero-shot multiple choice (E1), needle in a haystack (E2), continual learning (E3),
each with base and test-time-memorised (F4) variants. CLI: ``python -m hope.eval <suite> ...``."""
from hope.eval.continual import continual_metrics, train_sequentially
from hope.eval.scoring import choice_metrics, score_choices_memorized, score_continuations
from hope.eval.tasks import MCItem, embedded_task_names, load_task
from hope.eval.zeroshot import evaluate_items

__all__ = ["choice_metrics", "score_continuations", "score_choices_memorized", "MCItem", "load_task",
           "embedded_task_names", "evaluate_items", "continual_metrics", "train_sequentially"]
