"""Integration-test fixtures for the real services (started by scripts/test, or on demand).

Each service's fixtures live in a plugin module of their own, so that their owners do not collide.
"""

pytest_plugins: list[str] = []
