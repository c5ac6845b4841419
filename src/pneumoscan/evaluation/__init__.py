"""Evaluation on data: reports (computed in :mod:`.evaluate`, rendered by :mod:`.render` through
the Jinja2 templates in ``templates/``), figures (:mod:`.plots`), model cards, model
comparisons and recalibration of a model bundle's operating point."""
from __future__ import annotations
