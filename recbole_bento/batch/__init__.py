"""Offline batch scoring: /recommend's answer for every row of a file, without HTTP.

    python -m recbole_bento.batch --model TAG_OR_FILE --input IN --output OUT [--topk 10] [--exclude-seen]
                                  [--filters JSON] [--sequence-col sequence] [--user-col user_id]
                                  [--on-bad-row skip|stop] [--batch-size 64]

IN and OUT are ``.jsonl``, ``.csv`` or ``.parquet`` (chosen by extension). Each row gets the answer
/recommend gives for it. OUT holds every input column, in input order, plus ``item_list``,
``score_list``, ``unknown_items`` and ``fallback``. It is written under a temporary name in OUT's
folder and renamed when complete. On bad input: exit 1 and a one-line reason on stderr.

* ``cli``: the command line (``main``);
* ``files``: the readers and writers of the three formats;
* ``pipeline``: the two processes (this one ranks, a forked child reads, maps, decodes, writes);
* ``scorer``: from rows to answers, shared with ``recbole_bento.spark``.
"""

from .cli import main

__all__ = ["main"]
