"""Integration fixtures live in harness.py; this makes them visible to the tests here."""

from tests.integration.harness import hako, image_store, template_store

__all__ = ["hako", "image_store", "template_store"]
