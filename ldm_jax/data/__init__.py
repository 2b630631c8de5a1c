"""Procedurally generated training data: `shapes` (captioned geometric shapes) and `shapes_eval` (pixel analysis
that measures how well an image matches a shapes caption, with no learned classifier)."""
