"""Speculation control: engine-agnostic policies (and, later, cost and acceptance models)."""
