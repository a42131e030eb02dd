"""Multiple-choice task loaders: standard released files of the sprint plan's tasks, a generic jsonl format
``{"context", "choices", "label"}``, and the embedded BIG-bench items in ../shared/data/zeroshot.

Every loader returns a list of :class:`MCItem`; the choice texts are continuations scored after the context
(a leading space is added where the released format expects one).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass
class MCItem:
    context: str
    choices: list[str]
    label: int
    id: str = ""
    # WinoGrande-style partial scoring: ``choices`` are alternative contexts and this shared text is scored
    continuation: str | None = None


def _read_jsonl(path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
    return rows


def _item(context, choices, label, id_, where) -> MCItem:
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise ValueError(f"{where}: 'choices' must be a list of >= 2 strings, got {choices!r}")
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
        raise ValueError(f"{where}: 'label' must be an int in [0, {len(choices)}), got {label!r}")
    if not isinstance(context, str):
        raise ValueError(f"{where}: 'context' must be a string, got {type(context).__name__}")
    return MCItem(context, choices, label, str(id_))


def load_generic_jsonl(path) -> list[MCItem]:
    """Generic format: one ``{"context": str, "choices": [str, ...], "label": int}`` per line."""
    items = []
    for n, r in enumerate(_read_jsonl(path)):
        for key in ("context", "choices", "label"):
            if key not in r:
                raise ValueError(f"{path}: line {n + 1} lacks key {key!r} (expected context, choices, label)")
        items.append(_item(r["context"], r["choices"], r["label"], r.get("id", n), f"{path}: line {n + 1}"))
    return items


def _labels_file(path, labels_path):
    """PIQA / SIQA ship labels in a sibling ``*-labels.lst`` file."""
    if labels_path is None:
        p = Path(path)
        labels_path = p.with_name(p.stem + "-labels.lst")
    if not Path(labels_path).exists():
        raise ValueError(f"labels file {labels_path} not found (PIQA/SIQA release labels as <split>-labels.lst)")
    return [int(x) for x in Path(labels_path).read_text().split()]


def load_piqa(path, labels_path=None) -> list[MCItem]:
    """PIQA release: ``{"goal", "sol1", "sol2"}`` jsonl + labels .lst (0/1). Prompt as the harness."""
    rows, labels = _read_jsonl(path), _labels_file(path, labels_path)
    if len(rows) != len(labels):
        raise ValueError(f"{path}: {len(rows)} items but {len(labels)} labels")
    return [_item(f"Question: {r['goal']}\nAnswer:", [" " + r["sol1"], " " + r["sol2"]], y, i, f"{path}:{i + 1}")
            for i, (r, y) in enumerate(zip(rows, labels))]


def load_siqa(path, labels_path=None) -> list[MCItem]:
    """Social IQa release: ``{"context", "question", "answerA/B/C"}`` jsonl + labels .lst (1-based)."""
    rows, labels = _read_jsonl(path), _labels_file(path, labels_path)
    if len(rows) != len(labels):
        raise ValueError(f"{path}: {len(rows)} items but {len(labels)} labels")
    return [_item(f"Q: {r['context']} {r['question']}\nA:", [" " + r[k] for k in ("answerA", "answerB", "answerC")],
                  y - 1, i, f"{path}:{i + 1}") for i, (r, y) in enumerate(zip(rows, labels))]


def _hellaswag_clean(text: str) -> str:
    import re
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def load_hellaswag(path) -> list[MCItem]:
    """HellaSwag release: ``{"activity_label", "ctx_a", "ctx_b", "endings", "label"}`` jsonl."""
    items = []
    for i, r in enumerate(_read_jsonl(path)):
        ctx = r["ctx_a"] + " " + r["ctx_b"].capitalize()
        context = _hellaswag_clean(r["activity_label"] + ": " + ctx)
        items.append(_item(context, [" " + _hellaswag_clean(e) for e in r["endings"]], int(r["label"]), r.get("ind", i),
                           f"{path}:{i + 1}"))
    return items


def load_winogrande(path) -> list[MCItem]:
    """WinoGrande release: ``{"sentence" with one "_", "option1", "option2", "answer": "1"|"2"}``.
    Partial scoring as the harness: the context is the sentence up to "_" with each option substituted,
    the continuation (the rest) is the same for both; here the options vary the context, so the item is
    stored with the substituted contexts as ``choices`` and the rest of the sentence as ``continuation``."""
    items = []
    for i, r in enumerate(_read_jsonl(path)):
        sent = r["sentence"]
        if sent.count("_") != 1:
            raise ValueError(f"{path}:{i + 1}: 'sentence' must hold exactly one '_'")
        pre, post = sent.split("_")
        contexts = [pre + r["option1"], pre + r["option2"]]
        item = _item(contexts[0], [contexts[0], contexts[1]], int(r["answer"]) - 1, r.get("qID", i), f"{path}:{i + 1}")
        item.continuation = " " + post.strip()  # scored after each substituted context
        items.append(item)
    return items


def load_arc(path) -> list[MCItem]:
    """ARC release (ARC-Easy / ARC-Challenge jsonl): ``{"question": {"stem", "choices": [{"text", "label"}]},
    "answerKey"}``."""
    items = []
    for i, r in enumerate(_read_jsonl(path)):
        q = r["question"]
        keys = [c["label"] for c in q["choices"]]
        if r["answerKey"] not in keys:
            raise ValueError(f"{path}:{i + 1}: answerKey {r['answerKey']!r} not among {keys}")
        items.append(_item(f"Question: {q['stem']}\nAnswer:", [" " + c["text"] for c in q["choices"]],
                           keys.index(r["answerKey"]), r.get("id", i), f"{path}:{i + 1}"))
    return items


load_obqa = load_arc  # OpenBookQA's released jsonl has the ARC layout (question.stem, choices, answerKey)


def load_boolq(path) -> list[MCItem]:
    """BoolQ release: ``{"question", "passage", "answer": bool}``; choices " no" / " yes" as the harness."""
    items = []
    for i, r in enumerate(_read_jsonl(path)):
        if not isinstance(r.get("answer"), bool):
            raise ValueError(f"{path}:{i + 1}: 'answer' must be a bool")
        items.append(_item(f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:", [" no", " yes"],
                           int(r["answer"]), i, f"{path}:{i + 1}"))
    return items


STANDARD_LOADERS = {"piqa": load_piqa, "hellaswag": load_hellaswag, "winogrande": load_winogrande,
                    "arc_easy": load_arc, "arc_challenge": load_arc, "boolq": load_boolq, "siqa": load_siqa,
                    "obqa": load_obqa, "jsonl": load_generic_jsonl}


def embedded_dir() -> Path:
    """``HOPE_ZEROSHOT_DIR``, else the verified embedded items: ../shared/data/zeroshot beside a checkout, or
    rebuilt from PyPI into the user cache (``hope.data.zeroshot.zeroshot_dir``)."""
    env = os.environ.get("HOPE_ZEROSHOT_DIR")
    if env:
        return Path(env)
    from hope.data.zeroshot import zeroshot_dir

    return zeroshot_dir()


def embedded_task_names(directory=None) -> list[str]:
    d = Path(directory) if directory else embedded_dir()
    return sorted(p.stem for p in d.glob("*.jsonl"))


# BIG-bench defaults for keys a task's prompts.json entry leaves out
_BB_DEFAULTS = {"task_prefix": "", "example_input_prefix": "\nQ: ", "example_output_prefix": "\nA: ",
                "choice_prefix": "\n  choice: ", "append_choices_to_input": True}


def load_embedded(name: str, directory=None) -> list[MCItem]:
    """Embedded BIG-bench items with their prompts.json prefixes applied (BIG-bench's own formatting)."""
    d = Path(directory) if directory else embedded_dir()
    known = embedded_task_names(d)
    if name not in known:
        raise ValueError(f"unknown task {name!r}; known embedded tasks: {', '.join(known)}; "
                         f"standard formats (need --task-path): {', '.join(sorted(STANDARD_LOADERS))}")
    prompts = json.loads((d / "prompts.json").read_text()) if (d / "prompts.json").exists() else {}
    p = {**_BB_DEFAULTS, **prompts.get(name, {})}
    items = []
    for it in load_generic_jsonl(d / f"{name}.jsonl"):
        text = p["task_prefix"] + p["example_input_prefix"] + it.context
        if p["append_choices_to_input"]:
            text += "".join(p["choice_prefix"] + c for c in it.choices)
        text += p["example_output_prefix"]
        items.append(MCItem(text.rstrip(" "), [" " + c if text.endswith(" ") else c for c in it.choices],
                            it.label, it.id))
    return items


def load_task(name: str, path=None) -> list[MCItem]:
    """A standard-format task from ``path``, or an embedded BIG-bench task by name."""
    if path is not None:
        key = name.lower()
        if key not in STANDARD_LOADERS:
            raise ValueError(f"unknown task format {name!r} for --task-path; known: {', '.join(sorted(STANDARD_LOADERS))}")
        if not Path(path).exists():
            raise ValueError(f"task path {path} does not exist")
        return STANDARD_LOADERS[key](path)
    return load_embedded(name)


__all__ = ["MCItem", "load_task", "load_embedded", "load_generic_jsonl", "embedded_task_names", "STANDARD_LOADERS",
           "load_piqa", "load_hellaswag", "load_winogrande", "load_arc", "load_obqa", "load_boolq", "load_siqa"]
