"""The one start-up step of every `bentoml serve` process, before the services are declared.

``service.py`` calls ``start()`` once at import; each BentoML process (the arbiter, then every
worker) imports it, so each runs these steps, in this order:

1. BentoML itself: the installed version and every private internal the project touches are
   checked (``bentoml_compat.check``): a BentoML that differs stops the server with one line,
   unless ``RECBOLE_BENTO_ALLOW_UNTESTED_BENTOML=1``, which serves without touching them;
2. logging: the project's logger at INFO, JSON lines when ``RECBOLE_BENTO_JSON_LOGS=1``, refused
   requests as one WARNING line instead of BentoML's ERROR traceback;
3. the stored models: ``RECBOLE_BENTO_ROUTES`` read and checked (``core/routes.py``), or else
   ``RECBOLE_BENTO_MODEL`` (unset: the newest import) as the one variant ``default``; each model
   resolved in the model store, and every stored file checked against its sha256 (an altered
   model stops the server before any worker starts; the services then load with
   ``verified=True``); a bad routes file, a missing tag, an empty store or an altered file stops
   it with one line (SystemExit), not a traceback;
4. the device: ``RECBOLE_BENTO_DEVICE`` checked (a bad value stops the server with the reason
   instead of restarting a failing worker);
5. BentoML's per-request costs that change no answer removed (``bentoml_compat.apply``), and the
   tracing config that spares the API paths OpenTelemetry spans when tracing is off.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any

import bentoml

from .. import bentoml_compat
from ..core import index, store
from ..core import routes as routing
from ..core.artifact import ArtifactError
from ..core.engine import pick_device
from ..settings import Settings
from . import guard, observability

logger = logging.getLogger("recbole_bento")


@dataclass(frozen=True)
class Started:
    model: bentoml.Model  # the first variant's stored model, verified
    tag: str
    routes: routing.Routes  # as read (RECBOLE_BENTO_ROUTES) or implied (the one model)
    models: dict[str, bentoml.Model]  # every model the routes name, by tag as written, verified
    device: str  # where the ranking service runs the model
    tracing: dict[str, Any]  # the services' ``tracing`` config
    compatible: bool = True  # BentoML's internals checked (bentoml_compat): the patches may be used


def start(settings: Settings, traced_paths: list[str]) -> Started:
    compatible = bentoml_compat.check(allow_untested=bool(settings.allow_untested_bentoml))
    warnings.filterwarnings("ignore", category=FutureWarning)  # RecBole 1.2.1 vs pandas 2.x
    logger.setLevel(logging.INFO)  # "loaded <tag> on <device>"; BentoML's root logger passes warnings only
    if settings.json_logs:
        observability.use_json_logs(bentoml_configs=compatible)
    guard.quiet_client_errors()
    try:
        routes = routing.read(settings.routes) if settings.routes else None
        if routes is None:
            first = store.resolve(settings.model)
            routes = routing.single(str(first.tag))
        tags = [v.model for v in routes.variants] + ([routes.shadow] if routes.shadow else [])
        models = {tag: store.resolve(tag) for tag in dict.fromkeys(tags)}
        for model in {str(m.tag): m for m in models.values()}.values():
            store.verify(model)
            index.require(model.info.metadata)  # a model with a retrieval index needs faiss
    except (ArtifactError, routing.RoutesError) as exc:  # `bentoml serve` prints a SystemExit's message alone
        raise SystemExit(f"recbole-bento: {exc}") from None
    model = models[routes.variants[0].model]
    device = str(pick_device(settings.device))
    if not compatible:
        return Started(model, str(model.tag), routes, models, device, tracing={}, compatible=False)
    bentoml_compat.apply()
    return Started(model, str(model.tag), routes, models, device, bentoml_compat.untraced(traced_paths))
