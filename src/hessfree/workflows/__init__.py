"""End-to-end workflows built on the methods (the demo for now)."""
