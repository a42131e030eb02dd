"""Multiple-choice task loaders: standard released files (PIQA, HellaSwag, WinoGrande, ARC, OpenBookQA, BoolQ,
Social IQa) with lm-evaluation-harness's prompts, a generic jsonl format ``{"context", "choices", "label"}``,
and task folders of BIG-bench items (``*.jsonl`` + ``prompts.json``; the embedded ones in
../shared/data/zeroshot, or ``$HOPE_ZEROSHOT_DIR``).

Every loader returns a list of :class:`MCItem` as the harness builds its requests: a context, the choices
without the target delimiter, and the delimiter (one space unless the prompt already ends the context).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass
class MCItem:
    context: str
    choices: list[str]   # without the target delimiter (acc_norm divides by their length)
    label: int
    id: str = ""
    # WinoGrande-style partial scoring: ``choices`` are alternative contexts and this shared text is scored
    continuation: str | None = None
    target_delimiter: str = " "

    def requests(self) -> list[tuple[str, str]]:
        """``(context, continuation)`` per choice, as the harness sends them to a model."""
        if self.continuation is not None:
            return [(c, self.target_delimiter + self.continuation) for c in self.choices]
        return [(self.context, self.target_delimiter + c) for c in self.choices]


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
    return [_item(f"Question: {r['goal']}\nAnswer:", [r["sol1"], r["sol2"]], y, i, f"{path}:{i + 1}")
            for i, (r, y) in enumerate(zip(rows, labels))]


def load_siqa(path, labels_path=None) -> list[MCItem]:
    """Social IQa release: ``{"context", "question", "answerA/B/C"}`` jsonl + labels .lst (1-based)."""
    rows, labels = _read_jsonl(path), _labels_file(path, labels_path)
    if len(rows) != len(labels):
        raise ValueError(f"{path}: {len(rows)} items but {len(labels)} labels")
    return [_item(f"Q: {r['context']} {r['question']}\nA:", [r[k] for k in ("answerA", "answerB", "answerC")],
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
        items.append(_item(context, [_hellaswag_clean(e) for e in r["endings"]], int(r["label"]), r.get("ind", i),
                           f"{path}:{i + 1}"))
    return items


def load_winogrande(path) -> list[MCItem]:
    """WinoGrande release: ``{"sentence" with one "_", "option1", "option2", "answer": "1"|"2"}``.
    Partial scoring as the harness: the choices are the sentence up to "_" with each option substituted
    (acc_norm divides by their length, as the harness does), the continuation (the rest of the sentence)
    is the same for both and is what gets scored."""
    items = []
    for i, r in enumerate(_read_jsonl(path)):
        sent = r["sentence"]
        if sent.count("_") != 1:
            raise ValueError(f"{path}:{i + 1}: 'sentence' must hold exactly one '_'")
        pre, post = sent.split("_")
        contexts = [pre + r["option1"], pre + r["option2"]]
        item = _item(contexts[0], contexts, int(r["answer"]) - 1, r.get("qID", i), f"{path}:{i + 1}")
        item.continuation = post.strip()  # scored after each substituted context
        items.append(item)
    return items


def _arc_layout(path, prompt) -> list[MCItem]:
    items = []
    for i, r in enumerate(_read_jsonl(path)):
        q = r["question"]
        keys = [c["label"] for c in q["choices"]]
        if r["answerKey"] not in keys:
            raise ValueError(f"{path}:{i + 1}: answerKey {r['answerKey']!r} not among {keys}")
        items.append(_item(prompt(q["stem"]), [c["text"] for c in q["choices"]], keys.index(r["answerKey"]),
                           r.get("id", i), f"{path}:{i + 1}"))
    return items


def load_arc(path) -> list[MCItem]:
    """ARC release (ARC-Easy / ARC-Challenge jsonl): ``{"question": {"stem", "choices": [{"text", "label"}]},
    "answerKey"}``."""
    return _arc_layout(path, lambda stem: f"Question: {stem}\nAnswer:")


def load_obqa(path) -> list[MCItem]:
    """OpenBookQA release jsonl (ARC layout); the harness's prompt is the question stem alone."""
    return _arc_layout(path, lambda stem: stem)


def load_boolq(path) -> list[MCItem]:
    """BoolQ release: ``{"question", "passage", "answer": bool}``; choices "no" / "yes" as the harness."""
    items = []
    for i, r in enumerate(_read_jsonl(path)):
        if not isinstance(r.get("answer"), bool):
            raise ValueError(f"{path}:{i + 1}: 'answer' must be a bool")
        items.append(_item(f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:", ["no", "yes"],
                           int(r["answer"]), i, f"{path}:{i + 1}"))
    return items


STANDARD_LOADERS = {"piqa": load_piqa, "hellaswag": load_hellaswag, "winogrande": load_winogrande,
                    "arc_easy": load_arc, "arc_challenge": load_arc, "boolq": load_boolq, "siqa": load_siqa,
                    "obqa": load_obqa, "jsonl": load_generic_jsonl}

# the prompt each standard format builds (lm-evaluation-harness's task templates); the target delimiter is " "
STANDARD_PROMPTS = {
    "piqa": "Question: {goal}\nAnswer:", "siqa": "Q: {context} {question}\nA:",
    "hellaswag": "{activity_label}: {ctx_a} {ctx_b capitalized} (harness preprocessing)",
    "winogrande": "{sentence up to _ with each option} -> scored: {rest of the sentence}",
    "arc_easy": "Question: {question}\nAnswer:", "arc_challenge": "Question: {question}\nAnswer:",
    "obqa": "{question_stem}", "boolq": "{passage}\nQuestion: {question}?\nAnswer:", "jsonl": "{context}",
}


def embedded_dir() -> Path:
    """``HOPE_ZEROSHOT_DIR``, else the verified embedded items: ../shared/data/zeroshot beside a checkout, or
    rebuilt from PyPI into the user cache (``hope.data.zeroshot.zeroshot_dir``)."""
    env = os.environ.get("HOPE_ZEROSHOT_DIR")
    if env:
        return Path(env)
    from hope.data.zeroshot import zeroshot_dir

    return zeroshot_dir()


def embedded_task_names(directory=None) -> list[str]:
    """Task names (file stems) of a task folder: ``directory``, else :func:`embedded_dir`."""
    d = Path(directory) if directory else embedded_dir()
    return sorted(p.stem for p in d.glob("*.jsonl"))


# BIG-bench defaults for keys a task's prompts.json entry leaves out
_BB_DEFAULTS = {"task_prefix": "", "example_input_prefix": "\nQ: ", "example_output_prefix": "\nA: ",
                "choice_prefix": "\n  choice: ", "append_choices_to_input": True}


def _folder_prompt(name: str, d: Path) -> dict:
    prompts = json.loads((d / "prompts.json").read_text()) if (d / "prompts.json").exists() else {}
    return {**_BB_DEFAULTS, **prompts.get(name, {})}


def load_embedded(name: str, directory=None) -> list[MCItem]:
    """A task folder's items with their prompts.json prefixes applied (BIG-bench's own formatting: the
    output prefix ends the context, so the choices follow it with no extra delimiter)."""
    d = Path(directory) if directory else embedded_dir()
    known = embedded_task_names(d)
    if name not in known:
        raise ValueError(f"unknown task {name!r}; tasks in {d}: {', '.join(known) or 'none'}; "
                         f"standard formats (as FORMAT=PATH): {', '.join(sorted(STANDARD_LOADERS))}")
    p = _folder_prompt(name, d)
    items = []
    for it in load_generic_jsonl(d / f"{name}.jsonl"):
        text = p["task_prefix"] + p["example_input_prefix"] + it.context
        if p["append_choices_to_input"]:
            text += "".join(p["choice_prefix"] + c for c in it.choices)
        text += p["example_output_prefix"]
        items.append(MCItem(text, list(it.choices), it.label, it.id, target_delimiter=""))
    return items


@dataclass(frozen=True)
class TaskSpec:
    """One entry of ``--tasks``: ``name`` keys the results (a folder task's name, a standard format's name,
    or a generic jsonl file's stem); ``format`` and ``path`` are set for standard released files."""
    name: str
    format: str | None = None
    path: Path | None = None


def parse_tasks(spec: str, directory=None) -> list[TaskSpec]:
    """``--tasks`` -> specs: ``all`` (every task of the folder), or a comma list of folder task names and
    ``FORMAT=PATH`` entries. Two entries with the same result name are an error."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"--tasks must be 'all' or a comma list of names and FORMAT=PATH, got {spec!r}")
    if spec.strip() == "all":
        names = embedded_task_names(directory)
        if not names:
            d = Path(directory) if directory else embedded_dir()
            raise ValueError(f"--tasks all: no *.jsonl task files in {d} (set --task-dir or $HOPE_ZEROSHOT_DIR)")
        return [TaskSpec(n) for n in names]
    specs = []
    for entry in (x.strip() for x in spec.split(",")):
        if not entry:
            continue
        fmt, eq, path = entry.partition("=")
        if not eq:
            specs.append(TaskSpec(entry))
            continue
        fmt = fmt.strip().lower()
        if fmt not in STANDARD_LOADERS:
            raise ValueError(f"--tasks: unknown task format {fmt!r} in {entry!r}; known: "
                             f"{', '.join(sorted(STANDARD_LOADERS))}")
        path = Path(path.strip())
        specs.append(TaskSpec(path.stem if fmt == "jsonl" else fmt, fmt, path))
    seen = set()
    for s in specs:
        if s.name in seen or s.name == "average":
            raise ValueError(f"--tasks: the result name {s.name!r} is taken twice (or is reserved: 'average'); "
                             f"a jsonl task is named by its file stem, a standard format by the format")
        seen.add(s.name)
    return specs


def load_spec(spec: TaskSpec, directory=None) -> list[MCItem]:
    if spec.format is None:
        return load_embedded(spec.name, directory)
    if not spec.path.exists():
        raise ValueError(f"--tasks: task path {spec.path} does not exist")
    return STANDARD_LOADERS[spec.format](spec.path)


def prompt_format(spec: TaskSpec, directory=None) -> dict:
    """How a task's items were turned into text (recorded next to its scores)."""
    if spec.format is not None:
        return {"source": f"{spec.format} released file, lm-evaluation-harness prompt", "file": str(spec.path),
                "template": STANDARD_PROMPTS[spec.format], "target_delimiter": " "}
    d = Path(directory) if directory else embedded_dir()
    p = _folder_prompt(spec.name, d)
    template = p["task_prefix"] + p["example_input_prefix"] + "{context}"
    if p["append_choices_to_input"]:
        template += p["choice_prefix"] + "{choice} ..."
    return {"source": "task folder, BIG-bench prompts.json", "folder": str(d),
            "template": template + p["example_output_prefix"], "target_delimiter": ""}


def load_task(name: str, path=None, directory=None) -> list[MCItem]:
    """A standard-format task (``name`` is the format) from ``path``, or a task folder's task by name."""
    if path is not None:
        key = name.lower()
        if key not in STANDARD_LOADERS:
            raise ValueError(f"unknown task format {name!r}; known: {', '.join(sorted(STANDARD_LOADERS))}")
        return load_spec(TaskSpec(key, key, Path(path)))
    return load_embedded(name, directory)


__all__ = ["MCItem", "TaskSpec", "parse_tasks", "load_spec", "prompt_format", "load_task", "load_embedded",
           "load_generic_jsonl", "embedded_task_names", "embedded_dir", "STANDARD_LOADERS", "STANDARD_PROMPTS",
           "load_piqa", "load_hellaswag", "load_winogrande", "load_arc", "load_obqa", "load_boolq", "load_siqa"]
