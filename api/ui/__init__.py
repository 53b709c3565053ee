"""The web console's static files (`static/`: HTML, CSS, JavaScript modules; no build step), served at `/ui` by
api/routes/ui.py. Shipped as package data (pyproject.toml), so every API replica serves the same console."""
