"""The commands beyond training (eval, cluster, browse, export, report, compare, prepare, transfer). Only
``deepclust.cli`` imports them (and voc_svm, evaluate's shared pieces)."""
