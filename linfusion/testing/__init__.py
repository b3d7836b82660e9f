"""Helpers for tests, examples and demos that must run offline: tiny pipelines built from configs."""
