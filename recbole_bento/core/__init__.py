"""What serving does without HTTP: stored model, models table, inference, ranking, import."""
