"""recbole-bento: serve RecBole sequential recommenders with BentoML.

Two wings:

* ``recbole_bento.core``: the stored model format, the per-model table, inference and ranking,
  the import of a RecBole checkpoint, safe unpickling and the BentoML model store. It knows
  nothing of HTTP.
* ``recbole_bento.edge``: the BentoML HTTP side (request schemas, the request guard, shutdown,
  metrics and logs, the BentoML internals this project relies on). ``service.py`` at the
  repository root declares the BentoML services from both.

``recbole_bento.settings`` holds every serving limit, read once from ``RECBOLE_BENTO_*``.
"""
