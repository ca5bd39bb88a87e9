"""The commands beyond training: cluster, export, report, compare. Only ``deepclust.cli`` imports them."""
