"""Everything that knows nothing of HTTP: the stored model and the per-model table, import,
inference and ranking, planning and answering requests, item attributes and the catalogue,
retrieval indexes, routes between models, session stores."""
