"""Where a run's numbers go: its own files (`run_files`), the trackers (`base`, `factory`, `wandb_run`,
`local`), and many runs side by side (`aggregate`).
"""
