"""What a run shows a person: report.html with its plots, and the allocation's bar chart."""
