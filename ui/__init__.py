"""lensbench's Gradio UI: layout and wiring in `app`, figures in `plots`, tables and downloads in
`tables`, the model and backend pickers in `choices`, readable token text in `tokens`.

Nothing here computes a lens or loads a model itself: it calls `tracing` and `chat`.
"""
