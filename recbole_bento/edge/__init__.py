"""The BentoML HTTP edge: the request guard, the request path, the fast path, topology, lifecycle,
observability. BentoML's internals live in ``recbole_bento.bentoml_compat``."""
