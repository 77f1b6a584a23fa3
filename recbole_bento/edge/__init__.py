"""The BentoML HTTP side: start-up, topology and model loading, the request guard, the request path
and its fast path, variants, sessions, the playground, shutdown, metrics and logs. BentoML's
internals live in ``recbole_bento.bentoml_compat``."""
