"""The HTTP API over Keel runs and the page it serves (`keel serve`): `create_app`."""

from keel.gateway.app import create_app

__all__ = ["create_app"]
