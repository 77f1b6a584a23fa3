"""recbole-bento: serve RecBole sequential recommenders with BentoML.

Two wings:

* ``recbole_bento.core``: the stored model format, the per-model table, inference and ranking,
  the import of a RecBole checkpoint, safe unpickling and the BentoML model store. It knows
  nothing of HTTP.
* ``recbole_bento.edge``: the BentoML HTTP side (the request guard, the request path, shutdown,
  metrics and logs). ``service.py`` at the repository root declares the BentoML services from both.

Shared by both and by the offline scorers (``batch``, ``spark``): ``recbole_bento.schemas`` (the
request and response bodies), ``recbole_bento.settings`` (every serving limit, read once from
``RECBOLE_BENTO_*``) and ``recbole_bento.bentoml_compat`` (the one module that touches BentoML's
internals, version-checked).
"""
