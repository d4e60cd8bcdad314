"""Using a trained model: loading it without its data (`loading`), the figures of a split (`metrics`), and
exporting it (`formats`).
"""
