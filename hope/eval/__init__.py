"""Evaluation suites: zero-shot multiple choice (E1), needle in a haystack (E2), continual learning (E3),
each with base and test-time-memorised (F4) variants. CLI: ``python -m hope.eval <suite> ...``; the
lm-evaluation-harness adapter is ``hope.eval.lm_eval_adapter.HarnessLM`` (``python -m hope.eval harness``)."""
from hope.eval.continual import continual_metrics, train_sequentially
from hope.eval.scoring import (choice_metrics, encode_pair, prefix_ids, score_choices_memorized,
                               score_continuations)
from hope.eval.tasks import MCItem, embedded_task_names, load_task, parse_tasks
from hope.eval.zeroshot import evaluate_items

__all__ = ["choice_metrics", "encode_pair", "prefix_ids", "score_continuations", "score_choices_memorized", "MCItem",
           "load_task", "parse_tasks", "embedded_task_names", "evaluate_items", "continual_metrics",
           "train_sequentially"]
