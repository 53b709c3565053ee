"""The bottom layer: settings, logging, telemetry, process helpers and model resolution. Imports nothing of ours."""
