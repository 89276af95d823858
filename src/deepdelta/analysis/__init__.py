"""Run and sweep summaries, statistics, figures, reports."""
