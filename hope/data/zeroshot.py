"""The embedded multiple-choice items (13 BIG-bench tasks as ``{"id", "context", "choices", "label"}`` jsonl
plus ``prompts.json``), found without a source tree.

Read from the shared data folder (``$HOPE_SHARED_DATA`` or ``<checkout>/../shared/data``) when there is
one; otherwise rebuilt from PyPI into ``<cache>/data/zeroshot`` (``hope.data.cache``): the ``bigbench==1.0.0``
sdist is checked against its recorded sha256, each task's ``task.json`` is converted exactly as
``shared/data/README.md`` describes, and every produced file is checked against its recorded sha256 before
the folder is published. Any mismatch raises ``DataIntegrityError`` naming the file.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import tarfile
from pathlib import Path

from hope.data.cache import (DataIntegrityError, Downloader, PyPIFile, data_cache_dir, fetch_verified, pip_download,
                             rebuild_folder, verify_files)

BIGBENCH_PACKAGE = PyPIFile("bigbench", "1.0.0", "bigbench-1.0.0.tar.gz",
                            "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2")
BIGBENCH_TASKS_DIR = "bigbench/benchmark_tasks"

# file stem -> (task folder under benchmark_tasks, sha256 of the converted .jsonl, choices shuffled)
# (shuffled: the source puts the correct choice first in nearly every item)
ZEROSHOT_TASKS: dict[str, tuple[str, str, bool]] = {
    "social_iqa": ("social_iqa", "6503a0973584251781527664cac2214a09e02e0b550953eead57efce94577907", False),
    "strategyqa": ("strategyqa", "54fc0631625975288bb75c9fdb833d7758944abe4c69122580db2b7ed1c74f4d", False),
    "winowhy": ("winowhy", "c69a8232b1e6592c966b1aa7355b528fb21a757a106dcd223d98c8848c98c0dc", False),
    "physical_intuition": ("physical_intuition",
                           "f4509cfedb15494e595d561cc9d69a02a2b41cd5cd4e1063dc98be3fa5ee5c71", False),
    "causal_judgment": ("causal_judgment", "105b8bd9316d3c763ab68de3c235e8f6712cbabd9cacc60953545d14328ac2c9", False),
    "date_understanding": ("date_understanding",
                           "311af9b84c7c04006cf610f0248c43eb74f445ffbde84ce51d1fffd85d607d55", True),
    "navigate": ("navigate", "984677800080f742818c39bd231596c60599d7e5989d8c0c9ceb28bf62db2f0b", False),
    "sports_understanding": ("sports_understanding",
                             "741be2d660d10923a5653e28cbcaeb8aa052357645887bae991d4fc7d4d8b7bd", False),
    "logical_deduction": ("logical_deduction/three_objects",
                          "2ab93621b3936c140b2e5c8fd2b708f267c9ad24df2cb1b705d622e0247ff3ce", False),
    "presuppositions_as_nli": ("presuppositions_as_nli",
                               "7111ecb608a85f505370a3029574824321b0a03bc7e785127e4f562def330ebb", False),
    "implicatures": ("implicatures", "372c915330dd3589b409e7a6afbeb60e43931de936487aad70c2c51b6d3cd75f", False),
    "physics": ("physics", "77aba3f28e9b54c4c67f3cda86f9063666bf6652e25c4e0a79954cd3a2ef7b55", True),
    "goal_step_wikihow": ("goal_step_wikihow/step_inference",
                          "5a517bb4f52750811fd306a6be6a68dacab0ad4fbe3ee8736cb652ec5db73584", False),
}
PROMPTS_FILE = "prompts.json"
PROMPTS_SHA256 = "bf934fba546541138f0bae9673c59d70e3b1b0b06fcc85a45390d6965e073058"
# task-level prompt fields of a BIG-bench task.json, copied into prompts.json (not applied to the items)
PROMPT_FIELDS = ("task_prefix", "example_input_prefix", "example_output_prefix", "choice_prefix",
                 "append_choices_to_input")


def expected_files() -> dict[str, str]:
    """Every file of the zeroshot folder with its recorded sha256."""
    files = {f"{name}.jsonl": digest for name, (_, digest, _) in ZEROSHOT_TASKS.items()}
    files[PROMPTS_FILE] = PROMPTS_SHA256
    return files


def verify_zeroshot_dir(folder: str | os.PathLike) -> None:
    """Check every task file and prompts.json under ``folder`` against its recorded sha256."""
    verify_files(Path(folder), expected_files())


def convert_bigbench_task(task: dict, name: str, shuffle: bool = False) -> str:
    """A BIG-bench ``task.json`` (parsed) -> jsonl text, one ``{"id", "context", "choices", "label"}`` a line.

    ``id`` is ``<name>-<n>`` (n: position in ``examples``), ``context`` the example's ``input``, ``choices``
    the keys of ``target_scores`` in file order, ``label`` the index of the one key scored 1. Items without
    >= 2 choices, with a score other than 0 / 1 or without exactly one 1 are dropped. ``shuffle``: the
    choice indices are shuffled by ``random.Random(int(sha256(id)[:16], 16))`` and the label follows.
    """
    lines = []
    for n, example in enumerate(task["examples"]):
        scores = example.get("target_scores")
        if not isinstance(scores, dict) or len(scores) < 2 or any(s not in (0, 1) for s in scores.values()) \
                or sum(1 for s in scores.values() if s == 1) != 1:
            continue
        choices = list(scores)
        label = [s == 1 for s in scores.values()].index(True)
        item_id = f"{name}-{n}"
        if shuffle:
            order = list(range(len(choices)))
            random.Random(int(hashlib.sha256(item_id.encode()).hexdigest()[:16], 16)).shuffle(order)
            choices, label = [choices[i] for i in order], order.index(label)
        lines.append(json.dumps({"id": item_id, "context": example["input"], "choices": choices, "label": label},
                                ensure_ascii=False))
    return "\n".join(lines) + "\n"


def bigbench_prompts(tasks: dict[str, dict]) -> str:
    """prompts.json: per task file name, the task-level prompt fields its task.json sets (in ZEROSHOT_TASKS order)."""
    prompts = {name: {k: tasks[name][k] for k in PROMPT_FIELDS if k in tasks[name]} for name in ZEROSHOT_TASKS}
    return json.dumps(prompts, indent=1, ensure_ascii=False)


def convert_bigbench_sdist(archive: str | os.PathLike) -> dict[str, bytes]:
    """The zeroshot folder's files (name -> bytes) from the bigbench sdist, read as a stream."""
    wanted = {f"{BIGBENCH_TASKS_DIR}/{folder}/task.json": name for name, (folder, _, _) in ZEROSHOT_TASKS.items()}
    tasks: dict[str, dict] = {}
    with tarfile.open(archive, mode="r|gz") as tar:
        for member in tar:
            rel = member.name.split("/", 1)[1] if "/" in member.name else member.name  # drop "bigbench-1.0.0/"
            if rel in wanted and member.isfile():
                tasks[wanted[rel]] = json.loads(tar.extractfile(member).read().decode("utf-8"))
    missing = sorted(set(ZEROSHOT_TASKS) - set(tasks))
    if missing:
        raise DataIntegrityError(f"{archive}: no task.json for {', '.join(missing)}")
    files = {f"{name}.jsonl": convert_bigbench_task(tasks[name], name, ZEROSHOT_TASKS[name][2]).encode("utf-8")
             for name in ZEROSHOT_TASKS}
    files[PROMPTS_FILE] = bigbench_prompts(tasks).encode("utf-8")
    return files


def fetch_zeroshot_tasks(cache_dir: str | os.PathLike | None = None, download: Downloader = pip_download) -> Path:
    """Rebuild the zeroshot folder from PyPI into ``<cache_dir>/zeroshot`` (default: the user data cache);
    a folder already there that verifies is reused without a download. Returns the folder."""
    cache = Path(cache_dir) if cache_dir is not None else data_cache_dir()
    return rebuild_folder(cache / "zeroshot", expected_files(),
                          lambda tmp: convert_bigbench_sdist(fetch_verified(BIGBENCH_PACKAGE, tmp, download)))


def zeroshot_dir(cache_dir: str | os.PathLike | None = None, download: Downloader = pip_download) -> Path:
    """The verified zeroshot folder: the shared one when present, else the PyPI-built cache."""
    from hope.data.sources import find_shared_data_dir

    shared = find_shared_data_dir()
    if shared is not None:
        verify_zeroshot_dir(shared / "zeroshot")
        return shared / "zeroshot"
    return fetch_zeroshot_tasks(cache_dir, download)


__all__ = ["BIGBENCH_PACKAGE", "ZEROSHOT_TASKS", "PROMPTS_SHA256", "convert_bigbench_task", "convert_bigbench_sdist",
           "bigbench_prompts", "fetch_zeroshot_tasks", "verify_zeroshot_dir", "zeroshot_dir", "expected_files"]
