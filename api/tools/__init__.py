"""Tool calling at the edge (building blocks for issue #16, not yet served): OpenAI tool definitions and the
constraint that forces a call (definitions), the models' tool-call formats (formats, templates) and OpenAI
streaming deltas from a growing text (streaming). Pure functions; no model, no torch."""
