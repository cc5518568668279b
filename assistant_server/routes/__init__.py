"""REST routes of the ingress that live in modules of their own (the core routes are in api.py)."""
