"""MCP servers and agents the MCP tests use (the reference servers come from PyPI and npm)."""
