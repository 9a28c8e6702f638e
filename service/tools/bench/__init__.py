"""``convserve bench``: the served model against its in-process limit, side by side in one run.

:mod:`.cli` declares the command and imports nothing heavy; :mod:`.command` runs it. The served
steps are in :mod:`.sweep` (with the h2load driver in :mod:`.h2load`), the in-process ONNX
Runtime limit in :mod:`.raw`, the side-by-side comparisons in :mod:`.comparisons`, the dense
comparison in :mod:`.dense`, and the report and plot in :mod:`.report`. ``--protocol`` adds the
KServe requests over HTTP/REST (:mod:`.http`); ``--compare-precision`` measures fp32 against
int8 and fp16 instead of the sweep (:mod:`.precision`, its table in :mod:`.precision_report`).
"""
