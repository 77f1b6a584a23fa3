"""The BentoML HTTP edge: schemas, request guard, lifecycle, observability, BentoML internals."""
