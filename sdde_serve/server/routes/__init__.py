"""Routers: ``predict`` (/v1), ``v2`` (Open Inference Protocol), ``metrics`` (/metrics)."""
