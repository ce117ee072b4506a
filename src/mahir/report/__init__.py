"""What a person reads after a run: report.html with its plots, and the verdicts that explain
which candidate won and why the others did not."""
